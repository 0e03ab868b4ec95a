"""Prometheus series from the workers' snapshots (integration/vllm/metrics.py; it
imports no vLLM, so this runs without an engine)."""

import json
import os

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from vllm_moe_offload.integration.vllm import metrics


def snapshot(hits, misses, layers=None):
    totals = {k: 0 for k in metrics.COUNTERS}
    totals.update(hits=hits, misses=misses, bytes_loaded=misses * 100,
                  predictions={"1": {"precision": 0.5, "recall": 0.25, "correct": 2,
                                     "predicted": 4, "routed": 8}})
    snap = {"totals": totals, "pool": {"num_slots": 10, "store_repairs": 1},
            "occupancy": {"used": 9, "pinned": 2, "planned": 0}, "replans": 3}
    if layers:
        snap["layers"] = layers
    return snap


def scrape(tmp_path, monkeypatch, snaps, dead=()):
    monkeypatch.setenv(metrics.DIR_ENV, str(tmp_path))
    for i, snap in enumerate(snaps):  # live workers: this process and its parent
        pid = (os.getpid(), os.getppid())[i]
        (tmp_path / f"worker-{pid}.json").write_text(json.dumps(snap))
    for snap in dead:
        (tmp_path / "worker-999999999.json").write_text(json.dumps(snap))
    registry = CollectorRegistry()
    registry.register(metrics.OffloadCollector())
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_series_sum_the_live_workers(tmp_path, monkeypatch):
    got = scrape(tmp_path, monkeypatch, [snapshot(10, 4), snapshot(5, 6)],
                 dead=[snapshot(1000, 1000)])
    assert got[("vllm_moe_offload_hits_total", ())] == 15
    assert got[("vllm_moe_offload_misses_total", ())] == 10
    assert got[("vllm_moe_offload_loaded_bytes_total", ())] == 1000
    assert got[("vllm_moe_offload_store_repairs_total", ())] == 2
    assert got[("vllm_moe_offload_replans_total", ())] == 6
    assert got[("vllm_moe_offload_prediction_precision", (("distance", "1"),))] == 0.5
    # the counts behind it, as counters (rate() windows them)
    assert got[("vllm_moe_offload_prediction_correct_total", (("distance", "1"),))] == 4
    assert got[("vllm_moe_offload_prediction_predicted_total", (("distance", "1"),))] == 8
    assert got[("vllm_moe_offload_prediction_routed_total", (("distance", "1"),))] == 16
    assert got[("vllm_moe_offload_pool_slots", (("state", "total"),))] == 20
    assert got[("vllm_moe_offload_pool_slots", (("state", "pinned"),))] == 4
    assert not any(name.startswith("vllm_moe_offload_per_layer_") for name, _ in got)


def test_per_layer_series_only_when_asked(tmp_path, monkeypatch):
    layer = snapshot(3, 1)["totals"]
    got = scrape(tmp_path, monkeypatch, [snapshot(3, 1, layers={"0": layer, "1": layer})])
    assert got[("vllm_moe_offload_per_layer_hits_total", (("layer", "1"),))] == 3


def test_nothing_to_report_is_no_series(tmp_path, monkeypatch):
    assert scrape(tmp_path, monkeypatch, []) == {}


def test_multi_api_server_mode_reads_the_workers_metric_files(tmp_path):
    """--api-server-count > 1: the API servers (which never load the plugin) serve
    the metric files that the worker writes in PROMETHEUS_MULTIPROC_DIR."""
    import subprocess
    import sys

    code = """
import json
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from tests.unit.test_metrics import snapshot
from vllm_moe_offload.integration.vllm import metrics
series = metrics._MultiprocessSeries()
series.update(snapshot(7, 3))
series.update(snapshot(9, 3))  # counters advance by the difference
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry)  # what vLLM's API servers serve
print(generate_latest(registry).decode())
"""
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    check_series(out.stdout)
    # As `vllm serve` with a forked engine core: prometheus_client is imported before
    # the directory is set (vLLM's parent sets it late), so a forked worker inherits
    # the in-memory value storage and, before, wrote no files at all.
    late = "import os, prometheus_client\nos.environ['PROMETHEUS_MULTIPROC_DIR'] = %r\n" % (
        str(tmp_path / "late"))
    (tmp_path / "late").mkdir()
    env.pop("PROMETHEUS_MULTIPROC_DIR")
    out = subprocess.run([sys.executable, "-c", late + code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    check_series(out.stdout)


def check_series(out):
    assert "vllm_moe_offload_hits_total 9.0" in out
    assert 'vllm_moe_offload_prediction_correct_total{distance="1"} 2.0' in out
    assert "vllm_moe_offload_misses_total 3.0" in out
    assert "vllm_moe_offload_store_repairs_total 1.0" in out
    assert 'vllm_moe_offload_pool_slots{state="used"} 9.0' in out


def test_device_mode_writes_the_snapshot_it_queued_once_ready(tmp_path, monkeypatch):
    """In device mode a step queues the counters' copy (cache.stats_later: no host
    sync) and a later step, finding it ready, writes it; the cache has no sync_stats
    or occupancy here, so calling either fails the test."""
    from types import SimpleNamespace

    from vllm_moe_offload.core.stats import OffloadStats
    from vllm_moe_offload.runtime.slot_buffers import Later

    monkeypatch.setenv(metrics.DIR_ENV, str(tmp_path))
    stats, done, queued = OffloadStats(), [False], []
    stats.layer(0).misses = 7

    def stats_later():
        queued.append(stats.totals().misses)  # the value of when it was queued
        value = (stats, {"used": 3, "pinned": 1, "planned": 0})
        return Later(lambda: value, lambda: done[0])

    cache = SimpleNamespace(mode="device", stats_later=stats_later)
    model = SimpleNamespace(cache=cache, tasks=None, pool_info=lambda: {"num_slots": 4},
                            cfg=SimpleNamespace(metrics_per_layer=False))
    written = tmp_path / f"worker-{os.getpid()}.json"
    metrics.after_step(model)  # queued, its copy not done: nothing written
    assert queued == [7] and not written.exists()
    done[0] = True
    metrics.after_step(model)  # the next step finds it done
    snap = json.loads(written.read_text())
    assert snap["totals"]["misses"] == 7 and snap["occupancy"]["used"] == 3
    metrics.after_step(model)  # within the interval: nothing more queued
    assert queued == [7]
