"""A quantized checkpoint served with offload, through vLLM on CPU (exact).

The checkpoint is compressed-tensors W8A8 INT8 (int8 weights with a scale per
output channel, activations quantized per token), its experts alone quantized,
built here from the tiny bf16 checkpoint. The slot record is what vLLM's own
method makes of one expert. Greedy outputs must match plain vLLM on the same
checkpoint token for token.

vLLM's CPU build runs INT8 MoE only on x86 CPUs with AMX (`CPUExpertsInt8`);
elsewhere plain vLLM itself refuses the checkpoint. So each test runs twice: with
vLLM's kernel (needs AMX) and with int8_reference.py's fp32 torch kernel in its
place, which runs anywhere. In both, plain vLLM and offload run the same kernel.
"""

import pytest
import torch
from safetensors import safe_open

from tests.e2e.conftest import EXPERTS, LAYERS, failure, offload_spec, plain_spec
from vllm_moe_offload.hf.tiny_moe import quantize_experts_int8

METHOD = "CompressedTensorsW8A8Int8MoEMethod"
KERNELS = [pytest.param("reference"),
           pytest.param("vllm", marks=pytest.mark.skipif(
               not torch.cpu._is_amx_tile_supported(),
               reason="needs an x86 CPU with AMX"))]


@pytest.fixture(scope="module")
def int8_models(models, tmp_path_factory):
    base = tmp_path_factory.mktemp("int8")
    return {arch: str(quantize_experts_int8(models[arch], base / arch))
            for arch in ("qwen3_moe", "mixtral")}


def with_kernel(spec: dict, kernel: str) -> dict:
    return {**spec, "setup": "tests.e2e.int8_reference:install"} if kernel == "reference" \
        else spec


def int8_expert_bytes(model: str) -> int:
    """One expert's bytes in the checkpoint: int8 weights and their scales, which
    vLLM keeps as fp32 (the checkpoint's are bf16)."""
    total = 0
    with safe_open(f"{model}/model.safetensors", "pt") as f:
        for name in f.keys():
            if ".experts.0." in name and ".layers.0." in name:
                t = f.get_slice(name)
                n = 1
                for d in t.get_shape():
                    n *= d
                total += n * (4 if name.endswith("_scale") else 1)
    return total


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_int8_checkpoint_with_offload_matches_plain_vllm(int8_models, engine, tmp_path,
                                                         arch, kernel):
    model = int8_models[arch]
    plain = engine(with_kernel(plain_spec(model), kernel))
    off = engine(with_kernel(offload_spec(model, pool_slots=EXPERTS + 2, store="disk",
                                          store_dir=str(tmp_path)), kernel))
    assert off["token_ids"] == plain["token_ids"]
    totals, pool = off["stats"]["totals"], off["stats"]["pool"]
    assert pool["checkpoint_quantization"] == METHOD
    # The slot record is the int8 layout: half the bytes of the bf16 expert.
    assert pool["slot_bytes"] == pool["read_bytes"] == int8_expert_bytes(model)
    assert pool["store_bytes"] == LAYERS * EXPERTS * pool["record_bytes"]
    assert totals["misses"] > EXPERTS and totals["evictions"] > 0
    assert totals["bytes_loaded"] == totals["misses"] * pool["read_bytes"]


def test_int8_store_reused_and_a_damaged_record_re_derived(int8_models, engine, tmp_path):
    model = int8_models["qwen3_moe"]
    plain = engine(with_kernel(plain_spec(model), "reference"))
    spec = with_kernel(offload_spec(model, pool_slots=EXPERTS, store="disk",
                                    store_dir=str(tmp_path)), "reference")
    engine(spec)  # builds the store
    off = engine({**spec, "rounds": 2, "damage_store": "flip"})  # damaged after round 1
    assert "reusing disk store" in off["log"]
    assert off["token_ids"] == plain["token_ids"]  # round 2 read the damaged file
    assert off["stats"]["pool"]["store_repairs"] > 0
    assert "re-derived it from the checkpoint and repaired the record" in off["log"]


def test_online_quantization_with_offload_is_refused_naming_the_method(models):
    out = failure({**offload_spec(models["qwen3_moe"], pool_slots=EXPERTS, store="host"),
                   "quantization": "fp8"})
    assert ("mlp.experts: Fp8PerTensorOnlineMoEMethod quantizes a bf16 checkpoint's "
            "experts as they load") in out
    assert "--expert-store-bits 8" in out
