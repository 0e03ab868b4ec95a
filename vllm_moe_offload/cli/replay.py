"""Replay a routing trace against the slot pool and eviction policies.

    python -m vllm_moe_offload replay TRACE --pool-slots N [--policy lru,reuse,belady]
        [--predictor none|oracle] [--depth D] [--profile qwen3-30b-a3b-pcie5 | all]

TRACE: the plugin's recorder format (trace_path) or JSONL lines
`{"layer": l, "token_idx": t, "topk_ids": [...]}`. The trace supplies the routing;
the hardware profile supplies the costs (link bandwidth, compute per layer call,
bytes per expert). Prints a markdown table: hit rate, bytes moved, stall time and
modeled tokens/s per policy, beside the physical bound (ANCHORS.md: time per token
>= bytes the link must move / bandwidth, and >= compute; at best they overlap) for the
bytes the policy moved, and for every routed expert a miss.
"""

from __future__ import annotations

import argparse

from vllm_moe_offload.core.replay import (POLICIES, PROFILES, all_miss_bytes,
                                          calls_from_records, replay, trace_bound_tokens_per_s)
from vllm_moe_offload.core.trace import read_trace


def table(trace: str, pool_slots: int, policies: list[str], profiles: list[str],
          predictor: str, depth: int) -> str:
    header, records = read_trace(trace)
    calls = calls_from_records(records)
    experts = header.experts_per_layer if header else None
    if not calls:
        raise ValueError(f"{trace}: no layer calls in the trace")
    depths = [0] if predictor == "none" else [0, depth]
    layers = len({c.layer for c in calls})
    rows = [f"trace {trace}: {len(calls)} layer calls, {layers} layers, "
            f"{len({c.step for c in calls})} steps; pool {pool_slots} slots", "",
            "| profile | policy | prefetch | hit rate | of Belady's | GB moved | stall s "
            "| modeled tok/s | bound tok/s for these bytes | bound tok/s, all miss |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    best = {d: replay(calls, pool_slots, "belady", PROFILES[profiles[0]], d, experts).hit_rate
            for d in depths}  # hit rates do not depend on the profile
    for name in profiles:
        profile = PROFILES[name]
        for policy in policies:
            for d in depths:
                r = replay(calls, pool_slots, policy, profile, d, experts)
                bound = trace_bound_tokens_per_s(calls, profile, r.bytes_moved)
                worst = trace_bound_tokens_per_s(calls, profile, all_miss_bytes(calls, profile))
                rows.append(f"| {name} | {policy} | {'oracle d=' + str(d) if d else 'none'} "
                            f"| {r.hit_rate:.1%} | {r.hit_rate / max(best[d], 1e-9):.1%} | "
                            f"{r.bytes_moved / 1e9:.2f} | "
                            f"{r.stall_s:.3f} | {r.tokens_per_s:.1f} | {bound:.1f} | "
                            f"{worst:.1f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace")
    p.add_argument("--pool-slots", type=int, required=True)
    p.add_argument("--policy", default=",".join(POLICIES),
                   help=f"comma-separated, from {', '.join(POLICIES)}")
    p.add_argument("--predictor", default="oracle", choices=["none", "oracle"],
                   help="prefetch with the trace's own future (oracle) or not at all")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--profile", default="qwen3-30b-a3b-pcie5",
                   help=f"'all', or one or more (comma-separated) of {', '.join(PROFILES)}")
    args = p.parse_args(argv)
    profiles = list(PROFILES) if args.profile == "all" else args.profile.split(",")
    for name in profiles:
        if name not in PROFILES:
            p.error(f"--profile {name!r}: choose from {', '.join(PROFILES)} or all")
    print(table(args.trace, args.pool_slots, args.policy.split(","), profiles,
                args.predictor, args.depth))


if __name__ == "__main__":
    main()
