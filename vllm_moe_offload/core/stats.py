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
    load_seconds: float = 0.0  # wall time spent in those copies (a stall)
    calls: int = 0  # layer calls


@dataclass
class OffloadStats:
    layers: dict[int, LayerStats] = field(default_factory=dict)
    _last_log: float = field(default_factory=time.monotonic)

    def layer(self, layer: int) -> LayerStats:
        stats = self.layers.get(layer)
        if stats is None:
            stats = self.layers[layer] = LayerStats()
        return stats

    def totals(self) -> LayerStats:
        total = LayerStats()
        for s in self.layers.values():
            for name, value in asdict(s).items():
                setattr(total, name, getattr(total, name) + value)
        return total

    def to_dict(self) -> dict:
        totals = asdict(self.totals())
        lookups = totals["hits"] + totals["misses"]
        totals["hit_rate"] = totals["hits"] / lookups if lookups else 0.0
        return {"layers": {l: asdict(s) for l, s in sorted(self.layers.items())},
                "totals": totals}

    def summary_line(self) -> str:
        t = self.to_dict()["totals"]
        return (f"expert offload: hit rate {t['hit_rate']:.1%} ({t['hits']} hits, "
                f"{t['misses']} misses, {t['evictions']} evictions), "
                f"{t['bytes_loaded'] / 2**20:.1f} MiB loaded in {t['load_seconds']:.3f} s")

    def due(self, interval_s: float) -> bool:
        """True once every `interval_s` seconds (for the periodic log line)."""
        now = time.monotonic()
        if interval_s <= 0 or now - self._last_log < interval_s:
            return False
        self._last_log = now
        return True
