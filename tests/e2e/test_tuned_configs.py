"""vLLM's tuned Triton MoE configs are looked up by the model's expert count, not the
pool's (integration/vllm/tuned_configs.py). The Triton kernel does not run on the
CPU; its config lookup does."""

import pytest

pytest.importorskip("vllm")


def test_an_offloaded_layers_kernel_reads_the_config_tuned_for_the_models_experts(
        monkeypatch):
    from vllm.model_executor.layers.fused_moe import fused_moe
    from vllm.model_executor.layers.fused_moe.experts import triton_moe

    from vllm_moe_offload.integration.vllm import tuned_configs

    tuned = {1: {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64,
                 "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 3}}
    seen = []

    def get_moe_configs(E, N, dtype, block_n=0, block_k=0):
        seen.append(E)
        return tuned if E == 128 else None  # a file for Qwen3-30B-A3B's E only

    monkeypatch.setattr(fused_moe, "get_moe_configs", get_moe_configs)
    tuned_configs.install()
    tuned_configs.install()  # idempotent: one wrapper
    lookup = triton_moe.try_get_optimal_moe_config
    assert lookup is fused_moe.try_get_optimal_moe_config
    assert lookup._moe_offload_original is not lookup
    S, N, H = 768, 768, 2048  # a slot group's slots, as w1/w2's first dimension
    w1, w2 = (S, 2 * N, H), (S, H, N)
    assert lookup(w1, w2, 8, None, 1) != tuned[1]  # plain vLLM: no file for E = 768
    with tuned_configs.model_experts(128):
        assert lookup(w1, w2, 8, None, 1) == tuned[1]
    assert seen == [768, 128]
    assert lookup(w1, w2, 8, None, 1) != tuned[1]  # outside a layer call: as vLLM


def test_an_offloaded_layers_kernel_groups_tokens_by_expert_where_plain_vllm_does(
        monkeypatch):
    """vLLM's naive assignment (each token and top-k pair loads its expert's whole
    weight) runs for T x K x 4 <= E. Over S slots it ran up to S / (4K) tokens: at
    Mixtral's E = 8, S = 128, K = 2, a batch of 2 to 16 read one expert per pair,
    where plain vLLM groups the pairs of each expert (moe_align_block_size)."""
    import torch
    from vllm.model_executor.layers.fused_moe import fused_moe
    from vllm.model_executor.layers.fused_moe.experts import triton_moe

    from vllm_moe_offload.integration.vllm import tuned_configs

    aligned = []

    def moe_align_block_size(topk_ids, block_size, num_experts, expert_map,
                             ignore_invalid_experts=False):
        aligned.append((num_experts, ignore_invalid_experts))
        return "sorted", "expert ids", "padded"

    monkeypatch.setattr(fused_moe, "moe_align_block_size", moe_align_block_size)
    tuned_configs.install()
    assign = triton_moe._prepare_expert_assignment
    assert assign is fused_moe._prepare_expert_assignment
    assert assign._moe_offload_original is not assign
    E, S, K, cfg = 8, 128, 2, {"BLOCK_SIZE_M": 16}

    def naive(T, map=None, **kw):
        ids = torch.zeros(T, K, dtype=torch.int32)
        return assign(ids, cfg, T, K, S, map, **kw)[0] is None

    assert [naive(T) for T in (1, 2, 16, 17)] == [True, True, True, False]  # as vLLM
    with tuned_configs.model_experts(E):
        assert [naive(T) for T in (1, 2, 16)] == [True, False, False]  # plain's choice
        assert not naive(4, ignore_invalid_experts=True)
        assert not naive(1, map=torch.arange(S))  # an expert map: vLLM's own choice
    assert aligned[1:] == [(S, False), (S, False), (S, True), (S, False)]  # over the slots
