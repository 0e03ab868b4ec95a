"""The plugin's counters on vLLM's `/metrics`, across vLLM's processes.

The counters live in the worker (engine-core process, or a worker process under
it); `/metrics` is served by the API server, another process. The worker writes a
snapshot of its counters after a step (`write_snapshot`: one small JSON file per
worker, replaced atomically) into a directory that the first process creates
and its children inherit (`VLLM_MOE_OFFLOAD_METRICS_DIR`); a collector registered
in every process's default Prometheus registry reads the live workers' snapshots
when scraped. Series are named `vllm_moe_offload_*` (docs/metrics.md); per-layer
series only with `metrics_per_layer`.

NOTE #1: a snapshot is taken at most every 0.2 s in host mode; a step that comes
sooner starts a timer instead, so the last step's counters are written even when
the engine then idles. In device mode the counters live on the GPU: at most once a
second, after a step, their copy to the host is queued without a host sync
(`cache.stats_later()`), and the snapshot is written after the first step that
finds that copy done (the same step on the CPU). Never from a timer (a wait or
query from another thread could land in a graph capture), so there the series can
lag the last step until the next one.
NOTE #2: vLLM's multi-API-server mode (`--api-server-count` > 1) sets
PROMETHEUS_MULTIPROC_DIR and serves `/metrics` from the metric files that every
process writes there; its API server processes never load this plugin. So there
the worker also writes its totals as prometheus_client multiprocess metrics
(`_MultiprocessSeries`): every API server then serves them, with no collector of
ours. Per-layer series stay single-API-server only.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

DIR_ENV = "VLLM_MOE_OFFLOAD_METRICS_DIR"
PREFIX = "vllm_moe_offload_"
HOST_MODE_INTERVAL_S = 0.2  # a snapshot costs ~0.1-0.3 ms: not after every step
DEVICE_MODE_INTERVAL_S = 1.0

# totals key -> (series name, help); all counters (exposed with a _total suffix)
COUNTERS = {
    "hits": ("hits", "Routed experts found resident (once per layer call)."),
    "misses": ("misses", "Routed experts loaded on demand (a stall)."),
    "evictions": ("evictions", "Resident experts pushed out to make room."),
    "bytes_loaded": ("loaded_bytes", "Bytes copied from the store into slots."),
    "load_seconds": ("load_seconds", "Wall time of expert loads (host mode)."),
    "stall_seconds": ("stall_seconds", "Time the forward pass waited for experts."),
    "prefetched": ("prefetch_issued", "Experts loaded ahead of their layer."),
    "prefetch_hits": ("prefetch_hits", "Prefetched experts their layer then used."),
    "prefetch_wasted": ("prefetch_wasted", "Prefetched experts their layer did not use."),
    "planned_loads": ("planned_loads", "Experts loaded because the residency plan pinned them."),
    "rerouted": ("rerouted", "Approximate mode: misses sent to a resident expert."),
    "failed_loads": ("failed_loads", "Experts the store could neither read nor re-derive."),
    "calls": ("layer_calls", "MoE layer calls."),
}
# worker-wide counters, not per layer: name -> help
WORKER_COUNTERS = {
    "store_repairs": "Disk store records re-derived from the checkpoint.",
    "failed_requests": "Requests failed because an expert they routed to was unavailable.",
    "replans": "Task-aware residency re-plans.",
}
# prediction counts per distance: what precision and recall are made of, as counters
# (rate() windows them; the gauges below are since start)
PREDICTION_COUNTERS = {
    "correct": "Predicted experts that the layer then used, by prediction distance.",
    "predicted": "Distinct experts predicted per layer call, by prediction distance.",
    "routed": "Distinct experts the predicted layer call used, by prediction distance.",
}
SLOTS_HELP = ("Expert slots by state: total, used (holding an expert), pinned (a layer "
              "call, prefetch or the plan holds them), planned (the residency plan).")


def worker_counts(snapshot: dict) -> dict:
    """WORKER_COUNTERS' values in one worker's snapshot."""
    return {"store_repairs": snapshot["pool"].get("store_repairs", 0),
            "failed_requests": snapshot["pool"].get("failed_requests", 0),
            "replans": snapshot.get("replans", 0)}


def ensure_dir() -> Path:
    """The snapshot directory: inherited from a parent process, else created here
    (and removed at this process's exit). Made by the process that builds an engine's
    config with offload on (plugin.py), so its engine-core and worker processes, and
    its API servers, inherit it; a process that runs vLLM without offload makes none
    (before, every one did, and its children inherited it)."""
    path = os.environ.get(DIR_ENV)
    if not path:
        path = tempfile.mkdtemp(prefix="vllm_moe_offload_metrics_")
        os.environ[DIR_ENV] = path
        atexit.register(shutil.rmtree, path, True)
    return Path(path)


def install_collector() -> None:
    """Add the collector to this process's default registry (idempotent)."""
    from prometheus_client import REGISTRY

    if not any(isinstance(c, OffloadCollector) for c in list(REGISTRY._collector_to_names)):
        REGISTRY.register(OffloadCollector())


class _MultiprocessSeries:
    """NOTE #2: the worker's totals as prometheus_client multiprocess metrics."""

    def __init__(self):
        from prometheus_client import Counter, Gauge, values

        # prometheus_client picks its value storage when first imported; vLLM's parent
        # imports it before it sets PROMETHEUS_MULTIPROC_DIR, and a worker forked from
        # it keeps the in-memory kind, whose values no API server would ever see
        if values.ValueClass is values.MutexValue:
            values.ValueClass = values.get_value_class()
        names = {**COUNTERS, **{k: (k, doc) for k, doc in WORKER_COUNTERS.items()}}
        self.counters = {k: Counter(PREFIX + name, doc, registry=None)
                         for k, (name, doc) in names.items()}
        self.slots = Gauge(PREFIX + "pool_slots", SLOTS_HELP, ["state"],
                           registry=None, multiprocess_mode="livesum")
        self.predictions = {k: Counter(PREFIX + "prediction_" + k, doc, ["distance"],
                                       registry=None)
                            for k, doc in PREDICTION_COUNTERS.items()}
        self.last: dict[str, float] = {}
        self._lock = threading.Lock()  # the snapshot timer and the step both update

    def update(self, snapshot: dict) -> None:
        with self._lock:
            self._update(snapshot)

    def _update(self, snapshot: dict) -> None:
        values = {**snapshot["totals"], **worker_counts(snapshot)}
        for key, counter in self.counters.items():
            delta = values[key] - self.last.get(key, 0)
            if delta > 0:
                counter.inc(delta)
            self.last[key] = values[key]
        for key, counter in self.predictions.items():
            for d, value in prediction_counts([snapshot], key).items():
                delta = value - self.last.get((key, d), 0)
                if delta > 0:
                    counter.labels(d).inc(delta)
                self.last[(key, d)] = value
        self.slots.labels("total").set(snapshot["pool"]["num_slots"])
        for state, value in snapshot["occupancy"].items():
            self.slots.labels(state).set(value)


_multiprocess: _MultiprocessSeries | None = None


def after_step(model) -> None:
    """Called after every step: snapshot now, or once the interval is up (NOTE #1)."""
    now = time.monotonic()
    device = model.cache.mode == "device"
    wait = (DEVICE_MODE_INTERVAL_S if device else HOST_MODE_INTERVAL_S) - (
        now - getattr(model, "_metrics_at", 0.0))
    if device:
        pending = getattr(model, "_metrics_pending", None)
        if pending is None and wait <= 0:
            model._metrics_at = now
            model._metrics_pending = pending = model.cache.stats_later()
        if pending is not None and pending.ready():
            model._metrics_pending = None
            write_snapshot(model, pending)
    elif wait <= 0:
        write_snapshot(model)
    elif getattr(model, "_metrics_timer", None) is None:
        timer = threading.Timer(wait, write_snapshot, (model,))
        timer.daemon = True
        model._metrics_timer = timer
        timer.start()


def write_snapshot(model, later=None) -> None:
    """The worker's counters into its snapshot file, replaced atomically; `later`:
    the counters as queued by `cache.stats_later()` (read now when not given)."""
    if later is None:
        model._metrics_at, model._metrics_timer = time.monotonic(), None
        later = model.cache.stats_later()
    stats, occupancy = later()
    snapshot = {"totals": stats.totals_dict(), "pool": model.pool_info(),
                "occupancy": occupancy,
                "replans": model.tasks.replans if model.tasks is not None else 0}
    if model.cfg.metrics_per_layer:
        snapshot["layers"] = stats.to_dict()["layers"]
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # NOTE #2
        global _multiprocess
        if _multiprocess is None:
            _multiprocess = _MultiprocessSeries()
        _multiprocess.update(snapshot)
    directory = ensure_dir()
    tmp = directory / f".worker-{os.getpid()}-{threading.get_ident()}.tmp"
    try:
        tmp.write_text(json.dumps(snapshot))
        os.replace(tmp, directory / f"worker-{os.getpid()}.json")
    except OSError:  # the directory went with the process that made it: shutting down
        tmp.unlink(missing_ok=True)


def stop(model) -> None:
    """At worker shutdown: no snapshot timer outlives the worker."""
    timer = getattr(model, "_metrics_timer", None)
    if timer is not None:
        timer.cancel()


def read_snapshots(directory: Path) -> list[dict]:
    """The snapshots of workers that are still alive."""
    out = []
    for f in sorted(directory.glob("worker-*.json")):
        try:
            os.kill(int(f.stem.split("-")[1]), 0)
            out.append(json.loads(f.read_text()))
        except (OSError, ValueError):  # a dead worker's file, or one being replaced
            continue
    return out


def families(snapshots: list[dict]) -> list:
    """Prometheus metric families for the summed snapshots of all workers."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    if not snapshots:
        return []
    out = []
    per_layer = any("layers" in s for s in snapshots)
    for key, (name, doc) in COUNTERS.items():
        total = CounterMetricFamily(PREFIX + name, doc)
        total.add_metric([], sum(s["totals"][key] for s in snapshots))
        out.append(total)
        if per_layer:
            layered = CounterMetricFamily(PREFIX + "per_layer_" + name, doc + " Per layer.",
                                          labels=["layer"])
            for layer in sorted({l for s in snapshots for l in s.get("layers", {})}, key=int):
                layered.add_metric([str(layer)], sum(s["layers"][layer][key] for s in snapshots
                                                     if layer in s.get("layers", {})))
            out.append(layered)
    counts = [worker_counts(s) for s in snapshots]
    for key, doc in WORKER_COUNTERS.items():
        family = CounterMetricFamily(PREFIX + key, doc)
        family.add_metric([], sum(c[key] for c in counts))
        out.append(family)
    for name, key, doc in (("precision", "precision", "Share of predicted experts the layer "
                            "used, by prediction distance."),
                           ("recall", "recall", "Share of used experts that were predicted, "
                            "by prediction distance.")):
        gauge = GaugeMetricFamily(PREFIX + "prediction_" + name, doc, labels=["distance"])
        for d in sorted({d for s in snapshots for d in s["totals"]["predictions"]}, key=int):
            pairs = [s["totals"]["predictions"][d] for s in snapshots
                     if d in s["totals"]["predictions"]]
            gauge.add_metric([str(d)], _ratio(pairs, key))
        out.append(gauge)
    for key, doc in PREDICTION_COUNTERS.items():
        family = CounterMetricFamily(PREFIX + "prediction_" + key, doc, labels=["distance"])
        for d, value in prediction_counts(snapshots, key).items():
            family.add_metric([d], value)
        out.append(family)
    slots = GaugeMetricFamily(PREFIX + "pool_slots", SLOTS_HELP, labels=["state"])
    slots.add_metric(["total"], sum(s["pool"]["num_slots"] for s in snapshots))
    for state in ("used", "pinned", "planned"):
        values = [s["occupancy"].get(state) for s in snapshots]
        if all(v is not None for v in values):
            slots.add_metric([state], sum(values))
    out.append(slots)
    return out


def prediction_counts(snapshots: list[dict], key: str) -> dict[str, int]:
    """distance -> PREDICTION_COUNTERS' `key` summed over the workers' snapshots."""
    out: dict[str, int] = {}
    for s in snapshots:
        for d, p in s["totals"]["predictions"].items():
            out[str(d)] = out.get(str(d), 0) + p.get(key, 0)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def _ratio(pairs: list[dict], key: str) -> float:
    """Precision or recall over workers, from their counts."""
    num = sum(p[key] * (p["predicted"] if key == "precision" else p["routed"]) for p in pairs)
    den = sum(p["predicted"] if key == "precision" else p["routed"] for p in pairs)
    return num / den if den else 0.0


class OffloadCollector:
    """Reads the workers' snapshots at each scrape."""

    def collect(self):
        path = os.environ.get(DIR_ENV)
        return families(read_snapshots(Path(path))) if path else []

    def describe(self):
        return []  # names depend on what the workers report
