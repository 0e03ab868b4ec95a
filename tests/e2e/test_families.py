"""MoE families beyond Qwen3-MoE, Mixtral and Qwen2-MoE, served with offload through
vLLM on CPU: token-identical to plain vLLM at the one-layer pool (and some at 50%).

They differ where the capability check (layer.py `capability_problem`) says it
does not matter: routing (sigmoid with a correction bias for GLM-4-MoE, PhiMoE's
sparsemixer), shared experts beside the routed ones (GLM-4-MoE, DeepSeek-V2), a
dense first layer (both), MLA attention (DeepSeek-V2), biased swigluoai experts
whose biases travel in the slot record (gpt-oss), and checkpoint names. Qwen3.5
runs with a stand-in for torchvision (tests/e2e/vision_stub.py)."""

import pytest

from tests.e2e.conftest import (EXPERTS, FAMILIES, LAYERS, SETUP, assert_same_outputs,
                                offload_spec, plain_spec)
from vllm_moe_offload.hf.tiny_moe import FIRST_DENSE, build_tiny_moe


# every family at the one-layer pool (every call loads), the most demanding; at 50%
# the families whose layers differ most (a dense first layer and MLA, hybrid
# attention, biased experts): test_outputs.py runs 50% on the three base archs
# (fewer engines: the suite must stay within CI's 20 minutes)
HALF = ("deepseek_v3", "qwen3_next", "gpt_oss")


@pytest.mark.parametrize("family, pool", [(f, "one_layer") for f in FAMILIES]
                         + [(f, "half") for f in HALF])
def test_family_outputs_match_plain_vllm(models, engine, store_dir, family, pool):
    moe_layers = LAYERS - (family in FIRST_DENSE)
    slots = EXPERTS if pool == "one_layer" else moe_layers * EXPERTS // 2
    extra = {"setup": SETUP[family]} if family in SETUP else {}
    plain = engine(plain_spec(models[family], **extra))
    off = engine({**offload_spec(models[family], pool_slots=slots, store="disk",
                                 store_dir=store_dir), **extra})
    assert_same_outputs(off, plain)
    totals, info = off["stats"]["totals"], off["stats"]["pool"]
    assert (info["num_slots"], info["num_layers"]) == (slots, moe_layers)
    assert set(off["stats"]["layers"]) == {str(l) for l in range(moe_layers)}
    assert totals["evictions"] > 0 and totals["misses"] > slots  # a pool too small
    assert totals["bytes_loaded"] == totals["misses"] * info["slot_bytes"]
    assert info["pool_bytes"] == slots * info["slot_bytes"]


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss", "qwen3_5_moe"])
def test_next_gate_prefetch(models, engine, store_dir, family):
    """The predictor's gates are the MoE layers' own (DeepSeek-V3: layers 1..3 of 4,
    the first is dense), ranked by raw router logits (DeepSeek-V3's grouped, biased
    choice and gpt-oss's router bias are not modelled: prefetch only; Qwen3.5's
    layers alternate linear and full attention)."""
    moe_layers = LAYERS - (family in FIRST_DENSE)
    extra = {"setup": SETUP[family]} if family in SETUP else {}
    plain = engine(plain_spec(models[family], **extra))
    off = engine({**offload_spec(models[family], pool_slots=moe_layers * EXPERTS // 2,
                                 store="disk", store_dir=store_dir, predictor="next-gate"),
                  **extra})
    assert off["token_ids"] == plain["token_ids"]
    totals = off["stats"]["totals"]
    assert totals["prefetched"] > 0 and totals["prefetch_hits"] > 0
    assert 0 < totals["predictions"]["1"]["recall"] < 1


@pytest.mark.parametrize("arch", ["qwen3_5_moe_vl", "gemma4_vl"])
def test_vision_language_class_served_and_re_derived(engine, tmp_path, arch):
    """The classes of the released Qwen3.5 and Gemma-4 MoE checkpoints
    (Qwen3_5MoeForConditionalGeneration, Gemma4ForConditionalGeneration; tiny vision
    towers) with vLLM's --language-model-only: their experts are modules
    `language_model.model.layers.*` that the checkpoint names
    `model.language_model.layers.*` (Gemma-4's fused per layer); a damaged store
    record is read again under the checkpoint's names, and outputs stay plain
    vLLM's."""
    model = str(build_tiny_moe(tmp_path / "model", arch, num_layers=LAYERS,
                               num_experts=EXPERTS))
    extra = {"setup": "tests.e2e.vision_stub:install", "language_model_only": True}
    plain = engine({**plain_spec(model), **extra})
    off = engine({**offload_spec(model, pool_slots=LAYERS * EXPERTS // 2, store="disk",
                                 store_dir=str(tmp_path / "store")),
                  **extra, "rounds": 2, "damage_store": "flip"})
    assert off["token_ids"] == plain["token_ids"]  # round 2 read the damaged file
    assert set(off["stats"]["layers"]) == {str(l) for l in range(LAYERS)}
    assert off["stats"]["pool"]["store_repairs"] > 0
    assert "re-derived it from the checkpoint and repaired the record" in off["log"]
