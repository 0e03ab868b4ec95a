"""Shared by the benchmark scripts: prompts from held-out text, result files."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

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


def write_results(name: str, command: str, table: str, rows, plot) -> None:
    """benchmarks/results/NAME.{md,json,png}; the .md names the machine and command."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    host = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    (RESULTS / f"{name}.md").write_text(
        f"Machine: {host}. Command: `{command}`\n\n{table}\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2))
    plot(rows, RESULTS / f"{name}.png")
