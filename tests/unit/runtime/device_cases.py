"""Device-mode cases, run on a CUDA GPU (tests/gpu) and, without one, in Triton's
interpreter on the CPU (test_device_cache.py runs this file in a subprocess with
TRITON_INTERPRET=1: the variable must be set before Triton compiles anything).

Each case checks what a kernel must guarantee: every slot id a call returns holds
exactly the routed expert's bytes, the device state stays consistent, the counters
add up, and no slot a call uses is ever a victim.
"""

from __future__ import annotations

import json
import sys

import torch

from vllm_moe_offload.core.slot_pool import ExpertKey
from vllm_moe_offload.runtime import device_cache
from vllm_moe_offload.runtime import residency_kernels as K
from vllm_moe_offload.runtime.quant import Gather, GroupQuant, MixedStore, QuantizedStore
from vllm_moe_offload.runtime.store import ExpertLayout, HostStore, TensorSpec

SMALL = True  # decode-sized calls take the in-register path; both are run


def DeviceExpertCache(*args, **kwargs):
    cache = device_cache.DeviceExpertCache(*args, **kwargs)
    cache.small_path = SMALL
    return cache


LAYOUT = ExpertLayout((TensorSpec((6, 8), torch.bfloat16), TensorSpec((8, 3), torch.bfloat16)))


def make_store(L, E, layout=LAYOUT, pinned=False):
    store = HostStore(layout, L, E, pin_memory=pinned)
    g = torch.Generator().manual_seed(0)
    full = {}
    for layer in range(L):
        for e in range(E):
            w = [torch.randn(s.shape, generator=g).to(s.dtype) if s.dtype.is_floating_point
                 else torch.randint(0, 127, s.shape, generator=g).to(s.dtype)
                 for s in layout.tensors]
            store.put(layer, e, w)
            full[(layer, e)] = w
    store.seal()
    return store, full


def check_slots(cache, full, layer, ids, slots):
    """Every routed (token, k) reads the right expert from its slot (of the slot
    buffers the layer's kernel sees: its group's)."""
    for e, s in zip(ids.reshape(-1).tolist(), slots.reshape(-1).tolist()):
        assert 0 <= s < cache.layer_slots(layer), (layer, e, s)
        for buf, want in zip(cache.layer_buffers(layer), full[(layer, e)]):
            assert torch.equal(buf[s].cpu(), want), f"layer {layer} expert {e} slot {s}"


def check_state(cache):
    """table and owner agree; free slots carry no flags; locks are counted."""
    E = cache.experts_per_layer
    table, owner = cache.table.tolist(), cache.owner.tolist()
    flags, state = cache.flags.tolist(), cache.state.tolist()
    for key, slot in enumerate(table):
        if slot >= 0:
            assert owner[slot] == key, f"key {key} -> slot {slot} owned by {owner[slot]}"
    for slot, key in enumerate(owner):
        if key >= 0:
            assert table[key] == slot, f"slot {slot} owner {key} but table {table[key]}"
        else:
            assert flags[slot] == 0, f"free slot {slot} has flags {flags[slot]}"
        assert not flags[slot] & K.TAKEN.value
    groups = cache.group_state.tolist()
    for g, (group, row) in enumerate(zip(cache.groups, groups)):
        assert (row[K.LO.value], row[K.HI.value]) == (group.lo, group.hi)
        protect = sum(1 for f in flags[group.lo:group.hi] if f & K.PROTECT.value)
        assert row[K.LOCKS.value] == protect, (g, row, protect)
        assert protect <= row[K.BUDGET.value], (g, row)
        for slot in range(group.lo, group.hi):  # a key lives in its layer's group
            assert owner[slot] < 0 or owner[slot] // E in group.layers, (slot, owner[slot])
    assert state[K.ERROR.value] == 0
    assert len({k for k in owner if k >= 0}) == sum(1 for k in owner if k >= 0)
    assert all(0 <= k < cache.num_layers * E for k in owner if k >= 0)


def routing(gen, T, E, K_, device):
    return torch.rand(T, E, generator=gen).topk(K_).indices.to(torch.int32).to(device)


class FixedPredictor:
    """Predicts what the test tells it (an oracle over a script of future calls)."""

    def __init__(self, depth, num_layers):
        self.depth, self.num_layers = depth, num_layers
        self.next: dict[int, torch.Tensor] = {}

    def predict_ids(self, layer, hidden):
        return [(t, self.next[t]) for t in range(layer + 1, min(layer + self.depth,
                                                               self.num_layers - 1) + 1)
                if t in self.next]


def run_predicted(cache, full, pred, gen, steps, tokens, device):
    """`steps` steps over every layer, each layer's routing predicted exactly (pred):
    every call's slots and, after each step, the device state are checked."""
    L, E = cache.num_layers, cache.experts_per_layer
    hidden = torch.zeros(1, 4, device=device)
    for step in range(steps):
        script = [routing(gen, tokens, E, 2, device) for _ in range(L)]
        pred.next = dict(enumerate(script))
        for layer in range(L):
            slots = cache.map_to_slots(layer, script[layer], hidden)
            check_slots(cache, full, layer, script[layer], slots)
        check_state(cache)


def case_small_pools_hold_the_right_bytes(device):
    L, E = 4, 8
    store, full = make_store(L, E, pinned=device == "cuda")
    for num_slots, eviction in ((E, "reuse"), (E + 3, "reuse"), (L * E // 2, "reuse"),
                                (L * E, "reuse"), (E + 3, "clock"), (L * E // 2, "clock")):
        cache = DeviceExpertCache(store, num_slots, device, eviction=eviction)
        gen = torch.Generator().manual_seed(num_slots)
        distinct = 0
        for step in range(3):
            for layer in range(L):
                ids = routing(gen, 5, E, 2, device)
                distinct += len(set(ids.reshape(-1).tolist()))
                slots = cache.map_to_slots(layer, ids)
                assert slots.dtype == ids.dtype and slots.shape == ids.shape
                check_slots(cache, full, layer, ids, slots)
            check_state(cache)
        t = cache.sync_stats().totals()
        assert t.hits + t.misses == distinct
        assert t.calls == 3 * L
        assert t.bytes_loaded == t.misses * LAYOUT.expert_bytes
        assert (t.evictions == 0) == (num_slots == L * E)
        assert t.misses >= min(num_slots, L * E) or num_slots == L * E


def replay_hits(cache, calls, device):
    """Hits of `calls` ((layer, experts) on demand) through a device cache."""
    for layer, experts in calls:
        cache.map_to_slots(layer, torch.tensor(experts, device=device).view(-1, 1))
    check_state(cache)
    return cache.sync_stats().totals().hits


def case_reuse_eviction_keeps_the_next_layers_experts(device):
    """The collapse the issue names: each step touches more experts than the pool
    holds and the layers come round in order, so CLOCK (like LRU) evicts each expert
    just before its layer runs again and never hits. `reuse` evicts the experts whose
    next use is furthest (the layer that just ran) and hits as host mode's `reuse`
    (core/eviction.py, replayed by core/replay.py) does on the same calls."""
    from vllm_moe_offload.core.replay import PROFILES, Call, replay

    L, E, S = 4, 8, 14
    store, full = make_store(L, E, pinned=device == "cuda")
    calls = [(layer, list(range(6))) for _ in range(6) for layer in range(L)]
    clock = replay_hits(DeviceExpertCache(store, S, device, eviction="clock"), calls, device)
    plain = DeviceExpertCache(store, S, device, eviction="reuse")
    reuse = replay_hits(plain, calls, device)
    host = replay([Call(i // L, layer, tuple(experts), 1) for i, (layer, experts) in
                   enumerate(calls)], S, "reuse", PROFILES["qwen3-30b-a3b-pcie5"], 0, E)
    assert clock == 0
    assert reuse == host.hits > 0, (reuse, host.hits)
    # moving the clock and the counts back every 2 steps changes no decision: 6
    # steps, 3 moves of 2 steps (2 / 8 half-lives each)
    cache = DeviceExpertCache(store, S, device, eviction="reuse")
    cache.rebase_steps = 2
    assert replay_hits(cache, calls, device) == reuse
    assert int(cache.state[K.STEP.value]) == 0 and int(plain.state[K.STEP.value]) == 6
    assert abs(float(plain.clock) - float(cache.clock) - 3 * 2 / 8) < 1e-4
    used = plain.uses > K.NEVER.value
    assert torch.equal(used, cache.uses > K.NEVER.value) and bool(used.any())
    assert torch.allclose(plain.uses[used] - cache.uses[used],
                          torch.full_like(plain.uses[used], 3 * 2 / 8), atol=1e-4)


def case_reuse_eviction_prefers_frequent_experts(device):
    """Within a layer, `reuse` evicts the experts used least (decayed count): layer 0
    routes to expert 0 at every call and to a new one-off each step; when layer 1
    then needs all its experts, the one-offs go and expert 0 stays."""
    L, E = 2, 8
    store, full = make_store(L, E, pinned=device == "cuda")
    cache = DeviceExpertCache(store, E + 1, device, eviction="reuse")
    for step in range(4):
        for layer, experts in ((0, [0, 1 + step]), (1, [0] if step < 3 else list(range(E)))):
            ids = torch.tensor(experts, device=device).view(-1, 1)
            check_slots(cache, full, layer, ids, cache.map_to_slots(layer, ids))
        check_state(cache)
    assert cache.resident(0) == [0], cache.resident(0)
    assert cache.sync_stats().totals().evictions == 4


def case_all_resident_only_misses_once(device):
    L, E = 3, 8
    store, full = make_store(L, E, pinned=device == "cuda")
    cache = DeviceExpertCache(store, L * E, device)
    every = torch.arange(E, dtype=torch.int64, device=device).view(4, 2)
    for layer in range(L):
        cache.map_to_slots(layer, every)
    before = cache.sync_stats().totals().misses
    assert before == L * E
    gen = torch.Generator().manual_seed(1)
    for step in range(2):
        for layer in range(L):
            ids = routing(gen, 3, E, 2, device).long()
            check_slots(cache, full, layer, ids, cache.map_to_slots(layer, ids))
    t = cache.sync_stats().totals()
    assert t.misses == before and t.evictions == 0


def case_misses_read_later_are_those_of_when_asked(device):
    """A step's report queues the copy of the miss count (misses_later), and vLLM
    reads it once the step's output is handed over: by then later calls may have
    run. The value is the one of when it was asked for. (On the CPU the copy is made
    at once: the case means something on CUDA, in tests/gpu.)"""
    L, E = 2, 8
    store, _ = make_store(L, E, pinned=device == "cuda")
    cache = DeviceExpertCache(store, L * E, device)
    ids = torch.arange(4, dtype=torch.int64, device=device).view(2, 2)
    cache.map_to_slots(0, ids)
    read, later = cache.misses_later(), cache.stats_later()  # the second: /metrics
    cache.map_to_slots(1, ids)  # 4 more misses, queued after the copy
    assert read() == 4
    stats, occupancy = later()
    assert stats.totals().misses == stats.layer(0).misses == 4
    assert stats.totals().bytes_loaded == 4 * LAYOUT.expert_bytes
    assert occupancy == {"used": 4, "pinned": 0, "planned": 0}
    assert cache.sync_stats().totals().misses == 8
    assert cache.occupancy()["used"] == 8
    older = cache.stats_later()
    cache.map_to_slots(0, ids + 4)
    assert cache.sync_stats().totals().misses == 12
    assert older()[0].totals().misses == 8  # read after a newer one: its own copy
    assert cache.stats.totals().misses == 12  # the newer counts stay


def case_a_call_never_evicts_its_own_experts(device):
    """S = E: a call that needs all E experts of its layer must hold all of them."""
    L, E = 3, 8
    store, full = make_store(L, E, pinned=device == "cuda")
    cache = DeviceExpertCache(store, E, device)
    every = torch.arange(E, dtype=torch.int32, device=device).flip(0).view(2, 4)
    for step in range(2):
        for layer in range(L):
            slots = cache.map_to_slots(layer, every)
            assert sorted(slots.reshape(-1).tolist()) == list(range(E))
            check_slots(cache, full, layer, every, slots)
            check_state(cache)


def case_prefetch_covers_predicted_misses(device):
    L, E = 4, 8
    store, full = make_store(L, E, pinned=device == "cuda")
    pred = FixedPredictor(depth=2, num_layers=L)
    cache = DeviceExpertCache(store, 2 * E, device, predictor=pred)
    run_predicted(cache, full, pred, torch.Generator().manual_seed(2), 3, 1, device)
    s = cache.sync_stats()
    t = s.totals()
    assert t.prefetched > 0 and t.prefetch_hits == t.prefetched and t.prefetch_wasted == 0
    # Every layer after the first is predicted exactly: it never misses.
    assert sum(s.layer(layer).misses for layer in range(1, L)) == 0
    assert t.bytes_loaded == (t.misses + t.prefetched) * LAYOUT.expert_bytes
    assert s.layer(2).predictions[1][0] == s.layer(2).predictions[1][1] > 0


def case_wrong_predictions_are_wasted_not_wrong(device):
    L, E = 4, 8
    store, full = make_store(L, E, pinned=device == "cuda")
    pred = FixedPredictor(depth=1, num_layers=L)
    cache = DeviceExpertCache(store, E + 2, device, predictor=pred)
    gen = torch.Generator().manual_seed(3)
    hidden = torch.zeros(1, 4, device=device)
    for step in range(4):
        script = [routing(gen, 2, E, 2, device) for _ in range(L)]
        pred.next = {t: routing(gen, 1, E, 2, device) for t in range(L)}  # noise
        for layer in range(L):
            slots = cache.map_to_slots(layer, script[layer], hidden)
            check_slots(cache, full, layer, script[layer], slots)
        check_state(cache)
    t = cache.sync_stats().totals()
    assert t.prefetched == t.prefetch_hits + t.prefetch_wasted
    assert t.prefetched <= 2 * (L - 1) * 4  # the budget (2 slots) bounds each call


def case_plan_stays_resident(device):
    L, E = 3, 8
    store, full = make_store(L, E, pinned=device == "cuda")
    cache = DeviceExpertCache(store, E + 4, device)
    plan = [ExpertKey(0, 1), ExpertKey(2, 5), ExpertKey(1, 7)]
    added, removed = cache.set_plan(plan)
    assert added == plan and removed == [] and cache.prefetch_budget == 1
    gen = torch.Generator().manual_seed(4)
    for step in range(3):
        for layer in range(L):
            ids = routing(gen, 4, E, 2, device)
            check_slots(cache, full, layer, ids, cache.map_to_slots(layer, ids))
        mask = cache.resident_mask()
        assert all(mask[k.layer, k.expert] for k in plan)
        check_state(cache)
    assert cache.occupancy() == {"used": E + 4, "pinned": 3, "planned": 3}
    added, removed = cache.set_plan(plan[:1])
    assert added == [] and removed == plan[1:] and cache.prefetch_budget == 3
    assert cache.sync_stats().layer(0).planned_loads == 1


def case_slot_groups_keep_each_layer_in_its_slots(device):
    """A pool split in two slot groups (vLLM's CUDA kernels see at most 992 slots):
    layers 0-1 take slots 0-10, layers 2-3 slots 11-20, and a layer's slot ids
    count from its group's first slot. On demand, each group evicts by `reuse` as
    host mode's grouped pool does. With wider groups, exact prefetch across the
    groups' boundary covers every miss after layer 0, and a plan in the second group
    shrinks its budget only; both policies keep every slot right and the locks
    counted apart."""
    from vllm_moe_offload.core.slot_pool import SlotGroup
    from vllm_moe_offload.runtime.expert_cache import ExpertCache

    L, E = 4, 8
    store, full = make_store(L, E, pinned=device == "cuda")
    groups = [SlotGroup(range(0, 2), 0, 11), SlotGroup(range(2, 4), 11, 21)]
    gen = torch.Generator().manual_seed(6)
    calls = [(layer, routing(gen, 3, E, 2, "cpu")) for _ in range(5) for layer in range(L)]
    device_cache_, host = (DeviceExpertCache(store, 21, device, groups=groups),
                           ExpertCache(store, 21, "cpu", eviction="reuse", groups=groups))
    for layer, ids in calls:
        for cache in (device_cache_, host):
            ids_ = ids.to(cache.device)
            check_slots(cache, full, layer, ids_, cache.map_to_slots(layer, ids_))
    check_state(device_cache_)
    host.pool.check_invariants()
    got, want = device_cache_.sync_stats().totals(), host.stats.totals()
    assert (got.hits, got.misses, got.evictions) == (want.hits, want.misses, want.evictions)
    assert got.evictions > 0
    for eviction in ("reuse", "clock"):
        pred = FixedPredictor(depth=2, num_layers=L)
        wide = [SlotGroup(range(0, 2), 0, 16), SlotGroup(range(2, 4), 16, 34)]
        cache = DeviceExpertCache(store, 34, device, predictor=pred, eviction=eviction,
                                  groups=wide)
        cache.set_plan([ExpertKey(3, 0), ExpertKey(2, 1)])
        assert cache._budgets == [16 - E, 18 - E - 2]
        run_predicted(cache, full, pred, torch.Generator().manual_seed(7), 3, 1, device)
        t = cache.sync_stats().totals()
        assert t.prefetched > 0 and t.prefetch_hits == t.prefetched
        assert sum(cache.sync_stats().layer(layer).misses for layer in range(1, L)) == 0
        mask = cache.resident_mask()
        assert mask[3, 0] and mask[2, 1]


def case_prefetch_locks_stay_within_the_budget(device):
    """A prediction of resident experts locks them too, and only as many as the
    budget leaves: layer 0 predicts all of layer 2's experts, resident from the step
    before, and all of layer 1's. Were the 4 hits locked beyond the budget (2),
    layer 1's call, which needs all 4 of its experts, would find 2 slots."""
    L, E = 3, 4
    store, full = make_store(L, E, pinned=device == "cuda")
    pred = FixedPredictor(depth=2, num_layers=L)
    cache = DeviceExpertCache(store, E + 2, device, predictor=pred)
    every = torch.arange(E, dtype=torch.int32, device=device).view(-1, 1)
    hidden = torch.zeros(1, 4, device=device)
    for step in range(3):
        pred.next = {1: every, 2: every} if step else {}
        for layer, ids in ((0, every[:1]), (1, every), (2, every)):
            check_slots(cache, full, layer, ids, cache.map_to_slots(layer, ids, hidden))
            check_state(cache)
    t = cache.sync_stats().totals()
    assert t.prefetched > 0 and t.misses > 0


def case_a_binding_budget_prefetches_the_most_named_experts_first(device):
    """As host mode: where the budget (2) binds, the predicted experts most named
    take it, resident or not (ties: the lower id). The kernel took the lowest ids,
    and every resident prediction before any missing one: here expert 0 (resident,
    named once) and 3, not 7 (named by every row) and 5."""
    L, E = 2, 8
    store, full = make_store(L, E, pinned=device == "cuda")
    pred = FixedPredictor(depth=1, num_layers=L)
    cache = DeviceExpertCache(store, E + 2, device, predictor=pred)
    hidden = torch.zeros(1, 4, device=device)
    first = torch.tensor([[0, 1]], dtype=torch.int32, device=device)
    for layer in range(L):  # expert (1, 0) resident
        check_slots(cache, full, layer, first, cache.map_to_slots(layer, first, hidden))
    pred.next = {1: torch.tensor([[7, 5], [3, 7], [7, 0], [5, 7]], device=device)}
    ids = torch.tensor([[2, 3]], dtype=torch.int32, device=device)
    check_slots(cache, full, 0, ids, cache.map_to_slots(0, ids, hidden))
    check_state(cache)
    table, flags = cache.table.tolist(), cache.flags.tolist()
    locked = {e for e in range(E) if table[E + e] >= 0
              and flags[table[E + e]] & K.PROTECT.value}
    assert locked == {5, 7}, locked
    assert table[E + 3] < 0 and table[E + 0] >= 0
    ids = torch.tensor([[7, 5]], dtype=torch.int32, device=device)
    check_slots(cache, full, 1, ids, cache.map_to_slots(1, ids, hidden))
    t = cache.sync_stats().totals()
    assert (t.prefetched, t.prefetch_hits) == (2, 2), t


def case_a_call_of_no_rows_settles_its_layers_prefetch(device):
    """Layer 0 prefetches 2 of layer 1's experts (2 locks, the whole budget); layer
    1's call has no rows. It returned before its resolve, so the locks outlived it;
    a plan then took the room they held (budget 0, 2 locks), and the next call found
    no victim: its misses read slot 0, another expert's weights."""
    L, E = 2, 4
    store, full = make_store(L, E, pinned=device == "cuda")
    pred = FixedPredictor(depth=1, num_layers=L)
    cache = DeviceExpertCache(store, E + 2, device, predictor=pred)
    hidden = torch.zeros(1, 4, device=device)
    pred.next = {1: torch.tensor([[0, 1]], device=device)}
    ids = torch.tensor([[0, 1]], dtype=torch.int32, device=device)
    check_slots(cache, full, 0, ids, cache.map_to_slots(0, ids, hidden))
    none = torch.zeros(0, 2, dtype=torch.int32, device=device)
    assert cache.map_to_slots(1, none, hidden[:0]).shape == (0, 2)
    check_state(cache)
    cache.set_plan([ExpertKey(1, 2), ExpertKey(1, 3)])
    pred.next = {}
    ids = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=device)
    check_slots(cache, full, 0, ids, cache.map_to_slots(0, ids, None))
    check_state(cache)


def case_a_call_of_more_ids_than_one_block_maps_every_id(device):
    """E = 8 (Mixtral's): 1400 ids, more than the 1024 one block of the register
    path holds, so the call takes the general path and every id is mapped."""
    L, E = 2, 8
    store, full = make_store(L, E, pinned=device == "cuda")
    cache = DeviceExpertCache(store, E + 2, device)
    gen = torch.Generator().manual_seed(8)
    for layer in (0, 1, 0):
        ids = routing(gen, 700, E, 2, device)
        check_slots(cache, full, layer, ids, cache.map_to_slots(layer, ids))
        check_state(cache)
    assert cache.sync_stats().totals().misses >= 2 * E


def case_padded_rows_are_no_expert(device):
    """vLLM on CUDA routes the rows it pads a batch with to -1 (its warm-up and
    capture runs are all padding): on the register path and the general one, layer 0
    included (where -1 would index before the table), they need, load and count
    nothing and get slot -1, which vLLM's kernels skip; their predictions fetch
    nothing."""
    L, E = 3, 8
    store, full = make_store(L, E, pinned=device == "cuda")
    pred = FixedPredictor(depth=1, num_layers=L)
    hidden = torch.zeros(4, 4, device=device)
    ids = torch.tensor([[1, 2], [-1, -1], [2, 3], [-1, -1]], dtype=torch.int32,
                       device=device)
    pred.next = {1: torch.tensor([[4, 5], [6, 7], [4, 5], [6, 7]], device=device)}
    for small in (True, False):
        cache = DeviceExpertCache(store, 2 * E, device, predictor=pred)
        cache.small_path = small
        slots = cache.map_to_slots(0, ids, hidden)
        assert slots[1].tolist() == slots[3].tolist() == [-1, -1], (small, slots.tolist())
        check_slots(cache, full, 0, ids[[0, 2]], slots[[0, 2]])
        none = cache.map_to_slots(2, torch.full((5, 2), -1, dtype=torch.int32,
                                                device=device), hidden[:1].expand(5, 4))
        assert none.tolist() == [[-1, -1]] * 5, (small, none.tolist())
        check_state(cache)
        owned = sorted(k for k in cache.owner.tolist() if k >= 0)
        assert owned == [1, 2, 3, E + 4, E + 5], (small, owned)  # layer 1: predicted
        s = cache.sync_stats()
        assert (s.layer(0).misses, s.layer(2).misses, s.totals().prefetched) == (3, 0, 2)


def case_an_expert_with_no_victim_gets_no_slot_not_another_experts(device):
    """With the sizing rule broken (a slot pinned that no call may take), a layer
    that needs every slot leaves one expert without a victim: it read slot 0, layer
    0's expert 3, and the error surfaced at the next stats read. It gets -1 now."""
    L, E = 2, 8
    store, full = make_store(L, E, pinned=device == "cuda")
    for small in (True, False):
        cache = DeviceExpertCache(store, E, device)
        cache.small_path = small
        cache.map_to_slots(0, torch.tensor([[3]], dtype=torch.int32, device=device))
        cache.flags[0] |= K.PINNED.value
        ids = torch.arange(E, dtype=torch.int32, device=device).view(4, 2)
        slots = cache.map_to_slots(1, ids).view(-1).tolist()
        assert slots.count(-1) == 1 and 0 not in slots, (small, slots)
        assert int(cache.state[K.ERROR.value]) == 1


def case_approximate_reroute_counts_on_the_device(device):
    """Approximate mode's re-route in device mode: the device table says what is
    resident, and the swaps are counted on the device (read by sync_stats): the same
    re-routed ids as host mode's (tests/unit/runtime/test_task_residency.py)."""
    L, E = 2, 8
    store, full = make_store(L, E, pinned=device == "cuda")
    cache = DeviceExpertCache(store, E + 2, device)
    cache.map_to_slots(0, torch.tensor([[0, 1], [2, 3]], device=device))  # 0-3 resident
    topk = torch.tensor([[0, 4], [5, 1], [4, 5]], device=device)
    scores = torch.tensor([[0, 0, 9, 1, 0, 0, 0, 0], [0, 0, 1, 7, 0, 0, 0, 0],
                           [5, 0, 0, 6, 0, 0, 0, 0]], dtype=torch.float32, device=device)
    rows = torch.tensor([True, True, False], device=device)
    got = cache.reroute_misses(0, topk, scores, rows)
    assert got.tolist() == [[0, 2], [3, 1], [4, 5]], got.tolist()
    assert cache.reroute_misses(0, topk[:1, :1], scores[:1], rows[:1]).tolist() == [[0]]
    assert cache.sync_stats().layer(0).rerouted == 2


def case_routing_trace_writes_each_steps_calls(device):
    """Device mode's routing trace: each call copies its ids into a device buffer
    (what a CUDA graph replays), and after the step the step's rows are written, one
    record per layer: the rows a graph pads past the step's tokens are left out."""
    import os
    import tempfile

    from vllm_moe_offload.core.trace import TraceHeader, TraceWriter, read_trace

    L, E = 3, 8
    store, full = make_store(L, E, pinned=device == "cuda")
    cache = DeviceExpertCache(store, E + 2, device)
    fd, path = tempfile.mkstemp(suffix=".trace")
    os.close(fd)
    cache.set_trace(TraceWriter(path, TraceHeader(L, E, 2)), 16, 2)
    gen = torch.Generator().manual_seed(9)
    want = []
    for step, tokens in enumerate((5, 3, 1)):
        for layer in range(L):
            ids = routing(gen, tokens + 2, E, 2, device)  # 2 padded rows
            check_slots(cache, full, layer, ids, cache.map_to_slots(layer, ids))
            want.append((step, layer, ids[:tokens].reshape(-1).tolist()))
        cache.flush_trace(tokens)
    cache.close_trace()
    _, records = read_trace(path)
    assert [(r.step, r.layer, r.expert_ids) for r in records] == want
    os.unlink(path)


# A quantized checkpoint's record: more tensors than one fill launch copies (4), of
# odd sizes, so the fill copies single bytes; widest dtype first, as records are.
MANY = ExpertLayout(tuple(TensorSpec(shape, dtype) for shape, dtype in (
    ((4, 8), torch.int32), ((5,), torch.float32), ((1,), torch.int32),
    ((8, 2), torch.bfloat16), ((2, 3), torch.int16), ((6, 2), torch.float16),
    ((3,), torch.uint8), ((7,), torch.uint8), ((9,), torch.uint8))))


def case_records_of_many_tensors_fill_every_tensor(device):
    L, E = 3, 8
    store, full = make_store(L, E, MANY, pinned=device == "cuda")
    pred = FixedPredictor(depth=1, num_layers=L)
    cache = DeviceExpertCache(store, E + 3, device, predictor=pred)
    assert len(cache._sources[0].fill_groups) == 3
    run_predicted(cache, full, pred, torch.Generator().manual_seed(5), 3, 2, device)
    t = cache.sync_stats().totals()
    assert t.misses > 0 and t.prefetched > 0 and t.evictions > 0
    assert t.bytes_loaded == (t.misses + t.prefetched) * MANY.expert_bytes


def fill_quantized(store, L, E, layout, codec_of, seed):
    """Every expert, random, put in `store` (then sealed); returns each as the torch
    decode of its codec (`codec_of(layer, expert)`) gives it back, on the CPU: what
    a slot must hold after a miss."""
    g = torch.Generator().manual_seed(seed)
    full = {}
    for layer in range(L):
        for e in range(E):
            w = [(torch.randn(s.shape, generator=g) * 0.05).to(s.dtype) for s in layout.tensors]
            store.put(layer, e, w)
            codec = codec_of(layer, e)
            full[(layer, e)] = [torch.empty_like(t) for t in w]
            codec.decode(codec.encode(w), full[(layer, e)])
    store.seal()
    return full


def make_quantized_store(L, E, layout, bits, pinned=False, seed=0):
    """A quantized host store (group 32, round to nearest) and every expert as the
    torch decode gives it back."""
    codec = GroupQuant(bits, 32, "rtn")
    store = QuantizedStore(HostStore(codec.layout(layout), L, E, pin_memory=pinned), codec,
                           layout)
    return store, fill_quantized(store, L, E, layout, lambda layer, e: codec, seed)


def case_quantized_store_is_decoded_into_slots(device):
    """A quantized store's records are decoded by the fill, bit for bit as the torch
    decode (quant.py), biases copied; demand and prefetch fills alike."""
    L, E = 3, 8
    # decode_values' arithmetic at every width: dequant_cases.py; here the fill's reads
    for bits, dtype in ((4, torch.bfloat16), (3, torch.float16)):
        slot = ExpertLayout((TensorSpec((16, 64), dtype), TensorSpec((64, 32), dtype),
                             TensorSpec((16,), dtype)))
        store, full = make_quantized_store(L, E, slot, bits, device == "cuda", seed=bits)
        pred = FixedPredictor(depth=1, num_layers=L)
        cache = DeviceExpertCache(store, E + 3, device, predictor=pred)
        cache.decode_block = 128  # each program's range is a part of a matrix
        assert len(cache._sources[0].decodes) == 2
        assert len(cache._sources[0].fill_groups) == 1
        run_predicted(cache, full, pred, torch.Generator().manual_seed(bits), 2, 2, device)
        t = cache.sync_stats().totals()
        assert t.misses > 0 and t.prefetched > 0
        assert t.bytes_loaded == (t.misses + t.prefetched) * store.read_bytes
        n = 16 * 64 + 64 * 32  # a miss moves codes, fp16 scale and zero, the bias
        assert store.read_bytes == n * bits // 8 + 2 * 2 * n // 32 + 16 * 2


def case_mixed_precision_store_fills_each_expert_from_its_store(device):
    """Mixed precision: the hot experts at 8 bits (and at 16: copied as they are) in a
    store of their own, the rest at 4 in another. Each fill decodes the expert from
    the store that holds it (its record row there), bit for bit as the torch decode;
    each store counts its fills, so bytes moved are each store's. Layer 0 is all hot,
    layer 1 half, layer 2 cold."""
    for hot_bits in (8, 16):
        _mixed_store_case(device, hot_bits)
    # profiles that count nothing leave the hot store empty: the cold one fills alone
    L, E = 2, 4
    slot = ExpertLayout((TensorSpec((16, 64), torch.bfloat16),))
    hot_codec, codec = GroupQuant(8, 32, "rtn"), GroupQuant(4, 32, "rtn")
    every = [(l, e) for l in range(L) for e in range(E)]
    store = MixedStore(
        QuantizedStore(HostStore(hot_codec.layout(slot), L, E, keys=[]), hot_codec, slot),
        QuantizedStore(HostStore(codec.layout(slot), L, E, pin_memory=device == "cuda",
                                 keys=every), codec, slot))
    full = {}
    for layer, e in every:
        w = [torch.randn(16, 64, generator=torch.Generator().manual_seed(e)).to(torch.bfloat16)]
        store.put(layer, e, w)
        full[(layer, e)] = [torch.empty_like(w[0])]
        codec.decode(codec.encode(w), full[(layer, e)])
    store.seal()
    cache = DeviceExpertCache(store, E + 1, device)
    assert len(cache._sources) == 1
    ids = torch.tensor([[0, 3], [2, 3]], dtype=torch.int32, device=device)
    check_slots(cache, full, 1, ids, cache.map_to_slots(1, ids))
    assert cache.sync_stats().totals().bytes_loaded == 3 * store.cold.read_bytes


def _mixed_store_case(device, hot_bits):
    L, E = 3, 8
    slot = ExpertLayout((TensorSpec((16, 64), torch.bfloat16),
                         TensorSpec((64, 32), torch.bfloat16), TensorSpec((16,), torch.bfloat16)))
    hot_keys = [(0, e) for e in range(E)] + [(1, e) for e in range(0, E, 2)]
    cold_keys = [(l, e) for l in range(L) for e in range(E) if (l, e) not in hot_keys]
    codecs = (GroupQuant(hot_bits, 32, "rtn"), GroupQuant(4, 32, "rtn"))
    hot, cold = (QuantizedStore(HostStore(c.layout(slot), L, E, pin_memory=device == "cuda",
                                          keys=keys), c, slot)
                 for c, keys in zip(codecs, (hot_keys, cold_keys)))
    store = MixedStore(hot, cold)
    full = fill_quantized(store, L, E, slot,
                          lambda layer, e: codecs[(layer, e) not in hot_keys], seed=5)
    pred = FixedPredictor(depth=1, num_layers=L)
    cache = DeviceExpertCache(store, E + 3, device, predictor=pred)
    cache.decode_block = 128
    run_predicted(cache, full, pred, torch.Generator().manual_seed(6), 3, 2, device)
    t = cache.sync_stats()
    hot_loads, cold_loads = (src.loads.cpu().tolist() for src in cache._sources)
    loads = [t.layer(l).misses + t.layer(l).prefetched for l in range(L)]
    assert hot_loads[0] == loads[0] > 0 and cold_loads[0] == 0
    assert hot_loads[1] + cold_loads[1] == loads[1] and hot_loads[1] > 0 < cold_loads[1]
    assert hot_loads[2] == 0 and cold_loads[2] == loads[2] > 0
    for layer in range(L):
        assert t.layer(layer).bytes_loaded == (hot_loads[layer] * hot.read_bytes
                                               + cold_loads[layer] * cold.read_bytes)
    assert hot.read_bytes > cold.read_bytes
    # a residency plan loads on the host: one hot expert, its bytes
    e = next(e for e in range(E) if e not in cache.resident(0))
    before = t.layer(0).bytes_loaded
    cache.set_plan([ExpertKey(0, e)])
    assert cache.sync_stats().layer(0).bytes_loaded == before + hot.read_bytes
    check_slots(cache, full, 0, torch.tensor([[e]]), torch.tensor([[cache._planned[
        ExpertKey(0, e)]]]))


def case_quantized_store_is_gathered_into_the_kernels_layout(device):
    """A kernel whose layout differs from the checkpoint's (w13's halves swapped,
    w2 transposed with a row of padding): the decode fill gathers, bit for bit as
    the torch decode followed by the gather."""
    L, E = 2, 8
    source = ExpertLayout((TensorSpec((16, 64), torch.bfloat16),
                           TensorSpec((64, 32), torch.bfloat16),
                           TensorSpec((16,), torch.bfloat16)))
    w13 = torch.arange(16 * 64).view(16, 64)
    w2 = torch.arange(64 * 32).view(64, 32).t()
    gather = Gather([torch.cat([w13[8:], w13[:8]]),
                     torch.cat([w2, torch.full((1, 64), -1)]), torch.arange(16)])
    slot = ExpertLayout((TensorSpec((16, 64), torch.bfloat16),
                         TensorSpec((33, 64), torch.bfloat16), source.tensors[2]))
    store, decoded = make_quantized_store(L, E, source, 4, device == "cuda")
    store.layout = slot  # the slots hold the kernel's layout
    full = {k: gather(v) for k, v in decoded.items()}
    cache = DeviceExpertCache(store, E + 2, device)
    cache.decode_block = 128  # a program's range runs from w13 into w2
    ids = torch.tensor([[0, 1]], dtype=torch.int32, device=device)
    try:
        cache.map_to_slots(0, ids)
        raise AssertionError("a fill into slots of another shape ran without a packer")
    except RuntimeError as e:
        assert "packing" in str(e)
    for wrong in (lambda tensors: tensors,  # a packer that is not a gather
                  Gather([gather.index[0].view(16, 64), gather.index[1].view(33, 64),
                          torch.arange(16).flip(0)])):  # one that moves the bias
        try:
            cache.set_packer(wrong)
            raise AssertionError("device mode took a packer it cannot apply")
        except NotImplementedError:
            pass
    cache.set_packer(gather)
    store.packers = {layer: gather for layer in range(L)}  # host-side loads (set_plan)
    cache.set_plan([ExpertKey(1, 3)])
    gen = torch.Generator().manual_seed(7)
    for step in range(3):
        for layer in range(L):
            ids = routing(gen, 3, E, 2, device)
            check_slots(cache, full, layer, ids, cache.map_to_slots(layer, ids))
        check_state(cache)
    check_slots(cache, full, 1, torch.tensor([3]), cache.map_to_slots(1, torch.tensor(
        [[3]], dtype=torch.int32, device=device)))
    assert cache.sync_stats().totals().misses > 0


CASES = {name: fn for name, fn in globals().items() if name.startswith("case_")}


def run_all(device: str, shard: int = 0, shards: int = 1) -> dict:
    """{case[/general]: error or None}: every case with the register path for small
    calls, the first two also with the general (scatter through memory) path; with
    `shards`, every shards-th of them from `shard` (shards run in parallel)."""
    global SMALL
    runs = [(name, True) for name in CASES] + [(name, False) for name in list(CASES)[:2]]
    results = {}
    for name, small in runs[shard::shards]:
        SMALL = small
        label = name + ("" if small else "/general")
        try:
            CASES[name](device)
            results[label] = None
        except Exception as e:  # report every case, not only the first failure
            results[label] = f"{type(e).__name__}: {e}"
    SMALL = True
    return results


if __name__ == "__main__":  # python -m ...device_cases DEVICE [SHARD/SHARDS]: JSON
    shard, shards = map(int, (sys.argv[2] if len(sys.argv) > 2 else "0/1").split("/"))
    print(json.dumps(run_all(sys.argv[1], shard, shards)))
