"""What host mode (ExpertCache) and device mode (DeviceExpertCache) share."""

from __future__ import annotations

from typing import Callable

import torch

from ..core.slot_pool import SlotGroup, check_groups
from .store import ExpertStore


class Later:
    """A value read from the device later (read_later): call it for the value (it
    waits for its own copy alone); `ready()` says whether that would return at once
    (it never waits). `then(f)` is the value passed through f."""

    def __init__(self, read: Callable[[], object], ready: Callable[[], bool]):
        self._read, self.ready = read, ready

    def __call__(self):
        return self._read()

    def then(self, f: Callable) -> "Later":
        return Later(lambda: f(self._read()), self.ready)

    @staticmethod
    def now(value) -> "Later":
        """A value the host has already (host mode)."""
        return Later(lambda: value, lambda: True)


def read_later(*tensors: torch.Tensor) -> Later:
    """Copy `tensors` to the host without making it wait: into pinned buffers, with an
    event on the current stream. The Later returned gives the host copies, the values
    of when this was called, and waits for that copy alone (not for work queued after
    it). On the CPU it copies at once."""
    if not tensors[0].is_cuda:
        return Later.now([t.clone() for t in tensors])
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for h, t in zip(host, tensors):
        h.copy_(t, non_blocking=True)
    done = torch.cuda.Event(blocking=True)  # the waiting thread sleeps, not spins
    done.record()

    def read() -> list[torch.Tensor]:
        done.synchronize()
        return host
    return Later(read, done.query)


def copy_in(dst: torch.Tensor, host: torch.Tensor) -> None:
    """`dst.copy_(host)`, queued on the current stream without making the host wait
    for the work before it (on CUDA, from pinned memory: torch's caching host
    allocator keeps the buffer until the copy ran). A step's inputs written in
    place: with vLLM's async scheduling, the previous step may still be running.
    The copy comes after it in stream order, so that step reads its own values."""
    if dst.is_cuda:
        dst.copy_(host.pin_memory(), non_blocking=True)
    else:
        dst.copy_(host)


class SlotBuffers:
    """What both modes share: the slot buffers [S, *shape], one per expert tensor,
    and the slot groups (core/slot_pool.py): the experts of a group's layers live in
    its slots only, and a layer's kernel sees its group's slots, with slot ids that
    count from the group's first slot."""

    store: ExpertStore
    buffers: list[torch.Tensor]
    groups: list[SlotGroup]

    def flush_trace(self, num_tokens: int) -> None:
        """After a step of `num_tokens` rows: host mode writes each call as it goes
        (DeviceExpertCache writes its steps from a device buffer)."""

    def close_trace(self) -> None:
        """Write what the routing trace still holds, and close it."""
        if self.trace is not None:
            self.trace.close()

    def _set_groups(self, groups: list[SlotGroup] | None, num_slots: int) -> None:
        L, E = self.store.num_layers, self.store.experts_per_layer
        self.groups = groups or [SlotGroup(range(L), 0, num_slots)]
        check_groups(self.groups, num_slots, L, E)
        self._group_of = [i for i, g in enumerate(self.groups) for _ in g.layers]

    def group_of(self, layer: int) -> int:
        return self._group_of[layer]

    def layer_buffers(self, layer: int) -> list[torch.Tensor]:
        """The slot buffers that `layer`'s kernel reads: its group's slots [lo:hi]
        (views, so a slot filled for the whole pool shows in them)."""
        g = self.groups[self._group_of[layer]]
        return [b[g.lo:g.hi] for b in self.buffers]

    def layer_slots(self, layer: int) -> int:
        """How many slots `layer`'s kernel sees (the experts it is told of)."""
        return self.groups[self._group_of[layer]].size

    def _prefetch_budgets(self, planned, configured: int | None) -> list[int]:
        """Per slot group, the slots prefetch may hold: its room beside one layer call
        and its plan (S_g - E - planned), within `configured` (None: no more)."""
        E = self.store.experts_per_layer
        held = [0] * len(self.groups)
        for key in planned:
            held[self._group_of[key.layer]] += 1
        return [max(0, min(g.size - E if configured is None else configured,
                           g.size - E - n)) for g, n in zip(self.groups, held)]

    @property
    def plan_room(self) -> int:
        """The most experts a residency plan can pin: every group keeps one layer
        call's worth of slots free of it."""
        E = self.store.experts_per_layer
        return sum(g.size - E for g in self.groups)

    def fit_plan(self, keys: list, limit: int | None = None) -> list:
        """The first keys of a ranked plan, at most `limit`, that fit their groups'
        room (S_g - E each: plan_room)."""
        E = self.store.experts_per_layer
        room = [g.size - E for g in self.groups]
        out = []
        for key in keys:
            if limit is not None and len(out) >= limit:
                break
            g = self._group_of[key.layer]
            if room[g] > 0:
                room[g] -= 1
                out.append(key)
        return out

    def _check_plan(self, keys: list) -> None:
        """Raise ValueError where a plan does not fit (fit_plan keeps what does)."""
        if len(self.fit_plan(keys)) == len(keys):
            return
        E, S = self.store.experts_per_layer, self.groups[-1].hi
        if len(self.groups) == 1:
            raise ValueError(f"a residency plan of {len(keys)} experts leaves no room for "
                             f"one layer call ({E} of {S} slots); plan at most {S - E}")
        raise ValueError(
            f"a residency plan of {len(keys)} experts leaves no room for one layer call "
            f"({E} slots) in some slot group; a group of layers [a, b) with n slots "
            "plans at most n - E: "
            + ", ".join(f"[{g.layers.start}, {g.layers.stop}): {g.size - E}"
                        for g in self.groups))

    @property
    def slot_bytes(self) -> int:
        return self.store.layout.expert_bytes

    @property
    def read_bytes(self) -> int:
        """Bytes one expert load moves from the store (less than a slot when quantized)."""
        return self.store.read_bytes

    @property
    def pool_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def slot_views(self, slot: int) -> list[torch.Tensor]:
        return [b[slot] for b in self.buffers]


def reroute(resident: torch.Tensor, topk_ids: torch.Tensor, scores: torch.Tensor,
            tokens: torch.Tensor, sync: bool = True) -> tuple[torch.Tensor, int]:
    """`resident` [E] bool; see `ExpertCache.reroute_misses`. Returns (ids, swaps).
    `sync=False` (device mode): no early return and the swaps as a device tensor, so
    nothing reads the device (a CUDA graph can hold it)."""
    resident = resident.to(topk_ids.device)
    ids = topk_ids.long().clamp_min(0)  # -1, vLLM's padded rows: left as they are
    tokens = tokens.to(topk_ids.device) & (topk_ids >= 0).all(1)
    if sync and (not bool(tokens.any()) or bool(resident[ids[tokens]].all())):
        return topk_ids, 0
    scores = scores.float().masked_fill(~resident, float("-inf"))
    scores = scores.scatter(1, ids, float("-inf"))
    best_scores, best = scores.topk(topk_ids.shape[1], dim=1)
    miss = ~resident[ids] & tokens.unsqueeze(1)
    rank = (miss.cumsum(1) - 1).clamp(min=0)  # a row's i-th miss takes its i-th best
    swap = miss & torch.isfinite(best_scores.gather(1, rank))
    count = swap.sum()
    return (torch.where(swap, best.gather(1, rank).to(topk_ids.dtype), topk_ids),
            int(count) if sync else count)
