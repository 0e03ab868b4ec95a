"""One expert read back from the safetensors checkpoint (the store's source of truth)."""

import pytest
import torch

pytest.importorskip("safetensors")  # a bare GPU machine may lack it (scripts/gpu_checks)
from safetensors.torch import save_file  # noqa: E402

from vllm_moe_offload.runtime.checkpoint import CheckpointExperts  # noqa: E402

PREFIX = "model.layers.1.mlp.experts"


def expert(e):
    g = torch.Generator().manual_seed(e)
    return {n: torch.randn(shape, generator=g) for n, shape in
            (("gate_proj", (4, 6)), ("up_proj", (4, 6)), ("down_proj", (6, 4)))}


def test_reads_one_expert_and_finds_moved_files_again(tmp_path):
    save_file({f"{PREFIX}.{e}.{n}.weight": t for e in range(2) for n, t in expert(e).items()},
              tmp_path / "model.safetensors")
    ckpt = CheckpointExperts(tmp_path)
    w13, w2 = ckpt.read(PREFIX, 1)
    want = expert(1)
    assert torch.equal(w13, torch.cat([want["gate_proj"], want["up_proj"]]))
    assert torch.equal(w2, want["down_proj"])
    hidden = tmp_path / "model.safetensors.hidden"
    (tmp_path / "model.safetensors").rename(hidden)
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors weights in"):
        ckpt.read(PREFIX, 0)
    hidden.rename(tmp_path / "model.safetensors")  # back: read again, not a stale index
    assert torch.equal(ckpt.read(PREFIX, 0)[1], expert(0)["down_proj"])
    with pytest.raises(KeyError, match="experts.5.gate_proj.weight"):
        ckpt.read(PREFIX, 5)


def test_a_vision_language_checkpoint_is_read_under_its_own_names(tmp_path):
    """Qwen3.5's released checkpoints (vLLM's Qwen3_5MoeForConditionalGeneration):
    the module `language_model.model.layers.1.mlp.experts` is the checkpoint's
    `model.language_model.layers.1.mlp.experts`, through the model's renaming; an
    MTP layer's experts under the same tail, which the renaming drops, are not it."""
    mtp = {n: t + 1 for n, t in expert(1).items()}
    save_file({f"model.language_model.layers.1.mlp.experts.{e}.{n}.weight": t
               for e in range(2) for n, t in expert(e).items()}
              | {f"mtp.layers.1.mlp.experts.1.{n}.weight": t for n, t in mtp.items()},
              tmp_path / "model.safetensors")

    def rename(name):  # vLLM's WeightsMapper.map_name for this model
        if name.startswith("mtp."):
            return None
        return name.replace("model.language_model.", "language_model.model.")

    module = "language_model.model.layers.1.mlp.experts"
    with pytest.raises(KeyError, match="is not in the checkpoint"):
        CheckpointExperts(tmp_path).read(module, 1)  # without the model's renaming
    ckpt = CheckpointExperts(tmp_path, rename)
    assert ckpt.checkpoint_prefix(module) == "model.language_model.layers.1.mlp.experts"
    w13, w2 = ckpt.read(module, 1)
    want = expert(1)
    assert torch.equal(w13, torch.cat([want["gate_proj"], want["up_proj"]]))
    assert torch.equal(w2, want["down_proj"])
    names = ["down_proj.weight", "gate_proj.weight", "up_proj.weight"]
    assert ckpt.expert_tensor_names(module, 1) == names
    assert torch.equal(ckpt.read_named(module, 0)["up_proj.weight"], expert(0)["up_proj"])
    # a checkpoint that has the module's own names is read under them
    assert ckpt.checkpoint_prefix("mtp.layers.1.mlp.experts") == "mtp.layers.1.mlp.experts"
    # the renaming of a wrapper's inner model (Gemma-4's text class), without the
    # wrapper's `language_model.` and keeping `mtp.*`: the one prefix whose renamed
    # form ends the module's path
    text_class = CheckpointExperts(tmp_path, lambda n: n.replace("model.language_model.",
                                                                 "model."))
    assert text_class.checkpoint_prefix(module) == "model.language_model.layers.1.mlp.experts"
    assert torch.equal(text_class.read(module, 0)[1], expert(0)["down_proj"])
    # never a prefix whose renamed form is another module: the MTP layer's, here
    mtp_only = CheckpointExperts(tmp_path, lambda n: n if n.startswith("mtp.") else None)
    assert mtp_only.checkpoint_prefix(module) == module
    with pytest.raises(KeyError, match="is not in the checkpoint"):
        mtp_only.read(module, 1)


def test_reads_one_expert_of_a_fused_checkpoint(tmp_path):
    """Granite-MoE: input_linear [E, 2I, H] (gate first) and output_linear [E, H, I]."""
    g = torch.Generator().manual_seed(3)
    gate_up, down = torch.randn(3, 8, 6, generator=g), torch.randn(3, 6, 4, generator=g)
    parent = "model.layers.0.block_sparse_moe"
    save_file({f"{parent}.input_linear.weight": gate_up,
               f"{parent}.output_linear.weight": down}, tmp_path / "model.safetensors")
    w13, w2 = CheckpointExperts(tmp_path).read(f"{parent}.experts", 2)
    assert torch.equal(w13, gate_up[2]) and torch.equal(w2, down[2])


def test_reads_one_expert_of_llama4s_transposed_fused_checkpoint(tmp_path):
    """Llama-4: feed_forward.experts.gate_up_proj [E, H, 2I], down_proj [E, I, H]."""
    g = torch.Generator().manual_seed(4)
    gate_up, down = torch.randn(3, 6, 8, generator=g), torch.randn(3, 4, 6, generator=g)
    prefix = "model.layers.0.feed_forward.experts"
    save_file({f"{prefix}.gate_up_proj": gate_up, f"{prefix}.down_proj": down},
              tmp_path / "model.safetensors")
    w13, w2 = CheckpointExperts(tmp_path).read(prefix, 1)
    assert torch.equal(w13, gate_up[1].t()) and torch.equal(w2, down[1].t())


@pytest.mark.parametrize("transposed", [False, True])
def test_fused_tensors_are_oriented_by_their_shapes_not_their_names(tmp_path, transposed):
    """Qwen3.5 stores mlp.experts.gate_up_proj as [E, 2I, H], Qwen3-VL-MoE as
    [E, H, 2I] under the same names; H = 2I, where w13 alone is square."""
    g = torch.Generator().manual_seed(6)
    gate_up, down = torch.randn(3, 8, 8, generator=g), torch.randn(3, 8, 4, generator=g)
    if transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    prefix = "model.language_model.layers.0.mlp.experts"
    save_file({f"{prefix}.gate_up_proj": gate_up.contiguous(),
               f"{prefix}.down_proj": down.contiguous()}, tmp_path / "model.safetensors")
    w13, w2 = CheckpointExperts(tmp_path).read(prefix, 1)
    want = (gate_up[1].t(), down[1].t()) if transposed else (gate_up[1], down[1])
    assert torch.equal(w13, want[0]) and torch.equal(w2, want[1])
    assert w13.shape == (8, 8) and w2.shape == (8, 4)


def test_fused_tensors_of_no_known_shapes_are_an_error(tmp_path):
    prefix = "model.layers.0.mlp.experts"
    save_file({f"{prefix}.gate_up_proj": torch.zeros(2, 6, 5),
               f"{prefix}.down_proj": torch.zeros(2, 6, 4)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"shapes \(6, 5\) and \(6, 4\)"):
        CheckpointExperts(tmp_path).read(prefix, 0)


def test_reads_one_expert_and_its_biases_of_gpt_oss_checkpoint(tmp_path):
    """gpt-oss: mlp.experts.gate_up_proj [E, H, 2I] (gate and up interleaved),
    down_proj [E, I, H], and their biases [E, 2I], [E, H]."""
    g = torch.Generator().manual_seed(5)
    gate_up, down = torch.randn(3, 6, 8, generator=g), torch.randn(3, 4, 6, generator=g)
    b13, b2 = torch.randn(3, 8, generator=g), torch.randn(3, 6, generator=g)
    prefix = "model.layers.0.mlp.experts"
    save_file({f"{prefix}.gate_up_proj": gate_up, f"{prefix}.down_proj": down,
               f"{prefix}.gate_up_proj_bias": b13, f"{prefix}.down_proj_bias": b2},
              tmp_path / "model.safetensors")
    w13, w2, bias13, bias2 = CheckpointExperts(tmp_path).read(prefix, 2)
    assert torch.equal(w13, gate_up[2].t()) and torch.equal(w2, down[2].t())
    assert torch.equal(bias13, b13[2]) and torch.equal(bias2, b2[2])


def test_names_and_reads_one_quantized_expert_tensor_by_tensor(tmp_path):
    tensors = {f"{PREFIX}.{e}.{n}.{part}": torch.full((2, 2), e, dtype=dtype)
               for e in range(11) for n in ("gate_proj", "up_proj", "down_proj")
               for part, dtype in (("weight", torch.int8), ("weight_scale", torch.bfloat16))}
    save_file(tensors, tmp_path / "model.safetensors")
    ckpt = CheckpointExperts(tmp_path)
    names = ckpt.expert_tensor_names(PREFIX, 1)  # not expert 10's: "1." is not "10."
    assert names == sorted(f"{n}.{p}" for n in ("gate_proj", "up_proj", "down_proj")
                           for p in ("weight", "weight_scale"))
    got = ckpt.read_named(PREFIX, 10)
    assert sorted(got) == names
    assert all(torch.equal(t, tensors[f"{PREFIX}.10.{n}"]) for n, t in got.items())
    assert ckpt.expert_tensor_names(PREFIX, 11) == []
    with pytest.raises(KeyError, match=rf"no tensors {PREFIX}.11.\*"):
        ckpt.read_named(PREFIX, 11)


def test_reads_one_expert_row_of_tensors_that_fuse_the_layers_experts(tmp_path):
    """gpt-oss MXFP4: `{prefix}.gate_up_proj_blocks` [E, ...] and the like."""
    tensors = {f"{PREFIX}.{n}": torch.arange(4 * 6, dtype=torch.uint8).view(4, 6) + e
               for e, n in enumerate(("gate_up_proj_blocks", "gate_up_proj_scales",
                                      "down_proj_bias"))}
    tensors[f"{PREFIX}.gate_up_proj_blocks.extra"] = torch.zeros(1)  # not one of them
    save_file(tensors, tmp_path / "model.safetensors")
    ckpt = CheckpointExperts(tmp_path)
    assert ckpt.expert_tensor_names(PREFIX, 0) == []
    assert ckpt.fused_tensor_names(PREFIX) == ["down_proj_bias", "gate_up_proj_blocks",
                                               "gate_up_proj_scales"]
    got = ckpt.read_named(PREFIX, 3)
    assert sorted(got) == ckpt.fused_tensor_names(PREFIX)
    assert all(torch.equal(t, tensors[f"{PREFIX}.{n}"][3]) for n, t in got.items())


def test_shards_that_come_back_or_move_are_indexed_again(tmp_path):
    """A shard missing at the first read (its experts not found) and restored, or
    tensors moved from one shard to another (safetensors' own error): the next read
    indexes the files again and finds them, under the renamed prefix too."""
    names = {f"model.language_model.layers.1.mlp.experts.{e}.{n}.weight": t
             for e in range(2) for n, t in expert(e).items()}
    first = {"model.language_model.embed_tokens.weight": torch.zeros(2, 2)}
    save_file(first, tmp_path / "model-1.safetensors")
    save_file(names, tmp_path / "model-2.safetensors")
    ckpt = CheckpointExperts(tmp_path, lambda n: n.replace("model.language_model.",
                                                           "language_model.model."))
    module = "language_model.model.layers.1.mlp.experts"
    hidden = tmp_path / "model-2.hidden"
    (tmp_path / "model-2.safetensors").rename(hidden)
    with pytest.raises(KeyError, match="is not in the checkpoint"):
        ckpt.read(module, 1)
    hidden.rename(tmp_path / "model-2.safetensors")
    assert torch.equal(ckpt.read(module, 1)[1], expert(1)["down_proj"])
    save_file(first | names, tmp_path / "model-1.safetensors")  # moved to shard 1
    save_file({"lm_head.weight": torch.zeros(2, 2)}, tmp_path / "model-2.safetensors")
    assert torch.equal(ckpt.read(module, 0)[1], expert(0)["down_proj"])
