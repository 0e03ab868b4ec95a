"""Eviction policies: which resident, unpinned expert gives up its slot.

`SlotPool` owns the slots and their pins; a policy owns only the set of evictable
slots and picks victims from it. The pool calls these hooks:
    start_call(layer)  a layer call begins (the clock: layers run in a cycle)
    used(key)          that layer call routed to `key` (prefetch and plans are not uses)
    hint(key)          a predictor expects `key` at its layer's next call
    add(slot, key)     the slot lost its last pin: it may be evicted
    discard(slot)      it was pinned again or dropped
    pop_victim()       remove and return the slot to evict (the set is never empty)
Legend: S = slots, L = MoE layers, H = half-life in steps.

NOTE #1: every hook costs O(1) or O(log S) per key (heaps with lazy deletion,
compacted when half their entries are stale). `layer` and `reuse` pick a victim by
looking at one candidate per layer: O(L), never a scan over the S slots.
NOTE #2: a key's decayed use count only changes in `used`, which the pool calls
while the key is pinned, so a key in a heap never changes its order. Decay is kept
in log2 space against one shared clock (2^(step / H) per use), so ageing every key
at once is free and order-preserving.
NOTE #3: the engine's steps visit every layer once, so a layer's decayed visit count
is the decayed step count `_steps`; a key's chance to be routed at its layer's next
call is p = 2^(score - _steps), capped at 1.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict

from .keys import ExpertKey

POLICIES = ("lru", "lfu", "layer", "reuse", "predicted")
DEFAULT_POLICY = "reuse"
HALF_LIFE_STEPS = 8.0  # measured in docs/results.md section 7
_NEVER = -math.inf  # score of a key that no layer call used


def _log2_add(a: float, b: float) -> float:
    """log2(2^a + 2^b) without overflow."""
    if a == _NEVER:
        return b
    hi, lo = max(a, b), min(a, b)
    return hi + math.log2(1.0 + 2.0 ** (lo - hi))


class EvictionPolicy:
    """What `SlotPool` calls. The base keeps the clock (layer, step) and ignores uses
    and hints; a policy keeps the evictable set and picks victims."""

    name = ""

    def __init__(self, num_layers: int = 1):
        self.num_layers = max(1, num_layers)
        self.layer = 0  # the layer whose call runs now
        self.step = 0  # forward steps seen (a new one starts when the layer index drops)

    def start_call(self, layer: int) -> None:
        if layer <= self.layer:
            self.step += 1
        self.layer = layer

    def used(self, key: ExpertKey) -> None:
        pass

    def hint(self, key: ExpertKey) -> None:
        pass

    def add(self, slot: int, key: ExpertKey) -> None:
        raise NotImplementedError

    def discard(self, slot: int) -> None:
        raise NotImplementedError

    def pop_victim(self) -> int:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def slots(self) -> set[int]:
        """The evictable slots (O(S): for invariant checks in tests)."""
        raise NotImplementedError


class LRU(EvictionPolicy):
    """The slot whose last pin went longest ago."""

    name = "lru"

    def __init__(self, num_layers: int = 1):
        super().__init__(num_layers)
        self._order: OrderedDict[int, ExpertKey] = OrderedDict()  # oldest first

    def add(self, slot: int, key: ExpertKey) -> None:
        self._order[slot] = key

    def discard(self, slot: int) -> None:
        self._order.pop(slot, None)

    def pop_victim(self) -> int:
        slot, _ = self._order.popitem(last=False)
        return slot

    def __len__(self) -> int:
        return len(self._order)

    def slots(self) -> set[int]:
        return set(self._order)


class _LazyHeap:
    """Min-heap of slots with lazy deletion: (priority, seq, slot) entries; an entry
    is live while `_live[slot]` is its seq."""

    def __init__(self):
        self._heap: list[tuple[float, int, int]] = []
        self._live: dict[int, int] = {}  # slot -> seq of its live entry
        self._seq = itertools.count()

    def push(self, slot: int, priority: float) -> None:
        seq = next(self._seq)  # later seq = added later: ties go to the older entry
        self._live[slot] = seq
        heapq.heappush(self._heap, (priority, seq, slot))
        if len(self._heap) > 2 * len(self._live) + 32:  # NOTE #1: compact
            self._heap = [e for e in self._heap if self._live.get(e[2]) == e[1]]
            heapq.heapify(self._heap)

    def remove(self, slot: int) -> bool:
        return self._live.pop(slot, None) is not None

    def peek(self) -> tuple[float, int] | None:
        """(priority, slot) of the smallest live entry, or None."""
        heap = self._heap
        while heap and self._live.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)
        return (heap[0][0], heap[0][2]) if heap else None

    def pop(self) -> int:
        _, slot = self.peek()
        heapq.heappop(self._heap)
        del self._live[slot]
        return slot

    def __contains__(self, slot: int) -> bool:
        return slot in self._live

    def __len__(self) -> int:
        return len(self._live)

    def slots(self) -> set[int]:
        return set(self._live)


class HeapPolicy(EvictionPolicy):
    """Evict the lowest `priority(key)`, fixed when the slot becomes evictable (a key
    in the heap is never used, so its priority cannot change). Ties: the slot
    evictable longest."""

    def __init__(self, num_layers: int = 1):
        super().__init__(num_layers)
        self._heap = _LazyHeap()

    def priority(self, key: ExpertKey) -> float:
        raise NotImplementedError

    def add(self, slot: int, key: ExpertKey) -> None:
        self._heap.push(slot, self.priority(key))

    def discard(self, slot: int) -> None:
        self._heap.remove(slot)

    def pop_victim(self) -> int:
        return self._heap.pop()

    def __len__(self) -> int:
        return len(self._heap)

    def slots(self) -> set[int]:
        return self._heap.slots()


class _DecayedUses(EvictionPolicy):
    """Decayed use counts (NOTE #2, #3), for the policies that weigh frequency; it
    keeps no evictable set of its own."""

    def __init__(self, num_layers: int = 1, half_life_steps: float = HALF_LIFE_STEPS):
        super().__init__(num_layers)
        self.half_life_steps = half_life_steps
        self._score: dict[ExpertKey, float] = {}  # log2 of the decayed use count
        self._steps = _NEVER  # log2 of the decayed step count (NOTE #3)

    def start_call(self, layer: int) -> None:
        new_step = layer <= self.layer or self._steps == _NEVER
        super().start_call(layer)
        if new_step:
            self._steps = _log2_add(self._steps, self._now())

    def _now(self) -> float:
        return self.step / self.half_life_steps

    def used(self, key: ExpertKey) -> None:
        self._score[key] = _log2_add(self._score.get(key, _NEVER), self._now())

    def score(self, key: ExpertKey) -> float:
        return self._score.get(key, _NEVER)


class DecayedFrequency(_DecayedUses, HeapPolicy):
    """LFU with ageing: evict the lowest decayed use count; a use counts half as
    much after H steps (NOTE #2)."""

    name = "lfu"

    def priority(self, key: ExpertKey) -> float:
        return self.score(key)


class LayerCycle(EvictionPolicy):
    """Layer-aware: layers run in a cycle, so an expert of the layer that just ran
    is the one needed furthest away. Evict from the layer whose next call is
    farthest (this one, then the one before, ...); LRU within a layer."""

    name = "layer"

    def __init__(self, num_layers: int = 1):
        super().__init__(num_layers)
        self._by_layer = [OrderedDict() for _ in range(self.num_layers)]
        self._layer_of: dict[int, int] = {}

    def add(self, slot: int, key: ExpertKey) -> None:
        self._by_layer[key.layer][slot] = None
        self._layer_of[slot] = key.layer

    def discard(self, slot: int) -> None:
        layer = self._layer_of.pop(slot, None)
        if layer is not None:
            del self._by_layer[layer][slot]

    def pop_victim(self) -> int:
        for back in range(self.num_layers):  # NOTE #1: O(L)
            order = self._by_layer[(self.layer - back) % self.num_layers]
            if order:
                slot, _ = order.popitem(last=False)
                del self._layer_of[slot]
                return slot
        raise RuntimeError("pop_victim on an empty policy")

    def __len__(self) -> int:
        return len(self._layer_of)

    def slots(self) -> set[int]:
        return set(self._layer_of)


class ReuseDistance(_DecayedUses):
    """Layer cycle x decayed frequency: evict the expert whose next use is expected
    furthest away. A key of layer l, routed at a call of l with chance p (NOTE #3),
    is next needed after dist(l) + L * (1/p - 1) layer calls, dist(l) being the calls
    until l runs again. Within a layer that is the lowest score; across layers one
    candidate each is compared.

    With `use_hints` (the `predicted` policy) a key that a predictor names for its
    layer's next call counts as certain (p = 1) until that call."""

    name = "reuse"

    def __init__(self, num_layers: int = 1, half_life_steps: float = HALF_LIFE_STEPS,
                 use_hints: bool = False):
        super().__init__(num_layers, half_life_steps)
        if use_hints:
            self.name = "predicted"
        self.use_hints = use_hints
        self._heaps = [_LazyHeap() for _ in range(self.num_layers)]
        self._hinted = [OrderedDict() for _ in range(self.num_layers)]  # slot -> key
        self._key_of: dict[int, ExpertKey] = {}  # evictable slot -> key
        self._slot_of: dict[ExpertKey, int] = {}  # and back
        # per layer: keys a predictor named for that layer's next call
        self._hints: list[set[ExpertKey]] = [set() for _ in range(self.num_layers)]

    def start_call(self, layer: int) -> None:
        super().start_call(layer)
        self._hints[layer].clear()  # this layer's call settles its hints
        for slot, key in self._hinted[layer].items():
            self._heaps[layer].push(slot, self.score(key))
        self._hinted[layer].clear()

    def hint(self, key: ExpertKey) -> None:
        if not self.use_hints or key in self._hints[key.layer]:
            return
        self._hints[key.layer].add(key)
        slot = self._slot_of.get(key)
        if slot is not None and self._heaps[key.layer].remove(slot):
            self._hinted[key.layer][slot] = key

    def add(self, slot: int, key: ExpertKey) -> None:
        self._key_of[slot] = key
        self._slot_of[key] = slot
        if key in self._hints[key.layer]:
            self._hinted[key.layer][slot] = key
        else:
            self._heaps[key.layer].push(slot, self.score(key))

    def discard(self, slot: int) -> None:
        key = self._key_of.pop(slot, None)
        if key is None:
            return
        del self._slot_of[key]
        if not self._heaps[key.layer].remove(slot):
            del self._hinted[key.layer][slot]

    def _expected(self, layer: int, score: float | None) -> tuple[float, int]:
        """(layer calls until the next use, calls until the layer runs) of the
        layer's best candidate: score None = a hinted key (p = 1)."""
        dist = (layer - self.layer - 1) % self.num_layers + 1
        if score is None:
            return float(dist), dist
        if score == _NEVER or self._steps - score > 60:
            return math.inf, dist
        inv_p = max(1.0, 2.0 ** (self._steps - score))
        return dist + self.num_layers * (inv_p - 1.0), dist

    def pop_victim(self) -> int:
        best, best_layer = None, -1
        for layer in range(self.num_layers):  # NOTE #1: O(L)
            top = self._heaps[layer].peek()
            if top is not None:
                value = self._expected(layer, top[0])
            elif self._hinted[layer]:
                value = self._expected(layer, None)
            else:
                continue
            if best is None or value > best:
                best, best_layer = value, layer
        if best is None:
            raise RuntimeError("pop_victim on an empty policy")
        if self._heaps[best_layer]:
            slot = self._heaps[best_layer].pop()
        else:
            slot, _ = self._hinted[best_layer].popitem(last=False)
        del self._slot_of[self._key_of.pop(slot)]
        return slot

    def __len__(self) -> int:
        return len(self._key_of)

    def slots(self) -> set[int]:
        return set(self._key_of)


DEVICE_POLICIES = ("reuse",)  # device mode's kernels run these ('auto' is 'reuse' there)


def host_only_reason(name: str) -> str | None:
    """Why eviction `name` needs host mode; None where device mode's kernels run it."""
    if name == "auto" or name in DEVICE_POLICIES:
        return None
    return (f"eviction={name!r} runs on the host (device mode's kernels evict by "
            "'reuse'; eviction='auto' or 'reuse' keeps it)")


def make_policy(name: str, num_layers: int) -> EvictionPolicy:
    """The policy called `name` for a model of `num_layers` MoE layers."""
    if name == "lru":
        return LRU(num_layers)
    if name == "lfu":
        return DecayedFrequency(num_layers)
    if name == "layer":
        return LayerCycle(num_layers)
    if name in ("reuse", "predicted"):
        return ReuseDistance(num_layers, use_hints=name == "predicted")
    raise ValueError(f"expert_offload.eviction={name!r} is not a known policy; use one "
                     f"of {', '.join(POLICIES)} (--expert-eviction).")
