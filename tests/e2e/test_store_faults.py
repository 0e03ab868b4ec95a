"""A damaged disk store under a running engine: the store is a cache of the
checkpoint, so damaged records are re-derived and repaired, outputs stay
token-identical and the engine keeps serving."""

import pytest

from tests.e2e.conftest import EXPERTS, offload_spec, plain_spec


@pytest.mark.parametrize("fault", ["flip", "truncate"])
def test_damaged_store_heals_and_outputs_stay_identical(models, engine, tmp_path, fault):
    model = models["qwen3_moe"]
    plain = engine(plain_spec(model))
    spec = offload_spec(model, pool_slots=EXPERTS, store="disk",
                        store_dir=str(tmp_path / fault))
    off = engine({**spec, "rounds": 2, "damage_store": fault})  # damaged after round 1
    assert off["token_ids"] == plain["token_ids"]  # round 2 read the damaged file
    pool = off["stats"]["pool"]
    assert pool["store_repairs"] > 0
    assert "re-derived it from the checkpoint and repaired the record" in off["log"]
    assert pool["store_path"] in off["log"]
    what = "checksum mismatch" if fault == "flip" else "short read"
    assert what in off["log"]
