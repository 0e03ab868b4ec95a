"""What does splitting the pool into slot groups cost in hit rate?

    .venv/bin/python benchmarks/slot_groups.py

On CUDA, a pool of more slots than one vLLM MoE kernel call may see (992) is split
into groups of consecutive layers, each layer's experts in its group's slots
(core/slot_pool.py). This replays the routing traces of benchmarks/eviction.py
(recorded by the plugin: the trained tiny-moe-4domains, 8 layers x 16 experts, at
batch 1 and 8; a generated Qwen3-MoE, 6 x 32, random routing, at batch 8) through
the engine's own grouped pool (core/replay.py, which counts as the engine does:
tests/unit/runtime/test_expert_cache.py), with 1 to 4 groups of equal layer runs and
slots in proportion, where each group holds one layer's experts; policy `reuse`
(the default) and `lru`, on demand and with oracle prefetch of the next call. Hit
rates do not depend on the hardware. Writes benchmarks/results/slot_groups.{md,json,png}.

These models have 6-8 layers, so a group here holds 1.5-4 layers' experts; the
split on a GPU leaves each group far more (Qwen3-30B-A3B's default pool: 4 groups
of 12 layers and 768 slots, 6 layers' experts each), so these rows overstate its
cost.
"""

from __future__ import annotations

from common import write_results
from eviction import traces

from vllm_moe_offload.core.replay import PROFILES, calls_from_records, replay
from vllm_moe_offload.core.slot_pool import SlotGroup
from vllm_moe_offload.core.trace import read_trace

PROFILE = PROFILES["qwen3-30b-a3b-pcie5"]  # hit rates do not depend on it
POLICIES = ("reuse", "lru")
GROUPS = (1, 2, 3, 4)


def even_groups(slots: int, layers: int, n: int) -> list[SlotGroup]:
    """n runs of consecutive layers, slots in proportion (as split_pool makes them)."""
    edges = [i * layers // n for i in range(n + 1)]
    cut = [slots * b // layers for b in edges]
    return [SlotGroup(range(edges[i], edges[i + 1]), cut[i], cut[i + 1]) for i in range(n)]


def rows_of(name: str, trace, batch: int) -> list[dict]:
    header, records = read_trace(str(trace))
    calls = calls_from_records(records)
    L, E = header.num_layers, header.experts_per_layer
    rows = []
    for share in (0.25, 0.5, 0.75):
        slots = int(L * E * share)
        for depth in (0, 1):
            for policy in POLICIES:
                base = None
                for n in GROUPS:
                    groups = even_groups(slots, L, n)
                    if min(g.size for g in groups) < E:
                        continue  # a group must hold one layer call
                    hit = replay(calls, slots, policy, PROFILE, depth, E, groups).hit_rate
                    base = hit if n == 1 else base
                    rows.append({"model": name, "batch": batch, "pool": share,
                                 "slots": slots, "depth": depth, "policy": policy,
                                 "groups": n, "min_group": min(g.size for g in groups),
                                 "hit_rate": hit, "vs_one": hit / base if base else None})
    return rows


def markdown(rows) -> str:
    out = ["Hit rate by slot groups (replay through the engine's grouped pool; depth 1 = "
           "oracle prefetch of the next call); in brackets, the change against one "
           "group, in points. '-': a group would hold fewer slots than one layer's "
           "experts.", "",
           "| model | batch | pool | policy | prefetch | " + " | ".join(
               f"{n} group{'s' if n > 1 else ''}" for n in GROUPS) + " |",
           "|---|---|---|---|---|" + "---|" * len(GROUPS)]
    keys = dict.fromkeys((r["model"], r["batch"], r["pool"], r["slots"], r["policy"],
                          r["depth"]) for r in rows)
    for model, batch, pool, slots, policy, depth in keys:
        same = {r["groups"]: r for r in rows if (r["model"], r["batch"], r["pool"],
                                                 r["policy"], r["depth"])
                == (model, batch, pool, policy, depth)}
        one = same[1]["hit_rate"]
        cells = [("-" if n not in same else f"{same[n]['hit_rate']:.1%}" + (
            "" if n == 1 else f" ({100 * (same[n]['hit_rate'] - one):+.1f})"))
            for n in GROUPS]
        out.append(f"| {model} | {batch} | {pool:.0%} ({slots}) | {policy} | "
                   f"{'oracle' if depth else 'none'} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(rows, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["policy"] == "reuse" and r["depth"] == 0]
    keys = list(dict.fromkeys((r["model"], r["batch"], r["pool"]) for r in shown))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(GROUPS)
    for i, n in enumerate(GROUPS):
        values = [next((r["hit_rate"] for r in shown if r["groups"] == n
                        and (r["model"], r["batch"], r["pool"]) == k), 0) for k in keys]
        ax.bar([x + i * width for x in range(len(keys))], values, width,
               label=f"{n} group{'s' if n > 1 else ''}")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(keys))])
    ax.set_xticklabels([f"{m.split()[0]}\nb{b} S={p:.0%}" for m, b, p in keys], fontsize=7)
    ax.set_ylabel("hit rate (replay, reuse, on demand)")
    ax.set_title("slot groups: hit rate against one pool (a missing bar: a group "
                 "would hold less than one layer)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    rows = []
    for name, trace, batch in traces():
        rows += rows_of(name, trace, batch)
    table = markdown(rows)
    print(table)
    write_results("slot_groups", ".venv/bin/python benchmarks/slot_groups.py", table, rows,
                  plot)


if __name__ == "__main__":
    main()
