"""`get_stats(llm)`: read the worker's offload statistics through collective_rpc."""

from __future__ import annotations

import psutil

from vllm_moe_offload.integration.vllm import model_state

RPC_METHOD = "moe_offload_stats"


def worker_stats(worker=None) -> dict:
    model = model_state.current()
    out = model.stats_dict() if model is not None else {}
    out["rss_bytes"] = psutil.Process().memory_info().rss  # the worker's resident memory
    return out


def install() -> None:
    """Give vLLM's workers a `moe_offload_stats` method (called by name over RPC)."""
    from vllm.v1.worker.worker_base import WorkerBase

    if not hasattr(WorkerBase, RPC_METHOD):
        setattr(WorkerBase, RPC_METHOD, worker_stats)


def collect_stats(llm) -> dict:
    return llm.collective_rpc(RPC_METHOD)[0]
