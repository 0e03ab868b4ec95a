"""Per-layer cache counters, kept by the worker and read through `get_stats`."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field


@dataclass
class LayerStats:
    hits: int = 0  # routed experts found resident, counted once per layer call
    misses: int = 0  # routed experts loaded on demand
    evictions: int = 0  # resident experts pushed out to make room
    bytes_loaded: int = 0  # bytes copied from the store into slots
    load_seconds: float = 0.0  # wall time of those copies (foreground or background)
    stall_seconds: float = 0.0  # time the forward pass waited for experts
    calls: int = 0  # layer calls
    prefetched: int = 0  # experts loaded ahead of their layer on a prediction
    prefetch_hits: int = 0  # prefetched experts the layer then used (misses covered)
    prefetch_wasted: int = 0  # prefetched experts the layer did not use
    planned_loads: int = 0  # experts loaded because the residency plan pinned them
    rerouted: int = 0  # approximate mode: misses sent to a resident expert instead
    failed_loads: int = 0  # experts neither readable nor re-derivable (their requests fail)
    # distance d -> [correctly predicted, predicted, routed] distinct experts per call
    predictions: dict = field(default_factory=dict)

    def prediction(self, distance: int) -> list[int]:
        return self.predictions.setdefault(distance, [0, 0, 0])


@dataclass
class OffloadStats:
    layers: dict[int, LayerStats] = field(default_factory=dict)
    _last_log: float = field(default_factory=time.monotonic)
    # Device mode counts on the GPU and does not time loads (timing would sync).
    untimed: bool = False

    def layer(self, layer: int) -> LayerStats:
        stats = self.layers.get(layer)
        if stats is None:
            stats = self.layers[layer] = LayerStats()
        return stats

    def totals(self) -> LayerStats:
        total = LayerStats()
        for s in self.layers.values():
            for name in _COUNTS:
                setattr(total, name, getattr(total, name) + getattr(s, name))
            for d, acc in s.predictions.items():
                mine = total.prediction(d)
                for i, v in enumerate(acc):
                    mine[i] += v
        return total

    def totals_dict(self) -> dict:
        """`to_dict()["totals"]` without the per-layer part (cheap: metrics)."""
        return _with_rates(asdict(self.totals()))

    def to_dict(self) -> dict:
        layers = {l: _with_rates(asdict(s)) for l, s in sorted(self.layers.items())}
        return {"layers": layers, "totals": _with_rates(asdict(self.totals()))}

    def summary_line(self) -> str:
        t = self.to_dict()["totals"]
        return (f"expert offload: hit rate {t['hit_rate']:.1%} ({t['hits']} hits, "
                f"{t['misses']} misses, {t['evictions']} evictions), "
                f"{t['bytes_loaded'] / 2**20:.1f} MiB loaded"
                + (" (device mode: not timed)" if self.untimed
                   else f" in {t['load_seconds']:.3f} s")
                + (f", {t['rerouted']} rerouted (approximate)" if t["rerouted"] else ""))

    def due(self, interval_s: float) -> bool:
        """True once every `interval_s` seconds (for the periodic log line)."""
        now = time.monotonic()
        if interval_s <= 0 or now - self._last_log < interval_s:
            return False
        self._last_log = now
        return True


_COUNTS = tuple(f for f in LayerStats.__dataclass_fields__ if f != "predictions")


def _with_rates(d: dict) -> dict:
    """Add hit rate and, per distance, prediction precision and recall."""
    lookups = d["hits"] + d["misses"]
    d["hit_rate"] = d["hits"] / lookups if lookups else 0.0
    d["predictions"] = {
        dist: {"precision": ok / predicted if predicted else 0.0,
               "recall": ok / routed if routed else 0.0,
               "correct": ok, "predicted": predicted, "routed": routed}
        for dist, (ok, predicted, routed) in sorted(d["predictions"].items())}
    return d
