"""Host mode or device mode: which expert cache runs where, and why."""

from __future__ import annotations

import os

import torch

from ..core.eviction import DEFAULT_POLICY, host_only_reason
from .expert_cache import ExpertCache
from .quant import MixedStore, QuantizedStore
from .store import ExpertStore, HostStore


def device_mode_problem(device: torch.device, store: ExpertStore,
                        eviction: str = "auto") -> str | None:
    """Why device mode (`DeviceExpertCache`) cannot run here; None when it can."""
    if torch.device(device).type != "cuda" and not os.environ.get("TRITON_INTERPRET"):
        return "the pool is not on a CUDA device"
    # a mixed-precision store: its hot and cold stores, each of some experts only
    stores = store.stores if isinstance(store, MixedStore) else (store,)
    for store in stores:
        if isinstance(store, QuantizedStore):
            if len({s.dtype for s in store.layout.tensors if len(s.shape) > 1}) > 1:
                return "device mode decodes experts whose matrices share one dtype"
            store = store.inner  # device mode decodes its records in place
        if getattr(store, "keys", None) is not None and len(stores) == 1:
            return ("the store holds some experts only (device mode reads record "
                    "layer * E + e)")
        if not isinstance(store, HostStore):
            return (f"the {store.kind} store is read by the host (device mode reads the "
                    "pinned host store in place: --expert-store host)")
    return host_only_reason(eviction)


def make_expert_cache(store: ExpertStore, num_slots: int, device, stats=None, trace=None,
                      predictor=None, prefetch_budget_slots=None, eviction: str = "auto",
                      groups=None, trace_rows: tuple[int, int] = (8192, 8)):
    """Device mode where it can run, else host mode. Returns (cache, why host mode).
    `eviction`: a policy of core/eviction.py, or 'auto' (the measured default,
    `reuse`, which device mode's kernels run too); `groups`: the slot groups
    (core/slot_pool.py split_pool), one by default; `trace_rows`: (most tokens of a
    step, top-k), the size of device mode's trace buffer."""
    problem = device_mode_problem(device, store, eviction)
    if problem is None:
        from .device_cache import DeviceExpertCache  # imports Triton: CUDA hosts only

        cache = DeviceExpertCache(store, num_slots, device, stats, predictor,
                                  prefetch_budget_slots, groups=groups)
        if trace is not None:
            cache.set_trace(trace, *trace_rows)
        return cache, None
    return ExpertCache(store, num_slots, device, stats, trace, predictor,
                       prefetch_budget_slots,
                       DEFAULT_POLICY if eviction == "auto" else eviction, groups), problem


def gpu_room(device: torch.device, utilization: float) -> tuple[int, str] | None:
    """(bytes, where) the pool may take on `device`: what is left under vLLM's
    --gpu-memory-utilization once the model's other weights are loaded (vLLM's
    profile then gives the KV cache what the pool leaves). None off CUDA."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    left = max(int(utilization * total) - (total - free), 0)
    return left, (f"left on the GPU under --gpu-memory-utilization {utilization} "
                  f"({free / 2**30:.2f} of {total / 2**30:.2f} GiB free)")
