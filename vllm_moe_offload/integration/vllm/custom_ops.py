"""`vllm_moe_offload::map_to_slots`: the router-id -> slot-id remap as an opaque op.

vLLM compiles the model with torch.compile; on CPU the MoE layer's Python is
traced. Loading misses is data-dependent host work, so it lives behind this
custom op: the compiled graph calls it, and only its output shape is traced.
"""

from __future__ import annotations

import torch

from vllm_moe_offload.integration.vllm import model_state


@torch.library.custom_op("vllm_moe_offload::map_to_slots", mutates_args=())
def map_to_slots_op(topk_ids: torch.Tensor, hidden: torch.Tensor, layer: int) -> torch.Tensor:
    """[T, K] expert ids of MoE layer `layer` -> [T, K] slot ids.

    Loads misses; with a predictor, `hidden` [T, H] (the experts' input) drives the
    prefetch of the next layers' experts.
    """
    return model_state.current().map_to_slots(layer, topk_ids, hidden)


@map_to_slots_op.register_fake
def _(topk_ids: torch.Tensor, hidden: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(topk_ids)
