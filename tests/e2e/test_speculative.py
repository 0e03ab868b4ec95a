"""Speculative decoding with offload. The target model checks several proposed
tokens per request in one forward pass, which the pool serves like any other call.
Proposals come from n-grams of the prompt (no draft model), a draft model or an MTP
module (DeepSeek-V3); a draft's MoE layers are built after the target model loaded
and keep their experts resident."""

from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.e2e.conftest import EXPERTS, LAYERS, offload_spec, plain_spec
from vllm_moe_offload.hf.tiny_moe import build_tiny_deepseek_mtp

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
         "prompt_lookup_min": 2}


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_speculative_decoding_matches_plain_vllm(models, engine, store_dir, method):
    model = models["qwen3_moe"]
    spec = NGRAM if method == "ngram" else {  # the draft: the same tiny model
        "method": "draft_model", "model": models["qwen3_moe"], "num_speculative_tokens": 2}
    plain = engine({**plain_spec(model), "speculative_config": spec})
    off = engine({**offload_spec(model, pool_slots=EXPERTS, store="disk",
                                 store_dir=store_dir), "speculative_config": spec})
    assert off["token_ids"] == plain["token_ids"]
    assert off["spec"]["accepted_tokens"] > 0 and off["spec"] == plain["spec"]
    totals, info = off["stats"]["totals"], off["stats"]["pool"]
    assert info["num_layers"] == LAYERS  # the draft's layers are not in the pool
    files = sum(f.stat().st_size for f in Path(model).glob("*.safetensors"))
    assert info["draft"] == (None if method == "ngram" else  # set aside on a GPU
                             {"method": "draft_model", "mtp_layers": 0, "file_bytes": files})
    assert totals["misses"] > EXPERTS and totals["evictions"] > 0


def test_mtp_speculative_decoding_matches_plain_vllm(engine, store_dir, tmp_path_factory):
    """DeepSeek-V3 with an MTP module: the MTP layer's experts stay resident, the
    target's 3 MoE layers (the first is dense) are offloaded."""
    model = str(build_tiny_deepseek_mtp(tmp_path_factory.mktemp("mtp") / "dsv3_mtp",
                                        num_layers=LAYERS, num_experts=EXPERTS))
    spec = {"method": "mtp", "num_speculative_tokens": 1}
    plain = engine({**plain_spec(model), "speculative_config": spec})
    off = engine({**offload_spec(model, pool_slots=EXPERTS, store="disk",
                                 store_dir=store_dir), "speculative_config": spec})
    assert off["token_ids"] == plain["token_ids"]
    assert off["spec"] == plain["spec"] and off["spec"]["draft_tokens"] > 0
    assert off["stats"]["pool"]["num_layers"] == LAYERS - 1  # not the MTP layer
    # set aside on a GPU: the MTP layer's tensors, as its checkpoint holds them
    mtp = sum(t.nbytes for k, t in load_file(Path(model) / "model.safetensors").items()
              if k.startswith(f"model.layers.{LAYERS}."))
    assert off["stats"]["pool"]["draft"] == {"method": "mtp", "mtp_layers": 1,
                                             "file_bytes": mtp}
    assert off["stats"]["totals"]["misses"] > EXPERTS
