"""Expert residency kept on the GPU: no host sync per layer call, CUDA graphs kept.

Legend: T = tokens, K = top-k, L = MoE layers, E = experts per layer, S = slots,
d = prefetch distance, D = prefetch depth.

`DeviceExpertCache` has `ExpertCache`'s interface, but the slot table, the owner of
each slot, the eviction state (`reuse`: each expert's decayed use count, as in
core/eviction.py; or CLOCK's reference bits) and the counters live in device memory
and only the kernels of `residency_kernels.py` touch them while the model runs. A layer
call is two launches on the current stream (resolve, then fill) and no host work
that depends on data, so it can be captured in a CUDA graph. A miss is served at
link speed: fill reads the expert from the pinned host store in place (UVA) and
writes it into its slot; vLLM's kernel then reads the slot.

Prefetch (a predictor) runs on the device too: the predicted ids of layer L+d go
through `prefetch_kernel` on the compute stream, and their fill runs on a copy
stream that first waits for the compute stream; the call of layer L+d waits for
that fill with an event. Nothing waits on the host.

Synchronisation rules (why a slot is never overwritten while a kernel reads it):
NOTE #1: every table/owner/flags change happens on the compute stream, in order,
  inside resolve/prefetch kernels; kernels queued before a change read the old
  table, kernels queued after it read the new one.
NOTE #2: a demand fill runs on the compute stream, after every earlier kernel, so
  its victim slot has no reader left.
NOTE #3: a prefetch fill runs on the copy stream after the compute stream's point
  of the prefetch, so earlier kernels are done; only the current layer's own MoE
  kernel can run beside it, and its slots are never victims (they are in use).
  A prefetched slot is PROTECT until its target call settles it, so no other
  victim search can pick it while its fill may still be in flight.
NOTE #4: the pool must hold one layer call, the plan and the prefetch budget:
  S >= E + planned + budget, so a victim always exists (the kernel flags an error
  otherwise, and `sync_stats` raises it). With slot groups (slot_buffers.py) this
  holds in each group, whose budget and locks the kernels keep apart.
NOTE #5: a CUDA graph capture must end with every stream it forked joined again.
  A whole step in one graph does (the call of a prefetch's target layer joins its
  fill), but vLLM's piecewise graphs (prefill and mixed batches) end a capture at
  each attention op, between two MoE layer calls. In such a piece the caller joins
  (`join_prefetch`) after the layer's MoE kernel, so the prefetch still overlaps it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..core.eviction import HALF_LIFE_STEPS
from ..core.slot_pool import ExpertKey, SlotGroup
from ..core.stats import OffloadStats
from . import residency_kernels as K
from .slot_buffers import Later, SlotBuffers, read_later, reroute
from .quant import Gather, MixedStore, QuantizedStore
from .store import HostStore

_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
DEMAND_PARTS = 64  # programs that copy a call's misses (2 x 16 KiB in flight each)
PREFETCH_PARTS = 32  # fewer beside compute: the link, not the SMs, is the limit
DECODE_BLOCK = 4096  # values per step of a decoding fill program (2 KiB of 4-bit codes)
INTERPRETER_PARTS = 3  # off CUDA (Triton's interpreter, tests) programs run one by one


@dataclass
class _Decode:
    """One matrix that the decoding fill writes: slot tensor `tensor` (its buffer
    `dst`, flat) from the record's codes (byte offset), scale and zero (fp16 element
    offsets); n values in the record, n_out in the slot; `index`: the gather, if any."""
    tensor: int
    dst: torch.Tensor
    codes: int
    scale: int
    zero: int
    n: int
    n_out: int
    index: torch.Tensor | None = None

    def args(self) -> list:
        """decode_fill_kernel's arguments for this matrix (without a gather the index
        is not read: any pointer will do)."""
        return [self.dst, self.codes, self.scale, self.zero, self.n, self.n_out,
                self.dst if self.index is None else self.index]


@dataclass
class _Source:
    """A store whose records the fill reads in place (a mixed-precision store has two:
    its hot and its cold experts): its records as words (copies) and as bytes and fp16
    (decodes), the launches over them, and for a store of some experts only, each
    key's record row (`rows [L * E]`, -1: not here) and the experts it filled per
    layer (`loads [L]`)."""
    src: torch.Tensor
    record_words: int
    record_bytes: int
    read_bytes: int
    fill_groups: list  # (fill_kernel arguments, tensors) of each launch
    word_block: int  # words a fill program moves per step: 2 x 16 KiB in flight
    decodes: list[_Decode]
    copies: list[int]  # the slot tensors it copies as they are (biases; 16-bit matrices)
    codec: object = None
    codes: torch.Tensor | None = None
    halves: torch.Tensor | None = None
    decode_args: list = field(default_factory=list)
    rows: torch.Tensor | None = None
    loads: torch.Tensor | None = None


def _device_alias(t: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor over the pinned host tensor `t`: kernels read it in place over
    the link (unified addressing maps pinned memory at the same address)."""
    if t.device.type == "cuda" or not torch.cuda.is_available():
        return t
    typestr = {torch.int64: "<i8", torch.int32: "<i4", torch.int16: "<i2",
               torch.float16: "<f2", torch.uint8: "|u1"}[t.dtype]

    class _Interface:
        __cuda_array_interface__ = {"shape": tuple(t.shape), "typestr": typestr,
                                    "data": (t.data_ptr(), False), "version": 3,
                                    "strides": None}

    try:
        return torch.as_tensor(_Interface(), device="cuda")
    except (RuntimeError, TypeError):  # Triton also accepts the pinned tensor itself
        return t


class DeviceExpertCache(SlotBuffers):
    mode = "device"
    trace = None  # a routing trace (set_trace): each step's calls, written by flush_trace
    POLICIES = ("reuse", "clock")  # eviction in the kernels (residency_kernels.py)

    def __init__(self, store: HostStore | QuantizedStore | MixedStore, num_slots: int,
                 device: torch.device | str, stats: OffloadStats | None = None, predictor=None,
                 prefetch_budget_slots: int | None = None, eviction: str = "reuse",
                 groups: list[SlotGroup] | None = None):
        self.eviction = eviction
        self.store = store
        self.device = torch.device(device)
        L, E = store.num_layers, store.experts_per_layer
        self.num_layers, self.experts_per_layer, self.num_slots = L, E, num_slots
        self._set_groups(groups, num_slots)  # each holds one layer call
        self.stats = stats or OffloadStats()
        self.predictor = predictor
        self.depth = predictor.depth if predictor is not None else 0
        self._budget_cfg = prefetch_budget_slots  # per slot group (NOTE #4)
        self._planned: dict[ExpertKey, int] = {}
        self._stats_queued = self._stats_filled = 0  # stats_later's copies, in order
        self._host_evictions = [0] * L  # made by set_plan on the host
        self._planned_bytes = [0] * L  # read by set_plan on the host
        self.stats.untimed = True  # loads are not timed: timing them would sync
        dev, i32 = self.device, torch.int32
        self.buffers = [torch.zeros((num_slots, *spec.shape), dtype=spec.dtype, device=dev)
                        for spec in store.layout.tensors]
        # Device state (see residency_kernels.py).
        self.table = torch.full((L * E,), -1, dtype=i32, device=dev)
        self.owner = torch.full((num_slots,), -1, dtype=i32, device=dev)
        self.flags = torch.zeros(num_slots, dtype=i32, device=dev)
        self.state = torch.zeros(K.NSTATE, dtype=i32, device=dev)
        self.group_of_layer = torch.tensor(self._group_of, dtype=i32, device=dev)
        self.group_state = torch.zeros((len(self.groups), K.NGROUP.value), dtype=i32,
                                       device=dev)
        self.group_state[:, int(K.LO.value)] = torch.tensor([g.lo for g in self.groups])
        self.group_state[:, int(K.HI.value)] = torch.tensor([g.hi for g in self.groups])
        # `reuse` eviction: log2 of each key's decayed use count, of the decayed step
        # count, and each slot's value as a victim (scratch)
        self.uses = torch.full((L * E,), K.NEVER.value, dtype=torch.float32, device=dev)
        self.clock = torch.full((1,), K.NEVER.value, dtype=torch.float32, device=dev)
        self._values = torch.zeros(num_slots, dtype=torch.float32, device=dev)
        self.rebase_steps = 1 << 15  # how often the counts move back (tests: less)
        self._set_budgets()  # read by graphs, too
        self.counters = torch.zeros((L, int(K.NSTAT.value)), dtype=torch.int64, device=dev)
        self._rerouted = torch.zeros(L, dtype=torch.int64, device=dev)  # approximate mode
        depth = max(self.depth, 1)
        self.pred_counts = torch.zeros((L, depth, 3), dtype=torch.int64, device=dev)
        self._pmask = torch.zeros((L, depth, E), dtype=i32, device=dev)
        self._pvalid = torch.zeros((L, depth), dtype=i32, device=dev)
        self._need = torch.zeros(E, dtype=i32, device=dev)
        self._victims = torch.zeros(E, dtype=i32, device=dev)
        self._jobs = torch.full((2, E), -1, dtype=i32, device=dev)  # key, slot
        self.small_path = True  # decode-sized calls resolve in registers (benchmarks)
        # resolve -> demand fill as a programmatic dependent launch (Hopper and newer;
        # off until measured: benchmarks/gpu_stack.py "resident (PDL)")
        self.pdl = False
        cuda = self.device.type == "cuda"
        self.demand_parts = DEMAND_PARTS if cuda else INTERPRETER_PARTS
        self.prefetch_parts = PREFETCH_PARTS if cuda else INTERPRETER_PARTS
        self.decode_block = DECODE_BLOCK  # tests make it small: a range splits mid-matrix
        self._pjobs = torch.full((L, depth, 2, E), -1, dtype=i32, device=dev)
        self._e_pad = K.next_pow2(E)
        self._ch = min(K.next_pow2(max(g.size for g in self.groups)), 1024)
        self._setup_fill(store)
        self._cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._ready = [torch.cuda.Event() for _ in range(L)] if self._cuda else []
        self._pending: set[int] = set()  # targets whose prefetch fill this step issued

    def _setup_fill(self, store) -> None:
        """The fill's sources: the store, or a mixed store's two (their experts apart,
        so each launch fills the jobs whose expert it holds)."""
        stores = store.stores if isinstance(store, MixedStore) else (store,)
        mixed = len(stores) > 1
        # (a mixed store's hot or cold part may hold no expert: no profile counts)
        self._sources = [self._source(s, mixed) for s in stores
                         if not mixed or getattr(s, "inner", s).num_records]
        self._copies = sorted({t for src in self._sources for t in src.copies})
        self._packer, self._unpacked = None, False
        self._decode_launches()

    def _source(self, store, mixed: bool) -> _Source:
        """Fill copies words: the widest integer that divides every size and offset.
        One launch copies up to 4 of an expert's tensors; a record of more (a
        quantized checkpoint's: W4A16 has 8) takes one launch per 4. A quantized
        store's matrices are decoded instead (decode_fill_kernel, both in one
        launch); its other tensors (biases) are copied."""
        codec = getattr(store, "codec", None)
        host = store.inner if codec is not None else store  # a QuantizedStore's records
        if self.device.type == "cuda" and not host._data.is_pinned():
            raise ValueError("device mode needs the host store in pinned memory")
        record, offsets = host.layout.tensors, host._offsets
        source = store.source.tensors if codec is not None else store.layout.tensors
        copies, decodes, at = [], [], 0
        for t, (buf, spec) in enumerate(zip(self.buffers, source)):
            if codec is None or codec.bits == 16 or len(spec.shape) == 1:
                if (record[at].shape, record[at].dtype) != (tuple(buf.shape[1:]), buf.dtype):
                    raise ValueError(f"store record tensor {at} {list(record[at].shape)} "
                                     f"{record[at].dtype} is not slot tensor {t} "
                                     f"{list(buf.shape[1:])} {buf.dtype}")
                copies.append((t, buf, offsets[at], record[at].nbytes))
                at += 1
            else:  # codes, scale, zero (quant.py): matrix t decoded, maybe gathered
                n = spec.nbytes // spec.dtype.itemsize
                codes, scale, zero = offsets[at:at + 3]
                assert record[at].nbytes == n * codec.bits // 8 and scale % 2 == zero % 2 == 0
                decodes.append(_Decode(t, buf.view(-1), codes, scale // 2, zero // 2,
                                       n, buf[0].numel()))
                at += 3
        assert at == len(record), (at, len(record))
        word = next(w for w in (8, 4, 2, 1) if all(
            x % w == 0 for c in copies for x in c[2:]) and host.layout.record_bytes % w == 0)
        dtype = _WORDS[word]
        dst = [(b.view(-1).view(dtype), o // word, n // word) for _, b, o, n in copies]
        fill_groups = []
        for at in range(0, len(dst), 4):
            group = dst[at:at + 4]
            padded = group + [group[0]] * (4 - len(group))
            fill_groups.append(([x for d in padded for x in d], len(group)))
        src = _Source(_device_alias(host._data.view(dtype)), host.layout.record_bytes // word,
                      host.layout.record_bytes, store.read_bytes, fill_groups,
                      max(256, 16384 // word), decodes, [t for t, *_ in copies], codec)
        if decodes:
            src.codes = _device_alias(host._data)
            src.halves = _device_alias(host._data.view(torch.float16))
        if mixed:  # its keys' record rows, and its loads counted by the fill
            L, E = self.num_layers, self.experts_per_layer
            rows = torch.full((L * E,), -1, dtype=torch.int32)
            for row, (layer, e) in enumerate(host.keys):
                rows[layer * E + e] = row
            src.rows = rows.to(self.device)
            src.loads = torch.zeros(L, dtype=torch.int64, device=self.device)
        return src

    def _decode_launches(self) -> None:
        """Each launch's arguments: two matrices per launch, as one range."""
        self._unpacked = any(d.index is None and d.n != d.n_out
                             for src in self._sources for d in src.decodes)
        for src in self._sources:
            src.decode_args = []
            for at in range(0, len(src.decodes), 2):
                pair = src.decodes[at:at + 2]
                args = [x for d in pair + pair[:1] * (2 - len(pair)) for x in d.args()]
                src.decode_args.append((args, dict(
                    NM=len(pair), GATHER=self._packer is not None, BITS=src.codec.bits,
                    GROUP=src.codec.group, BF16=pair[0].dst.dtype == torch.bfloat16,
                    ROWS=src.rows is not None, COUNT=src.rows is not None and at == 0)))

    def set_packer(self, packer) -> None:
        """A kernel that wants the decoded expert in another layout than the
        checkpoint's (quant.QuantizedStore.packers): device mode's decode fill takes
        it as a gather (`packer.index`, `packer.pad` per tensor: a prepack that only
        moves values); every layer must share one."""
        if packer is self._packer:
            return
        if self._packer is not None or not any(src.decodes for src in self._sources):
            raise ValueError("device mode decodes every layer's experts with one packing")
        if not isinstance(packer, Gather):
            raise NotImplementedError(
                "this MoE kernel needs vLLM's own packing of each decoded expert, which "
                "device mode's fill cannot do (it gathers values only)")
        for t in self._copies:  # biases are copied as they are
            if packer.pad[t] is not None or not torch.equal(
                    packer.index[t].cpu(), torch.arange(packer.index[t].numel(),
                                                        dtype=packer.index[t].dtype)):
                raise NotImplementedError(
                    "this MoE kernel moves values of tensors that device mode's fill "
                    "copies as they are (biases, or a 16-bit hot store's matrices)")
        for d in (d for src in self._sources for d in src.decodes):
            index, pad = packer.index[d.tensor], packer.pad[d.tensor]
            index = index if pad is None else index.masked_fill(pad, -1)
            assert index.numel() == d.n_out, (index.numel(), d.n_out)
            d.index = index.to(self.device)
        self._packer = packer
        self._decode_launches()

    # ---- queries ----------------------------------------------------------------------

    def resident_mask(self, host: bool = True) -> torch.Tensor:
        """[L, E] bool on the host (a sync: call it between steps), or with
        `host=False` on the device (no sync)."""
        mask = (self.table >= 0).view(self.num_layers, self.experts_per_layer)
        return mask.cpu() if host else mask

    @property
    def eviction(self) -> str:
        return self._eviction

    @eviction.setter
    def eviction(self, name: str) -> None:
        """`reuse` (core/eviction.py's rule, in the kernels) or `clock`. It may change
        between calls (benchmarks); use counts are only kept while it is `reuse`."""
        if name not in self.POLICIES:
            raise ValueError(f"device mode evicts by one of {self.POLICIES}, not {name!r}")
        self._eviction = name
        self._policy = K.REUSE if name == "reuse" else K.CLOCK

    @property
    def prefetch_budget(self) -> int:
        """Slots prefetch may lock, over all slot groups."""
        return sum(self._budgets)

    def _set_budgets(self) -> None:
        """Each slot group's prefetch budget (NOTE #4), where the kernels read it."""
        self._budgets = self._prefetch_budgets(self._planned, self._budget_cfg)
        self.group_state[:, int(K.BUDGET.value)] = torch.tensor(self._budgets)

    def resident(self, layer: int) -> list[int]:
        return self.resident_mask()[layer].nonzero().flatten().tolist()

    # ---- one layer call ---------------------------------------------------------------

    def map_to_slots(self, layer: int, topk_ids: torch.Tensor,
                     hidden: torch.Tensor | None = None) -> torch.Tensor:
        """[T, K] expert ids of `layer` -> [T, K] slot ids, on the device only."""
        if self._unpacked:  # the slots' shape is not the checkpoint's: set_packer first
            raise RuntimeError("device mode: the decoded experts need the kernel's packing")
        if self._cuda and layer in self._pending:  # this layer's prefetch fill
            self._pending.discard(layer)
            torch.cuda.current_stream(self.device).wait_event(self._ready[layer])
        if self.trace is not None:
            self._record(layer, topk_ids)
        ids = topk_ids.reshape(-1).contiguous()
        rows = ids.numel()
        if rows == 0:  # one "no expert" id: the call still settles this layer's
            # prefetch locks (else they outlive it, and a plan takes their room)
            ids = torch.full((1,), -1, dtype=ids.dtype, device=ids.device)
        n = ids.numel()
        out = torch.empty_like(ids)
        jobs = min(self.experts_per_layer, n)
        E = self.experts_per_layer
        id_block = self._id_block(n)
        K.resolve_kernel[(1,)](
            ids, n, out, layer, self.table, self.owner, self.flags, self.state,
            self.group_of_layer, self.group_state, self._need, self._victims,
            self._jobs[0], self._jobs[1], self.counters, self._pmask, self._pvalid,
            self.pred_counts, self.uses, self.clock, self._values, E, jobs,
            self.num_layers, 1.0 / HALF_LIFE_STEPS,
            self.rebase_steps, DEPTH=self.depth, E_PAD=self._e_pad, ID_BLOCK=id_block,
            CH=self._ch,
            SMALL=self.small_path and n <= id_block and id_block * self._e_pad <= 8192,
            POLICY=self._policy,
            PDL=self.pdl)
        self._fill(self._jobs, jobs, self.demand_parts, self.pdl)
        if self.predictor is not None and hidden is not None and rows:
            # vLLM's padded rows (ids -1): their stale hidden states predict nothing
            self._prefetch(layer, hidden, topk_ids.view(topk_ids.shape[0], -1)[:, :1] < 0)
        return out[:rows].view(topk_ids.shape)

    # ---- routing trace ----------------------------------------------------------------

    def set_trace(self, trace, max_tokens: int, top_k: int) -> None:
        """Record each layer call's ids into a device buffer [L, max_tokens, top_k]
        (a copy a CUDA graph can hold); `flush_trace` writes a step's calls to
        `trace` after it ran. Calls outside a step (warm-up, profiling, capture) are
        not written."""
        self.trace = trace
        self._trace_ids = torch.zeros((self.num_layers, max_tokens, top_k),
                                      dtype=torch.int16, device=self.device)
        self._trace_pending: list = []  # read_later of steps not yet written

    def _record(self, layer: int, topk_ids: torch.Tensor) -> None:
        T = topk_ids.shape[0]
        if T > self._trace_ids.shape[1]:
            raise RuntimeError(f"expert offload: a layer call of {T} token rows, more than "
                               f"the {self._trace_ids.shape[1]} the routing trace was sized "
                               "for")
        self._trace_ids[layer, :T].copy_(topk_ids.view(T, -1))

    def flush_trace(self, num_tokens: int) -> None:
        """Write the step that ran, its first `num_tokens` rows (the step's tokens; a
        CUDA graph pads past them), one record per layer. The rows are copied without
        a wait (read_later) and written at the next step's flush, so the host waits
        for this step's copy one step later, while the next step runs; the last step
        is written by close_trace."""
        if self.trace is None:
            return
        if num_tokens > 0:
            self._trace_pending.append(read_later(self._trace_ids[:, :num_tokens]))
        while len(self._trace_pending) > 1:
            self._write_trace()

    def _write_trace(self) -> None:
        (ids,) = self._trace_pending.pop(0)()
        for layer in range(self.num_layers):
            self.trace.write(layer, ids.shape[2], ids[layer].numpy().tobytes())

    def close_trace(self) -> None:
        while self.trace is not None and self._trace_pending:
            self._write_trace()
        super().close_trace()

    def _fill(self, jobs: torch.Tensor, num_jobs: int, parts: int, pdl: bool = False
              ) -> None:
        """`pdl`: launch each fill as a programmatic dependent of the kernel before it."""
        launch = {"PDL": True, "launch_pdl": True} if pdl else {}
        E = self.experts_per_layer
        for src in self._sources:
            rows = src.rows if src.rows is not None else jobs[0]  # (not read)
            loads = src.loads if src.loads is not None else jobs[0]  # (not written)
            for at, (args, nt) in enumerate(src.fill_groups):  # counts: a store of copies
                K.fill_kernel[(parts,)](
                    src.src, jobs[0], jobs[1], num_jobs, src.record_words, *args, rows,
                    loads, E, NT=nt, PARTS=parts, BLOCK=src.word_block, E_PAD=self._e_pad,
                    ROWS=src.rows is not None,
                    COUNT=src.loads is not None and at == 0 and not src.decodes, **launch)
            for args, meta in src.decode_args:  # parts per matrix, as many programs
                K.decode_fill_kernel[(parts * meta["NM"],)](
                    src.codes, src.halves, jobs[0], jobs[1], num_jobs, src.record_bytes,
                    *args, rows, loads, E, **meta, PARTS=parts * meta["NM"],
                    BLOCK=self.decode_block, E_PAD=self._e_pad, **launch)

    @staticmethod
    def _id_block(n: int) -> int:
        return min(K.next_pow2(n), 1024)

    # ---- prefetch ---------------------------------------------------------------------

    def _prefetch(self, layer: int, hidden: torch.Tensor, padded: torch.Tensor) -> None:
        """`padded` [T, 1]: the call's rows whose predictions count for nothing."""
        predicted = self.predictor.predict_ids(layer, hidden)  # [(target, ids)], device
        if not predicted:
            return
        E = self.experts_per_layer
        launches = []
        for target, ids in predicted:
            d = target - layer
            if ids.shape[0] == padded.shape[0]:  # a row of predictions per token
                ids = torch.where(padded, -1, ids)
            ids = ids.reshape(-1).contiguous()
            n = ids.numel()
            jobs = min(E, n)  # not the budget: it lives on the device and may change
            pjobs = self._pjobs[layer, d - 1]
            K.prefetch_kernel[(1,)](
                ids, n, layer, target, d, self.table, self.owner, self.flags,
                self.group_of_layer, self.group_state, self._need, self._victims,
                pjobs[0], pjobs[1], self.counters, self._pmask, self._pvalid, self.uses,
                self.clock, self._values, E, jobs, self.num_layers, DEPTH=self.depth,
                E_PAD=self._e_pad, ID_BLOCK=self._id_block(n), CH=self._ch,
                POLICY=self._policy)
            launches.append((target, pjobs, jobs))
        if not self._cuda:  # the Triton interpreter (tests): no streams
            for _, pjobs, jobs in launches:
                self._fill(pjobs, jobs, self.prefetch_parts)
            return
        compute = torch.cuda.current_stream(self.device)
        self._copy_stream.wait_stream(compute)  # NOTE #3
        with torch.cuda.stream(self._copy_stream):
            for target, pjobs, jobs in launches:
                self._fill(pjobs, jobs, self.prefetch_parts)
                self._ready[target].record(self._copy_stream)
                self._pending.add(target)

    def join_prefetch(self) -> None:
        """Make the compute stream wait for every prefetch fill issued so far (NOTE #5);
        their target layers' calls then have nothing left to wait for."""
        if not self._cuda:  # the Triton interpreter: prefetch fills ran inline
            return
        compute = torch.cuda.current_stream(self.device)
        for target in sorted(self._pending):
            compute.wait_event(self._ready[target])
        self._pending.clear()

    # ---- residency plan (between steps; syncs) --------------------------------------

    @property
    def planned(self) -> list[ExpertKey]:
        return list(self._planned)

    def set_plan(self, keys: list[ExpertKey]) -> tuple[list[ExpertKey], list[ExpertKey]]:
        """Keep exactly `keys` pinned resident; load the missing ones now (on the
        compute stream, ordered after every queued kernel). Between steps only:
        it reads the device state back (a sync)."""
        keys = list(dict.fromkeys(keys))
        E = self.experts_per_layer
        self._check_plan(keys)
        table, owner, flags = (t.tolist() for t in (self.table, self.owner, self.flags))
        pinned, locked = int(K.PINNED.value), int(K.PINNED.value | K.PROTECT.value)
        wanted = set(keys)
        removed = [k for k in self._planned if k not in wanted]
        for k in removed:
            flags[self._planned.pop(k)] &= ~pinned
        added = [k for k in keys if k not in self._planned]
        for k in added:  # pin the resident ones first: they must not become victims
            slot = table[k.layer * E + k.expert]
            if slot >= 0:
                flags[slot] |= pinned
                self._planned[k] = slot
        victims = [iter(sorted((s for s in range(g.lo, g.hi) if not flags[s] & locked),
                               key=lambda s: owner[s] >= 0))  # free slots first
                   for g in self.groups]
        for k in added:
            if k in self._planned:
                continue
            slot, key = next(victims[self.group_of(k.layer)]), k.layer * E + k.expert
            if owner[slot] >= 0:
                table[owner[slot]] = -1
                self._host_evictions[owner[slot] // E] += 1
            self.store.read_into(k.layer, k.expert, self.slot_views(slot))
            self.stats.layer(k.layer).planned_loads += 1
            self._planned_bytes[k.layer] += self.store.read_bytes_of(k.layer, k.expert)
            table[key], owner[slot] = slot, key
            flags[slot] = pinned
            self._planned[k] = slot
        for dev, host in ((self.table, table), (self.owner, owner), (self.flags, flags)):
            dev.copy_(torch.tensor(host, dtype=dev.dtype))
        self._set_budgets()
        return added, removed

    def reroute_misses(self, layer: int, topk_ids: torch.Tensor, scores: torch.Tensor,
                       tokens: torch.Tensor) -> torch.Tensor:
        """Approximate mode (see ExpertCache.reroute_misses): reads the device table,
        counts on the device; no host sync."""
        E = self.experts_per_layer
        resident = self.table[layer * E:(layer + 1) * E] >= 0
        rerouted, count = reroute(resident, topk_ids, scores, tokens, sync=False)
        self._rerouted[layer] += count
        return rerouted

    # ---- counters -----------------------------------------------------------------------

    def occupancy(self) -> dict:
        """Slots holding an expert, pinned by the plan or prefetch, planned (a host
        sync: stats_later reads it without one)."""
        return self.stats_later()()[1]

    def misses_later(self) -> Later:
        """All misses so far, read later (read_later): the copy is queued now, with no
        host sync."""
        return read_later(self.counters[:, int(K.MISSES.value)].sum()).then(
            lambda host: int(host[0]))

    def sync_stats(self) -> OffloadStats:
        """Copy the device counters into `stats` (a host sync: not per layer call)."""
        return self.stats_later()()[0]

    def stats_later(self) -> Later:
        """(`stats`, occupancy) as of now, read later: the copies are queued now
        (read_later), with no host sync; `stats` is filled when the Later is called."""
        held = int(K.PINNED.value | K.PROTECT.value)
        slots = torch.stack([(self.owner >= 0).sum(), ((self.flags & held) != 0).sum(),
                             self.state[int(K.ERROR.value)].long()])
        loads = ([src.loads for src in self._sources]
                 if self._sources[0].loads is not None else [])
        planned, host_evictions = len(self._planned), list(self._host_evictions)
        planned_bytes = list(self._planned_bytes)
        read = read_later(self.counters, self.pred_counts, self._rerouted, slots, *loads)
        self._stats_queued += 1
        seq = self._stats_queued

        def fill(host: list[torch.Tensor]) -> tuple[OffloadStats, dict]:
            counters, preds, rerouted, (used, pinned, error), *loads = (
                t.tolist() for t in host)
            # `stats` never goes back: a copy read after a newer one fills a copy
            stats = self.stats if seq > self._stats_filled else copy.deepcopy(self.stats)
            self._stats_filled = max(self._stats_filled, seq)
            if error:
                raise RuntimeError(
                    "expert offload: a layer call found no evictable slot (pool "
                    f"{self.num_slots}, plan {planned}, prefetch budget "
                    f"{self.prefetch_budget}); this breaks the pool's sizing rule")
            for layer, row in enumerate(counters):
                s = stats.layer(layer)
                s.calls, s.hits, s.misses = row[0], row[1], row[2]
                s.evictions = row[3] + host_evictions[layer]
                s.prefetched, s.prefetch_hits, s.prefetch_wasted = row[4], row[5], row[6]
                s.rerouted = rerouted[layer]
                if loads:  # a mixed store: its fills counted by store
                    s.bytes_loaded = planned_bytes[layer] + sum(
                        n[layer] * src.read_bytes for n, src in zip(loads, self._sources))
                else:
                    s.bytes_loaded = (s.misses + s.prefetched + s.planned_loads) * \
                        self.read_bytes
                for d in range(self.depth):
                    s.predictions[d + 1] = list(preds[layer][d])
            return stats, {"used": used, "pinned": pinned, "planned": planned}
        return read.then(fill)

    def close(self) -> None:
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
