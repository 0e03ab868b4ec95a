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
                 "llama4", "gpt_oss", "gemma4", "llama")
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
                              Qwen3NextConfig)

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
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    spec = dict(arch=arch, num_layers=num_layers, num_experts=num_experts, top_k=top_k,
                hidden_size=hidden_size, expert_ffn=expert_ffn, vocab_size=vocab_size,
                seed=seed, init_std=init_std)
    marker = out / "tiny_moe.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = _config(arch, vocab_size=vocab_size, hidden_size=hidden_size,
                     num_layers=num_layers, num_experts=num_experts, top_k=top_k,
                     expert_ffn=expert_ffn)
    config.initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
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


def _expert_proj() -> str:
    """A regex of a routed expert's projection module, as checkpoints name it."""
    from vllm_moe_offload.runtime.checkpoint import PROJECTIONS
    return r".*\.experts\.\d+\.(" + "|".join(n for names in PROJECTIONS for n in names) + ")"


SCHEMES = ("w8a8", "w4a16", "gptq", "awq", "fp8", "w8a8_fp8", "mxfp4")


def quantize_experts(src_dir: str | Path, out_dir: str | Path, scheme: str = "w8a8",
                     group_size: int = 64, block: int = 128) -> Path:
    """A quantized copy of a bf16 checkpoint (`build_tiny_moe`), its routed experts
    alone quantized (symmetric), in the layout their tools write:
    - "w8a8" (compressed-tensors, as llm-compressor writes it): `weight` int8
      [out, in] with a scale per output channel, `weight_scale` [out, 1];
      activations quantized per token at run time;
    - "w4a16" (compressed-tensors pack-quantized): `weight_packed` int32
      [out, in / 8], `weight_scale` [out, in / group_size], `weight_shape` [2];
    - "gptq" (AutoGPTQ, 4 bits, no act-order): `qweight` int32 [in / 8, out]
      packed along the input, `scales` fp16 [in / group_size, out], `qzeros`
      int32 [in / group_size, out / 8] holding zero - 1 (GPTQ's v1 format);
    - "awq" (AutoAWQ GEMM, 4 bits, asymmetric): `qweight` int32 [in, out / 8]
      packed along the output in AWQ's order (word nibble i holds column
      [0, 2, 4, 6, 1, 3, 5, 7][i]), `qzeros` [in / group_size, out / 8] packed
      alike, `scales` fp16 [in / group_size, out];
    - "fp8" (the `fp8` format of DeepSeek-V3 and Qwen3-*-FP8): `weight`
      float8_e4m3fn [out, in] with a scale per block of block x block,
      `weight_scale_inv` fp32 [out / block, in / block]; activations quantized per
      group of `block` at run time; the layers left bf16 named in
      `modules_to_not_convert`;
    - "w8a8_fp8" (compressed-tensors, llm-compressor's FP8_BLOCK): as "fp8", the
      scale named `weight_scale` and held in bf16;
    - "mxfp4" (gpt-oss's released format; gpt-oss checkpoints only): each layer's
      experts fused, `gate_up_proj_blocks` uint8 [E, 2I, H / 32, 16] (two FP4 E2M1
      codes per byte, the even element in the low nibble), `gate_up_proj_scales`
      uint8 [E, 2I, H / 32] (E8M0: 2^(s - 127) per 32 inputs), likewise
      `down_proj_blocks` [E, H, I / 32, 16] and `down_proj_scales`; biases kept.
    Attention, the router, shared experts and the head stay bf16. Returns `out_dir`."""
    import re
    import shutil

    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from safetensors.torch import load_file, save_file

    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    src, out, proj = Path(src_dir), Path(out_dir), _expert_proj()
    kept_bf16: list[str] = []  # every other linear module
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            shutil.copy(f, out / f.name)
    for f in src.glob("*.safetensors"):
        tensors, quantized = {}, 0
        for name, t in load_file(f).items():
            if scheme == "mxfp4" and re.fullmatch(r".*\.experts\.(gate_up_proj|down_proj)",
                                                  name):
                quantized += 1  # [E, in, out], as gpt-oss stores them
                tensors[name + "_blocks"], tensors[name + "_scales"] = _mxfp4(
                    t.float().transpose(1, 2))
                continue
            if scheme == "mxfp4" or not re.fullmatch(proj + r"\.weight", name):
                tensors[name] = t
                if name.endswith(".weight") and t.dim() == 2:
                    kept_bf16.append(name[:-len(".weight")])
                continue
            quantized += 1
            w, stem = t.float(), name[:-len(".weight")]
            if scheme in ("fp8", "w8a8_fp8"):
                q, scale = _fp8_blocks(w, block, torch.float32 if scheme == "fp8"
                                       else torch.bfloat16)
                tensors[name] = q
                tensors[stem + (".weight_scale_inv" if scheme == "fp8"
                                else ".weight_scale")] = scale
                continue
            if scheme == "w8a8":
                scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
                tensors[name] = (w / scale).round().clamp(-127, 127).to(torch.int8)
                tensors[stem + ".weight_scale"] = scale.to(t.dtype)
                continue
            groups = w.view(w.shape[0], -1, group_size)
            if scheme == "awq":
                lo, hi = groups.amin(dim=2), groups.amax(dim=2)
                scale = ((hi - lo) / 15).clamp(min=1e-8)
                zero = (-lo / scale).round().clamp(0, 15)
                q = ((groups / scale[..., None]).round() + zero[..., None]).clamp(0, 15)
                tensors[stem + ".qweight"] = _awq_pack(q.view(w.shape).t())
                tensors[stem + ".qzeros"] = _awq_pack(zero.t())
                tensors[stem + ".scales"] = scale.t().contiguous().half()
                continue
            scale = groups.abs().amax(dim=2).clamp(min=1e-8) / 7
            q = (groups / scale[..., None]).round().clamp(-8, 7).to(torch.int8).view(w.shape)
            if scheme == "w4a16":
                tensors[stem + ".weight_packed"] = pack_to_int32(q, 4)
                tensors[stem + ".weight_shape"] = torch.tensor(list(w.shape))
                tensors[stem + ".weight_scale"] = scale.to(t.dtype)
            else:  # pack_to_int32 stores v + 8: q + 8 (uint4b8), and zero - 1 = 7
                tensors[stem + ".qweight"] = pack_to_int32(q.t().contiguous(), 4, 0).contiguous()
                tensors[stem + ".scales"] = scale.t().contiguous().half()
                zeros = torch.full((scale.shape[1], w.shape[0]), -1, dtype=torch.int8)
                tensors[stem + ".qzeros"] = pack_to_int32(zeros, 4)
        if not quantized:
            raise ValueError(f"{f}: no routed-expert weights to quantize")
        save_file(tensors, out / f.name, metadata={"format": "pt"})
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    (out / "tiny_moe.json").unlink(missing_ok=True)
    if scheme in ("gptq", "awq"):
        cfg["quantization_config"] = {
            "quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False,
            "sym": True, "lm_head": False, "checkpoint_format": "gptq"} if scheme == "gptq" \
            else {"quant_method": "awq", "bits": 4, "group_size": group_size,
                  "zero_point": True, "version": "gemm",
                  "modules_to_not_convert": ["self_attn", "gate", "lm_head"]}
        cfg_path.write_text(json.dumps(cfg, indent=2))
        return out
    if scheme == "mxfp4":
        cfg["quantization_config"] = {
            "quant_method": "mxfp4", "modules_to_not_convert": [
                "model.layers.*.self_attn", "model.layers.*.mlp.router",
                "model.embed_tokens", "lm_head"]}
        cfg_path.write_text(json.dumps(cfg, indent=2))
        return out
    if scheme == "fp8":
        cfg["quantization_config"] = {
            "quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
            "weight_block_size": [block, block], "modules_to_not_convert": kept_bf16}
        cfg_path.write_text(json.dumps(cfg, indent=2))
        return out
    args = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
            "block_structure": None, "actorder": None, "observer": "minmax",
            "observer_kwargs": {}, "dynamic": False}
    if scheme == "w8a8_fp8":
        fmt = "float-quantized"
        weights = dict(args, type="float", strategy="block", block_structure=[block, block])
        inputs = dict(args, type="float", strategy="group", group_size=block, dynamic=True,
                      observer=None)
    elif scheme == "w8a8":
        fmt, weights = "int-quantized", dict(args, strategy="channel")
        inputs = dict(args, strategy="token", dynamic=True, observer=None)
    else:
        fmt, inputs = "pack-quantized", None
        weights = dict(args, num_bits=4, strategy="group", group_size=group_size)
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": fmt,
        "quantization_status": "compressed", "global_compression_ratio": None,
        "config_groups": {"group_0": {
            "targets": ["re:" + proj + "$"], "weights": weights,
            "input_activations": inputs, "output_activations": None, "format": fmt}},
        "ignore": [], "kv_cache_scheme": None}
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


def _fp8_blocks(w: torch.Tensor, block: int, scale_dtype: torch.dtype):
    """fp32 [out, in] -> float8_e4m3fn [out, in] and a scale per block of
    block x block [out / block, in / block], symmetric, amax to 448. The scales are
    rounded to bf16 whatever `scale_dtype` holds them, so both FP8 formats hold
    the same values."""
    rows, cols = w.shape
    if rows % block or cols % block:
        raise ValueError(f"block {block} does not divide the expert weight {tuple(w.shape)}")
    blocks = w.view(rows // block, block, cols // block, block)
    scale = (blocks.abs().amax(dim=(1, 3)) / 448).clamp(min=1e-12).bfloat16().to(scale_dtype)
    q = blocks / scale.float()[:, None, :, None]
    return q.clamp(-448, 448).view(rows, cols).to(torch.float8_e4m3fn), scale


FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # code -> value


def _mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [..., K] -> MXFP4: codes uint8 [..., K / 32, 16] and E8M0 scales uint8
    [..., K / 32]; a power-of-two scale per 32 values that brings their largest to
    at most 6, each value then rounded to the nearest E2M1 code."""
    groups = w.unflatten(-1, (-1, 32))
    amax = groups.abs().amax(dim=-1)
    exp = torch.ceil(torch.log2(amax.clamp(min=2.0 ** -126) / 6)).clamp(-127, 127)
    scaled = groups / torch.exp2(exp)[..., None]
    codes = (scaled[..., None] - torch.tensor(FP4_E2M1)).abs().argmin(dim=-1)
    codes = codes.to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exp + 127).to(torch.uint8)


def _awq_pack(values: torch.Tensor) -> torch.Tensor:
    """[R, C] 4-bit values -> int32 [R, C / 8] in AWQ's order: nibble i of word j
    holds column 8 j + [0, 2, 4, 6, 1, 3, 5, 7][i]."""
    v = values.to(torch.int32).reshape(values.shape[0], -1, 8)[..., [0, 2, 4, 6, 1, 3, 5, 7]]
    shifts = torch.arange(8, dtype=torch.int32) * 4
    return (v << shifts).sum(dim=-1, dtype=torch.int32)
