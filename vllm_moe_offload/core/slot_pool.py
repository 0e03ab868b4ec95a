"""A global pool of expert slots, paged like KV blocks.

Three plain structures: `(layer, expert) -> slot` table, a free list of empty
slots, and an eviction policy (`core/eviction.py`) that holds the resident,
unpinned slots and picks victims among them (LRU by default here; the engine
passes the configured one). Checks (`can_acquire`) are separate from changes
(`acquire`, `release`).

NOTE #1: a pinned slot is never in the policy's set and never evicted. `acquire`
pins every slot of one layer call before it picks victims for that call's
misses, so a call never evicts an expert it needs itself.
NOTE #2: every slot is in exactly one of: `_free`, the policy's set, pinned.
NOTE #3: every query and change costs O(1) per key it names: `_num_pinned` is a
count kept by `_pin`/`release`, never a scan over the S slots.
"""

from __future__ import annotations

import bisect
from typing import Iterable, NamedTuple

from .eviction import LRU, EvictionPolicy
from .keys import ExpertKey


class SlotGrant(NamedTuple):
    key: ExpertKey
    slot: int
    hit: bool  # the expert was already resident
    evicted: ExpertKey | None  # expert whose slot this miss took, if any


class SlotPool:
    def __init__(self, num_slots: int, policy: EvictionPolicy | None = None):
        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots} must be >= 1")
        self.num_slots = num_slots
        self.policy = policy if policy is not None else LRU()
        self._slot_of: dict[ExpertKey, int] = {}
        self._key_of: list[ExpertKey | None] = [None] * num_slots
        self._pins = [0] * num_slots
        self._free: list[int] = list(range(num_slots - 1, -1, -1))  # pop() gives 0 first
        self._num_pinned = 0  # slots with a pin count > 0 (NOTE #3)

    # ---- queries ----------------------------------------------------------------

    def lookup(self, key: ExpertKey) -> int | None:
        return self._slot_of.get(key)

    def __contains__(self, key: ExpertKey) -> bool:
        return key in self._slot_of

    def num_resident(self) -> int:
        return len(self._slot_of)

    def num_pinned(self) -> int:
        return self._num_pinned

    def can_acquire(self, keys: Iterable[ExpertKey]) -> bool:
        """True if `acquire(keys)` would find a slot for every missing key.

        O(len(keys)): the hits that are evictable will be pinned, so they leave
        the policy's set; every other evictable slot and every free slot can take
        a miss.
        """
        missing = hits_evictable = 0
        for key in set(keys):
            slot = self._slot_of.get(key)
            if slot is None:
                missing += 1
            elif self._pins[slot] == 0:
                hits_evictable += 1
        return missing <= len(self._free) + len(self.policy) - hits_evictable

    # ---- changes ----------------------------------------------------------------

    def start_call(self, layer: int) -> None:
        """A layer call begins: the policy's clock (layers run in a cycle)."""
        self.policy.start_call(layer)

    def hint(self, key: ExpertKey) -> None:
        """A predictor expects `key` at its layer's next call."""
        self.policy.hint(key)

    def acquire(self, keys: Iterable[ExpertKey], used: bool = False) -> list[SlotGrant] | None:
        """Pin a slot for each distinct key; load-on-miss is the caller's job.
        `used`: a layer call routed to these keys (not a prefetch or a plan).

        Returns None (and changes nothing) when the misses cannot all get a slot
        right now, i.e. too many slots are pinned.
        """
        keys = list(dict.fromkeys(keys))
        if not self.can_acquire(keys):
            return None
        grants: list[SlotGrant] = []
        misses = []
        for key in keys:  # pin hits first (NOTE #1)
            slot = self._slot_of.get(key)
            if slot is None:
                misses.append(key)
                continue
            self._pin(slot)
            grants.append(SlotGrant(key, slot, True, None))
        for key in misses:
            slot, evicted = self._take_slot()
            self._slot_of[key] = slot
            self._key_of[slot] = key
            self._pin(slot)
            grants.append(SlotGrant(key, slot, False, evicted))
        if used:  # every key is pinned now, so no policy reorders a queued slot
            for key in keys:
                self.policy.used(key)
        return grants

    def release(self, slots: Iterable[int]) -> None:
        """Unpin; a slot whose last pin goes becomes evictable (free if dropped)."""
        for slot in slots:
            if self._pins[slot] <= 0:
                raise RuntimeError(f"slot {slot} released more often than acquired")
            self._pins[slot] -= 1
            if self._pins[slot] == 0:
                self._num_pinned -= 1
                if self._key_of[slot] is None:
                    self._free.append(slot)
                else:
                    self.policy.add(slot, self._key_of[slot])

    def drop(self, key: ExpertKey) -> None:
        """Forget an expert: its slot no longer holds it (a load that failed), so
        the next acquire misses. An unpinned slot becomes free at once, a pinned
        one when its last pin is released."""
        slot = self._slot_of.pop(key, None)
        if slot is None:
            return
        self._key_of[slot] = None
        if self._pins[slot] == 0:
            self.policy.discard(slot)
            self._free.append(slot)

    # ---- internals --------------------------------------------------------------

    def _pin(self, slot: int) -> None:
        if self._pins[slot] == 0:
            self.policy.discard(slot)
            self._num_pinned += 1
        self._pins[slot] += 1

    def _take_slot(self) -> tuple[int, ExpertKey | None]:
        if self._free:
            return self._free.pop(), None
        slot = self.policy.pop_victim()
        evicted = self._key_of[slot]
        del self._slot_of[evicted]
        self._key_of[slot] = None
        return slot, evicted

    def check_invariants(self) -> None:
        """Raise AssertionError if NOTE #1/#2 or the two maps disagree (tests)."""
        pinned = {s for s, p in enumerate(self._pins) if p}
        free, evictable = set(self._free), self.policy.slots()
        assert len(evictable) == len(self.policy), "policy size drifted"
        assert len(self._free) == len(free), "slot twice in free list"
        assert not (free & evictable) and not (free & pinned) and not (evictable & pinned)
        assert free | evictable | pinned == set(range(self.num_slots))
        assert self._num_pinned == len(pinned), "pinned count drifted"
        for key, slot in self._slot_of.items():
            assert self._key_of[slot] == key
        assert all(self._key_of[s] is None for s in free)
        assert all(self._key_of[s] is not None for s in evictable)  # pinned: maybe dropped


# ---- slot groups ---------------------------------------------------------------------

class SlotGroup(NamedTuple):
    """Consecutive MoE layers whose experts take slots [lo, hi) only."""
    layers: range
    lo: int
    hi: int

    @property
    def size(self) -> int:
        return self.hi - self.lo


def split_pool(num_slots: int, num_layers: int, experts_per_layer: int,
               max_slots: int | None = None) -> list[SlotGroup] | None:
    """Slot groups for a pool whose kernel calls see at most `max_slots` slots (vLLM's
    CUDA MoE kernels: integration/vllm/model_state.py CUDA_MAX_SLOTS): one group of every layer and
    slot when the pool fits, else the fewest groups of consecutive layers, each with
    slots in proportion to its layers, within `max_slots` and holding at least one
    layer call (`experts_per_layer`). Where no proportional split does (few layers,
    many experts), the fewest groups get sizes as near proportion as those bounds
    allow. None when no split does."""
    if max_slots is None or num_slots <= max_slots:
        return [SlotGroup(range(num_layers), 0, num_slots)]
    fewest = -(-num_slots // max_slots)
    if fewest > num_layers or fewest * experts_per_layer > num_slots:
        return None  # more groups are only smaller
    for n in range(fewest, num_layers + 1):
        layers = [i * num_layers // n for i in range(n + 1)]
        slots = [num_slots * b // num_layers for b in layers]
        sizes = [b - a for a, b in zip(slots, slots[1:])]
        if min(sizes) < experts_per_layer:
            break
        if max(sizes) <= max_slots:
            return _groups(layers, sizes)
    layers = [i * num_layers // fewest for i in range(fewest + 1)]
    ideal = [num_slots * (b - a) / num_layers for a, b in zip(layers, layers[1:])]
    sizes = [min(max(int(x), experts_per_layer), max_slots) for x in ideal]
    # hand the difference to the groups furthest from their share, within the bounds
    left = num_slots - sum(sizes)
    over = [s - x for s, x in zip(sizes, ideal)]
    for i in sorted(range(fewest), key=over.__getitem__, reverse=left < 0):
        step = (min(left, max_slots - sizes[i]) if left > 0
                else -min(-left, sizes[i] - experts_per_layer))
        sizes[i] += step
        left -= step
    return _groups(layers, sizes)


def _groups(layers: list[int], sizes: list[int]) -> list[SlotGroup]:
    """Groups of layers [layers[i], layers[i + 1]) holding sizes[i] slots each."""
    edges = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [SlotGroup(range(layers[i], layers[i + 1]), edges[i], edges[i + 1])
            for i in range(len(sizes))]


def check_groups(groups: list[SlotGroup], num_slots: int, num_layers: int,
                 experts_per_layer: int) -> None:
    """Raise ValueError unless `groups` cover every layer and slot, in order, each
    holding one layer call."""
    layers = [layer for g in groups for layer in g.layers]
    edges = [g.lo for g in groups] + [groups[-1].hi] if groups else []
    if (layers != list(range(num_layers)) or not edges or edges[0] != 0
            or edges[-1] != num_slots
            or any(g.hi != n.lo for g, n in zip(groups, groups[1:]))):
        raise ValueError(f"slot groups {groups} do not cover layers 0..{num_layers - 1} "
                         f"and slots 0..{num_slots - 1} in order")
    for g in groups:
        if g.size < experts_per_layer:
            what = "a pool" if len(groups) == 1 else (
                f"the slot group of layers [{g.layers.start}, {g.layers.stop})")
            raise ValueError(f"{what} of {g.size} slots cannot hold one layer's "
                             f"{experts_per_layer} experts")


class GroupedSlotPool:
    """`SlotPool`s side by side, one per slot group: an expert takes a slot of its
    layer's group only. The SlotPool interface, with slot ids over the whole pool.
    Each group's policy is its own; every one of them sees every layer call."""

    def __init__(self, groups: list[SlotGroup], make_policy):
        self.groups = groups
        self.pools = [SlotPool(g.size, make_policy()) for g in groups]
        self.num_slots = groups[-1].hi
        self._group_of = [i for i, g in enumerate(groups) for _ in g.layers]
        self._starts = [g.lo for g in groups]

    @property
    def policy(self) -> EvictionPolicy:
        return self.pools[0].policy

    def group_of(self, layer: int) -> int:
        return self._group_of[layer]

    def _of_key(self, key: ExpertKey) -> tuple[SlotPool, int]:
        g = self._group_of[key.layer]
        return self.pools[g], self.groups[g].lo

    def _by_group(self, keys: Iterable[ExpertKey]) -> dict[int, list[ExpertKey]]:
        out: dict[int, list[ExpertKey]] = {}
        for key in dict.fromkeys(keys):
            out.setdefault(self._group_of[key.layer], []).append(key)
        return out

    def lookup(self, key: ExpertKey) -> int | None:
        pool, lo = self._of_key(key)
        slot = pool.lookup(key)
        return None if slot is None else slot + lo

    def __contains__(self, key: ExpertKey) -> bool:
        return key in self._of_key(key)[0]

    def num_resident(self) -> int:
        return sum(p.num_resident() for p in self.pools)

    def num_pinned(self, group: int | None = None) -> int:
        if group is not None:
            return self.pools[group].num_pinned()
        return sum(p.num_pinned() for p in self.pools)

    def can_acquire(self, keys: Iterable[ExpertKey]) -> bool:
        return all(self.pools[g].can_acquire(ks) for g, ks in self._by_group(keys).items())

    def start_call(self, layer: int) -> None:
        for pool in self.pools:
            pool.start_call(layer)

    def hint(self, key: ExpertKey) -> None:
        self._of_key(key)[0].hint(key)

    def acquire(self, keys: Iterable[ExpertKey], used: bool = False) -> list[SlotGrant] | None:
        """All or nothing, as SlotPool.acquire; grants in group order."""
        groups = self._by_group(keys)
        if not all(self.pools[g].can_acquire(ks) for g, ks in groups.items()):
            return None
        grants = []
        for g, ks in groups.items():
            lo = self.groups[g].lo
            grants += [x._replace(slot=x.slot + lo)
                       for x in self.pools[g].acquire(ks, used)]
        return grants

    def release(self, slots: Iterable[int]) -> None:
        for slot in slots:
            g = bisect.bisect_right(self._starts, slot) - 1
            self.pools[g].release([slot - self.groups[g].lo])

    def drop(self, key: ExpertKey) -> None:
        self._of_key(key)[0].drop(key)

    def check_invariants(self) -> None:
        for g, pool in enumerate(self.pools):
            pool.check_invariants()
            assert all(self._group_of[k.layer] == g for k in pool._slot_of), (
                "an expert outside its layer's group")
