"""Compile device mode's kernels for an H100 (sm_90) on a host with no GPU.

Triton's interpreter runs a kernel as Python, so it accepts what the compiler
refuses (a kernel reading a global that is not constexpr broke every resolve
launch on CUDA while every interpreter case passed). Here a stand-in driver makes
each launch compile only, through Triton's own CUDA backend and its bundled ptxas,
for the kinds of store and options device mode has; nothing runs.

    python -m tests.unit.runtime.sm90_compile   # prints the kernels compiled, as JSON
"""

from __future__ import annotations

import json

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction


class CompileOnly:
    """The driver Triton asks for the device and its target: an H100."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def map_python_to_cpp_type(self, t):
        return t


def compile_all() -> dict[str, dict[str, int]]:
    """Drive device caches of every store kind and option; returns, per kernel, the
    launches compiled and the most shared memory (bytes) one of them takes."""
    from tests.unit.runtime import device_cases as dc
    from vllm_moe_offload.core.slot_pool import SlotGroup
    from vllm_moe_offload.runtime.device_cache import DeviceExpertCache
    from vllm_moe_offload.runtime.quant import GroupQuant, MixedStore, QuantizedStore
    from vllm_moe_offload.runtime.store import ExpertLayout, HostStore, TensorSpec

    compiled: dict[str, int] = {}
    shared: dict[str, int] = {}  # the most shared memory a variant of each takes
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        name = self.fn.__name__
        compiled[name] = compiled.get(name, 0) + 1
        shared[name] = max(shared.get(name, 0), kernel.metadata.shared)
        return kernel

    driver.set_active(CompileOnly())
    JITFunction.run = compile_only

    L, E = 3, 8
    slot = ExpertLayout((TensorSpec((16, 64), torch.bfloat16),
                         TensorSpec((64, 32), torch.bfloat16)))

    def drive(cache, predictor=None, layers=L):
        for tokens in (1, 700):  # one token (a constexpr to Triton) and many
            ids = torch.randint(0, E, (tokens, 2), dtype=torch.int32)
            if predictor is not None:
                predictor.next = {t: ids[:2] for t in range(layers)}
            for layer in range(layers):
                cache.map_to_slots(layer, ids, torch.zeros(1, 4))

    stores = {"bf16": dc.make_store(L, E)[0], "many": dc.make_store(L, E, dc.MANY)[0],
              "4-bit": dc.make_quantized_store(L, E, slot, 4)[0],
              "3-bit": dc.make_quantized_store(L, E, slot, 3)[0]}
    hot_keys = [(0, e) for e in range(E)]
    codecs = (GroupQuant(8, 32, "rtn"), GroupQuant(4, 32, "rtn"))
    hot, cold = (QuantizedStore(HostStore(c.layout(slot), L, E, keys=keys), c, slot)
                 for c, keys in zip(codecs, (hot_keys, [(layer, e) for layer in range(1, L)
                                                        for e in range(E)])))
    stores["mixed 8/4"] = MixedStore(hot, cold)
    dc.fill_quantized(stores["mixed 8/4"], L, E, slot,
                      lambda layer, e: codecs[layer > 0], 5)
    # (store, eviction, prefetch depth, programmatic dependent launch)
    for name, eviction, depth, pdl in (("bf16", "reuse", 2, True), ("bf16", "clock", 0, False),
                                       ("many", "reuse", 1, False), ("4-bit", "reuse", 1, True),
                                       ("3-bit", "reuse", 0, False),
                                       ("mixed 8/4", "reuse", 1, True)):
        predictor = dc.FixedPredictor(depth, L) if depth else None
        cache = DeviceExpertCache(stores[name], E + 4, "cpu", predictor=predictor,
                                  eviction=eviction)
        cache.pdl = pdl
        drive(cache, predictor)
    predictor = dc.FixedPredictor(2, 4)
    cache = DeviceExpertCache(dc.make_store(4, E)[0], 34, "cpu", predictor=predictor,
                              groups=[SlotGroup(range(0, 2), 0, 16),
                                      SlotGroup(range(2, 4), 16, 34)])
    drive(cache, predictor, layers=4)
    # model-sized: Qwen3-30B-A3B's E = 128 in a group of 768 slots, and E = 512 in
    # 992 (the widest victim scans and id blocks), decode and prefill-sized calls
    for E, slots in ((128, 768), (512, 992)):
        predictor = dc.FixedPredictor(1, 2)
        cache = DeviceExpertCache(dc.make_store(2, E)[0], slots, "cpu", predictor=predictor)
        for tokens in (1, 4096):
            ids = torch.randint(0, E, (tokens, 8), dtype=torch.int32)
            predictor.next = {1: ids[:1]}
            for layer in range(2):
                cache.map_to_slots(layer, ids, torch.zeros(1, 4))
    # host mode's decode on CUDA (a quantized store's miss), at every width
    from vllm_moe_offload.runtime.dequant_kernel import decode_into
    for bits in (8, 4, 3, 2):
        codec, t = GroupQuant(bits, 32, "rtn"), torch.randn(16, 64)
        for dtype in (torch.bfloat16, torch.float16):
            codes, scale, zero = codec.encode([t.to(dtype)])
            decode_into(codes, scale, zero, torch.empty(16, 64, dtype=dtype), bits, 32)
    return {"compiled": compiled, "shared": shared}


if __name__ == "__main__":
    print(json.dumps({"triton": triton.__version__, **compile_all()}))
