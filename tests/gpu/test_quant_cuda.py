"""The quantized store on CUDA: the Triton decode kernel bit-identical to the torch
reference, and host and disk stores decoding into GPU slots (no vLLM needed)."""

import pytest
import torch

from tests.unit.runtime import dequant_cases
from vllm_moe_offload.runtime.expert_cache import ExpertCache
from vllm_moe_offload.runtime.quant import GroupQuant, QuantizedStore
from vllm_moe_offload.runtime.store import DiskStore, ExpertLayout, HostStore, TensorSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

L, E, H, I = 3, 8, 256, 512
SLOT = ExpertLayout((TensorSpec((2 * I, H), torch.bfloat16), TensorSpec((H, I), torch.bfloat16)))


def test_decode_kernel_is_bit_identical_to_torch():
    results = dequant_cases.run("cuda")
    assert all(v is None for v in results.values()), results


@pytest.mark.parametrize("kind", ["host", "disk"])
def test_quantized_store_fills_gpu_slots_like_the_cpu_decode(tmp_path, kind):
    codec = GroupQuant(4, 64)
    record = codec.layout(SLOT)
    inner = (HostStore(record, L, E, pin_memory=True) if kind == "host" else
             DiskStore(tmp_path / "q.experts", record, L, E, {"model": "t"}))
    store = QuantizedStore(inner, codec, SLOT)
    g = torch.Generator().manual_seed(0)
    want = {}
    for layer in range(L):
        for e in range(E):
            w = [(torch.randn(s.shape, generator=g) * 0.05).to(s.dtype) for s in SLOT.tensors]
            store.put(layer, e, w)
            want[layer, e] = [torch.empty_like(t) for t in w]
            codec.decode(codec.encode(w), want[layer, e])  # torch on the CPU
    store.seal()
    cache = ExpertCache(store, E + 2, "cuda")
    for layer in range(L):
        ids = torch.randint(0, E, (5, 2), generator=g).cuda()
        slots = cache.map_to_slots(layer, ids)
        torch.cuda.synchronize()
        for e, s in zip(ids.view(-1).tolist(), slots.view(-1).tolist()):
            got = [b[s].cpu() for b in cache.buffers]
            assert all(torch.equal(a, b) for a, b in zip(got, want[layer, e]))
    t = cache.stats.totals()
    assert t.bytes_loaded == t.misses * record.expert_bytes
