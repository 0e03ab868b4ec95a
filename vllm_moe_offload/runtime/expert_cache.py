"""Slot buffers + slot pool + store: turn a layer call's expert ids into slot ids.

Legend: T = tokens of the call, K = experts per token (top-k), S = slots,
L = MoE layers, E = experts per layer.

One `ExpertCache` serves all MoE layers of a model. A layer call hands in its
router output `topk_ids [T, K]`; the cache pins a slot for every distinct expert,
loads the missing ones from the store (synchronously: on-demand loading), and
returns `slot_ids [T, K]` for the kernel, which runs over the slot buffers
`[S, ...]` as if they were the layer's own `[E, ...]` weights. Since S >= E, a
call never waits on itself, and the kernel is the same one plain vLLM runs.

NOTE #1: pins are released when the *next* layer call starts. On CPU the kernel
has returned by then. On CUDA the copy stream first waits for the compute
stream, so a slot is never overwritten while a queued kernel still reads it.
NOTE #2: `torch.unique(...).tolist()` is a host sync: the host must know which
experts miss before it can load them. This is the one sync per layer call.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from vllm_moe_offload.core.slot_pool import ExpertKey, SlotPool
from vllm_moe_offload.core.stats import OffloadStats
from vllm_moe_offload.core.trace import TraceWriter
from vllm_moe_offload.runtime.store import ExpertStore


class ExpertCache:
    def __init__(self, store: ExpertStore, num_slots: int, device: torch.device | str,
                 stats: OffloadStats | None = None, trace: TraceWriter | None = None):
        self.store = store
        self.device = torch.device(device)
        self.num_layers = store.num_layers
        self.experts_per_layer = store.experts_per_layer
        self.num_slots = num_slots
        self.pool = SlotPool(num_slots)
        self.stats = stats or OffloadStats()
        self.trace = trace
        # One buffer per expert tensor (e.g. w13, w2): [S, *shape], allocated once.
        self.buffers = [torch.zeros((num_slots, *spec.shape), dtype=spec.dtype,
                                    device=self.device) for spec in store.layout.tensors]
        # expert -> slot per layer; -1 = not resident. Host copy is the truth.
        self._table = torch.full((self.num_layers, self.experts_per_layer), -1,
                                 dtype=torch.int32)
        self._table_dev = self._table.to(self.device)
        self._pinned: list[int] = []
        self._cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None

    @property
    def slot_bytes(self) -> int:
        return self.store.layout.expert_bytes

    @property
    def pool_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def slot_views(self, slot: int) -> list[torch.Tensor]:
        return [b[slot] for b in self.buffers]

    def map_to_slots(self, layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """[T, K] expert ids of `layer` -> [T, K] slot ids; loads misses first."""
        if self._pinned:  # NOTE #1
            self.pool.release(self._pinned)
            self._pinned = []
        experts = torch.unique(topk_ids).tolist()  # NOTE #2
        grants = self.pool.acquire(ExpertKey(layer, e) for e in experts)
        if grants is None:
            raise RuntimeError(f"layer {layer}: {len(experts)} experts do not fit in "
                               f"{self.num_slots} slots with {self.pool.num_pinned()} pinned")
        stats = self.stats.layer(layer)
        stats.calls += 1
        misses = [g for g in grants if not g.hit]
        stats.hits += len(grants) - len(misses)
        if misses:
            self._load(layer, misses)
        self._pinned = [g.slot for g in grants]
        if self.trace is not None:
            k = topk_ids.shape[-1]
            self.trace.write(layer, k, topk_ids.to(torch.int16).cpu().numpy().tobytes())
        return self._table_dev[layer][topk_ids.long()].to(topk_ids.dtype)

    def _load(self, layer: int, misses) -> None:
        stats = self.stats.layer(layer)
        t0 = time.perf_counter()
        nbytes = 0
        if self._cuda:  # wait for kernels that may still read the victims' slots
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copy_stream) if self._cuda else nullcontext():
            for g in misses:
                if g.evicted is not None:
                    self._table[g.evicted.layer, g.evicted.expert] = -1
                    self.stats.layer(g.evicted.layer).evictions += 1
                nbytes += self.store.read_into(g.key.layer, g.key.expert,
                                               self.slot_views(g.slot))
                self._table[g.key.layer, g.key.expert] = g.slot
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
            self._copy_stream.synchronize()  # on-demand: the stall is real, count it
        self._table_dev.copy_(self._table)
        stats.misses += len(misses)
        stats.bytes_loaded += nbytes
        stats.load_seconds += time.perf_counter() - t0

    def resident(self, layer: int) -> list[int]:
        return [e for e in range(self.experts_per_layer) if self._table[layer, e] >= 0]

