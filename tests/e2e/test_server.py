"""The OpenAI-compatible server takes the --expert-* flags and answers like plain vLLM."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from tests.e2e.conftest import LAYERS, EXPERTS, PROMPTS, plain_spec


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


def test_openai_server_with_offload_flags(models, engine, store_dir, tmp_path):
    from openai import OpenAI

    model = models["qwen3_moe"]
    plain = engine(plain_spec(model))
    port = free_port()
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
         "--port", str(port), "--host", "127.0.0.1", "--max-model-len", "512",
         "--gpu-memory-utilization", "0.5", "--enforce-eager", "--seed", "0",
         "--enable-expert-offload", "--expert-pool-slots", str(LAYERS * EXPERTS // 2),
         "--expert-store", "disk", "--expert-store-dir", store_dir],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        for i in (1, 2):
            out = client.completions.create(
                model=model, prompt=PROMPTS[i], max_tokens=24, temperature=0.0,
                extra_body={"ignore_eos": True, "return_token_ids": True})
            choice = out.choices[0]
            assert choice.token_ids == plain["token_ids"][i]
            assert choice.text == plain["texts"][i]
    finally:
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=120)
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert returncode == 0, text[-3000:]
    assert "expert offload: pool 16 of 32 experts" in text
    assert "expert offload: memory budget: KV cache" in text  # pool beside the KV cache
    # No "(shutdown)" summary here: the API server force-kills its workers on exit.
