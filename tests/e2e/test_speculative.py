"""Speculative decoding without a draft model (ngram prompt lookup) with offload:
the target model checks several proposed tokens per request in one forward pass,
and the pool serves those calls like any other. Methods with a draft or MTP model
are refused (test_errors.py)."""

from tests.e2e.conftest import EXPERTS, offload_spec, plain_spec

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
         "prompt_lookup_min": 2}


def test_ngram_speculative_decoding_matches_plain_vllm(models, engine, store_dir):
    model = models["qwen3_moe"]
    plain = engine({**plain_spec(model), "speculative_config": NGRAM})
    off = engine({**offload_spec(model, pool_slots=EXPERTS, store="disk",
                                 store_dir=store_dir), "speculative_config": NGRAM})
    assert off["token_ids"] == plain["token_ids"]
    assert off["spec_accepted_tokens"] > 0 and plain["spec_accepted_tokens"] > 0
    totals = off["stats"]["totals"]
    assert totals["misses"] > EXPERTS and totals["evictions"] > 0
