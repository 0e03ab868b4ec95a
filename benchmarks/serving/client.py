"""A streaming /v1/completions client that sends each request at its arrival time,
and what its results say (SLO attainment, throughput, TTFT/TPOT percentiles,
output similarity)."""

from __future__ import annotations

import asyncio
import json
import time

from serving.tasks import TASKS, Workload

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
        "send_lag_ms": (sent - t0 - r["arrival_s"]) * 1000,  # the client's own delay
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
        # TTFT runs from the send; a client that sends late (it shares the CPU) hides it
        "send_lag_p99_ms": _pct([r["send_lag_ms"] for r in results], 99),
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
