"""Routing captured from HF runs (predictor training and evaluation) is the model's
own choice in every family tested end to end: dense layers skipped, sigmoid scores
with a correction bias (GLM-4-MoE) and grouped top-k (DeepSeek-V3) applied, and the
checkpoint's router names found (load_gates)."""

import pytest
import torch

from vllm_moe_offload.hf.routing import capture, load_model
from vllm_moe_offload.hf.tiny_moe import FIRST_DENSE, build_tiny_moe
from vllm_moe_offload.runtime.predictors import load_gates


@pytest.mark.parametrize("family", ["glm4_moe", "deepseek_v2", "deepseek_v3", "olmoe",
                                    "phimoe", "granitemoe", "qwen3_next", "ernie4_5_moe",
                                    "gpt_oss"])
def test_captured_experts_are_the_ones_the_model_ran(tmp_path, family):
    path = build_tiny_moe(tmp_path / family, family, num_layers=3)
    model, tokenizer = load_model(str(path))
    check_capture(model, tokenizer, family)
    assert len(load_gates(path)) == 3 - (family in FIRST_DENSE)


def test_deepseek_v2_group_limited_routing_is_captured(tmp_path):
    """DeepSeek-V2 and V2.5 route with `group_limited_greedy` (the best 3 of 8 expert
    groups, a group scoring its best expert) and no correction bias; the tiny
    checkpoint routes greedily, so its routers are switched here."""
    path = build_tiny_moe(tmp_path / "deepseek_v2", "deepseek_v2", num_layers=3)
    model, tokenizer = load_model(str(path))
    for layer in model.model.layers[1:]:
        gate = layer.mlp.gate
        gate.topk_method, gate.num_group, gate.topk_group = "group_limited_greedy", 4, 1
    check_capture(model, tokenizer, "deepseek_v2")


def check_capture(model, tokenizer, family):
    ran = []  # the experts modules' own top-k ids, in call order
    blocks = [getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
              for layer in model.model.layers]
    hooks = [block.experts.register_forward_hook(
        lambda m, args, out: ran.append(args[1].reshape(-1, args[1].shape[-1])))
        for block in blocks if hasattr(block, "experts")]
    routing = capture(model, tokenizer, "def add(a, b):\n    return a + b\n" * 4, 64)
    for h in hooks:
        h.remove()
    moe_layers = 3 - (family in FIRST_DENSE)
    assert routing.num_layers == len(ran) == moe_layers
    for got, want in zip(routing.expert_ids, ran):
        assert torch.equal(got.sort(-1).values, want.sort(-1).values)


def test_a_checkpoint_without_routers_says_what_to_do(tmp_path):
    path = build_tiny_moe(tmp_path / "dense", "llama", num_layers=2)
    with pytest.raises(ValueError, match="use --expert-predictor none"):
        load_gates(path)
    model, tokenizer = load_model(str(path))
    with pytest.raises(ValueError, match="the predictors do not support it yet"):
        capture(model, tokenizer, "def f(): pass", 16)


def test_llama4_routers_are_read(tmp_path):
    """Llama-4 routes top-1 by its router's logits (feed_forward.router)."""
    path = build_tiny_moe(tmp_path / "llama4", "llama4", num_layers=2)
    gates = load_gates(path)
    assert len(gates) == 2 and gates[0].shape == (8, 128)
    model, tokenizer = load_model(str(path))
    model.config.attention_chunk_size = 1024  # HF always masks by chunks; vLLM runs None
    routing = capture(model, tokenizer, "def add(a, b): return a + b", 16)
    assert routing.num_layers == 2 and routing.top_k == 1


def test_routers_of_a_vision_language_checkpoint_are_read(tmp_path):
    """Released Qwen3.5 checkpoints are Qwen3_5MoeForConditionalGeneration, whose
    decoder is `model.language_model.layers.N` (num_hidden_layers in text_config)."""
    path = build_tiny_moe(tmp_path / "vl", "qwen3_5_moe_vl", num_layers=2, num_experts=4)
    gates = load_gates(path)
    assert [g.shape for g in gates] == [(4, 128)] * 2


def test_a_tiny_checkpoint_records_what_was_built_and_a_stopped_rebuild_is_not_reused(
        tmp_path, monkeypatch):
    """Llama-4 is built top-1 whatever was asked, and its marker said top_k 2; a
    rebuild for another spec that stopped midway left the old marker beside the
    half-written files, and the old spec's next call returned them."""
    import json

    from transformers import PreTrainedModel

    path = build_tiny_moe(tmp_path / "m", "llama4", num_layers=2, top_k=2)
    assert json.loads((path / "tiny_moe.json").read_text())["top_k"] == 1

    def stops(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", stops)
    with pytest.raises(KeyboardInterrupt):
        build_tiny_moe(tmp_path / "m", "llama4", num_layers=3)
    assert not (path / "tiny_moe.json").exists()
