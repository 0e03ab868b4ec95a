"""Worker-side hooks: the stats RPC behind `get_stats(llm)`, the start-up line that
puts the expert pool next to the KV cache it shares the memory budget with, and the
summary line at worker shutdown."""

from __future__ import annotations

import logging

import psutil

from vllm_moe_offload.core.config import OffloadConfig
from vllm_moe_offload.integration.vllm import model_state

RPC_METHOD = "moe_offload_stats"
logger = logging.getLogger("vllm.moe_offload")


def worker_stats(worker=None) -> dict:
    model = model_state.current()
    out = model.stats_dict() if model is not None else {}
    out["rss_bytes"] = psutil.Process().memory_info().rss  # the worker's resident memory
    return out


def install() -> None:
    """Give workers a `moe_offload_stats` method (called by name over RPC), and log
    the memory split once the KV cache is allocated."""
    from vllm.v1.worker.gpu_worker import Worker
    from vllm.v1.worker.worker_base import WorkerBase

    if not hasattr(WorkerBase, RPC_METHOD):
        setattr(WorkerBase, RPC_METHOD, worker_stats)
    if getattr(Worker.initialize_from_config, "_moe_offload", False):
        return
    original = Worker.initialize_from_config

    def initialize_from_config(self, kv_cache_config):
        result = original(self, kv_cache_config)
        model = model_state.current()
        if model is None and OffloadConfig.resolve(self.vllm_config.additional_config).enabled:
            raise NotImplementedError(
                "expert offload: the model loaded without one MoE layer built by vLLM's "
                "RoutedExperts, so no expert can be offloaded (its experts use a class "
                "of their own, or vLLM serves it through its Transformers backend). "
                "Turn expert offload off.")
        if model is not None and model.cache is not None:
            kv_bytes = sum(t.size for t in kv_cache_config.kv_cache_tensors)
            logger.info(
                "expert offload: memory budget: KV cache %.3f GiB (%d blocks) beside the "
                "expert pool %.3f GiB (%d slots); experts in the %s store: %.3f GiB",
                kv_bytes / 2**30, kv_cache_config.num_blocks,
                model.cache.pool_bytes / 2**30, model.cache.num_slots, model.store.kind,
                model.store.nbytes / 2**30)
        return result

    initialize_from_config._moe_offload = True
    Worker.initialize_from_config = initialize_from_config

    original_shutdown = Worker.shutdown

    def shutdown(self):  # the server path ends workers here, not through atexit
        model = model_state.current()
        if model is not None:
            model.shutdown()
        return original_shutdown(self)

    Worker.shutdown = shutdown


def collect_stats(llm) -> dict:
    return llm.collective_rpc(RPC_METHOD)[0]
