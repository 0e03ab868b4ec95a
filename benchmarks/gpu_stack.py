"""What does expert offload cost on the GPU hot path, against plain and the link?

    python3 benchmarks/gpu_stack.py                      # CUDA: Mixtral- and Qwen3-shaped
    python3 benchmarks/gpu_stack.py --device cpu --steps 2   # small shapes, no GPU

Runtime only (no vLLM): a stack of L MoE layers, each the same expert kernel
(`moe_kernel.py`) over plain [E, ...] weights or over the offload pool's [S, ...]
slot buffers, so a ratio measures offload and nothing else. Rows:
- plain eager / plain CUDA graph: every expert in GPU memory (the baseline);
- resident: device-mode offload with every expert in the pool, graphed; at batch 1
  also its variants: CLOCK eviction instead of `reuse` (no use counts per call),
  the general resolve path, a 16-program fill, and (Hopper and newer) the fill as
  a programmatic dependent launch of resolve (PDL);
- S50 on-demand / prefetch (next-gate, depth 2) / oracle: half the experts in
  the pool, graphed, with uniform routing and with a skewed, temporally local mix;
- S50 2 slot groups, on-demand / prefetch: the same pool split in two groups of
  4 layers (as vLLM's CUDA kernels need above 992 slots), uniform routing;
- host mode: the per-layer host-sync path (eager) at S = 50%;
- stream: vLLM `--cpu-offload-gb` style, every offloaded expert copied each step;
- disk: host mode from the disk store (batch 1), against the disk's own O_DIRECT
  sequential read in the same run;
- S50 b-bit store (`--store-bits`, batch 1): the store keeps experts
  group-quantized (round to nearest, groups of 64: HQQ's solver would take minutes
  per Mixtral expert here) and each miss is decoded into its slot: on CUDA in
  device mode (the fill kernel decodes, graphed) and in host mode (Triton decode on
  the copy stream, eager); on the CPU in host mode (torch).
  Its outputs are compared with plain's over the decoded weights. With
  `--store-hot-bits H`, also mixed precision: every fourth expert of each layer at
  H bits in a store of its own (device mode fills from both).
Achieved link GB/s = bytes moved / (row time - plain graph time); the bound is
the bytes the layers used (misses and prefetch hits: a wasted prefetch is cost, not
bound) / raw pinned copy rate (same run) + plain graph time. Outputs of every row
are compared bit for bit with plain's on the same inputs, at the first, middle and
last step. `--repeats N` times each row N times (the median; min-max beside it).
A row that raises is reported as FAILED and the next one runs; the table and JSON
are written after every shape and batch, so a run cut short keeps what it measured.
The PDL rows run after every other row of the run (`--no-pdl`: none).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from moe_kernel import moe  # noqa: E402

from vllm_moe_offload.core.slot_pool import split_pool  # noqa: E402
from vllm_moe_offload.runtime.expert_cache import ExpertCache  # noqa: E402
from vllm_moe_offload.runtime.modes import make_expert_cache  # noqa: E402
from vllm_moe_offload.runtime.predictors import Predictor  # noqa: E402
from vllm_moe_offload.runtime.quant import GroupQuant, MixedStore, QuantizedStore  # noqa: E402
from vllm_moe_offload.runtime.store import (DiskStore, ExpertLayout, HostStore,  # noqa: E402
                                            TensorSpec)
from vllm_moe_offload.runtime.store_dir import file_system_of  # noqa: E402

SHAPES = {  # L layers (of the real model's 32 / 48 / 26), E experts, K top-k, H, I
    "mixtral": dict(L=8, E=8, K=2, H=4096, I=14336),
    "qwen3": dict(L=8, E=128, K=8, H=2048, I=768),
    "deepseek-v2-lite": dict(L=8, E=64, K=6, H=2048, I=1408),
    "tiny": dict(L=4, E=8, K=2, H=64, I=128),
}
RESULTS = Path(__file__).resolve().parent / "results"


# ---- inputs ------------------------------------------------------------------------

class Routing:
    """Hidden states, ids and weights of every step, precomputed on the device.

    uniform: independent random hidden states, no bias: every expert equally likely,
      nothing predictable. local: a skewed mix (Zipf-like bias per layer) with
      hidden states correlated across layers (0.95) and steps (0.9), so next-gate
      prediction and reuse both have something to find."""

    def __init__(self, shape, T, steps, mode, device, seed=0):
        L, E, K, H = shape["L"], shape["E"], shape["K"], shape["H"]
        g = torch.Generator(device=device).manual_seed(seed)
        rnd = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
        self.gates = rnd(L, E, H) / math.sqrt(H)
        self.bias = torch.zeros(L, E, device=device)
        h = torch.empty(steps, L, T, H, device=device)
        if mode == "uniform":
            h.copy_(rnd(steps, L, T, H))
        else:
            ranks = torch.stack([torch.randperm(E, generator=g, device=device)
                                 for _ in range(L)]).float()
            self.bias = -1.5 * torch.log1p(ranks)
            prev = rnd(T, H)
            for s in range(steps):
                cur = 0.9 * prev + math.sqrt(1 - 0.81) * rnd(T, H)
                prev = cur
                for layer in range(L):
                    h[s, layer] = cur
                    cur = 0.95 * cur + math.sqrt(1 - 0.9025) * rnd(T, H)
        logits = torch.einsum("slth,leh->slte", h, self.gates) + self.bias[None, :, None]
        top, ids = logits.topk(K, dim=-1)
        self.hidden = h.to(torch.bfloat16)  # [steps, L, T, H]
        self.ids = ids.to(torch.int32)  # [steps, L, T, K]
        self.weights = torch.softmax(top, dim=-1)  # [steps, L, T, K]
        self.steps = steps


class GatePredictor(Predictor):
    """next-gate with the routing's bias: layer L+d's router on layer L's input."""
    name = "next-gate"

    def __init__(self, routing: Routing, depth: int, top_k: int):
        super().__init__(depth, top_k, routing.gates.shape[0])
        self._stacked = {}  # layer -> its targets' gates [D', E, H] and bias [D', 1, E]
        for layer in range(self.num_layers):
            t = list(self.targets(layer))
            if t:
                self._stacked[layer] = (routing.gates[t], routing.bias[t].unsqueeze(1))

    def all_logits(self, layer, hidden):
        gates, bias = self._stacked[layer]
        return torch.einsum("th,deh->dte", hidden.float(), gates) + bias


class OracleBufferPredictor(Predictor):
    """Reads the true ids of later layers from the step's input buffer."""
    name = "oracle"

    def __init__(self, ids_buf: torch.Tensor, depth: int, top_k: int):
        super().__init__(depth, top_k, ids_buf.shape[0])
        self.ids_buf = ids_buf

    def predict_ids(self, layer, hidden):
        return [(t, self.ids_buf[t]) for t in self.targets(layer)]

    def predict(self, layer, hidden):  # host mode
        return [(t, sorted(set(self.ids_buf[t].reshape(-1).tolist())))
                for t in self.targets(layer)]


class Stack:
    """Weights, stores and the static input buffers one step reads."""

    def __init__(self, shape, T, device, disk_dir=None):
        L, E, K, H, I = (shape[k] for k in "LEKHI")
        self.shape, self.T, self.device = shape, T, device
        self.layout = ExpertLayout((TensorSpec((2 * I, H), torch.bfloat16),
                                    TensorSpec((H, I), torch.bfloat16)))
        cuda = device.type == "cuda"
        self.store = HostStore(self.layout, L, E, pin_memory=cuda)
        g = torch.Generator(device=device).manual_seed(1)
        self.w13, self.w2 = [], []
        for layer in range(L):
            w13 = (0.02 * torch.randn(E, 2 * I, H, generator=g, device=device)).bfloat16()
            w2 = (0.02 * torch.randn(E, H, I, generator=g, device=device)).bfloat16()
            for e in range(E):
                self.store.put(layer, e, [w13[e], w2[e]])
            self.w13.append(w13)
            self.w2.append(w2)
        self.store.seal()
        self.disk = None
        if disk_dir is not None:
            self.disk = DiskStore(Path(disk_dir) / f"gpu_stack-{L}x{E}x{H}x{I}.experts",
                                  self.layout, L, E, {"bench": "gpu_stack"})
            if not self.disk.reused:
                for layer in range(L):
                    for e in range(E):
                        self.disk.put(layer, e, self.store.views(layer, e))
                self.disk.seal()
        self.x = torch.zeros(L, T, H, dtype=torch.bfloat16, device=device)
        self.ids = torch.zeros(L, T, K, dtype=torch.int32, device=device)
        self.wts = torch.zeros(L, T, K, device=device)
        self.out = torch.zeros(L, T, H, dtype=torch.bfloat16, device=device)

    def load(self, routing: Routing, step: int) -> None:
        s = step % routing.steps
        self.x.copy_(routing.hidden[s])
        self.ids.copy_(routing.ids[s])
        self.wts.copy_(routing.weights[s])

    # ---- one step of each kind ----------------------------------------------------

    def plain_step(self, weights=None) -> None:
        w13s, w2s = weights or (self.w13, self.w2)
        for layer in range(self.shape["L"]):
            self.out[layer] = moe(self.x[layer], w13s[layer], w2s[layer],
                                  self.ids[layer], self.wts[layer])

    def offload_step(self, cache) -> None:
        for layer in range(self.shape["L"]):
            slots = cache.map_to_slots(layer, self.ids[layer], self.x[layer])
            self.out[layer] = moe(self.x[layer], *cache.layer_buffers(layer)[:2], slots,
                                  self.wts[layer])

    def stream_step(self) -> None:
        """Every offloaded expert (the upper half of each layer) crosses the link."""
        E = self.shape["E"]
        for layer in range(self.shape["L"]):
            for e in range(E // 2, E):
                w13, w2 = self.store.views(layer, e)
                self.w13[layer][e].copy_(w13, non_blocking=True)
                self.w2[layer][e].copy_(w2, non_blocking=True)
            self.out[layer] = moe(self.x[layer], self.w13[layer], self.w2[layer],
                                  self.ids[layer], self.wts[layer])


# ---- timing ------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def capture(step, device):
    """A CUDA graph of `step` (warmed up on a side stream first, as torch asks)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def time_row(stack, routing, run, warmup, steps, cache=None, repeats=1):
    """([ms per step of each repeat], (misses, bytes moved, bytes the layers needed)
    per step) over `steps` timed steps, after `warmup` untimed ones (inputs are loaded
    in the timed loop for every row). Needed bytes leave out wasted prefetches."""
    for s in range(warmup):
        stack.load(routing, s)
        run()
    sync(stack.device)
    times = []
    before = _moved(cache)
    for _ in range(repeats):
        t0 = time.perf_counter()
        for s in range(warmup, warmup + steps):
            stack.load(routing, s)
            run()
        sync(stack.device)
        times.append((time.perf_counter() - t0) / steps * 1e3)
    after = _moved(cache)
    return times, [(a - b) / steps / repeats for a, b in zip(after, before)]


def paired_ratio(stack, routing, plain, offload, graph, args, rounds=7, passes=8):
    """(median, min, max) over `rounds` of offload's ms per step over plain's, the two
    timed one after the other in each round (each `passes` x the row's steps): the
    rows alone are measured minutes apart, and a batch-1 step is well under a ms."""
    a, b = (capture(run, stack.device) if graph else run for run in (plain, offload))
    ratios = []
    for _ in range(rounds):
        ta = statistics.mean(time_row(stack, routing, a, 0, args.steps, repeats=passes)[0])
        tb = statistics.mean(time_row(stack, routing, b, 0, args.steps, repeats=passes)[0])
        ratios.append(tb / ta)
    return statistics.median(ratios), min(ratios), max(ratios)


def output_of(stack, routing, run, step=0):
    stack.load(routing, step)
    run()
    sync(stack.device)
    return stack.out.clone()


def link_gbs(device, nbytes=256 << 20, reps=10) -> float:
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src, non_blocking=True)
    sync(device)
    return nbytes * reps / (time.perf_counter() - t0) / 1e9


def disk_gbs(store: DiskStore, limit=4 << 30) -> float:
    """The disk's own sequential read rate of the store file (O_DIRECT where allowed)."""
    chunk = 16 << 20
    buf = torch.empty(chunk, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    view = memoryview(buf.numpy())
    flags = os.O_RDONLY
    if buf.data_ptr() % 4096 == 0:  # O_DIRECT needs an aligned buffer
        flags |= getattr(os, "O_DIRECT", 0)
    try:
        fd = os.open(store.path, flags)
    except OSError:  # a file system without O_DIRECT: buffered, cache dropped
        fd = os.open(store.path, os.O_RDONLY)
    size = min(os.fstat(fd).st_size // 4096 * 4096, limit)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    t0 = time.perf_counter()
    for off in range(0, size, chunk):
        os.preadv(fd, [view[:min(chunk, size - off)]], off)
    seconds = time.perf_counter() - t0
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    return size / seconds / 1e9


# ---- rows --------------------------------------------------------------------------

def run_shape(name, shape, T, args, device, disk_dir, rows, failed, pdl_only=False,
              written=lambda: None):
    """Every row of one shape and batch, appended to `rows` as each is measured, then
    `written()` (main writes the files: a run cut short keeps every row done);
    `pdl_only`: the resident (PDL) row alone (main runs it after everything else)."""
    L, E, K = shape["L"], shape["E"], shape["K"]
    cuda = device.type == "cuda"
    with_disk = T == 1 and name in args.disk_shapes and not pdl_only
    stack = Stack(shape, T, device, disk_dir if with_disk else None)
    uniform = Routing(shape, T, args.warmup + args.steps, "uniform", device)
    local = Routing(shape, T, args.warmup + args.steps, "local", device, seed=1)
    half = L * E // 2
    sm_link = SM_LINK
    ref = {}  # routing name -> plain output of step 0

    steps_total = args.warmup + args.steps
    checked = sorted({0, steps_total // 2, steps_total - 1})  # steps compared with plain

    def row(label, routing_name, routing, run, graph, cache=None, extra=None, steps=None):
        """Time one row and check its outputs; a row that raises is reported as
        failed and the next one runs (a CUDA error that sticks fails the rest too,
        but the rows before it are written already: main)."""
        try:
            return timed_row(label, routing_name, routing, run, graph, cache, extra, steps)
        except Exception as e:
            print(f"  {name} T={T} {label}: FAILED: {e!r}", flush=True)
            failed.append(dict(shape=name, batch=T, row=label, error=repr(e)))
            return {}
        finally:
            written()

    def timed_row(label, routing_name, routing, run, graph, cache, extra, steps):
        step_run = capture(run, device) if graph else run
        times, (misses, nbytes, used) = time_row(
            stack, routing, step_run, args.warmup, steps or args.steps, cache, args.repeats)
        ms = statistics.median(times)
        if routing_name not in ref:
            ref[routing_name] = [output_of(stack, routing, plain_eager, s) for s in checked]
        same = all(torch.equal(output_of(stack, routing, step_run, s), want)
                   for s, want in zip(checked, ref[routing_name]))
        if cache is not None and cuda:
            same = same and pool_holds_store(cache)
        r = dict(shape=name, batch=T, row=label, routing=routing_name, ms=ms,
                 ms_min=min(times), ms_max=max(times), repeats=len(times),
                 misses_per_step=misses, mib_per_step=nbytes / 2**20,
                 mib_used_per_step=used / 2**20, identical=same,
                 mode=getattr(cache, "mode", "-"), graph=graph)
        r.update(extra or {})
        rows.append(r)
        print(f"  {name} T={T} {label:22s} {routing_name:7s} {ms:9.3f} ms  "
              f"{misses:7.1f} miss  {nbytes / 2**20:9.1f} MiB  identical={same}", flush=True)
        return r

    plain_eager = stack.plain_step
    if pdl_only:  # never run on a GPU yet: a CUDA error that sticks fails what follows
        cache, _ = make_expert_cache(stack.store, L * E, device)
        warm_all(stack, cache)
        cache.pdl = True  # the fill launched while resolve runs
        row("resident (PDL)", "uniform", uniform, lambda c=cache: stack.offload_step(c),
            True, cache)
        return
    row("plain eager", "uniform", uniform, plain_eager, False)
    if cuda:
        row("plain graph", "uniform", uniform, plain_eager, True)
    # local routing reads fewer distinct experts: its rows need their own baseline
    row("plain graph" if cuda else "plain eager", "local", local, plain_eager, cuda)
    cache, _ = make_expert_cache(stack.store, L * E, device)
    warm_all(stack, cache)
    r = row("resident", "uniform", uniform, lambda c=cache: stack.offload_step(c), cuda,
            cache)
    if r:  # the target's ratio, its two rows timed in turn (they were minutes apart)
        try:
            r["x_plain_paired"] = paired_ratio(stack, uniform, plain_eager,
                                               lambda c=cache: stack.offload_step(c), cuda,
                                               args)
            print(f"  {name} T={T} resident / plain, timed in turn: "
                  f"{r['x_plain_paired'][0]:.3f} (min-max {r['x_plain_paired'][1]:.3f}-"
                  f"{r['x_plain_paired'][2]:.3f})", flush=True)
        except Exception as e:  # the rows after it still run
            print(f"  {name} T={T} resident / plain in turn: FAILED: {e!r}", flush=True)
            failed.append(dict(shape=name, batch=T, row="resident / plain in turn",
                               error=repr(e)))
        written()
    if cuda and T == 1:  # decode calls through the general path instead of registers
        cache.small_path = False
        row("resident (general path)", "uniform", uniform,
            lambda c=cache: stack.offload_step(c), True, cache)
        cache.small_path, cache.eviction = True, "clock"  # no use counts per call
        row("resident (CLOCK eviction)", "uniform", uniform,
            lambda c=cache: stack.offload_step(c), True, cache)
        cache.eviction = "reuse"
        parts = cache.demand_parts
        cache.demand_parts = 16
        row("resident (fill 16 programs)", "uniform", uniform,
            lambda c=cache: stack.offload_step(c), True, cache)
        cache.demand_parts = parts
        sm_link[name] = fill_gbs(stack)
    del cache
    for rname, routing in (("uniform", uniform), ("local", local)):
        for label, predictor in (("S50 on-demand", None),
                                 ("S50 prefetch", GatePredictor(routing, 2, K)),
                                 ("S50 oracle", OracleBufferPredictor(stack.ids, 2, K))):
            cache, _ = make_expert_cache(stack.store, half, device, predictor=predictor)
            row(label, rname, routing, lambda c=cache: stack.offload_step(c), cuda, cache)
            del cache
            _free(device)
    # the pool in 2 slot groups of 4 layers (as vLLM's CUDA kernels need above 992
    # slots): each layer's kernel over its group's slots, prefetch across the groups
    groups = split_pool(half, L, E, half // 2)
    for label, predictor in (("S50 2 slot groups, on-demand", None),
                             ("S50 2 slot groups, prefetch", GatePredictor(uniform, 2, K))):
        cache, _ = make_expert_cache(stack.store, half, device, predictor=predictor,
                                     groups=groups)
        row(label, "uniform", uniform, lambda c=cache: stack.offload_step(c), cuda, cache)
        del cache
        _free(device)
    if cuda:  # the eviction rule of device mode, so only the host sync differs
        host = ExpertCache(stack.store, half, device, eviction="reuse")
        row("S50 host mode", "uniform", uniform, lambda: stack.offload_step(host), False, host)
        del host
    streamed = L * (E - E // 2) * stack.layout.expert_bytes / 2**20  # MiB, all of it used
    row("stream (cpu-offload)", "uniform", uniform, stack.stream_step, cuda,
        extra=dict(mib_per_step=streamed, mib_used_per_step=streamed))
    if stack.disk is not None:
        disk_rate = disk_gbs(stack.disk)
        cache = ExpertCache(stack.disk, half, device, eviction="reuse")
        r = row("S50 disk (host mode)", "uniform", uniform,
                lambda c=cache: stack.offload_step(c), False, cache, steps=args.disk_steps)
        t = cache.stats.totals()
        if r:
            r["disk_seq_gbs"] = disk_rate
            r["disk_to_slot_gbs"] = (t.bytes_loaded / t.load_seconds / 1e9
                                     if t.load_seconds else 0)
            r["direct_io"] = stack.disk.uses_direct_io
            r["checksum"] = stack.disk.checksum
            r["file_system"] = file_system_of(stack.disk.path)
            print(f"  disk: sequential {disk_rate:.2f} GB/s, into slots "
                  f"{r['disk_to_slot_gbs']:.2f} GB/s (O_DIRECT: {r['direct_io']}, "
                  f"checksum {r['checksum']}, {r['file_system']})")
        stack.disk.close()
        os.unlink(stack.disk.path)
    stores = [(bits, hot) for hot in [None, args.store_hot_bits] if hot != 0
              for bits in args.store_bits] if T == 1 else []
    for bits, hot in stores:
        qstore, decoded = quantized_store(stack, bits, hot)
        label = f"{bits}-bit store" + (f", every 4th expert {hot}-bit" if hot else "")
        ref[f"uniform, decoded {label}"] = [
            output_of(stack, uniform, lambda d=decoded: stack.plain_step(d), step)
            for step in checked]
        # on CUDA device mode first (the fill decodes each miss, graphed), then host mode
        for make in ([lambda q=qstore: make_expert_cache(q, half, device)[0]] if cuda
                     else []) + [lambda q=qstore: ExpertCache(q, half, device,
                                                              eviction="reuse")]:
            cache = make()
            r = row(f"S50 {label} ({cache.mode} mode)", f"uniform, decoded {label}",
                    uniform, lambda c=cache: stack.offload_step(c), cache.mode == "device",
                    cache)
            if r:
                r["routing"] = "uniform"  # its baseline: plain's time on the same routing
            del cache
            _free(device)
        del qstore, decoded
        _free(device)
    _free(device)


def quantized_store(stack, bits, hot_bits=None):
    """The stack's experts in a pinned quantized host store (with `hot_bits`, every
    fourth expert of each layer at those bits in a store of its own: mixed
    precision), and every expert decoded (what a slot holds after a miss) for the
    plain reference."""
    L, E = stack.shape["L"], stack.shape["E"]
    pinned = stack.device.type == "cuda"

    def store_of(codec, keys=None):
        return QuantizedStore(HostStore(codec.layout(stack.layout), L, E, pin_memory=pinned,
                                        keys=keys), codec, stack.layout,
                              encode_device=stack.device)

    if hot_bits is None:
        qstore = store_of(GroupQuant(bits, 64, "rtn"))
    else:
        hot = [(layer, e) for layer in range(L) for e in range(0, E, 4)]
        cold = [(layer, e) for layer in range(L) for e in range(E) if e % 4]
        qstore = MixedStore(store_of(GroupQuant(hot_bits, 64, "rtn"), hot),
                            store_of(GroupQuant(bits, 64, "rtn"), cold))
    decoded = ([], [])
    for layer in range(L):
        w13, w2 = torch.empty_like(stack.w13[layer]), torch.empty_like(stack.w2[layer])
        for e in range(E):
            qstore.put(layer, e, [stack.w13[layer][e], stack.w2[layer][e]])
            qstore.read_into(layer, e, [w13[e], w2[e]])
        decoded[0].append(w13)
        decoded[1].append(w2)
    qstore.seal()
    sync(stack.device)
    return qstore, decoded


SM_LINK: dict[str, float] = {}  # shape -> GB/s of the fill kernel alone


def fill_gbs(stack) -> float:
    """The fill kernel's own link rate: a pool of one layer, every call misses all E
    experts of another layer (distinct bytes each call, nothing else running)."""
    L, E = stack.shape["L"], stack.shape["E"]
    cache, _ = make_expert_cache(stack.store, E, stack.device)
    every = torch.arange(E, dtype=torch.int32, device=stack.device).view(-1, 1)
    for layer in range(L):  # compile every variant first (Triton specializes layer == 1)
        cache.map_to_slots(layer, every)
    sync(stack.device)
    t0 = time.perf_counter()
    for layer in range(1, L):
        cache.map_to_slots(layer, every)
    sync(stack.device)
    seconds = time.perf_counter() - t0
    return (L - 1) * E * stack.layout.expert_bytes / seconds / 1e9


def pool_holds_store(cache) -> bool:
    """Every slot that the device table names holds its expert's bytes exactly."""
    if not isinstance(cache.store, HostStore):
        return True  # the disk and quantized rows are checked by their outputs alone
    E = cache.experts_per_layer
    owner = cache.owner.tolist() if hasattr(cache, "owner") else [
        -1] * cache.num_slots
    if not hasattr(cache, "owner"):  # host mode: its host table
        for key, slot in enumerate(cache._table.view(-1).tolist()):
            if slot >= 0:
                owner[slot] = key
    for slot, key in enumerate(owner):
        if key >= 0:
            want = cache.store.views(key // E, key % E)
            for buf, w in zip(cache.buffers, want):
                if not torch.equal(buf[slot], w.to(buf.device, non_blocking=True)):
                    print(f"  SLOT {slot} DOES NOT HOLD EXPERT {key}")
                    return False
    return True


def warm_all(stack, cache):
    """Load every expert once (all-resident rows)."""
    E = stack.shape["E"]
    every = torch.arange(E, dtype=torch.int32, device=stack.device).view(-1, 1)
    for layer in range(stack.shape["L"]):
        cache.map_to_slots(layer, every)
    sync(stack.device)


def _moved(cache) -> tuple[float, float, float]:
    """(misses, bytes loaded, bytes the layers used: misses and prefetch hits)."""
    if cache is None:
        return 0.0, 0.0, 0.0
    t = cache.sync_stats().totals()
    loads = t.misses + t.prefetched
    used = t.bytes_loaded * (t.misses + t.prefetch_hits) / loads if loads else 0.0
    return float(t.misses), float(t.bytes_loaded), float(used)


def _free(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- report ------------------------------------------------------------------------

def finish(rows, link, device, failed=()):
    link_note = ", ".join(f"{k} {v:.1f} GB/s" for k, v in SM_LINK.items())
    base = {(r["shape"], r["batch"], r["routing"]): r["ms"] for r in rows
            if r["row"] == ("plain graph" if device.type == "cuda" else "plain eager")}
    for r in rows:
        compute = base.get((r["shape"], r["batch"], r["routing"]), float("nan"))
        nbytes = r["mib_per_step"] * 2**20
        needed = r["mib_used_per_step"] * 2**20
        r["x_plain"] = r["ms"] / compute
        # the bound moves only the bytes the layers used: a wasted prefetch is cost
        r["bound_ms"] = compute + (needed / link / 1e6 if link == link else 0.0)
        r["x_bound"] = r["ms"] / r["bound_ms"]
        extra = r["ms"] - compute
        r["link_gbs"] = nbytes / extra / 1e6 if nbytes and extra > 0 else None
    lines = [f"Raw pinned host -> GPU copy (copy engine): {link:.1f} GB/s; the fill kernel "
             f"alone (SM loads over the link): {link_note or '-'} (same run)", "",
             "| shape | batch | row | routing | ms/step (min-max) | x plain (same routing) | "
             "misses/step | MiB/step | of it wasted | link GB/s | bound ms | x bound | "
             "identical |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gbs = f"{r['link_gbs']:.1f}" if r["link_gbs"] else "-"
        spread = (f" ({r['ms_min']:.3f}-{r['ms_max']:.3f})"
                  if r.get("repeats", 1) > 1 else "")
        wasted = r["mib_per_step"] - r["mib_used_per_step"]
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['row']} | {r['routing']} | {r['ms']:.3f}"
            f"{spread} | {r['x_plain']:.3f} | {r['misses_per_step']:.1f} | "
            f"{r['mib_per_step']:.1f} | {wasted:.1f} | {gbs} | {r['bound_ms']:.3f} | "
            f"{r['x_bound']:.3f} | {r['identical']} |")
    for r in rows:
        if "x_plain_paired" in r:
            med, lo, hi = r["x_plain_paired"]
            lines.append(f"\nResident / plain ({r['shape']}, batch {r['batch']}), timed in "
                         f"turn: {med:.3f} (min-max {lo:.3f}-{hi:.3f})")
    for r in rows:
        if "disk_seq_gbs" in r:
            lines.append(f"\nDisk ({r['shape']}): sequential read {r['disk_seq_gbs']:.2f} GB/s, "
                         f"disk -> slot {r['disk_to_slot_gbs']:.2f} GB/s "
                         f"({r['disk_to_slot_gbs'] / r['disk_seq_gbs']:.0%}), "
                         f"O_DIRECT {r['direct_io']}, checksum {r['checksum']}, "
                         f"file system {r['file_system']}")
    for f in failed:
        lines.append(f"\nFAILED: {f['shape']} batch {f['batch']} {f['row']}: {f['error']}")
    return "\n".join(lines)


def plot(rows, path):
    try:
        import matplotlib
    except ImportError:  # a bare GPU machine: the table and JSON are written already
        print("no matplotlib here: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["shape"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 2.6 * len(groups)), squeeze=False)
    for ax, (shape, batch) in zip(axes[:, 0], groups):
        sel = [r for r in rows if (r["shape"], r["batch"]) == (shape, batch)]
        labels = [f"{r['row']}\n{r['routing']}" for r in sel]
        ax.bar(range(len(sel)), [r["x_plain"] for r in sel], color="tab:blue")
        ax.plot(range(len(sel)), [r["bound_ms"] * r["x_plain"] / r["ms"] for r in sel],
                "k_", ms=18, label="bound: misses x bytes / link + plain")
        ax.set_xticks(range(len(sel)), labels, fontsize=6)
        ax.set_yscale("log")
        ax.set_ylabel("x plain (same routing)")
        ax.set_title(f"{shape}, batch {batch}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", nargs="*", default=None)
    p.add_argument("--batches", nargs="*", type=int, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--disk-shapes", nargs="*", default=["qwen3", "tiny"],
                   help="shapes that get the disk row (batch 1)")
    p.add_argument("--disk-steps", type=int, default=4)
    p.add_argument("--disk-dir", default=None)
    p.add_argument("--store-bits", nargs="*", type=int, default=[4, 2],
                   help="quantized-store rows (batch 1); none: --store-bits")
    p.add_argument("--store-hot-bits", type=int, default=8,
                   help="mixed-precision rows: every 4th expert at these bits (0: none)")
    p.add_argument("--repeats", type=int, default=1,
                   help="time each row this many times (after one warm-up): the median, "
                        "and min-max in the table")
    p.add_argument("--no-pdl", dest="pdl", action="store_false",
                   help="skip the resident (PDL) row (Hopper and newer; run last)")
    p.add_argument("--out", default=str(RESULTS), help="folder for gpu_stack.{md,json,png}")
    p.add_argument("--name", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shapes = args.shapes or (["mixtral", "qwen3"] if cuda else ["tiny"])
    batches = args.batches or ([1, 16, 64] if cuda else [1, 4])
    link = link_gbs(device)
    rows, failed = [], []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or ("gpu_stack" if cuda else "gpu_stack_cpu")
    gpu = torch.cuda.get_device_name(device) if cuda else "CPU"
    command = "python3 benchmarks/gpu_stack.py " + " ".join(sys.argv[1:])

    def write(done: bool) -> str:
        """The table and JSON of the rows so far: a run cut short keeps them."""
        table = finish(rows, link, device, failed)
        note = "" if done else "Partial: the run had not finished when this was written.\n\n"
        (out / f"{stem}.md").write_text(f"Device: {gpu}, torch {torch.__version__}. "
                                        f"Command: `{command}`\n\n{note}{table}\n")
        (out / f"{stem}.json").write_text(json.dumps(
            dict(link_gbs=link, fill_gbs=SM_LINK, rows=rows, failed=failed,
                 done=done), indent=2))
        return table

    def run(name, T, pdl_only=False):
        try:
            run_shape(name, SHAPES[name], T, args, device, tmp, rows, failed, pdl_only,
                      written=lambda: write(done=False))
        except Exception as e:  # outside a row (building a stack or store): the rest run
            print(f"  {name} T={T}: FAILED: {e!r}", flush=True)
            failed.append(dict(shape=name, batch=T, row="(set-up)", error=repr(e)))
        write(done=False)

    with tempfile.TemporaryDirectory(dir=args.disk_dir) as tmp:
        for name in shapes:
            for T in batches:
                run(name, T)
        if cuda and 1 in batches and args.pdl and torch.cuda.get_device_capability(
                device)[0] >= 9:  # Hopper and newer; last of the whole run
            for name in shapes:
                run(name, 1, pdl_only=True)
    print(write(done=True))
    plot(rows, out / f"{stem}.png")


if __name__ == "__main__":
    main()
