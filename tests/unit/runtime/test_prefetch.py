"""Prefetch in the expert cache: covered misses, waste, budget, and exact outputs."""

import threading

import torch

from tests.unit.runtime.test_expert_cache import (E, H, L, LAYOUT, make_cache, moe, routing,
                                                  weights)
from vllm_moe_offload.core.slot_pool import SlotGroup
from vllm_moe_offload.runtime.expert_cache import ExpertCache
from vllm_moe_offload.runtime.predictors import Predictor


class ScriptedPredictor(Predictor):
    """Predicts from a fixed table {(step, layer): experts}; wrong on purpose if told."""

    def __init__(self, future, depth=1, wrong=False):
        super().__init__(depth=depth, top_k=2, num_layers=L)
        self.future, self.wrong, self.step, self.last = future, wrong, -1, None

    def predict(self, layer, hidden):
        if self.last is None or layer <= self.last:
            self.step += 1
        self.last = layer
        out = []
        for t in self.targets(layer):
            experts = self.future[(self.step, t)]
            if self.wrong:
                experts = [e for e in range(E) if e not in experts][:len(experts)]
            out.append((t, experts))
        return out


def schedule(steps=3, tokens=3):
    return {(s, l): routing(s * 10 + l, tokens) for s in range(steps) for l in range(L)}


def run(cache, plan, steps=3):
    full = weights()
    for s in range(steps):
        for layer in range(L):
            tw, ids = plan[(s, layer)]
            x = torch.randn(ids.shape[0], H, generator=torch.Generator().manual_seed(s + layer))
            slot_ids = cache.map_to_slots(layer, ids, x)
            w13 = torch.stack([w[0] for w in full[layer]])
            w2 = torch.stack([w[1] for w in full[layer]])
            assert torch.equal(moe(x, *cache.layer_buffers(layer), tw, slot_ids),
                               moe(x, w13, w2, tw, ids))
    cache.close()
    return cache.stats.to_dict()


def with_predictor(tmp_path, kind, predictor, num_slots, budget=None):
    base = make_cache(kind, tmp_path, num_slots)
    return ExpertCache(base.store, num_slots, "cpu", predictor=predictor,
                       prefetch_budget_slots=budget)


def test_perfect_prediction_covers_every_miss_after_layer_0(tmp_path):
    plan = schedule()
    future = {k: sorted(set(ids.flatten().tolist())) for k, (_, ids) in plan.items()}
    cache = with_predictor(tmp_path, "disk", ScriptedPredictor(future), num_slots=2 * E)
    stats = run(cache, plan)
    for layer in range(1, L):  # every expert of layers 1.. was prefetched or resident
        s = stats["layers"][layer]
        assert s["misses"] == 0, (layer, s)
        assert s["prefetch_hits"] == s["prefetched"] > 0
        assert s["prefetch_wasted"] == 0
        assert s["predictions"][1]["recall"] == 1.0 == s["predictions"][1]["precision"]
    assert stats["layers"][0]["misses"] > 0  # layer 0 of each step has no predictor


def test_wrong_prediction_is_counted_as_waste_and_outputs_stay_exact(tmp_path):
    plan = schedule()
    future = {k: sorted(set(ids.flatten().tolist())) for k, (_, ids) in plan.items()}
    cache = with_predictor(tmp_path, "host", ScriptedPredictor(future, wrong=True),
                           num_slots=2 * E)
    t = run(cache, plan)["totals"]
    assert t["prefetched"] > 0 and t["prefetch_hits"] == 0
    assert t["prefetch_wasted"] == t["prefetched"]
    assert t["predictions"][1]["recall"] == 0.0
    assert t["bytes_loaded"] == (t["misses"] + t["prefetched"]) * LAYOUT.expert_bytes


def test_budget_caps_prefetch_pins_and_a_full_pool_leaves_no_room(tmp_path):
    plan = schedule()
    future = {k: list(range(E)) for k in plan}  # predict everything
    cache = with_predictor(tmp_path, "host", ScriptedPredictor(future, depth=2),
                           num_slots=2 * E, budget=3)
    seen = []
    original = cache._prefetch

    def spy(layer, hidden):
        original(layer, hidden)
        seen.append(sum(cache._prefetch_pins))

    cache._prefetch = spy
    totals = run(cache, plan)["totals"]
    assert max(seen) == 3
    # predictions at every distance are scored even when the budget stops the loads
    steps = 3
    assert totals["predictions"][1]["predicted"] == steps * (L - 1) * E
    assert totals["predictions"][2]["predicted"] == steps * (L - 2) * E
    # S == E: no slot may be held for prefetch, or the next call could not fit.
    tight = with_predictor(tmp_path, "host", ScriptedPredictor(future), num_slots=E)
    assert tight.prefetch_budget == 0
    assert run(tight, plan)["totals"]["prefetched"] == 0


def test_slot_groups_prefetch_across_their_boundary_within_each_budget(tmp_path):
    """Layer 0 in slot group 0 (8 slots), layers 1-2 in group 1 (6 + 4 slots): each
    group's prefetch pins stay within its own room (S_g - E), every layer's experts
    stay in its group, and outputs stay exact."""
    plan = schedule()
    future = {k: list(range(E)) for k in plan}  # predict everything
    groups = [SlotGroup(range(0, 1), 0, 8), SlotGroup(range(1, 3), 8, 18)]
    base = make_cache("host", tmp_path, 18)
    cache = ExpertCache(base.store, 18, "cpu", predictor=ScriptedPredictor(future, depth=2),
                        groups=groups)
    assert cache._budgets == [2, 4] and cache.prefetch_budget == 6
    seen = []
    original = cache._prefetch

    def spy(layer, hidden):
        original(layer, hidden)
        seen.append(list(cache._prefetch_pins))
        cache.pool.check_invariants()  # every key in its layer's group

    cache._prefetch = spy
    totals = run(cache, plan)["totals"]
    assert max(p[0] for p in seen) == 0 and max(p[1] for p in seen) == 4
    assert totals["prefetched"] > 0 and totals["misses"] > 0


class _FakeEvent:
    waited = 0

    def record(self, stream=None):
        self.recorded = True

    def query(self):
        return self.recorded

    def synchronize(self):
        pass


class _FakeStream:
    def __init__(self, *a, **k):
        self.waits = 0

    def wait_stream(self, other):
        self.waits += 1

    def wait_event(self, event):
        assert event.recorded  # a copy's event is recorded before anyone waits on it
        _FakeEvent.waited += 1

    def synchronize(self):
        pass


def test_host_mode_on_cuda_reads_a_disk_store_s_prefetch_on_its_thread(tmp_path,
                                                                       monkeypatch):
    """Host mode on CUDA with the disk store: a prefetch read is a disk read, and the
    forward thread made it (blocking, with the GPU idle, its time not counted as a
    stall). It is the loader thread's now, which queues the copy on the copy stream
    and hands back its event; the target layer's call waits on that event."""
    import contextlib
    import threading

    compute = _FakeStream()
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    plan = schedule()
    future = {k: sorted(set(ids.flatten().tolist())) for k, (_, ids) in plan.items()}
    cache = with_predictor(tmp_path, "disk", ScriptedPredictor(future), num_slots=2 * E)
    assert cache._loader is not None  # (as a disk store on CUDA makes it)
    cache._cuda, cache._copy_stream = True, _FakeStream()  # what CUDA takes: stand-ins
    readers = []
    read = cache.store.read_into

    def read_into(layer, expert, dst):
        readers.append(threading.current_thread().name)
        return read(layer, expert, dst)

    monkeypatch.setattr(cache.store, "read_into", read_into)
    t = run(cache, plan)["totals"]
    on_thread = sum(name.startswith("expert-prefetch") for name in readers)
    assert t["prefetched"] > 0 and on_thread == t["prefetched"]
    assert len(readers) - on_thread == t["misses"]  # demand misses: the calling thread
    assert _FakeEvent.waited >= t["prefetch_hits"] > 0
    assert cache._copy_stream.waits >= t["prefetched"]  # after the kernels before it


def test_load_seconds_count_the_copies_of_wasted_prefetches(tmp_path):
    """Every load's bytes count in bytes_loaded, so its copy time counts in load_seconds
    too, used or not (before: a wasted prefetch's time was dropped, which inflated
    bytes / seconds, the link rate a user reads off the metrics)."""
    import time

    plan = schedule()
    future = {k: sorted(set(ids.flatten().tolist())) for k, (_, ids) in plan.items()}
    cache = with_predictor(tmp_path, "host", ScriptedPredictor(future, wrong=True),
                           num_slots=2 * E)
    read = cache.store.read_into

    def slow_read(layer, expert, views):
        time.sleep(0.005)  # each read takes at least this long
        return read(layer, expert, views)
    cache.store.read_into = slow_read
    t = run(cache, plan)["totals"]
    assert t["prefetch_wasted"] > 0
    assert t["load_seconds"] >= (t["misses"] + t["prefetched"]) * 0.005


def test_the_least_wanted_prediction_is_the_first_hinted_victim(tmp_path):
    """Predictions come most-wanted first; the `predicted` policy gives up the hinted
    expert it was told of first, so the cache hints them least-wanted first."""
    from vllm_moe_offload.core.eviction import ReuseDistance
    from vllm_moe_offload.core.slot_pool import ExpertKey

    class Fixed(Predictor):
        def predict(self, layer, hidden):
            return [(1, [2, 0, 1])] if layer == 0 else []  # 2 most wanted, 1 least

    cache = with_predictor(tmp_path, "host", Fixed(depth=1, top_k=2, num_layers=L),
                           num_slots=E, budget=0)  # hints only, no loads
    hinted = []
    hint = cache.pool.hint
    cache.pool.hint = lambda key: hinted.append(key) or hint(key)
    cache.map_to_slots(0, torch.tensor([[3, 4]], dtype=torch.int32), torch.zeros(1, H))
    policy = ReuseDistance(num_layers=L, use_hints=True)
    policy.start_call(1)
    for slot, e in enumerate([0, 1, 2]):
        policy.add(slot, ExpertKey(1, e))
    for key in hinted:
        policy.hint(key)
    assert policy.pop_victim() == 1  # expert 1's slot


def test_wasted_prefetches_still_loading_keep_their_budget_until_released(tmp_path):
    """Layer 0 prefetches layer 1's experts 4 and 5, wrongly, and their reads hang.
    Layer 1 may not prefetch more on top of those pins: layer 2 then needs every
    slot but theirs (S = E + 2). Before, it did, and layer 2 did not fit."""
    cache = with_predictor(tmp_path, "host", ScriptedPredictor(
        {(0, 1): [4, 5], (0, 2): [4, 5], (1, 1): [0, 1], (1, 2): [0, 1]}), num_slots=E + 2)
    gate = threading.Event()
    read = cache.store.read_into

    def slow_on_the_loader(layer, e, dst):
        if threading.current_thread().name.startswith("expert-prefetch"):
            gate.wait(30)
        return read(layer, e, dst)

    cache.store.read_into = slow_on_the_loader
    x = torch.zeros(1, H)
    pair = torch.tensor([[0, 1]], dtype=torch.int32)
    cache.map_to_slots(0, pair, x)
    cache.map_to_slots(1, pair, x)  # 4 and 5 unused, still loading: pinned, budget spent
    assert cache.pool.num_pinned() == 4 and cache.stats.layer(2).prefetched == 0
    every = torch.arange(E, dtype=torch.int32).view(-1, 2)
    slots = cache.map_to_slots(2, every, torch.zeros(E // 2, H))
    assert sorted(slots.flatten().tolist()) == sorted(set(slots.flatten().tolist()))
    gate.set()
    cache._release_finished_prefetches(wait=True)  # (what set_plan does between steps)
    assert cache.pool.num_pinned() == E and cache._prefetch_pins == [0]
    cache.pool.check_invariants()
    cache.close()
