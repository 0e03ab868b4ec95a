"""Does prefetch hide expert loads on a CPU host with the disk store?

    .venv/bin/python benchmarks/prefetch_cpu.py

Trained checkpoint ../shared/models/tiny-moe-4domains (real routing), held-out text
of its four domains as prompts, disk store, pool at 50% of all experts. Rows: plain
vLLM (all experts resident), on-demand loading (predictor none), next-gate and
lookahead prefetch at depth 2, and the oracle (replays the on-demand run's trace).
Same run, same machine: decode tokens/s, stall seconds (time the forward pass
waited for experts), misses, prefetch hits/waste and prediction recall. Batch 1
(one request at a time) and a batch of 8. Writes benchmarks/results/prefetch_cpu.*.
"""

from __future__ import annotations

import json
from pathlib import Path

from common import RESULTS, held_out_prompts, write_results
from predictor_recall import MODEL, sidecar

from vllm_moe_offload.cli.engine_probe import run_in_subprocess

SLOTS = 64  # 50% of 8 layers x 16 experts


def run(prompts, offload, max_tokens=48) -> dict:
    # In-process engine: all prompts enter before the first step, so every run takes
    # the same steps and the oracle's trace lines up with the run it replays.
    spec = {"model": str(MODEL), "prompts": prompts, "max_tokens": max_tokens,
            "timed": True, "repeats": 3, "max_model_len": 1024, "offload": offload,
            "in_process": True}
    return run_in_subprocess(spec)


def main() -> None:
    work = RESULTS / "work"
    heads = sidecar()
    rows = []
    for batch in (1, 8):
        prompts = held_out_prompts(batch)
        store = {"enabled": True, "pool_slots": SLOTS, "store": "disk",
                 "store_dir": str(work / "store")}
        trace = str(work / f"trace-b{batch}.bin")
        configs = [
            ("plain vLLM", None),
            ("on-demand", {**store, "trace_path": trace}),
            ("next-gate d=2", {**store, "predictor": "next-gate", "prefetch_depth": 2}),
            ("lookahead d=2", {**store, "predictor": "lookahead", "prefetch_depth": 2,
                               "predictor_path": str(heads)}),
            ("oracle d=2", {**store, "predictor": "oracle", "prefetch_depth": 2,
                            "predictor_path": trace}),
        ]
        base = None
        for label, offload in configs:
            r = run(prompts, offload)
            tps = r["generated_tokens"] / r["gen_seconds"]
            base = base or tps
            timed = r["stats"].get("timed", {})
            t = r["stats"].get("totals", {})
            recall = t.get("predictions", {}).get("1", {}).get("recall")
            row = {"batch": batch, "config": label, "tokens_per_s": tps,
                   "ratio_to_plain": tps / base,
                   "stall_s": timed.get("stall_seconds"), "misses": timed.get("misses"),
                   "prefetch_hits": timed.get("prefetch_hits"),
                   "prefetch_wasted": timed.get("prefetch_wasted"),
                   "recall_d1": recall}
            rows.append(row)
            print(json.dumps(row), flush=True)
    table = markdown(rows)
    print(table)
    write_results("prefetch_cpu", ".venv/bin/python benchmarks/prefetch_cpu.py", table,
                  rows, plot)


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def markdown(rows) -> str:
    lines = ["| batch | config | tok/s | vs plain | stall s | on-demand misses | "
             "prefetch hits | prefetch wasted | recall d=1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['config']} | {r['tokens_per_s']:.1f} | "
                     f"{r['ratio_to_plain']:.2f} | {_fmt(r['stall_s'], '.3f')} | "
                     f"{_fmt(r['misses'], 'd')} | {_fmt(r['prefetch_hits'], 'd')} | "
                     f"{_fmt(r['prefetch_wasted'], 'd')} | {_fmt(r['recall_d1'], '.2f')} |")
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, 2 * len(batches), figsize=(6 * len(batches) * 2 / 1.5, 4))
    for i, b in enumerate(batches):
        mine = [r for r in rows if r["batch"] == b]
        labels = [r["config"] for r in mine]
        axes[2 * i].bar(labels, [r["tokens_per_s"] for r in mine], color="tab:blue")
        axes[2 * i].set_title(f"batch {b}: decode tokens/s")
        axes[2 * i + 1].bar(labels, [r["stall_s"] or 0 for r in mine], color="tab:red")
        axes[2 * i + 1].set_title(f"batch {b}: stall seconds (timed batch)")
        for ax in axes[2 * i:2 * i + 2]:
            ax.tick_params(axis="x", rotation=35)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
