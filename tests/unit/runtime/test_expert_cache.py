"""The cache against a plain-torch MoE: remapped slots give bit-identical outputs."""

import pytest
import torch
import torch.nn.functional as F

from vllm_moe_offload.core.eviction import POLICIES
from vllm_moe_offload.core.slot_pool import ExpertKey
from vllm_moe_offload.core.trace import TraceHeader, TraceWriter, read_trace
from vllm_moe_offload.runtime.expert_cache import ExpertCache
from vllm_moe_offload.runtime.store import DiskStore, ExpertLayout, HostStore, TensorSpec

L, E, H, I, K = 3, 6, 16, 8, 2  # layers, experts, hidden, expert ffn, top-k
LAYOUT = ExpertLayout((TensorSpec((2 * I, H), torch.float32), TensorSpec((H, I), torch.float32)))


def weights():
    g = torch.Generator().manual_seed(0)
    return [[[torch.randn(s.shape, generator=g) for s in LAYOUT.tensors] for _ in range(E)]
            for _ in range(L)]


def moe(x, w13, w2, topk_weights, topk_ids):
    """Reference MoE over a [N, ...] weight stack: x [T, H] -> [T, H]."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            gate, up = (w13[e] @ x[t]).chunk(2)
            out[t] += topk_weights[t, k] * (w2[e] @ (F.silu(gate) * up))
    return out


def make_cache(kind, tmp_path, num_slots, trace=None, eviction="lru"):
    store = (HostStore(LAYOUT, L, E) if kind == "host"
             else DiskStore(tmp_path / "m.experts", LAYOUT, L, E, {"model": "t"}))
    for layer, experts in enumerate(weights()):
        for e, tensors in enumerate(experts):
            store.put(layer, e, tensors)
    store.seal()
    return ExpertCache(store, num_slots, "cpu", trace=trace, eviction=eviction)


def routing(seed, tokens):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, E, generator=g)
    w, ids = scores.topk(K, dim=-1)
    return w / w.sum(-1, keepdim=True), ids.to(torch.int32)


@pytest.mark.parametrize("kind, eviction", [("host", "lru"), ("disk", "lru"),
                                            *(("host", p) for p in POLICIES if p != "lru")])
@pytest.mark.parametrize("num_slots", [E, 2 * E, L * E])
def test_outputs_match_all_resident_and_counts_add_up(tmp_path, kind, num_slots, eviction):
    cache = make_cache(kind, tmp_path, num_slots, eviction=eviction)
    assert cache.eviction == eviction
    full = weights()
    distinct_loads = 0
    for step in range(4):
        for layer in range(L):
            x = torch.randn(5, H, generator=torch.Generator().manual_seed(step * 10 + layer))
            tw, ids = routing(step * 10 + layer, 5)
            slot_ids = cache.map_to_slots(layer, ids)
            assert slot_ids.dtype == ids.dtype and slot_ids.shape == ids.shape
            w13 = torch.stack([w[0] for w in full[layer]])
            w2 = torch.stack([w[1] for w in full[layer]])
            want = moe(x, w13, w2, tw, ids)
            got = moe(x, cache.buffers[0], cache.buffers[1], tw, slot_ids)
            assert torch.equal(got, want)
            distinct_loads += len(set(ids.flatten().tolist()))
    t = cache.stats.to_dict()["totals"]
    assert t["hits"] + t["misses"] == distinct_loads
    assert t["bytes_loaded"] == t["misses"] * LAYOUT.expert_bytes
    assert t["calls"] == 4 * L
    if num_slots == L * E:  # everything fits: each expert loads at most once
        assert t["evictions"] == 0 and t["misses"] <= L * E and t["hits"] > 0
    else:
        assert t["evictions"] > 0


@pytest.mark.parametrize("eviction", ["lru", "reuse"])
def test_slot_groups_keep_each_layer_in_its_own_slots(tmp_path, eviction):
    """A pool split in slot groups (vLLM's CUDA kernels see at most 992 slots): layer
    0 takes slots 0-6, layers 1-2 slots 7-14. A layer's slot ids count from its
    group's first slot, index the slot buffers its kernel sees, and give exact
    outputs; no layer's expert ever sits in another group's slots."""
    from vllm_moe_offload.core.slot_pool import SlotGroup

    base = make_cache("disk", tmp_path, 15)
    groups = [SlotGroup(range(0, 1), 0, 7), SlotGroup(range(1, 3), 7, 15)]
    cache = ExpertCache(base.store, 15, "cpu", eviction=eviction, groups=groups)
    assert [cache.layer_slots(layer) for layer in range(L)] == [7, 8, 8]
    full = weights()
    for step in range(4):
        for layer in range(L):
            x = torch.randn(4, H, generator=torch.Generator().manual_seed(step * 10 + layer))
            tw, ids = routing(step * 10 + layer, 4)
            slot_ids = cache.map_to_slots(layer, ids)
            assert 0 <= int(slot_ids.min()) and int(slot_ids.max()) < cache.layer_slots(layer)
            w13 = torch.stack([w[0] for w in full[layer]])
            w2 = torch.stack([w[1] for w in full[layer]])
            assert torch.equal(moe(x, *cache.layer_buffers(layer), tw, slot_ids),
                               moe(x, w13, w2, tw, ids))
            cache.pool.check_invariants()
    t = cache.stats.to_dict()["layers"]
    assert t[0]["evictions"] == 0 and t[1]["evictions"] + t[2]["evictions"] > 0
    with pytest.raises(ValueError, match=r"\[0, 1\): 1, \[1, 3\): 2"):
        cache.set_plan([ExpertKey(0, 1), ExpertKey(0, 2)])
    assert cache.fit_plan(keys := [ExpertKey(0, 1), ExpertKey(0, 2), ExpertKey(2, 3)]) == [
        keys[0], keys[2]]
    with pytest.raises(ValueError, match="slot group of layers \\[1, 3\\) of 5 slots"):
        ExpertCache(base.store, 12, "cpu", groups=[SlotGroup(range(0, 1), 0, 7),
                                                   SlotGroup(range(1, 3), 7, 12)])


def test_second_call_of_same_experts_hits(tmp_path):
    cache = make_cache("host", tmp_path, E)
    ids = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)
    cache.map_to_slots(0, ids)
    cache.map_to_slots(0, ids)
    s = cache.stats.layer(0)
    assert (s.misses, s.hits, s.bytes_loaded) == (3, 3, 3 * LAYOUT.expert_bytes)
    assert cache.resident(0) == [0, 1, 2]


def test_trace_records_every_call(tmp_path):
    path = tmp_path / "trace.bin"
    cache = make_cache("host", tmp_path, E, TraceWriter(str(path), TraceHeader(L, E, K)))
    calls = []
    for step in range(2):
        for layer in range(L):
            _, ids = routing(step + layer, 3)
            cache.map_to_slots(layer, ids)
            calls.append((step, layer, ids.flatten().tolist()))
    cache.trace.close()
    header, records = read_trace(str(path))
    assert header == TraceHeader(L, E, K)
    assert [(r.step, r.layer, r.expert_ids) for r in records] == calls


def test_padded_rows_are_no_expert(tmp_path):
    """vLLM on CUDA routes the rows it pads a batch with to -1 (its warm-up and
    capture runs are all padding): they need, load and count nothing, get slot -1
    (which vLLM's kernels skip), are not traced and predict nothing."""
    class Predictor:
        depth, num_layers = 1, L

        def predict(self, layer, hidden):
            self.rows = hidden.shape[0]
            return []

    path = tmp_path / "trace.bin"
    cache = make_cache("host", tmp_path, E + 2, TraceWriter(str(path), TraceHeader(L, E, K)))
    cache.predictor = Predictor()
    ids = torch.tensor([[1, 2], [-1, -1], [2, 3], [-1, -1]], dtype=torch.int32)
    slots = cache.map_to_slots(0, ids, torch.zeros(4, H))
    assert slots[1].tolist() == slots[3].tolist() == [-1, -1] and slots.dtype == ids.dtype
    assert slots[0, 1] == slots[2, 0] and len({*slots[[0, 2]].flatten().tolist()}) == 3
    for e, slot in ((1, slots[0, 0]), (2, slots[0, 1]), (3, slots[2, 1])):
        assert all(torch.equal(b[slot], w) for b, w in zip(cache.buffers, weights()[0][e]))
    assert cache.resident(0) == [1, 2, 3] and cache.predictor.rows == 2
    s = cache.stats.layer(0)
    assert (s.calls, s.misses, s.bytes_loaded) == (1, 3, 3 * LAYOUT.expert_bytes)
    every = cache.map_to_slots(1, torch.full((3, K), -1, dtype=torch.int32),
                               torch.zeros(3, H))  # a warm-up run: all padding
    assert every.tolist() == [[-1, -1]] * 3 and cache.resident(1) == []
    assert cache.stats.layer(1).misses == 0
    cache.trace.close()
    _, records = read_trace(str(path))
    assert [(r.layer, r.expert_ids) for r in records] == [(0, [1, 2, 2, 3])]


def test_a_named_policy_runs_in_host_mode(tmp_path, monkeypatch):
    """Device mode evicts by CLOCK in its kernel; a named policy needs the host."""
    from vllm_moe_offload.runtime.modes import device_mode_problem, make_expert_cache

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # where device mode could run on CPU
    store = make_cache("host", tmp_path, E).store
    assert device_mode_problem("cpu", store, "auto") is None
    cache, why = make_expert_cache(store, E, "cpu", eviction="layer")
    assert cache.mode == "host" and cache.eviction == "layer"
    assert "eviction='layer' runs on the host" in why


def test_records_of_more_than_four_tensors_can_run_in_device_mode(monkeypatch):
    """A quantized checkpoint's record (W4A16: 8 tensors) takes more than one fill
    launch; device mode still runs it (device_cases.py fills such records)."""
    from vllm_moe_offload.runtime.modes import device_mode_problem

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # where device mode could run on CPU
    shapes = [((4, 8), torch.int32), ((8, 2), torch.bfloat16), ((2,), torch.bfloat16),
              ((1,), torch.int32)] * 2
    store = HostStore(ExpertLayout(tuple(TensorSpec(s, d) for s, d in shapes)), L, E)
    assert device_mode_problem("cpu", store) is None


@pytest.mark.parametrize("eviction", ["lru", "reuse"])
def test_replay_with_slot_groups_counts_as_the_cache_does(tmp_path, eviction):
    """core/replay.py with slot groups plays the engine's grouped pool: the same hits
    on the same calls (what benchmarks/slot_groups.py measures the split with)."""
    from vllm_moe_offload.core.replay import PROFILES, Call, replay
    from vllm_moe_offload.core.slot_pool import SlotGroup

    base = make_cache("host", tmp_path, 14)
    groups = [SlotGroup(range(0, 1), 0, 6), SlotGroup(range(1, 3), 6, 14)]
    cache = ExpertCache(base.store, 14, "cpu", eviction=eviction, groups=groups)
    calls = []
    for step in range(6):
        for layer in range(L):
            _, ids = routing(step * 10 + layer, 2)
            cache.map_to_slots(layer, ids)
            calls.append(Call(step, layer, tuple(sorted(set(ids.flatten().tolist()))), 2))
    got = replay(calls, 14, eviction, PROFILES["qwen3-30b-a3b-pcie5"], 0, E, groups)
    t = cache.stats.totals()
    assert (got.hits, got.misses) == (t.hits, t.misses) and t.evictions > 0
    one = replay(calls, 14, eviction, PROFILES["qwen3-30b-a3b-pcie5"], 0, E)
    assert (one.hits, one.misses) != (got.hits, got.misses)  # the groups matter here


@pytest.mark.parametrize("eviction", POLICIES)
@pytest.mark.parametrize("num_slots", [2 * E, 3 * E - 2])  # prefetch holds S - E
def test_replay_with_oracle_prefetch_counts_as_the_cache_does(tmp_path, num_slots, eviction):
    """core/replay.py at depth 2 plays what the cache does with the oracle predictor at
    depth 2 over the same trace: the same hits, misses and prefetched loads."""
    from vllm_moe_offload.core.replay import PROFILES, calls_from_records, replay
    from vllm_moe_offload.runtime.predictors import OraclePredictor

    def drive(cache):
        for step in range(6):
            for layer in range(L):
                _, ids = routing(step * 10 + layer, 2)
                cache.map_to_slots(layer, ids, torch.randn(2, H))
        cache.close()
        return cache.stats.totals()

    path = str(tmp_path / "t.trace")
    writer = TraceWriter(path, TraceHeader(L, E, K))
    drive(make_cache("host", tmp_path, num_slots, trace=writer, eviction=eviction))
    writer.close()
    records = list(read_trace(path)[1])
    base = make_cache("host", tmp_path, num_slots)
    t = drive(ExpertCache(base.store, num_slots, "cpu", eviction=eviction,
                          predictor=OraclePredictor(records, 2, K, L)))
    r = replay(calls_from_records(records), num_slots, eviction,
               PROFILES["olmoe-1b-7b-pcie4"], depth=2, experts_per_layer=E)
    assert (r.hits, r.misses, r.prefetched) == (t.hits, t.misses, t.prefetched)
    assert t.prefetched > 0


def test_replay_counts_as_the_cache_does_on_random_traces(tmp_path):
    """Random shapes, pools, depths, policies and skewed routing: replay with the
    oracle gives the cache's hits, misses and prefetched loads. (It hinted the
    `predicted` policy in the opposite order to the cache: seed 47 differed.)"""
    import random

    from vllm_moe_offload.core.replay import PROFILES, calls_from_records, replay
    from vllm_moe_offload.runtime.predictors import OraclePredictor

    layout = ExpertLayout((TensorSpec((2, 4), torch.float32),))
    for seed in range(60):
        rnd = random.Random(seed)
        layers, experts = rnd.randint(2, 5), rnd.randint(3, 8)
        k = rnd.randint(1, min(3, experts))
        slots, depth = rnd.randint(experts + 1, 3 * experts), rnd.randint(1, 3)
        policy = rnd.choice(POLICIES)
        hot = [rnd.sample(range(experts), min(experts, k + 1)) for _ in range(layers)]
        calls = [(layer, torch.tensor(
            [rnd.sample(hot[layer] if rnd.random() < 0.6 else range(experts), k)
             for _ in range(tokens)], dtype=torch.int32))
            for tokens in [rnd.randint(1, 3) for _ in range(rnd.randint(3, 10))]
            for layer in range(layers)]
        store = HostStore(layout, layers, experts)
        for layer in range(layers):
            for e in range(experts):
                store.put(layer, e, [torch.full((2, 4), float(layer * 100 + e))])
        store.seal()

        def drive(cache):
            for layer, ids in calls:
                cache.map_to_slots(layer, ids, torch.randn(ids.shape[0], 4))
            cache.close()
            return cache.stats.totals()

        path = str(tmp_path / f"{seed}.trace")
        writer = TraceWriter(path, TraceHeader(layers, experts, k))
        drive(ExpertCache(store, slots, "cpu", trace=writer, eviction=policy))
        writer.close()
        records = list(read_trace(path)[1])
        t = drive(ExpertCache(store, slots, "cpu", eviction=policy,
                              predictor=OraclePredictor(records, depth, k, layers)))
        r = replay(calls_from_records(records), slots, policy,
                   PROFILES["olmoe-1b-7b-pcie4"], depth=depth, experts_per_layer=experts)
        assert (r.hits, r.misses, r.prefetched) == (t.hits, t.misses, t.prefetched), \
            (seed, policy, slots, depth)
