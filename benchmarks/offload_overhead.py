"""What does the slot pool cost, and what memory does it give back to the KV cache?

    .venv/bin/python benchmarks/offload_overhead.py [--quick]

For each model: plain vLLM (all experts resident) against expert offload with the
pool at 100%, 50% and 25% of all experts, host and disk stores, `reuse` eviction.
Each configuration in its own engine, --rounds interleaved passes over all of them,
3 timed batches after a warm-up batch per engine. Reports tokens/s (prefill
included; the median over every timed batch) and its ratio to plain vLLM, hit rate,
and bytes loaded and load seconds per engine's timed batches, the worker's RSS, and
the KV-cache capacity in tokens that vLLM sizes at the same memory setting (auto KV
sizing: gpu_memory_utilization x RAM minus what the worker holds; median and range
over the rounds). Outputs are checked token-identical to plain vLLM. Writes
benchmarks/results/offload_overhead.{json,md,png}.

Models: the trained checkpoint in ../shared/models/tiny-moe-4domains (real routing,
held-out text from ../shared/data/corpus) when present, and a generated Qwen3-MoE
whose experts are most of its weights (random routing), to make the memory visible.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import median

from common import RESULTS, SHARED, held_out_prompts, timed_tokens_per_s, write_results

from vllm_moe_offload.cli.engine_probe import run_in_subprocess
from vllm_moe_offload.hf.tiny_moe import build_tiny_moe, expert_bytes

EVICTION = "reuse"  # the default policy, named so that a later default cannot change a row


def models(quick: bool, work: Path) -> list[dict]:
    out = []
    trained = SHARED / "models" / "tiny-moe-4domains"
    if trained.exists():
        out.append({"name": "tiny-moe-4domains (trained)", "path": str(trained),
                    "layers": 8, "experts": 16})
    if not quick:
        path = build_tiny_moe(work / "gen-qwen3-moe-6x32", "qwen3_moe", num_layers=6,
                              num_experts=32, hidden_size=512, expert_ffn=1024)
        out.append({"name": "generated Qwen3-MoE 6x32 (random)", "path": str(path),
                    "layers": 6, "experts": 32})
    return out


def run(model: dict, prompts, max_tokens: int, offload: dict | None, store_dir: str) -> dict:
    spec = {"model": model["path"], "prompts": prompts, "max_tokens": max_tokens,
            "timed": True, "repeats": 3, "kv_cache_gib": None, "gpu_memory_utilization": 0.3,
            "max_model_len": 1024, "offload": None}
    if offload is not None:
        spec["offload"] = {"enabled": True, "store_dir": store_dir, "eviction": EVICTION,
                           **offload}
    # Auto KV sizing, so memory the experts give back shows up as KV capacity.
    return run_in_subprocess(spec, env={"VLLM_CPU_KVCACHE_SPACE": None})


def configs(model: dict) -> list[tuple[str, dict | None]]:
    total = model["layers"] * model["experts"]
    out = [("plain vLLM", None)]
    for store in ("host", "disk"):
        for frac in (1.0, 0.5, 0.25):
            slots = max(model["experts"], int(total * frac))
            out.append((f"offload {store} S={frac:.0%}", {"store": store, "pool_slots": slots}))
    return out


def row(model: dict, label: str, results: list[dict], plain: list[dict]) -> dict:
    tps = timed_tokens_per_s(results, plain, label)
    base = timed_tokens_per_s(plain, plain, "plain vLLM")
    timed = [r["stats"].get("timed", {}) for r in results]
    lookups = sum(t.get("hits", 0) + t.get("misses", 0) for t in timed)
    kv = [r["kv_cache_tokens"] for r in results]
    return {"model": model["name"], "config": label, "runs": len(results),
            "tokens_per_s": tps, "ratio_to_plain": tps / base,
            "hit_rate": sum(t["hits"] for t in timed) / lookups if lookups else None,
            "mib_loaded": sum(t.get("bytes_loaded", 0) for t in timed) / len(timed) / 2**20,
            "load_s": sum(t.get("load_seconds", 0.0) for t in timed) / len(timed),
            "rss_mib": median(r["stats"]["rss_bytes"] for r in results) / 2**20,
            "kv_cache_tokens": median(kv), "kv_cache_tokens_min": min(kv),
            "kv_cache_tokens_max": max(kv), "expert_mib": expert_bytes(model["path"]) / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="trained model only, fewer tokens")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2,
                   help="interleaved passes over every configuration (this VM's noise "
                        "is +-30%%; KV capacity moves with the worker's RSS)")
    args = p.parse_args()
    work = RESULTS / "work"
    prompts = held_out_prompts(args.batch)
    max_tokens = 16 if args.quick else args.max_tokens
    rows = []
    for model in models(args.quick, work):
        runs: dict[str, list[dict]] = {}
        for _ in range(args.rounds):  # a b c .., a b c ..: no config always runs first
            for label, offload in configs(model):
                runs.setdefault(label, []).append(
                    run(model, prompts, max_tokens, offload, str(work / "store")))
        for label, results in runs.items():
            rows.append(row(model, label, results, runs["plain vLLM"]))
            print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows)
    print(table)
    flags = (" --quick" if args.quick else "") + (
        f" --rounds {args.rounds}" if args.rounds != 2 else "")
    write_results("offload_overhead", ".venv/bin/python benchmarks/offload_overhead.py"
                  + flags, table, rows, plot)


def markdown(rows) -> str:
    lines = ["| model | config | tok/s | vs plain | hit rate | MiB loaded | load s | "
             "worker RSS MiB | KV cache tokens (median, min-max) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hit = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.1%}"
        lines.append(f"| {r['model']} | {r['config']} | {r['tokens_per_s']:.1f} | "
                     f"{r['ratio_to_plain']:.2f} | {hit} | {r['mib_loaded']:.1f} | "
                     f"{r['load_s']:.3f} | {r['rss_mib']:.0f} | {r['kv_cache_tokens']:,.0f} "
                     f"({r['kv_cache_tokens_min']:,}-{r['kv_cache_tokens_max']:,}) |")
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(names), 2, figsize=(13, 3.6 * len(names)), squeeze=False)
    for (ax_tps, ax_kv), name in zip(axes, names):
        mine = [r for r in rows if r["model"] == name]
        labels = [r["config"].replace("offload ", "") for r in mine]
        colors = ["gray"] + ["tab:blue" if "host" in l else "tab:orange" for l in labels[1:]]
        ax_tps.bar(labels, [r["tokens_per_s"] for r in mine], color=colors)
        ax_tps.set_ylabel("tokens/s (prefill included)")
        ax_tps.set_title(f"{name}: throughput")
        ax_kv.bar(labels, [r["kv_cache_tokens"] / 1e3 for r in mine], color=colors)
        ax_kv.set_ylabel("KV cache capacity (k tokens)")
        ax_kv.set_title(f"{name}: KV capacity at the same memory setting")
        for ax in (ax_tps, ax_kv):
            ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
