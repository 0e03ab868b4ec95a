"""Per-worker state of the one model this worker serves: store, cache, stats.

MoE layers register here as they are built; experts stream into the store as
the checkpoint loads; when loading ends the store is sealed and one slot pool
is created and bound to every layer. Nothing here touches vLLM internals.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from vllm_moe_offload.core.config import OffloadConfig
from vllm_moe_offload.core.files import write_text_atomic
from vllm_moe_offload.core.sensitivity import load_insensitive
from vllm_moe_offload.core.slot_pool import SlotGroup, split_pool
from vllm_moe_offload.core.stats import OffloadStats
from vllm_moe_offload.core.tasks import TaskProfiles, hot_experts
from vllm_moe_offload.integration.vllm import metrics
from vllm_moe_offload.core.trace import TraceHeader, TraceWriter, read_trace
from vllm_moe_offload.runtime.checkpoint import CheckpointExperts
from vllm_moe_offload.runtime.expert_cache import ExpertCache
from vllm_moe_offload.runtime.modes import (device_mode_problem, gpu_room,
                                            make_expert_cache)
from vllm_moe_offload.runtime.quant import GroupQuant, MixedStore, QuantizedStore
from vllm_moe_offload.runtime.predictors import (NextGatePredictor, OraclePredictor,
                                                 load_gates, load_lookahead)
from vllm_moe_offload.runtime.task_residency import TaskResidency
from vllm_moe_offload.runtime.store import (DiskStore, ExpertLayout, ExpertStore,
                                            HostStore, keys_digest, store_file_name)
from vllm_moe_offload.runtime.store_dir import (RAM_FILE_SYSTEMS, file_system_of, others_of,
                                                 touch)

logger = logging.getLogger("vllm.moe_offload")

# vLLM 0.32's CUDA MoE kernels (Triton, Marlin) sort tokens by expert with
# moe_align_block_size, which takes fewer than 1024 experts after padding to 32;
# the slots a layer's kernel sees are the experts it is told of.
CUDA_MAX_SLOTS = 992
MAX_SLOTS_ENV = "VLLM_MOE_OFFLOAD_KERNEL_MAX_SLOTS"  # tests: CUDA's split on the CPU


def kernel_max_slots(cuda: bool) -> int | None:
    """The most slots one MoE kernel call may see: CUDA_MAX_SLOTS on CUDA, no limit
    on the CPU; MAX_SLOTS_ENV overrides it (tests run CUDA's split on the CPU)."""
    value = os.environ.get(MAX_SLOTS_ENV)
    if not value:
        return CUDA_MAX_SLOTS if cuda else None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{MAX_SLOTS_ENV}={value!r} is not a positive whole number of "
                         "slots. Unset it (it is for tests), or set e.g. 992.")
    return int(value)


def pool_slots(cfg: OffloadConfig, num_layers: int, experts_per_layer: int,
               slot_bytes: int, cuda: bool,
               room: tuple[int, str] | None = None) -> tuple[int, list[SlotGroup]]:
    """`cfg.num_slots` and its slot groups. Where the pool is more than one kernel
    call may see (vLLM's CUDA kernels: 992 slots), it is split into groups of
    consecutive layers (core/slot_pool.py split_pool); where no split holds a layer
    call in each group, the pool is capped at the limit (a default or pool_gib,
    logged) or refused (pool_slots). `room`: gpu_room's."""
    limit = kernel_max_slots(cuda)
    wanted = cfg.num_slots(num_layers, experts_per_layer, slot_bytes, room=room)
    groups = split_pool(wanted, num_layers, experts_per_layer, limit)
    if groups is not None:
        if len(groups) > 1:
            logger.info(
                "expert offload: pool of %d slots in %d groups of consecutive layers "
                "(%s): a layer's experts take its group's slots, since one MoE kernel "
                "call sees at most %d", wanted, len(groups),
                ", ".join(f"layers {g.layers.start}-{g.layers.stop - 1}: {g.size}"
                          for g in groups), limit)
        return wanted, groups
    why = ("vLLM's CUDA kernels sort tokens over fewer than 1024 experts"
           if limit == CUDA_MAX_SLOTS else f"set by {MAX_SLOTS_ENV}")
    reason = (f"one MoE kernel call sees ({why}), where {wanted} slots do not split "
              "into groups of consecutive layers that each hold one layer's "
              f"{experts_per_layer} experts")
    slots = cfg.num_slots(num_layers, experts_per_layer, slot_bytes, limit, reason, room)
    logger.warning("expert offload: pool of %d slots, not %d: the most %s", slots, wanted,
                   reason)
    return slots, [SlotGroup(range(num_layers), 0, slots)]


@dataclasses.dataclass(frozen=True)
class Draft:
    """A speculative-decoding draft, built and loaded after the pool, whose weights
    stay on the device: its tensors' bytes (a draft checkpoint's files, or the MTP
    layers' tensors in the target's checkpoint), or, where those are not found, one
    layer's experts for each MTP layer. On a GPU the pool is sized with it set aside
    (`set_aside`)."""
    method: str
    mtp_layers: int = 0
    file_bytes: int = 0

    def set_aside(self, room: tuple[int, str], layer_bytes: int) -> tuple[int, str]:
        """gpu_room's (bytes, where), less the draft; `layer_bytes`: one layer's
        experts, as the pool holds them."""
        need = self.file_bytes or self.mtp_layers * layer_bytes
        if not need:
            return room
        s = "s" if self.mtp_layers > 1 else ""
        what = ("its checkpoint" if not self.mtp_layers else
                f"its {self.mtp_layers} MTP layer{s}" if self.file_bytes else
                f"the experts of its {self.mtp_layers} MTP layer{s}")
        return max(room[0] - need, 0), (
            f"{room[1]}, less {need / 2**30:.2f} GiB set aside for the {self.method} "
            f"draft ({what}), which loads after the pool")


class ModelOffload:
    def __init__(self, cfg: OffloadConfig, fingerprint: dict, device: torch.device):
        self.cfg = cfg
        self.fingerprint = fingerprint
        self.device = device
        self.num_layers = 0
        self.experts_per_layer: int | None = None
        self.top_k = 0
        self.store: ExpertStore | None = None
        self.cache: ExpertCache | None = None
        self.stats = OffloadStats()
        self.experts_arrived = 0
        self.tasks: TaskResidency | None = None
        self.worker_tasks = None  # the worker's request classifier (tasks.py)
        self._gates: list[torch.Tensor] | None = None  # approximate mode: router weights
        # (misses, read later; stall seconds) of the last step report, or as the first
        # step began: each report counts from the one before it
        self._last_report: tuple[Callable[[], int], float] | None = None
        self._log_pending = None  # the counters of the periodic log line, read later
        self.gpu_memory_utilization = 0.9  # vLLM's, set by the first layer (gpu_room)
        self._closed = False
        self.layer_names: list[str] = []  # MoE layer index -> vLLM module path
        self._checkpoint: CheckpointExperts | None = None
        # checkpoint tensor name -> module name (the model's, set by layer.py)
        self.checkpoint_rename: Callable[[str], str | None] | None = None
        self._build_bar: tqdm | None = None
        self.owner = None  # weakref to the worker that loaded it (get_or_create)
        self.failed_requests = 0  # failed because an expert they routed to was lost
        self._failed_ids: set[str] = set()  # ... those requests
        self.packers: dict = {}  # quantized store: (shapes, kernel) -> layer.py _packer()
        self.packings: dict = {}  # (shapes, kernel) -> layer.py _packing()
        self.checkpoint_quantization: str | None = None  # its experts' vLLM method
        # device mode's prefetch on CUDA: a layer call in a piece of a piecewise CUDA
        # graph joins its copy stream (device_cache.py NOTE #5)
        self.joins_prefetch = False
        self.max_step_tokens = 8192  # the most tokens of a step (vLLM's, set by layer.py)
        self.draft: Draft | None = None  # a speculative draft's weights (set by layer.py)
        self.cuda_graphs = False  # vLLM captures CUDA graphs (set by layer.py)

    def register_layer(self, num_experts: int, top_k: int, name: str = "") -> int:
        if self.cache is not None:
            raise RuntimeError("expert offload: a MoE layer was built after loading ended")
        if self.experts_per_layer not in (None, num_experts):
            raise NotImplementedError(
                f"expert offload: MoE layer {name} has {num_experts} experts and "
                f"{self.layer_names[0]} {self.experts_per_layer}; layers with different "
                "expert counts are not supported yet. Turn expert offload off.")
        self.experts_per_layer = num_experts
        self.top_k = top_k
        self.layer_names.append(name)
        self.num_layers += 1
        return self.num_layers - 1

    @property
    def checkpoint(self) -> CheckpointExperts:
        if self._checkpoint is None:
            self._checkpoint = CheckpointExperts(self.fingerprint["model"],
                                                 self.checkpoint_rename)
        return self._checkpoint

    def checkpoint_expert(self, layer: int, expert: int):
        """(w13, w2) of one expert from the checkpoint files (store repair)."""
        return self.checkpoint.read(self.layer_names[layer], expert)

    def checkpoint_tensor_names(self, layer: int, expert: int) -> list[str]:
        """The names of one expert's tensors in the checkpoint, relative to
        `{layer path}.{expert}.`; empty where its experts are fused per layer."""
        return self.checkpoint.expert_tensor_names(self.layer_names[layer], expert)

    def checkpoint_fused_names(self, layer: int) -> list[str]:
        """The checkpoint's tensors that hold all of the layer's experts, relative to
        `{layer path}.`; empty where its experts are stored apart."""
        return self.checkpoint.fused_tensor_names(self.layer_names[layer])

    def checkpoint_named(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert's tensors as the checkpoint holds them (store repair of a
        quantized checkpoint), by the names of `checkpoint_tensor_names`, or where
        the experts are fused, its rows by the names of `checkpoint_fused_names`."""
        return self.checkpoint.read_named(self.layer_names[layer], expert)

    # ---- loading ------------------------------------------------------------------

    @property
    def quantized(self) -> bool:
        return self.cfg.store_bits < 16

    def ensure_store(self, layout: ExpertLayout, source: ExpertLayout | None = None,
                     names: list[str] | None = None,
                     packing: str | None = None) -> ExpertStore:
        """The store, built at the first expert. `layout`: the slot's (kernel) layout;
        `source`: the checkpoint's, which a quantized store encodes; `names`: the
        record's tensors (a quantized checkpoint's) and `packing`: how vLLM packs
        an expert (layer.py `_packing`, a digest; `_kernel_of`, a quantized method's
        kernel class), part of a disk store's identity."""
        if self.store is None:
            self.store = self._make_store(layout, source, names, packing)
            if self.store.kind == "disk":
                self._note_earlier_stores()
        return self.store

    def _make_store(self, layout, source, names, packing) -> ExpertStore:
        cfg = self.cfg
        if not self.quantized:
            fingerprint = dict(self.fingerprint, **({"record": names} if names else {}),
                               **({"packing": packing} if packing else {}))
            return self._open_store(layout, fingerprint)
        codec = GroupQuant(cfg.store_bits, cfg.store_group_size, cfg.store_quantizer)
        codec.check(source)
        logger.warning("expert offload: experts kept at %d bits in the store (%s, groups "
                       "of %d) and decoded into %s slots: outputs differ from plain vLLM "
                       "(store_bits < 16 is approximate)", cfg.store_bits,
                       cfg.store_quantizer, cfg.store_group_size,
                       str(layout.tensors[0].dtype).replace("torch.", ""))
        if cfg.store_hot_bits is None:
            return self._quantized_store(codec, layout, source)
        hot_codec = GroupQuant(cfg.store_hot_bits, cfg.store_group_size, cfg.store_quantizer)
        hot = self._hot_set(codec, hot_codec, lambda keys: self._store_path(
            hot_codec.layout(source), self._codec_fingerprint(hot_codec), keys).exists())
        cold = [(l, e) for l in range(self.num_layers) for e in range(self.experts_per_layer)
                if (l, e) not in hot]
        logger.warning("expert offload: mixed precision: %d hot experts (of %d) at %d bits, "
                       "ranked from the task profiles %s", len(hot), len(hot) + len(cold),
                       cfg.store_hot_bits, cfg.task_profiles_path)
        hot_store = self._quantized_store(hot_codec, layout, source, sorted(hot))
        try:
            cold_store = self._quantized_store(codec, layout, source, cold)
        except BaseException:  # (a full disk, say: the hot half holds its lock)
            hot_store.abandon()
            raise
        return MixedStore(hot_store, cold_store)

    def _note_earlier_stores(self) -> None:
        """Say what earlier builds of this model's store take on disk (each vLLM
        upgrade, dtype, bit width or kernel names a new file), and how to remove them."""
        path = self.store.path
        earlier = others_of(path)
        if earlier:
            logger.info("expert offload: %d earlier disk stores of this model that no "
                        "engine uses take %.2f GiB in %s (another vLLM version, dtype, "
                        "bit width or kernel); `vllm-moe-offload store %s --prune` "
                        "removes those unused for 14 days", len(earlier),
                        sum(f.nbytes for f in earlier) / 2**30, path.parent, path.parent)

    @property
    def _store_dir(self) -> Path:
        return Path(os.path.expanduser(self.cfg.store_dir))

    @property
    def _encoded_fingerprint(self) -> dict:
        """A quantized store's identity: its records are the checkpoint's layout
        encoded, whatever the kernel packs (no `kernel`)."""
        return {k: v for k, v in self.fingerprint.items() if k != "kernel"}

    def _codec_fingerprint(self, codec: GroupQuant) -> dict:
        return dict(self._encoded_fingerprint, store_codec=codec.describe())

    def _quantized_store(self, codec: GroupQuant, layout: ExpertLayout,
                         source: ExpertLayout, keys=None) -> QuantizedStore:
        store = self._open_store(codec.layout(source), self._codec_fingerprint(codec), keys)
        return QuantizedStore(store, codec, layout, source, encode_device=self.device)

    def _store_path(self, record: ExpertLayout, fingerprint: dict,
                    keys: list[tuple[int, int]] | None) -> Path:
        name = dict(fingerprint, layout=record.describe())
        if keys is not None:
            name["keys"] = keys_digest(keys)
        return self._store_dir / store_file_name(name)

    def _open_store(self, record: ExpertLayout, fingerprint: dict,
                    keys: list[tuple[int, int]] | None = None) -> ExpertStore:
        """A host or disk store of `record`s, for all experts or `keys`."""
        cfg = self.cfg
        if cfg.resolved_store(self.device.type == "cuda") == "host":
            return HostStore(record, self.num_layers, self.experts_per_layer,
                             pin_memory=self.device.type == "cuda", keys=keys)
        path = self._store_path(record, fingerprint, keys)
        store = DiskStore(path, record, self.num_layers, self.experts_per_layer,
                          fingerprint, keys=keys)
        problem = getattr(store, "problem", None)
        if store.reused:
            logger.info("expert offload: reusing disk store %s", path)
        elif problem:
            logger.warning("expert offload: rebuilding disk store: %s", problem)
        fs = file_system_of(path)
        if fs in RAM_FILE_SYSTEMS:
            logger.warning("expert offload: the disk store %s is on %s, which is memory: "
                           "it saves none. Set --expert-store-dir to a directory on a disk.",
                           path, fs)
        return store

    def _hot_set(self, codec: GroupQuant, hot_codec: GroupQuant,
                 built: Callable[[list], bool]) -> set[tuple[int, int]]:
        """Mixed precision: the experts the task profiles rank hot (store_hot_share of
        each layer's), the pairs the sensitivity file marks insensitive left out. With
        the disk store, the hot set its files were built with, kept beside them
        (`<name>.hot.json`): profiles change (a task-aware run writes them), and a new
        hot set would mean a new pair of stores, every expert encoded again. Where
        that set's hot store is gone (`built(keys)` false: deleted, pruned), it is
        ranked again: the stores are encoded again either way."""
        cfg = self.cfg
        profiles = TaskProfiles.load(cfg.task_profiles_path, self.num_layers,
                                     self.experts_per_layer)
        insensitive = (load_insensitive(cfg.sensitivity_path, self.num_layers)
                       if cfg.sensitivity_path else frozenset())
        ranked = {(k.layer, k.expert) for k in
                  hot_experts(profiles, cfg.store_hot_share, insensitive)}
        if cfg.resolved_store(self.device.type == "cuda") == "host":
            return ranked
        name = dict(self._encoded_fingerprint, share=cfg.store_hot_share,
                    codecs=[codec.describe(), hot_codec.describe()])
        path = self._store_dir / (store_file_name(name) + ".hot.json")
        # what the ranking came from, but for the profiles' counts (which drift)
        basis = {"profiles": os.path.abspath(cfg.task_profiles_path),
                 "sensitivity": _file_digest(cfg.sensitivity_path)}
        try:
            data = json.loads(path.read_text())
            kept = {tuple(k) for k in data["hot"]}
            if not all(0 <= l < self.num_layers and 0 <= e < self.experts_per_layer
                       for l, e in kept):
                raise ValueError("experts out of range")
            if data.get("basis") != basis:
                logger.info("expert offload: mixed precision: the hot experts of %s were "
                            "ranked from another profiles or sensitivity file: ranked "
                            "again", path)
                kept = None
            elif not built(sorted(kept)):
                logger.info("expert offload: mixed precision: the store built with the "
                            "hot experts of %s is gone: ranked again", path)
                kept = None
        except FileNotFoundError:
            kept = None
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("expert offload: mixed precision: %s unreadable (%s); ranking "
                           "the hot experts from the profiles again", path, e)
            kept = None
        if kept is not None:
            touch(path)  # (for `vllm-moe-offload store --prune`)
            if kept != ranked:
                logger.info("expert offload: mixed precision: the hot experts the store "
                            "was built with (%s); the profiles now rank %d of them "
                            "otherwise. Delete that file to rank them again (the store "
                            "is then encoded again)", path, len(kept - ranked))
            return kept
        try:
            write_text_atomic(path, json.dumps({"hot": sorted(ranked), "basis": basis}))
        except OSError as e:  # (the store's own build then says what is wrong)
            logger.warning("expert offload: mixed precision: could not keep the hot set "
                           "in %s (%s)", path, e)
        return ranked

    def put_expert(self, layer: int, expert: int, packed: list[torch.Tensor]) -> None:
        self.store.put(layer, expert, packed)
        self.experts_arrived += 1
        if self.store.kind == "disk" and not self.store.reused:
            if self._build_bar is None:  # the disk store is written as the checkpoint loads
                self._build_bar = tqdm(
                    total=self.store.nbytes, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=f"expert offload: building disk store {self.store.path.name}")
            self._build_bar.update(self.store.record_bytes_of(layer, expert))

    def finish_loading(self, dummy_expert: Callable[[int, int], list[torch.Tensor]] | None,
                       rederive: Callable[[int, int], list[torch.Tensor]] | None = None
                       ) -> ExpertCache:
        """Seal the store and build the slot pool (once, at the first layer's call).
        `rederive(layer, expert)`: the expert again from the checkpoint, should a
        disk store record turn out damaged."""
        if self.cache is not None:
            return self.cache
        store = self.store
        if not store.is_complete():
            if self.experts_arrived:  # a real load that left experts out: a bug
                raise RuntimeError(
                    f"expert offload: {len(store.missing())} experts never arrived from "
                    f"the checkpoint (first, as (MoE layer, expert): {store.missing()[:4]}):"
                    " vLLM built their layers, and the checkpoint's files hold none of "
                    "their tensors. Check the checkpoint against its index (a shard "
                    "missing?), or turn expert offload off.")
            for layer, expert in store.missing():  # load_format="dummy"
                store.put(layer, expert, dummy_expert(layer, expert))
        store.seal()
        if self._build_bar is not None:
            self._build_bar.close()
        if store.kind == "disk":
            store.rederive = rederive
        layout = store.layout
        why_host = device_mode_problem(self.device, store, self.cfg.eviction)
        if self.device.type == "cuda" and why_host is not None and self.cuda_graphs:
            # plugin.py chose graphs from the settings; this is known from the experts
            raise NotImplementedError(
                f"expert offload: this model's experts need host mode ({why_host}), one "
                "host sync per layer call, which CUDA graphs cannot replay. Add "
                "--compilation-config '{\"cudagraph_mode\": \"NONE\"}' (or "
                "--enforce-eager).")
        room = gpu_room(self.device, self.gpu_memory_utilization, _BUDGET)
        if room is not None and self.draft is not None:
            room = self.draft.set_aside(room, self.experts_per_layer * layout.expert_bytes)
            logger.info("expert offload: pool sized on %.2f GiB %s", room[0] / 2**30,
                        room[1])
        num_slots, groups = pool_slots(self.cfg, self.num_layers, self.experts_per_layer,
                                       layout.expert_bytes, self.device.type == "cuda", room)
        half = self.cfg.default_slots(self.num_layers, self.experts_per_layer)
        if room is not None and self.cfg.pool_slots is self.cfg.pool_gib is None and \
                half * layout.expert_bytes > room[0] // 2:
            logger.info("expert offload: the default pool (half of the experts, %d slots) "
                        "would take more than half of the %.2f GiB %s: %d slots, the rest "
                        "for the KV cache (--expert-pool-gib sets it)", half,
                        room[0] / 2**30, room[1], num_slots)
        trace = None
        if self.cfg.trace_path:
            trace = TraceWriter(self.cfg.trace_path, TraceHeader(
                self.num_layers, self.experts_per_layer, self.top_k))
        predictor = self._make_predictor()
        self.cache, why_host = make_expert_cache(store, num_slots, self.device, self.stats,
                                                 trace, predictor,
                                                 self.cfg.prefetch_budget_slots,
                                                 self.cfg.eviction, groups,
                                                 (self.max_step_tokens, self.top_k))
        if isinstance(self.cache, ExpertCache):  # lost rows fail their requests (tasks.py NOTE #1)
            self.cache.fail_requests = True
        self.joins_prefetch = (self.device.type == "cuda" and why_host is None
                               and predictor is not None)
        if self.device.type == "cuda":
            logger.info("expert offload: %s", "device mode (residency on the GPU, no host "
                        "sync per layer call)" if why_host is None else
                        f"host mode, one host sync per layer call: {why_host}")
        if self.cfg.task_aware:
            self.tasks = self._make_task_residency()
        total = self.num_layers * self.experts_per_layer
        logger.info(
            "expert offload: pool %d of %d experts (%.1f%%), %.3f GiB in %s memory; "
            "store %s %.3f GiB%s; predictor %s (depth %d, budget %d slots); eviction %s",
            num_slots,
            total, 100 * num_slots / total, self.cache.pool_bytes / 2**30,
            self.device.type, store.kind, store.nbytes / 2**30,
            f" at {store.path}" if store.kind == "disk" else "", self.cfg.predictor,
            self.cfg.prefetch_depth, self.cache.prefetch_budget if predictor else 0,
            self.cache.eviction)
        atexit.register(self.shutdown)
        return self.cache

    def _make_predictor(self):
        cfg = self.cfg
        if cfg.predictor == "none":
            return None
        if cfg.predictor == "oracle":
            if cfg.trace_path and Path(cfg.trace_path).resolve() == Path(
                    cfg.predictor_path).resolve():
                raise ValueError("expert_offload.predictor_path and trace_path are the "
                                 "same file; the oracle reads an *earlier* run's trace")
            header, records = read_trace(cfg.predictor_path)
            records = list(records)
            shape = (self.num_layers, self.experts_per_layer)
            if header is not None:
                recorded = (header.num_layers, header.experts_per_layer)
            else:  # JSONL: the largest layer and expert id it names
                recorded = (max((r.layer + 1 for r in records), default=0),
                            max((max(r.expert_ids, default=-1) + 1 for r in records),
                                default=0))
            if recorded[0] > shape[0] or recorded[1] > shape[1] or (
                    header is not None and recorded != shape):
                raise ValueError(
                    f"expert_offload.predictor_path={cfg.predictor_path}: this trace is of "
                    f"a model with {recorded[0]} MoE layers of {recorded[1]} experts, but "
                    f"this model has {shape[0]} of {shape[1]}; the oracle replays a trace "
                    "of an earlier run of the same model and prompts (record one with "
                    "trace_path)")
            return OraclePredictor(records, cfg.prefetch_depth, self.top_k, self.num_layers)
        gates = load_gates(self.fingerprint["model"])  # CPU, fp32
        if len(gates) != self.num_layers:
            raise ValueError(f"expert offload: found {len(gates)} router weights for "
                             f"{self.num_layers} MoE layers; cannot predict")
        if cfg.predictor == "next-gate":
            return NextGatePredictor([g.to(self.device) for g in gates],
                                     cfg.prefetch_depth, self.top_k)
        return load_lookahead(cfg.predictor_path, gates, cfg.prefetch_depth,
                              self.top_k).to(self.device)

    def _make_task_residency(self) -> TaskResidency:
        cfg, cache = self.cfg, self.cache
        room = cache.plan_room  # beside one layer call in each slot group
        budget = room // 2 if cfg.resident_slots is None else cfg.resident_slots
        if budget > room:
            groups = (f" in each of its {len(cache.groups)} slot groups"
                      if len(cache.groups) > 1 else "")
            raise ValueError(
                f"expert_offload.resident_slots={budget} leaves no room for one layer "
                f"call: the pool has {cache.num_slots} slots and a layer needs up to "
                f"{self.experts_per_layer}{groups}. Set resident_slots <= {room}.")
        insensitive = set()
        if cfg.sensitivity_path:
            insensitive = load_insensitive(cfg.sensitivity_path, self.num_layers)
        if cfg.approximate:
            gates = load_gates(self.fingerprint["model"])
            experts = {g.shape[0] for g in gates}
            if len(gates) != self.num_layers or experts != {self.experts_per_layer}:
                raise ValueError(
                    f"expert_offload.approximate: found {len(gates)} router weights with "
                    f"{sorted(experts)} experts for {self.num_layers} MoE "
                    f"layers of {self.experts_per_layer}; re-routing needs each layer's "
                    "own router. Turn approximate off for this model.")
            self._gates = [g.to(self.device) for g in gates]
        residency = TaskResidency(cache, budget, cfg.replan_every, cfg.task_profiles_path,
                                  insensitive, cfg.approximate, self.max_step_tokens)
        logger.info("expert offload: task-aware residency: up to %d pinned slots, re-plan "
                    "every %d prompts, %d insensitive (task, layer) pairs%s", budget,
                    cfg.replan_every, len(insensitive),
                    "; APPROXIMATE routing on for them" if cfg.approximate else "")
        return residency

    # ---- running ------------------------------------------------------------------

    def map_to_slots(self, layer: int, topk_ids: torch.Tensor,
                     hidden: torch.Tensor | None = None) -> torch.Tensor:
        tasks = self.tasks
        if tasks is not None:
            tasks.record(layer, topk_ids)  # the router's own choice, before any re-route
            rows = tasks.approx_tokens(layer, topk_ids.shape[0], _capturing(topk_ids))
            if rows is not None and hidden is not None:
                scores = hidden.float() @ self._gates[layer].T
                topk_ids = self.cache.reroute_misses(layer, topk_ids, scores, rows)
        return self.cache.map_to_slots(layer, topk_ids, hidden)

    def end_step(self, layout: list[tuple[str, int]]) -> None:
        """After a step's forward: device mode writes the step's routing trace, and
        once an interval the counters are logged (here, not in a layer call: under a
        CUDA graph no layer call runs Python). In device mode their copy is queued
        (`stats_later`: no host sync) and logged at the first step that finds it done."""
        if self.cache.trace is not None:
            self.cache.flush_trace(sum(n for _, n in layout))
        if self._log_pending is None and self.stats.due(self.cfg.stats_log_interval_s):
            self._log_pending = self.cache.stats_later()
        if self._log_pending is not None and self._log_pending.ready():
            logger.info(self._log_pending()[0].summary_line())
            self._log_pending = None

    def take_failed_requests(self, layout: list[tuple[str, int]]) -> dict[str, str]:
        """The requests of this step that routed to a lost expert (expert_cache.py
        NOTE #5) -> why; `layout`: (request id, scheduled tokens) in batch order,
        the row order of the MoE layers' calls."""
        rows = getattr(self.cache, "failed_rows", None)  # device mode: never (host store)
        if not rows:
            return {}
        failed, start = {}, 0
        for req_id, n in layout:
            why = next((rows[r] for r in range(start, start + n) if r in rows), None)
            if why is not None:
                failed[req_id] = why
            start += n
        rows.clear()
        # with async scheduling a failed request may run one more step before the
        # scheduler ends it, and fail again there: it counts once
        new = failed.keys() - self._failed_ids
        self._failed_ids |= new
        self.failed_requests += len(new)
        return failed

    def step_began(self, finished_req_ids=()) -> None:
        """Before every step's forward (vLLM's _update_states). Requests vLLM has
        finished leave the set that counts a failed request once (it only grew,
        by every failed request, for the life of the server). Rows that failed
        outside a step (vLLM's profiling and warm-up runs, which sample nothing, so
        take_failed_requests never ran for them) are not this step's rows. With
        task-aware residency, the first takes the counts so far, of those runs, which
        no report counts as a step's (the latency model would start from every
        expert's first load)."""
        self._failed_ids.difference_update(finished_req_ids)  # (they run no more steps)
        rows = getattr(self.cache, "failed_rows", None)
        if rows:
            rows.clear()
        if self.tasks is not None and self._last_report is None:
            self._last_report = (self.cache.misses_later(),
                                 self.cache.stats.totals().stall_seconds)

    def step_report(self) -> Callable[[], dict]:
        """What the scheduler's latency model learns from one step, as a function that
        gives it. Device mode queues the copy of its counters now and reads it when
        vLLM hands the step's output over (tasks.py _attach; with async scheduling,
        after the step ran), so the step adds no host sync. Each counts from the
        report before it, whatever order they are called in."""
        shares = self.tasks.resident_share()
        stall = self.cache.stats.totals().stall_seconds  # kept on the host
        misses_now = self.cache.misses_later()
        misses_before, stall_before = self._last_report or ((lambda: 0), 0.0)
        self._last_report = (misses_now, stall)

        def report() -> dict:
            return {"misses": misses_now() - misses_before(), "stall_s": stall - stall_before,
                    "resident_share": shares()}
        return report

    def stats_dict(self) -> dict:
        if self.cache is not None:
            self.cache.sync_stats()
        out = self.stats.to_dict()
        if self.tasks is not None:
            out["tasks"] = self.tasks.to_dict()
        if self.cache is not None:
            out["pool"] = self.pool_info()
        return out

    def pool_info(self) -> dict:
        cache, store = self.cache, self.store
        return {"mode": cache.mode, "eviction": cache.eviction,
                "num_slots": cache.num_slots, "slot_bytes": cache.slot_bytes,
                "slot_groups": [[g.layers.start, g.layers.stop, g.lo, g.hi]
                                for g in cache.groups],
                "record_bytes": store.record_bytes, "read_bytes": store.read_bytes,
                "store_bits": self.cfg.store_bits,
                "checkpoint_quantization": self.checkpoint_quantization,
                **({"store_hot_bits": self.cfg.store_hot_bits,
                    "hot_experts": len(store.hot.inner.keys),
                    "hot_read_bytes": store.hot.read_bytes,
                    "hot_store_path": str(getattr(store.hot, "path", ""))}
                   if isinstance(store, MixedStore) else {}),
                "pool_bytes": cache.pool_bytes, "num_layers": self.num_layers,
                "experts_per_layer": self.experts_per_layer,
                "store": store.kind, "store_bytes": store.nbytes,
                "store_path": str(getattr(store, "path", "")),
                "store_repairs": getattr(store, "repairs", 0),
                "failed_requests": self.failed_requests,
                "draft": None if self.draft is None else dataclasses.asdict(self.draft)}

    def shutdown(self) -> None:
        """Log the summary, stop the loader, close files. Runs once (worker shutdown
        or interpreter exit, whichever comes first)."""
        if self.cache is None or self._closed:
            return
        self._closed = True
        metrics.stop(self)
        try:
            self.cache.sync_stats()
        except Exception as e:  # a dead device at exit must not hide the summary
            logger.warning("expert offload: could not read the device counters: %s", e)
        logger.info("%s (shutdown)", self.stats.summary_line())
        if self.tasks is not None:
            self.tasks.save()
        self.cache.close()
        self.cache.close_trace()
        self.store.close()


def _capturing(t: torch.Tensor) -> bool:
    """Inside a CUDA graph capture nothing may sync (reading counters would)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


_MODEL: ModelOffload | None = None


# vLLM's memory budget on CUDA (gpu_room's `budget`), set by the worker while it
# loads the model (worker.py)
_BUDGET: tuple[int, int, Callable[[], int]] | None = None


def set_budget(budget: tuple[int, int, Callable[[], int]] | None) -> None:
    global _BUDGET
    _BUDGET = budget


def _file_digest(path: str | None) -> str | None:
    if not path:
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def current() -> ModelOffload | None:
    return _MODEL


def abandon_load() -> None:
    """The model's load failed: a disk store half built gives back its partial file
    and its lock (other instances wait on it), where this process may live on (an
    in-process engine, store.py NOTE #3), and a later load here starts afresh."""
    global _MODEL
    model, _MODEL = _MODEL, None
    if model is None or model.store is None:
        return
    try:
        if model.cache is None:
            model.store.abandon()
        else:  # the pool was built: its memory and loader thread go too
            model.shutdown()
    except Exception as e:  # the load's own error is the one to see
        logger.warning("expert offload: cleaning up after the failed load: %s", e)


def loaded() -> ModelOffload | None:
    """The model whose loading ended (its pool exists), if any."""
    return _MODEL if _MODEL is not None and _MODEL.cache is not None else None


def get_or_create(cfg: OffloadConfig, fingerprint: dict, device: torch.device) -> ModelOffload:
    """The state of the model being built: its layers share one. A model already
    loaded (its pool built) is another engine's, in this process: a new one starts
    afresh (with its own config: the old state's failed its first layer)."""
    global _MODEL
    if (_MODEL is not None and _MODEL.cache is not None and _MODEL.owner is not None
            and _MODEL.owner() is not None):  # (not refused: a dropped engine that was
        logger.warning(  # never shut down may live on, its objects frozen by vLLM's gc)
            "expert offload: an engine in this process already serves %s with expert "
            "offload, and its worker is alive. This process keeps one offload state: "
            "from now on it is the new engine's, and the first engine must not be used "
            "again (its layer calls would read the new engine's slots). Shut it down "
            "first (del llm), or give each engine its own process (vLLM's default, "
            "VLLM_ENABLE_V1_MULTIPROCESSING=1)", _MODEL.fingerprint.get("model"))
    if _MODEL is None or _MODEL.fingerprint != fingerprint or _MODEL.cache is not None:
        _MODEL = ModelOffload(cfg, fingerprint, device)
    return _MODEL


def release(model: ModelOffload | None) -> None:
    """`model`'s worker shuts down: its summary, its files, and this process's hold
    on its pool go. Before, a later engine in the process (notebooks,
    VLLM_ENABLE_V1_MULTIPROCESSING=0) saw it as its own target model loaded: its
    layers were taken for a draft's and kept every expert resident. Another engine's
    state, current since, stays."""
    global _MODEL
    if model is None:
        return
    if _MODEL is model:
        _MODEL = None
    atexit.unregister(model.shutdown)
    model.shutdown()
