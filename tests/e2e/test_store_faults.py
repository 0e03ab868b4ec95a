"""A damaged disk store under a running engine (bytes flipped, file truncated, reads
failing, file removed): the store is a cache of the checkpoint, so damaged records
are re-derived and repaired, outputs stay token-identical and the engine keeps
serving. A read-only disk and a missing checkpoint: tests/unit/runtime/test_store.py."""

import pytest

from tests.e2e.conftest import EXPERTS, LAYERS, offload_spec, plain_spec


@pytest.mark.parametrize("fault", ["flip", "truncate", "eio", "remove"])
def test_damaged_store_heals_and_outputs_stay_identical(models, engine, tmp_path, fault):
    model = models["qwen3_moe"]
    plain = engine(plain_spec(model))
    spec = offload_spec(model, pool_slots=EXPERTS, store="disk",
                        store_dir=str(tmp_path / fault))
    off = engine({**spec, "rounds": 2, "damage_store": fault})  # damaged after round 1
    assert off["token_ids"] == plain["token_ids"]  # round 2 read the damaged file
    pool = off["stats"]["pool"]
    assert off["stats"]["totals"]["misses"] > LAYERS * EXPERTS  # round 2 read the store
    if fault == "remove":  # the open file stays readable; the next start rebuilds
        assert pool["store_repairs"] == 0
        return
    assert pool["store_repairs"] > 0
    assert "re-derived it from the checkpoint and repaired the record" in off["log"]
    assert pool["store_path"] in off["log"]
    what = {"flip": "checksum mismatch", "truncate": "short read",
            "eio": "Input/output error"}[fault]
    assert what in off["log"]
