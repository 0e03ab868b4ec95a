"""The slot record of a quantized checkpoint's experts (integration/vllm/quantized.py),
driven by a stand-in with the shape of a vLLM MoE quantization method: per-expert
parameters from `create_weights`, a `process_weights_after_loading` that aliases
them (as AWQ does) and builds a kernel whose quant config reads the scales. Through
vLLM, with its own methods: tests/e2e/test_quantized_checkpoint.py."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from vllm_moe_offload.integration.vllm.quantized import (WHAT_WORKS, QuantizedExperts,
                                                         checkpoint_keys,
                                                         gpt_oss_checkpoint_keys)

H, I = 8, 4


@dataclasses.dataclass
class Desc:  # vLLM's FusedMoEQuantDesc, the fields that hold tensors
    scale: torch.Tensor | None = None
    zp: torch.Tensor | None = None
    bias: torch.Tensor | None = None


@dataclasses.dataclass
class Config:  # vLLM's FusedMoEQuantConfig
    _a1: Desc
    _a2: Desc
    _w1: Desc
    _w2: Desc


class Method:
    def __init__(self, after=None):
        self.after = after  # processing also does this (a refused layout)

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition,
                       params_dtype, **attrs):
        e, h, i = num_experts, hidden_size, intermediate_size_per_partition
        for name, shape, dtype in (("w13_qweight", (e, 2 * i, h), torch.int8),
                                   ("w2_qweight", (e, h, i), torch.int8),
                                   ("w13_scale", (e, 2 * i, 1), torch.float32),
                                   ("w2_scale", (e, h, 1), params_dtype)):
            layer.register_parameter(name, torch.nn.Parameter(
                torch.zeros(shape, dtype=dtype), requires_grad=False))

    def process_weights_after_loading(self, layer):
        layer.w13_weight, layer.w2_weight = layer.w13_qweight, layer.w2_qweight
        self.moe_quant_config = Config(Desc(), Desc(), Desc(scale=layer.w13_scale),
                                       Desc(scale=layer.w2_scale))
        self.moe_kernel = SimpleNamespace(
            fused_experts=SimpleNamespace(quant_config=self.moe_quant_config))
        if self.after:
            self.after(layer)


def layer_with(method):
    layer = torch.nn.Module()
    layer.moe_config = SimpleNamespace(device="cpu")
    layer.layer_name = "model.layers.0.mlp.experts"
    layer.quant_method = method
    quant = QuantizedExperts(method, layer.layer_name)
    quant.create_empty(layer, num_experts=8, hidden_size=H,
                       intermediate_size_per_partition=I, params_dtype=torch.bfloat16)
    return layer, quant


def loaded_twin(layer, quant, seed):
    twin = quant.twin(layer)
    g = torch.Generator().manual_seed(seed)
    for p in twin._parameters.values():
        p.data.copy_(torch.randint(-100, 100, p.shape, generator=g).to(p.dtype))
    return twin


def empty_slots(layer, quant, num_slots=5):
    """A pool's slot buffers for the record, as the store lays them out."""
    return [torch.zeros((num_slots, *t.shape[1:]), dtype=t.dtype) for t in
            (getattr(quant.twin(layer), n) for n in quant.record)]


def test_record_is_the_processed_expert_widest_dtype_first_aliases_apart():
    layer, quant = layer_with(Method())
    assert quant.names == ["w13_qweight", "w2_qweight", "w13_scale", "w2_scale"]
    assert layer.w13_qweight.shape == (0, 2 * I, H)  # the layer holds no expert
    twin = loaded_twin(layer, quant, 0)
    want = {n: p.data[0].clone() for n, p in twin._parameters.items()}
    record = quant.pack(twin)
    assert quant.record == ["w13_scale", "w2_scale", "w13_qweight", "w2_qweight"]
    assert quant.aliases == {"w13_weight": "w13_qweight", "w2_weight": "w2_qweight"}
    assert all(torch.equal(t, want[n]) for n, t in zip(quant.record, record))
    assert layer.quant_method.__dict__.get("moe_kernel") is None  # the twin's own copy


def test_record_order_does_not_follow_registration_order():
    def re_register(layer):  # as vLLM's replace_parameter does: moved to the end
        weight = layer._parameters.pop("w13_qweight")
        layer.register_parameter("w13_qweight", weight)

    layer, quant = layer_with(Method())
    quant.pack(loaded_twin(layer, quant, 0))
    _, again = layer_with(Method(re_register))
    again.pack(loaded_twin(layer, again, 1))
    assert again.record == quant.record


def test_a_twin_made_later_has_the_dtypes_made_while_loading():
    class DefaultDtype(Method):  # compressed-tensors' weight_shape: torch.empty(E, 2)
        def create_weights(self, layer, num_experts, **kw):
            super().create_weights(layer, num_experts, **kw)
            shape = torch.nn.Parameter(torch.empty(num_experts, 2), requires_grad=False)
            shape.loader_attribute = "kept"
            layer.register_parameter("w2_weight_shape", shape)

    torch.set_default_dtype(torch.bfloat16)  # as while vLLM loads the model
    try:
        layer, quant = layer_with(DefaultDtype())
    finally:
        torch.set_default_dtype(torch.float32)
    twin = quant.twin(layer)  # a store repair, in a loader thread
    assert twin.w2_weight_shape.dtype == torch.bfloat16
    assert twin.w2_weight_shape.loader_attribute == "kept"


def test_each_twin_is_processed_by_the_method_that_created_its_weights():
    class Counting(Method):  # gpt-oss MXFP4 keeps the expert count it was created for
        def create_weights(self, layer, num_experts, **kw):
            self.num_experts = num_experts
            super().create_weights(layer, num_experts, **kw)

        def process_weights_after_loading(self, layer):
            assert layer.w13_qweight.shape[0] == self.num_experts, "a stale count"
            super().process_weights_after_loading(layer)

    layer, quant = layer_with(Counting())
    for seed in range(2):  # the second twin's copy is taken after the first's create
        quant.pack(loaded_twin(layer, quant, seed))
    assert layer.quant_method.num_experts == 0  # the layer's own: it holds none
    slots = empty_slots(layer, quant)
    quant.bind(layer, slots, lambda buf: torch.nn.Parameter(buf, requires_grad=False))


def test_bind_points_parameters_aliases_and_the_kernels_scales_at_the_slots():
    layer, quant = layer_with(Method())
    quant.pack(loaded_twin(layer, quant, 0))
    slots = empty_slots(layer, quant)
    quant.bind(layer, slots, lambda buf: torch.nn.Parameter(buf, requires_grad=False))
    for name, buf in zip(quant.record, slots):
        assert getattr(layer, name).data_ptr() == buf.data_ptr()
    assert layer.w13_weight is layer.w13_qweight and layer.w2_weight is layer.w2_qweight
    config = layer.quant_method.moe_quant_config
    assert config._w1.scale is slots[0] and config._w2.scale is slots[1]
    assert layer.quant_method.moe_kernel.fused_experts.quant_config is config


def test_a_pool_of_another_layout_is_refused():
    layer, quant = layer_with(Method())
    slots = [torch.zeros(5, 3)] * 4
    with pytest.raises(RuntimeError, match="has per-expert tensors"):
        quant.bind(layer, slots, torch.nn.Parameter)


def per_layer_scale(layer):
    layer.w13_input_scale = torch.nn.Parameter(layer.w13_scale.max(), requires_grad=False)


def plain_tensor(layer):
    layer.w13_sort_indices = torch.zeros(1, 2 * I, dtype=torch.int32)


@pytest.mark.parametrize("after, what", [
    (per_layer_scale, "keeps w13_input_scale () for the whole layer after processing"),
    (plain_tensor, "keeps ['w13_sort_indices'] outside the layer's parameters")])
def test_tensors_that_cannot_be_stored_per_expert_are_refused(after, what):
    layer, quant = layer_with(Method(after))
    with pytest.raises(NotImplementedError) as err:
        quant.pack(loaded_twin(layer, quant, 0))
    message = str(err.value)
    assert message.startswith(f"expert offload: Method {what}") and message.endswith(WHAT_WORKS)


def test_state_the_method_keeps_beside_its_quant_config_is_refused():
    """gpt-oss MXFP4 on Triton moves its scales, swizzled, into precision configs on
    the method: the kernel would read the zeroed twin's, not the slots'."""
    class Swizzling(Method):
        def process_weights_after_loading(self, layer):
            super().process_weights_after_loading(layer)
            self.w13_precision_config = SimpleNamespace(scale=layer.w13_scale * 2)
            self.num_experts = layer.w13_qweight.shape[0]  # plain numbers are fine

    layer, quant = layer_with(Swizzling())
    with pytest.raises(NotImplementedError, match=r"Swizzling keeps \['w13_precision_config'"
                                                  r"\] beside its kernel and quant config"):
        quant.pack(loaded_twin(layer, quant, 0))  # at the first expert loaded


def test_a_monolithic_kernel_chosen_in_processing_is_refused_at_the_first_expert():
    """Some methods pick their kernel as they process the weights: it is known at the
    first expert packed, and refused there, not after the whole checkpoint loaded."""
    class Monolithic:
        @staticmethod
        def is_monolithic():
            return True

    class PicksAMonolithicKernel(Method):
        @property
        def is_monolithic(self):  # vLLM's FusedMoEMethodBase.is_monolithic
            return self.__dict__.get("moe_kernel") is not None

        def process_weights_after_loading(self, layer):
            super().process_weights_after_loading(layer)
            self.moe_kernel = Monolithic

    layer, quant = layer_with(PicksAMonolithicKernel())
    with pytest.raises(NotImplementedError, match=r"expert offload: MoE layer model.layers.0"
                                                  r".mlp.experts: vLLM chose the monolithic "
                                                  r"MoE kernel Monolithic.*--moe-backend"):
        quant.pack(loaded_twin(layer, quant, 0))
    layer, quant = layer_with(Method())  # a modular kernel packs
    quant.pack(loaded_twin(layer, quant, 0))


def test_kernels_sized_by_the_models_experts_are_refused_at_the_first_expert():
    """CUTLASS FP8 sizes its permute scratch by the model's expert count, where
    offload hands the kernel the pool's slot count (an assertion at vLLM's first
    forward on CUDA); DeepGEMM lays scales out for TMA; the Triton-or-X fallbacks
    pick one of them at run time. Refused, with the backend that works."""
    class CutlassExpertsFp8Base:  # the names vLLM 0.32 gives them
        pass

    class CutlassExpertsFp8(CutlassExpertsFp8Base):
        pass

    class PicksCutlass(Method):
        def process_weights_after_loading(self, layer):
            super().process_weights_after_loading(layer)
            self.moe_kernel = SimpleNamespace(fused_experts=CutlassExpertsFp8())

    layer, quant = layer_with(PicksCutlass())
    with pytest.raises(NotImplementedError, match=r"model.layers.0.mlp.experts: vLLM chose "
                                                  r"the MoE kernel CutlassExpertsFp8, which "
                                                  r"sizes .*Add --moe-backend triton"):
        quant.pack(loaded_twin(layer, quant, 0))


def test_the_twin_is_one_experts_layer():
    """Processing that loops over the layer's experts (vLLM's FP8 per-tensor MoE
    requantizes each with the max of its w1 and w3 scales) sees the twin's one."""
    class PerExpertLoop(Method):
        def process_weights_after_loading(self, layer):
            for e in range(layer.local_num_experts):
                layer.w13_scale[e] *= 2
            super().process_weights_after_loading(layer)

    layer, quant = layer_with(PerExpertLoop())
    layer.local_num_experts = 8  # the model's, as vLLM's layer holds it
    twin = loaded_twin(layer, quant, 0)
    scale = twin.w13_scale.data[0].clone()
    record = quant.pack(twin)
    assert torch.equal(record[quant.record.index("w13_scale")], scale * 2)
    assert layer.local_num_experts == 8


def test_per_layer_parameters_and_online_quantization_are_refused():
    class PerLayer(Method):
        def create_weights(self, layer, num_experts, **kw):
            super().create_weights(layer, num_experts, **kw)
            layer.register_parameter("global_scale", torch.nn.Parameter(torch.ones(2)))

    with pytest.raises(NotImplementedError, match=r"PerLayer has per-layer parameters "
                                                  r"\['global_scale'\], not one per expert"):
        layer_with(PerLayer())

    class CompressedTensorsW4A4Nvfp4MoEMethod(Method):
        pass

    with pytest.raises(NotImplementedError, match=r"Nvfp4MoEMethod scales its experts' FP4 "
                                                  r"blocks by factors .* all of a layer's"):
        layer_with(CompressedTensorsW4A4Nvfp4MoEMethod())

    class Online(Method):
        uses_meta_device = True

    with pytest.raises(NotImplementedError, match=r"model.layers.0.mlp.experts: Online "
                                                  r"quantizes a bf16 checkpoint's experts .*"
                                                  r"--expert-store-bits 8"):
        layer_with(Online())


def test_checkpoint_names_map_to_vllms_loader_calls():
    p = "model.layers.2.mlp.experts"
    assert checkpoint_keys(p, ["down_proj.weight", "gate_proj.weight_scale",
                               "up_proj.qzeros", "w1.weight_packed", "w2.weight_shape",
                               "gate_up_proj.weight"]) == [
        ("down_proj.weight", None, f"{p}.w2_weight", "w2_weight", "w2"),
        ("gate_proj.weight_scale", None, f"{p}.w13_weight_scale", "w13_weight_scale", "w1"),
        ("up_proj.qzeros", None, f"{p}.w13_qzeros", "w13_qzeros", "w3"),
        ("w1.weight_packed", None, f"{p}.w13_weight_packed", "w13_weight_packed", "w1"),
        ("w2.weight_shape", None, f"{p}.w2_weight_shape", "w2_weight_shape", "w2"),
        ("gate_up_proj.weight", 0, f"{p}.w13_weight", "w13_weight", "w1"),
        ("gate_up_proj.weight", 1, f"{p}.w13_weight", "w13_weight", "w3")]
    with pytest.raises(NotImplementedError, match=r"experts.\*.router.weight is not a gate"):
        checkpoint_keys(p, ["router.weight"])


def test_gpt_oss_fused_names_map_to_its_streamed_loader_calls():
    p = "model.layers.1.mlp.experts"
    assert gpt_oss_checkpoint_keys(p, ["down_proj_bias", "down_proj_blocks",
                                       "down_proj_scales", "gate_up_proj_bias",
                                       "gate_up_proj_blocks", "gate_up_proj_scales"]) == [
        ("down_proj_bias", None, f"{p}.w2_bias", "w2_bias", "gpt_oss_w2"),
        ("down_proj_blocks", None, f"{p}.w2_weight", "w2_weight", "gpt_oss_w2"),
        ("down_proj_scales", None, f"{p}.w2_weight_scale", "w2_weight_scale", "gpt_oss_w2"),
        ("gate_up_proj_bias", None, f"{p}.w13_bias", "w13_bias", "gpt_oss_w13"),
        ("gate_up_proj_blocks", None, f"{p}.w13_weight", "w13_weight", "gpt_oss_w13"),
        ("gate_up_proj_scales", None, f"{p}.w13_weight_scale", "w13_weight_scale",
         "gpt_oss_w13")]
    with pytest.raises(NotImplementedError, match=r"experts.router_logits is not an expert"):
        gpt_oss_checkpoint_keys(p, ["router_logits"])


def test_a_processed_layout_with_strides_of_its_own_is_named_in_a_warning(caplog):
    """DeepGEMM lays block-FP8 scales out MN-major; records and slots are row-major,
    unchecked on a GPU: the log names the tensor and its strides."""
    def mn_major(layer):
        w = layer.w2_qweight
        w.data = w.data.transpose(1, 2).contiguous().transpose(1, 2)

    layer, quant = layer_with(Method(mn_major))
    with caplog.at_level("WARNING", logger="vllm.moe_offload"):
        quant.pack(loaded_twin(layer, quant, 0))
    assert "w2_qweight (32, 1, 8)" in caplog.text and "row-major" in caplog.text


def test_a_kernel_that_keeps_copies_of_the_experts_tensors_is_refused():
    """vLLM's ZenCPUExpertsInt8 (compressed-tensors W8A8 on a Zen CPU with zentorch)
    copies the scales into fp32 tensors of its own and reads only those: after bind
    it read the zeroed one-expert twin's scales, whatever the slots held."""
    class Copying(Method):
        def process_weights_after_loading(self, layer):
            super().process_weights_after_loading(layer)
            self.moe_kernel.fused_experts._w1_scale_f32 = layer.w13_scale.float().clone()

    layer, quant = layer_with(Copying())
    with pytest.raises(NotImplementedError, match=r"its kernel SimpleNamespace keeps "
                                                  r"copies \['_w1_scale_f32'\]"):
        quant.pack(loaded_twin(layer, quant, 0))


def test_a_method_with_a_loader_of_its_own_is_refused():
    """vLLM's MoeWNA16 method (a GPTQ/AWQ fallback where Marlin cannot take the
    layer) wraps the expert loader: it drops a symmetric checkpoint's qzeros and
    writes into the layer's own (empty) parameters, which the per-expert load and a
    store repair bypass."""
    class OwnLoader(Method):
        def create_weights(self, layer, num_experts, **kw):
            super().create_weights(layer, num_experts, **kw)
            layer.w2_scale.weight_loader = lambda *a: None

    layer = torch.nn.Module()
    layer.weight_loader = lambda *a: None
    layer.moe_config = SimpleNamespace(device="cpu")
    method = OwnLoader()
    quant = QuantizedExperts(method, "model.layers.0.mlp.experts")
    with pytest.raises(NotImplementedError, match=r"loads \['w2_scale'\] through a loader "
                                                  "of its own"):
        quant.create_empty(layer, num_experts=8, hidden_size=H,
                           intermediate_size_per_partition=I, params_dtype=torch.bfloat16)


def test_the_marlin_input_dtype_is_part_of_a_quantized_stores_identity(monkeypatch):
    """VLLM_MARLIN_INPUT_DTYPE=fp8 preprocesses Marlin's records (scales x 512) with
    the same shapes, names and kernel class: a store built without it was reused."""
    from vllm_moe_offload.integration.vllm.layer import _kernel_of

    method = SimpleNamespace(moe_kernel=SimpleNamespace(fused_experts=Method()))
    monkeypatch.delenv("VLLM_MARLIN_INPUT_DTYPE", raising=False)
    plain = _kernel_of(method)
    monkeypatch.setenv("VLLM_MARLIN_INPUT_DTYPE", "fp8")
    assert _kernel_of(method) != plain and _kernel_of(method).endswith("/fp8")


def test_a_config_tensor_computed_from_the_experts_is_refused():
    """vLLM's NVFP4 emulation sets the activation scale to 1 / max over all experts'
    input scales: a new tensor, in no slot. Computed on the zeroed twin at bind, it
    was kept (an activation scale of 0 for every slot). A twin of other values
    computes another one: refused, named."""
    class Derived(Method):
        def process_weights_after_loading(self, layer):
            super().process_weights_after_loading(layer)
            self.moe_quant_config._a1.scale = layer.w13_scale.amax().reshape(1)

    layer, quant = layer_with(Derived())
    quant.pack(loaded_twin(layer, quant, 1))
    with pytest.raises(NotImplementedError, match=r"Derived computes its kernel's _a1\.scale "
                                                  r"\(1,\) from the expert's tensors"):
        quant.bind(layer, empty_slots(layer, quant), lambda b: torch.nn.Parameter(b, False))

    class SharedDescriptors(Method):  # the kernel's config: a copy sharing them
        def process_weights_after_loading(self, layer):
            super().process_weights_after_loading(layer)
            kernel_config = dataclasses.replace(self.moe_quant_config)
            self.moe_kernel.fused_experts.quant_config = kernel_config

    layer, quant = layer_with(SharedDescriptors())
    quant.pack(loaded_twin(layer, quant, 1))
    slots = empty_slots(layer, quant)
    quant.bind(layer, slots, lambda b: torch.nn.Parameter(b, False))
    assert layer.quant_method.moe_quant_config._w1.scale is slots[0]

    class Constant(Method):  # a tensor of its own, not of the expert's: kept
        def process_weights_after_loading(self, layer):
            super().process_weights_after_loading(layer)
            self.moe_quant_config._a1.scale = torch.ones(1)

    layer, quant = layer_with(Constant())
    quant.pack(loaded_twin(layer, quant, 1))
    quant.bind(layer, empty_slots(layer, quant), lambda b: torch.nn.Parameter(b, False))
    assert torch.equal(layer.quant_method.moe_quant_config._a1.scale, torch.ones(1))


def test_checkpoint_biases_the_method_has_no_parameter_for_are_not_waited_for():
    """vLLM's loader skips `w13_bias`/`w2_bias` where the method made no such
    parameter (all but AutoGPTQ's): counted, no expert was ever whole, and a
    checkpoint plain vLLM serves was refused as 'no expert came from the checkpoint'."""
    from vllm_moe_offload.integration.vllm.layer import OffloadedRoutedExperts

    prefix = "model.layers.0.mlp.experts"
    names = ["down_proj.bias", "down_proj.weight", "down_proj.weight_scale",
             "gate_proj.weight", "gate_proj.weight_scale", "up_proj.weight",
             "up_proj.weight_scale"]
    model = SimpleNamespace(layer_names=[prefix],
                            checkpoint_tensor_names=lambda layer, e: names)
    layer = SimpleNamespace(_model=model, quant_config=None, w2_bias=None)
    keys = OffloadedRoutedExperts._checkpoint_keys(layer, 0)
    assert [k[3] for k in keys] == ["w2_weight", "w2_weight_scale", "w13_weight",
                                    "w13_weight_scale", "w13_weight", "w13_weight_scale"]
    layer.w2_bias = torch.nn.Parameter(torch.zeros(0, 4), requires_grad=False)  # AutoGPTQ's
    assert "w2_bias" in [k[3] for k in OffloadedRoutedExperts._checkpoint_keys(layer, 0)]
