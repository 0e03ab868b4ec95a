"""What decoding a quantized expert costs, against the copy it follows.

    python3 benchmarks/dequant_kernel.py [--device cuda|cpu] [--shapes mixtral qwen3]

runtime/ only (no vLLM), so it runs on a bare GPU machine. Per expert shape and bit
width: the record's copy from the store (pinned host -> GPU on CUDA; a RAM copy on
CPU), the decode into bf16 slot tensors (the Triton kernel on CUDA, quant.py's
`_decode_cpu` on CPU) beside the torch reference decode on the same device, and the
bf16 expert's own copy for comparison; and the store's HQQ encoding of the
expert as it loads (on the GPU on CUDA, there beside the CPU's for Qwen3's
shape). Decoded values are checked against the torch reference on the CPU. On
CUDA also a miss in device mode, as the model sees it: resolve, then the fill that
reads the record in place from pinned memory (the bf16 expert copied, a quantized
one decoded on the way: decode_fill_kernel).
Writes benchmarks/results/dequant_kernel_<device>.*
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

# the repository too: a bare GPU machine runs it with no install
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import write_results  # noqa: E402

from vllm_moe_offload.runtime.quant import Gather, GroupQuant, QuantizedStore
from vllm_moe_offload.runtime.store import ExpertLayout, HostStore, TensorSpec

SHAPES = {"mixtral": (4096, 14336), "qwen3": (2048, 768), "tiny": (192, 192)}  # H, I


def timed(fn, device, repeat=20) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeat / 1e3
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def device_mode_runs(device: str) -> bool:
    """On CUDA, and in Triton's interpreter on the CPU (slowly: its times mean nothing,
    its check does)."""
    return device == "cuda" or bool(os.environ.get("TRITON_INTERPRET"))


def device_miss(expert, codec, stored, want, device) -> tuple[float, bool]:
    """Seconds per miss in device mode, and whether the slot holds `want`: two layers
    of one expert (its record `stored`) and a pool of one slot, so every call evicts
    and fills."""
    from vllm_moe_offload.runtime.device_cache import DeviceExpertCache  # Triton

    layout = ExpertLayout(tuple(TensorSpec(tuple(t.shape), t.dtype) for t in expert))
    host = HostStore(codec.layout(layout) if codec else layout, 2, 1,
                     pin_memory=device == "cuda")
    for layer in range(2):
        host.put(layer, 0, stored)  # the record as it is, not encoded again
    host.seal()
    store = QuantizedStore(host, codec, layout) if codec else host
    cache = DeviceExpertCache(store, 1, device)
    ids = torch.zeros(1, 1, dtype=torch.int32, device=device)
    calls = [0]

    def call():
        cache.map_to_slots(calls[0] % 2, ids)
        calls[0] += 1

    seconds = timed(call, device)
    t = cache.sync_stats().totals()
    assert t.misses == calls[0], (t.misses, calls[0])
    same = all(torch.equal(b[0].cpu(), w) for b, w in zip(cache.buffers, want))
    return seconds, same


def row(shape: str, bits: int, device: str) -> dict:
    H, I = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    expert = [(torch.randn(2 * I, H, generator=g) * 0.02).bfloat16(),
              (torch.randn(H, I, generator=g) * 0.02).bfloat16()]
    pin = device == "cuda"
    dst = [torch.empty_like(t, device=device) for t in expert]
    full_src = [t.pin_memory() if pin else t.clone() for t in expert]
    out = {"shape": shape, "bits": bits, "expert_mib": sum(t.nbytes for t in expert) / 2**20}

    def copy(src, to):
        for d, s in zip(to, src):
            d.copy_(s, non_blocking=True)

    out["bf16_copy_ms"] = 1e3 * timed(lambda: copy(full_src, dst), device)
    if bits == 16:
        if device_mode_runs(device):
            seconds, out["bit_identical"] = device_miss(expert, None, expert, expert, device)
            out["device_miss_ms"] = 1e3 * seconds
        return out
    # the store's HQQ encoder, once per expert as it loads: where the pool is (the
    # GPU on CUDA), and for shapes the CPU does in seconds, on the CPU beside it
    out["hqq_encode_ms"] = 1e3 * timed(
        lambda: GroupQuant(bits, 64).encode(expert, device), device, repeat=1)
    if device == "cuda" and shape != "mixtral":
        out["hqq_encode_cpu_ms"] = 1e3 * timed(
            lambda: GroupQuant(bits, 64).encode(expert), "cpu", repeat=1)
    codec = GroupQuant(bits, 64, "rtn")
    stored = codec.encode(expert)
    host = [s.pin_memory() if pin else s.clone() for s in stored]
    on_dev = [torch.empty_like(s, device=device) for s in stored]
    out["record_mib"] = sum(s.nbytes for s in stored) / 2**20
    out["record_copy_ms"] = 1e3 * timed(lambda: copy(host, on_dev), device)
    # the decode beside the torch reference's on the same tensors, taken in turns
    # (this VM's timings drift): median of 5 rounds of 4 each
    rounds = [(timed(lambda: codec.decode(on_dev, dst), device, repeat=4),
               timed(lambda: codec.decode(on_dev, dst, reference=True), device, repeat=4))
              for _ in range(5)]
    out["decode_ms"] = 1e3 * sorted(a for a, _ in rounds)[2]
    out["reference_decode_ms"] = 1e3 * sorted(b for _, b in rounds)[2]
    want = [torch.empty_like(t) for t in expert]
    codec.decode(stored, want, reference=True)  # the torch reference, on the CPU
    codec.decode(on_dev, dst)
    out["bit_identical"] = all(torch.equal(a.cpu(), b) for a, b in zip(dst, want))
    if device_mode_runs(device):
        seconds, same = device_miss(expert, codec, stored, want, device)
        out["device_miss_ms"] = 1e3 * seconds
        out["bit_identical"] = out["bit_identical"] and same
    if device == "cpu":  # host mode on a CPU: the decoded expert into vLLM's prepack
        out.update(prepack_ms(want))
    out["decode_over_copy"] = out["decode_ms"] / out["record_copy_ms"]
    out["miss_ms_vs_bf16"] = (out["record_copy_ms"] + out["decode_ms"]) / out["bf16_copy_ms"]
    return out


def prepack_ms(expert) -> dict:
    """A decoded expert into the layout of vLLM's CPU MoE kernel (its `vec` prepack:
    rows in blocks of 16, each block column by column), as host mode's Gather does
    it: by block copies, and by the gather through an index it takes otherwise."""
    index = [torch.arange(t.numel()).view(t.shape[0] // 16, 16, t.shape[1])
             .transpose(1, 2).reshape(t.shape) for t in expert]
    blocked, generic = Gather(index), Gather(index)
    generic.blocks = [None] * len(index)
    dst, ref = [torch.empty_like(t) for t in expert], [torch.empty_like(t) for t in expert]
    rounds = [(timed(lambda: blocked.into(expert, dst), "cpu", repeat=4),
               timed(lambda: generic.into(expert, ref), "cpu", repeat=4)) for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(dst, ref))
    return {"prepack_ms": 1e3 * sorted(a for a, _ in rounds)[2],
            "prepack_by_index_ms": 1e3 * sorted(b for _, b in rounds)[2]}


def markdown(rows) -> str:
    lines = ["| shape | bits | MiB moved | copy ms | decode ms | torch reference decode ms | "
             "decode / copy | miss (copy + decode) / bf16 copy | device-mode miss ms | "
             "bit-identical | HQQ encode ms (CPU ms) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dev = f"{r['device_miss_ms']:.3f}" if "device_miss_ms" in r else "-"
        if r["bits"] == 16:
            lines.append(f"| {r['shape']} | 16 | {r['expert_mib']:.2f} | "
                         f"{r['bf16_copy_ms']:.3f} | - | - | - | 1.00 | {dev} | "
                         f"{r.get('bit_identical', '-')} | - |")
        else:
            cpu = f" ({r['hqq_encode_cpu_ms']:.0f})" if "hqq_encode_cpu_ms" in r else ""
            lines.append(f"| {r['shape']} | {r['bits']} | {r['record_mib']:.2f} | "
                         f"{r['record_copy_ms']:.3f} | {r['decode_ms']:.3f} | "
                         f"{r['reference_decode_ms']:.3f} | "
                         f"{r['decode_over_copy']:.2f} | {r['miss_ms_vs_bf16']:.2f} | "
                         f"{dev} | {r['bit_identical']} | {r['hqq_encode_ms']:.1f}{cpu} |")
    packs = [r for r in rows if "prepack_ms" in r]
    if packs:
        lines += ["", "Into the CPU kernel's layout (vLLM's prepack), in turns, median of 5 "
                  "rounds:", "", "| shape | bits | block copies ms | gather by index ms |",
                  "|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['bits']} | {r['prepack_ms']:.3f} | "
                  f"{r['prepack_by_index_ms']:.3f} |" for r in packs]
    return "\n".join(lines)


def plot(rows, path) -> None:
    try:
        import matplotlib
    except ImportError:  # a bare GPU machine: the table and JSON are written already
        print("no matplotlib here: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for shape in dict.fromkeys(r["shape"] for r in rows):
        rs = [r for r in rows if r["shape"] == shape]
        ax.plot([str(r["bits"]) for r in rs],
                [r.get("record_copy_ms", r["bf16_copy_ms"]) + r.get("decode_ms", 0)
                 for r in rs], "o-", label=f"{shape}: copy + decode")
    ax.set_xlabel("store bits")
    ax.set_ylabel("ms per miss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", nargs="+", default=None)
    ap.add_argument("--bits", type=int, nargs="+", default=[16, 8, 4, 3, 2])
    args = ap.parse_args(argv)
    shapes = args.shapes or (["mixtral", "qwen3"] if args.device == "cuda" else ["qwen3", "tiny"])
    rows = []
    for s in shapes:  # each row shown as it is measured (a time limit keeps them)
        for b in args.bits:
            rows.append(row(s, b, args.device))
            print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows)
    print(table)
    assert all(r.get("bit_identical", True) for r in rows), "decode differs from the reference"
    command = " ".join(["python3 benchmarks/dequant_kernel.py", *(argv or sys.argv[1:])])
    write_results(f"dequant_kernel_{args.device}", command, table, rows, plot)


if __name__ == "__main__":
    main()
