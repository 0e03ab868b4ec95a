"""The quantized store on CUDA: the Triton decode kernel bit-identical to the torch
reference, and host and disk stores decoding into GPU slots (no vLLM needed)."""

import pytest
import torch

from tests.unit.runtime import dequant_cases, device_cases
from vllm_moe_offload.runtime.expert_cache import ExpertCache
from vllm_moe_offload.runtime.quant import GroupQuant, MixedStore, QuantizedStore
from vllm_moe_offload.runtime.store import DiskStore, ExpertLayout, HostStore, TensorSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

L, E, H, I = 3, 8, 256, 512
SLOT = ExpertLayout((TensorSpec((2 * I, H), torch.bfloat16), TensorSpec((H, I), torch.bfloat16)))


def test_decode_kernel_is_bit_identical_to_torch():
    results = dequant_cases.run("cuda")
    assert all(v is None for v in results.values()), results


@pytest.mark.parametrize("kind", ["host", "disk", "mixed"])
def test_quantized_store_fills_gpu_slots_like_the_cpu_decode(tmp_path, kind):
    codec = GroupQuant(4, 64)
    record = codec.layout(SLOT)
    if kind == "mixed":  # a quarter of the experts at 8 bits, in a store of their own
        hot_codec = GroupQuant(8, 64)
        hot = [(layer, e) for layer in range(L) for e in range(0, E, 4)]
        cold = [(layer, e) for layer in range(L) for e in range(E) if (layer, e) not in hot]
        store = MixedStore(
            QuantizedStore(HostStore(hot_codec.layout(SLOT), L, E, pin_memory=True, keys=hot),
                           hot_codec, SLOT),
            QuantizedStore(HostStore(record, L, E, pin_memory=True, keys=cold), codec, SLOT))
    else:
        inner = (HostStore(record, L, E, pin_memory=True) if kind == "host" else
                 DiskStore(tmp_path / "q.experts", record, L, E, {"model": "t"}))
        store = QuantizedStore(inner, codec, SLOT)
    want = device_cases.fill_quantized(
        store, L, E, SLOT,
        lambda layer, e: hot_codec if kind == "mixed" and (layer, e) in hot else codec, seed=0)
    g = torch.Generator().manual_seed(1)
    cache = ExpertCache(store, E + 2, "cuda")
    moved = 0
    for layer in range(L):
        ids = torch.randint(0, E, (5, 2), generator=g).cuda()
        before = cache.stats.totals().misses
        slots = cache.map_to_slots(layer, ids)
        torch.cuda.synchronize()
        assert cache.stats.totals().misses - before == len(set(ids.view(-1).tolist()))
        for e in set(ids.view(-1).tolist()):
            moved += store.read_bytes_of(layer, e)
        for e, s in zip(ids.view(-1).tolist(), slots.view(-1).tolist()):
            got = [b[s].cpu() for b in cache.buffers]
            assert all(torch.equal(a, b) for a, b in zip(got, want[layer, e]))
    assert cache.stats.totals().bytes_loaded == moved


@pytest.mark.parametrize("bits", [4, 2])
def test_encoding_on_the_gpu_is_as_good_as_on_the_cpu(bits):
    """The store's encoder on CUDA (not an hour on the CPU for a model): the record's
    layout and dtypes, an error no worse than the CPU's beyond noise, and codes that
    mostly agree with the CPU's (rounding, or an early stop one step apart, moves
    few; a broken encoder would move nearly all)."""
    codec = GroupQuant(bits, 64)
    g = torch.Generator().manual_seed(3)
    w = [(torch.randn(s.shape, generator=g) * 0.02).to(s.dtype) for s in SLOT.tensors]
    on_cpu, on_gpu = codec.encode(w), codec.encode([t.cuda() for t in w], "cuda")
    assert [(t.shape, t.dtype, t.device.type) for t in on_gpu] == \
        [(t.shape, t.dtype, "cpu") for t in on_cpu]
    err = {}
    for name, stored in (("cpu", on_cpu), ("gpu", on_gpu)):
        out = [torch.empty_like(t) for t in w]
        codec.decode(stored, out)
        err[name] = sum(float((o.float() - t.float()).abs().mean()) for o, t in zip(out, w))
    assert err["gpu"] <= err["cpu"] * 1.01, err
    codes_differ = sum(int((a != b).sum()) for a, b in zip(on_cpu[::3], on_gpu[::3]))
    assert codes_differ <= 0.1 * sum(t.numel() for t in on_cpu[::3]), codes_differ


def test_the_store_encodes_on_its_device(monkeypatch):
    codec = GroupQuant(4, 64)
    store = QuantizedStore(HostStore(codec.layout(SLOT), 1, 1), codec, SLOT,
                           encode_device="cuda")
    w = [(torch.randn(s.shape) * 0.02).to(s.dtype) for s in SLOT.tensors]
    where = []
    encode_one = GroupQuant._encode_one
    monkeypatch.setattr(GroupQuant, "_encode_one",
                        lambda self, m: where.append(m.device.type) or encode_one(self, m))
    store.put(0, 0, w)
    assert where == ["cuda", "cuda"]  # w13 and w2, on the GPU
    monkeypatch.undo()
    store.seal()
    out = [torch.empty_like(t) for t in w]
    store.read_into(0, 0, out)
    ref = [torch.empty_like(t) for t in w]
    codec.decode(codec.encode([t.cuda() for t in w], "cuda"), ref)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
