"""Experts of a quantized checkpoint, offloaded as they are (exact).

The slot record of a quantized method is what the method's own steps make of one
expert: `create_weights` for one expert, vLLM's expert weight loader, then the
method's `process_weights_after_loading` (its repacking into the kernel's
layout), all on a one-expert twin of the layer. The record holds every tensor of
that expert that the method keeps (packed weights, scales, zero points, g_idx),
each `[1, ...]` with its own dtype. After loading, the layer's parameters become
the pool's `[S, ...]` slot buffers, and the method's kernel is rebuilt over them:
its quant config is made by the method itself on a twin, and each of the twin's
tensors in it is replaced by the slot buffer that holds it.

Refused, with the method named: tensors that the method keeps for the whole
layer (vLLM reduces some input scales over all experts: not separable),
tensors that it keeps outside the layer's parameters, and online quantization
(a bf16 checkpoint quantized as it loads: `--expert-store-bits` does that).
"""

from __future__ import annotations

import copy
import dataclasses
import enum

import torch
from vllm.logger import init_logger

from vllm_moe_offload.runtime.checkpoint import PROJECTIONS

logger = init_logger("vllm.moe_offload")

_SHARD_OF = {name: shard for names in PROJECTIONS
             for name, shard in zip(names, ("w1", "w3", "w2"))}


class QuantizedExperts:
    """One MoE layer's quantized method, as the offload path drives it."""

    def __init__(self, quant_method, prefix: str):
        self.qm = quant_method
        self.prefix = prefix
        self.method = type(quant_method).__name__
        if getattr(quant_method, "uses_meta_device", False):
            raise NotImplementedError(
                f"expert offload: {prefix}: {self.method} quantizes a bf16 checkpoint's "
                "experts as they load (vLLM's online quantization); it cannot be "
                "combined with expert offload. Drop --quantization and add "
                "--expert-store-bits 8 (or 4) to keep the offloaded experts quantized "
                "in the store.")
        if "nvfp4" in self.method.lower():
            raise self.unsupported(
                "scales its experts' FP4 blocks by factors that vLLM computes over all of "
                "a layer's experts (global scales; on Marlin one power-of-two factor per "
                "layer), so one expert processed alone is not the same expert")
        # on the method a twin processes with: some keep state (gpt-oss MXFP4's
        # expert count, which its processing checks)
        self.create = type(quant_method).create_weights
        self.process = type(quant_method).process_weights_after_loading
        self.create_kw: dict | None = None
        self.layer_attrs: dict = {}
        self.names: list[str] = []  # per-expert parameters, as the method creates them
        self.dtypes: dict[str, torch.dtype] = {}
        self.record: list[str] | None = None  # the slot record's tensors, after processing
        self.aliases: dict[str, str] = {}  # a second name of a record tensor -> its name

    def create_empty(self, layer, num_experts, **kw) -> None:
        """The layer's own weights: none (`[0, ...]`); all experts live in the store."""
        self.create_kw = kw
        self.layer_attrs = vars(layer)  # a twin shares these until processing sets its own
        before = set(layer._parameters)
        self.create(self.qm, layer=layer, num_experts=0, **kw)
        self.names = [n for n, p in layer._parameters.items()
                      if n not in before and p is not None]
        # Some are made in the default dtype, the model's while vLLM loads; a twin made
        # later (a store repair) must have the same.
        self.dtypes = {n: getattr(layer, n).dtype for n in self.names}
        per_layer = [n for n in self.names if getattr(layer, n).dim() == 0
                     or getattr(layer, n).shape[0] != 0]
        if per_layer:
            raise self.unsupported(f"has per-layer parameters {per_layer}, not one per "
                                   "expert")
        own = getattr(layer, "weight_loader", None)
        wrapped = [n for n in self.names if own is not None
                   and getattr(getattr(layer, n), "weight_loader", own) != own]
        if wrapped:  # (MoeWNA16's loader drops and places tensors by itself; the
            # per-expert load and a store repair call the layer's own loader)
            raise self.unsupported(f"loads {wrapped} through a loader of its own, not "
                                   "the layer's expert loader")

    def twin(self, layer, method=None) -> torch.nn.Module:
        """A one-expert copy of `layer` with its own parameters and `method`, by
        default its own copy of the layer's (processing builds a kernel, which must
        not replace the layer's)."""
        twin = copy.copy(layer)
        twin._parameters = {}
        twin.local_num_experts = 1  # some processing loops over it (FP8 per-tensor)
        twin.quant_method = copy.copy(self.qm) if method is None else method
        with torch.device(layer.moe_config.device):
            self.create(twin.quant_method, layer=twin, num_experts=1, **self.create_kw)
        for name, dtype in self.dtypes.items():
            p = twin._parameters[name]
            if p.dtype != dtype:
                q = torch.nn.Parameter(p.data.to(dtype), requires_grad=False)
                q.__dict__.update(p.__dict__)  # the loader's attributes
                twin._parameters[name] = q
        return twin

    def pack(self, twin) -> list[torch.Tensor]:
        """A loaded twin -> its slot record, by the method's own processing."""
        self._process(twin.quant_method, twin)
        # A method that picks its kernel as it processes is known now: refused at
        # the first expert loaded, not after all of them.
        refuse_monolithic(self.prefix, twin.quant_method)
        self._check_record(twin)
        return [getattr(twin, n).data[0].cpu() for n in self.record]

    def _process(self, method, twin) -> None:
        """The method's processing of `twin`. Besides its kernel and quant config
        (rebound to the slots by `bind`), it may leave only plain numbers and flags
        on the method: anything else (gpt-oss MXFP4 on Triton moves its scales,
        swizzled, into precision configs) would keep the zeroed twin's tensors in
        front of the kernel, so it is refused, at the first expert."""
        before = dict(vars(method))
        self.process(method, twin)
        kept = sorted(k for k, v in vars(method).items() if v is not before.get(k)
                      and k not in ("moe_kernel", "moe_quant_config")
                      and not isinstance(v, (type(None), bool, int, float, str, enum.Enum)))
        if kept:
            raise self.unsupported(f"keeps {kept} beside its kernel and quant config "
                                   "after processing, which offload cannot point at the "
                                   "slots")
        # Nor may its kernel keep copies of the expert's tensors (vLLM's
        # ZenCPUExpertsInt8 keeps fp32 copies of the scales and reads only those)
        experts = getattr(getattr(method, "moe_kernel", None), "fused_experts", None)
        owned = {p.untyped_storage().data_ptr() for p in twin._parameters.values()
                 if p is not None}
        copies = sorted(k for k, v in getattr(experts, "__dict__", {}).items()
                        if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 1
                        and v.untyped_storage().data_ptr() not in owned)
        if copies:
            raise self.unsupported(f"its kernel {type(experts).__name__} keeps copies "
                                   f"{copies} of the expert's tensors, which offload "
                                   "cannot point at the slots")

    def _check_record(self, twin) -> None:
        names = self._record_names(twin)
        if self.record is None:
            self.record = names
            strided = [f"{n} {tuple(getattr(twin, n).stride())}" for n in names
                       if not getattr(twin, n).is_contiguous()]
            if strided:  # (DeepGEMM's MN-major scales are refused before: SIZED_BY_EXPERTS)
                logger.warning(
                    "expert offload: %s lays out %s with strides of its own after "
                    "processing; records and slots hold them row-major, which vLLM's "
                    "kernel has not been checked to accept on a GPU",
                    self.method, ", ".join(strided))
        elif names != self.record:
            raise RuntimeError(f"expert offload: {self.method} made tensors {names} of "
                               f"one expert and {self.record} of another")

    def _record_names(self, twin) -> list[str]:
        groups: dict[int, list[str]] = {}  # a tensor -> its names (aliases)
        for name, t in twin._parameters.items():
            if t is not None:
                groups.setdefault(id(t), []).append(name)
        names = []
        for group in groups.values():
            # the name the method created, not its alias (AWQ's w13_weight)
            name = min(group, key=lambda n: (n not in self.names, n))
            self.aliases.update((alias, name) for alias in group if alias != name)
            t = getattr(twin, name)
            if t.dim() == 0 or t.shape[0] != 1:
                raise self.unsupported(
                    f"keeps {name} {tuple(t.shape)} for the whole layer after processing, "
                    "not one per expert, so the layer's experts cannot be stored apart")
            names.append(name)
        plain = [k for k, v in vars(twin).items()
                 if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter)
                 and v.dim() and v.shape[0] == 1 and self.layer_attrs.get(k) is not v]
        if plain:
            raise self.unsupported(f"keeps {plain} outside the layer's parameters")
        # Wider dtypes first: each tensor starts at an offset its dtype can view. Then
        # by name: processing re-registers parameters, so their order varies.
        return sorted(names, key=lambda n: (-getattr(twin, n).element_size(), n))

    def bind(self, layer, buffers: list[torch.Tensor], make_param,
             record: list[str] | None = None) -> None:
        """Point `layer` at the pool's slot buffers and rebuild the method's kernel
        over them. `record`: the store's record tensors, where it was built before
        (a reused disk store: this layer loaded no expert)."""
        twin = self.twin(layer, self.qm)  # the layer's method: its kernel and config
        if record is not None and hasattr(layer, "_loaded_expert_biases"):
            # vLLM's AutoGPTQ method keeps only the biases a loader call named; the
            # record says which this checkpoint has
            twin._loaded_expert_biases = set(layer._loaded_expert_biases) | {
                n for n in record if n.endswith("_bias")}
        for p in twin._parameters.values():
            if p is not None:
                p.data.zero_()
        self._process(self.qm, twin)
        self._check_record(twin)  # (a reused disk store: this layer packed no expert)
        got = [(tuple(b.shape[1:]), b.dtype) for b in buffers]
        want = [(tuple(getattr(twin, n).shape[1:]), getattr(twin, n).dtype)
                for n in self.record]
        if got != want:
            raise RuntimeError(f"expert offload: {layer.layer_name} has per-expert "
                               f"tensors {self.record} {want}, the pool {got}")
        slot_of = {}
        for name, buf in zip(self.record, buffers):
            t = getattr(twin, name)
            slot_of[_key(t)] = buf
            setattr(layer, name, make_param(buf))
        for alias, name in self.aliases.items():
            setattr(layer, alias, getattr(layer, name))
        # A twin of other values, processed too: a config tensor that differs between
        # the two is computed from the expert's tensors (vLLM's NVFP4 emulation takes
        # 1 / max over all experts' input scales): it stayed the zeroed twin's value
        probe = self.twin(layer)
        for p in probe._parameters.values():
            if p is not None:
                p.data.fill_(1)
        self._process(probe.quant_method, probe)
        twin_tensors = {t.untyped_storage().data_ptr()
                        for t in twin._parameters.values() if t is not None}
        placed = {id(buf) for buf in slot_of.values()}  # (descriptors two configs share)
        for where, label, t, other in _config_tensors(self.qm, probe.quant_method):
            if id(t) in placed:
                continue
            if _key(t) in slot_of:
                setattr(*where, slot_of[_key(t)])
            elif t.untyped_storage().data_ptr() in twin_tensors:
                raise self.unsupported(
                    f"has its kernel read a view {tuple(t.shape)} of an expert "
                    "tensor, which offload cannot point at the slots")
            elif not (isinstance(other, torch.Tensor) and other.shape == t.shape
                      and torch.equal(other, t)):
                raise self.unsupported(
                    f"computes its kernel's {label} {tuple(t.shape)} from the expert's "
                    "tensors (over all of a layer's experts in vLLM), which offload "
                    "cannot compute over the slots")

    def unsupported(self, why: str) -> NotImplementedError:
        return NotImplementedError(f"expert offload: {self.method} {why}. {WHAT_WORKS}")


# Modular kernels that size buffers by the model's expert count, where offload hands
# them the pool's slot count (CUTLASS FP8's permute scratch, FlashInfer's gemm
# tensors), lay scales out for TMA with strides of their own (DeepGEMM), or pick one
# of those at run time (the Triton-or-X fallbacks). Their base classes' names.
SIZED_BY_EXPERTS = ("CutlassExpertsFp8Base", "FlashInferExperts", "DeepGemmExperts",
                    "FallbackExperts")


def refuse_monolithic(layer_name: str, method) -> None:
    """Offload's hook is vLLM's modular MoE path: a monolithic kernel routes inside
    itself and never calls it. And a modular one must take the pool's slots as its
    experts (SIZED_BY_EXPERTS do not)."""
    if getattr(method, "is_monolithic", False):
        kernel = method.moe_kernel or getattr(method, "experts_cls", None)
        name = getattr(kernel, "__name__", type(kernel).__name__)
        raise NotImplementedError(
            f"expert offload: MoE layer {layer_name}: vLLM chose the monolithic MoE "
            f"kernel {name}, which routes inside the kernel; offload needs a modular "
            "one. Pick another --moe-backend (e.g. --moe-backend triton), or turn "
            "expert offload off.")
    experts = getattr(getattr(method, "moe_kernel", None), "fused_experts", None)
    sized = [c.__name__ for c in type(experts).__mro__ if c.__name__ in SIZED_BY_EXPERTS]
    if sized:
        raise NotImplementedError(
            f"expert offload: MoE layer {layer_name}: vLLM chose the MoE kernel "
            f"{type(experts).__name__}, which sizes its buffers or lays out its scales by "
            "the model's experts, where offload hands it the pool's slots. Add "
            "--moe-backend triton, or turn expert offload off.")


WHAT_WORKS = ("Expert offload serves bf16/fp16/fp32 experts (kept at 8, 4, 3 or 2 bits in "
              "its store with --expert-store-bits), and quantized checkpoints whose method "
              "keeps each expert's tensors apart (tested through vLLM's CPU build: "
              "compressed-tensors W8A8 INT8 and W4A16, GPTQ, AWQ, block FP8, gpt-oss "
              "MXFP4; their GPU kernels have not run with offload yet). Turn expert "
              "offload off to serve this checkpoint.")


def _config_tensors(method, probe_method):
    """((descriptor, field), its name, tensor, the probe's tensor there) of every
    tensor in the quant configs of `method` (its own, its kernel's) and of
    `probe_method` alike."""
    def configs(m):
        out = {id(c): c for c in (m.moe_quant_config, m.moe_kernel.fused_experts.quant_config)}
        return list(out.values())

    for config, other in zip(configs(method), configs(probe_method), strict=True):
        for name in ("_a1", "_a2", "_w1", "_w2"):
            desc, odesc = getattr(config, name), getattr(other, name)
            for field in dataclasses.fields(desc):
                t = getattr(desc, field.name)
                if isinstance(t, torch.Tensor):
                    yield ((desc, field.name), f"{name}.{field.name}", t,
                           getattr(odesc, field.name, None))


def _key(t: torch.Tensor) -> tuple:
    return t.data_ptr(), tuple(t.shape), t.dtype


def gpt_oss_checkpoint_keys(prefix: str, names: list[str]) -> list[tuple[str, None, str,
                                                                          str, str]]:
    """gpt-oss's tensors that hold all of a layer's experts (`names`, relative to
    `prefix.`: `gate_up_proj_blocks`, ...) -> the loader calls vLLM's gpt-oss loader
    makes of one expert's row, as `checkpoint_keys` gives them: vLLM's own name
    mapping (`gate_up_proj_blocks` -> `w13_weight`) and its streamed expert shards
    (`gpt_oss_w13`, `gpt_oss_w2`)."""
    from vllm.model_executor.models import gpt_oss

    out = []
    for name in names:
        param = gpt_oss.GptOssForCausalLM.hf_to_vllm_mapper.map_name(
            f"{prefix}.{name}").rsplit(".", 1)[-1]
        shard = gpt_oss._GPT_OSS_STREAMED_EXPERT_SUFFIX_TO_SHARD.get(param)
        if shard is None:
            raise NotImplementedError(f"expert offload: checkpoint tensor {prefix}.{name} "
                                      "is not an expert tensor vLLM's gpt-oss loader "
                                      "streams one expert at a time")
        out.append((name, None, f"{prefix}.{param}", param, shard))
    return out


def checkpoint_keys(prefix: str, names: list[str]) -> list[tuple[str, int | None, str, str,
                                                                  str]]:
    """One expert's checkpoint tensors (`names`, relative to `{prefix}.{e}.`) -> the
    loader calls that vLLM makes of them: (the tensor's name, which half of it or
    None for all, the name in vLLM's loader, the layer's parameter, the shard). vLLM
    maps `{e}.gate_proj.X` to `w13_X` shard w1, `up_proj` to shard w3, `down_proj`
    to `w2_X` shard w2 (Mixtral: w1, w3, w2), and a fused `gate_up_proj.X` (or
    `w13.X`) to two calls, its first half as shard w1 and its second as w3."""
    out = []
    for name in names:
        proj, _, tail = name.partition(".")
        shards = {"gate_up_proj": ("w1", "w3"), "w13": ("w1", "w3")}.get(proj)
        if shards is None and proj in _SHARD_OF:
            shards = (_SHARD_OF[proj],)
        if shards is None or not tail:
            raise NotImplementedError(f"expert offload: checkpoint tensor {prefix}.*.{name} "
                                      "is not a gate, up or down projection's")
        param = ("w2_" if shards == ("w2",) else "w13_") + tail
        for half, shard in enumerate(shards):
            out.append((name, half if len(shards) == 2 else None, f"{prefix}.{param}",
                        param, shard))
    return out
