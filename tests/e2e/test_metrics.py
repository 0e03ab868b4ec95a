"""The plugin's series on vLLM's /metrics registry equal what get_stats reports.
(tests/e2e/test_server.py scrapes /metrics through the real server.)"""

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
    slots = {state: got[("vllm_moe_offload_pool_slots", (("state", state),))]
             for state in ("total", "used", "pinned", "planned")}
    assert slots["total"] == stats["pool"]["num_slots"] == EXPERTS + 4
    assert slots["used"] == EXPERTS + 4 and slots["planned"] == 0  # a full pool, no plan
    assert 0 <= slots["pinned"] <= EXPERTS + 4
