"""Which MoE layers and models offload can serve (integration/vllm/layer.py
`capability_problem`, plugin.py `check_model`), decided on what vLLM builds, not
on a list of architecture names; unit-tested here for the forms that no tiny
checkpoint runs on vLLM's CPU build."""

from types import SimpleNamespace

import pytest

from vllm_moe_offload.core.config import OffloadConfig
from vllm_moe_offload.integration.vllm.layer import capability_problem
from vllm_moe_offload.integration.vllm.plugin import check_model


def moe_config(**overrides):
    base = dict(moe_parallel_config=SimpleNamespace(tp_size=1, use_ep=False, dp_size=1),
                num_experts=8, num_logical_experts=8, is_act_and_mul=True, has_bias=False,
                activation="silu")
    return SimpleNamespace(**{**base, **overrides})


def test_a_gated_single_device_layer_is_served():
    # grouped or biased routing and shared experts are not the layer's business;
    # biased experts (gpt-oss) are held in the slot record beside the weights
    assert capability_problem(moe_config()) is None
    assert capability_problem(moe_config(has_bias=True, activation="swigluoai")) is None
    assert capability_problem(moe_config(), SimpleNamespace(num_fused_shared_experts=0)) is None


@pytest.mark.parametrize("overrides, names", [
    (dict(moe_parallel_config=SimpleNamespace(tp_size=2, use_ep=False, dp_size=1)),
     ["tp=2", "tensor_parallel_size=1"]),
    (dict(moe_parallel_config=SimpleNamespace(tp_size=1, use_ep=True, dp_size=1)),
     ["ep=True", "single device"]),
    (dict(num_experts=10), ["2 redundant (EPLB) experts", "--enable-eplb"]),
    (dict(is_act_and_mul=False, activation="relu2_no_mul"),
     ["non-gated experts (activation relu2_no_mul)"]),
    (dict(is_lora_enabled=True), ["LoRA adapters", "Drop --enable-lora"]),
])
def test_what_cannot_be_offloaded_is_named_with_the_fix(overrides, names):
    problem = capability_problem(moe_config(**overrides))
    for name in names:
        assert name in problem
    assert "expert offload off" in problem or "--enable-eplb" in problem


def test_fused_shared_experts_are_refused():
    problem = capability_problem(moe_config(), SimpleNamespace(num_fused_shared_experts=1))
    assert "fuses its shared experts" in problem


def model(archs, **text):
    return SimpleNamespace(model="/m", hf_config=SimpleNamespace(architectures=archs),
                           hf_text_config=SimpleNamespace(num_hidden_layers=4, **text))


@pytest.mark.parametrize("archs, text", [
    (["OlmoeForCausalLM"], dict(num_experts=64)),
    (["DeepseekV3ForCausalLM"], dict(n_routed_experts=256)),
    (["Ernie4_5_MoeForCausalLM"], dict(moe_num_experts=64)),
    (["SomeNewMoeForCausalLM"], dict(num_local_experts=16)),  # no list of names
    (["GptOssForCausalLM"], dict(num_local_experts=32)),
    # not runnable by vLLM's CPU build (README's table): checked the same way
    (["MiniMaxM2ForCausalLM"], dict(num_local_experts=256)),
    (["Qwen3_5MoeForConditionalGeneration"], dict(num_experts=256)),
])
def test_any_moe_model_passes_the_model_check(archs, text):
    check_model(model(archs, **text), OffloadConfig(enabled=True))


def test_dense_models_are_refused_by_name():
    with pytest.raises(ValueError, match=r"\(LlamaForCausalLM\) has no routed experts"):
        check_model(model(["LlamaForCausalLM"]), OffloadConfig(enabled=True))


def test_the_early_pool_check_counts_moe_layers_only(monkeypatch):
    """The front end checks a pool before vLLM builds the model, from the HF config:
    it counts the MoE layers the worker will (tests/e2e/test_families.py asserts the
    worker's count on these tiny checkpoints), not dense layers among them."""
    from vllm_moe_offload.hf.tiny_moe import ARCHITECTURES, FIRST_DENSE, _config
    from vllm_moe_offload.integration.vllm.plugin import moe_layer_count

    for arch in ARCHITECTURES[:-1]:  # the last, llama, is dense
        config = _config(arch, vocab_size=64, hidden_size=128, num_layers=4, num_experts=8,
                         top_k=2, expert_ffn=64)
        assert moe_layer_count(getattr(config, "text_config", config)) == \
            4 - (arch in FIRST_DENSE), arch
    conf = lambda **kw: SimpleNamespace(num_hidden_layers=48, **kw)  # noqa: E731
    assert moe_layer_count(conf()) == 48  # Mixtral, OLMoE, gpt-oss: every layer
    assert moe_layer_count(conf(first_k_dense_replace=3)) == 45  # DeepSeek-V3
    assert moe_layer_count(conf(first_k_dense_replace=1, moe_layer_freq=2)) == 23  # 2..46
    assert moe_layer_count(conf(mlp_only_layers=[0, 47], decoder_sparse_step=1)) == 46
    assert moe_layer_count(conf(decoder_sparse_step=2, mlp_only_layers=[])) == 24
    assert moe_layer_count(conf(interleave_moe_layer_step=2)) == 24  # Llama 4 Maverick
    assert moe_layer_count(conf(moe_layer_start_index=1, moe_layer_end_index=46,
                                moe_layer_interval=1)) == 46  # ERNIE 4.5

    # on CUDA: 1000 slots for 3 dense layers and one of 600 experts are capped at 600,
    # as the worker does; counted over 4 layers they would need two groups of 600
    from vllm.platforms import current_platform

    monkeypatch.setattr(type(current_platform), "is_cuda_alike", lambda self: True)
    check_model(model(["DeepseekV3ForCausalLM"], n_routed_experts=600,
                      first_k_dense_replace=3), OffloadConfig(enabled=True, pool_slots=1000))
    with pytest.raises(ValueError, match="pool_slots=1000 is more than 992 slots"):
        check_model(model(["DeepseekV3ForCausalLM"], n_routed_experts=600,
                          first_k_dense_replace=2), OffloadConfig(enabled=True, pool_slots=1000))


def test_cuda_unquantized_and_fp8_models_get_vllms_triton_kernel(monkeypatch):
    """On Blackwell vLLM's own pick is FlashInfer's monolithic TRT-LLM kernel, which
    offload cannot hook, and for FP8 it may pick CUTLASS or DeepGEMM, which size or
    lay out by the model's experts: an unquantized or `fp8` model with --moe-backend
    auto gets Triton on CUDA; other methods (Marlin there), a backend set by hand
    (refused as the kernel is known if offload cannot drive it), or the CPU keep
    theirs."""
    from types import SimpleNamespace

    from vllm.platforms import current_platform

    from vllm_moe_offload.integration.vllm.layer import _choose_triton

    def method(name):
        return SimpleNamespace(get_name=lambda: name)

    monkeypatch.setattr(current_platform, "supports_fp8", lambda: True)  # sm89+

    for quant, backend, cuda, want in ((None, "auto", True, "triton"),
                                       (method("fp8"), "auto", True, "triton"),
                                       (method("compressed-tensors"), "auto", True, "auto"),
                                       (method("gptq_marlin"), "auto", True, "auto"),
                                       (None, "flashinfer_trtllm", True, "flashinfer_trtllm"),
                                       (method("fp8"), "deep_gemm", True, "deep_gemm"),
                                       (None, "auto", False, "auto"),
                                       (method("fp8"), "auto", False, "auto")):
        moe = SimpleNamespace(moe_backend=backend)
        _choose_triton(moe, quant, cuda)
        assert moe.moe_backend == want
    # Ampere: Triton's FP8 kernel needs sm89; forced, the layer failed to build where
    # vLLM's own pick (Marlin's weight-only FP8) serves it
    monkeypatch.setattr(current_platform, "supports_fp8", lambda: False)
    moe = SimpleNamespace(moe_backend="auto")
    _choose_triton(moe, method("fp8"), True)
    assert moe.moe_backend == "auto"


def test_a_hub_model_id_reads_its_snapshot_in_the_cache(tmp_path):
    """`vllm serve Org/Model`: vLLM keeps the id as the model; the checkpoint's own
    readers (store repair, router weights, quantized loading) need the snapshot it
    downloaded, named by its commit."""
    from vllm_moe_offload.integration.vllm.layer import checkpoint_dir

    repo = tmp_path / "models--org--tiny-moe"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abc")
    (repo / "snapshots" / "0123abc").mkdir(parents=True)
    (repo / "snapshots" / "0123abc" / "config.json").write_text("{}")
    got = checkpoint_dir("org/tiny-moe", None, str(tmp_path))
    assert got == str(repo / "snapshots" / "0123abc")
    assert checkpoint_dir(str(tmp_path), None, None) == str(tmp_path)  # a directory
    assert checkpoint_dir("org/not-cached", None, str(tmp_path)) == "org/not-cached"


def test_padded_rows_of_a_graphs_batch_route_to_no_expert():
    """vLLM pads a batch to a captured size; the padded rows' picks would load
    experts for outputs it throws away (layer.py _route_padding). On CUDA they get
    -1, as vLLM's own routers give them (VLLM_MOE_SKIP_PADDING), which its kernels
    and the cache skip; on the CPU, whose kernels take no -1, row 0's experts."""
    import torch

    from vllm_moe_offload.integration.vllm.layer import _route_padding

    ids = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 0]], dtype=torch.int32)
    pad = torch.tensor([False, False, True, True])
    got = _route_padding(ids, pad, skip=True)
    assert got.tolist() == [[1, 2], [3, 4], [-1, -1], [-1, -1]] and got.dtype == ids.dtype
    got = _route_padding(ids, pad, skip=False)
    assert got.tolist() == [[1, 2], [3, 4], [1, 2], [1, 2]] and got.dtype == ids.dtype
    assert _route_padding(ids, None, skip=True) is ids
    assert _route_padding(ids, pad[:3], skip=True) is ids  # not this call's rows
    # a buffer longer than the call (vLLM slices it the same way)
    longer = torch.tensor([False, True, False, False, True])
    assert _route_padding(ids, longer, skip=True).tolist() == [[1, 2], [-1, -1], [5, 6],
                                                               [7, 0]]


@pytest.mark.parametrize("pack,as_is", [
    (lambda *e: [t.clone() for t in e], True),  # vLLM's Triton kernel on CUDA
    (lambda *e: [t.t().contiguous() for t in e], False),  # a prepack that moves values
    (lambda *e: [t.float() for t in e], False),  # one that widens them
    (lambda *e: [t.flip(0) for t in e], False)])  # one that moves rows, same shape
def test_experts_skip_the_device_where_vllms_packing_leaves_them_as_they_are(pack, as_is):
    """layer.py _packs_as_is: learnt from one random expert per model (the layers
    share shapes and kernel); where it holds, an expert goes to the store as loaded,
    no round trip through the GPU."""
    import types

    import torch

    from vllm_moe_offload.integration.vllm.layer import OffloadedRoutedExperts

    model = types.SimpleNamespace(packings={})
    calls = []
    for _ in range(2):  # two layers of one model
        layer = OffloadedRoutedExperts.__new__(OffloadedRoutedExperts)
        object.__setattr__(layer, "quant_method", object())
        layer._model = model
        layer._empty_expert = lambda: [torch.zeros(6, 4, dtype=torch.bfloat16),
                                       torch.zeros(4, 3, dtype=torch.bfloat16)]
        layer._pack = lambda *e: calls.append(1) or pack(*e)
        assert layer._packs_as_is() is as_is
    assert len(calls) == 1  # probed once
