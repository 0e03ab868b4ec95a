"""Prediction and prefetch through real vLLM: outputs stay exact with every predictor."""

import subprocess
import sys

import pytest

from tests.e2e.conftest import (EXPERTS, LAYERS, PROMPTS, EngineFailed, assert_same_outputs,
                                offload_spec, plain_spec, run_engine)

HALF = LAYERS * EXPERTS // 2


def train_sidecar(model: str, out, tmp_path) -> str:
    text = tmp_path / "train.txt"
    text.write_text("\n".join(PROMPTS * 8) + "\ndef f(x):\n    return x * 2\n" * 40)
    subprocess.run([sys.executable, "-m", "vllm_moe_offload", "train-lookahead",
                    "--model", model, "--prompts", str(text), "--depth", "2",
                    "--out", str(out), "--max-tokens", "4000", "--epochs", "1",
                    "--hidden-units", "32"], check=True, capture_output=True, text=True)
    return str(out)


@pytest.fixture(scope="module")
def sidecars(models, tmp_path_factory):
    base = tmp_path_factory.mktemp("sidecars")
    return {arch: train_sidecar(models[arch], base / f"{arch}.safetensors", base)
            for arch in ("qwen3_moe", "mixtral")}


@pytest.mark.parametrize("predictor", ["next-gate", "lookahead", "oracle"])
def test_outputs_are_identical_with_each_predictor(models, engine, sidecars, store_dir,
                                                   tmp_path, predictor):
    model = models["qwen3_moe"]
    plain = engine(plain_spec(model))
    extra = {}
    if predictor == "lookahead":
        extra["predictor_path"] = sidecars["qwen3_moe"]
    if predictor == "oracle":  # replay the routing of an identical, earlier run
        trace = str(tmp_path / "routing.trace")
        recorded = run_engine(offload_spec(model, pool_slots=HALF, store="disk",
                                           store_dir=store_dir, trace_path=trace))
        assert_same_outputs(recorded, plain)
        check_replay_of(trace, recorded)
        extra["predictor_path"] = trace
    off = run_engine(offload_spec(model, pool_slots=HALF, store="disk", store_dir=store_dir,
                                  predictor=predictor, prefetch_depth=2, **extra))
    assert_same_outputs(off, plain)
    t = off["stats"]["totals"]
    assert t["prefetched"] > 0 and t["prefetch_hits"] > 0
    assert t["prefetch_hits"] + t["prefetch_wasted"] <= t["prefetched"]
    assert t["bytes_loaded"] == (t["misses"] + t["prefetched"]) * off["stats"]["pool"]["slot_bytes"]
    assert set(t["predictions"]) == {"1", "2"}
    if predictor == "oracle":  # the future is known exactly
        assert t["predictions"]["1"]["recall"] == 1.0
        assert t["predictions"]["1"]["precision"] == 1.0


def test_sidecar_of_another_model_is_refused(models, sidecars):
    spec = offload_spec(models["qwen3_moe"], pool_slots=HALF, store="host",
                        predictor="lookahead", predictor_path=sidecars["mixtral"])
    with pytest.raises(EngineFailed) as err:
        run_engine(spec)
    assert "was trained for another model" in err.value.output
    assert "train-lookahead" in err.value.output


def test_missing_sidecar_is_refused(models, tmp_path):
    spec = offload_spec(models["qwen3_moe"], pool_slots=HALF, store="host",
                        predictor="lookahead", predictor_path=str(tmp_path / "nope.safetensors"))
    with pytest.raises(EngineFailed) as err:
        run_engine(spec)
    assert "predictor_path" in err.value.output and "does not exist" in err.value.output


def check_replay_of(trace: str, recorded: dict) -> None:
    """The replay tool reads the plugin's own trace; replay with the engine's pool size
    and policy (the default) reproduces the engine's hit and miss counts exactly."""
    from vllm_moe_offload.core.eviction import DEFAULT_POLICY
    from vllm_moe_offload.core.replay import PROFILES, calls_from_records, replay
    from vllm_moe_offload.core.trace import read_trace

    header, records = read_trace(trace)
    assert (header.num_layers, header.experts_per_layer) == (LAYERS, EXPERTS)
    result = replay(calls_from_records(records), HALF, DEFAULT_POLICY,
                    PROFILES["olmoe-1b-7b-pcie4"])
    totals = recorded["stats"]["totals"]
    assert (result.hits, result.misses) == (totals["hits"], totals["misses"])
    out = subprocess.run([sys.executable, "-m", "vllm_moe_offload", "replay", trace,
                          "--pool-slots", str(HALF), "--profile", "mixtral-8x7b-pcie5"],
                         check=True, capture_output=True, text=True).stdout
    assert out.count("| mixtral-8x7b-pcie5 |") == 12  # 6 policies x (none, oracle)
