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
3. End to end through vLLM on CPU with the disk store: decode tokens/s and MiB
   loaded of each policy against LRU in the same run, S = 25% and 50%, batch 1 and 8.
Writes benchmarks/results/eviction.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS, SHARED, held_out_prompts, write_results

from vllm_moe_offload.core.eviction import POLICIES
from vllm_moe_offload.core.replay import PROFILES, calls_from_records, replay
from vllm_moe_offload.core.trace import read_trace
from vllm_moe_offload.engine_probe import run_in_subprocess
from vllm_moe_offload.tiny_moe import build_tiny_moe

TRAINED = SHARED / "models" / "tiny-moe-4domains"
REPLAY_POLICIES = ("lru", "lfu", "layer", "reuse", "belady")
E2E_POLICIES = ("lru", "lfu", "layer", "reuse")
PROFILE = PROFILES["qwen3-30b-a3b-pcie5"]  # hit rates do not depend on it


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


def e2e_rows(store_dir: Path) -> list[dict]:
    rows = []
    for batch, requests in ((1, 4), (8, 8)):
        prompts = held_out_prompts(requests)
        base = {"model": str(TRAINED), "prompts": prompts, "max_tokens": 48, "timed": True,
                "repeats": 1, "max_model_len": 1024, "max_num_seqs": batch,
                "in_process": True}
        plain = run_in_subprocess({**base, "offload": None})
        plain_tps = plain["generated_tokens"] / plain["gen_seconds"]
        rows.append({"part": "e2e", "batch": batch, "pool": "plain vLLM", "policy": "-",
                     "tokens_per_s": plain_tps, "vs_lru": None, "vs_plain": 1.0,
                     "mib_loaded": 0.0, "hit_rate": None})
        for share, slots in (("25%", 32), ("50%", 64)):
            lru_tps = None
            for policy in E2E_POLICIES:
                r = run_in_subprocess({**base, "offload": {
                    "enabled": True, "pool_slots": slots, "store": "disk",
                    "store_dir": str(store_dir), "eviction": policy}})
                assert r["token_ids"] == plain["token_ids"], f"{policy}: outputs differ"
                tps = r["generated_tokens"] / r["gen_seconds"]
                lru_tps = lru_tps or tps
                t = r["stats"]["timed"]
                row = {"part": "e2e", "batch": batch, "pool": f"{share} ({slots} slots)",
                       "policy": policy, "tokens_per_s": tps, "vs_lru": tps / lru_tps,
                       "vs_plain": tps / plain_tps, "mib_loaded": t["bytes_loaded"] / 2**20,
                       "hit_rate": t["hits"] / max(1, t["hits"] + t["misses"])}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def markdown(rows) -> str:
    out = ["Replay, on demand (no prefetch): hit rate, and its share of Belady's.", "",
           "| model | batch | pool | " + " | ".join(REPLAY_POLICIES) + " | floor (S-E)/S |",
           "|---|---|---|" + "---|" * (len(REPLAY_POLICIES) + 1)]
    replayed = [r for r in rows if r["part"] == "replay"]
    for key in dict.fromkeys((r["model"], r["batch"], r["pool"]) for r in replayed):
        group = {r["policy"]: r for r in replayed if (r["model"], r["batch"], r["pool"]) == key}
        cells = [f"{g['hit_rate']:.1%} ({g['of_belady']:.0%})" for g in group.values()]
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells)
                   + f" | {next(iter(group.values()))['floor']:.1%} |")
    e2e = [r for r in rows if r["part"] == "e2e"]
    if e2e:
        out += ["", "End to end through vLLM on CPU, disk store, tiny-moe-4domains, 48 new "
                "tokens per request; same run, outputs token-identical to plain.", "",
                "| batch | pool | policy | tok/s | vs LRU | vs plain | MiB loaded | hit rate |",
                "|---|---|---|---|---|---|---|---|"]
        for r in e2e:
            vs_lru = "-" if r["vs_lru"] is None else f"{r['vs_lru']:.2f}"
            hit = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.1%}"
            out.append(f"| {r['batch']} | {r['pool']} | {r['policy']} | "
                       f"{r['tokens_per_s']:.1f} | {vs_lru} | {r['vs_plain']:.2f} | "
                       f"{r['mib_loaded']:.1f} | {hit} |")
    return "\n".join(out)


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    replayed = [r for r in rows if r["part"] == "replay"]
    groups = list(dict.fromkeys((r["model"], r["batch"], r["pool"]) for r in replayed))
    e2e = [r for r in rows if r["part"] == "e2e" and r["vs_lru"] is not None]
    fig, axes = plt.subplots(1, 2 if e2e else 1, figsize=(14 if e2e else 8, 4.5),
                             squeeze=False)
    ax = axes[0][0]
    width = 0.8 / len(REPLAY_POLICIES)
    for i, policy in enumerate(REPLAY_POLICIES):
        values = [next(r["hit_rate"] for r in replayed if r["policy"] == policy
                       and (r["model"], r["batch"], r["pool"]) == g) for g in groups]
        ax.bar([x + i * width for x in range(len(groups))], values, width, label=policy)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))])
    ax.set_xticklabels([f"{m.split()[0]}\nb{b} {p.split()[0]}" for m, b, p in groups],
                       fontsize=7)
    ax.set_ylabel("hit rate (replay, on demand)")
    ax.legend(fontsize=7)
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
    args = p.parse_args()
    work = RESULTS / "work" / "eviction"
    work.mkdir(parents=True, exist_ok=True)
    generated = build_tiny_moe(work / "gen-qwen3-moe-6x32", "qwen3_moe", num_layers=6,
                               num_experts=32, hidden_size=512, expert_ffn=1024)
    traces = [("tiny-moe-4domains (trained)", str(TRAINED), 1, 8),
              ("tiny-moe-4domains (trained)", str(TRAINED), 8, 16),
              ("generated Qwen3-MoE 6x32 (random)", str(generated), 8, 16)]
    rows = []
    for name, model, batch, requests in traces:
        trace = work / f"trace-{Path(model).name}-b{batch}.bin"
        if not trace.exists():
            record(model, trace, batch, requests, max_tokens=96)
        rows += replay_rows(name, trace, batch)
    if not args.skip_e2e:
        rows += e2e_rows(work / "store")
    table = markdown(rows)
    print(table)
    write_results("eviction", ".venv/bin/python benchmarks/eviction.py", table, rows, plot)


if __name__ == "__main__":
    main()
