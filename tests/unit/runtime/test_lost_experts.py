"""An expert the disk store can neither read nor re-derive (expert_cache.py NOTE #5):
an error without `fail_requests`; with it, only the rows routed to that expert are
reported failed, every other row stays exact, and the next use tries again."""

import logging

import pytest
import torch

from tests.unit.runtime.test_expert_cache import E, H, make_cache, moe, weights
from tests.unit.runtime.test_prefetch import ScriptedPredictor
from vllm_moe_offload.core.keys import ExpertKey
from vllm_moe_offload.runtime.expert_cache import ExpertCache
from vllm_moe_offload.runtime.store import ExpertUnavailable

LOST = ExpertKey(1, 2)
# rows 0 and 2 route to the lost expert 2 of layer 1; rows 1 and 3 do not
IDS = torch.tensor([[2, 0], [1, 3], [4, 2], [5, 0]], dtype=torch.int32)
TW = torch.full(IDS.shape, 0.5)


def damaged_cache(tmp_path, predictor=None, num_slots=2 * E):
    base = make_cache("disk", tmp_path, num_slots)
    store = base.store
    with open(store.path, "r+b") as f:  # one flipped byte in the lost expert's record
        f.seek(store._offset(LOST.layer, LOST.expert) + 9)
        byte = f.read(1)
        f.seek(store._offset(LOST.layer, LOST.expert) + 9)
        f.write(bytes([byte[0] ^ 0xFF]))

    def checkpoint_gone(layer, e):
        raise FileNotFoundError("model.safetensors")

    store.rederive = checkpoint_gone
    cache = ExpertCache(store, num_slots, "cpu", predictor=predictor)
    cache.fail_requests = True
    return cache


def exact_rows(cache, ids, x):
    full = weights()[LOST.layer]
    slots = cache.map_to_slots(LOST.layer, ids, x)
    assert 0 <= int(slots.min()) and int(slots.max()) < cache.num_slots  # a valid kernel call
    got = moe(x, cache.buffers[0], cache.buffers[1], TW, slots)
    want = moe(x, torch.stack([w[0] for w in full]), torch.stack([w[1] for w in full]), TW, ids)
    return [bool(torch.equal(got[r], want[r])) for r in range(ids.shape[0])]


def test_without_fail_requests_the_caller_gets_the_error(tmp_path):
    """... and the pool is left as it should be: the expert forgotten, the call's pins
    released by the next call, which loads it once it is readable again."""
    cache = damaged_cache(tmp_path)
    cache.fail_requests = False
    with pytest.raises(ExpertUnavailable, match=r"expert \(1, 2\): checksum mismatch, and "
                                                r"re-deriving it .*model.safetensors"):
        cache.map_to_slots(LOST.layer, IDS)
    assert LOST not in cache.pool and cache._table[LOST.layer, LOST.expert] == -1
    cache.pool.check_invariants()
    cache.store.rederive = lambda layer, e: weights()[layer][e]  # the checkpoint is back
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(1))
    assert all(exact_rows(cache, IDS, x))
    every = torch.arange(E, dtype=torch.int32).view(-1, 2)
    cache.map_to_slots(0, every)  # every slot: none leaked a pin
    assert cache.pool.num_pinned() == E


def test_only_rows_routed_to_the_lost_expert_fail_and_it_is_retried(tmp_path, caplog):
    cache = damaged_cache(tmp_path)
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.ERROR, logger="vllm.moe_offload"):
        exact = exact_rows(cache, IDS, x)
    assert exact[1] and exact[3]  # the rows that did not route to it are exact
    assert set(cache.failed_rows) == {0, 2}
    assert "expert (1, 2): checksum mismatch" in cache.failed_rows[0]
    assert "requests routed to this expert fail" in caplog.text
    assert cache.stats.layer(LOST.layer).failed_loads == 1
    assert LOST not in cache.pool and cache._table[LOST.layer, LOST.expert] == -1
    cache.pool.check_invariants()

    cache.failed_rows.clear()
    exact_rows(cache, IDS, x)  # still gone: tried again, failed again, said once
    assert set(cache.failed_rows) == {0, 2} and caplog.text.count("fail; the engine") == 1
    assert cache.stats.layer(LOST.layer).failed_loads == 2

    cache.failed_rows.clear()
    cache.store.rederive = lambda layer, e: weights()[layer][e]  # the checkpoint is back
    with caplog.at_level(logging.WARNING, logger="vllm.moe_offload"):
        assert all(exact_rows(cache, IDS, x))
    assert not cache.failed_rows and cache.store.repairs == 1
    assert "expert (1, 2) is readable again" in caplog.text
    cache.pool.check_invariants()


@pytest.mark.parametrize("used", [True, False])
def test_a_prefetch_of_the_lost_expert_fails_on_its_layer_or_frees_its_slot(tmp_path, used):
    future = {(0, 1): [LOST.expert, 0], (0, 2): [0, 1]}
    cache = damaged_cache(tmp_path, ScriptedPredictor(future))
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(2))
    layer0 = torch.tensor([[0, 1]] * 4, dtype=torch.int32)
    cache.map_to_slots(0, layer0, x)  # prefetches (1, 2) on the loader thread: it fails
    ids = IDS if used else torch.tensor([[0, 1]] * 4, dtype=torch.int32)
    exact = exact_rows(cache, ids, x)
    if used:
        assert set(cache.failed_rows) == {0, 2} and exact[1] and exact[3]
    else:
        assert not cache.failed_rows and all(exact)
        cache.map_to_slots(2, layer0, x)  # the finished prefetch's slot is released
    stats = cache.stats.layer(LOST.layer)
    assert stats.failed_loads == 1
    assert LOST not in cache.pool
    # the failed prefetch moved nothing and covered nothing; expert 0's did both
    loaded = len(set(ids.flatten().tolist()) - {LOST.expert})
    assert stats.bytes_loaded == loaded * cache.store.read_bytes_of(1, 0)
    assert (stats.prefetched, stats.prefetch_hits) == (1, 1)
    assert stats.hits == 1 and stats.hits + stats.misses == len(set(ids.flatten().tolist()))
    cache.pool.check_invariants()
    cache.close()


def test_a_prefetch_read_that_raises_anything_loses_the_expert_not_its_pins(tmp_path):
    future = {(0, 1): [LOST.expert, 0], (0, 2): [0, 1], (1, 1): [0, 1], (1, 2): [0, 1]}
    cache = damaged_cache(tmp_path, ScriptedPredictor(future))
    read = cache.store.read_into

    def eio_for_the_lost_one(layer, e, dst):
        if (layer, e) == tuple(LOST):
            raise OSError(5, "EIO")
        return read(layer, e, dst)

    cache.store.read_into = eio_for_the_lost_one
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(2))
    layer0 = torch.tensor([[0, 1]] * 4, dtype=torch.int32)
    cache.map_to_slots(0, layer0, x)
    cache.map_to_slots(1, layer0, x)  # the failed prefetch: wasted
    cache.map_to_slots(2, layer0, x)
    cache.close()  # waits for the loader, then releases what it loaded
    assert LOST not in cache.pool and cache.stats.layer(LOST.layer).failed_loads == 1
    assert not cache._release_when_loaded
    assert cache.pool.num_pinned() == len(cache._call_pins) + cache._prefetch_pins[0]
    cache.pool.check_invariants()
