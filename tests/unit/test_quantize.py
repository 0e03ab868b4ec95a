"""The quantized test checkpoints (hf/quantize.py) hold what their formats mean,
read back by the formats' own decoders where there is one."""

import pytest
import torch

from vllm_moe_offload.hf.quantize import _fp8_blocks, _mxfp4, quantize_experts


def test_mxfp4_reads_back_through_transformers_gpt_oss_decoder():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    w = torch.randn(3, 64, 96, generator=torch.Generator().manual_seed(0)) * 0.05
    blocks, scales = _mxfp4(w.transpose(1, 2))  # gpt-oss stores [E, in, out]
    assert blocks.shape == (3, 96, 2, 16) and scales.shape == (3, 96, 2)
    decoded = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert decoded.shape == w.shape
    assert ((decoded - w).norm() / w.norm()) < 0.15  # FP4: ~12% here
    groups = decoded.transpose(1, 2).unflatten(-1, (-1, 32)).abs().amax(-1)
    assert (groups / torch.exp2(scales.float() - 127) <= 6).all()  # no code clipped


def test_fp8_blocks_scale_each_block_to_448():
    w = torch.randn(256, 128, generator=torch.Generator().manual_seed(1))
    q, scale = _fp8_blocks(w, 128, torch.float32)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (2, 1)
    decoded = q.float() * scale.repeat_interleave(128, 0)
    assert ((decoded - w).norm() / w.norm()) < 0.05
    assert torch.equal(scale, scale.bfloat16().float())  # as both formats store it
    with pytest.raises(ValueError, match="block 96 does not divide"):
        _fp8_blocks(w, 96, torch.float32)


def test_an_unknown_scheme_is_refused(tmp_path):
    with pytest.raises(ValueError, match="scheme must be one of w8a8, .*, mxfp4, got 'int3'"):
        quantize_experts(tmp_path, tmp_path / "out", "int3")
