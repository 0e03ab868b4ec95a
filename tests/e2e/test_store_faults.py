"""A damaged disk store under a running engine (bytes flipped, file truncated,
reads failing, file removed, a read-only disk): the store is a cache of the
checkpoint, so damaged records are re-derived (and repaired where the disk takes
writes), outputs stay token-identical and the engine keeps serving. With the
checkpoint gone too, the requests routed to the damaged expert fail and the engine
serves on. Flipped bytes and a truncated file through the OpenAI server:
test_server.py."""

import os
import shutil

import pytest

from tests.e2e.conftest import EXPERTS, LAYERS, assert_same_outputs, offload_spec, plain_spec


@pytest.mark.parametrize("fault", ["flip", "truncate", "eio", "remove", "readonly"])
def test_damaged_store_heals_and_outputs_stay_identical(models, engine, tmp_path, fault):
    model = models["qwen3_moe"]
    plain = engine(plain_spec(model))
    spec = offload_spec(model, pool_slots=EXPERTS, store="disk",
                        store_dir=str(tmp_path / fault))
    off = engine({**spec, "rounds": 2, "damage_store": fault})  # damaged after round 1
    assert_same_outputs(off, plain)  # round 2 read the damaged file
    pool = off["stats"]["pool"]
    assert off["stats"]["totals"]["misses"] > LAYERS * EXPERTS  # round 2 read the store
    if fault == "remove":  # the open file stays readable; the next start rebuilds
        assert pool["store_repairs"] == 0
        return
    if fault == "readonly":  # served from the checkpoint, every time
        assert pool["store_repairs"] == 0
        assert "served from the checkpoint, but the record could not be repaired" in off["log"]
        assert "Read-only file system" in off["log"]
        return
    assert pool["store_repairs"] > 0
    assert "re-derived it from the checkpoint and repaired the record" in off["log"]
    assert pool["store_path"] in off["log"]
    what = {"flip": "checksum mismatch", "truncate": "short read",
            "eio": "Input/output error"}[fault]
    assert what in off["log"]


def test_an_expert_that_cannot_be_re_derived_fails_its_requests_not_the_engine(
        models, engine, tmp_path):
    model = str(shutil.copytree(models["qwen3_moe"], tmp_path / "model"))  # hidden below
    plain = engine(plain_spec(models["qwen3_moe"]))
    spec = offload_spec(model, pool_slots=EXPERTS, store="disk", store_dir=str(tmp_path / "s"))
    # after round 1: one record damaged (layer 1, expert 3) and the checkpoint hidden;
    # after round 2: the checkpoint back
    off = engine({**spec, "rounds": 3, "damage_store": "flip", "damage_record": EXPERTS + 3,
                  "hide_checkpoint": True})
    first, second, third = off["rounds"]
    assert_same_outputs(first, plain)
    failed = [i for i, why in enumerate(second["finish_reasons"]) if why == "error"]
    assert failed, second
    for i, ids in enumerate(second["token_ids"]):  # no token from the wrong expert output
        want = plain["token_ids"][i]
        assert ids == (want[:len(ids)] if i in failed else want), i
        assert len(ids) < len(want) if i in failed else second["finish_reasons"][i] == "length"
    assert_same_outputs(third, plain)  # the engine serves on, record repaired
    pool = off["stats"]["pool"]
    assert pool["failed_requests"] == len(failed) and pool["store_repairs"] == 1
    assert off["stats"]["layers"]["1"]["failed_loads"] >= 1
    assert sum(s["failed_loads"] for s in off["stats"]["layers"].values()) == off[
        "stats"]["layers"]["1"]["failed_loads"]
    assert ("expert (1, 3): checksum mismatch, and re-deriving it from the checkpoint failed"
            in off["log"])
    assert "The requests routed to this expert fail" in off["log"]
    assert off["log"].count("expert offload: request ") == len(failed)
    assert "expert (1, 3) is readable again" in off["log"]


def other_host():
    """Engine setup (engine_probe `setup`): this process stands in for a host whose
    kernels lay experts out otherwise (an AMX CPU, say), as layer.py identifies it."""
    from vllm_moe_offload.integration.vllm import layer

    real = layer._kernel_identity
    layer._kernel_identity = lambda *a: dict(real(*a), arch="elsewhere", amx=True)


def other_packing():
    """Engine setup: a host whose vLLM packs an expert otherwise, all else equal."""
    from vllm_moe_offload.integration.vllm import layer

    layer.OffloadedRoutedExperts._packing = lambda self: "elsewhere"


def test_a_store_is_reused_only_where_vllm_lays_experts_out_the_same(
        models, engine, store_dir, tmp_path):
    """A store directory shared by hosts whose kernels pack experts differently (or
    copied between them): the records' layout is part of the store's identity, so
    each host builds its own, where before the other's file was read as it was
    (checksums pass: they were sealed over that layout). The same host reuses its
    store: the packing's digest is the same in every process."""
    model = models["qwen3_moe"]
    plain = engine(plain_spec(model))
    # test_outputs.py's two disk engines on this model: the second to start reused
    runs = [engine(offload_spec(model, pool_slots=slots, store="disk", store_dir=store_dir))
            for slots in (EXPERTS, LAYERS * EXPERTS // 2)]
    assert any("reusing disk store" in r["log"] for r in runs)
    path = runs[0]["stats"]["pool"]["store_path"]
    assert runs[1]["stats"]["pool"]["store_path"] == path
    for setup in ("other_host", "other_packing"):
        mine = shutil.copytree(store_dir, tmp_path / setup)  # this host's store in it
        other = engine({**offload_spec(model, pool_slots=EXPERTS, store="disk",
                                       store_dir=str(mine)),
                        "setup": f"tests.e2e.test_store_faults:{setup}"})
        assert "reusing disk store" not in other["log"], setup
        assert other["stats"]["pool"]["store_path"] != str(mine / os.path.basename(path))
        assert "earlier disk stores of this model that no engine uses" in other["log"]
        assert_same_outputs(other, plain)
