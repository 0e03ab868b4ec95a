"""Replay a routing trace against a slot pool: hit rate, bytes, stalls, tokens/s.

Pure Python. A trace is a sequence of layer calls (step, layer, distinct experts);
a hardware profile gives the costs (link bandwidth, compute time per layer call,
bytes per expert). The timing model:
- compute of layer calls runs back to back; a call starts when its experts are in;
- loads use one link, in issue order, at `link_gbps`;
- on-demand misses are issued when the call starts (a stall);
- with prefetch (`depth` > 0, oracle predictions from the trace itself) the experts
  of the next `depth` calls of the same step are issued when the current call
  starts, so they load while it computes. Prefetched experts are protected until
  their call. As in the engine, whose predictors look ahead within one forward pass,
  a step's first layer is never prefetched.

The pool is the engine's own `SlotPool` with the engine's own eviction policies
(`core/eviction.py`), driven in the engine's order (`runtime/expert_cache.py`): a call's
pins go when the next call starts; prefetch pins go at their target call; prefetch
holds at most S - E slots. So replay and engine cannot drift: LRU replay reproduces
the engine's hit and miss counts exactly (tests/e2e/test_prefetch.py). One policy is
replay's own: `belady` evicts the expert whose next use is farthest in the future,
read from the trace. It is the bound that eviction can approach, not a candidate.
With prefetch, oracle predictions are also the hints of the `predicted` policy.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, NamedTuple

from .eviction import POLICIES as ENGINE_POLICIES
from .eviction import HeapPolicy, make_policy
from .slot_pool import ExpertKey, GroupedSlotPool, SlotGroup

POLICIES = ENGINE_POLICIES + ("belady",)


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
# DeepSeek-V2-Lite and OLMoE scaled by active parameters). DeepSeek-V3 from its
# config (58 MoE layers of 256 experts, top-8, expert 3 x 7168 x 2048 in bf16),
# compute scaled from Qwen3-30B-A3B by active parameters per layer (37B / 61 layers).
_MODELS = {
    "mixtral-8x7b": dict(layers=32, experts=8, top_k=2, bytes_per_expert=352_000_000,
                         compute_s_per_layer=240e-6),
    "qwen3-30b-a3b": dict(layers=48, experts=128, top_k=8, bytes_per_expert=9_400_000,
                          compute_s_per_layer=42e-6),
    "deepseek-v2-lite": dict(layers=26, experts=64, top_k=6, bytes_per_expert=17_300_000,
                             compute_s_per_layer=45e-6),
    "deepseek-v3": dict(layers=58, experts=256, top_k=8, bytes_per_expert=88_080_384,
                        compute_s_per_layer=370e-6),
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


class Belady(HeapPolicy):
    """Farthest next use, read from the trace (replay only). A key's next use is
    fixed while it is evictable (any use pins it first), so one heap does."""

    name = "belady"

    def __init__(self, future: dict[ExpertKey, list[int]]):
        super().__init__()
        self.future = future
        self.now = 0  # index of the call running now

    def priority(self, key: ExpertKey) -> float:
        times = self.future.get(key, [])
        i = bisect_left(times, self.now)
        return -(times[i] if i < len(times) else math.inf)


def replay(calls: list[Call], num_slots: int, policy: str, profile: HardwareProfile,
           depth: int = 0, experts_per_layer: int | None = None,
           groups: list[SlotGroup] | None = None) -> ReplayResult:
    """Play `calls` against a pool of `num_slots` under `policy`; with `depth`, oracle
    prefetch of the next `depth` calls of the same step (at most S - experts_per_layer
    slots, as the engine; default: the largest call). `groups`: slot groups (slot_pool.py), each
    with its own policy and prefetch budget, as the engine's on CUDA above 992 slots."""
    if policy not in POLICIES:
        raise ValueError(f"--policy {policy!r}: choose from {', '.join(POLICIES)}")
    max_experts = max((len(c.experts) for c in calls), default=0)
    if num_slots < max_experts:
        raise ValueError(f"--pool-slots {num_slots} is smaller than the largest layer call "
                         f"({max_experts} experts); use at least {max_experts}")
    future: dict[ExpertKey, list[int]] = defaultdict(list)
    for i, c in enumerate(calls):
        for e in c.experts:
            future[ExpertKey(c.layer, e)].append(i)
    num_layers = max((c.layer for c in calls), default=0) + 1
    groups = groups or [SlotGroup(range(num_layers), 0, num_slots)]
    pool = GroupedSlotPool(groups, lambda: Belady(future) if policy == "belady"
                           else make_policy(policy, num_layers))
    beladys = [p.policy for p in pool.pools if isinstance(p.policy, Belady)]
    budget = [g.size - (experts_per_layer or max_experts) for g in groups]
    prefetch_pins = [0] * len(groups)
    ready_at: dict[ExpertKey, float] = {}  # prefetched key -> when its load finishes
    # call index -> prefetch pins held for it: (key, slot, loaded by prefetch)
    prefetched_for: dict[int, list[tuple[ExpertKey, int, bool]]] = defaultdict(list)
    call_pins: list[int] = []
    clock = link_free = stall = 0.0
    hits = misses = prefetched = prefetch_hits = 0
    load = profile.load_s()
    for i, c in enumerate(calls):
        for belady in beladys:
            belady.now = i
        pool.release(call_pins)
        pool.start_call(c.layer)
        grants = pool.acquire([ExpertKey(c.layer, e) for e in c.experts], used=True)
        if grants is None:
            raise RuntimeError(f"call {i}: {len(c.experts)} experts do not fit")
        call_pins = [g.slot for g in grants]
        start = clock
        for g in grants:
            if g.hit:
                hits += 1
                start = max(start, ready_at.pop(g.key, 0.0))
            else:  # on-demand miss: a stall
                misses += 1
                ready_at.pop(g.key, None)
                link_free = max(link_free, clock) + load
                start = max(start, link_free)
        stall += start - clock
        used = set(c.experts)
        for key, slot, loaded in prefetched_for.pop(i, []):  # settle this call's prefetch
            prefetch_pins[pool.group_of(key.layer)] -= 1
            prefetch_hits += loaded and key.expert in used
            pool.release([slot])
        room = [True] * len(groups)
        for j in range(i + 1, min(i + depth, len(calls) - 1) + 1):  # oracle prefetch
            target = calls[j]
            if target.step != c.step:  # the engine predicts within a forward pass
                break
            group = pool.group_of(target.layer)
            for e in reversed(target.experts):  # as the cache hints: the least
                pool.hint(ExpertKey(target.layer, e))  # wanted first, evicted first
            already = {key for key, _, _ in prefetched_for[j]}
            for e in target.experts:
                key = ExpertKey(target.layer, e)
                if not room[group] or prefetch_pins[group] >= budget[group]:
                    room[group] = False
                    break
                if key in already:
                    continue
                got = pool.acquire([key])
                if got is None:
                    room[group] = False
                    break
                prefetch_pins[group] += 1
                prefetched_for[j].append((key, got[0].slot, not got[0].hit))
                if not got[0].hit:
                    prefetched += 1
                    link_free = max(link_free, start) + load
                    ready_at[key] = link_free
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
