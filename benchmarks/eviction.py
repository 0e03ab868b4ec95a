"""Which eviction policy keeps the experts that come next?

    .venv/bin/python benchmarks/eviction.py [--skip-e2e]

1. Traces, recorded by the plugin itself (`trace_path`, every expert resident):
   the trained checkpoint ../shared/models/tiny-moe-4domains (8 layers x 16 experts,
   top-2) over held-out text of its four domains, at batch 1 (8 requests, one at a
   time) and batch 8 (16 requests, 8 at once), 96 new tokens each; and a generated
   Qwen3-MoE (6 layers x 32 experts, random routing) at batch 8.
2. Replay with the engine's own policy code (core/eviction.py): hit rate of every
   policy, on demand, and its share of Belady's (farthest next use, read from the
   trace: the bound, not a candidate), at pool S = 25% and 50%.
3. End to end through vLLM on CPU with the disk store: decode tokens/s, MiB loaded
   and load seconds of each policy against LRU in the same run, S = 25% and 50%,
   batch 1 and 8.
Writes benchmarks/results/eviction.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS, SHARED, held_out_prompts, timed_tokens_per_s, write_results

from vllm_moe_offload.core.replay import PROFILES, calls_from_records, replay
from vllm_moe_offload.core.trace import read_trace
from vllm_moe_offload.cli.engine_probe import run_in_subprocess
from vllm_moe_offload.hf.tiny_moe import build_tiny_moe

TRAINED = SHARED / "models" / "tiny-moe-4domains"
WORK = RESULTS / "work" / "eviction"
REPLAY_POLICIES = ("lru", "lfu", "layer", "reuse", "belady")
E2E_POLICIES = ("lru", "lfu", "layer", "reuse")
PROFILE = PROFILES["qwen3-30b-a3b-pcie5"]  # hit rates do not depend on it


def traces() -> list[tuple[str, Path, int]]:
    """(model name, trace file, batch) of the three traces; recorded if missing."""
    WORK.mkdir(parents=True, exist_ok=True)
    generated = build_tiny_moe(WORK / "gen-qwen3-moe-6x32", "qwen3_moe", num_layers=6,
                               num_experts=32, hidden_size=512, expert_ffn=1024)
    out = []
    for name, model, batch, requests in (
            ("tiny-moe-4domains (trained)", str(TRAINED), 1, 8),
            ("tiny-moe-4domains (trained)", str(TRAINED), 8, 16),
            ("generated Qwen3-MoE 6x32 (random)", str(generated), 8, 16)):
        trace = WORK / f"trace-{Path(model).name}-b{batch}.bin"
        if not trace.exists():
            record(model, trace, batch, requests, max_tokens=96)
        out.append((name, trace, batch))
    return out


def record(model: str, trace: Path, batch: int, requests: int, max_tokens: int) -> None:
    spec = {"model": model, "prompts": held_out_prompts(requests), "max_tokens": max_tokens,
            "max_model_len": 1024, "max_num_seqs": batch, "in_process": True,
            "offload": {"enabled": True, "pool_slots": 10**6, "store": "host",
                        "trace_path": str(trace)}}
    run_in_subprocess(spec)


def replay_rows(name: str, trace: Path, batch: int) -> list[dict]:
    header, records = read_trace(str(trace))
    calls = calls_from_records(records)
    total = header.num_layers * header.experts_per_layer
    rows = []
    for share in (0.25, 0.5):
        slots = int(total * share)
        hits = {p: replay(calls, slots, p, PROFILE, 0, header.experts_per_layer).hit_rate
                for p in REPLAY_POLICIES}
        for policy in REPLAY_POLICIES:
            rows.append({"part": "replay", "model": name, "batch": batch,
                         "pool": f"{share:.0%} ({slots} slots)", "policy": policy,
                         "hit_rate": hits[policy],
                         "of_belady": hits[policy] / hits["belady"],
                         "floor": (slots - header.experts_per_layer) / slots})
    return rows


def e2e_rows(store_dir: Path, rounds: int) -> list[dict]:
    """Each configuration in its own engine; `rounds` passes over all of them,
    interleaved (a b c .., a b c ..), 3 timed batches per engine; tokens/s is the
    median over every timed batch of a configuration (this VM's noise is +-30%)."""
    configs = [(1, 4, None, None)] + [(1, 4, s, p) for s in (32, 64) for p in E2E_POLICIES]
    configs += [(8, 8, None, None)] + [(8, 8, s, p) for s in (32, 64) for p in E2E_POLICIES]
    runs: dict[tuple, list[dict]] = {}
    for _ in range(rounds):
        for batch, requests, slots, policy in configs:
            spec = {"model": str(TRAINED), "prompts": held_out_prompts(requests),
                    "max_tokens": 48, "timed": True, "repeats": 3, "max_model_len": 1024,
                    "max_num_seqs": batch, "in_process": True, "offload": None}
            if policy is not None:
                spec["offload"] = {"enabled": True, "pool_slots": slots, "store": "disk",
                                   "store_dir": str(store_dir), "eviction": policy}
            runs.setdefault((batch, slots, policy), []).append(run_in_subprocess(spec))
    rows = []
    for (batch, slots, policy), results in runs.items():
        plain = runs[(batch, None, None)]
        tps = timed_tokens_per_s(results, plain, policy)
        timed = [r["stats"].get("timed", {}) for r in results]
        row = {"part": "e2e", "batch": batch, "policy": policy or "-",
               "pool": f"{slots * 100 // 128}% ({slots} slots)" if slots else "plain vLLM",
               "tokens_per_s": tps, "runs": len(results),
               "mib_loaded": sum(t.get("bytes_loaded", 0) for t in timed) / len(timed) / 2**20,
               "load_s": sum(t.get("load_seconds", 0) for t in timed) / len(timed),
               "hit_rate": (sum(t["hits"] for t in timed) / max(1, sum(
                   t["hits"] + t["misses"] for t in timed))) if policy else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
    for row in rows:
        same = [r for r in rows if r["batch"] == row["batch"]]
        plain = next(r for r in same if r["policy"] == "-")
        lru = next((r for r in same if r["policy"] == "lru" and r["pool"] == row["pool"]),
                   None)
        row["vs_plain"] = row["tokens_per_s"] / plain["tokens_per_s"]
        row["vs_lru"] = row["tokens_per_s"] / lru["tokens_per_s"] if lru else None
    return rows


def markdown(rows) -> str:
    out = ["Replay, on demand (no prefetch): hit rate, and its share of Belady's.", "",
           "| model | batch | pool | " + " | ".join(REPLAY_POLICIES)
           + " | no-collapse floor (S-E)/S, random routing |",
           "|---|---|---|" + "---|" * (len(REPLAY_POLICIES) + 1)]
    replayed = [r for r in rows if r["part"] == "replay"]
    for key in dict.fromkeys((r["model"], r["batch"], r["pool"]) for r in replayed):
        group = {r["policy"]: r for r in replayed if (r["model"], r["batch"], r["pool"]) == key}
        cells = [f"{g['hit_rate']:.1%} ({g['of_belady']:.0%})" for g in group.values()]
        floor = next(iter(group.values()))["floor"]
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells)
                   + (f" | {floor:.1%} |" if "random" in key[0] else " | - |"))
    e2e = [r for r in rows if r["part"] == "e2e"]
    if e2e:
        out += ["", "End to end through vLLM on CPU, disk store, tiny-moe-4domains, 48 new "
                "tokens per request (batch 1: 4 requests one at a time; batch 8: 8 at "
                "once); tokens/s is the median over 3 timed batches x "
                f"{e2e[0]['runs']} interleaved engines; MiB loaded and load seconds per "
                "timed pass of 3 batches; outputs token-identical to plain.", "",
                "| batch | pool | policy | tok/s | vs LRU | vs plain | MiB loaded | load s "
                "| hit rate |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in e2e:
            vs_lru = "-" if r["vs_lru"] is None else f"{r['vs_lru']:.2f}"
            hit = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.1%}"
            out.append(f"| {r['batch']} | {r['pool']} | {r['policy']} | "
                       f"{r['tokens_per_s']:.1f} | {vs_lru} | {r['vs_plain']:.2f} | "
                       f"{r['mib_loaded']:.1f} | {r['load_s']:.3f} | {hit} |")
    return "\n".join(out)


def hit_rate_bars(ax, rows, policies) -> None:
    """One bar per policy for each (model, batch, pool) of replayed `rows`."""
    groups = list(dict.fromkeys((r["model"], r["batch"], r["pool"]) for r in rows))
    width = 0.8 / len(policies)
    for i, policy in enumerate(policies):
        values = [next(r["hit_rate"] for r in rows if r["policy"] == policy
                       and (r["model"], r["batch"], r["pool"]) == g) for g in groups]
        ax.bar([x + i * width for x in range(len(groups))], values, width, label=policy)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))])
    ax.set_xticklabels([f"{m.split()[0]}\nb{b} {p.split()[0]}" for m, b, p in groups],
                       fontsize=7)
    ax.set_ylabel("hit rate (replay, on demand)")
    ax.legend(fontsize=7)


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e2e = [r for r in rows if r["part"] == "e2e" and r["vs_lru"] is not None]
    fig, axes = plt.subplots(1, 2 if e2e else 1, figsize=(14 if e2e else 8, 4.5),
                             squeeze=False)
    hit_rate_bars(axes[0][0], [r for r in rows if r["part"] == "replay"], REPLAY_POLICIES)
    if e2e:
        ax = axes[0][1]
        settings = list(dict.fromkeys((r["batch"], r["pool"]) for r in e2e))
        width = 0.8 / len(E2E_POLICIES)
        for i, policy in enumerate(E2E_POLICIES):
            values = [next(r["vs_lru"] for r in e2e if r["policy"] == policy
                           and (r["batch"], r["pool"]) == s) for s in settings]
            ax.bar([x + i * width for x in range(len(settings))], values, width,
                   label=policy)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(settings))])
        ax.set_xticklabels([f"batch {b}, S={p.split()[0]}" for b, p in settings])
        ax.set_ylabel("decode tok/s vs LRU (vLLM on CPU, disk store)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-e2e", action="store_true", help="traces and replay only")
    p.add_argument("--rounds", type=int, default=2, help="interleaved engines per config")
    args = p.parse_args()
    rows = []
    for name, trace, batch in traces():
        rows += replay_rows(name, trace, batch)
    if not args.skip_e2e:
        rows += e2e_rows(WORK / "store", args.rounds)
    table = markdown(rows)
    print(table)
    write_results("eviction", ".venv/bin/python benchmarks/eviction.py", table, rows, plot)


def rewrite_from_json() -> None:
    """Re-render the table and plot from eviction.json (no engines)."""
    rows = json.loads((RESULTS / "eviction.json").read_text())
    write_results("eviction", ".venv/bin/python benchmarks/eviction.py", markdown(rows),
                  rows, plot)


if __name__ == "__main__":
    main()
