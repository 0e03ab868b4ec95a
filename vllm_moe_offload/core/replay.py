"""Replay a routing trace against a slot pool: hit rate, bytes, stalls, tokens/s.

Pure Python. A trace is a sequence of layer calls (step, layer, distinct experts);
a hardware profile gives the costs (link bandwidth, compute time per layer call,
bytes per expert). The timing model:
- compute of layer calls runs back to back; a call starts when its experts are in;
- loads use one link, in issue order, at `link_gbps`;
- on-demand misses are issued when the call starts (a stall);
- with prefetch (`depth` > 0, oracle predictions from the trace itself) the experts
  of the next `depth` calls are issued when the current call starts, so they load
  while it computes. Prefetched experts are protected until their call.

Policies: `lru`, `lfu` (ties: least recent), `fifo`, `layer-cyclic` (evict from the
layer whose turn comes last in the layer cycle: the one just run; LRU within a
layer), and `belady`: evict the expert whose next use is farthest in the future,
with the future read from the trace, i.e. eviction driven by a perfect predictor
(the optimum a predictor can approach).
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Iterable, NamedTuple

from .slot_pool import ExpertKey

POLICIES = ("lru", "lfu", "fifo", "layer-cyclic", "belady")


class Call(NamedTuple):
    step: int
    layer: int
    experts: tuple[int, ...]  # distinct experts the call routed to
    tokens: int


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    link_gbps: float  # host-to-device bytes per second / 1e9
    compute_s_per_layer: float  # one decoder layer at batch 1 (attention + experts)
    bytes_per_expert: int
    layers: int  # the real model's MoE layers and routing, for the bound
    experts: int
    top_k: int

    def load_s(self, num_experts: int = 1) -> float:
        return num_experts * self.bytes_per_expert / (self.link_gbps * 1e9)


# Numbers from ../shared/ANCHORS.md (bf16 experts; compute from its H100 figures,
# DeepSeek-V2-Lite and OLMoE scaled by active parameters).
_MODELS = {
    "mixtral-8x7b": dict(layers=32, experts=8, top_k=2, bytes_per_expert=352_000_000,
                         compute_s_per_layer=240e-6),
    "qwen3-30b-a3b": dict(layers=48, experts=128, top_k=8, bytes_per_expert=9_400_000,
                          compute_s_per_layer=42e-6),
    "deepseek-v2-lite": dict(layers=26, experts=64, top_k=6, bytes_per_expert=17_300_000,
                             compute_s_per_layer=45e-6),
    "olmoe-1b-7b": dict(layers=16, experts=64, top_k=8, bytes_per_expert=12_600_000,
                        compute_s_per_layer=30e-6),
}
_LINKS = {"pcie4": 25.0, "pcie5": 55.0}
PROFILES = {f"{m}-{l}": HardwareProfile(f"{m}-{l}", gbps, **spec)
            for m, spec in _MODELS.items() for l, gbps in _LINKS.items()}


@dataclass
class ReplayResult:
    policy: str
    depth: int
    hits: int
    misses: int
    prefetched: int
    prefetch_hits: int
    bytes_moved: int
    stall_s: float
    total_s: float
    tokens: int
    steps: int

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total_s if self.total_s else 0.0


def calls_from_records(records: Iterable) -> list[Call]:
    """Trace records (core.trace) -> calls in trace order."""
    return [Call(r.step, r.layer, tuple(sorted(set(r.expert_ids))), r.num_tokens)
            for r in records]


class _Pool:
    """Slot pool with a pluggable victim choice (the engine's SlotPool is LRU)."""

    def __init__(self, num_slots: int, policy: str, future: dict[ExpertKey, list[int]],
                 num_layers: int = 1):
        if policy not in POLICIES:
            raise ValueError(f"--policy {policy!r}: choose from {', '.join(POLICIES)}")
        self.num_slots, self.policy, self.future = num_slots, policy, future
        self.resident: OrderedDict[ExpertKey, None] = OrderedDict()  # LRU / FIFO order
        self.uses: dict[ExpertKey, int] = defaultdict(int)
        self.num_layers = num_layers
        self.layer = 0  # the layer running now (for layer-cyclic)

    def touch(self, key: ExpertKey) -> None:
        self.uses[key] += 1
        if self.policy != "fifo":
            self.resident.move_to_end(key)

    def admit(self, key: ExpertKey, now: int, protected: set) -> bool:
        """Make `key` resident; False if every resident expert is protected."""
        if len(self.resident) >= self.num_slots:
            victim = self._victim(now, protected)
            if victim is None:
                return False
            del self.resident[victim]
        self.resident[key] = None
        self.uses[key] += 1
        return True

    def _victim(self, now: int, protected: set) -> ExpertKey | None:
        candidates = [k for k in self.resident if k not in protected]
        if not candidates:
            return None
        if self.policy in ("lru", "fifo"):
            return candidates[0]
        if self.policy == "lfu":
            return min(candidates, key=lambda k: self.uses[k])  # stable: LRU among ties
        if self.policy == "layer-cyclic":  # stable: LRU among one layer's experts
            return max(candidates, key=lambda k: (k.layer - self.layer - 1) % self.num_layers)
        return max(candidates, key=lambda k: self._next_use(k, now))

    def _next_use(self, key: ExpertKey, now: int) -> float:
        times = self.future.get(key, [])
        i = bisect_right(times, now)
        return times[i] if i < len(times) else float("inf")


def replay(calls: list[Call], num_slots: int, policy: str, profile: HardwareProfile,
           depth: int = 0) -> ReplayResult:
    max_experts = max((len(c.experts) for c in calls), default=0)
    if num_slots < max_experts:
        raise ValueError(f"--pool-slots {num_slots} is smaller than the largest layer call "
                         f"({max_experts} experts); use at least {max_experts}")
    future: dict[ExpertKey, list[int]] = defaultdict(list)
    for i, c in enumerate(calls):
        for e in c.experts:
            future[ExpertKey(c.layer, e)].append(i)
    pool = _Pool(num_slots, policy, future, num_layers=max(c.layer for c in calls) + 1)
    ready_at: dict[ExpertKey, float] = {}  # prefetched key -> when its load finishes
    prefetched_for: dict[int, set[ExpertKey]] = defaultdict(set)
    clock = link_free = stall = 0.0
    hits = misses = prefetched = prefetch_hits = 0
    load = profile.load_s()
    for i, c in enumerate(calls):
        keys = [ExpertKey(c.layer, e) for e in c.experts]
        protected = set(keys)
        for j in range(i + 1, min(i + depth, len(calls) - 1) + 1):
            protected |= prefetched_for[j]
        start = clock
        pool.layer = c.layer
        for key in keys:  # hits, including experts that prefetch brought in
            if key in pool.resident:
                pool.touch(key)
                hits += 1
                if key in prefetched_for[i]:
                    prefetch_hits += 1
                start = max(start, ready_at.pop(key, 0.0))
        for key in keys:  # on-demand misses: a stall
            if key in pool.resident:
                continue
            misses += 1
            pool.admit(key, i, protected)
            link_free = max(link_free, clock) + load
            start = max(start, link_free)
        stall += start - clock
        for j in range(i + 1, min(i + depth, len(calls) - 1) + 1):  # oracle prefetch
            for e in calls[j].experts:
                key = ExpertKey(calls[j].layer, e)
                if key in pool.resident or key in prefetched_for[j]:
                    continue
                if not pool.admit(key, i, protected):
                    break
                prefetched += 1
                prefetched_for[j].add(key)
                protected.add(key)
                link_free = max(link_free, start) + load
                ready_at[key] = link_free
        prefetched_for.pop(i, None)
        clock = start + profile.compute_s_per_layer
    steps = len({c.step for c in calls})
    tokens = sum(c.tokens for c in calls if c.layer == calls[0].layer) if calls else 0
    return ReplayResult(policy, depth, hits, misses, prefetched, prefetch_hits,
                        (misses + prefetched) * profile.bytes_per_expert, stall, clock,
                        tokens, steps)


def lower_bound_s_per_token(profile: HardwareProfile, hit_rate: float) -> float:
    """The profile's own model at batch 1: T >= L * k * (1 - h) * bytes / bandwidth
    (ANCHORS.md), and never less than its compute, L * compute per layer."""
    moved = profile.layers * profile.top_k * (1 - hit_rate) * profile.bytes_per_expert
    return max(moved / (profile.link_gbps * 1e9), profile.layers * profile.compute_s_per_layer)


def trace_bound_tokens_per_s(calls: list[Call], profile: HardwareProfile,
                             bytes_moved: float) -> float:
    """Best tokens/s on this trace when the link must move `bytes_moved`: compute runs
    every call, and at best transfer and compute overlap completely."""
    transfer = bytes_moved / (profile.link_gbps * 1e9)
    compute = len(calls) * profile.compute_s_per_layer
    tokens = sum(c.tokens for c in calls if c.layer == calls[0].layer)
    return tokens / max(transfer, compute)


def all_miss_bytes(calls: list[Call], profile: HardwareProfile) -> int:
    return sum(len(c.experts) for c in calls) * profile.bytes_per_expert
