"""Host mode or device mode: which expert cache runs where, and why."""

from __future__ import annotations

import os
from typing import Callable

import torch

from ..core.eviction import DEFAULT_POLICY, host_only_reason
from .expert_cache import ExpertCache
from .quant import MixedStore, QuantizedStore
from .store import ExpertStore, HostStore


def triton_interpreter(env=None) -> bool:
    """Whether TRITON_INTERPRET turns Triton's interpreter on, as Triton reads it."""
    value = (os.environ if env is None else env).get("TRITON_INTERPRET", "")
    return value.strip().lower() in ("1", "true", "on")


def device_mode_problem(device: torch.device, store: ExpertStore,
                        eviction: str = "auto") -> str | None:
    """Why device mode (`DeviceExpertCache`) cannot run here; None when it can."""
    if torch.device(device).type != "cuda" and not triton_interpreter():
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


def gpu_room(device: torch.device, utilization: float,
             budget: tuple[int, int, Callable[[], int]] | None = None
             ) -> tuple[int, str] | None:
    """(bytes, where) the pool may take on `device` once the model's other weights
    are loaded (vLLM's profile then gives the KV cache what the pool leaves). None
    off CUDA. `budget`: vLLM's (bytes requested, free bytes at its start-up snapshot,
    free bytes now as it measures them: on an integrated GPU, the host's available
    memory), see `room_left`."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    if budget is not None:
        free = budget[2]()
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return room_left(free, total, utilization, budget and (budget[:2] + budget[3:]))


def room_left(free: int, total: int, utilization: float,
              budget: tuple | None = None) -> tuple[int, str]:
    """What is left of vLLM's memory budget with `free` bytes of the GPU's `total`
    free. `budget`: vLLM's own, (bytes it requested: utilization x total, free bytes
    at its start-up snapshot); it counts what this instance used since then, so
    another instance on the same GPU (two at 0.45 each: vLLM refuses to start where
    less is free than it requests) takes nothing from it. Without it (vLLM's worker
    not seen), what is left under utilization x total of all that is used on the
    GPU. A third item in `budget` names the limit (--kv-cache-memory-bytes)."""
    where = f"under --gpu-memory-utilization {utilization}"
    if budget is not None and len(budget) > 2:  # (requested, free at start, its limit)
        *budget, where = budget
    if budget is None:
        return max(int(utilization * total) - (total - free), 0), (
            f"left on the GPU {where} ({free / 2**30:.2f} of {total / 2**30:.2f} GiB "
            "free)")
    requested, free_at_start = budget
    used = max(free_at_start - free, 0)
    return max(requested - used, 0), (
        f"left of this instance's {requested / 2**30:.2f} GiB {where} ({used / 2**30:.2f} "
        "GiB used since it started)")
