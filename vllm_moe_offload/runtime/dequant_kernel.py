"""The quantized store's decode on the GPU: one Triton kernel per expert tensor.

Same arithmetic as `quant.GroupQuant.decode` (the torch reference), value for value:
unpack the code, `(q - zero) * scale` in fp32, round to the slot dtype. In host mode
it runs on the stream of the load (the copy stream), after the record's bytes have
arrived; device mode's `decode_fill_kernel` (residency_kernels.py) calls
`decode_values` and `store_values` on the record in pinned host memory, read in
place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def decode_values(codes, scale, zero, i, m, n, BITS: tl.constexpr, GROUP: tl.constexpr):
    """Values i (where m) of a tensor of n values, in fp32: (q - zero) * scale."""
    if BITS == 3:  # a 2-bit plane (low bits), then a 1-bit plane (the high bit)
        low = tl.load(codes + i // 4, mask=m, other=0).to(tl.int32)
        high = tl.load(codes + n // 4 + i // 8, mask=m, other=0).to(tl.int32)
        low = (low >> ((i % 4) * 2).to(tl.int32)) & 3
        high = (high >> (i % 8).to(tl.int32)) & 1
        q = low | (high << 2)
    else:
        PER: tl.constexpr = 8 // BITS
        byte = tl.load(codes + i // PER, mask=m, other=0).to(tl.int32)
        q = (byte >> ((i % PER) * BITS).to(tl.int32)) & ((1 << BITS) - 1)
    g = i // GROUP
    s = tl.load(scale + g, mask=m, other=0.0).to(tl.float32)
    z = tl.load(zero + g, mask=m, other=0.0).to(tl.float32)
    return (q.to(tl.float32) - z) * s


@triton.jit
def store_values(out, w, m, BF16: tl.constexpr):
    """fp32 w -> the slot dtype at pointers `out` (where m)."""
    if BF16:  # round to nearest even by hand: the interpreter's cast truncates
        b = w.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        tl.store(out, b.to(tl.int16).to(tl.bfloat16, bitcast=True), mask=m)
    else:
        tl.store(out, w.to(out.dtype.element_ty), mask=m)


@triton.jit
def _dequant(codes, scale, zero, out, n, BITS: tl.constexpr, GROUP: tl.constexpr,
             BF16: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    store_values(out + i, decode_values(codes, scale, zero, i, m, n, BITS, GROUP), m, BF16)


def decode_into(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                dst: torch.Tensor, bits: int, group: int) -> None:
    """One expert tensor's record -> `dst` (contiguous), on the current stream."""
    if not dst.is_contiguous():
        raise ValueError("the decode kernel writes contiguous slot tensors only")
    n = dst.numel()
    _dequant[(triton.cdiv(n, BLOCK),)](codes, scale, zero, dst, n, BITS=bits,
                                       GROUP=group, BF16=dst.dtype == torch.bfloat16,
                                       BLOCK=BLOCK)
