"""vLLM's tuned Triton MoE configs, looked up by the model's expert count.

vLLM picks a Triton MoE kernel's tile config from a file tuned for (E, N, device,
dtype), with E read from the weights' first dimension. Over the slot pool that is
S (or a slot group's S_g), for which no file exists, so vLLM would fall back to its
default config. The kernel's work is plain vLLM's (the same tokens per expert, the
same active experts; only the weights' addresses differ), so the config tuned for
the model's own E is the right one: within `model_experts(E)`, the lookup reads E.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

_experts: int | None = None  # the model's E during an offloaded layer's kernel call


def _wrap(original):
    def try_get_optimal_moe_config(w1_shape, w2_shape, top_k, dtype, M, block_shape=None):
        if _experts is not None:
            w1_shape = (_experts, *tuple(w1_shape)[1:])
            w2_shape = (_experts, *tuple(w2_shape)[1:])
        return original(w1_shape, w2_shape, top_k, dtype, M, block_shape=block_shape)

    try_get_optimal_moe_config._moe_offload_original = original
    return try_get_optimal_moe_config


def install() -> None:
    """Wrap vLLM's `try_get_optimal_moe_config` where it is defined and wherever a
    loaded vLLM module imported it by name. Idempotent."""
    from vllm.model_executor.layers.fused_moe import fused_moe

    original = getattr(fused_moe.try_get_optimal_moe_config, "_moe_offload_original",
                       fused_moe.try_get_optimal_moe_config)
    wrapped = None
    for name, module in list(sys.modules.items()):
        if name.startswith("vllm.") and getattr(
                module, "try_get_optimal_moe_config", None) is original:
            wrapped = wrapped or _wrap(original)
            module.try_get_optimal_moe_config = wrapped


@contextmanager
def model_experts(num_experts: int):
    """Tuned configs are looked up by `num_experts` inside (an offloaded layer's
    kernel call, whose weights hold slots)."""
    global _experts
    old, _experts = _experts, num_experts
    try:
        yield
    finally:
        _experts = old
