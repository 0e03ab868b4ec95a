"""Tiny MoE checkpoints built on the spot, for tests, the demo and benchmarks.

No hub access is needed: the config comes from transformers, the weights are
random (seeded), and the tokenizer is a byte-level BPE trained with `tokenizers`
on a few built-in sentences.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# transformers model types; "llama" is dense (the refusal tests)
ARCHITECTURES = ("qwen3_moe", "mixtral", "qwen2_moe", "olmoe", "glm4_moe", "deepseek_v2",
                 "deepseek_v3", "phimoe", "granitemoe", "qwen3_next", "ernie4_5_moe",
                 "llama4", "gpt_oss", "gemma4", "qwen3_5_moe", "qwen3_5_moe_vl", "gemma4_vl",
                 "llama")
VLLM_ARCHITECTURE = {"phimoe": "PhiMoEForCausalLM"}  # where vLLM spells it differently
# MoE families whose first layer is dense (first_k_dense_replace = 1)
FIRST_DENSE = ("glm4_moe", "deepseek_v2", "deepseek_v3", "ernie4_5_moe")

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture of experts models route each token to a few experts.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "Expert offloading keeps only a bounded pool of experts in fast memory.",
    "The licence grants permission to use, copy and modify the software.",
    "In the beginning the world was quiet, and the river ran to the sea.",
    "int main(void) { return 0; }",
]


def _train_tokenizer(out_dir: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(out_dir)


def _config(arch: str, **sizes):
    from transformers import (DeepseekV2Config, DeepseekV3Config, Ernie4_5_MoeConfig,
                              Gemma4TextConfig, Glm4MoeConfig, GptOssConfig,
                              GraniteMoeConfig, Llama4TextConfig, LlamaConfig, MixtralConfig,
                              OlmoeConfig, PhimoeConfig, Qwen2MoeConfig, Qwen3MoeConfig,
                              Qwen3_5MoeTextConfig, Qwen3NextConfig)

    common = dict(
        vocab_size=sizes["vocab_size"],
        hidden_size=sizes["hidden_size"],
        num_hidden_layers=sizes["num_layers"],
        num_attention_heads=sizes["hidden_size"] // 64,
        num_key_value_heads=max(1, sizes["hidden_size"] // 128),
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    experts, top_k, ffn = sizes["num_experts"], sizes["top_k"], sizes["expert_ffn"]
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(
            **common, head_dim=64, num_experts=experts, num_experts_per_tok=top_k,
            moe_intermediate_size=ffn, intermediate_size=ffn, norm_topk_prob=True,
            decoder_sparse_step=1, mlp_only_layers=[],
        )
    if arch == "mixtral":
        return MixtralConfig(
            **common, head_dim=64, num_local_experts=experts,
            num_experts_per_tok=top_k, intermediate_size=ffn,
        )
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(
            **common, num_experts=experts, num_experts_per_tok=top_k,
            moe_intermediate_size=ffn, shared_expert_intermediate_size=ffn,
            intermediate_size=ffn, norm_topk_prob=False, decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    if arch == "olmoe":
        return OlmoeConfig(**common, num_experts=experts, num_experts_per_tok=top_k,
                           intermediate_size=ffn, norm_topk_prob=False)
    if arch == "glm4_moe":  # sigmoid routing with a correction bias, a shared expert
        return Glm4MoeConfig(
            **common, head_dim=64, n_routed_experts=experts, num_experts_per_tok=top_k,
            moe_intermediate_size=ffn, intermediate_size=ffn, n_shared_experts=1,
            first_k_dense_replace=1, n_group=1, topk_group=1, num_mtp_layers=0,
        )
    if arch in ("deepseek_v2", "deepseek_v3"):
        deepseek = dict(  # MLA sized for vLLM's CPU kernel (kv_lora 512 + rope 64), no GQA
            common, num_key_value_heads=common["num_attention_heads"],
            n_routed_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=ffn,
            intermediate_size=ffn, n_shared_experts=1, first_k_dense_replace=1,
            topk_group=1, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=64,
            qk_rope_head_dim=64, v_head_dim=64)
        if arch == "deepseek_v2":
            return DeepseekV2Config(**deepseek, n_group=1, topk_method="greedy")
        # V3: sigmoid + bias within the best of 2 expert groups
        return DeepseekV3Config(**deepseek, n_group=2, num_mtp_layers=0,
                                topk_method="noaux_tc", scoring_func="sigmoid")
    if arch == "phimoe":  # vLLM registers the name PhiMoE; its attention has biases
        return PhimoeConfig(
            **common, num_local_experts=experts, num_experts_per_tok=2,
            intermediate_size=ffn, attention_bias=True, lm_head_bias=True,
        )
    if arch == "granitemoe":  # experts stored fused: input_linear [E, 2I, H]
        return GraniteMoeConfig(**common, num_local_experts=experts,
                                num_experts_per_tok=top_k, intermediate_size=ffn)
    if arch == "qwen3_next":  # linear-attention (GatedDeltaNet) and full-attention layers
        return Qwen3NextConfig(
            **common, head_dim=64, num_experts=experts, num_experts_per_tok=top_k,
            moe_intermediate_size=ffn, shared_expert_intermediate_size=ffn,
            intermediate_size=ffn, decoder_sparse_step=1, mlp_only_layers=[],
            norm_topk_prob=True, linear_key_head_dim=64, linear_value_head_dim=64,
            linear_num_key_heads=2, linear_num_value_heads=2,
            layer_types=["full_attention" if i % 2 else "linear_attention"
                         for i in range(sizes["num_layers"])],
        )
    if arch == "qwen3_5_moe":  # Qwen3-Next's layout, text only (vLLM's Qwen3_5MoeForCausalLM)
        return Qwen3_5MoeTextConfig(
            **common, head_dim=64, num_experts=experts, num_experts_per_tok=top_k,
            moe_intermediate_size=ffn, shared_expert_intermediate_size=ffn,
            linear_key_head_dim=64, linear_value_head_dim=64, linear_num_key_heads=2,
            linear_num_value_heads=2,
            layer_types=["full_attention" if i % 2 else "linear_attention"
                         for i in range(sizes["num_layers"])],
        )
    if arch == "qwen3_5_moe_vl":  # the released class: a vision tower (tiny) before it
        from transformers import Qwen3_5MoeConfig

        return Qwen3_5MoeConfig(
            text_config=_config("qwen3_5_moe", **sizes).to_dict(),
            vision_config=dict(depth=1, hidden_size=64, intermediate_size=64, num_heads=2,
                               out_hidden_size=sizes["hidden_size"],
                               num_position_embeddings=64, deepstack_visual_indexes=[]),
            tie_word_embeddings=False)
    if arch == "gemma4_vl":  # the released class: a vision tower (tiny) before it
        from transformers import Gemma4Config

        return Gemma4Config(
            text_config=_config("gemma4", **sizes).to_dict(), audio_config=None,
            vision_config=dict(hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2, head_dim=32))
    if arch == "ernie4_5_moe":  # MoE from layer 1 on
        return Ernie4_5_MoeConfig(
            **common, moe_num_experts=experts, moe_k=top_k, moe_intermediate_size=ffn,
            intermediate_size=ffn, moe_num_shared_experts=0, moe_layer_start_index=1,
            moe_layer_end_index=sizes["num_layers"] - 1, moe_layer_interval=1,
        )
    if arch == "llama4":  # top-1, router weight on the input, fused transposed experts
        config = Llama4TextConfig(
            **common, head_dim=64, num_local_experts=experts, num_experts_per_tok=1,
            intermediate_size=ffn, intermediate_size_mlp=ffn, interleave_moe_layer_step=1,
            attention_chunk_size=None, layer_types=["full_attention"] * sizes["num_layers"],
        )
        config.architectures = ["Llama4ForCausalLM"]
        return config
    if arch == "gpt_oss":  # biased experts, swigluoai with clamping, attention sinks
        return GptOssConfig(
            **common, head_dim=64, num_local_experts=experts, num_experts_per_tok=top_k,
            intermediate_size=ffn, sliding_window=128,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                         for i in range(sizes["num_layers"])],
        )
    if arch == "gemma4":  # MoE block beside a dense MLP in every layer, text only
        config = Gemma4TextConfig(
            **common, head_dim=64, intermediate_size=ffn, enable_moe_block=True,
            num_experts=experts, top_k_experts=top_k, moe_intermediate_size=ffn,
            sliding_window=128, hidden_size_per_layer_input=0,
            vocab_size_per_layer_input=sizes["vocab_size"], per_layer_config={},
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                         for i in range(sizes["num_layers"])],
        )
        config.architectures = ["Gemma4ForCausalLM"]
        return config
    if arch == "llama":
        return LlamaConfig(**common, head_dim=64, intermediate_size=ffn)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHITECTURES}")


FIXED_TOP_K = {"phimoe": 2, "llama4": 1}  # families built at one top-k only


def build_tiny_moe(
    out_dir: str | Path,
    arch: str = "qwen3_moe",
    *,
    num_layers: int = 4,
    num_experts: int = 8,
    top_k: int = 2,
    hidden_size: int = 128,
    expert_ffn: int = 128,
    vocab_size: int = 512,
    seed: int = 0,
    init_std: float = 0.05,
) -> Path:
    """Write a random-weight checkpoint of `arch` (bf16 safetensors + tokenizer).

    `init_std` is larger than the usual 0.02 so that routing varies across tokens
    and experts are really exercised. Returns `out_dir`. Reuses a directory that
    already holds a checkpoint built with the same arguments.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    out = Path(out_dir)
    top_k = FIXED_TOP_K.get(arch, top_k)  # (what the marker records: what is built)
    spec = dict(arch=arch, num_layers=num_layers, num_experts=num_experts, top_k=top_k,
                hidden_size=hidden_size, expert_ffn=expert_ffn, vocab_size=vocab_size,
                seed=seed, init_std=init_std)
    marker = out / "tiny_moe.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return out
    marker.unlink(missing_ok=True)  # (a rebuild that stops midway is not that build)
    out.mkdir(parents=True, exist_ok=True)
    config = _config(arch, vocab_size=vocab_size, hidden_size=hidden_size,
                     num_layers=num_layers, num_experts=num_experts, top_k=top_k,
                     expert_ffn=expert_ffn)
    config.initializer_range = init_std
    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if arch.endswith("_vl") else AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():  # experts of transformers 5 may skip the initializer
        for name, p in model.named_parameters():
            if p.dim() >= 2 or (arch == "gpt_oss" and name.endswith("bias")):
                p.normal_(0.0, init_std)  # gpt-oss: expert and router biases matter
        for name, b in model.named_buffers():  # a routing bias that changes the choice
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    model.save_pretrained(out)
    if arch in VLLM_ARCHITECTURE:  # save_pretrained writes the transformers class name
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["architectures"] = [VLLM_ARCHITECTURE[arch]]
        cfg_path.write_text(json.dumps(cfg, indent=2))
    _train_tokenizer(out, vocab_size)
    marker.write_text(json.dumps(spec))
    return out


def expert_bytes(model_dir: str | Path) -> int:
    """Bytes of routed-expert weights in a checkpoint (read from safetensors headers)."""
    import struct

    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, meta in header.items():
            if ".experts." in name and name != "__metadata__":
                total += meta["data_offsets"][1] - meta["data_offsets"][0]
    return total


def build_tiny_deepseek_mtp(out_dir: str | Path, num_layers: int = 4, **kw) -> Path:
    """A tiny DeepSeek-V3 with one MTP module (vLLM's DeepSeekMTP, speculative
    method "mtp"): layer `num_layers` of a (num_layers + 1)-layer checkpoint, plus
    the MTP's own norms, projection and head. Random weights: its drafts are
    proposed and checked, and rarely accepted."""
    from safetensors.torch import load_file, save_file

    out = Path(out_dir)
    marker = out / "tiny_mtp.json"
    if marker.exists() and json.loads(marker.read_text()) == dict(num_layers=num_layers, **kw):
        return out
    build_tiny_moe(out, "deepseek_v3", num_layers=num_layers + 1, **kw)
    config = json.loads((out / "config.json").read_text())
    config["num_hidden_layers"], config["num_nextn_predict_layers"] = num_layers, 1
    (out / "config.json").write_text(json.dumps(config, indent=2))
    weights = load_file(str(out / "model.safetensors"))
    hidden, prefix = config["hidden_size"], f"model.layers.{num_layers}."
    g = torch.Generator().manual_seed(7)
    for name in ("enorm", "hnorm", "shared_head.norm"):
        weights[f"{prefix}{name}.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    weights[prefix + "eh_proj.weight"] = (
        torch.randn(hidden, 2 * hidden, generator=g) * 0.05).bfloat16()
    weights[prefix + "shared_head.head.weight"] = weights["lm_head.weight"].clone()
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "tiny_moe.json").unlink()  # no longer what build_tiny_moe wrote
    marker.write_text(json.dumps(dict(num_layers=num_layers, **kw)))
    return out
