"""A reference for vLLM's CPU INT8 MoE kernel, for hosts without AMX.

vLLM's CPU build runs INT8 W8A8 experts (`CPUExpertsInt8`) only on x86 CPUs with
AMX; elsewhere plain vLLM refuses such a checkpoint. To test the offload of a
quantized checkpoint on any CPU, `install()` (the engine probe's "setup", in the
engine's process) lets `CPUExpertsInt8` run anywhere: its weights stay in the
checkpoint's layout (no VNNI prepack) and `apply` computes the experts in fp32
torch from the int8 weights and their per-channel scales. Plain vLLM and offload
then run the same kernel, so their greedy outputs must match token for token.
"""

import torch


def _apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
           global_num_experts, expert_map, a1q_scale, a2_scale, workspace13, workspace2,
           expert_tokens_meta, apply_router_weight_on_input):
    assert not apply_router_weight_on_input and expert_map is None
    x = hidden_states.float()
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32)
    for e in topk_ids.unique().tolist():
        if not 0 <= e < w1.shape[0]:
            raise IndexError(f"expert id {e} outside the weights' {w1.shape[0]} experts")
        rows, k = (topk_ids == e).nonzero(as_tuple=True)
        gate, up = (x[rows] @ (w1[e].float() * self.w1_scale[e].float()).T).chunk(2, -1)
        y = (torch.nn.functional.silu(gate) * up) @ (w2[e].float()
                                                     * self.w2_scale[e].float()).T
        out.index_add_(0, rows, y * topk_weights[rows, k, None].float())
    output.copy_(out.to(output.dtype))


def install() -> None:
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUExpertsInt8

    CPUExpertsInt8._supports_current_device = staticmethod(lambda: True)
    CPUExpertsInt8.process_weights_after_loading = lambda self, layer: None
    CPUExpertsInt8.apply = _apply
