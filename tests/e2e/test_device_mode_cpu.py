"""Device mode through vLLM, on the CPU: Triton's interpreter runs its kernels.

On a GPU, device mode keeps expert residency in GPU memory (runtime/device_cache.py).
The GPU machines have no vLLM, so its vLLM side is run here, slowly, in Triton's
interpreter. The interpreter must be on before Triton is imported, so these engines
fork from a server of their own (engine_probe.run_in_subprocess).
"""

import json

import pytest
import torch

from tests.e2e.conftest import (EXPERTS, LAYERS, assert_same_outputs, offload_spec, plain_spec,
                                run_engine)
from vllm_moe_offload.hf.quantize import quantize_experts
from vllm_moe_offload.core.tasks import TaskProfiles
from vllm_moe_offload.core.trace import read_trace
from vllm_moe_offload.integration.vllm.model_state import MAX_SLOTS_ENV

TOKENS = 6


def test_device_mode_through_vllm_matches_plain(models, engine, tmp_path):
    """Two slot groups (as vLLM's CUDA kernels need above 992 slots; here above 12),
    each of one layer plus 4 slots (2 x 12 of 32 experts), next-gate prefetch across
    them, task-aware residency (routing counted on the device, one expert pinned per
    group by the second round's plan) and approximate mode for the first prompt's
    task, insensitive at every layer (re-routed on the device), and a routing trace
    (copied after each step from a device buffer, written a step later), with the
    counters logged after every step: greedy outputs of the other
    prompts token-identical to plain vLLM, counters from the device."""
    model = models["qwen3_moe"]
    plain = engine(plain_spec(model))  # other tests' engine: its first tokens
    plain = [ids[:TOKENS] for ids in plain["token_ids"]]
    rules = tmp_path / "rules.json"
    rules.write_text('{"default": "prose", "rules": []}')
    sens = tmp_path / "sensitivity.json"
    sens.write_text(json.dumps({
        "format": "vllm-moe-offload-sensitivity/1", "model": model, "num_layers": LAYERS,
        "threshold": 0.05, "metric": "hand-made for the test",
        "tasks": {"chat": {"change": [0.0] * LAYERS, "insensitive": list(range(LAYERS))}}}))
    spec = dict(offload_spec(model, pool_slots=2 * (EXPERTS + 4), store="host",
                             predictor="next-gate", task_aware=True, replan_every=4,
                             resident_slots=2, task_rules_path=str(rules),
                             approximate=True, sensitivity_path=str(sens),
                             trace_path=str(tmp_path / "routing.trace"),
                             stats_log_interval_s=0.001),
                max_tokens=TOKENS, rounds=2, extra_args=[{"task": "chat"}, None, None, None])
    off = run_engine(spec, env={"TRITON_INTERPRET": "1", MAX_SLOTS_ENV: str(EXPERTS + 4)})
    pool = off["stats"]["pool"]
    assert pool["mode"] == "device" and pool["eviction"] == "reuse"
    assert pool["slot_groups"] == [[0, 2, 0, 12], [2, 4, 12, 24]]
    tasks = off["stats"]["tasks"]
    assert tasks["replans"] == 2 and tasks["planned"] == 2
    assert sum(tasks["profile_tokens"].values()) > 0
    assert "device mode (residency on the GPU" not in off["log"]  # the CUDA line only
    # the scheduler learnt misses per step from the worker's step reports, whose
    # device counters are read after the step (read_later)
    line = next(l for l in off["log"].splitlines() if "task scheduler:" in l)
    assert float(line.split(" misses x ")[0].rsplit(" ", 1)[1]) > 0, line
    # the periodic line, logged after a step (no layer call runs Python in a graph)
    periodic = [l for l in off["log"].splitlines()
                if "expert offload: hit rate" in l and "(shutdown)" not in l]
    assert len(periodic) >= TOKENS, periodic
    for r in off["rounds"]:  # the chat prompt (0) is approximate
        assert r["token_ids"][1:] == plain[1:]
    # the trace: every step's calls, layers in order, the step's tokens (a prefill
    # of the 4 prompts, then one token each, per round), ids the router's
    header, records = read_trace(str(tmp_path / "routing.trace"))
    records = list(records)
    assert (header.num_layers, header.experts_per_layer) == (LAYERS, EXPERTS)
    steps = [[r for r in records if r.step == s] for s in range(records[-1].step + 1)]
    assert all([r.layer for r in step] == list(range(LAYERS)) for step in steps)
    prefill = sum(off["prompt_lens"])
    tokens = [step[0].num_tokens for step in steps]
    decode = [4] * (TOKENS - 1)
    assert tokens[:TOKENS] == [prefill] + decode and tokens[TOKENS + 1:] == decode, tokens
    assert 0 < tokens[TOKENS] < prefill  # round 2's prefill: vLLM's prefix cache has most
    assert all(0 <= e < EXPERTS for r in records for e in r.expert_ids)
    # the task counts (on the device) saw the same calls: every routed id of layer 0
    assert sum(tasks["profile_tokens"].values()) == sum(
        len(r.expert_ids) for r in records if r.layer == 0)
    t = off["stats"]["totals"]
    assert t["rerouted"] > 0
    assert t["misses"] > 0 and t["evictions"] > 0 and t["prefetch_hits"] > 0
    assert t["prefetched"] == t["prefetch_hits"] + t["prefetch_wasted"]
    assert t["planned_loads"] <= 2
    assert t["bytes_loaded"] == (t["misses"] + t["prefetched"] + t["planned_loads"]) * \
        pool["read_bytes"]


def test_device_mode_fills_a_quantized_checkpoints_record(models, engine, tmp_path):
    """A compressed-tensors W4A16 checkpoint: its slot record is 8 tensors, so each
    fill is two launches; in two slot groups, each layer's method reads its group's
    slots of every record tensor (scales and zero points too). quant_reference.py's
    kernel stands in for vLLM's AMX-only one, in plain vLLM and offload alike."""
    model = str(quantize_experts(models["qwen3_moe"], tmp_path / "w4a16", "w4a16"))
    setup = {"setup": "tests.e2e.quant_reference:install", "max_tokens": TOKENS}
    plain = engine({**plain_spec(model), **setup})
    spec = {**offload_spec(model, pool_slots=2 * (EXPERTS + 2), store="host"), **setup}
    off = run_engine(spec, env={"TRITON_INTERPRET": "1", MAX_SLOTS_ENV: str(EXPERTS + 2)})
    pool = off["stats"]["pool"]
    assert pool["mode"] == "device"
    assert pool["slot_groups"] == [[0, 2, 0, 10], [2, 4, 10, 20]]
    assert pool["checkpoint_quantization"] == "CompressedTensorsWNA16MoEMethod"
    assert_same_outputs(off, plain)
    t = off["stats"]["totals"]
    assert t["misses"] > EXPERTS and t["evictions"] > 0
    assert t["bytes_loaded"] == t["misses"] * pool["read_bytes"]


@pytest.mark.parametrize("hot_bits", [None, 8])
def test_device_mode_decodes_a_quantized_store(models, engine, tmp_path, hot_bits):
    """--expert-store-bits 4 on the host store: device mode's fill decodes each miss
    and gathers it into the CPU kernel's layout. With --expert-store-hot-bits 8 (mixed
    precision) the profiles' hot quarter sits at 8 bits in a store of its own, and
    each fill reads the store that holds its expert. Outputs equal host mode's, which
    decodes and packs on the host (test_quantized_store.py holds host mode to plain
    vLLM over the decoded experts)."""
    mixed = {}
    if hot_bits:
        profiles = TaskProfiles(LAYERS, EXPERTS)
        g = torch.Generator().manual_seed(7)
        for layer in range(LAYERS):
            for e, n in enumerate(torch.randint(0, 50, (EXPERTS,), generator=g).tolist()):
                for _ in range(n):
                    profiles.record("prose", layer, [e])
        profiles.save(tmp_path / "profiles.json")
        mixed = {"store_hot_bits": hot_bits, "task_profiles_path": str(tmp_path / "profiles.json")}
    spec = dict(offload_spec(models["qwen3_moe"], pool_slots=EXPERTS + 2, store="host",
                             store_bits=4, predictor="next-gate", **mixed), max_tokens=TOKENS)
    host = engine(spec)
    dev = run_engine(spec, env={"TRITON_INTERPRET": "1"})
    assert host["stats"]["pool"]["mode"] == "host"
    pool = dev["stats"]["pool"]
    assert pool["mode"] == "device" and "layout by a gather" in dev["log"]
    assert dev["token_ids"] == host["token_ids"]
    t = dev["stats"]["totals"]
    assert t["misses"] > 0 and t["evictions"] > 0 and t["prefetch_hits"] > 0
    loads, moved, cold = t["misses"] + t["prefetched"], t["bytes_loaded"], pool["read_bytes"]
    assert cold < pool["slot_bytes"] / 3
    if not hot_bits:
        assert moved == loads * cold
        return
    # each load moved its own expert's bytes: some hot, some cold
    hot = pool["hot_read_bytes"]
    assert pool["hot_experts"] == LAYERS * EXPERTS // 4 and hot > 1.5 * cold
    hot_loads, rest = divmod(moved - loads * cold, hot - cold)
    assert rest == 0 and 0 < hot_loads < loads, (moved, loads, hot, cold)
