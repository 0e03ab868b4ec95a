"""Quantized copies of the tiny bf16 checkpoints (`tiny_moe.build_tiny_moe`): their
routed experts alone quantized, in the layouts the quantization tools write, so
the offload of quantized checkpoints is tested through vLLM without a model hub.
Attention, the router, shared experts and the head stay bf16.

Schemes (symmetric unless said otherwise):
- "w8a8" (compressed-tensors, as llm-compressor writes it): `weight` int8
  [out, in] with a scale per output channel, `weight_scale` [out, 1];
  activations quantized per token at run time;
- "w4a16" (compressed-tensors pack-quantized): `weight_packed` int32
  [out, in / 8], `weight_scale` [out, in / group_size], `weight_shape` [2];
- "gptq" (AutoGPTQ, 4 bits, no act-order): `qweight` int32 [in / 8, out]
  packed along the input, `scales` fp16 [in / group_size, out], `qzeros`
  int32 [in / group_size, out / 8] holding zero - 1 (GPTQ's v1 format), and
  `g_idx` int32 [in] (each input's group: AutoGPTQ and GPTQModel write it for
  every linear, act-order or not; vLLM drops it as it reads);
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
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import torch

SCHEMES = ("w8a8", "w4a16", "gptq", "awq", "fp8", "w8a8_fp8", "mxfp4")
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # code -> value


def quantize_experts(src_dir: str | Path, out_dir: str | Path, scheme: str = "w8a8",
                     group_size: int = 64, block: int = 128) -> Path:
    """A copy of the checkpoint in `src_dir` with its routed experts quantized by
    `scheme` (the module's docstring), written to `out_dir`; returns `out_dir`."""
    from safetensors.torch import load_file, save_file

    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    src, out = Path(src_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            shutil.copy(f, out / f.name)
    kept: list[str] = []  # the linear modules left bf16
    for f in src.glob("*.safetensors"):
        tensors, quantized = {}, 0
        for name, t in load_file(f).items():
            replaced = _quantized(scheme, name, t, group_size, block)
            if replaced is None:
                tensors[name] = t
                if name.endswith(".weight") and t.dim() == 2:
                    kept.append(name[:-len(".weight")])
            else:
                tensors.update(replaced)
                quantized += 1
        if not quantized:
            raise ValueError(f"{f}: no routed-expert weights to quantize")
        save_file(tensors, out / f.name, metadata={"format": "pt"})
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    (out / "tiny_moe.json").unlink(missing_ok=True)  # not what build_tiny_moe wrote
    cfg["quantization_config"] = _config(scheme, group_size, block, kept)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


@functools.cache
def _expert_proj() -> str:
    """A regex of a routed expert's projection module, as checkpoints name it."""
    from vllm_moe_offload.runtime.checkpoint import PROJECTIONS
    return r".*\.experts\.\d+\.(" + "|".join(n for names in PROJECTIONS for n in names) + ")"


def _quantized(scheme: str, name: str, t: torch.Tensor, group_size: int,
               block: int) -> dict[str, torch.Tensor] | None:
    """One checkpoint tensor -> the tensors that replace it; None where it stays."""
    if scheme == "mxfp4":
        if not re.fullmatch(r".*\.experts\.(gate_up_proj|down_proj)", name):
            return None
        blocks, scales = _mxfp4(t.float().transpose(1, 2))  # gpt-oss: [E, in, out]
        return {name + "_blocks": blocks, name + "_scales": scales}
    if not re.fullmatch(_expert_proj() + r"\.weight", name):
        return None
    w, stem = t.float(), name[:-len(".weight")]
    if scheme in ("fp8", "w8a8_fp8"):
        q, scale = _fp8_blocks(w, block, torch.float32 if scheme == "fp8" else torch.bfloat16)
        return {name: q, stem + (".weight_scale_inv" if scheme == "fp8"
                                 else ".weight_scale"): scale}
    if scheme == "w8a8":
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
        return {name: (w / scale).round().clamp(-127, 127).to(torch.int8),
                stem + ".weight_scale": scale.to(t.dtype)}
    groups = w.view(w.shape[0], -1, group_size)
    if scheme == "awq":
        lo, hi = groups.amin(dim=2), groups.amax(dim=2)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        zero = (-lo / scale).round().clamp(0, 15)
        q = ((groups / scale[..., None]).round() + zero[..., None]).clamp(0, 15)
        return {stem + ".qweight": _awq_pack(q.view(w.shape).t()),
                stem + ".qzeros": _awq_pack(zero.t()),
                stem + ".scales": scale.t().contiguous().half()}
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    scale = groups.abs().amax(dim=2).clamp(min=1e-8) / 7
    q = (groups / scale[..., None]).round().clamp(-8, 7).to(torch.int8).view(w.shape)
    if scheme == "w4a16":
        return {stem + ".weight_packed": pack_to_int32(q, 4),
                stem + ".weight_shape": torch.tensor(list(w.shape)),
                stem + ".weight_scale": scale.to(t.dtype)}
    # gptq: pack_to_int32 stores v + 8: q + 8 (uint4b8), and zero - 1 = 7
    zeros = torch.full((scale.shape[1], w.shape[0]), -1, dtype=torch.int8)
    return {stem + ".qweight": pack_to_int32(q.t().contiguous(), 4, 0).contiguous(),
            stem + ".scales": scale.t().contiguous().half(),
            stem + ".qzeros": pack_to_int32(zeros, 4),
            stem + ".g_idx": torch.arange(w.shape[1], dtype=torch.int32) // group_size}


def _config(scheme: str, group_size: int, block: int, kept: list[str]) -> dict:
    """The checkpoint's `quantization_config`, as the scheme's tool writes it."""
    if scheme == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": group_size,
                "desc_act": False, "sym": True, "lm_head": False,
                "checkpoint_format": "gptq"}
    if scheme == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size,
                "zero_point": True, "version": "gemm",
                "modules_to_not_convert": ["self_attn", "gate", "lm_head"]}
    if scheme == "mxfp4":
        return {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
            "lm_head"]}
    if scheme == "fp8":
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                "weight_block_size": [block, block], "modules_to_not_convert": kept}
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
    else:  # w4a16
        fmt, inputs = "pack-quantized", None
        weights = dict(args, num_bits=4, strategy="group", group_size=group_size)
    return {"quant_method": "compressed-tensors", "format": fmt,
            "quantization_status": "compressed", "global_compression_ratio": None,
            "config_groups": {"group_0": {
                "targets": ["re:" + _expert_proj() + "$"], "weights": weights,
                "input_activations": inputs, "output_activations": None, "format": fmt}},
            "ignore": [], "kv_cache_scheme": None}


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
