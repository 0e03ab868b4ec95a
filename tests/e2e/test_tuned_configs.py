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
