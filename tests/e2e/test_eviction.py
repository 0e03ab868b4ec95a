"""Every eviction policy through real vLLM: outputs stay token-identical (eviction
decides only what is loaded), and replaying the engine's own trace with the same
policy reproduces its hit and miss counts exactly."""

import pytest

from tests.e2e.conftest import ARCHS, EXPERTS, assert_same_outputs, offload_spec, plain_spec
from vllm_moe_offload.core.replay import PROFILES, calls_from_records, replay
from vllm_moe_offload.core.trace import read_trace

# 'reuse' (the default) runs in every other e2e test; 'predicted' needs a predictor.
POLICIES = ["lru", "lfu", "layer", "predicted"]
POOL = EXPERTS + 2  # one layer's experts and two more: evictions at every call


# every policy on one arch; the other archs with one policy each (the policies are
# core/ code, alike for every arch: unit-tested against a reference and replay)
CASES = [(ARCHS[0], policy) for policy in POLICIES] + list(zip(ARCHS[1:], POLICIES))


@pytest.mark.parametrize("arch, policy", CASES)
def test_every_policy_keeps_outputs_and_replay_matches(models, engine, store_dir, tmp_path,
                                                       arch, policy):
    plain = engine(plain_spec(models[arch]))
    trace = str(tmp_path / "routing.trace")
    extra = {"predictor": "next-gate"} if policy == "predicted" else {"trace_path": trace}
    off = engine(offload_spec(models[arch], pool_slots=POOL, store="disk",
                              store_dir=store_dir, eviction=policy, **extra))
    assert_same_outputs(off, plain)
    assert f"eviction {policy}" in off["log"]
    totals = off["stats"]["totals"]
    assert totals["misses"] > 0 and totals["evictions"] > 0
    if policy == "predicted":  # prefetch decides loads too: replay has no such predictor
        assert totals["prefetched"] > 0
        return
    header, records = read_trace(trace)
    result = replay(calls_from_records(records), POOL, policy, PROFILES["olmoe-1b-7b-pcie4"],
                    experts_per_layer=header.experts_per_layer)
    assert (result.hits, result.misses) == (totals["hits"], totals["misses"])
