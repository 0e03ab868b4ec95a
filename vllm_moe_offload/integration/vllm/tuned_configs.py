"""vLLM's Triton MoE kernel, told the model's expert count where it decides by it.

vLLM's Triton MoE kernel reads E, the expert count, from the weights' first
dimension. Over the slot pool that is S (or a slot group's S_g), so two of its
choices would differ from plain vLLM's:
- its tile config comes from a file tuned for (E, N, device, dtype); none exists for
  S, so vLLM would fall back to its default config;
- its "naive" assignment (each token and top-k pair its own block, loading its
  expert's whole weight: for T x K x 4 <= E) would run for batches up to S / (4K),
  where plain vLLM groups the tokens of each expert (moe_align_block_size): at
  Mixtral's S = 128, K = 2, a batch of 16 read 32 experts' weights, not at most 8.
The kernel's work is plain vLLM's (the same tokens per expert, the same active
experts; only the weights' addresses differ), so within `model_experts(E)` both
choices read the model's E, and the alignment still runs over the S slots.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

_experts: int | None = None  # the model's E during an offloaded layer's kernel call


def _wrap_config(original):
    def try_get_optimal_moe_config(w1_shape, w2_shape, top_k, dtype, M, block_shape=None):
        if _experts is not None:
            w1_shape = (_experts, *tuple(w1_shape)[1:])
            w2_shape = (_experts, *tuple(w2_shape)[1:])
        return original(w1_shape, w2_shape, top_k, dtype, M, block_shape=block_shape)

    return try_get_optimal_moe_config


def _wrap_assignment(original):
    def _prepare_expert_assignment(topk_ids, config, num_tokens, top_k_num,
                                   global_num_experts, expert_map, **kwargs):
        if (_experts is not None and expert_map is None
                and num_tokens * top_k_num * 4 > _experts):  # plain vLLM aligns here
            from vllm.model_executor.layers.fused_moe import fused_moe

            return fused_moe.moe_align_block_size(
                topk_ids, config["BLOCK_SIZE_M"], global_num_experts, expert_map,
                ignore_invalid_experts=kwargs.get("ignore_invalid_experts", False))
        return original(topk_ids, config, num_tokens, top_k_num, global_num_experts,
                        expert_map, **kwargs)

    return _prepare_expert_assignment


_WRAPPERS = {"try_get_optimal_moe_config": _wrap_config,
             "_prepare_expert_assignment": _wrap_assignment}


def install() -> None:
    """Wrap vLLM's `try_get_optimal_moe_config` and `_prepare_expert_assignment`
    where they are defined and wherever a loaded vLLM module imported them by name.
    Idempotent."""
    from vllm.model_executor.layers.fused_moe import fused_moe

    for name, wrap in _WRAPPERS.items():
        current = getattr(fused_moe, name)
        original = getattr(current, "_moe_offload_original", current)
        wrapped = None
        for module_name, module in list(sys.modules.items()):
            if module_name.startswith("vllm.") and getattr(module, name, None) is original:
                if wrapped is None:
                    wrapped = wrap(original)
                    wrapped._moe_offload_original = original
                setattr(module, name, wrapped)


@contextmanager
def model_experts(num_experts: int):
    """The kernel decides by `num_experts` inside (an offloaded layer's kernel call,
    whose weights hold slots)."""
    global _experts
    old, _experts = _experts, num_experts
    try:
        yield
    finally:
        _experts = old
