"""The routed-experts layer with an expert-slot pool (vLLM's OOT layer hook).

Registered with `RoutedExperts.register_oot`, so vLLM builds this class for
every MoE layer. While offload is off it is `RoutedExperts` unchanged. While on:
- the layer's own `w13_weight`/`w2_weight` are created empty ([0, ...]);
- `weight_loader` stages each checkpoint expert, converts it to the kernel's
  layout with vLLM's own post-processing (padding, CPU prepack), and streams it
  into the store, so all experts are never in fast memory at once;
- after loading, `w13_weight`/`w2_weight` become the shared slot buffers [S, ...]
  (with slot groups, the layer's group's slots [S_g, ...]: runtime/slot_buffers.py);
- `forward_modular` maps router ids to slots (opaque custom op: loads misses),
  then runs vLLM's own MoE kernel with `global_num_experts = S` (S_g).
A quantized checkpoint's experts go the same way, each as the method itself
processes one expert (quantized.py).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import re
from pathlib import Path

import torch
from safetensors import SafetensorError

import vllm
import vllm.envs as envs
from vllm.config import CUDAGraphMode, get_current_vllm_config
from vllm.forward_context import (get_forward_context, in_piecewise_cudagraph,
                                  is_forward_context_available)
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.oracle.unquantized import (
    convert_to_unquantized_kernel_format)
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
    UnquantizedFusedMoEMethod)
from vllm.model_executor.utils import replace_parameter, set_weight_attrs
from vllm.platforms import current_platform

from vllm_moe_offload.core.config import OffloadConfig
from vllm_moe_offload.integration.vllm import model_state
from vllm_moe_offload.integration.vllm import tuned_configs
from vllm_moe_offload.integration.vllm.custom_ops import map_to_slots_op
from vllm_moe_offload.integration.vllm.quantized import (QuantizedExperts, checkpoint_keys,
                                                         gpt_oss_checkpoint_keys,
                                                         refuse_monolithic)
from vllm_moe_offload.runtime.checkpoint import CheckpointExperts
from vllm_moe_offload.runtime.quant import Gather
from vllm_moe_offload.runtime.store import ExpertLayout, TensorSpec, keys_digest

logger = init_logger("vllm.moe_offload")


def checkpoint_dir(model: str, revision: str | None, download_dir: str | None) -> str:
    """The checkpoint's directory, which the store's repairs, the predictors' router
    weights and quantized loading read: `--model` itself, or, for a hub id, its
    snapshot in the Hugging Face cache (vLLM fetched its config there before any
    layer is built; its weights follow before they load). The snapshot's name is
    its commit. Else `model` as given (the readers then say what is missing)."""
    if Path(model).is_dir():
        return model
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, revision=revision, cache_dir=download_dir,
                                 local_files_only=True)
    except Exception:  # not a hub id, or not in the cache
        return model


def _fingerprint(vllm_config) -> dict:
    """What the disk store's contents depend on: model files, dtype, vLLM, load format.
    A hub snapshot is named by its commit, so its files are not listed (they arrive
    after this runs). The files go in as a digest of their names, sizes and times:
    listed, DeepSeek-V3's 163 shards overflowed the store's 4 KiB header."""
    mc, lc = vllm_config.model_config, vllm_config.load_config
    model = checkpoint_dir(str(mc.model), mc.revision, lc.download_dir)
    files = []
    if model == str(mc.model):
        try:
            for f in sorted(Path(model).glob("*.safetensors")):
                st = f.stat()
                files.append([f.name, st.st_size, int(st.st_mtime)])
        except OSError:
            pass
    return {"model": model, "revision": mc.revision, "dtype": str(mc.dtype),
            "vllm": vllm.__version__, "load_format": str(lc.load_format),
            "seed": mc.seed if str(lc.load_format) == "dummy" else None,
            "files": keys_digest(files)}


def _kernel_identity(moe_config, device: torch.device) -> dict:
    """What else decides how vLLM lays out a processed expert, the store's record,
    beyond the model and vLLM's version: on the CPU its MoE and quantized kernels
    prepack for AMX or not (and per architecture); on a GPU the backend, and the
    kernels vLLM picks by compute capability. Part of a disk store's identity, so a
    store directory shared by hosts of both kinds (or copied) is never read in the
    other's layout (checksums cannot tell: they were sealed over that layout)."""
    if device.type == "cuda":
        return {"backend": str(moe_config.moe_backend),
                "sm": list(torch.cuda.get_device_capability(device))}
    return {"backend": str(moe_config.moe_backend), "arch": platform.machine(),
            "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", bool)())}


def _kernel_of(method) -> str:
    """A quantized method and the kernel class its processing chose: part of a disk
    store's identity where the record is what that processing makes of an expert
    (vLLM picks the kernel, and so the layout, by more than _kernel_identity sees)."""
    kernel = getattr(method, "moe_kernel", None)
    name = f"{type(method).__name__}/{type(getattr(kernel, 'fused_experts', kernel)).__name__}"
    marlin_input = os.environ.get("VLLM_MARLIN_INPUT_DTYPE")  # (preprocesses Marlin's
    return f"{name}/{marlin_input}" if marlin_input else name  # records, scales x512)


def _checkpoint_rename(model_config):
    """The model's checkpoint name -> module name (vLLM's `hf_to_vllm_mapper`): a
    vision-language wrapper's experts are `language_model.model.layers.*` where its
    checkpoint says `model.language_model.layers.*` (runtime/checkpoint.py)."""
    from vllm.model_executor.model_loader.utils import get_model_architecture

    mapper = getattr(get_model_architecture(model_config)[0], "hf_to_vllm_mapper", None)
    return mapper.map_name if mapper is not None else None


# speculative methods without a draft's weights on the device (vLLM 0.32)
_NO_DRAFT_WEIGHTS = ("ngram", "ngram_gpu", "suffix", "custom_class", "extract_hidden_states")


def _draft(spec, target: CheckpointExperts, num_layers: int,
           download_dir: str | None) -> model_state.Draft | None:
    """What a speculative draft keeps on the device after the pool is built (its
    MoE layers are not offloaded, see __init__): a draft checkpoint's files (a draft
    model, EAGLE heads, an MTP model of its own), or, for a draft in the target's
    checkpoint `target` (an MTP module; DSpark without a model), its first
    `n_predict` layers' tensors there (layers from `num_layers` on, or `mtp*`
    names; vLLM sets `n_predict` on an MTP's config). None for n-gram and suffix
    proposals, which have no weights (vLLM gives them the target's config)."""
    config = getattr(spec, "draft_model_config", None)
    if config is None or spec.method in _NO_DRAFT_WEIGHTS:
        return None
    path = checkpoint_dir(str(config.model), config.revision, download_dir)
    if Path(path) == target.model_dir and spec.method != "draft_model":  # (loaded again)
        layers = int(getattr(config.hf_config, "n_predict", None) or 1)
        try:
            size = target.mtp_bytes(num_layers, layers)
        except (OSError, ValueError, KeyError, SafetensorError):
            size = 0  # each MTP layer then counts one layer's experts (Draft)
        if not size and spec.method != "mtp":
            logger.warning("expert offload: the %s draft's weights are in the target's "
                           "checkpoint under names not found (no mtp* tensors, no layers "
                           "past %d): not set aside when the pool is sized on a GPU",
                           spec.method, num_layers)
        return model_state.Draft(spec.method, mtp_layers=layers if spec.method == "mtp"
                                 else 0, file_bytes=size)
    size = _draft_files_bytes(Path(path))
    if not size:  # a hub draft, downloaded as it loads: the hub's headers say its size
        size = _hub_safetensors_bytes(str(config.model), config.revision)
    if not size:
        logger.warning("expert offload: the %s draft %s: no safetensors files found here "
                       "or on the hub, so its weights are not set aside when the pool is "
                       "sized on a GPU (they come out of the KV cache); --expert-pool-gib "
                       "sets the pool by hand", spec.method, config.model)
    return model_state.Draft(str(spec.method), file_bytes=size)


def _draft_files_bytes(path: Path) -> int:
    """The bytes of a local checkpoint's safetensors files: those its index names,
    else all (a repository may ship `consolidated.safetensors` beside its shards)."""
    try:
        index = path / "model.safetensors.index.json"
        files = ({path / f for f in json.loads(index.read_text())["weight_map"].values()}
                 if index.exists() else set(path.glob("*.safetensors")))
        return sum(f.stat().st_size for f in files)
    except (OSError, ValueError, KeyError):
        return 0


def _hub_safetensors_bytes(repo: str, revision: str | None) -> int:
    """The bytes of a hub repository's safetensors tensors, from their headers (a few
    KiB each); 0 where it is not a hub id or the hub cannot be reached."""
    try:
        from huggingface_hub import get_safetensors_metadata

        meta = get_safetensors_metadata(repo, revision=revision)
    except Exception:  # not a hub id, offline, no safetensors
        return 0
    return sum(t.data_offsets[1] - t.data_offsets[0]
               for f in meta.files_metadata.values() for t in f.tensors.values())


class OffloadedRoutedExperts(RoutedExperts):
    _quant: QuantizedExperts | None = None  # a quantized checkpoint's method
    _packed_as: str | None = None  # how vLLM packs an expert here (_packing)

    def __init__(self, layer_name, params_dtype, moe_config, quant_config,
                 expert_map_manager, *args, **kwargs):
        vllm_config = get_current_vllm_config()
        cfg = OffloadConfig.resolve(vllm_config.additional_config)
        self._offload_cfg = cfg if cfg.enabled else None
        target = model_state.loaded()
        if (self._offload_cfg is not None and target is not None
                and vllm_config.speculative_config is not None):
            # A draft or MTP model, built after the target model loaded: its experts
            # stay resident (a draft model is small; an MTP module is one layer).
            logger.info("expert offload: %s belongs to the %s draft, built after the "
                        "target model loaded; its experts stay resident", layer_name,
                        vllm_config.speculative_config.method)
            self._offload_cfg = None
        if self._offload_cfg is not None:
            _check_supported(layer_name, moe_config, expert_map_manager)
            _choose_triton(moe_config, quant_config, current_platform.is_cuda())
        super().__init__(layer_name, params_dtype, moe_config, quant_config,
                         expert_map_manager, *args, **kwargs)
        if self._offload_cfg is None:
            return
        device = torch.device(moe_config.device)
        self._model = model_state.get_or_create(
            cfg, dict(_fingerprint(vllm_config), kernel=_kernel_identity(moe_config, device)),
            device)
        self._model.max_step_tokens = (vllm_config.scheduler_config.max_num_batched_tokens
                                       or self._model.max_step_tokens)
        self._model.gpu_memory_utilization = vllm_config.cache_config.gpu_memory_utilization
        if self._model.checkpoint_rename is None:
            self._model.checkpoint_rename = _checkpoint_rename(vllm_config.model_config)
        graphs = vllm_config.compilation_config.cudagraph_mode
        self._model.cuda_graphs = (current_platform.is_cuda_alike() and graphs is not None
                                   and graphs != CUDAGraphMode.NONE)
        if vllm_config.speculative_config is not None and self._model.draft is None:
            text = vllm_config.model_config.hf_text_config
            self._model.draft = _draft(vllm_config.speculative_config,
                                       self._model.checkpoint,
                                       getattr(text, "num_hidden_layers", 0),
                                       vllm_config.load_config.download_dir)
        self._layer = self._model.register_layer(self.global_num_experts, self.top_k,
                                                 layer_name)
        self._check_modular()  # where vLLM knows already: before the checkpoint loads
        # checkpoint expert id -> (its tensors, shards seen): see `_names`
        self._staging: dict[int, tuple[list[torch.Tensor], set]] = {}

    # ---- weights ------------------------------------------------------------------

    def _get_quant_method(self, prefix, quant_config, moe_config):
        qm = super()._get_quant_method(prefix, quant_config, moe_config)
        if getattr(self, "_offload_cfg", None) is None:
            return qm
        qm.process_weights_after_loading = lambda layer: layer.bind_pool()
        if type(qm) is not UnquantizedFusedMoEMethod:
            quant = QuantizedExperts(qm, prefix)  # refuses online quantization first:
            bits = self._offload_cfg.store_bits  # its fix is store_bits < 16
            if bits < 16:
                raise ValueError(
                    f"expert_offload.store_bits={bits} quantizes the experts of a "
                    f"bf16/fp16/fp32 checkpoint, and {prefix} is already quantized "
                    f"({type(qm).__name__}). Set --expert-store-bits 16.")
            self._quant = quant
            qm.create_weights = self._quant.create_empty
            return qm
        create = qm.create_weights

        def create_empty(layer, num_experts, **kw):  # all experts live in the store
            return create(layer=layer, num_experts=0, **kw)

        qm.create_weights = create_empty
        return qm

    def weight_loader(self, param, loaded_weight, weight_name, shard_id, expert_id,
                      return_success=False):
        if self._offload_cfg is None:
            return super().weight_loader(param, loaded_weight, weight_name, shard_id,
                                         expert_id, return_success)
        if self._model.cache is not None:  # the store is sealed and slots hold copies
            raise NotImplementedError(
                f"expert offload: {self.layer_name}: expert weights arrived after the "
                "expert pool was built (reload_weights, a weight transfer, or waking from "
                "sleep level 2): the store and the resident slots would keep the old "
                "ones. Restart the engine with the new weights, or turn expert offload "
                "off to update weights in place.")
        if self._quant is not None:
            done = self._load_quantized(param, loaded_weight, weight_name, shard_id,
                                        expert_id)
            return done if return_success else None
        if "scale" in weight_name or ("bias" in weight_name and not self.moe_config.has_bias):
            raise NotImplementedError(
                f"expert offload: checkpoint tensor {weight_name} (shard {shard_id}) is not "
                f"a plain expert weight, and vLLM built {self.layer_name} unquantized (no "
                "quantization method, or one that leaves its experts unquantized). Check "
                "the checkpoint's quantization_config and --quantization, or turn expert "
                "offload off.")
        if loaded_weight.dim() == 3:  # all experts at once (Llama-4): one by one
            for e in range(loaded_weight.shape[0]):
                self.weight_loader(param, loaded_weight[e], weight_name, shard_id,
                                   expert_id + e)
            return True if return_success else None
        store = self._model.store
        if store is not None and store.reused:
            return True if return_success else None  # the disk store already has it
        tensors, seen = self._stage(expert_id)
        is_bias = weight_name.endswith("_bias") or weight_name.endswith(".bias")
        w13, w2 = tensors[2:] if is_bias else tensors[:2]
        half = w13.shape[0] // 2
        if shard_id == "w1":
            w13[:half].copy_(loaded_weight)
        elif shard_id == "w3":
            w13[half:].copy_(loaded_weight)
        elif shard_id == "w2":
            w2.copy_(loaded_weight)
        elif shard_id in ("gpt_oss_w13", "gpt_oss_w2"):  # gate and up interleaved, [H, *]
            dst = w13 if shard_id == "gpt_oss_w13" else w2
            dst.copy_(loaded_weight if is_bias else loaded_weight.t())
        else:
            raise ValueError(f"expert offload: {self.layer_name}: checkpoint tensor "
                             f"{weight_name} has shard {shard_id!r}, where offload takes "
                             "w1, w2, w3 (gate, down, up) or gpt-oss's gpt_oss_w13 and "
                             "gpt_oss_w2. Turn expert offload off for this model.")
        seen.add(("bias " if is_bias else "") + shard_id)
        if seen in self._complete:
            del self._staging[expert_id]
            if self._model.quantized:  # the store encodes the checkpoint's layout
                self._ensure_store()
                self._model.put_expert(self._layer, expert_id, tensors)
            else:
                packed = tensors if self._packs_as_is() else self._pack(*tensors)
                self._model.ensure_store(_layout_of(packed), packing=self._packing())
                self._model.put_expert(self._layer, expert_id, packed)
        return True if return_success else None

    def _load_quantized(self, param, loaded_weight, weight_name, shard_id,
                        expert_id) -> bool:
        """One checkpoint tensor of a quantized expert -> the expert's one-expert twin,
        loaded by vLLM's own loader; a whole expert -> its record -> the store."""
        store = self._model.store
        if store is not None and store.reused:
            return True  # the disk store already has it
        name = next((n for n, p in self._parameters.items() if p is param), None)
        if name not in self._quant.names:
            raise self._quant.unsupported(
                f"loads checkpoint tensor {weight_name} (shard {shard_id}) into {name}, "
                "not into a per-expert tensor")
        if expert_id not in self._staging:
            self._expected_calls()  # (a checkpoint it cannot read is refused here, by name)
            self._staging[expert_id] = (self._quant.twin(self), set())
        twin, seen = self._staging[expert_id]
        done = super(OffloadedRoutedExperts, twin).weight_loader(
            getattr(twin, name), loaded_weight, weight_name, shard_id, 0, True)
        seen.add((weight_name, shard_id))
        if len(seen) == self._expected_calls():
            del self._staging[expert_id]
            record = self._quant.pack(twin)
            self._model.ensure_store(_layout_of(record), names=self._quant.record,
                                     packing=_kernel_of(twin.quant_method))
            self._model.put_expert(self._layer, expert_id, record)
        return done

    def _expected_calls(self) -> int:
        """How many loader calls make one expert: one per checkpoint tensor of its
        expert 0, two for a fused gate and up tensor (gpt-oss: one per tensor that
        holds the layer's experts)."""
        n = getattr(self, "_calls_per_expert", None)
        if n is None:
            n = self._calls_per_expert = len(self._checkpoint_keys(self._layer))
        return n

    def _checkpoint_keys(self, layer: int) -> list[tuple]:
        """The loader calls that make one expert of `layer` from its checkpoint
        tensors (quantized.py `checkpoint_keys`), less those vLLM drops as it reads
        the checkpoint (its quant config's mapper: GPTQ's `g_idx`, which AutoGPTQ and
        GPTQModel write for every linear; and biases where the method has no bias
        parameter: counted, no expert was ever whole)."""
        prefix = self._model.layer_names[layer]
        names = self._model.checkpoint_tensor_names(layer, 0)
        mapper = getattr(self.quant_config, "get_checkpoint_weight_mapper", None)
        if names and mapper is not None:
            mapper = mapper()
            names = [n for n in names if mapper.map_name(f"{prefix}.0.{n}") is not None]
        if names:  # (a bias the method has no parameter for, vLLM's loader skips)
            return [k for k in checkpoint_keys(prefix, names)
                    if not k[3].endswith(("w13_bias", "w2_bias"))
                    or getattr(self, k[3], None) is not None]
        from vllm.model_executor.models.gpt_oss import GptOssRoutedExperts

        fused = self._model.checkpoint_fused_names(layer)
        if fused and isinstance(self, GptOssRoutedExperts):
            # vLLM's gpt-oss loader streams each row (layer.py `_per_expert_weights`)
            return gpt_oss_checkpoint_keys(prefix, fused)
        raise self._quant.unsupported(
            f"reads experts that the checkpoint holds fused per layer (no tensors "
            f"{prefix}.0.*), which only gpt-oss's loader streams one expert at a time")

    def _rederive_quantized(self, layer: int, expert: int) -> list[torch.Tensor]:
        """A damaged store record of a quantized checkpoint, again from the
        checkpoint, through a twin of this module (any layer: they are alike)."""
        named = self._model.checkpoint_named(layer, expert)
        twin = self._quant.twin(self)
        for name, half, weight_name, param, shard in self._checkpoint_keys(layer):
            tensor = named[name] if half is None else named[name].chunk(2, dim=0)[half]
            super(OffloadedRoutedExperts, twin).weight_loader(
                getattr(twin, param), tensor, weight_name, shard, 0)
        return self._quant.pack(twin)

    def _bind_quantized(self) -> None:
        store = self._model.store
        if store is None:
            raise NotImplementedError(
                f"expert offload: no expert of {self.layer_name} ({self._quant.method}) "
                "came from the checkpoint (load_format=dummy?); a quantized checkpoint's "
                "experts are offloaded from its own weights. Load the checkpoint.")
        cache = self._model.finish_loading(None, self._rederive_quantized)
        self._model.checkpoint_quantization = self._quant.method
        self._quant.bind(self, cache.layer_buffers(self._layer), self._slot_param,
                         getattr(store, "fingerprint", {}).get("record")
                         if store.reused else None)
        self._check_modular()
        self._num_slots = cache.layer_slots(self._layer)

    def _check_modular(self) -> None:
        """forward_modular is the hook. Checked as the layer is built, where vLLM has
        chosen the kernel class by then (unquantized, and quantized methods that pick
        it in their constructor); else at the first expert packed (quantized.py
        pack), and again when the pool is bound."""
        refuse_monolithic(self.layer_name, self.quant_method)

    def _slot_param(self, buf: torch.Tensor) -> torch.nn.Parameter:
        param = torch.nn.Parameter(buf, requires_grad=False)
        set_weight_attrs(param, {"weight_loader": self.weight_loader})
        return param

    def _ensure_store(self, packed: list[torch.Tensor] | None = None) -> None:
        """The store from an empty expert (`packed`: it already packed): its kernel
        layout and its checkpoint layout."""
        if self._model.store is None:
            empty = self._empty_expert()
            packed = packed if packed is not None else self._pack(*empty)
            self._model.ensure_store(_layout_of(packed), _layout_of(empty))

    @property
    def _complete(self) -> list[set[str]]:
        """The shard sets that make a whole expert: w1, w3, w2 (most checkpoints) or
        gate_up and down (gpt-oss), with a bias each where the layer has them."""
        out = []
        for shards in (("w1", "w2", "w3"), ("gpt_oss_w13", "gpt_oss_w2")):
            out.append(set(shards) | ({"bias " + x for x in shards}
                                      if self.moe_config.has_bias else set()))
        return out

    @property
    def _names(self) -> tuple[str, ...]:
        """The layer's per-expert parameters, the order of an expert's tensors."""
        return _NAMES if self.moe_config.has_bias else _NAMES[:2]

    def _checkpoint_shapes(self) -> tuple[tuple[int, ...], ...]:
        """One expert's tensors as the checkpoint holds them: w13 [2I, H], w2 [H, I],
        and where the layer has biases, w13_bias [2I] and w2_bias [H]."""
        inter = (self.moe_config.intermediate_size_per_partition_unpadded
                 or self.intermediate_size_per_partition)
        hidden = self.moe_config.hidden_dim_unpadded or self.hidden_size
        return ((2 * inter, hidden), (hidden, inter), (2 * inter,), (hidden,))[
            :len(self._names)]

    def _empty_expert(self) -> list[torch.Tensor]:
        return [torch.zeros(s, dtype=self.params_dtype) for s in self._checkpoint_shapes()]

    def _stage(self, expert_id: int):
        if expert_id not in self._staging:
            self._staging[expert_id] = (self._empty_expert(), set())
        return self._staging[expert_id]

    def _pack(self, *expert: torch.Tensor) -> list[torch.Tensor]:
        """One expert, checkpoint layout -> kernel layout, via vLLM's own steps."""
        qm = self.quant_method
        if qm.moe_kernel is None:
            qm._init_moe_kernel(self)
        names = self._names
        keep = [getattr(self, n) for n in names]
        device = self.moe_config.device
        w13, w2 = convert_to_unquantized_kernel_format(
            qm.unquantized_backend, moe_config=self.moe_config,
            w13_weight=expert[0].unsqueeze(0).to(device),
            w2_weight=expert[1].unsqueeze(0).to(device), layer=self)
        for name, t in zip(names, (w13, w2, *(b.unsqueeze(0).to(device)
                                               for b in expert[2:]))):
            replace_parameter(self, name, t)
        qm.moe_kernel.fused_experts.process_weights_after_loading(self)
        packed = [getattr(self, n).data[0].cpu() for n in names]
        for name, param in zip(names, keep):
            setattr(self, name, param)
        return packed

    def _dummy_weights(self, layer: int, expert: int) -> list[torch.Tensor]:
        """load_format="dummy": random weights, in vLLM's dummy loader's range."""
        gen = torch.Generator().manual_seed(layer * 100003 + expert)
        return [t.uniform_(-1e-3, 1e-3, generator=gen) for t in self._empty_expert()]

    def _dummy_expert(self, layer: int, expert: int) -> list[torch.Tensor]:
        tensors = self._dummy_weights(layer, expert)
        return tensors if self._model.quantized else self._pack(*tensors)

    def _rederive(self, layer: int, expert: int) -> list[torch.Tensor]:
        """A damaged store record's expert, again from the checkpoint, converted as
        at load time (a quantized store encodes the checkpoint's layout itself)."""
        if self._model.fingerprint["load_format"] == "dummy":
            tensors = self._dummy_weights(layer, expert)
        else:
            tensors = self._model.checkpoint_expert(layer, expert)
        tensors = [t.to(self.params_dtype) for t in tensors]
        return tensors if self._model.quantized else self._pack_copy(tensors)

    def _pack_copy(self, expert: list[torch.Tensor]) -> list[torch.Tensor]:
        """`_pack` on a copy of this module: loader threads may run it while the
        model's forward uses the real one."""
        twin = copy.copy(self)
        twin._parameters = dict(self._parameters)  # replace_parameter stays on the twin
        return OffloadedRoutedExperts._pack(twin, *expert)

    def _packs_as_is(self) -> bool:
        """vLLM's packing leaves an expert as the checkpoint holds it (its Triton
        kernel on CUDA), and then each expert goes to the store without a round trip
        through the device."""
        return self._packing() == "as-is"

    def _packing(self) -> str:
        """How vLLM packs an expert here, part of a disk store's identity (beside
        _kernel_identity): "as-is" where its packing gives a random probe expert back
        equal (a packing that moved, padded or widened its values would not), else a
        digest of that packing. Learnt once per model, whose layers share shapes and
        kernel (a probe is one whole expert: 336 MiB at Mixtral's size)."""
        if self._packed_as is None:
            key = (tuple((tuple(t.shape), t.dtype) for t in self._empty_expert()),
                   type(self.quant_method).__name__)
            if key not in self._model.packings:
                g = torch.Generator().manual_seed(0)
                expert = [torch.randn(t.shape, generator=g).to(t.dtype)
                          for t in self._empty_expert()]
                packed = self._pack(*expert)
                if all(p.shape == t.shape and p.dtype == t.dtype and torch.equal(p, t)
                       for p, t in zip(packed, expert)):
                    self._model.packings[key] = "as-is"
                else:
                    digest = hashlib.sha256()
                    for p in packed:
                        digest.update(f"{list(p.shape)} {p.dtype};".encode())
                        digest.update(p.detach().cpu().contiguous().view(torch.uint8)
                                      .numpy())
                    self._model.packings[key] = digest.hexdigest()[:16]
            self._packed_as = self._model.packings[key]
        return self._packed_as

    def _packer(self):
        """For a quantized store: how a decoded expert reaches the kernel's layout.
        None where vLLM's packing leaves it as it is (GPU kernels); a gather where it
        only moves values (the CPU kernels' prepack: learnt from probe experts whose
        values are digits of each position, base 128, exact in bf16); else vLLM's
        packing itself, at every miss."""
        if self._packs_as_is():  # (the probes below cost seconds at Mixtral's size)
            return None
        expert = self._empty_expert()
        n = max(t.numel() for t in expert)
        index = None
        for k in range(max(1, math.ceil(math.log(n + 1, 128)))):
            probe = [((torch.arange(t.numel()) >> (7 * k)) & 127).add(1).view(t.shape)
                     .to(t.dtype) for t in expert]
            digits = [p.float().long() - 1 for p in self._pack(*probe)]  # -1: padding
            index = digits if index is None else [
                torch.where(d >= 0, i + (d << (7 * k)), -1) for i, d in zip(index, digits)]
        if all(i.shape == t.shape and torch.equal(i.view(-1), torch.arange(t.numel()))
               for i, t in zip(index, expert)):
            return None
        gather = Gather(index)
        g = torch.Generator().manual_seed(0)
        sample = [torch.randn(t.shape, generator=g).to(t.dtype) for t in expert]
        if all(torch.equal(a, b) for a, b in zip(gather(sample), self._pack(*sample))):
            return gather
        return self._pack_copy

    def bind_pool(self) -> None:
        """Called by vLLM after loading: seal the store, point weights at the pool."""
        tuned_configs.install()  # modules vLLM imported since (idempotent)
        store = self._model.store
        if store is not None and store.reused:
            # Shards staged before the first whole expert found the reused store (a
            # fused checkpoint loads shard by shard across experts): not needed.
            self._staging.clear()
        if self._staging:
            first = sorted(self._staging)[0]
            seen = self._staging[first][1]
            whole = max(self._complete, key=lambda shards: len(shards & seen))
            got = (f"{len(seen)} of the {self._expected_calls()} loader calls its "
                   "checkpoint tensors make" if self._quant else
                   f"it got {', '.join(sorted(seen))} of {', '.join(sorted(whole))}")
            raise RuntimeError(
                f"expert offload: {self.layer_name} has incomplete experts "
                f"{sorted(self._staging)[:4]} after loading (expert {first}: {got}). The "
                "checkpoint lacks tensors of these experts (a shard missing or cut "
                "short?): check its files against its index, or turn expert offload off.")
        if self._quant is not None:
            return self._bind_quantized()
        if self.quant_method.moe_kernel is None:
            # No expert of this layer was packed (dummy load, a reused disk store or a
            # quantized store): packing one empty expert sets up the layer's kernel
            # and gives the layout.
            packed = self._pack(*self._empty_expert())
            if self._model.quantized:
                self._ensure_store(packed)
            elif self._model.store is None:
                self._model.ensure_store(_layout_of(packed), packing=self._packing())
        self._check_modular()
        cache = self._model.finish_loading(self._dummy_expert, self._rederive)
        if len(cache.buffers) != len(self._names):
            raise RuntimeError(f"expert offload: {self.layer_name} has per-expert "
                               f"parameters {self._names}, the pool {len(cache.buffers)}")
        if self._model.quantized:  # one packer per expert shape and kernel, shared
            kind = (self._checkpoint_shapes(),
                    type(self.quant_method.moe_kernel.fused_experts).__name__)
            if kind not in self._model.packers:
                packer = self._model.packers[kind] = self._packer()
                logger.info("expert offload: decoded experts reach %s's layout %s", kind[1],
                            "as they are" if packer is None else "by a gather"
                            if isinstance(packer, Gather) else "by vLLM's packing at each miss")
            packer = self._model.packers[kind]
            if packer is not None:  # host-side loads pack; device mode's fill gathers
                self._model.store.packers[self._layer] = packer
                if cache.mode == "device":
                    try:
                        cache.set_packer(packer)
                    except NotImplementedError as e:
                        raise NotImplementedError(
                            f"expert offload: {self.layer_name}: {kind[1]}: {e}. Use "
                            "--expert-store disk (host mode, eager), or drop "
                            "--expert-store-bits.") from None
        for name, buf in zip(self._names, cache.layer_buffers(self._layer)):
            setattr(self, name, self._slot_param(buf))
        if self.moe_config.has_bias:  # the kernel reads biases through its quant config
            for config in {id(c): c for c in (self.quant_method.moe_quant_config,
                                              self.quant_method.moe_kernel.fused_experts
                                              .quant_config)}.values():
                config._w1.bias, config._w2.bias = self.w13_bias, self.w2_bias
        self._num_slots = cache.layer_slots(self._layer)

    # ---- forward ------------------------------------------------------------------

    def forward_modular(self, x, topk_weights, topk_ids, shared_experts=None,
                        shared_experts_input=None):
        if self._offload_cfg is None:
            return super().forward_modular(x, topk_weights, topk_ids, shared_experts,
                                           shared_experts_input)
        skip = topk_ids.is_cuda and envs.VLLM_MOE_SKIP_PADDING
        # the predictors and approximate mode read the routers' input: vLLM pads x to a
        # kernel's width on CUDA (MXFP4 on Marlin: 2880 -> 3072), with zeros on the right
        width = self.moe_config.hidden_dim_unpadded
        hidden = x[..., :width] if width and x.shape[-1] > width else x
        slot_ids = map_to_slots_op(_route_padding(topk_ids, _padding_rows(), skip), hidden,
                                   self._layer)
        with tuned_configs.model_experts(self.global_num_experts):
            out = self.quant_method.moe_kernel.apply(
                hidden_states=x, w1=self.w13_weight, w2=self.w2_weight,
                topk_weights=topk_weights, topk_ids=slot_ids, activation=self.activation,
                apply_router_weight_on_input=self.apply_router_weight_on_input,
                global_num_experts=self._num_slots, expert_map=None,
                shared_experts=shared_experts, shared_experts_input=shared_experts_input)
        # On CUDA this runs inside vLLM's opaque moe_forward op, so a piecewise graph's
        # piece holds whole layer calls; one that forked the copy stream joins it
        # before the piece ends (device_cache.py NOTE #5). False on CPU.
        if self._model.joins_prefetch and in_piecewise_cudagraph():
            self._model.cache.join_prefetch()
        return out


_NAMES = ("w13_weight", "w2_weight", "w13_bias", "w2_bias")


def _padding_rows() -> torch.Tensor | None:
    """[T] bool, the padded rows of this step's batch (vLLM pads a batch to a size
    it captured a CUDA graph for, and fills this buffer in place before each
    replay); None where vLLM does not say."""
    if not is_forward_context_available():
        return None
    return get_forward_context().is_padding


def _route_padding(topk_ids: torch.Tensor, pad: torch.Tensor | None,
                   skip: bool) -> torch.Tensor:
    """The padded rows' picks come from stale inputs, and each would load experts
    over the link (and count them) for an output vLLM throws away. With `skip` (on
    CUDA, VLLM_MOE_SKIP_PADDING: on by default) they get id -1, no expert, as in
    plain vLLM, whose kernels then skip them (its CUDA routers write -1 there
    themselves); the cache loads and counts nothing for them. Else (the CPU kernels
    take no -1) they route as row 0, whose experts the call needs anyway. A device
    op, no host sync: graphs keep it."""
    T = topk_ids.shape[0]
    if pad is None or pad.shape[0] < T:
        return topk_ids
    pad = pad[:T, None]
    if skip:
        return topk_ids.masked_fill(pad, -1)
    return torch.where(pad, topk_ids[:1], topk_ids) if T > 1 else topk_ids


def _choose_triton(moe_config, quant_config, cuda: bool) -> None:
    """An unquantized or `fp8` model on CUDA with --moe-backend auto gets vLLM's
    Triton MoE kernel: its own choice there is FlashInfer's TRT-LLM kernel on
    Blackwell, which is monolithic (offload cannot hook it), or FlashInfer's CUTLASS
    one, which sizes per-expert tensors by the model's expert count where the pool's
    slot ids go past it; for FP8 also CUTLASS's or DeepGEMM's (quantized.py
    SIZED_BY_EXPERTS). On Hopper vLLM picks Triton for bf16 and block FP8 anyway. A
    backend set by hand is kept (and one offload cannot drive refused)."""
    from vllm.platforms import current_platform

    # (Triton's FP8 kernel needs sm89+: on Ampere vLLM's own pick is Marlin's
    # weight-only FP8, which offload drives; forced, the layer failed to build)
    fp8 = (quant_config is not None and quant_config.get_name() == "fp8"
           and current_platform.supports_fp8())
    if cuda and (quant_config is None or fp8) and moe_config.moe_backend == "auto":
        moe_config.moe_backend = "triton"
        logger.info_once("expert offload: vLLM's Triton MoE kernel (--moe-backend triton), "
                         "whose expert calls offload hooks")


def _layout_of(tensors: list[torch.Tensor]) -> ExpertLayout:
    return ExpertLayout(tuple(TensorSpec(tuple(t.shape), t.dtype) for t in tensors))


def capability_problem(moe_config, expert_map_manager=None) -> str | None:
    """What keeps this MoE layer from being offloaded, with the fix; None if nothing.

    The slot pool holds one record per routed expert: gate and up stacked as w13
    (a gated MLP), w2 and their biases if any, the same count in every layer, on one
    device.
    Routing (softmax or sigmoid, grouped top-k, correction bias, custom functions)
    runs before this layer and shared experts beside it, so neither matters here.
    """
    par = moe_config.moe_parallel_config
    if par.tp_size > 1 or par.use_ep or par.dp_size > 1:
        return (f"runs with tp={par.tp_size}, ep={par.use_ep}, dp={par.dp_size}; only a "
                "single device per model is supported yet. Use tensor_parallel_size=1 "
                "without expert or data parallelism, or turn expert offload off.")
    if moe_config.num_experts != moe_config.num_logical_experts:
        return (f"has {moe_config.num_experts - moe_config.num_logical_experts} redundant "
                "(EPLB) experts; drop --enable-eplb or turn expert offload off.")
    if getattr(expert_map_manager, "num_fused_shared_experts", 0):
        return ("fuses its shared experts into the routed ones (ROCm AITER); turn that "
                "fusion off or turn expert offload off.")
    if not moe_config.is_act_and_mul:
        return (f"has non-gated experts (activation {moe_config.activation}); only gated "
                "experts (gate and up projections) are supported yet. Turn expert "
                "offload off.")
    if getattr(moe_config, "is_lora_enabled", False):
        return ("runs LoRA adapters on its experts (--enable-lora), which vLLM indexes by "
                "expert id, where offload hands the kernel slot ids. Drop --enable-lora, "
                "or turn expert offload off.")
    return None


def _check_supported(layer_name, moe_config, expert_map_manager) -> None:
    problem = capability_problem(moe_config, expert_map_manager)
    if problem is not None:
        raise NotImplementedError(f"expert offload: MoE layer {layer_name} {problem}")


def install() -> None:
    """Make vLLM build the offloading twin of every routed-experts class (idempotent):
    RoutedExperts, and gpt-oss's GptOssRoutedExperts, whose fused checkpoint tensors
    are then fed to the loader one expert at a time."""
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.models import gpt_oss

    for base, twin in ((RoutedExperts, OffloadedRoutedExperts),
                       (gpt_oss.GptOssRoutedExperts, _gpt_oss_twin(gpt_oss))):
        name = base.__name__
        if op_registry_oot.get(name) is twin:
            continue
        if name in op_registry_oot:
            raise RuntimeError(
                f"another plugin already replaces {name} with {op_registry_oot[name]}; "
                "expert offload cannot be combined with it")
        base.register_oot(twin)
    model = gpt_oss.GptOssModel
    if not getattr(model.load_weights, "_expert_offload", False):
        model.load_weights = _per_expert_weights(model.load_weights)
    tuned_configs.install()


_GPT_OSS_TWIN = None


def _gpt_oss_twin(gpt_oss):
    """OffloadedRoutedExperts with GptOssRoutedExperts' own loading while offload is off."""
    global _GPT_OSS_TWIN
    if _GPT_OSS_TWIN is None:
        _GPT_OSS_TWIN = type("OffloadedGptOssRoutedExperts",
                             (OffloadedRoutedExperts, gpt_oss.GptOssRoutedExperts), {})
    return _GPT_OSS_TWIN


def _per_expert_weights(load_weights):
    """gpt-oss checkpoints hold each layer's experts as one tensor [E, ...], which
    vLLM copies whole into the layer; offloaded layers hold none. With offload on,
    each such tensor goes in as E per-expert tensors, which vLLM's gpt-oss loader
    already streams through the layer's weight_loader one expert at a time."""
    from vllm.model_executor.models import gpt_oss

    # what vLLM's gpt-oss loader streams one expert at a time (w13_weight, w13_bias,
    # w13_weight_scale, ...: bf16 and MXFP4 checkpoints)
    fused = re.compile(r"^(.*\.mlp\.experts)\.(" + "|".join(
        gpt_oss._GPT_OSS_STREAMED_EXPERT_SUFFIX_TO_SHARD) + ")$")

    def wrapper(self, weights):
        if not any(getattr(m, "_offload_cfg", None) for m in self.modules()):
            return load_weights(self, weights)

        def split():
            for name, tensor in weights:
                m = fused.match(name)
                if m is None:
                    yield name, tensor
                    continue
                for e in range(tensor.shape[0]):
                    yield f"{m[1]}.{e}.{m[2]}", tensor[e]
        return load_weights(self, split())

    wrapper._expert_offload = True
    return wrapper
