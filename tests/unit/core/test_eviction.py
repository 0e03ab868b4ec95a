"""Eviction policies: each one's choice on hand-made cases, and the pool's invariants
under random operations with every policy."""

import random

import pytest

from vllm_moe_offload.core.eviction import POLICIES, HALF_LIFE_STEPS, make_policy
from vllm_moe_offload.core.slot_pool import ExpertKey, SlotPool


def run_calls(pool: SlotPool, calls):
    """Drive the pool as the engine does: release the previous call's pins when the
    next call starts. Returns the keys each call evicted."""
    pins, evicted = [], []
    for layer, experts in calls:
        pool.release(pins)
        pool.start_call(layer)
        grants = pool.acquire([ExpertKey(layer, e) for e in experts], used=True)
        pins = [g.slot for g in grants]
        evicted.append([g.evicted for g in grants if g.evicted is not None])
        pool.check_invariants()
    pool.release(pins)
    return evicted


def test_lfu_keeps_the_frequent_expert():
    pool = SlotPool(2, make_policy("lfu", 1))
    # expert 0 used three times, 1 once (most recently): a miss evicts 1, LRU would evict 0.
    out = run_calls(pool, [(0, [0]), (0, [0]), (0, [0]), (0, [1]), (0, [2])])
    assert out[-1] == [ExpertKey(0, 1)]
    lru = run_calls(SlotPool(2, make_policy("lru", 1)),
                    [(0, [0]), (0, [0]), (0, [0]), (0, [1]), (0, [2])])
    assert lru[-1] == [ExpertKey(0, 0)]


def test_lfu_forgets_old_uses():
    # expert 0: three uses at steps 1-3; expert 1: two uses, 4 half-lives later.
    # Decayed, 0 counts 3 * 2^-4 of 1's weight per use, so 0 goes.
    quiet = int(4 * HALF_LIFE_STEPS)
    calls = [(0, [0])] * 3 + [(0, [2])] * quiet + [(0, [1]), (0, [1]), (0, [3]), (0, [4])]
    pool = SlotPool(3, make_policy("lfu", 1))
    out = run_calls(pool, calls)
    assert ExpertKey(0, 0) in out[-2] + out[-1] and ExpertKey(0, 1) in pool


def test_layer_evicts_the_layer_that_just_ran_then_the_one_before():
    pool = SlotPool(4, make_policy("layer", 4))
    # one expert each in layers 0..3, then layer 3 runs again with two new experts:
    # its own old expert goes first (a step away), then layer 2's (the one before),
    # never those of layers 0 and 1 that come next.
    out = run_calls(pool, [(0, [0]), (1, [0]), (2, [0]), (3, [0]), (3, [5, 6])])
    assert out[-1] == [ExpertKey(3, 0), ExpertKey(2, 0)]


def test_reuse_weighs_distance_against_frequency():
    pool = SlotPool(5, make_policy("reuse", 4))
    # 8 steps in which layers 0, 1, 2, 3 each route to expert 0; layer 3 also to 9
    # at the first step only.
    calls = [(0, [0]), (1, [0]), (2, [0]), (3, [0, 9])]
    calls += [(l, [0]) for _ in range(7) for l in range(4)]
    run_calls(pool, calls)
    # Now layer 0 runs and misses twice: (3, 9) is rare, so it goes first; then, of
    # the equally frequent ones, the one whose layer comes last: layer 3's (3 calls
    # away), not layer 1's or 2's. LRU would have taken layer 1's, needed next.
    out = run_calls(pool, [(0, [0, 4, 5])])
    assert out[-1] == [ExpertKey(3, 9), ExpertKey(3, 0)]


def test_predicted_keeps_a_hinted_expert_until_its_call():
    def pool_after(name, hint):
        pool = SlotPool(3, make_policy(name, 2))
        run_calls(pool, [(0, [0, 1]), (1, [0])] * 4)
        if hint:
            pool.hint(ExpertKey(0, 0))  # a predictor names (0, 0) for layer 0's next call
        return pool, run_calls(pool, [(1, [0, 2])])[-1]

    # Without a hint, layer 0's experts are equal and 0 (added first) goes.
    _, out = pool_after("predicted", hint=False)
    assert out == [ExpertKey(0, 0)]
    pool, out = pool_after("predicted", hint=True)
    assert out == [ExpertKey(0, 1)]
    # reuse ignores hints
    assert pool_after("reuse", hint=True)[1] == [ExpertKey(0, 0)]
    # the hint is settled by layer 0's call: afterwards (0, 0) is an ordinary key
    run_calls(pool, [(0, [0])])
    assert not any(pool.policy._hints)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("seed", range(4))
def test_random_operations_keep_invariants(policy, seed):
    rng = random.Random(seed)
    num_layers, num_experts = 3, 6
    pool = SlotPool(8, make_policy(policy, num_layers))
    held: list[list[int]] = []
    for _ in range(500):
        op = rng.random()
        if held and op < 0.4:
            pool.release(held.pop(rng.randrange(len(held))))
        elif op < 0.5:
            pool.hint(ExpertKey(rng.randrange(num_layers), rng.randrange(num_experts)))
        elif op < 0.55:
            key = ExpertKey(rng.randrange(num_layers), rng.randrange(num_experts))
            pool.drop(key)  # pinned or not: a pinned slot is freed at its last release
            assert key not in pool
        else:
            layer = rng.randrange(num_layers)
            pool.start_call(layer)
            want = [ExpertKey(layer, e)
                    for e in rng.sample(range(num_experts), rng.randint(1, 4))]
            grants = pool.acquire(want, used=rng.random() < 0.8)
            if grants is None:
                assert not pool.can_acquire(want)
            else:
                assert {g.key for g in grants} == set(want)
                held.append([g.slot for g in grants])
        pool.check_invariants()
        assert len(pool.policy) == pool.num_slots - len(pool._free) - pool.num_pinned()


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="eviction='mru'.*lru, lfu, layer, reuse"):
        make_policy("mru", 2)
