import json

import pytest

from vllm_moe_offload.core.replay import (PROFILES, Call, HardwareProfile, calls_from_records,
                                          lower_bound_s_per_token, replay,
                                          trace_bound_tokens_per_s)
from vllm_moe_offload.core.trace import read_trace
from vllm_moe_offload.cli.replay import table

# 1 ms of compute per layer call, 2 ms to load one expert.
PROFILE = HardwareProfile("test", link_gbps=1e-3, compute_s_per_layer=1e-3,
                          bytes_per_expert=2000, layers=1, experts=4, top_k=1)


def calls(*sets, layer=0, one_step=False):
    """One call per set, each in a step of its own (prefetch never crosses a step) or,
    with `one_step`, all in step 0."""
    return [Call(0 if one_step else step, layer, tuple(s), 1) for step, s in enumerate(sets)]


@pytest.mark.parametrize("policy, hits, misses", [
    ("lru", 0, 6), ("lfu", 0, 6), ("layer", 0, 6), ("reuse", 0, 6), ("belady", 2, 4)])
def test_policies_on_a_cycle(policy, hits, misses):
    r = replay(calls({0, 1}, {2}, {0}, {1}, {2}), 2, policy, PROFILE)
    assert (r.hits, r.misses) == (hits, misses)
    assert r.bytes_moved == misses * 2000


@pytest.mark.parametrize("policy, hits, misses", [
    ("lru", 1, 4), ("lfu", 2, 3), ("reuse", 2, 3), ("belady", 2, 3)])
def test_frequency_matters_for_lfu(policy, hits, misses):
    r = replay(calls({0}, {0}, {1}, {2}, {0}), 2, policy, PROFILE)
    assert (r.hits, r.misses) == (hits, misses)


@pytest.mark.parametrize("policy, hits", [
    ("lru", 0), ("lfu", 0), ("layer", 12), ("reuse", 11), ("belady", 12)])
def test_layer_aware_policies_keep_the_layers_that_come_next(policy, hits):
    # Three layers, one expert each, pool of 2, 9 steps: LRU evicts exactly what comes
    # next; so does LFU (every key is used equally, so the oldest goes). Layer-aware
    # eviction is optimal here; reuse misses once more while its use counts are young
    # (step 2: the layer-2 expert, used at one step of two, looks rarer than it is).
    seq = [Call(s, l, (0,), 1) for s in range(9) for l in range(3)]
    assert replay(seq, 2, policy, PROFILE).hits == hits


def test_replay_runs_the_engine_policy_objects(monkeypatch):
    """Replay builds its pool from core.eviction.make_policy, not a copy."""
    import vllm_moe_offload.core.replay as replay_mod
    from vllm_moe_offload.core.eviction import make_policy

    built = []
    monkeypatch.setattr(replay_mod, "make_policy",
                        lambda name, layers: built.append(name) or make_policy(name, layers))
    replay(calls({0}, {1}), 2, "reuse", PROFILE)
    assert built == ["reuse"]


def test_predicted_takes_oracle_hints_and_beats_reuse_on_a_trap():
    # One layer, pool of 3, one layer call needs 2, so prefetch holds 1 slot (depth 1).
    # Call 0 loads 1 and 3 and prefetches 2. During call 1 the oracle names {0, 1} for
    # call 2, but only 0 fits the prefetch budget, so its load needs a victim among 1
    # and 3 (equal counts, 1 added first): reuse evicts 1 and misses it at call 2;
    # predicted keeps the named 1 and evicts 3.
    seq = calls({1, 3}, {2}, {0, 1}, one_step=True)
    kwargs = dict(depth=1, experts_per_layer=2)
    reuse = replay(seq, 3, "reuse", PROFILE, **kwargs)
    predicted = replay(seq, 3, "predicted", PROFILE, **kwargs)
    assert (reuse.hits, reuse.misses, reuse.prefetched) == (2, 3, 2)
    assert (predicted.hits, predicted.misses, predicted.prefetched) == (3, 2, 2)


def test_stalls_and_oracle_prefetch_timing():
    seq = [Call(0, 0, (0,), 1), Call(0, 1, (1,), 1)]
    on_demand = replay(seq, 2, "lru", PROFILE, depth=0)
    assert on_demand.stall_s == pytest.approx(4e-3)  # two 2 ms loads, nothing hidden
    assert on_demand.total_s == pytest.approx(6e-3)
    ahead = replay(seq, 2, "lru", PROFILE, depth=1)
    assert (ahead.prefetched, ahead.prefetch_hits, ahead.misses) == (1, 1, 1)
    assert ahead.stall_s == pytest.approx(3e-3)  # 1 ms of the second load hidden
    assert ahead.total_s == pytest.approx(5e-3)
    assert ahead.tokens_per_s == pytest.approx(1 / 5e-3)


def test_prefetch_never_evicts_the_running_call():
    seq = calls({0, 1}, {2, 3}, {0, 1}, one_step=True)
    r = replay(seq, 2, "lru", PROFILE, depth=1)
    assert r.hits + r.misses == 6 and r.misses >= 2


def test_oracle_prefetch_stays_within_a_step():
    """The engine's predictors look ahead within one forward pass: the last layer does
    not prefetch the next step's first, so each step's first call misses."""
    seq = [Call(s, l, (s * 2 + l,), 1) for s in range(3) for l in range(2)]
    r = replay(seq, 8, "lru", PROFILE, depth=2)
    assert (r.prefetched, r.prefetch_hits, r.misses, r.hits) == (3, 3, 3, 3)


def test_pool_smaller_than_a_call_is_refused():
    with pytest.raises(ValueError, match="--pool-slots 1"):
        replay(calls({0, 1}), 1, "lru", PROFILE)


def test_lower_bound_matches_anchors():
    # ANCHORS.md: Mixtral all-miss decode on PCIe Gen5 ~ 410 ms per token.
    assert lower_bound_s_per_token(PROFILES["mixtral-8x7b-pcie5"], 0.0) == pytest.approx(
        0.41, rel=0.01)
    # Qwen3 with 96% hits: transfer 48*8*0.04*9.4 MB / 55 GB/s = 2.6 ms > compute 2.0 ms
    assert lower_bound_s_per_token(PROFILES["qwen3-30b-a3b-pcie5"], 0.96) == pytest.approx(
        48 * 8 * 0.04 * 9.4e6 / 55e9)


def test_trace_bound_is_never_beaten_by_a_replay():
    seq = [Call(s, l, (s % 3, (s + l) % 4), 2) for s in range(6) for l in range(3)]
    for policy in ("lru", "belady"):
        for depth in (0, 2):
            r = replay(seq, 4, policy, PROFILE, depth)
            assert r.tokens_per_s <= trace_bound_tokens_per_s(seq, PROFILE, r.bytes_moved) * 1.0001


def test_cli_table_reads_jsonl_traces(tmp_path):
    path = tmp_path / "t.jsonl"
    lines = [{"layer": l, "token_idx": t, "topk_ids": [(t + l) % 4, (t + 2 * l) % 4]}
             for t in range(6) for l in range(2)]
    path.write_text("\n".join(json.dumps(x) for x in lines))
    _, records = read_trace(str(path))
    assert len(calls_from_records(records)) == 12
    out = table(str(path), 4, ["lru", "belady"], ["olmoe-1b-7b-pcie4"], "oracle", 1)
    assert out.count("| olmoe-1b-7b-pcie4 |") == 4  # 2 policies x (none, oracle)


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="--policy 'fifo': choose from lru, lfu"):
        replay(calls({0}), 2, "fifo", PROFILE)
