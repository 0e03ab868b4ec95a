"""The OpenAI-compatible server takes the --expert-* flags and answers like plain vLLM."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import LAYERS, EXPERTS, PROMPTS, plain_spec
from vllm_moe_offload.cli.engine_probe import damage_store, hide_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc, url: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError("server did not become healthy")


def test_openai_server_with_offload_flags(models, engine, tmp_path):
    """Also the task-aware path across processes: the scheduler (engine-core
    process) classifies, the worker (its own process) profiles and plans; and a
    store file damaged under the running server heals, the server stays healthy;
    with the checkpoint gone too, a request that needs a lost expert gets an error
    and the server stays healthy."""
    import json

    from openai import BadRequestError, InternalServerError, OpenAI

    model = models["qwen3_moe"]
    plain = engine(plain_spec(model))
    port = free_port()
    rules, profiles = tmp_path / "rules.json", tmp_path / "profiles.json"
    store_dir = tmp_path / "store"
    rules.write_text(json.dumps({"rules": [{"task": "python", "keywords": ["def "]}]}))
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
         "--port", str(port), "--host", "127.0.0.1", "--max-model-len", "512",
         "--gpu-memory-utilization", "0.5", "--enforce-eager", "--seed", "0",
         "--enable-expert-offload", "--expert-pool-slots", str(LAYERS * EXPERTS // 2),
         "--expert-store", "disk", "--expert-store-dir", str(store_dir),
         "--expert-task-aware", "--expert-task-rules", str(rules),
         "--expert-task-profiles", str(profiles), "--expert-replan-every", "1"],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        for i, xargs in ((1, None), (2, {"task": "legal", "slo_ttft_ms": 5000}), (0, None)):
            out = client.completions.create(
                model=model, prompt=PROMPTS[i], max_tokens=24, temperature=0.0,
                extra_body={"ignore_eos": True, "return_token_ids": True,
                            "vllm_xargs": xargs})
            choice = out.choices[0]
            assert choice.token_ids == plain["token_ids"][i]
            assert choice.text == plain["texts"][i]
        (store_file,) = store_dir.glob("*.experts")
        damage_store(str(store_file), "flip")  # every record, under the running server
        for i in (3, 1):
            out = client.completions.create(
                model=model, prompt=PROMPTS[i], max_tokens=24, temperature=0.0,
                extra_body={"ignore_eos": True, "return_token_ids": True})
            assert out.choices[0].token_ids == plain["token_ids"][i]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            assert r.status == 200
        damage_store(str(store_file), "truncate")  # layers 2 and 3 unreadable ...
        restore = hide_checkpoint(model)  # ... and nothing to re-derive them from
        try:
            client.with_options(max_retries=0).completions.create(
                model=model, prompt=PROMPTS[2], max_tokens=24, temperature=0.0,
                extra_body={"ignore_eos": True})
            raise AssertionError("a request served without its experts")
        except InternalServerError:
            pass
        finally:
            restore()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            assert r.status == 200
        out = client.completions.create(  # the checkpoint is back: served and repaired
            model=model, prompt=PROMPTS[0], max_tokens=24, temperature=0.0,
            extra_body={"ignore_eos": True, "return_token_ids": True})
        assert out.choices[0].token_ids == plain["token_ids"][0]
        time.sleep(0.5)  # a snapshot lags the last step by up to 0.2 s (metrics.py)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            scraped = r.read().decode()  # the worker's counters, in the API server
        try:  # a bad SLO is the client's error, not the engine's
            client.completions.create(model=model, prompt="x", max_tokens=2,
                                      extra_body={"vllm_xargs": {"slo_tpot_ms": "fast"}})
            raise AssertionError("a bad slo_tpot_ms was accepted")
        except BadRequestError as e:
            assert "slo_tpot_ms='fast' must be a positive, finite number" in str(e)
    finally:
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=120)
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert returncode == 0, text[-3000:]
    assert "expert offload: pool 16 of 32 experts" in text
    assert "expert offload: memory budget: KV cache" in text  # pool beside the KV cache
    assert "task-aware scheduler on" in text
    assert "checksum mismatch; re-derived it from the checkpoint and repaired" in text
    samples = [s for f in text_string_to_metric_families(scraped) for s in f.samples]
    assert any(s.name == "vllm:prompt_tokens_total" for s in samples)  # vLLM's own
    series = {s.name: s.value for s in samples if not s.labels}
    assert series["vllm_moe_offload_store_repairs_total"] > 0
    assert series["vllm_moe_offload_failed_requests_total"] == 1
    assert "short read" in text and "The requests routed to this expert fail" in text
    assert series["vllm_moe_offload_replans_total"] >= 3
    assert series["vllm_moe_offload_misses_total"] + series[
        "vllm_moe_offload_planned_loads_total"] > 0
    assert series["vllm_moe_offload_hits_total"] > 0
    # The worker saw the rule file's "python" and the client's "legal", and saved
    # the profiles at its re-plans (the third prompt's re-plan saved the second's
    # routing). The third prompt's own task ("default") is in the file only when
    # the worker got to save at shutdown, which the server does not always allow.
    assert "expert offload: replan 3 after 3 prompts" in text
    counts = json.loads(profiles.read_text())["profiles"]["counts"]
    assert set(counts) - {"default"} == {"legal", "python"}
    # No "(shutdown)" summary here: the API server force-kills its workers on exit.
