"""Task-aware expert residency and SLO scheduling, through the real OpenAI server.

    .venv/bin/python benchmarks/task_serving.py [--quick] [--configs a,b,c,d]
        [--sensitivity SENS.json] [--slo-scale 1.0] [--rate 4] [--requests 120]

Trained checkpoint ../shared/models/tiny-moe-4domains (8 MoE layers x 16 experts,
top-2). Four tasks, one per corpus domain (python, c, prose, legal); prompts are
--prompt-chars characters of each domain's held-out last 5%, at seeded offsets.
Each task has its own output length and TTFT/TPOT SLOs (TASKS, scaled by
--slo-scale). A client sends --requests streamed /v1/completions requests, task
drawn uniformly, Poisson arrivals at --rate req/s; every other request names its
task in vllm_xargs, the rest are classified by the server's rule file (RULES,
written to the work dir; its accuracy on the prompts used is printed).

Configurations, each in its own freshly started `python -m
vllm.entrypoints.openai.api_server` (one at a time):
  a  plain vLLM (all experts resident)
  b  expert offload, pool --pool-slots of 128 experts, LRU
  c  task-aware residency (profiles + re-plan every --replan-every prompts)
  d  c + the SLO scheduler
  e  d + approximate routing (only with --sensitivity PATH)
c-e start from one task-profile file learned by a warm-up server (config c,
--warmup unmeasured requests of the same mix, another seed); each config gets a
fresh copy of it. Rows: SLO attainment, output tokens/s and req/s over the
makespan (first send to last completion), TTFT/TPOT p50/p99 (client side), the
pool hit rate (the plugin's last periodic `expert offload: hit rate` log line) and
re-plans (log lines with "replan"); for e, the similarity of its outputs to d's
(mean fraction of leading tokens identical, tokens from the model's tokenizer).
Writes benchmarks/results/task_serving.{md,json,png}; server logs, the rule file,
profiles and per-request results go to benchmarks/results/work/task_serving/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shlex
import shutil
import statistics
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from common import RESULTS, SHARED, write_results

MODEL = SHARED / "models" / "tiny-moe-4domains"
CORPUS = SHARED / "data" / "corpus"
WORK = RESULTS / "work" / "task_serving"
TOTAL_EXPERTS = 8 * 16

# Per task: output tokens and SLOs at --slo-scale 1.0 (TTFT and TPOT in ms). Code
# tasks write longer outputs with looser SLOs; prose and legal are short and tight.
TASKS = {
    "python": {"max_tokens": 48, "slo_ttft_ms": 2000.0, "slo_tpot_ms": 150.0},
    "c": {"max_tokens": 48, "slo_ttft_ms": 2000.0, "slo_tpot_ms": 150.0},
    "prose": {"max_tokens": 24, "slo_ttft_ms": 1000.0, "slo_tpot_ms": 100.0},
    "legal": {"max_tokens": 16, "slo_ttft_ms": 800.0, "slo_tpot_ms": 100.0},
}

# The server's rule file (first match wins). Tuned on the held-out text: "legal" is
# Debian copyright files and licences, "prose" is Vim's help text, "c" is C/C++
# sources and headers. Strong signals first, weak python hints last.
RULES = {
    "default": "prose",
    "rules": [
        {"task": "legal", "regex": [
            r"(?m)^\s*(Files|Copyright|License|Upstream-Name|Upstream-Contact|Source"
            r"|Format):"]},
        {"task": "prose", "regex": [r"\|[\w:.<>+-]+\|", r"\*[\w:.<>+-]+\*",
                                    r"(?i)\bvim\b"]},
        {"task": "c", "keywords": ["#include", "#define", "#ifdef", "#ifndef", "#endif",
                                   "};", "->", "/*", "*/", "::"],
         "regex": [r"(?m);[ \t]*$", r"\b(unsigned|struct|static|void|const char|size_t"
                   r"|extern)\b", r"(?m)[{}][ \t]*$"]},
        {"task": "python", "keywords": ["def ", "self.", "import ", '"""', "__"],
         "regex": [r"\bNone\b", r"(?m)^\s*(elif|except|try:|return|raise)\b"]},
        {"task": "legal", "keywords": ["copyright", "license", "licence", "warranty",
                                       "permission", "redistribut", "merchantab", "liab",
                                       "gpl", "debian", "shall", "pursuant", " at ",
                                       "rights"]},
        {"task": "python", "regex": [r"(?m):[ \t]*$", r"(?m)^\s*# ", r"'\w+',"]},
    ],
}

CONFIGS = {
    "a": "plain",
    "b": "offload",
    "c": "task-residency",
    "d": "task-aware + sched",
    "e": "approximate",
}


# ---- workload ------------------------------------------------------------------

@dataclass
class Workload:
    model: str
    requests: list[dict] = field(default_factory=list)  # in send order


def held_out(task: str) -> str:
    text = (CORPUS / f"{task}.txt").read_text(errors="replace")
    return text[int(len(text) * 0.95):]


def build_workload(model: str, n: int, rate: float, seed: int, prompt_chars: int,
                   slo_scale: float) -> Workload:
    """n requests: uniform task, Poisson arrivals (offsets in s from the start),
    prompts from distinct seeded offsets of the task's held-out text."""
    rng = random.Random(seed)
    tails = {t: held_out(t) for t in TASKS}
    used: dict[str, set[int]] = {t: set() for t in TASKS}
    requests, at = [], 0.0
    for i in range(n):
        task = rng.choice(list(TASKS))
        tail = tails[task]
        while True:
            start = rng.randrange(0, max(1, len(tail) - 2 * prompt_chars))
            # begin at a word boundary so a prompt does not open mid-word
            space = re.search(r"\s", tail[start:start + 64])
            start += space.end() if space else 0
            if start not in used[task]:
                used[task].add(start)
                break
        spec = TASKS[task]
        requests.append({
            "index": i, "task": task, "arrival_s": at,
            "prompt": tail[start:start + prompt_chars], "offset": start,
            "max_tokens": spec["max_tokens"],
            "slo_ttft_ms": spec["slo_ttft_ms"] * slo_scale,
            "slo_tpot_ms": spec["slo_tpot_ms"] * slo_scale,
            "send_task": i % 2 == 0,  # the odd ones are classified by the server
        })
        at += rng.expovariate(rate)
    return Workload(model, requests)


def write_rules(path: Path) -> Path:
    path.write_text(json.dumps(RULES, indent=1))
    return path


def rule_accuracy(rules_path: Path, workload: Workload) -> dict:
    """Classify every prompt locally with the plugin's own classifier."""
    from vllm_moe_offload.core.tasks import TaskRules

    rules = TaskRules.load(rules_path)
    per = {t: [0, 0] for t in TASKS}
    for r in workload.requests:
        per[r["task"]][1] += 1
        per[r["task"]][0] += rules.classify(r["prompt"]) == r["task"]
    right = sum(ok for ok, _ in per.values())
    return {"overall": right / max(1, len(workload.requests)),
            "per_task": {t: ok / n if n else None for t, (ok, n) in per.items()}}


# ---- client --------------------------------------------------------------------

def payload(model: str, r: dict) -> dict:
    xargs = {"slo_ttft_ms": r["slo_ttft_ms"], "slo_tpot_ms": r["slo_tpot_ms"]}
    if r["send_task"]:
        xargs["task"] = r["task"]
    return {"model": model, "prompt": r["prompt"], "max_tokens": r["max_tokens"],
            "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, "vllm_xargs": xargs}


async def _one(session, url: str, model: str, r: dict, t0: float) -> dict:
    await asyncio.sleep(max(0.0, t0 + r["arrival_s"] - time.monotonic()))
    out = {k: r[k] for k in ("index", "task", "send_task", "max_tokens", "slo_ttft_ms",
                             "slo_tpot_ms")}
    sent = time.monotonic()
    first = None
    chunks, text, usage_tokens, error = 0, [], None, None
    try:
        async with session.post(url, json=payload(model, r)) as resp:
            if resp.status != 200:
                error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
            else:
                async for raw in resp.content:
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    obj = json.loads(data)
                    if obj.get("error"):
                        error = str(obj["error"])[:300]
                        break
                    for choice in obj.get("choices") or []:
                        piece = choice.get("text") or ""
                        if piece:
                            if first is None:
                                first = time.monotonic()
                            chunks += 1
                            text.append(piece)
                    usage = obj.get("usage")
                    if usage and usage.get("completion_tokens") is not None:
                        usage_tokens = usage["completion_tokens"]
    except Exception as e:  # noqa: BLE001 - a failed request is a row, not a crash
        error = f"{type(e).__name__}: {e}"[:300]
    done = time.monotonic()
    tokens = usage_tokens if usage_tokens is not None else chunks
    ok = error is None and first is not None
    ttft = (first - sent) * 1000 if first is not None else None
    e2e = (done - sent) * 1000
    tpot = (e2e - ttft) / (tokens - 1) if ok and tokens > 1 else (0.0 if ok else None)
    out.update({
        "ok": ok, "error": error, "sent_s": sent - t0, "done_s": done - t0,
        "ttft_ms": ttft, "tpot_ms": tpot, "e2e_ms": e2e, "tokens": tokens if ok else 0,
        "tokens_from": "usage" if usage_tokens is not None else "chunks",
        "text": "".join(text),
        "attained": bool(ok and ttft <= r["slo_ttft_ms"] and tpot <= r["slo_tpot_ms"]),
    })
    return out


async def run_load(base_url: str, workload: Workload, timeout_s: float = 900.0) -> list[dict]:
    """Send every request at its arrival time, stream, measure; one dict per request
    in workload order (times in ms, sent_s/done_s in s from the load's start)."""
    import aiohttp

    url = base_url.rstrip("/") + "/v1/completions"
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=timeout) as session:
        t0 = time.monotonic()
        return list(await asyncio.gather(
            *(_one(session, url, workload.model, r, t0) for r in workload.requests)))


# ---- metrics -------------------------------------------------------------------

def _pct(values, q):
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def summarize(results: list[dict]) -> dict:
    done = [r for r in results if r["ok"]]
    start = min((r["sent_s"] for r in results), default=0.0)
    end = max((r["done_s"] for r in done), default=start)
    makespan = end - start
    tokens = sum(r["tokens"] for r in done)
    ttft = [r["ttft_ms"] for r in done]
    tpot = [r["tpot_ms"] for r in done if r["tokens"] > 1]
    per_task = {}
    for t in TASKS:
        mine = [r for r in results if r["task"] == t]
        ok = [r for r in mine if r["ok"]]
        per_task[t] = {
            "requests": len(mine), "completed": len(ok),
            "slo_attainment_pct": 100 * sum(r["attained"] for r in mine) / len(mine)
            if mine else None,
            "ttft_p50_ms": _pct([r["ttft_ms"] for r in ok], 50),
            "tpot_p50_ms": _pct([r["tpot_ms"] for r in ok if r["tokens"] > 1], 50)}
    by_sent = {}
    for sent, label in ((True, "task_sent"), (False, "task_classified")):
        mine = [r for r in results if r["send_task"] == sent]
        by_sent[label] = (100 * sum(r["attained"] for r in mine) / len(mine)
                          if mine else None)
    return {
        "requests": len(results), "completed": len(done),
        "slo_attainment_pct": 100 * sum(r["attained"] for r in results) / len(results)
        if results else None,
        "output_tokens": tokens, "makespan_s": makespan,
        "throughput_tok_s": tokens / makespan if makespan > 0 else None,
        "req_per_s": len(done) / makespan if makespan > 0 else None,
        "ttft_p50_ms": _pct(ttft, 50), "ttft_p99_ms": _pct(ttft, 99),
        "tpot_p50_ms": _pct(tpot, 50), "tpot_p99_ms": _pct(tpot, 99),
        "per_task": per_task, "slo_attainment_pct_by_task_source": by_sent,
        "errors": sorted({r["error"] for r in results if r["error"]})[:5],
    }


def load_tokenizer(model: str):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model)
    except Exception as e:  # noqa: BLE001
        print(f"tokenizer at {model} did not load ({e}); comparing characters")
        return None


def similarity(ref: list[dict], other: list[dict], tokenizer) -> tuple[float | None, str]:
    """Mean over requests completed in both of the fraction of leading units (tokens
    of `tokenizer`, else characters) that are identical, relative to the longer."""
    def units(text):
        return tokenizer.encode(text, add_special_tokens=False) if tokenizer else text

    fractions = []
    for a, b in zip(ref, other):
        if not (a["ok"] and b["ok"]):
            continue
        ua, ub = units(a["text"]), units(b["text"])
        longest = max(len(ua), len(ub))
        same = 0
        for x, y in zip(ua, ub):
            if x != y:
                break
            same += 1
        fractions.append(same / longest if longest else 1.0)
    unit = "tokens" if tokenizer else "characters"
    return (sum(fractions) / len(fractions) if fractions else None), unit


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


@contextlib.contextmanager
def serving(model: str, additional_config: dict | None, log_path: Path, work: Path,
            startup_timeout: float, enforce_eager: bool = True):
    """A fresh server for one configuration; yields its base URL; always stopped."""
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "PYTHONUNBUFFERED": "1",
           "VLLM_MOE_OFFLOAD_STORE_DIR": str(work / "store")}
    cmd = server_command(model, port, additional_config, enforce_eager)
    print(f"  starting: {shlex.join(cmd)}\n  log: {log_path}", flush=True)
    t = time.monotonic()
    proc = start_server(cmd, log_path, env, startup_timeout, port)
    print(f"  healthy after {time.monotonic() - t:.0f} s", flush=True)
    try:
        yield f"http://127.0.0.1:{port}"
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


# ---- driver --------------------------------------------------------------------

def offload_configs(args, rules: Path, sens: str | None) -> dict[str, dict | None]:
    base = {"enabled": True, "pool_slots": args.pool_slots,
            "stats_log_interval_s": args.stats_interval}
    task = {**base, "task_aware": True, "task_scheduler": False,
            "task_rules_path": str(rules), "replan_every": args.replan_every}
    out = {"a": None, "b": base, "c": task, "d": {**task, "task_scheduler": True}}
    if sens:
        out["e"] = {**out["d"], "approximate": True, "sensitivity_path": sens}
    return out


def run_config(key: str, cfg: dict | None, workload: Workload, args, work: Path,
               profiles: Path | None = None, tag: str | None = None) -> tuple[list, dict]:
    tag = tag or key
    if cfg is not None and "task_aware" in cfg:
        cfg = {**cfg, "task_profiles_path": str(profiles)}
    log_path = work / f"server-{tag}.log"
    with serving(args.model, cfg, log_path, work, args.startup_timeout,
                 args.enforce_eager) as url:
        t = time.monotonic()
        results = asyncio.run(run_load(url, workload, args.request_timeout))
        print(f"  load done in {time.monotonic() - t:.1f} s", flush=True)
        if cfg is not None:
            asyncio.run(flush_stats(url, workload.model, args.stats_interval + 0.5))
    return results, parse_log(log_path)


def warm_up(args, configs, work: Path) -> Path:
    """Learn task profiles with a config-c server on an unmeasured workload; return
    the read-only master copy."""
    learned = work / "profiles-warmup.json"
    learned.unlink(missing_ok=True)
    wl = build_workload(args.model, args.warmup, args.rate, args.seed + 1000,
                        args.prompt_chars, args.slo_scale)
    print(f"warm-up: {len(wl.requests)} requests, config c, profiles -> {learned}",
          flush=True)
    results, log = run_config("c", configs["c"], wl, args, work, learned, tag="warmup")
    print(f"  warm-up completed {sum(r['ok'] for r in results)}/{len(results)}, "
          f"replan lines {log['replans'] or 'n/a'}; profile file exists: "
          f"{learned.exists()}", flush=True)
    if not learned.exists():
        sys.exit(f"task profile file {learned} was not written by the warm-up server "
                 f"(it saves at each re-plan, every {args.replan_every} prompts; warm-up "
                 f"sent {args.warmup}). Server log: {work / 'server-warmup.log'}")
    master = work / "profiles.json"
    master.unlink(missing_ok=True)
    shutil.copyfile(learned, master)
    master.chmod(0o444)
    return master


def aggregate(rows: list[dict]) -> dict:
    """Median of every numeric metric over repeated runs of one config; the SLO
    attainment also keeps its min and max."""
    out = dict(rows[0])
    for k, v in rows[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            values = [r[k] for r in rows if r.get(k) is not None]
            out[k] = statistics.median(values) if values else None
    for t in TASKS:
        values = [r["per_task"][t]["slo_attainment_pct"] for r in rows]
        out["per_task"] = {**out["per_task"],
                           t: {**out["per_task"][t],
                               "slo_attainment_pct": statistics.median(values)}}
    slo = [r["slo_attainment_pct"] for r in rows]
    out["slo_attainment_range"] = (min(slo), max(slo))
    return out


def _f(v, spec):
    return "n/a" if v is None else format(v, spec)


def markdown(rows) -> str:
    lines = ["| config | requests | completed | SLO % | out tok/s | req/s | TTFT p50 ms | "
             "TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | hit rate | MiB loaded | load s | "
             "replans | similarity to d | same as plain |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sim = (_f(r["similarity_to_d"], ".3f") + f" ({r['similarity_unit']})"
               if r.get("similarity_to_d") is not None else "-")
        lines.append(
            f"| {r['key']}) {r['config']} | {r['requests']} | {r['completed']} | "
            f"{_f(r['slo_attainment_pct'], '.1f')} ({r['slo_attainment_range'][0]:.0f}-"
            f"{r['slo_attainment_range'][1]:.0f}) | {_f(r['throughput_tok_s'], '.1f')} | "
            f"{_f(r['req_per_s'], '.2f')} | {_f(r['ttft_p50_ms'], '.0f')} | "
            f"{_f(r['ttft_p99_ms'], '.0f')} | {_f(r['tpot_p50_ms'], '.1f')} | "
            f"{_f(r['tpot_p99_ms'], '.1f')} | {_f(r['hit_rate'], '.1%')} | "
            f"{_f(r['mib_loaded'], '.0f')} | {_f(r['load_s'], '.2f')} | "
            f"{_f(r['replans'], '.0f')} | {sim} | {_f(r.get('same_as_plain'), '.3f')} |")
    lines += ["", "Per-task SLO attainment %:", "",
              "| config | " + " | ".join(TASKS) + " |",
              "|---|" + "---|" * len(TASKS)]
    for r in rows:
        lines.append(f"| {r['key']}) {r['config']} | " + " | ".join(
            _f(r["per_task"][t]["slo_attainment_pct"], ".1f") for t in TASKS) + " |")
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{r['key']}) {r['config']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    ax[0, 0].bar(x, [r["slo_attainment_pct"] or 0 for r in rows], color="tab:green")
    ax[0, 0].set_title("SLO attainment %")
    ax[0, 0].set_ylim(0, 100)
    ax[0, 1].bar(x, [r["throughput_tok_s"] or 0 for r in rows], color="tab:blue")
    ax[0, 1].set_title("output tokens/s (makespan)")
    for a, metric, unit in ((ax[1, 0], "ttft", "TTFT ms"), (ax[1, 1], "tpot", "TPOT ms")):
        a.bar(x - 0.2, [r[f"{metric}_p50_ms"] or 0 for r in rows], 0.4, label="p50")
        a.bar(x + 0.2, [r[f"{metric}_p99_ms"] or 0 for r in rows], 0.4, label="p99")
        a.set_title(unit)
        top = max([r[f"{metric}_p99_ms"] or 0 for r in rows] + [1])
        a.set_ylim(0, top * 1.25)  # room for the legend
        a.legend(loc="upper right")
    for a in ax.flat:
        a.set_xticks(x)
        a.set_xticklabels(labels, rotation=25, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--configs", default=None,
                   help="comma-separated subset of a,b,c,d,e (default a,b,c,d, plus e "
                        "with --sensitivity)")
    p.add_argument("--sensitivity", default=None, metavar="PATH",
                   help="sensitivity file for config e (approximate routing)")
    p.add_argument("--requests", type=int, default=None, help="measured requests (120)")
    p.add_argument("--warmup", type=int, default=None,
                   help="unmeasured warm-up requests that learn the task profiles (40)")
    p.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate, req/s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per config, interleaved (a b c .., a b c ..); medians")
    p.add_argument("--prompt-chars", type=int, default=300)
    p.add_argument("--slo-scale", type=float, default=1.0,
                   help="multiplies every task's TTFT and TPOT SLO")
    p.add_argument("--pool-slots", type=int, default=48,
                   help=f"expert slots of {TOTAL_EXPERTS} for b-e")
    p.add_argument("--replan-every", type=int, default=None,
                   help="re-plan residency every N prompts (20; 6 with --quick)")
    p.add_argument("--profiles", default=None, metavar="PATH",
                   help="use this task-profile file instead of a warm-up run")
    p.add_argument("--stats-interval", type=float, default=5.0,
                   help="the plugin's stats_log_interval_s for b-e")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--request-timeout", type=float, default=900.0,
                   help="client timeout of each request, s")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                   help="pass --enforce-eager to the server (as tests/e2e does)")
    p.add_argument("--work-dir", default=str(WORK))
    p.add_argument("--name", default="task_serving",
                   help="result files benchmarks/results/NAME.{md,json,png}")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 24 requests, warm-up 12, re-plan every 6")
    args = p.parse_args(argv)
    args.requests = args.requests or (24 if args.quick else 120)
    args.warmup = args.warmup or (12 if args.quick else 40)
    args.replan_every = args.replan_every or (6 if args.quick else 20)
    keys = (args.configs or ("a,b,c,d" + (",e" if args.sensitivity else ""))).split(",")
    args.configs = [k.strip() for k in keys if k.strip()]
    bad = [k for k in args.configs if k not in CONFIGS]
    if bad:
        p.error(f"unknown config(s) {bad}; choose from {','.join(CONFIGS)}")
    if "e" in args.configs and not args.sensitivity:
        p.error("config e (approximate) needs --sensitivity PATH")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    command = ".venv/bin/python benchmarks/task_serving.py " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    rules = write_rules(work / "task_rules.json")
    configs = offload_configs(args, rules, args.sensitivity)
    workload = build_workload(args.model, args.requests, args.rate, args.seed,
                              args.prompt_chars, args.slo_scale)
    acc = rule_accuracy(rules, workload)
    print(f"rule file {rules}: classification accuracy {acc['overall']:.1%} on the "
          f"{len(workload.requests)} prompts (" + ", ".join(
              f"{t} {_f(v, '.0%')}" for t, v in acc["per_task"].items()) + ")",
          flush=True)
    print(f"workload: {len(workload.requests)} requests over "
          f"{workload.requests[-1]['arrival_s']:.1f} s of arrivals "
          f"({args.rate} req/s), tasks " + json.dumps(
              {t: sum(r['task'] == t for r in workload.requests) for t in TASKS}),
          flush=True)

    profiles = None
    if any(k in args.configs for k in "cde"):
        if args.profiles:
            profiles = Path(args.profiles)
            if not profiles.exists():
                sys.exit(f"--profiles {profiles} does not exist")
        else:
            if args.warmup < args.replan_every:
                print(f"warning: warm-up ({args.warmup}) < replan_every "
                      f"({args.replan_every}): the server may never save profiles")
            profiles = warm_up(args, configs, work)

    runs: dict[str, list[dict]] = {k: [] for k in args.configs}
    raw: dict[str, list[list[dict]]] = {k: [] for k in args.configs}
    for rep in range(args.repeats):  # interleaved, so drift on the host hits all alike
        for key in args.configs:
            print(f"config {key}) {CONFIGS[key]}, run {rep + 1}/{args.repeats}", flush=True)
            copy = None
            if key in "cde":
                copy = work / f"profiles-{key}.json"
                copy.unlink(missing_ok=True)
                shutil.copyfile(profiles, copy)
                copy.chmod(0o644)
            results, log = run_config(key, configs[key], workload, args, work, copy)
            raw[key].append(results)
            (work / f"requests-{key}-{rep}.json").write_text(json.dumps(results, indent=1))
            row = {"key": key, "config": CONFIGS[key], **summarize(results),
                   "hit_rate": log["hit_rate"], "hits": log["hits"],
                   "misses": log["misses"], "evictions": log["evictions"],
                   "rerouted": log["rerouted"], "replans": log["replans"],
                   "mib_loaded": log["mib_loaded"], "load_s": log["load_s"],
                   "stats_line": log["stats_line"], "scheduler_line": log["scheduler_line"]}
            runs[key].append(row)
            print("  " + json.dumps({k: v for k, v in row.items() if k not in (
                "per_task", "stats_line", "scheduler_line")}), flush=True)

    tokenizer = None
    if "a" in raw or ("d" in raw and "e" in raw):
        tokenizer = load_tokenizer(args.model)
    rows = []
    for key in args.configs:
        row = aggregate(runs[key])
        row.update(additional_config=configs[key], rule_accuracy=acc, runs=runs[key],
                   similarity_to_d=None, similarity_unit=None)
        if "a" in raw and key != "a":
            sims = [similarity(x, y, tokenizer) for x, y in zip(raw["a"], raw[key])]
            row["same_as_plain"] = statistics.median(v for v, _ in sims)
        if key == "e" and "d" in raw:
            sims = [similarity(x, y, tokenizer) for x, y in zip(raw["d"], raw["e"])]
            row["similarity_to_d"] = statistics.median(v for v, _ in sims)
            row["similarity_unit"] = sims[0][1]
        rows.append(row)

    table = markdown(rows)
    table += (f"\n\nMedians of {args.repeats} interleaved runs per config (SLO % also "
              f"min-max). Workload: {args.requests} requests, Poisson {args.rate} req/s, seed "
              f"{args.seed}, {args.prompt_chars}-char prompts, SLO scale {args.slo_scale},"
              f" pool {args.pool_slots}/{TOTAL_EXPERTS} slots, re-plan every "
              f"{args.replan_every}, warm-up {args.warmup}. Rule-file accuracy "
              f"{acc['overall']:.1%}. Similarity to d: mean fraction of leading "
              f"{'tokens' if tokenizer else 'characters'} identical.")
    print(table)
    write_results(args.name, command, table, rows, plot)


if __name__ == "__main__":
    main()
