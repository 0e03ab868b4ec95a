"""Slot buffers + slot pool + store (+ predictor): layer call ids -> slot ids.

Legend: T = tokens of the call, K = experts per token (top-k), S = slots,
L = MoE layers, E = experts per layer, H = hidden size, d = prefetch distance.

One `ExpertCache` serves all MoE layers of a model. A layer call hands in its
router output `topk_ids [T, K]`; the cache pins a slot for every distinct expert,
loads the missing ones from the store (synchronously: a stall), and returns
`slot_ids [T, K]` for the kernel, which runs over the slot buffers `[S, ...]` as
if they were the layer's own `[E, ...]` weights. Since S >= E a call never waits
on itself, and the kernel is the one plain vLLM runs.

With a predictor, the call then predicts the experts of layers L+1..L+d from its
hidden state `[T, H]` and starts loading them in the background (a loader thread
where the store reads on the host: a CPU, or the disk store on CUDA, whose thread
queues its copies on the copy stream; from the pinned host store on CUDA, copies
queued on the copy stream at once). Prefetched slots stay pinned until their target
layer runs, so later predictions cannot evict sooner ones, and at most S - E slots
are ever pinned by prefetch, so every layer call still fits.

NOTE #1: call pins are released when the *next* layer call starts. On CPU the
kernel has returned by then. On CUDA the copy stream first waits for the compute
stream, so a slot is never overwritten while a queued kernel still reads it.
NOTE #2: reading the call's distinct experts back (`_distinct`) is a host sync:
the host must know which experts miss before it can load them. This is the one
sync per layer call, and why this host mode runs without CUDA graphs. On CUDA with
the pinned host store, `DeviceExpertCache` (device mode) needs no sync at all.
NOTE #3: a slot with a load in flight is always pinned (by the call that loads it,
or by prefetch), so it is never chosen as a victim.
NOTE #4: on CUDA the device copy of the slot table is updated in place, entry by
entry as slots change (one small copy per call that changed any); never whole.
NOTE #5: an expert the store can neither read nor re-derive (`ExpertUnavailable`)
is dropped from the pool, so the next call that needs it tries again. With
`fail_requests` off the error reaches the caller. With it on (under vLLM) the call
goes on: the lost expert's rows read slot 0, whatever it holds, and their indices
land in `failed_rows`, whose requests the caller then fails without emitting their
tokens. Rows that did not route to it are exact: a row's experts read only that row.
NOTE #6: with slot groups (slot_buffers.py; vLLM's CUDA kernels see at most 992
slots), a layer's experts take slots of its group only, the ids handed to its
kernel count from the group's first slot, and the sizing rule above holds per
group: a group of S_g slots keeps E of them free of the plan and prefetch.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext

import torch

from ..core.eviction import make_policy
from ..core.slot_pool import ExpertKey, GroupedSlotPool, SlotGrant, SlotGroup
from ..core.stats import OffloadStats
from ..core.trace import TraceWriter
from .slot_buffers import Later, SlotBuffers, reroute
from .store import ExpertStore, ExpertUnavailable

logger = logging.getLogger("vllm.moe_offload")


class ExpertCache(SlotBuffers):
    mode = "host"

    def __init__(self, store: ExpertStore, num_slots: int, device: torch.device | str,
                 stats: OffloadStats | None = None, trace: TraceWriter | None = None,
                 predictor=None, prefetch_budget_slots: int | None = None,
                 eviction: str = "lru", groups: list[SlotGroup] | None = None):
        self.store = store
        self.device = torch.device(device)
        self.num_layers = store.num_layers
        self.experts_per_layer = store.experts_per_layer
        self.num_slots = num_slots
        self._set_groups(groups, num_slots)
        self.pool = GroupedSlotPool(self.groups,
                                    lambda: make_policy(eviction, self.num_layers))
        self.stats = stats or OffloadStats()
        self.trace = trace
        self.predictor = predictor
        # per slot group (NOTE #6): prefetch pins, and at most S_g - E of them
        self._budget_cfg = prefetch_budget_slots
        self._budgets = self._prefetch_budgets({}, prefetch_budget_slots)
        self._prefetch_pins = [0] * len(self.groups)
        self._planned: dict[ExpertKey, int] = {}  # residency plan: key -> pinned slot
        # One buffer per expert tensor (e.g. w13, w2): [S, *shape], allocated once.
        self.buffers = [torch.zeros((num_slots, *spec.shape), dtype=spec.dtype,
                                    device=self.device) for spec in store.layout.tensors]
        # expert -> slot per layer; -1 = not resident. The host copy is the truth.
        self._table = torch.full((self.num_layers, self.experts_per_layer), -1,
                                 dtype=torch.int32)
        # On CPU the kernel reads the host table itself; on CUDA a device copy.
        self._cuda = self.device.type == "cuda"
        self._table_dev = self._table.to(self.device) if self._cuda else self._table
        self._changed: dict[int, int] = {}  # flat key -> slot, not yet on the device
        self._call_pins: list[int] = []
        # target layer -> [(key, slot, loaded_by_prefetch)] pinned for that layer
        self._prefetched: dict[int, list[tuple[ExpertKey, int, bool]]] = {}
        self._inflight: dict[int, Future | torch.cuda.Event] = {}  # slot -> load
        self._release_when_loaded: list[tuple[int, int]] = []  # (slot, layer)
        self._predicted: dict[tuple[int, int], set[int]] = {}  # (target, d) -> experts
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        # Prefetch reads on a thread where the store reads on the host (a CPU, or a
        # disk store on CUDA: its reads then queue their copies on the copy stream);
        # from pinned host memory on CUDA, the copies are queued here, at once.
        host_reads = not self._cuda or store.kind == "disk"
        self._loader = (ThreadPoolExecutor(1, thread_name_prefix="expert-prefetch")
                        if predictor is not None and host_reads else None)
        self.fail_requests = False  # NOTE #5
        self.failed_rows: dict[int, str] = {}  # row of a call -> why its request fails
        self._lost: dict[ExpertKey, str] = {}  # unreadable now, retried on the next use

    @property
    def eviction(self) -> str:
        return self.pool.policy.name

    @property
    def prefetch_budget(self) -> int:
        """Slots prefetch may pin, over all slot groups."""
        return sum(self._budgets)

    def resident_mask(self, host: bool = True) -> torch.Tensor:
        """[L, E] bool: which experts are in the pool (or loading into it); on the
        host, where host mode keeps its table (`host` as DeviceExpertCache's)."""
        return self._table >= 0

    def resident(self, layer: int) -> list[int]:
        return [e for e in range(self.experts_per_layer) if self._table[layer, e] >= 0]

    # ---- one layer call -----------------------------------------------------------

    def map_to_slots(self, layer: int, topk_ids: torch.Tensor,
                     hidden: torch.Tensor | None = None) -> torch.Tensor:
        """[T, K] expert ids of `layer` -> [T, K] slot ids; loads misses first."""
        if self._call_pins:  # NOTE #1
            self.pool.release(self._call_pins)
            self._call_pins = []
        self._release_finished_prefetches()
        experts, padded = self._distinct(topk_ids)  # NOTE #2
        self.pool.start_call(layer)
        grants = self.pool.acquire((ExpertKey(layer, e) for e in experts), used=True)
        if grants is None:
            raise RuntimeError(f"layer {layer}: {len(experts)} experts do not fit in "
                               f"{self.num_slots} slots with {self.pool.num_pinned()} pinned")
        self._call_pins = [g.slot for g in grants]  # released even if a load raises
        stats = self.stats.layer(layer)
        stats.calls += 1
        hits = [g for g in grants if g.hit]
        misses = [g for g in grants if not g.hit]
        self._wait_for(layer, [g.slot for g in hits])
        self._settle_prefetch(layer, set(experts))
        if misses:
            self._load_now(layer, misses)
        row = self._table[layer].tolist()  # -1: lost (NOTE #5)
        lost = [e for e in experts if row[e] < 0]
        failed_hits = sum(row[g.key.expert] < 0 for g in hits)  # a prefetch that failed
        stats.hits += len(hits) - failed_hits
        stats.misses += failed_hits
        topk_rows = topk_ids
        if padded:  # vLLM's padded rows: no trace, no prediction
            routed = (topk_ids >= 0).all(-1)
            topk_rows = topk_ids[routed]
            hidden = hidden[routed] if hidden is not None else None
        if self.trace is not None and topk_rows.shape[0]:
            k = topk_ids.shape[-1]
            self.trace.write(layer, k, topk_rows.to(torch.int16).cpu().numpy().tobytes())
        if self.predictor is not None and hidden is not None and hidden.shape[0]:
            self._prefetch(layer, hidden)
        if self._changed:
            self._push_changes()
        flat = topk_ids.reshape(-1)
        slots = self._table_dev[layer].index_select(0, flat.clamp_min(0) if padded else flat)
        if lost:  # NOTE #5
            self._fail_rows(layer, topk_ids, lost)
            slots = slots.clamp_min(0)
        if padded:  # slot -1, which vLLM's kernels skip
            slots = torch.where(flat < 0, -1, slots)
        return slots.view(topk_ids.shape).to(topk_ids.dtype)

    def _fail_rows(self, layer: int, topk_ids: torch.Tensor, lost: list[int]) -> None:
        lost = set(lost)
        for row, ids in enumerate(topk_ids.tolist()):
            e = next((e for e in ids if e in lost), None)
            if e is not None:
                self.failed_rows.setdefault(row, self._lost.get(ExpertKey(layer, e), ""))

    def _lose(self, error: ExpertUnavailable, prefetched: bool = False) -> None:
        """NOTE #5: the expert is not in its slot; forget it (the slot is freed once
        unpinned) and say so once. `prefetched`: a prefetch's load, whose bytes were
        counted when it started."""
        key = ExpertKey(error.layer, error.expert)
        self.pool.drop(key)
        if self._table[key.layer, key.expert] >= 0:
            self._set(key.layer, key.expert, -1)
        if key in self._planned:  # the next plan loads it again
            self.pool.release([self._planned.pop(key)])
        stats = self.stats.layer(key.layer)
        stats.failed_loads += 1
        if prefetched:
            stats.prefetched -= 1
            stats.bytes_loaded -= self.store.read_bytes_of(key.layer, key.expert)
        if not self.fail_requests:
            raise error
        if key not in self._lost:
            logger.error("expert offload: %s. The requests routed to this expert fail; "
                         "the engine keeps serving and tries again at its next use.", error)
        self._lost[key] = str(error)

    def _distinct(self, topk_ids: torch.Tensor) -> tuple[list[int], bool]:
        """(the experts of a call, whether it has ids of -1: no expert, the rows vLLM
        pads a batch with on CUDA)."""
        if not self._cuda:
            ids = torch.unique(topk_ids).tolist()
        else:  # a scatter into [E] (and a bin for -1) and one read-back: cheaper on
            # the GPU than torch.unique
            E = self.experts_per_layer
            seen = torch.zeros(E + 1, dtype=torch.bool, device=self.device)
            flat = topk_ids.reshape(-1).long()
            seen[torch.where(flat < 0, E, flat)] = True
            ids = [e if e < E else -1 for e in seen.nonzero().flatten().tolist()]
        return [e for e in ids if e >= 0], bool(ids) and min(ids) < 0

    def _set(self, layer: int, expert: int, slot: int) -> None:
        """Point the table at `slot` (-1: none), by its id in the layer's group."""
        if slot >= 0:
            slot -= self.groups[self.group_of(layer)].lo
        self._table[layer, expert] = slot
        if self._cuda:
            self._changed[layer * self.experts_per_layer + expert] = slot

    def _push_changes(self) -> None:
        """NOTE #4: write the changed entries of the device table, in stream order."""
        keys, slots = zip(*self._changed.items())
        self._changed.clear()
        idx = torch.tensor(keys, dtype=torch.long).pin_memory()
        val = torch.tensor(slots, dtype=torch.int32).pin_memory()
        self._table_dev.view(-1).index_put_(
            (idx.to(self.device, non_blocking=True),), val.to(self.device, non_blocking=True))

    def _load_now(self, layer: int, misses: list[SlotGrant]) -> None:
        stats = self.stats.layer(layer)
        t0 = time.perf_counter()
        for g in misses:
            self._evict(g)
        if self._cuda:  # wait for kernels that may still read the victims' slots
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copy_stream) if self._cuda else nullcontext():
            nbytes = sum(n for n, _ in self._copy_all(misses))
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
            self._copy_stream.synchronize()  # on-demand: the stall is real, count it
        seconds = time.perf_counter() - t0
        stats.misses += len(misses)
        stats.bytes_loaded += nbytes
        stats.load_seconds += seconds
        stats.stall_seconds += seconds

    def _copy_all(self, misses: list[SlotGrant]) -> list[tuple[int, float]]:
        """Load `misses`: (bytes, seconds) of each. If one raises (fail_requests off:
        ExpertUnavailable; or any other error), the pool forgets it and those not
        loaded yet, so that no later call takes their slots for theirs."""
        out = []
        for i, g in enumerate(misses):
            t0 = time.perf_counter()
            try:
                nbytes = self._copy_in(g)
            except BaseException:
                for rest in misses[i:]:
                    self.pool.drop(rest.key)
                raise
            out.append((nbytes, time.perf_counter() - t0))
        return out

    def _evict(self, grant: SlotGrant) -> None:
        if grant.evicted is not None:
            self._set(grant.evicted.layer, grant.evicted.expert, -1)
            self.stats.layer(grant.evicted.layer).evictions += 1

    def _copy_in(self, grant: SlotGrant) -> int:
        try:
            nbytes = self.store.read_into(grant.key.layer, grant.key.expert,
                                          self.slot_views(grant.slot))
        except ExpertUnavailable as e:
            self._lose(e)
            return 0
        self._set(grant.key.layer, grant.key.expert, grant.slot)
        if self._lost.pop(grant.key, None) is not None:
            logger.warning("expert offload: expert %s is readable again", tuple(grant.key))
        return nbytes

    # ---- residency plan -------------------------------------------------------------

    @property
    def planned(self) -> list[ExpertKey]:
        return list(self._planned)

    def set_plan(self, keys: list[ExpertKey]) -> tuple[list[ExpertKey], list[ExpertKey]]:
        """Keep exactly `keys` pinned resident (loading the missing ones now); the
        rest of the pool is the eviction policy's and prefetch's. Returns (added, removed).

        Called between forward steps. The plan plus one layer call plus prefetch
        must fit: at most S - E slots are planned, and the prefetch budget shrinks
        by what the plan holds.
        """
        keys = list(dict.fromkeys(keys))
        self._check_plan(keys)
        self._release_finished_prefetches(wait=True)  # their pins are prefetch's budget
        wanted = set(keys)
        removed = [k for k in self._planned if k not in wanted]
        self.pool.release([self._planned.pop(k) for k in removed])
        added = [k for k in keys if k not in self._planned]
        grants = self.pool.acquire(added)
        if grants is None:
            raise RuntimeError(f"residency plan: {len(added)} experts do not fit with "
                               f"{self.pool.num_pinned()} of {self.num_slots} slots pinned")
        misses = [g for g in grants if not g.hit]
        for g in misses:
            self._evict(g)
        try:
            loads = self._copy_all(misses)
        except BaseException:  # fail_requests off: none of them is planned
            self.pool.release([g.slot for g in grants])
            self._budgets = self._prefetch_budgets(self._planned, self._budget_cfg)
            raise
        for g, (nbytes, seconds) in zip(misses, loads):
            stats = self.stats.layer(g.key.layer)
            stats.bytes_loaded += nbytes
            stats.load_seconds += seconds
            stats.planned_loads += g.key not in self._lost
        for g in grants:
            if g.key in self._lost:  # NOTE #5: not loaded, not planned
                self.pool.release([g.slot])
            else:
                self._planned[g.key] = g.slot
        self._budgets = self._prefetch_budgets(self._planned, self._budget_cfg)
        return added, removed

    def reroute_misses(self, layer: int, topk_ids: torch.Tensor, scores: torch.Tensor,
                       tokens: torch.Tensor) -> torch.Tensor:
        """Approximate mode: for the `tokens` [T] bool rows, replace every expert
        that is not resident by the best-scoring resident expert the token did not
        pick (`scores` [T, E] router logits). Exact rows are left alone; a row
        keeps its misses when too few experts are resident."""
        rerouted, count = reroute(self.resident_mask()[layer], topk_ids, scores, tokens)
        self.stats.layer(layer).rerouted += count
        return rerouted

    def sync_stats(self):
        return self.stats  # host mode counts on the host as it goes

    def misses_later(self) -> Later:
        """All misses so far (DeviceExpertCache reads its count later)."""
        return Later.now(self.stats.totals().misses)

    def stats_later(self) -> Later:
        """(`stats`, occupancy) now (DeviceExpertCache reads them later)."""
        return Later.now((self.stats, self.occupancy()))

    def occupancy(self) -> dict:
        """Slots holding an expert, pinned (a call, prefetch or the plan), planned."""
        return {"used": self.pool.num_resident(), "pinned": self.pool.num_pinned(),
                "planned": len(self._planned)}

    # ---- prefetch -----------------------------------------------------------------

    def _prefetch(self, layer: int, hidden: torch.Tensor) -> None:
        # every prediction is scored, even once its group's budget is spent
        room = [True] * len(self.groups)
        for target, experts in self.predictor.predict(layer, hidden):
            self._predicted[(target, target - layer)] = set(experts)
            pinned = self._prefetched.setdefault(target, [])
            already = {key.expert for key, _, _ in pinned}
            group = self.group_of(target)
            for e in reversed(experts):  # the least wanted hinted first, so the first
                self.pool.hint(ExpertKey(target, e))  # a hinted layer gives up
            for e in experts:
                if not room[group] or (self._prefetch_pins[group]
                                       >= self._budgets[group]):
                    room[group] = False
                    break
                if e in already:
                    continue
                grants = self.pool.acquire([ExpertKey(target, e)])
                if grants is None:
                    room[group] = False
                    break
                (g,) = grants
                self._prefetch_pins[group] += 1
                pinned.append((g.key, g.slot, not g.hit))
                if not g.hit:
                    self._evict(g)
                    self._start_load(g)

    def _start_load(self, grant: SlotGrant) -> None:
        stats = self.stats.layer(grant.key.layer)
        stats.prefetched += 1
        stats.bytes_loaded += self.store.read_bytes_of(grant.key.layer, grant.key.expert)
        self._set(grant.key.layer, grant.key.expert, grant.slot)
        if self._cuda:  # the copies come after every kernel queued so far (NOTE #1)
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        if self._loader is None:  # CUDA, the pinned host store
            with torch.cuda.stream(self._copy_stream):
                try:
                    self.store.read_into(grant.key.layer, grant.key.expert,
                                         self.slot_views(grant.slot))
                except ExpertUnavailable as e:
                    self._lose(e, prefetched=True)  # its pin goes when its layer runs
                    return
                event = torch.cuda.Event()
                event.record(self._copy_stream)
            self._inflight[grant.slot] = event
            return

        def load(views=self.slot_views(grant.slot), key=grant.key):
            """(seconds, the copy's event on CUDA) or the ExpertUnavailable."""
            t0 = time.perf_counter()
            with torch.cuda.stream(self._copy_stream) if self._cuda else nullcontext():
                try:
                    self.store.read_into(key.layer, key.expert, views)
                except ExpertUnavailable as e:
                    return e  # NOTE #5, handled on the calling thread
                except Exception as e:  # any failed read loses the expert, not its pins
                    logger.warning("expert offload: prefetch of expert %s failed",
                                   tuple(key), exc_info=True)
                    return ExpertUnavailable(key.layer, key.expert,
                                             f"reading it failed: {e!r}")
                event = torch.cuda.Event() if self._cuda else None
                if event is not None:
                    event.record(self._copy_stream)
            return time.perf_counter() - t0, event

        self._inflight[grant.slot] = self._loader.submit(load)

    def _wait_for(self, layer: int, slots: list[int]) -> None:
        """Block until loads into `slots` finished; the wait is a stall."""
        stats = self.stats.layer(layer)
        for slot in slots:
            pending = self._inflight.pop(slot, None)
            if pending is None:
                continue
            if isinstance(pending, Future):  # a read on the loader thread
                t0 = time.perf_counter()
                result = pending.result()
                stats.stall_seconds += time.perf_counter() - t0
                if isinstance(result, ExpertUnavailable):
                    self._lose(result, prefetched=True)
                    continue
                seconds, pending = result
                stats.load_seconds += seconds
            if pending is not None:  # CUDA: the compute stream after the copy, no host sync
                torch.cuda.current_stream(self.device).wait_event(pending)

    def _settle_prefetch(self, layer: int, used: set[int]) -> None:
        """Score this layer's predictions and drop its prefetch pins."""
        stats = self.stats.layer(layer)
        for d in range(1, self.predictor.depth + 1 if self.predictor else 1):
            predicted = self._predicted.pop((layer, d), None)
            if predicted is not None:
                acc = stats.prediction(d)
                acc[0] += len(predicted & used)
                acc[1] += len(predicted)
                acc[2] += len(used)
        for key, slot, loaded in self._prefetched.pop(layer, []):
            if loaded and self._table[key.layer, key.expert] >= 0:  # (not lost: NOTE #5)
                if key.expert not in used:
                    stats.prefetch_wasted += 1  # (undone if its load fails later)
                else:
                    stats.prefetch_hits += 1  # a miss that prefetch covered
            if slot in self._inflight and key.expert not in used:
                # NOTE #3; still prefetch's pin (budget) until it is released
                self._release_when_loaded.append((slot, layer))
            else:
                self._prefetch_pins[self.group_of(layer)] -= 1
                self.pool.release([slot])

    @staticmethod
    def _finished(pending) -> bool:
        """A load whose slot may be reused: its read returned and, on CUDA, its
        copy ran (an event; a read on the loader thread returns its event)."""
        if isinstance(pending, Future):
            if not pending.done():
                return False
            result = pending.result()
            pending = result[1] if isinstance(result, tuple) else None
        return pending is None or pending.query()

    def _release_finished_prefetches(self, wait: bool = False) -> None:
        """Release the pins of wasted prefetches whose loads are done (`wait`: all of
        them, once their loads are). Each entry leaves the list before it is handled,
        and those after one that raises go back, so none is released twice or lost."""
        entries, self._release_when_loaded = self._release_when_loaded, []
        for i, (slot, layer) in enumerate(entries):
            try:
                if not self._release_one(slot, layer, wait):
                    self._release_when_loaded.append((slot, layer))
            except BaseException:  # (fail_requests off: the lost expert's error)
                self._release_when_loaded += entries[i + 1:]
                raise

    def _release_one(self, slot: int, layer: int, wait: bool) -> bool:
        pending = self._inflight.get(slot)
        if not wait and not self._finished(pending):
            return False
        self._inflight.pop(slot, None)
        result = pending.result() if isinstance(pending, Future) else pending
        if isinstance(result, tuple):  # (seconds, the copy's event on CUDA)
            self.stats.layer(layer).load_seconds += result[0]  # wasted, but it ran
            result = result[1]
        if isinstance(result, torch.cuda.Event):
            result.synchronize()
        self._prefetch_pins[self.group_of(layer)] -= 1
        self.pool.release([slot])
        if isinstance(result, ExpertUnavailable):  # NOTE #5: counted wasted when settled
            self.stats.layer(layer).prefetch_wasted -= 1
            self._lose(result, prefetched=True)
        return True

    def close(self) -> None:
        if self._loader is not None:
            self._loader.shutdown(wait=True)
            self._release_finished_prefetches()  # their copy time counts too
