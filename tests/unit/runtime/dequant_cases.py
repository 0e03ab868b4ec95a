"""The Triton decode kernel against the torch reference, bit for bit: on a CUDA GPU
(tests/gpu) and, without one, in Triton's interpreter on the CPU
(test_quant.py runs this file in a subprocess with TRITON_INTERPRET=1)."""

from __future__ import annotations

import json
import sys

import torch

from vllm_moe_offload.runtime.dequant_kernel import decode_into
from vllm_moe_offload.runtime.quant import GroupQuant

SHAPES = [(96, 64), (64, 160)]  # n not a multiple of the kernel's block
CASES = [(bits, group, dtype) for bits in (8, 4, 3, 2) for group in (32, 64)
         for dtype in (torch.bfloat16, torch.float16)]


def run(device: str) -> dict:
    results = {}
    g = torch.Generator().manual_seed(0)
    for bits, group, dtype in CASES:
        tensors = [(torch.randn(s, generator=g) * 0.05).to(dtype) for s in SHAPES]
        for t in tensors:  # a constant group, and a narrow one far from 0
            t.view(-1)[:group] = 0.5
            t.view(-1)[group:2 * group] = 1 + torch.arange(group) * 2.0 ** -10
        codec = GroupQuant(bits, group, "rtn")
        stored = codec.encode(tensors)
        want = [torch.empty_like(t) for t in tensors]
        codec.decode(stored, want, reference=True)  # torch, on the CPU
        problem = None if all(w.isfinite().all() for w in want) else "not finite"
        for k, w in enumerate(want):
            got = torch.full_like(w, float("nan"), device=device)
            codes, scale, zero = (x.to(device) for x in stored[3 * k:3 * k + 3])
            decode_into(codes, scale, zero, got, bits, group)
            if not torch.equal(got.cpu().view(torch.int16), w.view(torch.int16)):
                bad = int((got.cpu() != w).sum())
                problem = f"tensor {k}: {bad} of {w.numel()} values differ"
        results[f"{bits}bit/g{group}/{str(dtype)[6:]}"] = problem
    return results


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "cpu")))
