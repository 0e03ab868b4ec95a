"""Quantized checkpoints served with offload, through vLLM on CPU (exact).

Four checkpoints, their experts alone quantized, built here from the tiny bf16
checkpoints: compressed-tensors W8A8 INT8 (int8 weights with a scale per output
channel, activations quantized per token) and W4A16 (int4 weights packed in int32,
a scale per group of 64), GPTQ (4 bits, groups of 64) and AWQ (4 bits with zero
points, groups of 64). The slot record is what
vLLM's own method makes of one expert. Greedy outputs must match plain vLLM on the
same checkpoint token for token.

vLLM's CPU build runs INT8 and INT4 MoE only on x86 CPUs with AMX
(`CPUExpertsInt8`, `CPUExpertsInt4`); elsewhere plain vLLM itself refuses these
checkpoints. So each test runs twice: with vLLM's kernels (needs AMX) and with
quant_reference.py's fp32 torch kernels in their place, which run anywhere. In
both, plain vLLM and offload run the same kernel.
"""

import pytest
import torch

from tests.e2e.conftest import EXPERTS, LAYERS, failure, offload_spec, plain_spec
from vllm_moe_offload.hf.tiny_moe import quantize_experts

METHOD = {"w8a8": "CompressedTensorsW8A8Int8MoEMethod",
          "w4a16": "CompressedTensorsWNA16MoEMethod", "gptq": "AutoGPTQMoEMethod",
          "awq": "AutoAWQMoEMethod"}
KERNELS = [pytest.param("reference"),
           pytest.param("vllm", marks=pytest.mark.skipif(
               not torch.cpu._is_amx_tile_supported(),
               reason="needs an x86 CPU with AMX"))]
H = I = 128  # the tiny checkpoints' hidden and expert sizes
BF16_EXPERT = 2 * 3 * H * I


@pytest.fixture(scope="module")
def quantized_models(models, tmp_path_factory):
    base = tmp_path_factory.mktemp("quantized")
    return {(arch, scheme): str(quantize_experts(models[arch], base / f"{arch}-{scheme}",
                                                 scheme))
            for arch in ("qwen3_moe", "mixtral") for scheme in METHOD}


def with_kernel(spec: dict, kernel: str) -> dict:
    return {**spec, "setup": "tests.e2e.quant_reference:install"} if kernel == "reference" \
        else spec


def reference_record_bytes(scheme: str) -> int:
    """One expert's slot record with the reference kernels, by vLLM's method:
    W8A8: int8 w13 [2I, H] and w2 [H, I], fp32 scales [2I, 1] and [H, 1].
    W4A16: int32 words of 8 nibbles, bf16 scales per 64 inputs, `weight_shape`
    [2] per matrix (vLLM makes it in the model's dtype, bf16) and the reference's
    int32 zero point per matrix. GPTQ: as W4A16 with fp16 scales, no shapes. AWQ:
    as GPTQ with an int32 zero point per group, unpacked by the reference."""
    values = 3 * H * I
    if scheme == "w8a8":
        return values + 4 * (2 * I + H)
    if scheme == "awq":
        return values // 2 + 2 * values // 64 + 4 * values // 64
    shapes = 2 * 2 * 2 if scheme == "w4a16" else 0
    return values // 2 + 2 * values // 64 + shapes + 2 * 4


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("scheme", sorted(METHOD))
def test_quantized_checkpoint_with_offload_matches_plain_vllm(
        quantized_models, engine, tmp_path, scheme, arch, kernel):
    model = quantized_models[arch, scheme]
    plain = engine(with_kernel(plain_spec(model), kernel))
    off = engine(with_kernel(offload_spec(model, pool_slots=EXPERTS + 2, store="disk",
                                          store_dir=str(tmp_path)), kernel))
    assert off["token_ids"] == plain["token_ids"]
    totals, pool = off["stats"]["totals"], off["stats"]["pool"]
    assert pool["checkpoint_quantization"] == METHOD[scheme]
    # A miss moves the quantized record, not a bf16 expert.
    assert pool["slot_bytes"] == pool["read_bytes"] < BF16_EXPERT * 0.55
    if kernel == "reference":
        assert pool["slot_bytes"] == reference_record_bytes(scheme)
    assert pool["store_bytes"] == LAYERS * EXPERTS * pool["record_bytes"]
    assert totals["misses"] > EXPERTS and totals["evictions"] > 0
    assert totals["bytes_loaded"] == totals["misses"] * pool["read_bytes"]


@pytest.mark.parametrize("scheme", sorted(METHOD))
def test_store_reused_and_a_damaged_record_re_derived(quantized_models, engine, tmp_path,
                                                      scheme):
    model = quantized_models["qwen3_moe", scheme]
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


def test_the_references_compute_the_quantized_model(quantized_models, models, engine):
    """A check on quant_reference.py itself, through plain vLLM: W4A16 and GPTQ hold
    the same 4-bit values in different layouts, so they must give the same greedy
    tokens; and every quantized checkpoint must track the bf16 model (a wrong
    decode agrees on almost nothing). `pytest -s` prints the agreement."""
    bf16 = engine(plain_spec(models["qwen3_moe"]))["token_ids"]
    tokens = {scheme: engine(with_kernel(plain_spec(quantized_models["qwen3_moe", scheme]),
                                         "reference"))["token_ids"] for scheme in METHOD}
    assert tokens["w4a16"] == tokens["gptq"]
    total = sum(len(t) for t in bf16)
    for scheme, ids in tokens.items():
        same = sum(a == b for x, y in zip(bf16, ids) for a, b in zip(x, y))
        print(f"{scheme}: {same} of {total} greedy tokens equal to the bf16 model's")
        assert same > total // 2, (scheme, same, total)
