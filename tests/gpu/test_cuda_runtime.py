"""runtime/ on CUDA: pinned host store -> copy stream -> slot buffers (no vLLM needed)."""

import pytest
import torch

from vllm_moe_offload.runtime.expert_cache import ExpertCache
from vllm_moe_offload.runtime.store import ExpertLayout, HostStore, TensorSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU")

L, E, H, I = 4, 8, 256, 512
LAYOUT = ExpertLayout((TensorSpec((2 * I, H), torch.bfloat16),
                       TensorSpec((H, I), torch.bfloat16)))


def make_cache(num_slots):
    store = HostStore(LAYOUT, L, E, pin_memory=True)
    g = torch.Generator().manual_seed(0)
    full = []
    for layer in range(L):
        row = []
        for e in range(E):
            w = [torch.randn(s.shape, generator=g).to(s.dtype) for s in LAYOUT.tensors]
            store.put(layer, e, w)
            row.append(w)
        full.append(row)
    store.seal()
    return ExpertCache(store, num_slots, "cuda"), full


def moe(x, w13, w2, ids, weights):
    """Reference MoE: x [T, H], w13 [N, 2I, H], w2 [N, H, I] -> [T, H]."""
    gate, up = torch.einsum("th,tkih->tki", x, w13[ids]).chunk(2, dim=-1)
    act = torch.nn.functional.silu(gate) * up  # [T, K, I]
    return torch.einsum("tki,tkhi,tk->th", act, w2[ids], weights)


def test_pinned_store_and_slot_buffers_live_where_they_should():
    cache, _ = make_cache(E)
    assert cache.store._data.is_pinned()
    assert all(b.is_cuda for b in cache.buffers)


def test_the_store_is_page_locked_at_its_own_size():
    """torch's pin_memory rounds a block up to a power of two (a 90 GB store would
    lock 128 GiB); the store registers its own memory instead (store.py _page_lock)."""
    from vllm_moe_offload.runtime.store import _registered_is_mapped

    assert _registered_is_mapped()  # else the store falls back to torch's pinning
    stats = getattr(torch.cuda, "host_memory_stats", lambda: {})
    before = stats().get("allocated_bytes.current", 0)
    layout = ExpertLayout((TensorSpec((3, 1000), torch.bfloat16),))  # 8 KiB records
    store = HostStore(layout, 3, 7, pin_memory=True)
    assert store._data.is_pinned() and store._data.nbytes == 21 * layout.record_bytes
    assert stats().get("allocated_bytes.current", 0) == before  # not torch's pinned pool
    w = torch.randn(3, 1000).bfloat16()
    store.put(2, 6, [w])
    dst = [torch.empty(3, 1000, dtype=torch.bfloat16, device="cuda")]
    store.read_into(2, 6, dst)  # non-blocking, from the registered memory
    torch.cuda.synchronize()
    assert torch.equal(dst[0].cpu(), w)


@pytest.mark.parametrize("num_slots", [E, L * E // 2, L * E])
def test_cuda_outputs_match_all_resident(num_slots):
    cache, full = make_cache(num_slots)
    for step in range(3):
        for layer in range(L):
            g = torch.Generator(device="cuda").manual_seed(step * 100 + layer)
            x = torch.randn(16, H, device="cuda", generator=g).to(torch.bfloat16)
            scores = torch.rand(16, E, device="cuda", generator=g)
            weights, ids = scores.topk(2, dim=-1)
            weights = (weights / weights.sum(-1, keepdim=True)).to(torch.bfloat16)
            slot_ids = cache.map_to_slots(layer, ids.to(torch.int32))
            w13 = torch.stack([w[0] for w in full[layer]]).cuda()
            w2 = torch.stack([w[1] for w in full[layer]]).cuda()
            want = moe(x, w13, w2, ids, weights)
            got = moe(x, cache.buffers[0], cache.buffers[1], slot_ids.long(), weights)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    t = cache.stats.to_dict()["totals"]
    assert t["bytes_loaded"] == t["misses"] * LAYOUT.expert_bytes
    assert (t["evictions"] == 0) == (num_slots == L * E)


def test_host_mode_prefetches_from_the_disk_store_on_its_thread(tmp_path, monkeypatch):
    """Host mode, the disk store and a predictor: each prefetch is a disk read, made
    on the loader thread (on the forward thread it blocked the step, the GPU idle),
    its copies queued on the copy stream, the target's call ordered after them by an
    event. Records span several staging chunks; outputs stay exact."""
    import threading

    from vllm_moe_offload.runtime import store as store_module
    from vllm_moe_offload.runtime.predictors import Predictor
    from vllm_moe_offload.runtime.store import DiskStore

    monkeypatch.setattr(store_module, "_STAGING_BYTES", 64 << 10)  # 12 per record
    _, full = make_cache(E)
    store = DiskStore(tmp_path / "s.experts", LAYOUT, L, E, {"model": "t"})
    for layer in range(L):
        for e in range(E):
            store.put(layer, e, full[layer][e])
    store.seal()
    routing = {}
    for step in range(3):
        for layer in range(L):
            g = torch.Generator(device="cuda").manual_seed(step * 100 + layer)
            routing[step, layer] = torch.rand(16, E, device="cuda", generator=g).topk(2)

    class Oracle(Predictor):
        step = 0

        def predict(self, layer, hidden):
            return [(t, sorted(set(routing[self.step, t][1].flatten().tolist())))
                    for t in self.targets(layer)]

    oracle = Oracle(depth=1, top_k=2, num_layers=L)
    cache = ExpertCache(store, L * E // 2, "cuda", predictor=oracle)
    assert cache._loader is not None  # (none over the pinned host store: copies queued)
    readers = []
    read = store.read_into
    monkeypatch.setattr(store, "read_into", lambda *a: readers.append(
        threading.current_thread().name) or read(*a))
    for step in range(3):
        oracle.step = step
        for layer in range(L):
            weights, ids = routing[step, layer]
            weights = (weights / weights.sum(-1, keepdim=True)).to(torch.bfloat16)
            x = torch.randn(16, H, device="cuda").to(torch.bfloat16)
            slot_ids = cache.map_to_slots(layer, ids.to(torch.int32), x)
            w13 = torch.stack([w[0] for w in full[layer]]).cuda()
            w2 = torch.stack([w[1] for w in full[layer]]).cuda()
            got = moe(x, cache.buffers[0], cache.buffers[1], slot_ids.long(), weights)
            torch.testing.assert_close(got, moe(x, w13, w2, ids, weights), rtol=0, atol=0)
    cache.close()
    t = cache.stats.to_dict()["totals"]
    on_thread = sum(n.startswith("expert-prefetch") for n in readers)
    assert t["prefetch_hits"] > 0 and on_thread == t["prefetched"]
    assert store.repairs == 0


# A step's report and inputs under vLLM's async scheduling (slot_buffers.py): the
# host queues them and goes on while the GPU still runs the step before.
SPIN = 2_000_000_000  # torch.cuda._sleep cycles: about a second of GPU time


def test_read_later_waits_for_its_copy_not_for_work_queued_after_it():
    from vllm_moe_offload.runtime.slot_buffers import read_later

    x = torch.arange(4, device="cuda")
    read = read_later(x)
    torch.cuda._sleep(SPIN)  # the next step
    x += 10
    (got,) = read()
    assert got.tolist() == [0, 1, 2, 3]  # the values of when it was asked for
    assert not torch.cuda.current_stream().query()  # returned while the spin runs
    torch.cuda.synchronize()


def test_copy_in_does_not_wait_for_the_work_before_it():
    from vllm_moe_offload.runtime.slot_buffers import copy_in

    dst = torch.zeros(4, dtype=torch.int64, device="cuda")
    torch.cuda._sleep(SPIN)  # the step still running, which reads dst's old values
    copy_in(dst, torch.arange(4))
    assert not torch.cuda.current_stream().query()  # the host did not wait for it
    torch.cuda.synchronize()
    assert dst.tolist() == [0, 1, 2, 3]


def test_read_later_is_ready_only_once_its_copy_ran():
    """metrics.py writes a snapshot queued by stats_later at the first step after it
    that finds it ready: ready() must not wait, and must not lie."""
    from vllm_moe_offload.runtime.slot_buffers import read_later

    torch.cuda._sleep(SPIN)  # the step before, still running
    read = read_later(torch.arange(4, device="cuda")).then(lambda h: h[0].sum().item())
    assert not read.ready()  # returns at once, while the spin runs
    torch.cuda.synchronize()
    assert read.ready() and read() == 6


def test_gpu_room_is_what_vllms_utilization_cap_leaves():
    """The pool's room (modes.py gpu_room): the default pool takes at most half."""
    from vllm_moe_offload.runtime.modes import gpu_room

    free, total = torch.cuda.mem_get_info()
    left, where = gpu_room(torch.device("cuda"), 0.9)
    assert 0 < left <= 0.9 * total and "--gpu-memory-utilization 0.9" in where
    torch.cuda.empty_cache()  # vLLM's start-up snapshot, as its worker takes it (what
    # torch keeps cached and unused counts as free, as in gpu_room)
    start = (torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved()
             - torch.cuda.memory_allocated())
    budget = (int(0.5 * total), start, lambda: torch.cuda.mem_get_info()[0])
    assert gpu_room(torch.device("cuda"), 0.5, budget)[0] == budget[0]  # nothing used yet
    x = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")  # 256 MiB taken
    assert gpu_room(torch.device("cuda"), 0.9)[0] <= left - (255 << 20)
    mine, where = gpu_room(torch.device("cuda"), 0.5, budget)
    assert budget[0] - (258 << 20) <= mine <= budget[0] - (254 << 20)
    assert "this instance's" in where
    del x
