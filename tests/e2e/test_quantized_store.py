"""A quantized slow tier (store_bits < 16) through vLLM on CPU.

Outputs change by design, so the reference is exact in another way: plain vLLM
serving a copy of the checkpoint whose experts were replaced by their decoded
quantized form. Offload at store_bits = b over the original must match it token for
token: what reaches the slots is exactly the decoded expert, packed by vLLM."""

import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from tests.e2e.conftest import (EXPERTS, LAYERS, assert_same_outputs, failure, offload_spec,
                                plain_spec)
from vllm_moe_offload.core.tasks import TaskProfiles, hot_experts
from vllm_moe_offload.runtime.quant import GroupQuant

NAMES = {"qwen3_moe": ("mlp.experts", ("gate_proj", "up_proj", "down_proj")),
         "mixtral": ("block_sparse_moe.experts", ("w1", "w3", "w2"))}


def dequantized_copy(model: str, arch: str, codec, out) -> str:
    """The checkpoint with every expert replaced by decode(encode(expert)), encoded as
    the store encodes it: w13 = gate ++ up [2I, H] and w2 [H, I]. `codec`: a GroupQuant,
    or (layer, expert) -> GroupQuant (mixed precision)."""
    codec_of = codec if callable(codec) else lambda layer, e: codec
    out = shutil.copytree(model, out)
    weights = load_file(os.path.join(model, "model.safetensors"))
    if arch == "gpt_oss":  # fused [E, H, 2I] and [E, I, H]; biases stay as they are
        for layer in range(LAYERS):
            key = f"model.layers.{layer}.mlp.experts.{{}}".format
            for e in range(EXPERTS):
                w13, w2 = weights[key("gate_up_proj")][e].t(), weights[key("down_proj")][e].t()
                got = [torch.empty_like(w13), torch.empty_like(w2)]
                codec = codec_of(layer, e)
                codec.decode(codec.encode([w13, w2]), got)
                assert not torch.equal(got[0], w13)  # the copy really differs
                weights[key("gate_up_proj")][e] = got[0].t()
                weights[key("down_proj")][e] = got[1].t()
    module, (gate, up, down) = NAMES.get(arch, (None, (None,) * 3))
    for layer in range(LAYERS if module else 0):
        for e in range(EXPERTS):
            key = f"model.layers.{layer}.{module}.{e}.{{}}.weight".format
            w13 = torch.cat([weights[key(gate)], weights[key(up)]])
            w2 = weights[key(down)]
            got = [torch.empty_like(w13), torch.empty_like(w2)]
            codec = codec_of(layer, e)
            codec.decode(codec.encode([w13, w2]), got)
            assert not torch.equal(got[0], w13)  # the copy really differs
            weights[key(gate)], weights[key(up)] = got[0].chunk(2)
            weights[key(down)] = got[1]
    save_file({k: v.contiguous() for k, v in weights.items()},
              os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return str(out)


def check_bytes(off, bits, group):
    """A miss moves the encoded expert: codes, then a fp16 scale and zero per group."""
    totals, info = off["stats"]["totals"], off["stats"]["pool"]
    values = info["slot_bytes"] // 2  # bf16 slots (no padding at these sizes)
    assert info["store_bits"] == bits
    assert info["read_bytes"] == values * bits // 8 + 4 * values // group
    assert totals["misses"] > EXPERTS and totals["evictions"] > 0
    assert totals["bytes_loaded"] == totals["misses"] * info["read_bytes"]


def test_4_bit_disk_store_matches_plain_vllm_on_the_decoded_checkpoint(
        models, engine, store_dir, tmp_path):
    codec = GroupQuant(4, 64, "hqq")
    ref = dequantized_copy(models["qwen3_moe"], "qwen3_moe", codec, tmp_path / "dq")
    plain = engine(plain_spec(ref))
    off = engine(offload_spec(models["qwen3_moe"], pool_slots=EXPERTS, store="disk",
                              store_dir=store_dir, store_bits=4))
    assert_same_outputs(off, plain)
    check_bytes(off, 4, 64)
    info = off["stats"]["pool"]
    # The file holds quantized records: header, records, one checksum each.
    assert os.path.getsize(info["store_path"]) == 4096 + LAYERS * EXPERTS * (
        info["record_bytes"] + 8)
    assert info["store_bytes"] < LAYERS * EXPERTS * info["slot_bytes"] / 2
    exact = engine(plain_spec(models["qwen3_moe"]))
    assert exact["token_ids"] != plain["token_ids"]  # 4 bits do change this model


def test_3_bit_round_to_nearest_host_store_at_half(models, engine, tmp_path):
    codec = GroupQuant(3, 32, "rtn")
    ref = dequantized_copy(models["mixtral"], "mixtral", codec, tmp_path / "dq")
    plain = engine(plain_spec(ref))
    off = engine(offload_spec(models["mixtral"], pool_slots=LAYERS * EXPERTS // 2,
                              store="host", store_bits=3, store_group_size=32,
                              store_quantizer="rtn"))
    assert_same_outputs(off, plain)
    check_bytes(off, 3, 32)


def test_mixed_precision_keeps_the_profiled_hot_experts_at_8_bits(
        models, engine, store_dir, tmp_path):
    """2 bits, with the quarter of each layer's experts that the task profiles rank
    hot at 8: token-identical to plain vLLM on the checkpoint decoded the same way."""
    profiles = TaskProfiles(LAYERS, EXPERTS)
    g = torch.Generator().manual_seed(7)
    for layer in range(LAYERS):
        for task in ("code", "prose"):
            counts = torch.randint(0, 50, (EXPERTS,), generator=g).tolist()
            for e, n in enumerate(counts):
                for _ in range(n):
                    profiles.record(task, layer, [e])
    profiles.save(tmp_path / "profiles.json")
    hot = {(k.layer, k.expert) for k in hot_experts(profiles, 0.25)}
    assert len(hot) == LAYERS * EXPERTS // 4
    codecs = {8: GroupQuant(8, 64), 2: GroupQuant(2, 64)}
    ref = dequantized_copy(models["qwen3_moe"], "qwen3_moe",
                           lambda layer, e: codecs[8 if (layer, e) in hot else 2],
                           tmp_path / "dq")
    plain = engine(plain_spec(ref))
    off = engine(offload_spec(models["qwen3_moe"], pool_slots=EXPERTS, store="disk",
                              store_dir=store_dir, store_bits=2, store_hot_bits=8,
                              task_profiles_path=str(tmp_path / "profiles.json")))
    assert_same_outputs(off, plain)
    totals, info = off["stats"]["totals"], off["stats"]["pool"]
    values = info["slot_bytes"] // 2
    hot_read, cold_read = values + 4 * values // 64, values // 4 + 4 * values // 64
    assert (info["hot_experts"], info["hot_read_bytes"], info["read_bytes"]) == (
        len(hot), hot_read, cold_read)
    # Each file holds its own experts alone: header, records, one checksum each.
    hot_file, cold_file = info["hot_store_path"], info["store_path"]
    assert os.path.getsize(hot_file) == 4096 + len(hot) * (
        -(-hot_read // 4096) * 4096 + 8)
    assert os.path.getsize(cold_file) == 4096 + (LAYERS * EXPERTS - len(hot)) * (
        info["record_bytes"] + 8)
    # Every miss moved its own expert's bytes: some hot, some cold.
    misses, moved = totals["misses"], totals["bytes_loaded"]
    hot_misses, rest = divmod(moved - misses * cold_read, hot_read - cold_read)
    assert rest == 0 and 0 < hot_misses < misses


def test_a_group_size_that_does_not_divide_the_experts_is_refused(models):
    spec = offload_spec(models["qwen3_moe"], pool_slots=EXPERTS, store="host", store_bits=4,
                        store_group_size=48)
    out = failure(spec)
    assert "store_group_size=48" in out and "input dimension 128" in out
    assert "--expert-store-group-size to 64" in out


def test_biased_experts_keep_their_biases_in_a_quantized_store(models, engine, tmp_path):
    """gpt-oss: w13/w2 quantized, biases kept as they are, in the same record."""
    codec = GroupQuant(4, 64, "hqq")
    ref = dequantized_copy(models["gpt_oss"], "gpt_oss", codec, tmp_path / "dq")
    plain = engine(plain_spec(ref))
    off = engine(offload_spec(models["gpt_oss"], pool_slots=EXPERTS, store="host",
                              store_bits=4))
    assert_same_outputs(off, plain)
    totals, info = off["stats"]["totals"], off["stats"]["pool"]
    values = 3 * 128 * 128  # w13 [256, 128] and w2 [128, 128]
    biases = (256 + 128) * 2  # bf16, as they are
    assert info["read_bytes"] == values * 4 // 8 + 4 * values // 64 + biases
    assert totals["bytes_loaded"] == totals["misses"] * info["read_bytes"]
