"""Does prefetch hide expert loads on a CPU host with the disk store?

    .venv/bin/python benchmarks/prefetch_cpu.py

Trained checkpoint ../shared/models/tiny-moe-4domains (real routing), held-out text
of its four domains as prompts, disk store, pool at 50% of all experts, `reuse`
eviction. Rows: plain vLLM (all experts resident), on-demand loading (predictor
none), next-gate and lookahead prefetch at depth 2, and the oracle (replays the
on-demand run's trace). Batch 1 (4 requests, one at a time) and batch 8 (8 requests
together). Each configuration in its own engine, ROUNDS interleaved passes over all
of them, 3 timed batches after a warm-up batch per engine; tokens/s (prefill
included) is the median over every timed batch, the counters (stall seconds: time
the forward pass waited for experts; misses; prefetch hits and waste; recall at
d=1) are means per engine of its timed batches. Outputs are checked token-identical
to plain vLLM. Writes benchmarks/results/prefetch_cpu.*.
"""

from __future__ import annotations

import json
from pathlib import Path

from common import RESULTS, held_out_prompts, timed_tokens_per_s, write_results
from predictor_recall import MODEL, sidecar

from vllm_moe_offload.cli.engine_probe import run_in_subprocess

SLOTS = 64  # 50% of 8 layers x 16 experts
EVICTION = "reuse"  # the default policy, named so that a later default cannot change a row
ROUNDS = 2  # passes over all configurations, interleaved: this VM's noise is +-30%


def run(prompts, offload, batch: int, max_tokens=48) -> dict:
    # In-process engine: the same prompts in the same order each batch, so every run
    # takes the same steps and the oracle's trace lines up with the run it replays.
    spec = {"model": str(MODEL), "prompts": prompts, "max_tokens": max_tokens,
            "timed": True, "repeats": 3, "max_model_len": 1024, "offload": offload,
            "max_num_seqs": batch, "in_process": True}
    return run_in_subprocess(spec)


def configs(batch: int, work: Path, heads: Path) -> list[tuple[str, dict | None]]:
    store = {"enabled": True, "pool_slots": SLOTS, "store": "disk", "eviction": EVICTION,
             "store_dir": str(work / "store")}
    trace = str(work / f"trace-b{batch}.bin")
    return [
        ("plain vLLM", None),
        ("on-demand", {**store, "trace_path": trace}),  # recorded before the oracle runs
        ("next-gate d=2", {**store, "predictor": "next-gate", "prefetch_depth": 2}),
        ("lookahead d=2", {**store, "predictor": "lookahead", "prefetch_depth": 2,
                           "predictor_path": str(heads)}),
        ("oracle d=2", {**store, "predictor": "oracle", "prefetch_depth": 2,
                        "predictor_path": trace}),
    ]


def main() -> None:
    work = RESULTS / "work"
    heads = sidecar()
    # batch 1: 4 requests decoded one at a time; batch 8: 8 requests decoded together
    plan = [(batch, held_out_prompts(requests)) for batch, requests in ((1, 4), (8, 8))]
    runs: dict[tuple[int, str], list[dict]] = {}
    for _ in range(ROUNDS):
        for batch, prompts in plan:
            for label, offload in configs(batch, work, heads):
                runs.setdefault((batch, label), []).append(run(prompts, offload, batch))
    rows = []
    for (batch, label), results in runs.items():
        plain = runs[(batch, "plain vLLM")]
        tps = timed_tokens_per_s(results, plain, label)
        timed = [r["stats"].get("timed", {}) for r in results]

        def mean(key):
            values = [t[key] for t in timed if key in t]
            return sum(values) / len(values) if values else None

        recalls = [t["recall"]["1"] for t in timed if "1" in t.get("recall", {})]
        rows.append({"batch": batch, "config": label, "tokens_per_s": tps, "runs": len(results),
                     "stall_s": mean("stall_seconds"), "misses": mean("misses"),
                     "prefetch_hits": mean("prefetch_hits"),
                     "prefetch_wasted": mean("prefetch_wasted"),
                     "recall_d1": sum(recalls) / len(recalls) if recalls else None})
        print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        base = next(r for r in rows if r["batch"] == row["batch"] and r["config"] == "plain vLLM")
        row["ratio_to_plain"] = row["tokens_per_s"] / base["tokens_per_s"]
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
                     f"{_fmt(r['misses'], '.0f')} | {_fmt(r['prefetch_hits'], '.0f')} | "
                     f"{_fmt(r['prefetch_wasted'], '.0f')} | {_fmt(r['recall_d1'], '.2f')} |")
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
