"""Greedy outputs through real vLLM on CPU are token-identical with the slot pool."""

import pytest

from tests.e2e.conftest import (ARCHS, EXPERTS, LAYERS, PROMPTS, assert_same_outputs,
                                offload_spec, plain_spec)

POOLS = {"one_layer": EXPERTS, "half": LAYERS * EXPERTS // 2, "all": LAYERS * EXPERTS}


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_outputs_match_plain_vllm(models, engine, store_dir, arch, pool):
    slots = POOLS[pool]
    store = "host" if pool == "all" else "disk"
    plain = engine(plain_spec(models[arch]))
    off = engine(offload_spec(models[arch], pool_slots=slots, store=store,
                              store_dir=store_dir))
    assert len(PROMPTS) >= 4 and max(plain["prompt_lens"]) > 100
    assert_same_outputs(off, plain)
    assert off["texts"] == plain["texts"]

    assert "(shutdown)" in off["log"]  # the summary line when the engine exits
    totals, info = off["stats"]["totals"], off["stats"]["pool"]
    assert (info["num_slots"], info["store"]) == (slots, store)
    assert totals["bytes_loaded"] == totals["misses"] * info["slot_bytes"]
    assert set(off["stats"]["layers"]) == {str(l) for l in range(LAYERS)}
    if slots < LAYERS * EXPERTS:
        assert totals["misses"] > LAYERS * EXPERTS  # experts were evicted and reloaded
        assert totals["evictions"] > 0
    else:  # every expert loads once, then only hits
        assert 0 < totals["misses"] <= LAYERS * EXPERTS
        assert totals["evictions"] == 0
        assert totals["hits"] > totals["misses"]


def test_pool_settings_without_enabled_turn_offload_on(models, engine, store_dir):
    """The trap of writing pool settings and forgetting `enabled`: they mean offload."""
    plain = engine(plain_spec(models["mixtral"]))
    spec = offload_spec(models["mixtral"], pool_slots=EXPERTS, store="disk",
                        store_dir=store_dir)
    del spec["offload"]["enabled"]
    off = engine(spec)
    assert "since pool_slots, store, store_dir set without enabled" in off["log"]
    assert off["token_ids"] == plain["token_ids"]
    assert off["stats"]["pool"]["num_slots"] == EXPERTS and off["stats"]["totals"]["misses"] > 0


def test_plain_vllm_is_untouched_by_the_plugin(models, engine):
    plain = engine(plain_spec(models["qwen3_moe"]))
    assert "expert offload" not in plain["log"]
    assert plain["stats"].get("totals") is None  # no offload state in the worker


def test_default_compiled_mode_matches(models, engine, store_dir):
    """Not only enforce_eager: vLLM's default torch.compile path on CPU."""
    model = models["qwen3_moe"]
    plain = engine(plain_spec(model, enforce_eager=False))
    spec = offload_spec(model, pool_slots=LAYERS * EXPERTS // 2, store="disk",
                        store_dir=store_dir)
    off = engine({**spec, "enforce_eager": False})
    assert "Enforce eager set" not in off["log"]  # really the compiled path
    assert off["token_ids"] == plain["token_ids"]
    assert off["stats"]["totals"]["misses"] > 0
