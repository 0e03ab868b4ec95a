"""One OpenAI server per configuration: start, wait healthy, stop; and what its log
says (the plugin's hit-rate line, re-plans, the task scheduler's summary)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# ---- server --------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model: str, port: int, additional_config: dict | None,
                   enforce_eager: bool = True) -> list[str]:
    # vLLM 0.32 logs no requests unless --enable-log-requests, so there is no
    # --disable-log-requests to pass (the flag is gone).
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "1024",
           "--gpu-memory-utilization", "0.5", "--seed", "0", "--dtype", "bfloat16",
           "--disable-uvicorn-access-log"]
    if enforce_eager:
        cmd.append("--enforce-eager")
    if additional_config is not None:
        cmd += ["--additional-config", json.dumps({"expert_offload": additional_config})]
    return cmd


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def start_server(cmd: list[str], log_path: Path, env: dict, startup_timeout: float,
                 port: int) -> subprocess.Popen:
    """Start the server (its own process group) and wait for GET /health == 200."""
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    log.close()
    url = f"http://127.0.0.1:{port}/health"
    deadline = time.monotonic() + startup_timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} during start-up;"
                                   f" log {log_path}, tail:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not healthy after {startup_timeout:.0f} s; "
                                   f"log {log_path}, tail:\n{_tail(log_path)}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return proc
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(1)
    except BaseException:
        stop_server(proc)
        raise


def stop_server(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGINT, then SIGKILL to the server's process group after `grace_s`; also
    kills workers it left behind."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for _ in range(10):  # engine-core workers of this server's group still alive?
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def server_env(additional_config: dict | None, work: Path) -> dict:
    """The server's environment. Plain vLLM (`additional_config` None) gets no
    VLLM_MOE_OFFLOAD_* variable: any of them turns offload on (docs/configuration.md),
    and a store-dir variable set for every server made each "plain vLLM" row of these
    benchmarks offload at the default pool from 2026-11-23 to 2026-12-07."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MOE_OFFLOAD_")}
    env.update(VLLM_CPU_KVCACHE_SPACE="2", PYTHONUNBUFFERED="1")
    if additional_config is not None:
        env["VLLM_MOE_OFFLOAD_STORE_DIR"] = str(work / "store")
    return env


@contextlib.contextmanager
def serving(model: str, additional_config: dict | None, log_path: Path, work: Path,
            startup_timeout: float, enforce_eager: bool = True):
    """A fresh server for one configuration; yields (base URL, server process);
    always stopped."""
    port = free_port()
    env = server_env(additional_config, work)
    cmd = server_command(model, port, additional_config, enforce_eager)
    print(f"  starting: {shlex.join(cmd)}\n  log: {log_path}", flush=True)
    t = time.monotonic()
    proc = start_server(cmd, log_path, env, startup_timeout, port)
    print(f"  healthy after {time.monotonic() - t:.0f} s", flush=True)
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        stop_server(proc)


HIT_RE = re.compile(r"hit rate ([\d.]+)% \((\d+) hits, (\d+) misses, (\d+) evictions\)")
REROUTED_RE = re.compile(r"(\d+) rerouted")
LOADED_RE = re.compile(r"([\d.]+) MiB loaded in ([\d.]+) s")
REPLAN_RE = re.compile(r"(?i)\breplan\b")  # not "replan_every" (the logged config)


def parse_log(path: Path) -> dict:
    """From a server log: the last `expert offload: ... hits` summary (hit rate,
    counts, approximate re-routes), the number of re-plan lines (the word "replan")
    and the last `task scheduler:` summary."""
    text = path.read_text(errors="replace") if path.exists() else ""
    last = sched = None
    replans = 0
    for line in text.splitlines():
        if "expert offload:" in line and "hits" in line:
            last = line
        if "task scheduler:" in line:
            sched = line
        if REPLAN_RE.search(line):
            replans += 1
    out = {"hit_rate": None, "hits": None, "misses": None, "evictions": None,
           "rerouted": None, "mib_loaded": None, "load_s": None,
           "replans": replans or None, "stats_line": last,
           "scheduler_line": sched}
    m = HIT_RE.search(last or "")
    if m:
        out.update(hit_rate=float(m[1]) / 100, hits=int(m[2]), misses=int(m[3]),
                   evictions=int(m[4]))
        r = REROUTED_RE.search(last)
        out["rerouted"] = int(r[1]) if r else 0
        loaded = LOADED_RE.search(last)
        if loaded:
            out.update(mib_loaded=float(loaded[1]), load_s=float(loaded[2]))
    return out


async def flush_stats(base_url: str, model: str, wait_s: float) -> None:
    """The plugin logs its summary at most every stats_log_interval_s, on a forward
    pass: wait that long, then run one 1-token request so the last line is current."""
    import aiohttp

    await asyncio.sleep(wait_s)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        with contextlib.suppress(Exception):
            async with s.post(base_url + "/v1/completions",
                              json={"model": model, "prompt": "def f():", "max_tokens": 1,
                                    "temperature": 0.0}) as resp:
                await resp.read()
    await asyncio.sleep(1.0)
