"""Does the server hold load with offload on: no failures, what throughput, no leak?

    .venv/bin/python benchmarks/serve_load.py [--quick] [--soak-minutes 10]

The OpenAI server (`python -m vllm.entrypoints.openai.api_server`, one fresh server
per configuration) driven by vLLM's own benchmark client (`vllm.benchmarks.serve`,
called from Python): random prompts (200 tokens in, 48 out) and real text (held-out
prompts of the shared corpus, 48 out), at concurrency 1 (24 requests) and 16 (160).
Configurations: plain vLLM, and offload with the pool at 100% / 50% / 25% of all
experts, host and disk stores (default eviction and no predictor). Model: the trained
../shared/models/tiny-moe-4domains when present, else a generated Qwen3-MoE.
Reports failed requests (must be 0), output tokens/s and its ratio to plain at the
same load, TTFT and TPOT p50/p99, and the server's RSS (API server + engine core +
workers) sampled every second: at start, at the end, and its peak. `--soak-minutes N`
then keeps one offload configuration (disk, 25%) under concurrency 16 for N minutes
and reports RSS over time (a leak shows as a slope). `--quick` is the CI version:
disk 25% alone (nothing to compare: it checks that no request fails), concurrency 4,
8 requests each.
Writes benchmarks/results/serve_load.{md,json,png} (--quick: serve_load_quick.*).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import psutil
from common import RESULTS, SHARED, held_out_prompts, write_results
from serving.server import serving

MODEL = SHARED / "models" / "tiny-moe-4domains"
WORK = RESULTS / "work" / "serve_load"
CONFIGS = {  # name -> expert_offload settings (None: plain vLLM)
    "plain vLLM": None,
    "host 100%": {"pool_fraction": 1.0, "store": "host"},
    "host 50%": {"pool_fraction": 0.5, "store": "host"},
    "host 25%": {"pool_fraction": 0.25, "store": "host"},
    "disk 50%": {"pool_fraction": 0.5, "store": "disk"},
    "disk 25%": {"pool_fraction": 0.25, "store": "disk"},
}
LOADS = [("random", 1, 24), ("random", 16, 160), ("text", 1, 24), ("text", 16, 160)]


class RssSampler:
    """Sum of RSS over a process and its children, every `period_s` in a thread."""

    def __init__(self, pid: int, period_s: float = 1.0):
        self.proc, self.period_s = psutil.Process(pid), period_s
        self.samples: list[tuple[float, float]] = []  # (seconds, MiB)
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in procs if p.is_running())
                self.samples.append((time.monotonic() - self._t0, rss / 2**20))
            except psutil.Error:
                pass
            self._stop.wait(self.period_s)

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        self._thread.join()
        return self.samples


def bench_args(url: str, model: str, dataset: str, concurrency: int, prompts: int,
               text_file: Path):
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    argv = ["--backend", "vllm", "--base-url", url, "--model", model,
            "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
            "--ignore-eos", "--percentile-metrics", "ttft,tpot",
            "--metric-percentiles", "50,99", "--disable-tqdm", "--seed", "0"]
    if dataset == "random":
        argv += ["--dataset-name", "random", "--random-input-len", "200",
                 "--random-output-len", "48"]
    else:
        argv += ["--dataset-name", "custom", "--dataset-path", str(text_file),
                 "--custom-output-len", "48", "--skip-chat-template"]
    return parser.parse_args(argv)


def run_load(url: str, model: str, dataset: str, concurrency: int, prompts: int,
             text_file: Path) -> dict:
    from vllm.benchmarks.serve import main as bench

    r = bench(bench_args(url, model, dataset, concurrency, prompts, text_file))
    errors = sorted({e for e in r.get("errors", []) if e})[:3]
    return {"completed": r["completed"], "failed": r["failed"], "errors": errors,
            "tokens_per_s": r["output_throughput"],
            "ttft_p50_ms": r["p50_ttft_ms"], "ttft_p99_ms": r["p99_ttft_ms"],
            "tpot_p50_ms": r["p50_tpot_ms"], "tpot_p99_ms": r["p99_tpot_ms"]}


def offload_settings(cfg: dict | None, total_experts: int, work: Path) -> dict | None:
    if cfg is None:
        return None
    return {"enabled": True, "store": cfg["store"], "store_dir": str(work / "store"),
            "pool_slots": max(1, int(total_experts * cfg["pool_fraction"]))}


def run_config(name: str, cfg: dict | None, model: str, total_experts: int,
               loads: list, text_file: Path, work: Path, soak_s: float = 0.0) -> list[dict]:
    rows = []
    log = work / f"server-{name.replace(' ', '_').replace('%', '')}.log"
    with serving(model, offload_settings(cfg, total_experts, work), log, work,
                 startup_timeout=600) as (url, proc):
        sampler = RssSampler(proc.pid)
        for dataset, concurrency, prompts in loads:
            t0 = time.monotonic()
            while True:  # once, or again and again for a soak
                r = run_load(url, model, dataset, concurrency, prompts, text_file)
                rows.append({"config": name, "dataset": dataset, "concurrency": concurrency,
                             "requests": prompts, "soak": bool(soak_s), **r})
                print(json.dumps(rows[-1]), flush=True)
                if time.monotonic() - t0 >= soak_s:
                    break
        rss = sampler.stop()
    for row in rows:
        row["rss_start_mib"] = rss[0][1] if rss else None
        row["rss_end_mib"] = rss[-1][1] if rss else None
        row["rss_peak_mib"] = max(v for _, v in rss) if rss else None
    if soak_s:
        rows[-1]["rss_samples"] = rss
    return rows


def markdown(rows) -> str:
    plain = {(r["dataset"], r["concurrency"]): r["tokens_per_s"] for r in rows
             if r["config"] == "plain vLLM"}
    out = ["| config | prompts | concurrency | requests | failed | out tok/s | vs plain "
           "| TTFT p50 / p99 ms | TPOT p50 / p99 ms | RSS start / end / peak MiB |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("soak"):
            continue
        base = plain.get((r["dataset"], r["concurrency"]))
        ratio = f"{r['tokens_per_s'] / base:.2f}" if base else "-"
        out.append(f"| {r['config']} | {r['dataset']} | {r['concurrency']} | "
                   f"{r['completed'] + r['failed']} | {r['failed']} | "
                   f"{r['tokens_per_s']:.1f} | {ratio} | {r['ttft_p50_ms']:.0f} / "
                   f"{r['ttft_p99_ms']:.0f} | {r['tpot_p50_ms']:.1f} / "
                   f"{r['tpot_p99_ms']:.1f} | {r['rss_start_mib']:.0f} / "
                   f"{r['rss_end_mib']:.0f} / {r['rss_peak_mib']:.0f} |")
    soak = [r for r in rows if r.get("soak")]
    if soak:
        rss = soak[-1]["rss_samples"]
        at = {m: next((v for t, v in rss if t >= 60 * m), rss[-1][1])
              for m in (0, 1, 2, 5, 10)}
        tps = sorted(r["tokens_per_s"] for r in soak)
        out += ["", f"Soak: {soak[0]['config']}, {soak[0]['dataset']} prompts, concurrency "
                f"{soak[0]['concurrency']}, {rss[-1][0] / 60:.1f} minutes: "
                f"{sum(r['completed'] + r['failed'] for r in soak)} requests, "
                f"{sum(r['failed'] for r in soak)} failed; output tok/s median "
                f"{tps[len(tps) // 2]:.1f} (min {tps[0]:.1f}, max {tps[-1]:.1f}); server RSS "
                "(all processes) at " + ", ".join(f"{m} min {v:.0f} MiB" for m, v in at.items())
                + "."]
    return "\n".join(out)


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    soak = [r for r in rows if r.get("rss_samples")]
    fig, axes = plt.subplots(1, 2 if soak else 1, figsize=(13 if soak else 7, 4),
                             squeeze=False)
    ax = axes[0][0]
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == config and r["dataset"] == "random"]
        mine = list({r["concurrency"]: r for r in mine}.values())
        ax.plot([r["concurrency"] for r in mine], [r["tokens_per_s"] for r in mine],
                marker="o", label=config)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency (random prompts)")
    ax.set_ylabel("output tokens/s")
    ax.legend(fontsize=7)
    if soak:
        ax = axes[0][1]
        t, mib = zip(*soak[-1]["rss_samples"])
        ax.plot([x / 60 for x in t], mib)
        ax.set_xlabel("minutes under load")
        ax.set_ylabel("server RSS, MiB (all processes)")
        ax.set_title(f"soak: {soak[-1]['config']}, concurrency {soak[-1]['concurrency']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def rewrite_from_json(name: str = "serve_load") -> None:
    """Re-render the table and plot from NAME.json (no servers)."""
    rows = json.loads((RESULTS / f"{name}.json").read_text())
    command = (RESULTS / f"{name}.md").read_text().split("Command: `")[1].split("`")[0]
    write_results(name, command, markdown(rows), rows, plot)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI: disk 25%% alone, 8 requests")
    p.add_argument("--soak-minutes", type=float, default=0.0)
    p.add_argument("--work-dir", default=str(WORK))
    args = p.parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if MODEL.exists():
        model, total = str(MODEL), 8 * 16
    else:
        from vllm_moe_offload.hf.tiny_moe import build_tiny_moe
        model, total = str(build_tiny_moe(work / "model", "qwen3_moe", num_layers=4,
                                          num_experts=8)), 4 * 8
    text_file = work / "held_out.jsonl"
    text_file.write_text("\n".join(json.dumps({"prompt": t})
                                   for t in held_out_prompts(160, chars=600)))
    configs, loads = CONFIGS, LOADS
    if args.quick:
        configs = {"disk 25%": CONFIGS["disk 25%"]}
        loads = [("random", 4, 8), ("text", 4, 8)]
    rows = []
    for name, cfg in configs.items():
        rows += run_config(name, cfg, model, total, loads, text_file, work)
    if args.soak_minutes:
        rows += run_config("disk 25%", CONFIGS["disk 25%"], model, total,
                           [("text", 16, 64)], text_file, work, args.soak_minutes * 60)
    table = markdown(rows)
    print(table)
    name = "serve_load_quick" if args.quick else "serve_load"
    command = ".venv/bin/python benchmarks/serve_load.py" + (
        " --quick" if args.quick else f" --soak-minutes {args.soak_minutes:g}")
    write_results(name, command, table, rows, plot)
    failed = sum(r["failed"] for r in rows)
    if failed:
        raise SystemExit(f"{failed} requests failed (see the table and {work})")


if __name__ == "__main__":
    main()
