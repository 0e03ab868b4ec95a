"""What does checking every disk store read cost?

    .venv/bin/python benchmarks/store_checksum.py [--dir DIR]

Every record of the disk store carries a checksum that each read verifies
(runtime/store.py NOTE #1). For three expert sizes (the trained tiny model's,
Qwen3-30B-A3B's, Mixtral-8x7B's, bf16), it builds a store in DIR (default:
benchmarks/results/work) and times a positioned read of each record past the page
cache, then the hash of the same bytes alone (xxh3_64, which the store uses, and
crc32, its fallback without xxhash): the check adds the hash's time to each read.
(Timing the checked read against the plain one directly measures mostly this VM's
disk noise, +-50% from read to read.) Writes benchmarks/results/store_checksum.*.
"""

from __future__ import annotations

import argparse
import os
import time
import zlib
from pathlib import Path

import torch
import xxhash
from common import RESULTS, write_results

from vllm_moe_offload.runtime.store import DiskStore, ExpertLayout, TensorSpec

SIZES = {  # (H, I): one expert's w13 [2I, H] and w2 [H, I]
    "tiny-moe-4domains (216 KiB)": (192, 192),
    "Qwen3-30B-A3B (9 MiB)": (2048, 768),
    "Mixtral-8x7B (336 MiB)": (4096, 14336),
}
N = 16


def hash_gbs(fn, data: bytes) -> float:
    t0 = time.perf_counter()
    for _ in range(3):
        fn(data)
    return 3 * len(data) / (time.perf_counter() - t0) / 1e9


def measure(name: str, hidden: int, inter: int, directory: Path) -> dict:
    layout = ExpertLayout((TensorSpec((2 * inter, hidden), torch.bfloat16),
                           TensorSpec((hidden, inter), torch.bfloat16)))
    count = N if hidden < 4096 else 4
    store = DiskStore(directory / f"bench-{hidden}x{inter}.experts", layout, 1, count,
                      {"model": name})
    if not store.reused:
        for e in range(count):
            store.put(0, e, [torch.randn(s.shape).to(s.dtype) for s in layout.tensors])
        store.seal()
    dst = [torch.empty(s.shape, dtype=s.dtype) for s in layout.tensors]
    views = [memoryview(t.view(torch.uint8).reshape(-1).numpy()) for t in dst]
    plain = 0.0
    for _ in range(5):
        for e in range(count):
            os.posix_fadvise(store._fd, 0, 0, os.POSIX_FADV_DONTNEED)
            t0 = time.perf_counter()
            os.preadv(store._fd, views, store._offset(0, e))
            plain += time.perf_counter() - t0
    store.read_into(0, 0, dst)  # the checked path accepts an intact record
    data = bytes(views[0]) + bytes(views[1])
    store.close()
    read_ms = plain / (5 * count) * 1e3
    xxh3, crc32 = hash_gbs(xxhash.xxh3_64_intdigest, data), hash_gbs(zlib.crc32, data)
    return {"expert": name, "bytes": len(data), "read_ms": read_ms,
            "xxh3_ms": len(data) / xxh3 / 1e6, "crc32_ms": len(data) / crc32 / 1e6,
            "xxh3_gbs": xxh3, "crc32_gbs": crc32}


def markdown(rows) -> str:
    out = ["| expert | read ms (page cache dropped) | xxh3_64 ms | share of the read "
           "| crc32 ms | share of the read |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['expert']} | {r['read_ms']:.3f} | {r['xxh3_ms']:.3f} | "
                   f"{r['xxh3_ms'] / r['read_ms']:.1%} | {r['crc32_ms']:.3f} | "
                   f"{r['crc32_ms'] / r['read_ms']:.1%} |")
    return "\n".join(out)


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = range(len(rows))
    ax.bar([i - 0.27 for i in x], [r["read_ms"] for r in rows], 0.27, label="disk read")
    ax.bar(list(x), [r["xxh3_ms"] for r in rows], 0.27, label="xxh3_64 (used)")
    ax.bar([i + 0.27 for i in x], [r["crc32_ms"] for r in rows], 0.27, label="crc32")
    ax.set_xticks(list(x))
    ax.set_xticklabels([r["expert"] for r in rows], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms per expert")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=str(RESULTS / "work" / "checksum"))
    args = p.parse_args()
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    rows = [measure(name, h, i, directory) for name, (h, i) in SIZES.items()]
    table = markdown(rows)
    print(table)
    write_results("store_checksum", ".venv/bin/python benchmarks/store_checksum.py", table,
                  rows, plot)


if __name__ == "__main__":
    main()
