"""Does device mode's eviction (in its kernels) keep the experts that come next?

    .venv/bin/python benchmarks/device_eviction.py [--calls N]

Device mode (GPU, pinned host store) picks victims inside `resolve_kernel`. This
replays the routing traces of benchmarks/eviction.py (recorded by the plugin from
the trained tiny-moe-4domains at batch 1 and 8, and from a generated Qwen3-MoE with
random routing) through `DeviceExpertCache` itself, on demand, with each of its
policies (`clock`, `reuse`), at pool S = 25% and 50%; and the same calls through the
host policies (core/eviction.py: `lru`, `reuse`) and Belady (farthest next use, read
from the trace: the bound). On CUDA the kernels run natively; elsewhere in Triton's
interpreter, which is slow, so only the first `--calls` layer calls of each trace
are replayed (every row uses the same calls). Writes
benchmarks/results/device_eviction.{md,json,png}.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from common import write_results
from eviction import hit_rate_bars, traces

from vllm_moe_offload.core.replay import PROFILES, calls_from_records, replay
from vllm_moe_offload.core.trace import read_trace
from vllm_moe_offload.runtime.store import ExpertLayout, HostStore, TensorSpec

DEVICE_POLICIES = ("clock", "reuse")
HOST_POLICIES = ("lru", "reuse", "belady")
PROFILE = PROFILES["qwen3-30b-a3b-pcie5"]  # hit rates do not depend on it


def device_hit_rate(calls, L: int, E: int, num_slots: int, policy: str, device) -> float:
    """Replay `calls` through DeviceExpertCache (kernels) over a one-word record."""
    from vllm_moe_offload.runtime.device_cache import DeviceExpertCache

    store = HostStore(ExpertLayout((TensorSpec((1,), torch.int32),)), L, E,
                      pin_memory=device.type == "cuda")
    for layer in range(L):
        for e in range(E):
            store.put(layer, e, [torch.tensor([layer * E + e], dtype=torch.int32)])
    store.seal()
    cache = DeviceExpertCache(store, num_slots, device, eviction=policy)
    for call in calls:
        ids = torch.tensor(call.experts, dtype=torch.int64, device=device).view(-1, 1)
        slots = cache.map_to_slots(call.layer, ids)
        if call is calls[-1] or len(calls) < 50:  # the slots hold the right experts
            got = cache.buffers[0][slots.view(-1).long()].view(-1).tolist()
            assert got == [call.layer * E + e for e in call.experts], (call, got)
    t = cache.sync_stats().totals()
    return t.hits / max(1, t.hits + t.misses)


def rows_for(name: str, trace: Path, batch: int, max_calls: int | None, device) -> list[dict]:
    header, records = read_trace(str(trace))
    calls = calls_from_records(records)
    if max_calls:
        calls = calls[:max_calls]
    L, E = header.num_layers, header.experts_per_layer
    rows = []
    for share in (0.25, 0.5):
        slots = int(L * E * share)
        hits = {f"host {p}": replay(calls, slots, p, PROFILE, 0, E).hit_rate
                for p in HOST_POLICIES}
        for p in DEVICE_POLICIES:
            t0 = time.perf_counter()
            hits[f"device {p}"] = device_hit_rate(calls, L, E, slots, p, device)
            print(f"  {name} b{batch} S={share:.0%} device {p}: {hits[f'device {p}']:.1%} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        for label, hit in hits.items():
            rows.append({"model": name, "batch": batch, "pool": f"{share:.0%} ({slots} slots)",
                         "calls": len(calls), "policy": label, "hit_rate": hit,
                         "of_belady": hit / hits["host belady"]})
    return rows


def markdown(rows) -> str:
    labels = list(dict.fromkeys(r["policy"] for r in rows))
    out = ["Replay, on demand: hit rate (its share of Belady's).", "",
           "| model | batch | pool | calls | " + " | ".join(labels) + " |",
           "|---|---|---|---|" + "---|" * len(labels)]
    for key in dict.fromkeys((r["model"], r["batch"], r["pool"]) for r in rows):
        group = {r["policy"]: r for r in rows if (r["model"], r["batch"], r["pool"]) == key}
        calls = next(iter(group.values()))["calls"]
        cells = [f"{group[p]['hit_rate']:.1%} ({group[p]['of_belady']:.0%})" for p in labels]
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {calls} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    hit_rate_bars(ax, rows, list(dict.fromkeys(r["policy"] for r in rows)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=None,
                   help="replay the first N layer calls of each trace (default: all on "
                        "CUDA, 600 in Triton's interpreter)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        os.environ["TRITON_INTERPRET"] = "1"  # before device_cache imports Triton
    max_calls = args.calls or (None if device.type == "cuda" else 600)
    rows = []
    for name, trace, batch in traces():  # the same traces as benchmarks/eviction.py
        rows += rows_for(name, trace, batch, max_calls, device)
    table = f"Device: {device.type}" + (
        " (Triton's interpreter)" if device.type != "cuda" else "") + ".\n\n" + markdown(rows)
    print(table)
    command = ".venv/bin/python benchmarks/device_eviction.py" + (
        f" --calls {args.calls}" if args.calls else "")
    write_results("device_eviction", command, table, rows, plot)


if __name__ == "__main__":
    main()
