"""References for vLLM's CPU INT8, INT4, FP8 and MXFP4 MoE kernels, for hosts
without AMX.

vLLM's CPU build runs INT8 W8A8 experts (`CPUExpertsInt8`), INT4 W4A16 experts
(`CPUExpertsInt4`: compressed-tensors, GPTQ, AWQ), block-FP8 W8A16 experts
(`CPUExpertsFp8`: the `fp8` format and compressed-tensors FP8 block, blocks of
128 x 128) and MXFP4 W4A16 experts (`CPUExpertsMxfp4`: gpt-oss, with biases and
clamped swigluoai) only on x86 CPUs with AMX; elsewhere plain vLLM refuses such a
checkpoint. To test the offload of quantized checkpoints on any CPU, `install()`
(the engine probe's "setup", in the engine's process) lets these classes run
anywhere: their weights stay in the layout the method hands the kernel (no VNNI
prepack; INT4: packed int32 [E, N, K / 8] with a scale per group, and a zero point
of 8 per expert for the symmetric checkpoints or AWQ's own per group; FP8:
float8_e4m3fn [E, N, K] with a scale per block; MXFP4: uint8 [E, N, K / 2], two
E2M1 codes per byte, and an E8M0 scale per 32 inputs), and `apply` computes the
experts in fp32 torch from the quantized weights and the scales, zero points,
biases and activation settings of the kernel's quant config.
Plain vLLM and offload then run the same kernel, so their greedy outputs must
match token for token.
"""

import torch

from vllm_moe_offload.hf.quantize import FP4_E2M1


def _int8(w, scale, e):
    return w[e].float() * scale[e].float()


def _fp8_block(w, scale, block_shape, e):
    """float8_e4m3fn [N, K] and a scale per block [N / bn, K / bk] -> fp32 [N, K]."""
    bn, bk = block_shape
    return w[e].float() * scale[e].float().repeat_interleave(bn, 0).repeat_interleave(bk, 1)


def _block_shape(quant_config) -> tuple[int, int]:
    """The weights' block, where `CPUExpertsFp8.apply` finds it."""
    if quant_config.block_shape:
        return tuple(quant_config.block_shape)
    return quant_config._w1.shape.row, quant_config._w1.shape.col


def _mxfp4(w, scale, e):
    """uint8 [N, K / 2] (element 2j in the low nibble) and E8M0 scales uint8
    [N, K / 32] -> fp32 [N, K]."""
    lut = torch.tensor(FP4_E2M1)
    codes = torch.stack([w[e] & 15, w[e] >> 4], dim=-1).flatten(-2).long()
    return lut[codes] * torch.exp2(scale[e].float() - 127).repeat_interleave(32, dim=1)


_SHIFTS = torch.arange(8, dtype=torch.int32) * 4


def _int4(w, scale, zp, e):
    """Packed int32 [N, K / 8] (8 nibbles per word, lowest first), a scale and a zero
    point per group [N, K / group] (or one zero point [1]) -> fp32 [N, K]."""
    u = ((w[e].unsqueeze(-1) >> _SHIFTS) & 15).flatten(1).float()
    group = u.shape[1] // scale.shape[2]
    zero = zp[e].float()
    if zero.dim() == 2:
        zero = zero.repeat_interleave(group, dim=1)
    return (u - zero) * scale[e].float().repeat_interleave(group, dim=1)


def _from_awq(w):
    """AWQ's int32 [E, R, C / 8] (nibble i holds column [0, 2, 4, 6, 1, 3, 5, 7][i])
    -> its values [E, R, C]."""
    return ((w.unsqueeze(-1) >> _SHIFTS) & 15)[..., [0, 4, 1, 5, 2, 6, 3, 7]].flatten(-2)


def _pack(u):
    """Values [..., K] -> int32 [..., K / 8], 8 consecutive values per word."""
    return (u.to(torch.int32).unflatten(-1, (-1, 8)) << _SHIFTS).sum(-1, dtype=torch.int32)


def _experts(dequant):
    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
              global_num_experts, expert_map, a1q_scale, a2_scale, workspace13, workspace2,
              expert_tokens_meta, apply_router_weight_on_input):
        assert not apply_router_weight_on_input and expert_map is None
        qc = self.quant_config
        x = hidden_states.float()
        out = torch.zeros(x.shape[0], output.shape[1], dtype=torch.float32)
        for e in topk_ids.unique().tolist():
            if not 0 <= e < w1.shape[0]:
                raise IndexError(f"expert id {e} outside the weights' {w1.shape[0]} experts")
            rows, k = (topk_ids == e).nonzero(as_tuple=True)
            w13, w2e = dequant(self, w1, w2, e)
            h = x[rows] @ w13.T
            if qc.w1_bias is not None:
                h = h + qc.w1_bias[e].float()
            if activation.name == "SWIGLUOAI":  # gpt-oss: gate and up interleaved
                gate = h[:, ::2].clamp(max=qc.gemm1_clamp_limit)
                up = h[:, 1::2].clamp(-qc.gemm1_clamp_limit, qc.gemm1_clamp_limit)
                act = (up + 1) * gate * torch.sigmoid(gate * qc.gemm1_alpha)
            else:
                gate, up = h.chunk(2, -1)
                act = torch.nn.functional.silu(gate) * up
            y = act @ w2e.T
            if qc.w2_bias is not None:
                y = y + qc.w2_bias[e].float()
            out.index_add_(0, rows, y * topk_weights[rows, k, None].float())
        output.copy_(out.to(output.dtype))
    return apply


def _unconverted(quant_config, w13, w2, w13_scale, w2_scale, w13_qzeros=None,
                 w2_qzeros=None, w13_bias=None, w2_bias=None):
    """vLLM's CPU INT4 weight conversion, left out: the layout the method hands it
    ([E, N, K / 8], 8 nibbles of consecutive inputs per word, from compressed-tensors
    and from GPTQ alike), with a zero point of 8 per expert: those checkpoints are
    symmetric (uint4b8; GPTQ's stored qzeros are not read). AWQ hands its own layout
    ([E, K, N / 8] in AWQ's order, zero points per group): brought to the same."""
    if type(quant_config).__name__ == "AutoAWQConfig":
        w13, w2 = (_pack(_from_awq(w).transpose(1, 2)) for w in (w13, w2))
        w13_scale, w2_scale = (s.transpose(1, 2).contiguous() for s in (w13_scale, w2_scale))
        w13_qzeros, w2_qzeros = (_from_awq(z).transpose(1, 2).contiguous()
                                 for z in (w13_qzeros, w2_qzeros))
        return w13, w2, w13_scale, w2_scale, w13_qzeros, w2_qzeros, None, None, w13_bias, \
            w2_bias

    def eight(w):
        return torch.full((w.shape[0], 1), 8, dtype=torch.int32)
    return w13, w2, w13_scale, w2_scale, eight(w13), eight(w2), None, None, w13_bias, w2_bias


def install() -> None:
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import (CPUExpertsFp8,
                                                                       CPUExpertsInt4,
                                                                       CPUExpertsInt8,
                                                                       CPUExpertsMxfp4)
    from vllm.model_executor.layers.fused_moe.oracle import int_wna16

    for cls in (CPUExpertsInt8, CPUExpertsInt4, CPUExpertsFp8, CPUExpertsMxfp4):
        cls._supports_current_device = staticmethod(lambda: True)
        cls.process_weights_after_loading = lambda self, layer: None
    # vLLM tries its W8A8 FP8 kernel first, on CPUs with AMX-FP8: not this reference
    cpu_moe.CPUExpertsFp8W8A8._supports_current_device = staticmethod(lambda: False)
    # no VNNI prepack
    cpu_moe.prepare_fp8_moe_layer_for_cpu = lambda w13, w2: (w13, w2)
    cpu_moe.prepare_mxfp4_moe_layer_for_cpu = lambda *tensors: tensors
    CPUExpertsMxfp4.apply = _experts(lambda self, w1, w2, e: (
        _mxfp4(w1, self.w1_scale, e), _mxfp4(w2, self.w2_scale, e)))
    CPUExpertsFp8.apply = _experts(lambda self, w1, w2, e: (
        _fp8_block(w1, self.w1_scale, _block_shape(self.quant_config), e),
        _fp8_block(w2, self.w2_scale, _block_shape(self.quant_config), e)))
    CPUExpertsInt8.apply = _experts(lambda self, w1, w2, e: (
        _int8(w1, self.w1_scale, e), _int8(w2, self.w2_scale, e)))
    CPUExpertsInt4.apply = _experts(lambda self, w1, w2, e: (
        _int4(w1, self.w1_scale, self.w1_zp, e), _int4(w2, self.w2_scale, self.w2_zp, e)))
    int_wna16._process_weights_cpu = _unconverted
