"""A speculative draft's weights are set aside when the pool is sized on a GPU: vLLM
builds and loads the draft (an MTP module, a draft model, EAGLE heads) after the
target model, whose first MoE layer has built the pool by then, and its experts are
not offloaded. On the CPU there is no room to size against, so these drive the GPU's
sizing with a room given by hand (gpu_room's, which needs CUDA)."""

from types import SimpleNamespace

import pytest
import torch

from vllm_moe_offload.core.config import OffloadConfig
from vllm_moe_offload.integration.vllm import model_state
from vllm_moe_offload.integration.vllm.layer import _draft
from vllm_moe_offload.integration.vllm.model_state import Draft, ModelOffload
from vllm_moe_offload.runtime.store import ExpertLayout, TensorSpec

MiB = 1 << 20
L, E = 4, 8
LAYOUT = ExpertLayout((TensorSpec((MiB // 4,), torch.float32),))  # 1 MiB an expert


def spec(method, **draft):
    config = SimpleNamespace(**draft) if draft else None
    return SimpleNamespace(method=method, draft_model_config=config)


def test_what_each_kind_of_draft_keeps_on_the_device(tmp_path):
    target = dict(model="/m", revision=None, hf_config=SimpleNamespace())
    assert _draft(spec("ngram", **target), None) is None  # no weights: the target's config
    assert _draft(spec("suffix"), None) is None
    mtp = spec("mtp", model="/m", revision=None, hf_config=SimpleNamespace(n_predict=2))
    assert _draft(mtp, None) == Draft("mtp", mtp_layers=2)
    for name, size in (("model-00001-of-00002.safetensors", 3000),
                       ("model-00002-of-00002.safetensors", 500), ("config.json", 99)):
        (tmp_path / name).write_bytes(b"\0" * size)
    draft = spec("draft_model", model=str(tmp_path), revision=None,
                 hf_config=SimpleNamespace())
    assert _draft(draft, None) == Draft("draft_model", file_bytes=3500)


def test_the_pool_is_sized_with_the_draft_set_aside(monkeypatch):
    """32 experts of 1 MiB; 24 MiB left on the GPU. Without a draft the default pool
    takes half of the room (12 slots); with 2 MTP layers of 8 experts (16 MiB) set
    aside, half of the 8 MiB left is one layer's experts (8 slots). A pool set by
    hand that fitted before is refused, with the draft named."""

    def pool(draft, cfg=None):
        model = ModelOffload(cfg or OffloadConfig.from_dict({"enabled": True,
                                                             "store": "host"}),
                             {}, torch.device("cpu"))
        for layer in range(L):
            model.register_layer(E, 2, f"model.layers.{layer}.mlp.experts")
        store = model.ensure_store(LAYOUT)
        for layer in range(L):
            for e in range(E):
                store.put(layer, e, [torch.full((MiB // 4,), float(e))])
        model.draft = draft
        model.experts_arrived = L * E
        return model.finish_loading(None).num_slots

    monkeypatch.setattr(model_state, "gpu_room", lambda *_: (24 * MiB, "left on the GPU"))
    assert pool(None) == 12
    assert pool(Draft("ngram")) == 12  # nothing to set aside
    assert pool(Draft("mtp", mtp_layers=2)) == 8
    assert pool(Draft("draft_model", file_bytes=8 * MiB)) == 8  # half of 16 MiB
    manual = OffloadConfig.from_dict({"enabled": True, "store": "host", "pool_slots": 20})
    assert pool(None, manual) == 20
    with pytest.raises(ValueError, match=r"takes 0\.02 GiB, more than the 0\.01 GiB left "
                       r"on the GPU, less 0\.02 GiB set aside for the mtp draft \(the "
                       r"experts of its 2 MTP layers\), which loads after the pool"):
        pool(Draft("mtp", mtp_layers=2), manual)
    with pytest.raises(ValueError, match="one layer's 8 experts take"):
        pool(Draft("mtp", mtp_layers=3))  # 0 MiB left for the pool
