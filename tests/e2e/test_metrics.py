"""The plugin's series on vLLM's /metrics registry equal what get_stats reports;
with two API servers, each serves the worker's totals. (tests/e2e/test_server.py
scrapes /metrics through the one-API-server server.)"""

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import EXPERTS, LAYERS, offload_spec
from vllm_moe_offload.integration.vllm.metrics import COUNTERS


def samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_metrics_equal_get_stats(models, engine, store_dir):
    spec = offload_spec(models["qwen3_moe"], pool_slots=EXPERTS + 4, store="disk",
                        store_dir=store_dir, predictor="next-gate", metrics_per_layer=True)
    off = engine({**spec, "metrics": True})
    got, stats = samples(off["metrics"]), off["stats"]
    totals = stats["totals"]
    assert totals["misses"] > 0 and totals["prefetched"] > 0
    for key, (name, _) in COUNTERS.items():
        assert got[(f"vllm_moe_offload_{name}_total", ())] == totals[key], name
        for layer in range(LAYERS):
            assert (got[(f"vllm_moe_offload_per_layer_{name}_total", (("layer", str(layer)),))]
                    == stats["layers"][str(layer)][key]), (name, layer)
    for d, p in totals["predictions"].items():
        assert got[("vllm_moe_offload_prediction_recall", (("distance", d),))] == (
            p["recall"])
        for key in ("correct", "predicted", "routed"):
            assert got[(f"vllm_moe_offload_prediction_{key}_total", (("distance", d),))] == (
                p[key])
    slots = {state: got[("vllm_moe_offload_pool_slots", (("state", state),))]
             for state in ("total", "used", "pinned", "planned")}
    assert slots["total"] == stats["pool"]["num_slots"] == EXPERTS + 4
    assert slots["used"] == EXPERTS + 4 and slots["planned"] == 0  # a full pool, no plan
    assert 0 <= slots["pinned"] <= EXPERTS + 4


def test_two_api_servers_serve_the_workers_totals(models, tmp_path):
    """`vllm-moe-offload serve --api-server-count 2`: vLLM's API server processes
    serve the worker's multiprocess metric files."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    from tests.e2e.test_server import free_port, wait_healthy

    port, log = free_port(), open(tmp_path / "server.log", "w+")
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_moe_offload", "serve", models["qwen3_moe"], "--port",
         str(port), "--host", "127.0.0.1", "--max-model-len", "512",
         "--gpu-memory-utilization", "0.5", "--enforce-eager", "--api-server-count", "2",
         "--enable-expert-offload", "--expert-pool-slots", str(EXPERTS),
         "--expert-store", "disk", "--expert-store-dir", str(tmp_path / "store")],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        wait_healthy(proc, url)
        for _ in range(3):
            request = urllib.request.Request(
                url + "/v1/completions", headers={"Content-Type": "application/json"},
                data=b'{"prompt": "Hello world", "max_tokens": 8, "temperature": 0}')
            urllib.request.urlopen(request, timeout=60).read()
        import time
        time.sleep(1.0)  # the worker's last snapshot is at most 0.2 s behind
        scrapes = []
        for _ in range(6):  # the two API servers take turns
            with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
                got = samples(r.read().decode())
            scrapes.append({k: v for k, v in got.items() if k[0].startswith("vllm_moe_")})
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert "ApiServer_1" in text, text[-2000:]  # really two API server processes
    first = scrapes[0]
    assert first[("vllm_moe_offload_misses_total", ())] > 0
    assert first[("vllm_moe_offload_layer_calls_total", ())] > 0
    assert first[("vllm_moe_offload_pool_slots", (("state", "total"),))] == EXPERTS
    assert all(s == first for s in scrapes)
