"""The one configuration of expert offload.

`OffloadConfig` is the single source of truth for the three ways to set it:
`additional_config={"expert_offload": {...}}`, `VLLM_MOE_OFFLOAD_<FIELD>` env vars,
and CLI flags (`--enable-expert-offload`, `--expert-pool-slots`, ...). Each field's
metadata names its flag; its help text is the field's comment below.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from .eviction import POLICIES, host_only_reason

ENV_PREFIX = "VLLM_MOE_OFFLOAD_"
# ENV_PREFIX variables that are not settings: the metrics directory a process hands
# its children, the kernel's slot limit and the test shard (tests)
OTHER_ENV = ("METRICS_DIR", "KERNEL_MAX_SLOTS", "TEST_SHARD")
_warned: set[str] = set()
logger = logging.getLogger("vllm.moe_offload")
CONFIG_KEY = "expert_offload"  # key inside vLLM's additional_config
STORES = ("auto", "host", "disk")
PREDICTORS = ("none", "next-gate", "lookahead", "oracle")
EVICTIONS = ("auto",) + POLICIES
STORE_BITS = (16, 8, 4, 3, 2)  # 16 = the model's own dtype, exact
STORE_QUANTIZERS = ("hqq", "rtn")
DEFAULT_STORE_DIR = os.path.join("~", ".cache", "vllm_moe_offload")


def _f(default, flag: str, help: str):
    return field(default=default, metadata={"flag": flag, "help": help})


# settings that say where or how to report, not what to do: alone they do not turn
# offload on (a VLLM_MOE_OFFLOAD_STORE_DIR exported for the `store` tool made every
# engine of that shell offload)
PASSIVE = ("store_dir", "trace_path", "metrics_per_layer", "stats_log_interval_s")
# a setting that counts only with another: (setting, applies(config), what it needs)
NEEDS = (
    ("predictor_path", lambda c: c.predictor in ("lookahead", "oracle"),
     "--expert-predictor lookahead or oracle"),
    ("prefetch_depth", lambda c: c.predictor != "none", "a predictor (--expert-predictor)"),
    ("prefetch_budget_slots", lambda c: c.predictor != "none",
     "a predictor (--expert-predictor)"),
    ("replan_every", lambda c: c.task_aware, "--expert-task-aware"),
    ("resident_slots", lambda c: c.task_aware, "--expert-task-aware"),
    ("store_hot_share", lambda c: c.store_hot_bits is not None, "--expert-store-hot-bits"),
    ("store_group_size", lambda c: c.store_bits < 16, "--expert-store-bits 8, 4, 3 or 2"),
    ("store_quantizer", lambda c: c.store_bits < 16, "--expert-store-bits 8, 4, 3 or 2"),
)


def named(name: str, *value) -> str:
    """A setting (with its value) as the user may have written it: field, flag, env var."""
    shown = f"={value[0]}" if value else ""
    return f"expert_offload.{name}{shown} ({_FLAGS[name]}, env {ENV_PREFIX}{name.upper()})"


@dataclass(frozen=True)
class OffloadConfig:
    enabled: bool = _f(False, "--enable-expert-offload",
                       "Turn expert offload on. Setting any other field turns it on "
                       "too (but store_dir, trace_path, metrics_per_layer and "
                       "stats_log_interval_s), unless this is set to false.")
    pool_slots: int | None = _f(None, "--expert-pool-slots",
                                "Expert slots resident in fast memory, shared by all MoE "
                                "layers. At least one layer's experts. Default: half of "
                                "all experts, on a GPU at most half of the memory left "
                                "under --gpu-memory-utilization (or from pool_gib).")
    pool_gib: float | None = _f(None, "--expert-pool-gib",
                                "Size the pool in GiB instead of slots (rounded down to "
                                "whole slots). Exclusive with pool_slots.")
    store: str = _f("auto", "--expert-store",
                    "Where all experts live: 'host' (RAM, pinned on CUDA), 'disk' (one "
                    "file per model, read past the page cache) or 'auto' (disk on CPU "
                    "hosts, host on GPUs).")
    store_dir: str = _f(DEFAULT_STORE_DIR, "--expert-store-dir",
                        "Directory of the disk store's cache files.")
    store_bits: int = _f(16, "--expert-store-bits",
                         "Bits per expert weight in the store: 16 keeps the model's "
                         "dtype (exact); 8, 4, 3 or 2 keep experts group-quantized and "
                         "decode them into their slot on arrival. Opt-in and "
                         "approximate: outputs change (docs/results.md section 11 has "
                         "the measured quality). bf16/fp16/fp32 checkpoints only.")
    store_group_size: int = _f(64, "--expert-store-group-size",
                               "Values per scale and zero in a quantized store, along "
                               "each expert matrix's input dimension: a multiple of 8 "
                               "that divides it.")
    store_quantizer: str = _f("hqq", "--expert-store-quantizer",
                              "How a quantized store picks scales and zeros: 'hqq' "
                              "(HQQ's half-quadratic solver refines each group's zero) "
                              "or 'rtn' (min-max, round to nearest).")
    store_hot_bits: int | None = _f(None, "--expert-store-hot-bits",
                                    "Mixed precision: keep the hot experts at these "
                                    "bits (16, 8, 4 or 3; more than store_bits) and "
                                    "the rest at store_bits. Hot: the store_hot_share "
                                    "of each layer's experts that task_profiles_path "
                                    "ranks most used (sensitivity_path, if set, leaves "
                                    "out insensitive task-layer pairs). Read once, when "
                                    "the store is built.")
    store_hot_share: float = _f(0.25, "--expert-store-hot-share",
                                "Mixed precision: the share of each layer's experts "
                                "kept at store_hot_bits, in (0, 1].")
    trace_path: str | None = _f(None, "--expert-trace-path",
                                "Write every MoE layer's routed expert ids per forward "
                                "step to this file (format: docs/design.md).")
    predictor: str = _f("none", "--expert-predictor",
                        "Which experts to load ahead of their layer: 'none' (on demand "
                        "only), 'next-gate' (later layers' gates on this layer's "
                        "hidden state), 'lookahead' (trained heads, needs "
                        "predictor_path) or 'oracle' (replays predictor_path, a trace "
                        "of an identical earlier run; benchmarks only).")
    predictor_path: str | None = _f(None, "--expert-predictor-path",
                                    "Lookahead sidecar (.safetensors from "
                                    "train_lookahead) or, for 'oracle', a routing trace.")
    prefetch_depth: int = _f(2, "--expert-prefetch-depth",
                             "Predict and prefetch layers L+1..L+depth.")
    prefetch_budget_slots: int | None = _f(None, "--expert-prefetch-budget",
                                           "Most slots held by prefetched experts at "
                                           "once. Default and cap: pool slots minus one "
                                           "layer's experts.")
    eviction: str = _f("auto", "--expert-eviction",
                       "Which resident expert gives up its slot: 'lru', 'lfu' (decayed "
                       "frequency), 'layer' (the layer that just ran first), 'reuse' "
                       "(layer cycle x decayed frequency: farthest expected next use), "
                       "'predicted' (reuse, plus the predictor's named experts kept) or "
                       "'auto' (reuse; on a GPU in device mode, the same rule in the "
                       "kernels). "
                       "docs/results.md section 7 has the measurements.")
    task_aware: bool = _f(False, "--expert-task-aware",
                          "Learn per-task expert profiles and pin the experts that the "
                          "queued work of each task will need (eMoE-style residency).")
    task_scheduler: bool | None = _f(None, "--expert-task-scheduler",
                                     "Order and admit requests by SLO, expected output "
                                     "length and shared resident experts. Default: on "
                                     "with task_aware.")
    task_rules_path: str | None = _f(None, "--expert-task-rules",
                                     "JSON rule file (keywords/regex -> task) that "
                                     "classifies requests sent without a task.")
    task_profiles_path: str | None = _f(None, "--expert-task-profiles",
                                        "Where per-task expert profiles are loaded from "
                                        "at start and saved at every re-plan.")
    replan_every: int = _f(40, "--expert-replan-every",
                           "Re-plan the pinned experts every this many new prompts.")
    resident_slots: int | None = _f(None, "--expert-resident-slots",
                                    "Slots the residency plan may pin. Default: half "
                                    "of pool slots minus one layer's experts.")
    sensitivity_path: str | None = _f(None, "--expert-sensitivity",
                                      "Routing-sensitivity file from python -m "
                                      "vllm_moe_offload sensitivity: insensitive (task, "
                                      "layer) pairs do not steer the plan.")
    approximate: bool = _f(False, "--expert-approximate",
                           "Opt-in, changes outputs: for insensitive (task, layer) "
                           "pairs re-route a missing expert to the best resident one "
                           "instead of loading it.")
    metrics_per_layer: bool = _f(False, "--expert-metrics-per-layer",
                                 "Also export every counter per MoE layer on /metrics "
                                 "(one series per layer: many series on large models).")
    stats_log_interval_s: float = _f(30.0, "--expert-stats-log-interval",
                                     "Seconds between one-line cache summaries in the "
                                     "log; 0 turns periodic logging off.")

    def __post_init__(self):
        if self.pool_slots is not None and self.pool_slots < 1:
            raise ValueError(
                f"{named('pool_slots', self.pool_slots)} must be a positive number "
                "of expert slots; it must cover at least one layer's experts.")
        if self.pool_gib is not None and self.pool_gib <= 0:
            raise ValueError(f"{named('pool_gib', self.pool_gib)} must be > 0 GiB.")
        if self.pool_slots is not None and self.pool_gib is not None:
            raise ValueError(
                f"expert_offload.pool_slots={self.pool_slots} (--expert-pool-slots) and "
                f"pool_gib={self.pool_gib} (--expert-pool-gib) are both set; set only one "
                "of them.")
        if self.store not in STORES:
            raise ValueError(
                f"expert_offload.store={self.store!r} is not a known store; use one of "
                f"{', '.join(STORES)} (--expert-store).")
        if self.store_bits not in STORE_BITS:
            raise ValueError(
                f"expert_offload.store_bits={self.store_bits} is not supported; use one of "
                f"{', '.join(map(str, STORE_BITS))} (--expert-store-bits; 16 = exact).")
        if self.store_group_size < 8 or self.store_group_size % 8:
            raise ValueError(
                f"expert_offload.store_group_size={self.store_group_size} must be a "
                "positive multiple of 8 (--expert-store-group-size; 64 is the default).")
        if self.store_quantizer not in STORE_QUANTIZERS:
            raise ValueError(
                f"expert_offload.store_quantizer={self.store_quantizer!r} is not known; "
                f"use one of {', '.join(STORE_QUANTIZERS)} (--expert-store-quantizer).")
        if self.store_hot_bits is not None:
            if self.store_bits == 16:
                raise ValueError(
                    f"expert_offload.store_hot_bits={self.store_hot_bits} keeps hot "
                    "experts at more bits than the rest, and store_bits is 16 (exact, "
                    "no quantization); set --expert-store-bits to 8, 4, 3 or 2.")
            if self.store_hot_bits not in STORE_BITS or self.store_hot_bits <= self.store_bits:
                raise ValueError(
                    f"expert_offload.store_hot_bits={self.store_hot_bits} must be one of "
                    f"{', '.join(str(b) for b in STORE_BITS if b > self.store_bits)} (more "
                    f"than store_bits={self.store_bits}; --expert-store-hot-bits).")
            if not self.task_profiles_path:
                raise ValueError(
                    f"expert_offload.store_hot_bits={self.store_hot_bits} needs "
                    "task_profiles_path (--expert-task-profiles): the per-task expert "
                    "profiles that say which experts are hot, written by a run with "
                    "--expert-task-aware or by benchmarks/quantized_store.py.")
        if not 0 < self.store_hot_share <= 1:
            raise ValueError(f"expert_offload.store_hot_share={self.store_hot_share} must "
                             "be in (0, 1] (--expert-store-hot-share).")
        if self.predictor not in PREDICTORS:
            raise ValueError(
                f"expert_offload.predictor={self.predictor!r} is not a known predictor; "
                f"use one of {', '.join(PREDICTORS)} (--expert-predictor).")
        if self.predictor in ("lookahead", "oracle") and not self.predictor_path:
            what = ("a sidecar from python -m vllm_moe_offload train-lookahead"
                    if self.predictor == "lookahead" else "a routing trace (trace_path)")
            raise ValueError(
                f"expert_offload.predictor={self.predictor!r} needs predictor_path: "
                f"{what} (--expert-predictor-path).")
        if self.eviction not in EVICTIONS:
            raise ValueError(
                f"expert_offload.eviction={self.eviction!r} is not a known policy; use one "
                f"of {', '.join(EVICTIONS)} (--expert-eviction).")
        if self.eviction == "predicted" and self.predictor == "none":
            raise ValueError(
                "expert_offload.eviction='predicted' keeps the experts a predictor names, "
                "and predictor is 'none'; set predictor (--expert-predictor next-gate) or "
                "use eviction='reuse'.")
        if self.prefetch_depth < 1:
            raise ValueError(f"{named('prefetch_depth', self.prefetch_depth)} must "
                             "be >= 1 (layers ahead to prefetch).")
        if self.prefetch_budget_slots is not None and self.prefetch_budget_slots < 0:
            raise ValueError(f"{named('prefetch_budget_slots', self.prefetch_budget_slots)} "
                             "must be >= 0.")
        if self.replan_every < 1:
            raise ValueError(f"{named('replan_every', self.replan_every)} must be "
                             ">= 1 (prompts between re-plans).")
        if self.resident_slots is not None and self.resident_slots < 0:
            raise ValueError(f"{named('resident_slots', self.resident_slots)} must "
                             "be >= 0.")
        task_only = [name for name in ("task_scheduler", "task_rules_path",
                                       "task_profiles_path", "sensitivity_path",
                                       "approximate")
                     if getattr(self, name) and not self.task_aware
                     # mixed precision reads the profiles (and sensitivity) alone
                     and not (self.store_hot_bits and name in ("task_profiles_path",
                                                               "sensitivity_path"))]
        if task_only:
            raise ValueError(f"{named(task_only[0])} needs task_aware=true "
                             "(--expert-task-aware).")
        if self.approximate and not self.sensitivity_path:
            raise ValueError(
                "expert_offload.approximate=true needs sensitivity_path: the file that "
                "says which (task, layer) pairs tolerate re-routing (python -m "
                "vllm_moe_offload sensitivity; --expert-sensitivity).")
        if self.stats_log_interval_s < 0:
            raise ValueError(
                f"{named('stats_log_interval_s', self.stats_log_interval_s)} must "
                "be >= 0 (0 turns periodic logging off).")
        if not self.store_dir.strip():
            raise ValueError(f"{named('store_dir', repr(self.store_dir))} names no directory; "
                             f"leave it unset for {DEFAULT_STORE_DIR}, or give one.")

    # ---- sources --------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "OffloadConfig":
        """Settings without `enabled` mean offload: whoever wrote pool settings
        meant it (the same for additional_config, env vars and flags)."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown expert_offload field(s) {unknown}; known fields: {sorted(known)}.")
        if set(values) - set(PASSIVE) and "enabled" not in values:
            values["enabled"] = True
        config = cls(**{k: coerce(cls, k, v) for k, v in values.items()})
        for name, applies, needs in NEEDS:  # given, and nothing reads it: say so (a
            # folded config, which vLLM hands the workers, carries every field: those
            # at their defaults were not given)
            if (config.enabled and name in values and not applies(config)
                    and getattr(config, name) != _DEFAULTS[name]):
                _warn_once(f"expert offload: {named(name)} is set, and is ignored "
                           f"without {needs}")
        return config

    @classmethod
    def env_values(cls, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Fields set through `VLLM_MOE_OFFLOAD_<FIELD>` env vars."""
        environ = os.environ if environ is None else environ
        out = {}
        names = {ENV_PREFIX + f.name.upper(): f.name for f in dataclasses.fields(cls)}
        for var, name in names.items():
            raw = environ.get(var)
            if raw is not None and raw != "":
                out[name] = coerce(cls, name, raw)
        for var in environ:  # a misspelt setting would otherwise go unnoticed
            if (var.startswith(ENV_PREFIX) and var not in names
                    and var[len(ENV_PREFIX):] not in OTHER_ENV and var not in _warned):
                _warned.add(var)
                near = ([ENV_PREFIX + _BY_FLAG_STEM[var[len(ENV_PREFIX):]].upper()]
                        if var[len(ENV_PREFIX):] in _BY_FLAG_STEM  # the flag's spelling
                        else difflib.get_close_matches(var, names, 1))
                logger.warning("%s is not an expert offload setting and is ignored%s",
                               var, f"; did you mean {near[0]}?" if near else "")
        return out

    @classmethod
    def resolve(cls, additional_config: Mapping[str, Any] | None,
                environ: Mapping[str, str] | None = None) -> "OffloadConfig":
        """Env vars first, then `additional_config["expert_offload"]` on top."""
        values = overlay(cls.env_values(environ), config_section(additional_config))
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def default_of(name: str) -> Any:
        return _DEFAULTS[name]

    # ---- derived ----------------------------------------------------------------

    @property
    def use_task_scheduler(self) -> bool:
        return self.task_aware and self.task_scheduler is not False

    def resolved_store(self, on_gpu: bool) -> str:
        if self.store != "auto":
            return self.store
        return "host" if on_gpu else "disk"

    def host_work_reason(self, on_gpu: bool) -> str | None:
        """Why a layer call needs host work on a GPU (vLLM must then run without CUDA
        graphs, which replay without the host); None when graphs can stay on."""
        if self.resolved_store(on_gpu) == "disk":
            return "the disk store is read by the host at every miss"
        if self.predictor == "oracle":
            return "the oracle predictor replays a trace on the host"
        return host_only_reason(self.eviction)

    @staticmethod
    def default_slots(num_layers: int, experts_per_layer: int) -> int:
        """The default pool before any cap: half of all experts, at least one layer's."""
        return max(experts_per_layer, num_layers * experts_per_layer // 2)

    @staticmethod
    def half_room_slots(room: tuple[int, str], slot_bytes: int,
                        experts_per_layer: int) -> int:
        """Slots in half of `room`, at least one layer's: the most the default pool
        takes there, and the size a refused pool is told to take."""
        return max(room[0] // 2 // slot_bytes, experts_per_layer)

    def num_slots(self, num_layers: int, experts_per_layer: int, slot_bytes: int,
                  max_slots: int | None = None, max_reason: str = "",
                  room: tuple[int, str] | None = None) -> int:
        """Pool size in slots for a model, checked against one layer's experts.
        `max_slots`: the most the kernel takes (`max_reason` says why); the default
        and pool_gib are capped there, an explicit pool_slots above it is refused.
        `room`: (bytes, where) the memory the pool may take at most (a GPU's, under
        vLLM's utilization cap); the default takes at most half of it, leaving the
        rest to the KV cache, and a pool set by hand that does not fit is refused."""
        total = num_layers * experts_per_layer
        if self.pool_slots is not None:
            slots, source = self.pool_slots, f"pool_slots={self.pool_slots}"
        elif self.pool_gib is not None:
            slots = int(self.pool_gib * 2**30 // slot_bytes)
            source = f"pool_gib={self.pool_gib} ({slots} slots of {slot_bytes} bytes)"
        else:
            slots = self.default_slots(num_layers, experts_per_layer)
            source = "the default (half)"
            if room is not None and slots * slot_bytes > room[0] // 2:
                slots = self.half_room_slots(room, slot_bytes, experts_per_layer)
                source = (f"the default (half of the experts, cut to {slots} slots: half "
                          f"of the {room[0] / 2**30:.2f} GiB {room[1]})")
        if slots < experts_per_layer:
            need_gib = experts_per_layer * slot_bytes / 2**30
            raise ValueError(
                f"expert_offload {source} is smaller than one layer's experts "
                f"({experts_per_layer}): every layer call must fit in the pool. Set "
                f"pool_slots >= {experts_per_layer} (--expert-pool-slots "
                f"{experts_per_layer}) or pool_gib >= {need_gib:.4f}.")
        slots = min(slots, total)
        if room is not None and experts_per_layer * slot_bytes > room[0]:
            raise ValueError(
                f"expert_offload: one layer's {experts_per_layer} experts take "
                f"{experts_per_layer * slot_bytes / 2**30:.2f} GiB, more than the "
                f"{room[0] / 2**30:.2f} GiB {room[1]}, and the pool must hold them. Raise "
                "--gpu-memory-utilization, or free GPU memory.")
        if room is not None and slots * slot_bytes > room[0]:
            fit = self.half_room_slots(room, slot_bytes, experts_per_layer)
            raise ValueError(
                f"expert_offload {source} takes {slots * slot_bytes / 2**30:.2f} GiB, more "
                f"than the {room[0] / 2**30:.2f} GiB {room[1]}, and the KV cache needs "
                f"room too. Set a smaller pool (--expert-pool-slots {fit}, or "
                f"--expert-pool-gib {fit * slot_bytes / 2**30:.2f}), or raise "
                "--gpu-memory-utilization.")
        if max_slots is not None and slots > max_slots:
            if self.pool_slots is not None:
                raise ValueError(
                    f"expert_offload {source} is more than {max_slots} slots, the most "
                    f"{max_reason}. Set pool_slots <= {max_slots} (--expert-pool-slots "
                    f"{max_slots}).")
            slots = max(max_slots, experts_per_layer)
        return slots


_FLAGS = {f.name: f.metadata["flag"] for f in dataclasses.fields(OffloadConfig)}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(OffloadConfig)}
# a flag's stem as an env var (PREFETCH_BUDGET) -> its field (prefetch_budget_slots)
_BY_FLAG_STEM = {flag.removeprefix("--").removeprefix("expert-").removeprefix("enable-expert-")
                 .replace("-", "_").upper(): name for name, flag in _FLAGS.items()}


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


EXCLUSIVE = (("pool_slots", "pool_gib"),)  # one or the other, in one source


def overlay(below: Mapping[str, Any], above: Mapping[str, Any]) -> dict[str, Any]:
    """Settings of a source `above` over those of a source `below`: where `above`
    sets one of an exclusive pair, it replaces the other one `below` set."""
    out = dict(below)
    for pair in EXCLUSIVE:
        if any(above.get(name) is not None for name in pair):
            for name in pair:
                out.pop(name, None)
    out.update(above)
    return out


def config_section(additional_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """additional_config["expert_offload"], checked to be a mapping."""
    section = (additional_config or {}).get(CONFIG_KEY)
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise ValueError(f"additional_config[{CONFIG_KEY!r}]={section!r} must be a mapping "
                         f"of settings, e.g. {{{CONFIG_KEY!r}: {{'enabled': True, "
                         "'pool_slots': 64}}")
    return dict(section)


def coerce(cls, name: str, value: Any) -> Any:
    """A setting's value as the field's type: strings (env vars, flags) parsed, other
    values (additional_config, JSON) checked; a path-like becomes its string."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    kind = f.type.split(" |")[0]
    if value is None and f.type.endswith("| None"):
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    bad = ValueError(f"expert_offload.{name}={value!r} is not a valid {kind} "
                     f"({f.metadata['flag']}, env {ENV_PREFIX}{name.upper()})")
    if isinstance(value, str) and kind != "str":
        try:
            if kind == "bool":
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise bad
            value = int(value) if kind == "int" else float(value)
        except ValueError:
            raise bad from None
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "str" and isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    if kind == "int" and float(value).is_integer():
        return int(value)
    if kind == "float" and math.isfinite(value):
        return float(value)
    raise bad
