"""Slot records of GPU-only quantized MoE methods, checked on CPU.

vLLM runs these methods' MoE kernels only on GPUs (FP8 block and per-tensor,
compressed-tensors W8A8 FP8 per channel, W8A16 and W4A16 with zero points,
AutoGPTQ and AutoAWQ 4-bit through Marlin), and
the GPU machines have no vLLM. Here each method's own `create_weights` and vLLM's
own expert weight loader run on CPU, as offload drives them
(integration/vllm/quantized.py): the layer is created with no expert, each
checkpoint tensor of one expert goes into a one-expert twin, under the name that
a store repair maps it to. The twin must then hold exactly what plain vLLM's
loader writes into that expert's row of a whole layer. What these methods'
`process_weights_after_loading` (Marlin repacking, FP8 scale handling) makes of
the twin needs CUDA and has not run.

The methods are built without their constructors, which look for a GPU kernel;
the attributes set here are the ones their `create_weights` reads.
"""

from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch

from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm_moe_offload.integration.vllm.quantized import QuantizedExperts, checkpoint_keys

H, I, E = 256, 128, 3
PREFIX = "model.layers.0.mlp.experts"


def method(cls, **attrs):
    qm = cls.__new__(cls)
    qm.moe = SimpleNamespace(w13_num_shards=2, has_bias=False, is_act_and_mul=True)
    qm.__dict__.update(attrs)
    return qm


def fp8_block():
    from vllm.model_executor.layers.quantization.fp8 import Fp8MoEMethod
    return method(Fp8MoEMethod, block_quant=True, weight_block_size=[128, 128],
                  moe_block_shape=[128, 128], weight_scale_refine=None,
                  weight_scale_name="weight_scale_inv",
                  quant_config=SimpleNamespace(activation_scheme="dynamic"))


def fp8_tensor():
    from vllm.model_executor.layers.quantization.fp8 import Fp8MoEMethod
    return method(Fp8MoEMethod, block_quant=False, weight_block_size=None,
                  moe_block_shape=None, weight_scale_refine=None,
                  weight_scale_name="weight_scale",
                  quant_config=SimpleNamespace(activation_scheme="dynamic"))


def ct_fp8_channel():
    from compressed_tensors.quantization import QuantizationArgs

    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe.\
        compressed_tensors_moe_w8a8_fp8 import CompressedTensorsW8A8Fp8MoEMethod
    weights = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True)
    return method(CompressedTensorsW8A8Fp8MoEMethod, weight_quant=weights,
                  block_quant=False, weight_block_size=None, static_input_scales=False)


def ct_wna16(bits, symmetric):
    """compressed-tensors pack-quantized, groups of 64: W8A16 (vLLM's CPU build runs
    4-bit WNA16 only) and W4A16 with zero points (asymmetric), Marlin's on GPUs."""
    from compressed_tensors.quantization import QuantizationArgs

    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe.\
        compressed_tensors_moe_wna16 import CompressedTensorsWNA16MoEMethod
    weights = QuantizationArgs(num_bits=bits, type="int", strategy="group", group_size=64,
                               symmetric=symmetric)
    return method(CompressedTensorsWNA16MoEMethod, weight_quant=weights, input_quant=None,
                  symmetric=symmetric, num_bits=bits, packed_factor=Fraction(32, bits),
                  strategy="group", group_size=64, is_marlin=True, is_transposed=False)


def gptq():
    from vllm.model_executor.layers.quantization.auto_gptq import (AutoGPTQConfig,
                                                                    AutoGPTQMoEMethod)
    config = AutoGPTQConfig.from_config({"bits": 4, "group_size": 64, "desc_act": False,
                                         "sym": True, "lm_head": False})
    return method(AutoGPTQMoEMethod, quant_config=config, input_dtype=None, use_marlin=True)


def awq():
    from vllm.model_executor.layers.quantization.auto_awq import (AutoAWQConfig,
                                                                   AutoAWQMoEMethod)
    config = AutoAWQConfig.from_config({"bits": 4, "group_size": 64, "zero_point": True,
                                        "lm_head": False})
    return method(AutoAWQMoEMethod, quant_config=config, input_dtype=None, use_marlin=True)


def int4(shape):
    return torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32)


def fp8(shape):
    return torch.randn(shape).to(torch.float8_e4m3fn)


# per method: the checkpoint's tensors of one projection [out N, in K] -> a tensor
CHECKPOINTS = {
    "fp8_block": (fp8_block, {"weight": lambda n, k: fp8((n, k)),
                              "weight_scale_inv": lambda n, k: torch.rand(n // 128, k // 128)}),
    "fp8_tensor": (fp8_tensor, {"weight": lambda n, k: fp8((n, k)),
                                "weight_scale": lambda n, k: torch.rand(())}),
    "ct_fp8_channel": (ct_fp8_channel, {"weight": lambda n, k: fp8((n, k)),
                                        "weight_scale": lambda n, k: torch.rand(n, 1)}),
    "ct_w8a16": (lambda: ct_wna16(8, True), {
        "weight_packed": lambda n, k: int4((n, k // 4)),
        "weight_scale": lambda n, k: torch.rand(n, k // 64).bfloat16(),
        "weight_shape": lambda n, k: torch.tensor([n, k])}),
    "ct_w4a16_zp": (lambda: ct_wna16(4, False), {
        "weight_packed": lambda n, k: int4((n, k // 8)),
        "weight_scale": lambda n, k: torch.rand(n, k // 64).bfloat16(),
        "weight_zero_point": lambda n, k: int4((n // 8, k // 64)),
        "weight_shape": lambda n, k: torch.tensor([n, k])}),
    "gptq": (gptq, {"qweight": lambda n, k: int4((k // 8, n)),
                    "scales": lambda n, k: torch.rand(k // 64, n).half(),
                    "qzeros": lambda n, k: int4((k // 64, n // 8))}),  # no g_idx: vLLM
    # 0.32 takes GPTQ MoE only without act-order and has no parameter for it
    "awq": (awq, {"qweight": lambda n, k: int4((k, n // 8)),
                  "scales": lambda n, k: torch.rand(k // 64, n).half(),
                  "qzeros": lambda n, k: int4((k // 64, n // 8))}),
}
SHAPES = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}


def layer_for(qm):
    """A RoutedExperts with only what vLLM's expert weight loader reads."""
    layer = RoutedExperts.__new__(RoutedExperts)
    torch.nn.Module.__init__(layer)
    layer.quant_method, layer.layer_name = qm, PREFIX
    layer.quant_config = getattr(qm, "quant_config", None)
    if not hasattr(layer.quant_config, "get_name"):
        layer.quant_config = SimpleNamespace(get_name=lambda: "fp8")
    layer.expert_map_manager = SimpleNamespace(map_global_to_local=lambda e: e,
                                               num_fused_shared_experts=0)
    layer._fused_shared_expert_quantizer = None
    layer._loaded_expert_biases = set()
    layer.moe_config = SimpleNamespace(
        device="cpu", tp_rank=0, tp_size=1, is_act_and_mul=True, has_bias=False,
        intermediate_size=I, intermediate_size_per_partition=I,
        intermediate_size_per_partition_unpadded=I, hidden_dim=H, hidden_dim_unpadded=H,
        tp_shard_with_padding=False, shared_expert_prefix=None, num_logical_experts=E,
        moe_parallel_config=SimpleNamespace(tp_size=1))
    return layer


CREATE = dict(hidden_size=H, intermediate_size_per_partition=I, params_dtype=torch.bfloat16)


@pytest.fixture(autouse=True)
def one_device(monkeypatch):
    """No process group here: FP8's block check asks for the TP size."""
    import vllm.distributed
    monkeypatch.setattr(vllm.distributed, "get_tensor_model_parallel_world_size", lambda: 1)


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_a_twin_holds_what_vllm_loads_into_the_experts_row(name):
    make, tensors = CHECKPOINTS[name]
    torch.manual_seed(0)
    expert = {f"{proj}.{t}": make_tensor(*SHAPES[proj]) for proj in SHAPES
              for t, make_tensor in tensors.items()}
    # plain vLLM: a whole layer of E experts, expert 1 loaded into its row, by
    # vLLM's own mapping of checkpoint names to parameters and shards
    full = layer_for(make())
    full.quant_method.create_weights(layer=full, num_experts=E, **CREATE)
    vllm_calls = []
    for rel in sorted(expert):
        qual = f"experts.1.{rel}"
        for param_name, weight_name, _, shard in RoutedExperts.build_expert_params_mapping(
                "gate_proj", "down_proj", "up_proj", E, routed_experts_prefix="experts"):
            if weight_name in qual:
                param = qual.replace(weight_name, param_name).rsplit(".", 1)[-1]
                vllm_calls.append((rel, param, shard))
                assert RoutedExperts.weight_loader(full, getattr(full, param), expert[rel],
                                                   f"{PREFIX}.{param}", shard, 1, True), rel
    keys = checkpoint_keys(PREFIX, sorted(expert))  # offload's (store repair) mapping
    assert [(rel, param, shard) for rel, _, _, param, shard in keys] == vllm_calls
    # offload: no expert in the layer, expert 1 in a one-expert twin
    layer = layer_for(make())
    quant = QuantizedExperts(layer.quant_method, PREFIX)
    quant.create_empty(layer, num_experts=0, **CREATE)
    assert all(getattr(layer, n).shape[0] == 0 for n in quant.names)
    twin = quant.twin(layer)
    for rel, _, weight_name, param, shard in keys:
        assert param in quant.names, (rel, param)
        assert RoutedExperts.weight_loader(twin, getattr(twin, param), expert[rel],
                                           weight_name, shard, 0, True), rel
    for n in quant.names:
        got, want = getattr(twin, n).data[0], getattr(full, n).data[1]
        assert got.dtype == want.dtype and torch.equal(got.reshape(-1).view(torch.uint8),
                                                       want.reshape(-1).view(torch.uint8)), n
