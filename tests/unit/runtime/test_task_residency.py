"""Residency plan and approximate re-routing on a real ExpertCache (no vLLM)."""

import json

import pytest
import torch

from vllm_moe_offload.core.slot_pool import ExpertKey
from vllm_moe_offload.core.tasks import TaskProfiles
from vllm_moe_offload.runtime.task_residency import TaskResidency
from tests.unit.runtime.test_expert_cache import E, L, LAYOUT, make_cache


def ids(rows):
    return torch.tensor(rows, dtype=torch.int64)


def test_plan_pins_within_budget_and_counts_loads(tmp_path):
    cache = make_cache("host", tmp_path, num_slots=10)  # E = 6: room for 4 planned
    plan = [ExpertKey(1, 0), ExpertKey(2, 5), ExpertKey(0, 3)]
    added, removed = cache.set_plan(plan)
    assert (added, removed) == (plan, [])
    assert cache.prefetch_budget == 10 - 6 - 3  # the plan shrinks the prefetch room
    totals = cache.stats.totals()
    assert totals.planned_loads == 3 and totals.bytes_loaded == 3 * LAYOUT.expert_bytes
    # Planned experts survive a layer call that needs 6 other slots...
    cache.map_to_slots(1, ids([[1, 2], [3, 4], [5, 1]]))
    cache.map_to_slots(0, ids([[0, 1], [2, 4], [5, 0]]))
    assert all(cache.pool.lookup(k) is not None for k in plan)
    # ...and are hits when routed to, with no load.
    before = cache.stats.totals().bytes_loaded
    cache.map_to_slots(2, ids([[5, 5]]))
    assert cache.stats.layer(2).hits == 1 and cache.stats.totals().bytes_loaded == before
    # Re-plan: one kept, one dropped (unpinned, not evicted), one new.
    added, removed = cache.set_plan([ExpertKey(1, 0), ExpertKey(1, 1)])
    assert added == [ExpertKey(1, 1)] and set(removed) == {ExpertKey(2, 5), ExpertKey(0, 3)}
    cache.pool.check_invariants()
    with pytest.raises(ValueError, match="plan at most 4"):
        cache.set_plan([ExpertKey(l, e) for l in range(L) for e in range(2)])


def test_reroute_replaces_only_misses_of_marked_rows(tmp_path):
    cache = make_cache("host", tmp_path, num_slots=8)
    cache.map_to_slots(0, ids([[0, 1], [2, 3]]))  # resident in layer 0: 0, 1, 2, 3
    topk = ids([[0, 4], [5, 1], [4, 5]])
    scores = torch.tensor([[0, 0, 9, 1, 0, 0], [0, 0, 1, 7, 0, 0], [5, 0, 0, 6, 0, 0]],
                          dtype=torch.float32)
    rows = torch.tensor([True, True, False])
    got = cache.reroute_misses(0, topk, scores, rows)
    # Row 0: 4 missing -> best resident not picked = 2. Row 1: 5 -> 3. Row 2: exact.
    assert got.tolist() == [[0, 2], [3, 1], [4, 5]]
    assert cache.stats.layer(0).rerouted == 2
    # All hits: unchanged, nothing counted.
    assert cache.reroute_misses(0, ids([[0, 1]]), scores[:1], rows[:1]).tolist() == [[0, 1]]
    assert cache.stats.layer(0).rerouted == 2
    # vLLM's padded rows (-1, no expert) stay as they are, marked or not
    padded = ids([[0, 4], [-1, -1]])
    got = cache.reroute_misses(0, padded, scores[:2], torch.tensor([True, True]))
    assert got.tolist() == [[0, 2], [-1, -1]] and cache.stats.layer(0).rerouted == 3


def test_residency_attributes_tokens_to_tasks_and_replans(tmp_path):
    cache = make_cache("host", tmp_path, num_slots=10)
    profiles = tmp_path / "profiles.json"
    res = TaskResidency(cache, budget=2, replan_every=3, profiles_path=str(profiles))
    # Step 1: request "a" has 2 tokens, "b" 1 token; two new prompts.
    res.begin_step([("a", 2), ("b", 1)], new_prompts=2, demand={"a": 10, "b": 1})
    res.record(0, ids([[0, 1], [0, 2], [5, 4]]))
    res.record(0, ids([[3, 3], [3, 3], [3, 3], [3, 3]])[:2])  # a shorter call: skipped
    assert res.replans == 0 and not profiles.exists()
    # Step 2: third prompt -> re-plan, weighted by demand: a's experts win.
    res.begin_step([("b", 1), ("a", 1)], new_prompts=1, demand={"a": 10, "b": 1})
    assert res.replans == 1
    counts = json.loads(profiles.read_text())["profiles"]["counts"]
    assert counts["a"][0] == [2, 1, 1, 0, 0, 0] and counts["b"][0] == [0, 0, 0, 0, 1, 1]
    assert sorted(cache.planned) == [ExpertKey(0, 0), ExpertKey(0, 1)]  # a: 0 (2), 1 or 2 (1)
    share = res.resident_share()()  # a function: device mode reads it later
    assert share["a"] == pytest.approx(3 / 4) and share["b"] == 0.0
    # A restart loads the saved profiles and plans at the first step.
    again = TaskResidency(make_cache("host", tmp_path / "2", 10), 2, 100, str(profiles))
    again.begin_step([("b", 1)], new_prompts=1, demand={})
    assert again.replans == 1 and len(again.cache.planned) == 2


def test_profiles_that_cannot_be_written_are_a_warning_not_a_dead_engine(tmp_path,
                                                                         caplog):
    """A read-only or full disk under the profiles file: the replan runs inside vLLM's
    step, so the write failing must not raise there."""
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the profiles' directory should be
    path = blocker / "profiles.json"
    res = TaskResidency(make_cache("host", tmp_path, num_slots=10), budget=2,
                        replan_every=1, profiles_path=str(path))
    with caplog.at_level("WARNING", logger="vllm.moe_offload"):
        for _ in range(3):
            res.begin_step([("a", 1)], new_prompts=1, demand={"a": 1})
            res.record(0, ids([[0, 1]]))
        res.save()
    assert res.replans == 3 and res.profiles.counts["a"][0][:2] == [3, 3]
    assert caplog.text.count("could not write the task profiles") == 1  # once, not per step
    assert str(path) in caplog.text and "--expert-task-profiles" in caplog.text


def test_approx_rows_follow_the_insensitive_pairs(tmp_path):
    cache = make_cache("host", tmp_path, num_slots=10)
    res = TaskResidency(cache, 2, 40, insensitive={("b", 1)}, approximate=True)
    res.begin_step([("a", 2), ("b", 1)], new_prompts=0, demand={})
    assert res.approx_tokens(1, 4).tolist() == [False, False, True, False]  # padded call
    assert res.approx_tokens(0, 3).tolist() == [False, False, False]
    exact = TaskResidency(cache, 2, 40, insensitive={("b", 1)}, approximate=False)
    exact.begin_step([("b", 1)], 0, {})
    assert exact.approx_tokens(1, 1) is None


def test_profiles_with_other_shapes_are_refused(tmp_path):
    path = tmp_path / "p.json"
    TaskProfiles(L + 1, E).save(path)
    with pytest.raises(ValueError, match=f"{L + 1} layers x {E} experts, not {L} x {E}"):
        TaskResidency(make_cache("host", tmp_path, 10), 2, 40, str(path))


def test_rows_routed_to_no_expert_count_nothing(tmp_path):
    """vLLM on CUDA routes the rows it pads a batch with to -1: no count (at layer 0
    of the first task's row, -1 would index the row before it)."""
    cache = make_cache("host", tmp_path, num_slots=10)
    res = TaskResidency(cache, budget=2, replan_every=1000, max_step_tokens=16)
    res.begin_step([("a", 2), ("b", 1)], new_prompts=0, demand={})
    res.record(0, ids([[-1, -1], [1, 1], [-1, -1], [-1, -1]]))
    res.fold()
    assert res.profiles.counts["a"] == [[0, 2, 0, 0, 0, 0]] + [[0] * E] * (L - 1)
    assert "b" not in res.profiles.counts


def test_counts_stay_on_the_device_path_padded_rows_and_many_tasks(tmp_path):
    """record() counts with no host read: a call padded past the step's tokens (as a
    CUDA graph's batch is) counts its extra rows into the sink, not into a task; more
    tasks than count rows fold the counts first, and none is lost."""
    from vllm_moe_offload.runtime.task_residency import COUNT_ROWS

    cache = make_cache("host", tmp_path, num_slots=10)
    res = TaskResidency(cache, budget=2, replan_every=1000, max_step_tokens=16)
    res.begin_step([("a", 2), ("b", 1)], new_prompts=0, demand={})
    res.record(1, ids([[0, 1], [0, 2], [5, 4], [3, 3], [3, 3]]))  # 2 padding rows
    res.fold()
    assert res.profiles.counts["a"][1] == [2, 1, 1, 0, 0, 0]
    assert res.profiles.counts["b"][1] == [0, 0, 0, 0, 1, 1]
    # a shorter step: the rows the last one laid out past it go back to the sink
    res.begin_step([("b", 1)], new_prompts=0, demand={})
    res.record(0, ids([[2, 3], [4, 4], [4, 4]]))
    res.fold()
    assert res.profiles.counts["b"][0] == [0, 0, 1, 1, 0, 0]
    assert "a" not in res.profiles.counts or sum(res.profiles.counts["a"][0]) == 0
    for i in range(COUNT_ROWS + 8):  # more tasks than rows: counted all the same
        res.begin_step([(f"t{i}", 1)], new_prompts=0, demand={})
        res.record(2, ids([[i % E, (i + 1) % E]]))
    res.fold()
    assert all(sum(res.profiles.counts[f"t{i}"][2]) == 2 for i in range(COUNT_ROWS + 8))
    assert res.profiles.counts["t3"][2][3] == 1 and res.profiles.counts["t3"][2][4] == 1
    with pytest.raises(RuntimeError, match="a step of 17 tokens, more than the 16"):
        res.begin_step([("a", 17)], new_prompts=0, demand={})


def test_a_step_of_more_tasks_than_count_rows_credits_each_its_own_tokens(tmp_path):
    """The rows were handed out task by task, folding when they ran out midway, so
    later tasks of the step took rows already given to earlier ones: of 33 tasks one
    token each, 2 tokens were recorded, both to the last task."""
    from vllm_moe_offload.runtime.task_residency import COUNT_ROWS

    cache = make_cache("host", tmp_path, num_slots=10)
    res = TaskResidency(cache, budget=2, replan_every=1000, max_step_tokens=64)
    res.begin_step([("a", 1)], new_prompts=0, demand={})  # a row taken before
    n = COUNT_ROWS + 1
    res.begin_step([(f"u{i}", 1) for i in range(n)], new_prompts=0, demand={})
    res.record(2, ids([[i % E, i % E] for i in range(n)]))
    res.fold()
    assert all(res.profiles.counts[f"u{i}"][2][i % E] == 2 for i in range(COUNT_ROWS))
    assert f"u{COUNT_ROWS}" not in res.profiles.counts  # past the rows: the sink


def test_a_warm_start_plans_for_the_traffic_the_profiles_saw(tmp_path):
    """The first step after a restart sees one request: before, a rare task's request
    planned for it alone (the profiles' shares were used only for a demand of 0,
    which a real step never has) until the next re-plan."""
    p = TaskProfiles(L, E)
    for _ in range(100):
        p.record("a", 0, [0, 1])  # the heavy task
    p.record("b", 0, [4, 5])  # a rare one
    p.save(tmp_path / "prof.json")
    res = TaskResidency(make_cache("host", tmp_path, 10), budget=2, replan_every=40,
                        profiles_path=str(tmp_path / "prof.json"))
    res.begin_step([("b", 3)], new_prompts=1, demand={"b": 3 + 64})
    # the heavy task's experts, not the rare one's alone
    assert {k.expert for k in res.cache._planned if k.layer == 0} >= {0, 1}
