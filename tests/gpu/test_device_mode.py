"""Device mode on CUDA: residency on the GPU, no host sync, CUDA graphs, disk tier."""

import pytest
import torch

from tests.unit.runtime import device_cases
from vllm_moe_offload.runtime.expert_cache import ExpertCache
from vllm_moe_offload.runtime.modes import make_expert_cache
from vllm_moe_offload.runtime.store import DiskStore, ExpertLayout, TensorSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

H, I = 256, 512
LAYOUT = ExpertLayout((TensorSpec((2 * I, H), torch.bfloat16),
                       TensorSpec((H, I), torch.bfloat16)))


@pytest.mark.parametrize("small", [True, False])
@pytest.mark.parametrize("case", sorted(device_cases.CASES))
def test_device_cases_on_cuda(case, small, monkeypatch):
    monkeypatch.setattr(device_cases, "SMALL", small)
    device_cases.CASES[case]("cuda")


def moe(x, w13, w2, ids, weights):
    """Reference MoE: x [T, H], w13 [N, 2I, H], w2 [N, H, I] -> [T, H]."""
    gate, up = torch.einsum("th,tkih->tki", x, w13[ids]).chunk(2, dim=-1)
    act = torch.nn.functional.silu(gate) * up  # [T, K, I]
    return torch.einsum("tki,tkhi,tk->th", act, w2[ids], weights)


class Script:
    """Per layer: static inputs a graph reads, and a fresh routing per step."""

    def __init__(self, L, E, T, K, seed=0):
        self.L, self.E, self.T, self.K = L, E, T, K
        self.gen = torch.Generator(device="cuda").manual_seed(seed)
        self.x = torch.zeros(L, T, H, dtype=torch.bfloat16, device="cuda")
        self.ids = torch.zeros(L, T, K, dtype=torch.int64, device="cuda")
        self.w = torch.zeros(L, T, K, dtype=torch.bfloat16, device="cuda")
        self.out = torch.zeros(L, T, H, dtype=torch.bfloat16, device="cuda")

    def next(self):
        self.x.copy_(torch.randn(self.x.shape, generator=self.gen, device="cuda"))
        scores = torch.rand(self.L, self.T, self.E, generator=self.gen, device="cuda")
        top, ids = scores.topk(self.K, dim=-1)
        self.ids.copy_(ids)
        self.w.copy_(top / top.sum(-1, keepdim=True))

    def expected(self, full13, full2):
        return torch.stack([moe(self.x[l], full13[l], full2[l], self.ids[l], self.w[l])
                            for l in range(self.L)])


class TruePredictor:
    """Predicts the script's real ids for the next layers (read from the buffer)."""

    def __init__(self, script, depth):
        self.script, self.depth, self.num_layers = script, depth, script.L

    def predict_ids(self, layer, hidden):
        return [(t, self.script.ids[t]) for t in range(
            layer + 1, min(layer + self.depth, self.num_layers - 1) + 1)]


def stacked(full, L, E):
    w13 = torch.stack([torch.stack([full[(l, e)][0] for e in range(E)]) for l in range(L)])
    w2 = torch.stack([torch.stack([full[(l, e)][1] for e in range(E)]) for l in range(L)])
    return w13.cuda(), w2.cuda()


@pytest.mark.parametrize("num_slots,predict", [(8, False), (12, True), (20, True), (64, False)])
def test_graphed_steps_match_all_resident(num_slots, predict):
    """A whole step of L layers in one CUDA graph, replayed with new routing: every
    replay's outputs equal the all-resident reference, bit for bit. With a pool of
    one layer (S = E) every call evicts; with a predictor, prefetch fills run on the
    copy stream beside the compute stream. A slot overwritten while a queued kernel
    still read it would show up as a wrong output here."""
    store, full = device_cases.make_store(8, 8, LAYOUT, pinned=True)
    graphed_steps_match(store, full, num_slots, predict)


@pytest.mark.parametrize("num_slots", [12, 20])
def test_piecewise_graphs_with_prefetch_match_all_resident(num_slots):
    """vLLM's piecewise graphs (prefill, mixed batches) end a capture at each attention
    op, so here each layer call is a graph of its own, as it is in vLLM (the call runs
    inside its opaque moe_forward op). Prefetch forks the copy stream in one piece;
    `join_prefetch` after the MoE kernel joins it before the piece ends (CUDA refuses
    to end a capture with a stream still forked). Replays equal all-resident."""
    store, full = device_cases.make_store(8, 8, LAYOUT, pinned=True)
    graphed_steps_match(store, full, num_slots, True, pieces=True)


@pytest.mark.skipif(not torch.cuda.is_available()
                    or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a CUDA GPU of compute capability 9.0 or newer")
@pytest.mark.parametrize("bits", [16, 4])
def test_graphed_steps_with_pdl_match_all_resident(bits):
    """The demand fill launched as a programmatic dependent of resolve (its programs
    wait in gdc_wait for resolve's writes): replays still equal all-resident."""
    if bits == 16:
        store, full = device_cases.make_store(8, 8, LAYOUT, pinned=True)
    else:
        store, full = device_cases.make_quantized_store(8, 8, LAYOUT, bits, pinned=True)
    graphed_steps_match(store, full, 12, True, pdl=True)


@pytest.mark.parametrize("bits", [4, 3])
def test_graphed_steps_decode_a_quantized_store(bits):
    """The same with a quantized store: the fill decodes each miss (prefetched ones
    on the copy stream) and every replay equals plain over the decoded experts."""
    store, full = device_cases.make_quantized_store(8, 8, LAYOUT, bits, pinned=True)
    graphed_steps_match(store, full, 12, True)


def test_graphed_steps_with_slot_groups_task_counts_and_a_trace(tmp_path):
    """A pool split in two slot groups (as above 992 slots), each layer's kernel over
    its group's slots, prefetch across the groups, task-aware counting and the
    routing trace's buffer in the graph: replays equal all-resident, each replay
    counts its step's layout (set between replays; the graph's padded rows go to the
    sink), and the trace holds each step's rows of every layer."""
    from vllm_moe_offload.core.slot_pool import SlotGroup

    store, full = device_cases.make_store(8, 8, LAYOUT, pinned=True)
    groups = [SlotGroup(range(0, 4), 0, 12), SlotGroup(range(4, 8), 12, 26)]
    graphed_steps_match(store, full, 26, True, groups=groups, tasks=True,
                        trace=str(tmp_path / "routing.trace"))


@pytest.mark.parametrize("pieces", [False, True])
@pytest.mark.parametrize("delay", ["copy", "compute"])
def test_graphed_steps_match_with_slow_copies_or_slow_compute(delay, pieces):
    """Races forced, not left to timing: every copy-stream fill sleeps first (a
    layer that did not wait for its prefetch reads a slot not filled yet), or every
    layer's compute sleeps before its MoE (a prefetch fill that did not wait for the
    kernels reading its victim overwrites it under them). Replays still equal
    all-resident, bit for bit."""
    store, full = device_cases.make_store(8, 8, LAYOUT, pinned=True)
    graphed_steps_match(store, full, 12, True, pieces=pieces, delay=delay)


def graphed_steps_match(store, full, num_slots, predict, pieces=False, pdl=False,
                        groups=None, tasks=False, trace=None, delay=None):
    """Whole steps in one graph, or (`pieces`) one graph per layer call. `delay`:
    "copy" sleeps on the copy stream before each fill there, "compute" on the
    compute stream between a layer's map_to_slots and its MoE (both captured)."""
    L, E, T, K = store.num_layers, store.experts_per_layer, 4, 2
    full13, full2 = stacked(full, L, E)
    script = Script(L, E, T, K, seed=num_slots)
    predictor = TruePredictor(script, depth=2) if predict else None
    cache, why = make_expert_cache(store, num_slots, "cuda", predictor=predictor,
                                   groups=groups)
    assert why is None and cache.mode == "device"
    cache.pdl = pdl
    if delay == "copy":
        fill = cache._fill

        def slow_fill(*args, **kwargs):
            if torch.cuda.current_stream() == cache._copy_stream:
                torch.cuda._sleep(20_000_000)  # ~10 ms of GPU clock cycles
            return fill(*args, **kwargs)

        cache._fill = slow_fill
    if trace is not None:
        from vllm_moe_offload.core.trace import TraceHeader, TraceWriter, read_trace

        cache.set_trace(TraceWriter(trace, TraceHeader(L, E, K)), T, K)
        traced = []
    residency = None
    if tasks:
        from vllm_moe_offload.runtime.task_residency import TaskResidency

        residency = TaskResidency(cache, 0, 10**6, max_step_tokens=T)
        residency.begin_step([("a", 1), ("b", 2)], 0, {})  # 3 of the T rows
        expect = {"a": torch.zeros(L, E, dtype=torch.int64),
                  "b": torch.zeros(L, E, dtype=torch.int64)}

    def call(l):
        if residency is not None:
            residency.record(l, script.ids[l])
        slots = cache.map_to_slots(l, script.ids[l], script.x[l])
        if delay == "compute":
            torch.cuda._sleep(20_000_000)
        script.out[l] = moe(script.x[l], *cache.layer_buffers(l), slots, script.w[l])

    script.next()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up, eager: prefetch joins across calls
        for l in range(L):
            call(l)
    torch.cuda.current_stream().wait_stream(side)
    graphs = [torch.cuda.CUDAGraph() for _ in range(L if pieces else 1)]
    if pieces:
        for l, graph in enumerate(graphs):
            with torch.cuda.graph(graph):
                call(l)
                cache.join_prefetch()
    else:
        with torch.cuda.graph(graphs[0]):
            for l in range(L):
                call(l)
    if residency is not None:
        residency.fold()  # the eager warm-up's counts
        residency.profiles.counts.clear()
    for step in range(12):
        script.next()
        if residency is not None:  # alternate layouts between replays
            layout = [("a", 1), ("b", 2)] if step % 2 else [("b", 1)]
            residency.begin_step(layout, 0, {})
            ids = script.ids.cpu()
            at = 0
            for task, n in layout:
                for l in range(L):
                    expect[task][l] += torch.bincount(ids[l, at:at + n].reshape(-1),
                                                      minlength=E)
                at += n
        for graph in graphs:
            graph.replay()
        torch.testing.assert_close(script.out, script.expected(full13, full2), rtol=0, atol=0)
        if trace is not None:
            rows = sum(n for _, n in layout)
            cache.flush_trace(rows)
            traced += [script.ids[l, :rows].reshape(-1).tolist() for l in range(L)]
    if trace is not None:
        cache.close_trace()
        assert [r.expert_ids for r in read_trace(trace)[1]] == traced
    if residency is not None:
        residency.fold()
        for task, want in expect.items():
            assert residency.profiles.counts[task] == want.tolist(), task
    t = cache.sync_stats().totals()
    assert t.calls == (12 + 1) * L  # warm-up step + replays (capture runs nothing)
    if num_slots < L * E:
        assert t.misses + t.prefetched > 0 and t.evictions > 0
    if predict:
        assert t.prefetch_hits > 0
    device_cases.check_state(cache)


def test_no_host_sync_in_a_layer_call():
    """With every expert resident, and with misses and prefetch, a layer call never
    synchronizes with the host (torch raises on any sync in this mode); a quantized
    store's decoding fill neither."""
    L, E = 4, 8
    store, _ = device_cases.make_store(L, E, LAYOUT, pinned=True)
    quantized, _ = device_cases.make_quantized_store(L, E, LAYOUT, 4, pinned=True)
    script = Script(L, E, 2, 2)
    for store, num_slots, predictor in ((store, L * E, None),
                                        (store, E + 2, TruePredictor(script, 2)),
                                        (quantized, E + 2, TruePredictor(script, 2))):
        cache, _ = make_expert_cache(store, num_slots, "cuda", predictor=predictor)
        script.next()
        for l in range(L):  # compile the kernels first (compiling may sync)
            cache.map_to_slots(l, script.ids[l], script.x[l])
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                script.next()
                for l in range(L):
                    cache.map_to_slots(l, script.ids[l], script.x[l])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        device_cases.check_state(cache)


def test_pinned_store_is_read_in_place_through_a_cuda_alias():
    from vllm_moe_offload.runtime.device_cache import _device_alias

    host = torch.arange(1 << 20, dtype=torch.int32).pin_memory()
    alias = _device_alias(host)
    assert alias.is_cuda and alias.data_ptr() == host.data_ptr()
    assert torch.equal(alias[12345:12400].cpu(), host[12345:12400])


def test_disk_store_reads_into_cuda_slots(tmp_path):
    L, E = 2, 4
    layout = ExpertLayout((TensorSpec((2 * I, H), torch.bfloat16),
                           TensorSpec((H, 3 * I), torch.bfloat16)))
    store = DiskStore(tmp_path / "s.experts", layout, L, E, {"model": "t"})
    g = torch.Generator(device="cuda").manual_seed(0)
    want = {}
    for l in range(L):
        for e in range(E):
            w = [torch.randn(s.shape, generator=g, device="cuda").to(s.dtype)
                 for s in layout.tensors]
            store.put(l, e, w)  # put takes tensors on any device
            want[(l, e)] = w
    store.seal()
    slots = [torch.zeros((3, *s.shape), dtype=s.dtype, device="cuda") for s in layout.tensors]
    for i, (l, e) in enumerate([(0, 1), (1, 3), (0, 0), (1, 2), (0, 3)]):
        assert store.read_into(l, e, [b[i % 3] for b in slots]) == layout.expert_bytes
        torch.cuda.synchronize()
        for b, w in zip(slots, want[(l, e)]):
            assert torch.equal(b[i % 3], w)
    store.close()


def test_a_damaged_record_read_into_cuda_slots_is_re_derived_and_repaired(tmp_path):
    """The staged read (disk -> pinned chunks -> slot) of a record with flipped bytes:
    its chunks went to the slot before the checksum failed; the checkpoint's copy is
    written after them in stream order, and the record repaired on disk."""
    L, E = 2, 2
    layout = ExpertLayout((TensorSpec((2 * I, H), torch.bfloat16),
                           TensorSpec((H, 3 * I), torch.bfloat16)))
    path = tmp_path / "s.experts"
    store = DiskStore(path, layout, L, E, {"model": "t"})
    g = torch.Generator().manual_seed(0)
    want = {(l, e): [torch.randn(s.shape, generator=g).to(s.dtype) for s in layout.tensors]
            for l in range(L) for e in range(E)}
    for key, w in want.items():
        store.put(*key, w)
    store.seal()
    with open(path, "r+b") as f:
        f.seek(store._offset(1, 0) + layout.expert_bytes - 10)
        f.write(b"\xff" * 8)
    store.close()
    store = DiskStore(path, layout, L, E, {"model": "t"})
    assert store.reused
    store.rederive = lambda l, e: want[(l, e)]
    for _ in range(2):
        slot = [torch.zeros(s.shape, dtype=s.dtype, device="cuda") for s in layout.tensors]
        store.read_into(1, 0, slot)
        torch.cuda.synchronize()
        assert all(torch.equal(a.cpu(), b) for a, b in zip(slot, want[(1, 0)]))
    assert store.repairs == 1  # the second read found the repaired record
    store.close()


def test_disk_store_under_host_mode_matches_all_resident(tmp_path):
    L, E, T, K = 4, 8, 3, 2
    host, full = device_cases.make_store(L, E, LAYOUT, pinned=True)
    disk = DiskStore(tmp_path / "d.experts", LAYOUT, L, E, {"model": "t"})
    for (l, e), w in full.items():
        disk.put(l, e, w)
    disk.seal()
    cache, why = make_expert_cache(disk, E + 4, "cuda")
    assert isinstance(cache, ExpertCache) and "disk" in why
    full13, full2 = stacked(full, L, E)
    script = Script(L, E, T, K)
    for _ in range(4):
        script.next()
        for l in range(L):
            slots = cache.map_to_slots(l, script.ids[l])
            script.out[l] = moe(script.x[l], cache.buffers[0], cache.buffers[1], slots,
                                script.w[l])
        torch.testing.assert_close(script.out, script.expected(full13, full2), rtol=0, atol=0)
    t = cache.stats.totals()
    assert t.misses > 0 and t.bytes_loaded == t.misses * LAYOUT.expert_bytes
