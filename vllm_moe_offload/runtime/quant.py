"""A quantized slow tier: the store keeps experts at 8, 4, 3 or 2 bits (opt-in).

`store_bits < 16` is approximate: outputs are no longer plain vLLM's. The slots keep
the model's dtype, so vLLM's kernel runs unchanged; the store holds each expert
group-quantized, and an expert is decoded on arrival into its slot. A miss moves
about bits/16 of the bytes (plus 4 bytes of scale and zero per group).

Record layout of one expert (`GroupQuant.layout`), for each of its matrices of n
values in the checkpoint's layout (w13 [2I, H], then w2 [H, I]; `QuantizedStore`;
biases, where the experts have them, follow as they are):
    codes  uint8 [n * bits / 8]   bit planes, see `_pack`
    scale  fp16  [n / group]      one per `group` consecutive values of the last dim
    zero   fp16  [n / group]
A value decodes as  w = (q - zero) * scale  in fp32, rounded to the slot dtype.
Codes: bits 8, 4, 2 are one plane, 8 / bits values per byte, value j * (8 / bits) + k
of byte j at bits [k * bits, (k + 1) * bits); 3 bits are a 2-bit plane (the low bits)
followed by a 1-bit plane (the high bit), so a value costs exactly 3 bits.

Quantizer: min-max (round to nearest) per group; `hqq` (the default) then refines
each group's zero with HQQ's half-quadratic proximal solver (Badri & Shaji, 2023:
an l_p<1 error, p = 0.7, 20 iterations), computed once per expert at load time.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .store import ExpertLayout, ExpertStore, TensorSpec

_HQQ = {"lp_norm": 0.7, "beta": 10.0, "kappa": 1.01, "iters": 20}


def _planes(bits: int) -> tuple[int, ...]:
    return (2, 1) if bits == 3 else (bits,)


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """[n] uint8 values < 2**bits -> packed planes (module docstring)."""
    out, shift = [], 0
    for b in _planes(bits):
        v = ((q >> shift) & ((1 << b) - 1)).view(-1, 8 // b).to(torch.int32)
        weights = torch.tensor([1 << (k * b) for k in range(8 // b)], dtype=torch.int32,
                               device=q.device)
        out.append((v * weights).sum(1).to(torch.uint8))
        shift += b
    return torch.cat(out)


def _unpack(codes: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Packed planes -> [n] uint8 values (torch, any device: the reference decode)."""
    q, start, shift = None, 0, 0
    for b in _planes(bits):
        plane = codes[start:start + n * b // 8]
        shifts = torch.arange(0, 8, b, dtype=torch.uint8, device=codes.device)
        v = ((plane.unsqueeze(1) >> shifts) & ((1 << b) - 1)).reshape(-1)
        q = v if q is None else q | (v << shift)
        start += n * b // 8
        shift += b
    return q


_DECODE_CHUNK = 1 << 20  # values decoded at a time on the CPU: its buffers stay small
_work = threading.local()  # per thread: host mode decodes on the loader thread too


@functools.lru_cache(maxsize=None)
def _byte_table(b: int, shift: int) -> np.ndarray:
    """[256, 8 // b] uint8: a byte of a b-bit plane -> its values, << shift."""
    per = 8 // b
    byte = np.arange(256, dtype=np.uint8)[:, None]
    return (((byte >> (np.arange(per, dtype=np.uint8) * b)) & ((1 << b) - 1)) << shift
            ).astype(np.uint8)


def _unpack_range(codes: torch.Tensor, bits: int, n: int, lo: int, hi: int,
                  q: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """Values [lo, hi) of packed planes holding n values -> q[:hi - lo] (uint8). The
    same values as `_unpack`, a few times faster on a CPU: a 4-bit plane's two values
    by a stack of contiguous ops, 2- and 1-bit planes' by a byte table (lo and hi
    multiples of 8)."""
    start, shift, m = 0, 0, hi - lo
    for b in _planes(bits):
        per = 8 // b
        plane = codes[start + lo // per:start + hi // per]
        out = (q if shift == 0 else part)[:m].view(-1, per)
        if per == 1:
            out.copy_(plane.view(-1, 1))
        elif per == 2:
            torch.stack((plane & 15, plane >> 4), dim=1, out=out)
        else:
            np.take(_byte_table(b, shift), plane.numpy(), axis=0, out=out.numpy())
        if shift:
            q[:m].bitwise_or_(part[:m])
        start += n * b // 8
        shift += b
    return q[:m]


def _decode_cpu(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                d: torch.Tensor, bits: int, group: int) -> None:
    """`GroupQuant.decode` into a contiguous CPU tensor: chunk by chunk, in buffers
    kept per thread; the reference's fp32 arithmetic, so the same bits."""
    n = d.numel()
    chunk = min(n, max(group, _DECODE_CHUNK // group * group))
    bufs = getattr(_work, "bufs", None)
    if bufs is None or bufs[0].numel() < chunk:
        with torch.inference_mode(False):  # made in vLLM's step, used outside it too
            bufs = _work.bufs = (torch.empty(chunk, dtype=torch.float32),
                                 torch.empty(chunk, dtype=torch.uint8),
                                 torch.empty(chunk, dtype=torch.uint8))
    f, q, part = bufs
    out = d.view(-1)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        w = f[:hi - lo]
        w.copy_(_unpack_range(codes, bits, n, lo, hi, q, part))
        g = slice(lo // group, hi // group)
        w.view(-1, group).sub_(zero[g].float().unsqueeze(1)).mul_(scale[g].float()
                                                                   .unsqueeze(1))
        out[lo:hi].copy_(w)


def _hqq_zero(w: torch.Tensor, inv: torch.Tensor, zero: torch.Tensor, qmax: int):
    """HQQ's proximal solver (hqq.core.optimize, legacy variant): refine the zero of
    each group (row of `w`) for an l_p error, scale fixed. fp32, on w's device; in
    four work buffers, in place: the same arithmetic (the same codes) as out of
    place, in about three quarters of its time (commit 6cc8453 says how measured)."""
    p, beta, kappa = _HQQ["lp_norm"], _HQQ["beta"], _HQQ["kappa"]
    best, best_zero = float("inf"), zero
    q, e, a, t = (torch.empty_like(w) for _ in range(4))
    for _ in range(_HQQ["iters"]):
        torch.mul(w, inv, out=q).add_(zero).round_().clamp_(0, qmax)
        torch.sub(q, zero, out=e).div_(inv)  # r, the decoded values
        torch.sub(w, e, out=e)  # e = w - r
        # the mean of the groups' sums, added up in numpy: a whole-tensor torch mean
        # splits its reduction over threads, and its rounding (so the early stop)
        # with them; torch splits a row sum only over rows
        err = float(torch.abs(e, out=a).sum(1, dtype=torch.float64).cpu().numpy().sum()
                    ) / w.numel()
        if err >= best:  # HQQ's early stop: keep the best zero seen
            break
        best, best_zero = err, zero
        # e = sign(e) * relu(|e| - (1 / beta) * (|e| + 1e-8) ** (p - 1))
        torch.add(a, 1e-8, out=t).pow_(p - 1).mul_(1.0 / beta)
        e.sign_().mul_(a.sub_(t).relu_())
        # zero = mean(q - (w - e) * inv) per group
        zero = torch.sub(q, torch.sub(w, e, out=t).mul_(inv), out=t).mean(1, keepdim=True)
        beta *= kappa
    return best_zero


_FP16_MAX = 65504.0
_FP16_TINY = 2.0 ** -24  # fp16's smallest (subnormal) step
_FP16_NORMAL = 2.0 ** -14  # fp16's smallest normal value
_ZERO_MAX = 2048.0  # fp16 holds every integer up to here: a zero within half a step


@dataclass(frozen=True)
class GroupQuant:
    bits: int
    group: int = 64
    method: str = "hqq"

    def describe(self) -> dict:
        """Part of a disk store's identity: a store encoded otherwise is rebuilt.
        `encoder` 2: HQQ's early stop no longer varies with the thread count; 4: a
        group's fp16 scale and zero are kept finite and the scale non-zero (a
        constant group decoded to NaN before), and a coarse scale rounds up."""
        return {"bits": self.bits, "group": self.group, "method": self.method,
                **({"encoder": 4} if self.bits < 16 else {})}

    def check(self, source: ExpertLayout) -> None:
        """A clear error when the group size does not fit the experts' shapes."""
        mats = [s for s in source.tensors if len(s.shape) > 1]
        for spec in mats:
            if spec.shape[-1] % self.group:
                shapes = " and ".join(str(list(s.shape)) for s in mats)
                divisors = [g for g in (64, 128, 32, 16, 8)  # the default first
                            if all(s.shape[-1] % g == 0 for s in mats)]
                raise ValueError(
                    f"expert_offload.store_group_size={self.group} does not divide the "
                    f"experts' input dimension {spec.shape[-1]} (expert tensors {shapes} "
                    "as the checkpoint holds them); "
                    + (f"set --expert-store-group-size to {divisors[0]}." if divisors else
                       "no group size (a multiple of 8) divides it: serve these experts "
                       "as they are (--expert-store-bits 16)."))

    def layout(self, source: ExpertLayout) -> ExpertLayout:
        """The record's tensors for an expert of `source` (the checkpoint's) layout."""
        if self.bits == 16:  # kept as it is (mixed precision's exact hot experts)
            return source
        specs = []
        for spec in source.tensors:
            if len(spec.shape) == 1:  # a bias: kept as it is
                specs.append(spec)
                continue
            n = spec.nbytes // spec.dtype.itemsize
            specs += [TensorSpec((n * self.bits // 8,), torch.uint8),
                      TensorSpec((n // self.group,), torch.float16),
                      TensorSpec((n // self.group,), torch.float16)]
        return ExpertLayout(tuple(specs))

    def encode(self, tensors: list[torch.Tensor],
               device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """An expert's tensors -> its record (on the CPU). The solver runs on `device`,
        a GPU where there is one: a CPU takes about 0.6 s an expert of Qwen3-30B-A3B
        (2 cores; benchmarks/dequant_kernel.py), about an hour a model, where a GPU's
        bandwidth should make it minutes at most (not yet measured); where the GPU
        has no room for one matrix's work (about five times its fp32 size), on the
        CPU."""
        out = []
        for t in tensors:
            if t.dim() == 1 or self.bits == 16:  # a bias, or 16 bits: kept as it is
                out.append(t.detach().to("cpu").contiguous())
                continue
            out += self._encode_on(t.detach(), torch.device(device))
        return out

    def _encode_on(self, t: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
        if device.type == "cuda":
            try:
                return [r.cpu() for r in self._encode_one(
                    t.to(device, torch.float32).reshape(-1, self.group))]
            except torch.cuda.OutOfMemoryError:
                pass  # (the cache is emptied below, once the failed frames are gone)
            torch.cuda.empty_cache()
        return self._encode_one(t.to("cpu", torch.float32).reshape(-1, self.group))

    def _encode_one(self, w: torch.Tensor) -> list[torch.Tensor]:
        """w [groups, group] fp32 -> codes, fp16 scales, fp16 zeros. The scale is at
        least fp16's smallest step (a constant group's range, 0, gave a scale of 0
        and a zero of inf: NaN weights) and large enough that the zero, up to
        |lo| / scale, stays where fp16 keeps it to half a step (a narrow group far
        from 0, as fp16 weights have at 8 bits, gave a zero of inf). That floor
        binds only where the range is under an eighth of the largest |value|."""
        qmax = (1 << self.bits) - 1
        if not bool(torch.isfinite(w).all()):  # one would spread to its whole group
            raise ValueError("it holds NaN or inf weights, which a quantized store "
                             "cannot encode; check the checkpoint, or serve its experts "
                             "as they are (--expert-store-bits 16)")
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        far = torch.maximum(lo.abs(), hi.abs())
        floor = far * (qmax / _ZERO_MAX)
        span = torch.maximum(hi - lo, floor)  # the range the codes cover: scale = span / qmax
        inv = qmax / span.clamp(min=qmax * _FP16_TINY)
        # A scale that the floor set, or that fp16 keeps as a subnormal (a relative
        # step up to 1/2 there, against 2^-11 for a normal one), is rounded up in
        # fp16 and the codes are chosen against it: rounded down, the group's top
        # codes overflowed qmax and were clamped (3% off, up to 33% at |w| ~ 1e-4).
        exact = 1.0 / inv
        coarse = (floor > hi - lo) | (exact < _FP16_NORMAL)
        if bool(coarse.any()):
            scale = exact.to(torch.float16)
            up = torch.where(scale.float() < exact, torch.nextafter(
                scale, torch.full_like(scale, float("inf"))), scale)
            inv = torch.where(coarse, 1.0 / up.float(), inv)
        zero = -lo * inv
        if self.method == "hqq":
            zero = _hqq_zero(w, inv, zero, qmax)
        # Codes are chosen for the fp16 scale and zero that the record keeps.
        scale = (1.0 / inv).to(torch.float16)
        if not bool(torch.isfinite(scale).all()):  # a group of range > ~65504 * qmax
            raise ValueError(
                f"a group of its weights spans {float((hi - lo).max()):.4g}, more than "
                f"an fp16 scale covers at {self.bits} bits; use --expert-store-bits 8 "
                "or 16")
        zero = zero.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)
        q = (w / scale.float() + zero.float()).round().clamp(0, qmax).to(torch.uint8)
        return [_pack(q.reshape(-1), self.bits), scale.reshape(-1), zero.reshape(-1)]

    def decode(self, stored: list[torch.Tensor], dst: list[torch.Tensor],
               reference: bool = False) -> None:
        """Stored record tensors (on dst's device) -> the expert's tensors `dst`.
        On CUDA a Triton kernel (dequant_kernel.py), on a CPU `_decode_cpu`, else (or
        with `reference`) the torch reference below; all bit-identical."""
        at = 0
        for d in dst:
            if d.dim() == 1 or self.bits == 16:  # kept as it is
                d.copy_(stored[at])
                at += 1
                continue
            codes, scale, zero = stored[at:at + 3]
            at += 3
            if d.is_contiguous() and not reference:
                if d.device.type == "cuda":
                    from .dequant_kernel import decode_into  # Triton: CUDA hosts only

                    decode_into(codes, scale, zero, d, self.bits, self.group)
                    continue
                if d.device.type == "cpu" and codes.is_contiguous():
                    _decode_cpu(codes, scale, zero, d, self.bits, self.group)
                    continue
            q = _unpack(codes, self.bits, d.numel()).view(-1, self.group)
            w = (q.float() - zero.float().unsqueeze(1)) * scale.float().unsqueeze(1)
            d.copy_(w.view(d.shape))


class Gather:
    """A kernel's packing of one expert as a gather (found by the vLLM layer, which
    probes it): slot tensor t's `index[t]` [its shape] holds positions in source
    tensor t (the checkpoint's layout), -1 for padding (zeros). Host mode applies it
    to each decoded expert; device mode's decoding fill gathers by it."""

    def __init__(self, index: list[torch.Tensor]):
        self.index = [i.clamp(min=0).view(-1).to(torch.int32) for i in index]
        self.pad = [(i < 0).view(-1) if bool((i < 0).any()) else None for i in index]
        self.shapes = [i.shape for i in index]
        self.blocks = [_block_transpose(i) for i in index]

    def __call__(self, expert: list[torch.Tensor]) -> list[torch.Tensor]:
        out = [torch.empty(shape, dtype=t.dtype, device=t.device)
               for t, shape in zip(expert, self.shapes)]
        self.into(expert, out)
        return out

    def into(self, expert: list[torch.Tensor], dst: list[torch.Tensor]) -> None:
        """The packed expert into `dst` (contiguous). A block transpose (vLLM's CPU
        prepack: rows in blocks of B, each block stored column by column) as strided
        copies, 128 rows at a time, where a gather reads an index as large as the
        expert: 2.0 against 5.3 ms per Qwen3-30B-A3B-shaped expert on 2 cores
        (benchmarks/dequant_kernel.py --device cpu)."""
        device = expert[0].device
        if self.index[0].device != device:  # once: the gather runs where the decode ran
            self.index = [i.to(device) for i in self.index]
            self.pad = [None if p is None else p.to(device) for p in self.pad]
        for t, d, index, pad, block in zip(expert, dst, self.index, self.pad, self.blocks):
            if block is not None:
                block, rows, cols = block
                src = t.reshape(rows // block, block, cols)
                out = d.view(rows // block, cols, block)
                step = max(1, 128 // block)
                for r in range(0, rows // block, step):
                    out[r:r + step].copy_(src[r:r + step].transpose(1, 2))
                continue
            flat = d.view(-1)
            torch.index_select(t.reshape(-1), 0, index, out=flat)
            if pad is not None:
                flat.masked_fill_(pad, 0)


def _block_transpose(index: torch.Tensor) -> tuple[int, int, int] | None:
    """(B, rows, cols) where `index` [rows, cols] packs rows in blocks of B, each
    block column by column (out[b, c, r] = in[b * B + r, c]), else None."""
    if index.dim() != 2 or index.numel() < 2 or int(index.view(-1)[1]) != index.shape[1]:
        return None
    rows, cols = index.shape
    flat = index.reshape(-1)
    for block in (16, 32, 8, 64, 4, 2):
        if rows % block:
            continue
        size = block * cols  # compared 1M values at a time (an index can be GBs)
        step = size * max(1, (1 << 20) // size)
        for lo in range(0, rows * cols, step):
            hi = min(lo + step, rows * cols)
            want = torch.arange(lo, hi, device=index.device).view(
                (hi - lo) // size, block, cols).transpose(1, 2).reshape(-1)
            if not torch.equal(flat[lo:hi].to(want.dtype), want):
                break
        else:
            return block, rows, cols
    return None


class QuantizedStore(ExpertStore):
    """A store of quantized records (`inner`, a HostStore or DiskStore with the codec's
    layout) behind the slot layout: `put` encodes, `read_into` decodes into the slot.
    Everything else (path, repairs, ...) is the inner store's.

    Experts are quantized in `source_layout` (the checkpoint's: w13 [2I, H], w2 [H, I],
    so groups run along each matrix's input dimension) and `packers[layer]` turns a
    decoded expert into the kernel's layout (vLLM's own packing; a layer without a
    packer has identical layouts, as GPU kernels do)."""

    def __init__(self, inner: ExpertStore, codec: GroupQuant, slot_layout: ExpertLayout,
                 source_layout: ExpertLayout | None = None,
                 encode_device: torch.device | str = "cpu"):
        self.inner, self.codec, self.layout = inner, codec, slot_layout
        self.encode_device = encode_device  # where `put` and repairs run the encoder
        if codec.bits < 16:  # re-encoded: not to the same codes on every CPU (store.py NOTE #1)
            inner.exact_rederive = False
        self.source = source_layout or slot_layout
        self.packers: dict[int, Callable[[list[torch.Tensor]], list[torch.Tensor]]] = {}
        self.num_layers, self.experts_per_layer = inner.num_layers, inner.experts_per_layer
        self.kind = inner.kind

    def __getattr__(self, name):
        if name == "inner":  # not set yet
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def reused(self) -> bool:
        return self.inner.reused

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes

    @property
    def read_bytes(self) -> int:
        return self.inner.layout.expert_bytes

    @property
    def record_bytes(self) -> int:
        return self.inner.layout.record_bytes

    @property
    def rederive(self):
        return getattr(self.inner, "rederive", None)

    @rederive.setter
    def rederive(self, fn):  # the checkpoint's expert, encoded like put() encodes it
        self.inner.rederive = None if fn is None else (
            lambda layer, expert: self._encode(fn(layer, expert)))

    def contains(self, layer, expert):
        return self.inner.contains(layer, expert)

    def is_complete(self):
        return self.inner.is_complete()

    def missing(self):
        return self.inner.missing()

    def put(self, layer, expert, tensors):
        """`tensors` in the source layout (the checkpoint's)."""
        if self.inner.reused:
            return  # the sealed file already holds this expert
        try:
            record = self._encode(tensors)
        except ValueError as e:
            raise ValueError(f"expert_offload.store_bits={self.codec.bits}: expert "
                             f"({layer}, {expert}): {e}") from None
        self.inner.put(layer, expert, record)

    def _encode(self, tensors):
        """`tensors`, checked to be in the source layout, encoded. A re-derived expert
        goes through here too: its encoded layout depends on element counts alone, so
        a checkpoint tensor read transposed would pass a check of the codes."""
        got = [(tuple(t.shape), t.dtype) for t in tensors]
        if got != [(s.shape, s.dtype) for s in self.source.tensors]:
            raise ValueError(f"expert tensors {got} do not match the quantized store's "
                             f"source layout {self.source.describe()}")
        return self.codec.encode(tensors, self.encode_device)

    def read_into(self, layer, expert, dst):
        device = dst[0].device
        if self.inner.kind == "host":
            src = [s.to(device, non_blocking=True) for s in self.inner.views(layer, expert)]
            n = self.read_bytes
        else:
            src = [torch.empty(s.shape, dtype=s.dtype, device=device)
                   for s in self.inner.layout.tensors]
            n = self.inner.read_into(layer, expert, src)
        pack = self.packers.get(layer)
        if pack is None:
            self.codec.decode(src, dst)
            return n
        expert_tensors = [torch.empty(s.shape, dtype=s.dtype, device=device)
                          for s in self.source.tensors]
        self.codec.decode(src, expert_tensors)
        if isinstance(pack, Gather) and all(d.is_contiguous() for d in dst):
            pack.into(expert_tensors, dst)
            return n
        for d, t in zip(dst, pack(expert_tensors)):
            d.copy_(t)
        return n

    def seal(self):
        self.inner.seal()

    def close(self):
        self.inner.close()

    def abandon(self):
        self.inner.abandon()


class MixedStore(ExpertStore):
    """Mixed precision: `hot` experts in one quantized store (more bits), the rest in
    `cold` (fewer); each holds only its own experts (`keys`), so RAM and disk fall with
    the mix. Reads and writes go to whichever holds the expert."""

    def __init__(self, hot: QuantizedStore, cold: QuantizedStore):
        self.hot, self.cold = hot, cold
        hot.packers = cold.packers  # one packer per layer serves both
        self.layout, self.source = cold.layout, cold.source
        self.num_layers, self.experts_per_layer = cold.num_layers, cold.experts_per_layer
        self.kind = cold.kind

    def _of(self, layer: int, expert: int) -> QuantizedStore:
        return self.hot if self.hot.inner.holds(layer, expert) else self.cold

    @property
    def stores(self) -> tuple[QuantizedStore, QuantizedStore]:
        return self.hot, self.cold

    @property
    def reused(self) -> bool:
        return self.hot.reused and self.cold.reused

    @property
    def nbytes(self) -> int:
        return self.hot.nbytes + self.cold.nbytes

    @property
    def read_bytes(self) -> int:  # the common case: a cold expert
        return self.cold.read_bytes

    @property
    def record_bytes(self) -> int:
        return self.cold.record_bytes

    def read_bytes_of(self, layer, expert):
        return self._of(layer, expert).read_bytes

    def record_bytes_of(self, layer, expert):
        return self._of(layer, expert).record_bytes

    @property
    def packers(self):
        return self.cold.packers

    @property
    def codec(self) -> GroupQuant:  # store_bits' codec; both decode at each miss
        return self.cold.codec

    @property
    def path(self):
        return self.cold.path

    @property
    def repairs(self) -> int:
        return sum(getattr(s.inner, "repairs", 0) for s in self.stores)

    @property
    def rederive(self):
        return self.cold.rederive

    @rederive.setter
    def rederive(self, fn):
        for s in self.stores:
            s.rederive = fn

    def contains(self, layer, expert):
        return self._of(layer, expert).contains(layer, expert)

    def is_complete(self):
        return all(s.is_complete() for s in self.stores)

    def missing(self):
        return sorted(self.hot.missing() + self.cold.missing())

    def put(self, layer, expert, tensors):
        self._of(layer, expert).put(layer, expert, tensors)

    def read_into(self, layer, expert, dst):
        return self._of(layer, expert).read_into(layer, expert, dst)

    def seal(self):
        for s in self.stores:
            s.seal()

    def close(self):
        for s in self.stores:
            s.close()

    def abandon(self):
        for s in self.stores:
            s.abandon()
