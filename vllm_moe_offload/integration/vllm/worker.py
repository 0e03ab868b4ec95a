"""Worker-side hooks: the stats RPC behind `get_stats(llm)`, vLLM's memory budget
(read as the model loads, to size the pool on a GPU), the start-up line that puts
the expert pool next to the KV cache it shares that budget with, and the summary
line at worker shutdown."""

from __future__ import annotations

import logging
import weakref

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
        result = _released_on_failure(self, lambda: original(self, kv_cache_config))
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
        model_state.release(getattr(self, "_moe_offload_model", None))
        return original_shutdown(self)

    Worker.shutdown = shutdown

    original_load = Worker.load_model

    def load_model(self, *args, **kwargs):  # the pool is sized inside it (gpu_room)
        model_state.set_budget(memory_budget(self))
        before = model_state.current()  # another engine's, in this process
        try:
            result = original_load(self, *args, **kwargs)
            if model_state.current() is not before:  # this worker's, released at shutdown
                self._moe_offload_model = model_state.current()
                self._moe_offload_model.owner = weakref.ref(self)
            return result
        except BaseException:
            if model_state.current() is not before:
                model_state.abandon_load()
            raise
        finally:
            model_state.set_budget(None)

    Worker.load_model = load_model

    original_memory = Worker.determine_available_memory

    def determine_available_memory(self):
        def measured():
            available = original_memory(self)
            check_kv_room(available, model_state.current(),
                          self.cache_config.gpu_memory_utilization)
            return available

        return _released_on_failure(self, measured)

    Worker.determine_available_memory = determine_available_memory
    _release_on_failure_of(Worker, "compile_or_warm_up_model")  # (graph capture: OOM)
    _name_the_pool_on_cpu()


def _name_the_pool_on_cpu() -> None:
    """vLLM's CPU worker sizes the KV cache from its RSS, without the GPU worker's
    method, and its error ("reduce CPU memory used by other processes") does not
    name the memory that offload holds: add it. A failed start here lets go of the
    model state too (_released_on_failure)."""
    try:
        from vllm.v1.worker.cpu_worker import CPUWorker
    except ImportError:  # a build without it
        return
    if getattr(CPUWorker.determine_available_memory, "_moe_offload", False):
        return
    original = CPUWorker.determine_available_memory

    def determine_available_memory(self):
        def measured():
            try:
                return original(self)
            except ValueError as e:
                note = pool_note(model_state.current())  # (before the state goes)
                if note is None:
                    raise
                raise ValueError(f"{e} {note}") from None

        return _released_on_failure(self, measured)

    determine_available_memory._moe_offload = True
    CPUWorker.determine_available_memory = determine_available_memory
    _release_on_failure_of(CPUWorker, "compile_or_warm_up_model")


def _released_on_failure(worker, call):
    """call(); where it raises, the engine does not start: this worker's model state
    goes (its files, and this process's hold on it), so a retry in the same process
    (a notebook, after "set a smaller pool") is a fresh start, not a second engine
    beside a live one (model_state.get_or_create)."""
    try:
        return call()
    except BaseException:
        model_state.release(getattr(worker, "_moe_offload_model", None))
        raise


def _release_on_failure_of(cls, name: str) -> None:
    """cls.name, wrapped in _released_on_failure."""
    original = getattr(cls, name)

    def wrapped(self, *args, **kwargs):
        return _released_on_failure(self, lambda: original(self, *args, **kwargs))

    setattr(cls, name, wrapped)


def pool_note(model) -> str | None:
    """What expert offload holds in this worker's memory, and how to hold less."""
    if model is None or model.cache is None:
        return None
    host = model.store.kind == "host"
    held = model.cache.pool_bytes + (model.store.nbytes if host else 0)
    return (f"Expert offload holds {held / 2**30:.2f} GiB of it: "
            f"{model.cache.num_slots} expert slots ({model.cache.pool_bytes / 2**30:.2f} "
            "GiB)" + (f" and a host store of every expert ({model.store.nbytes / 2**30:.2f}"
                      " GiB, a second copy in RAM: --expert-store disk keeps it on disk)"
                      if host else "")
            + ". Set a smaller pool (--expert-pool-gib or --expert-pool-slots), or raise "
            "--gpu-memory-utilization.")


def check_kv_room(available: int, model, utilization: float) -> None:
    """vLLM's KV cache gets `available` bytes, what its profile leaves of its budget
    once weights, the pool and activations are counted. None left: say so with the
    pool named (vLLM's own error would blame its memory setting alone). The pool was
    sized before the rest of the model's memory was known (model_state.py)."""
    if available > 0 or model is None or model.cache is None:
        return
    pool, slot = model.cache.pool_bytes, model.cache.slot_bytes
    layer = model.experts_per_layer * slot
    fit = (pool + available) // 2  # half of what pool and KV cache have together
    smaller = (f"Set a smaller pool (--expert-pool-gib {fit / 2**30:.2f}) or raise "
               if fit >= layer else "Raise ")
    raise ValueError(
        f"expert offload: the expert pool ({model.cache.num_slots} slots, "
        f"{pool / 2**30:.2f} GiB) leaves no memory for the KV cache under "
        f"--gpu-memory-utilization {utilization}: vLLM's profile counts "
        f"{available / 2**30:.2f} GiB left once the weights, the pool and the "
        f"activations are in. {smaller}--gpu-memory-utilization.")


def memory_budget(worker) -> tuple | None:
    """vLLM's memory budget on CUDA, as its worker counts it: (bytes requested, free
    bytes at its start-up snapshot, free bytes now, measured as that snapshot was:
    on an integrated GPU the host's available memory). With --kv-cache-memory-bytes
    (vLLM then sizes the KV cache by it, not by the utilization), what was free at
    start-up less that, and a fourth item naming it. None where it keeps none (the
    CPU)."""
    requested = getattr(worker, "requested_memory", None)
    snapshot = getattr(worker, "init_snapshot", None)
    if not requested or snapshot is None:
        return None

    def free_now() -> int:
        from vllm.utils.mem_utils import MemorySnapshot

        return MemorySnapshot(device=snapshot.device_).free_memory

    kv = getattr(getattr(worker, "cache_config", None), "kv_cache_memory_bytes", None)
    if kv:  # vLLM then gives the KV cache that much, whatever the utilization says
        return (max(int(snapshot.free_memory) - int(kv), 0), int(snapshot.free_memory),
                free_now, f"beside --kv-cache-memory-bytes {int(kv)}")
    return int(requested), int(snapshot.free_memory), free_now


def collect_stats(llm) -> dict:
    return llm.collective_rpc(RPC_METHOD)[0]
