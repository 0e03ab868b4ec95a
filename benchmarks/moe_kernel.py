"""The one expert kernel of benchmarks/gpu_stack.py (runtime only, no vLLM).

Legend: T = tokens, K = top-k, P = T * K (token, expert) pairs, N = rows of the
weight tensors the ids index (E experts for plain, S slots for offload), H = hidden,
I = intermediate, BM = rows per block.

A fused-MoE in the shape of vLLM's: the pairs are sorted by expert and padded to
blocks of BM rows (`align`, at most min(P * BM, P + N * (BM - 1)) rows, as vLLM
bounds it), then one Triton GEMM per weight (w13 with SiLU-and-mul, then w2 times
the routing weight), and a sum over K. Its cost depends on the pairs, not on N, so
plain ([E, ...] weights) and offload ([S, ...] slot buffers) run the same code and
the ratio of their times measures offload alone. Each output row depends only on
its own pair, so plain and offload give bit-identical results.
On the CPU (`--device cpu`) `moe_torch` stands in: gathered weights and einsum.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only hosts without Triton use moe_torch
    triton = None

BM = 16


def align(ids: torch.Tensor, num_rows: int):
    """ids [T, K] -> (sorted pair index per padded row [EM], weight row per block
    [EM / BM], -1 for unused blocks). Fixed shapes, no host sync."""
    flat = ids.reshape(-1).long()
    P = flat.numel()
    em = min(P * BM, P + num_rows * (BM - 1))
    em = -(-em // BM) * BM
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    counts = torch.zeros(num_rows, dtype=torch.long, device=ids.device).scatter_add_(
        0, flat, torch.ones_like(flat))
    padded = (counts + BM - 1) // BM * BM
    dest = (padded.cumsum(0) - padded)[sorted_e] + (
        torch.arange(P, device=ids.device) - (counts.cumsum(0) - counts)[sorted_e])
    pairs = torch.full((em,), P, dtype=torch.int32, device=ids.device).scatter_(
        0, dest, order.int())
    block_rows = torch.full((em // BM,), -1, dtype=torch.int32, device=ids.device).scatter_(
        0, dest // BM, sorted_e.int())
    return pairs, block_rows


if triton is not None:
    @triton.jit
    def _gate_up(x_ptr, w_ptr, act_ptr, pairs_ptr, rows_ptr, P, TOPK, H, I,
                 BM_: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        b = tl.program_id(0)
        n = tl.program_id(1)
        row = tl.load(rows_ptr + b)
        if row >= 0:
            r = b * BM_ + tl.arange(0, BM_)
            pair = tl.load(pairs_ptr + r)
            valid = pair < P
            tok = tl.where(valid, pair // TOPK, 0).to(tl.int64)
            cols = n * BN + tl.arange(0, BN)
            w = w_ptr + row.to(tl.int64) * (2 * I * H)
            acc_g = tl.zeros([BM_, BN], dtype=tl.float32)
            acc_u = tl.zeros([BM_, BN], dtype=tl.float32)
            for k in range(0, H, BK):
                kk = k + tl.arange(0, BK)
                a = tl.load(x_ptr + tok[:, None] * H + kk[None, :],
                            mask=valid[:, None] & (kk[None, :] < H), other=0.0)
                wmask = (cols[None, :] < I) & (kk[:, None] < H)
                wg = tl.load(w + cols[None, :] * H + kk[:, None], mask=wmask, other=0.0)
                wu = tl.load(w + (cols[None, :] + I) * H + kk[:, None], mask=wmask, other=0.0)
                acc_g = tl.dot(a, wg, acc_g)
                acc_u = tl.dot(a, wu, acc_u)
            act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
            tl.store(act_ptr + r[:, None].to(tl.int64) * I + cols[None, :],
                     act.to(act_ptr.dtype.element_ty),
                     mask=valid[:, None] & (cols[None, :] < I))

    @triton.jit
    def _down(act_ptr, w_ptr, out_ptr, pairs_ptr, rows_ptr, topw_ptr, P, H, I,
              BM_: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        b = tl.program_id(0)
        n = tl.program_id(1)
        row = tl.load(rows_ptr + b)
        if row >= 0:
            r = b * BM_ + tl.arange(0, BM_)
            pair = tl.load(pairs_ptr + r)
            valid = pair < P
            cols = n * BN + tl.arange(0, BN)
            w = w_ptr + row.to(tl.int64) * (H * I)
            acc = tl.zeros([BM_, BN], dtype=tl.float32)
            for k in range(0, I, BK):
                kk = k + tl.arange(0, BK)
                a = tl.load(act_ptr + r[:, None].to(tl.int64) * I + kk[None, :],
                            mask=valid[:, None] & (kk[None, :] < I), other=0.0)
                wt = tl.load(w + cols[None, :] * I + kk[:, None],
                             mask=(cols[None, :] < H) & (kk[:, None] < I), other=0.0)
                acc = tl.dot(a, wt, acc)
            weight = tl.load(topw_ptr + pair, mask=valid, other=0.0)
            acc = acc * weight[:, None]
            tl.store(out_ptr + tl.where(valid, pair, 0)[:, None].to(tl.int64) * H
                     + cols[None, :], acc, mask=valid[:, None] & (cols[None, :] < H))


def moe_triton(x, w13, w2, ids, weights, BN=64, BK=128):
    """x [T, H] bf16, w13 [N, 2I, H], w2 [N, H, I], ids [T, K] rows of w13/w2,
    weights [T, K] fp32 -> [T, H] bf16."""
    T, H = x.shape
    K = ids.shape[1]
    I = w2.shape[2]
    P = T * K
    pairs, rows = align(ids, w13.shape[0])
    act = torch.empty((pairs.numel(), I), dtype=x.dtype, device=x.device)
    out = torch.empty((P, H), dtype=torch.float32, device=x.device)
    nblocks = rows.numel()
    _gate_up[(nblocks, triton.cdiv(I, BN))](x, w13, act, pairs, rows, P, K, H, I,
                                            BM_=BM, BN=BN, BK=BK, num_warps=4,
                                            num_stages=3)
    _down[(nblocks, triton.cdiv(H, BN))](act, w2, out, pairs, rows,
                                         weights.reshape(-1).float().contiguous(), P, H,
                                         I, BM_=BM, BN=BN, BK=BK, num_warps=4,
                                         num_stages=3)
    return out.view(T, K, H).sum(1).to(x.dtype)


def moe_torch(x, w13, w2, ids, weights):
    """Reference: gathered weights and einsum (CPU benchmarks and tests)."""
    ids = ids.long()
    gate, up = torch.einsum("th,tkih->tki", x.float(), w13[ids].float()).chunk(2, dim=-1)
    act = (torch.nn.functional.silu(gate) * up).to(x.dtype).float()  # [T, K, I]
    out = torch.einsum("tki,tkhi->tkh", act, w2[ids].float()) * weights.float()[..., None]
    return out.sum(1).to(x.dtype)


def moe(x, w13, w2, ids, weights):
    if x.is_cuda and triton is not None:
        return moe_triton(x, w13, w2, ids, weights)
    return moe_torch(x, w13, w2, ids, weights)
