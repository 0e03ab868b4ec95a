"""Slot groups through vLLM on CPU: the split that vLLM's CUDA kernels need.

vLLM's CUDA MoE kernels see at most 992 experts per call, so on CUDA a larger pool
is split into groups of consecutive layers, each layer's kernel reading its group's
slots (runtime/slot_buffers.py). The CPU has no such limit; MAX_SLOTS_ENV sets one
here so the same split runs through vLLM and is held to plain vLLM's outputs (here
in host mode; device mode, and a quantized checkpoint's record: test_device_mode_cpu.py).
"""

import json

from tests.e2e.conftest import (EXPERTS, LAYERS, assert_same_outputs, offload_spec, plain_spec,
                                run_engine)
from vllm_moe_offload.integration.vllm.model_state import MAX_SLOTS_ENV

GROUPS = [[0, 2, 0, 12], [2, 4, 12, 24]]  # layers [a, b), slots [lo, hi)


def test_slot_groups_match_plain_with_prefetch_and_a_plan(models, engine, store_dir,
                                                          tmp_path):
    """24 slots where a kernel sees at most 12: two groups of 2 layers and 12 slots.
    Next-gate prefetch crosses the groups' boundary; task-aware residency pins 4
    experts, within each group's room (12 - 8)."""
    model = models["qwen3_moe"]
    plain = engine(plain_spec(model))
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"default": "prose", "rules": []}))
    spec = offload_spec(model, pool_slots=2 * 12, store="disk", store_dir=store_dir,
                        predictor="next-gate", task_aware=True, replan_every=2,
                        task_rules_path=str(rules))
    off = run_engine(dict(spec, rounds=2), env={MAX_SLOTS_ENV: "12"})
    assert_same_outputs(off, plain)
    pool, t = off["stats"]["pool"], off["stats"]["totals"]
    assert pool["slot_groups"] == GROUPS
    assert "pool of 24 slots in 2 groups of consecutive layers (layers 0-1: 12, " \
           "layers 2-3: 12)" in off["log"]
    assert t["misses"] > LAYERS * EXPERTS // 2 and t["evictions"] > 0
    assert t["prefetched"] > 0 and t["prefetch_hits"] > 0
    assert off["stats"]["tasks"]["planned"] == off["stats"]["tasks"]["budget"] == 4
