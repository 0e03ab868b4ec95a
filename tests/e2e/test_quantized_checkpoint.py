"""Quantized checkpoints served with offload, through vLLM on CPU (exact).

Seven checkpoints, their experts alone quantized, built here from the tiny bf16
checkpoints: compressed-tensors W8A8 INT8 (int8 weights with a scale per output
channel, activations quantized per token) and W4A16 (int4 weights packed in int32,
a scale per group of 64), GPTQ (4 bits, groups of 64), AWQ (4 bits with zero
points, groups of 64), block FP8 in the `fp8` format (DeepSeek-V3's, Qwen3-FP8's)
and in compressed-tensors' (float8_e4m3fn weights, a scale per 128 x 128 block),
each on Qwen3-MoE and Mixtral; and gpt-oss's MXFP4 (E2M1 codes with a power-of-two
scale per 32 inputs, biased experts, each layer's experts fused in one tensor).
The slot record is what vLLM's own method makes of one expert. Greedy outputs must
match plain vLLM on the same checkpoint token for token.

vLLM's CPU build runs INT8, INT4, block-FP8 and MXFP4 MoE only on x86 CPUs with AMX
(`CPUExpertsInt8`, `CPUExpertsInt4`, `CPUExpertsFp8`, `CPUExpertsMxfp4`); elsewhere
plain vLLM itself refuses these checkpoints. So each test runs twice: with vLLM's
kernels (needs AMX) and with quant_reference.py's fp32 torch kernels in their place,
which run anywhere. In both, plain vLLM and offload run the same kernel.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.e2e.conftest import (EXPERTS, LAYERS, assert_same_outputs, failure, offload_spec,
                                plain_spec)
from vllm_moe_offload.hf.quantize import quantize_experts

METHOD = {"w8a8": "CompressedTensorsW8A8Int8MoEMethod",
          "w4a16": "CompressedTensorsWNA16MoEMethod", "gptq": "AutoGPTQMoEMethod",
          "awq": "AutoAWQMoEMethod", "fp8": "Fp8MoEMethod",
          "w8a8_fp8": "CompressedTensorsW8A8Fp8MoEMethod", "mxfp4": "GptOssMxfp4MoEMethod"}
# (scheme, architecture): MXFP4 is gpt-oss's own format
CASES = [(scheme, arch) for scheme in sorted(METHOD) if scheme != "mxfp4"
         for arch in ("qwen3_moe", "mixtral")] + [("mxfp4", "gpt_oss")]
REPAIR = {scheme: "gpt_oss" if scheme == "mxfp4" else "qwen3_moe" for scheme in METHOD}
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
            for scheme, arch in CASES}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A disk store directory per checkpoint and kernel, shared by the tests of this
    module: the store-reuse test starts from the engine the first test ran."""
    base = tmp_path_factory.mktemp("quantized_stores")
    return lambda *key: str(base / "-".join(key))


def offload(model: str, store_dir: str, kernel: str) -> dict:
    return with_kernel(offload_spec(model, pool_slots=EXPERTS + 2, store="disk",
                                    store_dir=store_dir), kernel)


def with_kernel(spec: dict, kernel: str) -> dict:
    return {**spec, "setup": "tests.e2e.quant_reference:install"} if kernel == "reference" \
        else spec


def reference_record_bytes(scheme: str) -> int:
    """One expert's slot record with the reference kernels, by vLLM's method:
    W8A8: int8 w13 [2I, H] and w2 [H, I], fp32 scales [2I, 1] and [H, 1].
    W4A16: int32 words of 8 nibbles, bf16 scales per 64 inputs, `weight_shape`
    [2] per matrix (vLLM makes it in the model's dtype, bf16) and the reference's
    int32 zero point per matrix. GPTQ: as W4A16 with fp16 scales, no shapes. AWQ:
    as GPTQ with an int32 zero point per group, unpacked by the reference. FP8:
    float8 w13 and w2, an fp32 scale per 128 x 128 block ([2I / 128, H / 128] and
    [H / 128, I / 128]), whichever dtype the checkpoint holds them in. MXFP4: two
    codes per byte, a uint8 scale per 32 values, fp32 biases [2I] and [H] (vLLM's
    CPU processing widens them)."""
    values = 3 * H * I
    if scheme == "mxfp4":
        return values // 2 + values // 32 + 4 * (2 * I + H)
    if scheme == "w8a8":
        return values + 4 * (2 * I + H)
    if scheme in ("fp8", "w8a8_fp8"):
        return values + 4 * values // 128 ** 2
    if scheme == "awq":
        return values // 2 + 2 * values // 64 + 4 * values // 64
    shapes = 2 * 2 * 2 if scheme == "w4a16" else 0
    return values // 2 + 2 * values // 64 + shapes + 2 * 4


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("scheme,arch", CASES)
def test_quantized_checkpoint_with_offload_matches_plain_vllm(
        quantized_models, engine, stores, scheme, arch, kernel):
    model = quantized_models[arch, scheme]
    plain = engine(with_kernel(plain_spec(model), kernel))
    off = engine(offload(model, stores(arch, scheme, kernel), kernel))
    assert_same_outputs(off, plain)
    totals, pool = off["stats"]["totals"], off["stats"]["pool"]
    assert pool["checkpoint_quantization"] == METHOD[scheme]
    # A miss moves the quantized record, not a bf16 expert.
    assert pool["slot_bytes"] == pool["read_bytes"] < BF16_EXPERT * 0.55
    if kernel == "reference":
        assert pool["slot_bytes"] == reference_record_bytes(scheme)
    assert pool["store_bytes"] == LAYERS * EXPERTS * pool["record_bytes"]
    assert totals["misses"] > EXPERTS and totals["evictions"] > 0
    assert totals["bytes_loaded"] == totals["misses"] * pool["read_bytes"]


@pytest.mark.parametrize("scheme", sorted(REPAIR))
def test_store_reused_and_a_damaged_record_re_derived(quantized_models, engine, stores,
                                                      scheme):
    """MXFP4 (gpt-oss): the record is re-derived from rows of the fused tensors."""
    arch = REPAIR[scheme]
    model = quantized_models[arch, scheme]
    plain = engine(with_kernel(plain_spec(model), "reference"))
    spec = offload(model, stores(arch, scheme, "reference"), "reference")
    engine(spec)  # builds the store (the first test's engine, where it ran)
    off = engine({**spec, "rounds": 2, "damage_store": "flip"})  # damaged after round 1
    assert "reusing disk store" in off["log"]
    assert_same_outputs(off, plain)  # round 2 read the damaged file
    assert off["stats"]["pool"]["store_repairs"] > 0
    assert "re-derived it from the checkpoint and repaired the record" in off["log"]


def other_kernel():
    """Engine setup: a host whose vLLM processes a quantized expert for another
    kernel class, all else equal (layer.py `_kernel_of`)."""
    from vllm_moe_offload.integration.vllm import layer

    layer._kernel_of = lambda method: "AnotherMethod/AnotherExperts"


def test_a_quantized_store_of_another_kernel_is_not_reused(quantized_models, engine,
                                                           stores, tmp_path):
    """A quantized checkpoint's record is what vLLM's processing makes for the kernel
    it picked: a store built for another kernel class is another file."""
    import shutil

    model = quantized_models["qwen3_moe", "w4a16"]
    plain = engine(with_kernel(plain_spec(model), "reference"))
    built = stores("qwen3_moe", "w4a16", "reference")
    engine(offload(model, built, "reference"))  # (the first test's engine, where it ran)
    shared = shutil.copytree(built, tmp_path / "shared")
    spec = offload(model, str(shared), "reference")
    other = engine({**spec, "setup": spec["setup"] + ",tests.e2e.test_quantized_checkpoint"
                    ":other_kernel"})
    assert "reusing disk store" not in other["log"]
    assert other["token_ids"] == plain["token_ids"]
    assert len(list(shared.glob("*.experts"))) == 2


def test_gptq_expert_biases_kept_when_the_store_is_reused(quantized_models, engine,
                                                           tmp_path):
    """Some GPTQ checkpoints hold expert biases their architecture does not declare;
    vLLM's AutoGPTQ method keeps a layer's biases only where a loader call named them.
    With a reused disk store no expert of a layer is loaded, and its record must
    still hold them (before: the layout check stopped the start)."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "gptq-biases"
    shutil.copytree(quantized_models["qwen3_moe", "gptq"], model)
    weights = load_file(model / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for name in [n for n in weights if n.endswith(".qweight") and ".experts." in n]:
        rows = I if "down_proj" not in name else H
        weights[name.replace(".qweight", ".bias")] = (
            torch.randn(rows, generator=g) * 0.05).to(torch.bfloat16)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    plain = engine(with_kernel(plain_spec(str(model)), "reference"))
    spec = offload(str(model), str(tmp_path / "store"), "reference")
    built = engine(spec)
    reused = engine({**spec, "rounds": 1})
    assert "reusing disk store" in reused["log"]
    assert built["token_ids"] == reused["token_ids"] == plain["token_ids"]
    # the record holds the biases: [2I] and [H] in the model's dtype
    assert reused["stats"]["pool"]["slot_bytes"] == \
        reference_record_bytes("gptq") + 2 * (2 * I + H)


def test_a_checkpoint_under_released_qwen3_5_names(models, engine, tmp_path):
    """Released Qwen3.5 checkpoints (their GPTQ and FP8 ones too) name the text stack
    `model.language_model.*`, which vLLM renames as it loads: the loader calls that
    make one expert, and a damaged record's repair, are found under the
    checkpoint's names (before, the expert looked fused and offload was refused)."""
    from safetensors.torch import load_file, save_file

    from tests.e2e.conftest import SETUP

    model = quantize_experts(models["qwen3_5_moe"], tmp_path / "model", "w4a16")
    weights = load_file(str(model / "model.safetensors"))
    save_file({k.replace("model.", "model.language_model.", 1): v
               for k, v in weights.items()}, str(model / "model.safetensors"),
              metadata={"format": "pt"})
    setup = {"setup": SETUP["qwen3_5_moe"] + ",tests.e2e.quant_reference:install"}
    plain = engine({**plain_spec(str(model)), **setup})
    off = engine({**offload_spec(str(model), pool_slots=EXPERTS + 2, store="disk",
                                 store_dir=str(tmp_path / "store")),
                  **setup, "rounds": 2, "damage_store": "flip"})
    assert_same_outputs(off, plain)  # round 2 read the damaged file
    assert off["stats"]["pool"]["store_repairs"] > 0
    assert METHOD["w4a16"] in off["log"]


def test_online_quantization_with_offload_is_refused_naming_the_method(models):
    """With store_bits below 16 too: its fix is to drop --quantization and keep
    store_bits (before, that case was told to set store_bits 16, and then to add it)."""
    out = failure({**offload_spec(models["qwen3_moe"], pool_slots=EXPERTS, store="host",
                                  store_bits=4), "quantization": "fp8"})
    assert ("mlp.experts: Fp8PerTensorOnlineMoEMethod quantizes a bf16 checkpoint's "
            "experts as they load") in out
    assert "--expert-store-bits 8" in out and "already quantized" not in out


def test_store_bits_on_an_already_quantized_checkpoint_is_refused(quantized_models):
    spec = offload_spec(quantized_models[("qwen3_moe", "w4a16")], pool_slots=EXPERTS,
                        store="host", store_bits=4)
    out = failure(with_kernel(spec, "reference"))
    assert "store_bits=4" in out and "already quantized" in out
    assert "--expert-store-bits 16" in out


def agreement(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(x == y for p, q in zip(a, b) for x, y in zip(p, q))


def test_the_references_compute_the_quantized_model(quantized_models, models, engine):
    """A check on quant_reference.py itself, through plain vLLM: W4A16 and GPTQ hold
    the same 4-bit values in different layouts, and the two FP8 formats the same
    FP8 values and scales, so each pair must give the same greedy tokens; and
    every quantized checkpoint must track the bf16 model (a wrong decode agrees on
    almost nothing). `pytest -s` prints the agreement."""
    bf16 = engine(plain_spec(models["qwen3_moe"]))["token_ids"]
    tokens = {scheme: engine(with_kernel(plain_spec(quantized_models["qwen3_moe", scheme]),
                                         "reference"))["token_ids"]
              for scheme in METHOD if scheme != "mxfp4"}
    assert tokens["w4a16"] == tokens["gptq"]
    assert tokens["fp8"] == tokens["w8a8_fp8"]
    total = sum(len(t) for t in bf16)
    for scheme, ids in tokens.items():
        same = agreement(bf16, ids)
        print(f"{scheme}: {same} of {total} greedy tokens equal to the bf16 model's")
        assert same > total // 2, (scheme, same, total)


def test_the_mxfp4_reference_computes_the_decoded_model(quantized_models, engine,
                                                        tmp_path):
    """MXFP4 against the same weights decoded to bf16 by transformers' own gpt-oss
    decoder (E2M1 times a power of two is exact in bf16) and run by vLLM's own
    bf16 CPU kernel: a wrong nibble order, scale, interleave or activation changes
    the first token already. This random model's near-ties let bf16 and fp32
    activations part later, so beyond the first token only a third is asserted
    (`pytest -s` prints it)."""
    model = quantized_models["gpt_oss", "mxfp4"]
    mxfp4 = engine(with_kernel(plain_spec(model), "reference"))["token_ids"]
    decoded = engine(plain_spec(str(decode_mxfp4(Path(model), tmp_path / "decoded"))))
    same = agreement(mxfp4, decoded["token_ids"])
    total = sum(len(t) for t in mxfp4)
    print(f"mxfp4: {same} of {total} greedy tokens equal to its decoded bf16 model's")
    assert [t[0] for t in mxfp4] == [t[0] for t in decoded["token_ids"]]
    assert same > total // 3, (same, total)


def decode_mxfp4(src: Path, out: Path) -> Path:
    """A bf16 gpt-oss checkpoint holding the MXFP4 checkpoint's experts, decoded by
    transformers (`convert_moe_packed_tensors`, what it runs to load gpt-oss)."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    out.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    for f in src.glob("*.safetensors"):
        shard, tensors = load_file(f), {}
        for name, t in shard.items():
            if name.endswith("_blocks"):  # [E, out, in / 32, 16] -> bf16 [E, in, out]
                stem = name[:-len("_blocks")]
                tensors[stem] = convert_moe_packed_tensors(t, shard[stem + "_scales"])
            elif not name.endswith("_scales"):
                tensors[name] = t
        save_file(tensors, out / f.name, metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    return out
