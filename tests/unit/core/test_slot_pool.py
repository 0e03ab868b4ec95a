import random

import pytest

from vllm_moe_offload.core.eviction import POLICIES, make_policy
from vllm_moe_offload.core.slot_pool import ExpertKey, SlotPool


def keys(layer, *experts):
    return [ExpertKey(layer, e) for e in experts]


def test_misses_then_hits_then_lru_eviction():
    pool = SlotPool(4)
    grants = pool.acquire(keys(0, 0, 1, 2))
    assert [g.hit for g in grants] == [False, False, False]
    assert len({g.slot for g in grants}) == 3
    pool.release(g.slot for g in grants)

    grants = pool.acquire(keys(0, 1, 3))
    assert [(g.key.expert, g.hit, g.evicted) for g in grants] == [(1, True, None), (3, False, None)]
    pool.release(g.slot for g in grants)

    # LRU order now (oldest first): expert 0, 2, 1, 3. Two misses evict 0 then 2.
    grants = pool.acquire(keys(1, 5, 6))
    assert [g.evicted for g in grants] == [ExpertKey(0, 0), ExpertKey(0, 2)]
    assert ExpertKey(0, 0) not in pool and ExpertKey(0, 1) in pool
    pool.check_invariants()


def test_a_call_never_evicts_its_own_experts():
    pool = SlotPool(3)
    pool.release(g.slot for g in pool.acquire(keys(0, 0, 1, 2)))
    # expert 0 is the LRU victim, but this call needs it: the miss must take 1.
    grants = pool.acquire(keys(0, 0, 7))
    by_expert = {g.key.expert: g for g in grants}
    assert by_expert[0].hit and by_expert[7].evicted == ExpertKey(0, 1)
    pool.check_invariants()


def test_no_room_returns_none_and_changes_nothing():
    pool = SlotPool(2)
    held = pool.acquire(keys(0, 0, 1))
    assert pool.acquire(keys(1, 0)) is None
    assert not pool.can_acquire(keys(1, 0))
    assert pool.num_resident() == 2 and pool.num_pinned() == 2
    pool.release(g.slot for g in held)
    assert pool.acquire(keys(1, 0)) is not None
    pool.check_invariants()


def test_release_more_than_acquired_is_a_bug():
    pool = SlotPool(2)
    (g,) = pool.acquire(keys(0, 3))
    pool.release([g.slot])
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release([g.slot])


def test_duplicate_keys_take_one_slot():
    pool = SlotPool(2)
    grants = pool.acquire(keys(0, 4, 4, 4))
    assert len(grants) == 1


@pytest.mark.parametrize("seed", range(5))
def test_random_operations_keep_invariants_and_match_a_reference_lru(seed):
    rng = random.Random(seed)
    num_slots, num_layers, num_experts = 8, 3, 6
    pool = SlotPool(num_slots)
    reference: list[ExpertKey] = []  # resident keys, least recently used first
    pinned_calls: list[list[int]] = []
    for _ in range(400):
        if pinned_calls and rng.random() < 0.5:
            pool.release(pinned_calls.pop(rng.randrange(len(pinned_calls))))
            pool.check_invariants()
            continue
        layer = rng.randrange(num_layers)
        want = keys(layer, *rng.sample(range(num_experts), rng.randint(1, 4)))
        grants = pool.acquire(want)
        if grants is None:
            assert not pool.can_acquire(want)
            continue
        assert {g.key for g in grants} == set(want)
        assert {g.key for g in grants if g.hit} == {k for k in want if k in reference}
        for g in grants:
            if g.evicted is not None:
                reference.remove(g.evicted)
        for k in want:  # membership only; LRU order is checked in the first test
            if k in reference:
                reference.remove(k)
            reference.append(k)
        pinned_calls.append([g.slot for g in grants])
        pool.check_invariants()
        assert pool.num_resident() <= num_slots


@pytest.mark.parametrize("policy", POLICIES)
def test_queries_do_not_scan_the_pool(policy):
    """can_acquire and num_pinned keep counts (O(1) per key), never walk all S slots;
    a policy is asked for its size, never for its slots."""
    pool = SlotPool(1000, make_policy(policy, 3))
    pool.start_call(0)
    pool.release(g.slot for g in pool.acquire(keys(0, *range(900)), used=True))
    pool.policy.slots = _no_scan
    pool._pins = _NoScanList(pool._pins)
    assert pool.can_acquire(keys(1, 0, 1)) and not pool.can_acquire(keys(2, *range(1001)))
    pool.start_call(1)
    grants = pool.acquire(keys(0, 5, 6) + keys(1, 1), used=True)
    assert pool.num_pinned() == 3
    pool.release(g.slot for g in grants)
    assert pool.num_pinned() == 0


def _no_scan():
    raise AssertionError("scanned the evictable slots")


class _NoScanList(list):
    def __iter__(self):
        raise AssertionError("scanned the pin counts")


def test_split_pool_into_groups_of_consecutive_layers():
    """Within the limit: one group. Above it: the fewest groups whose slots, in
    proportion to their layers where that can be, fit the limit and hold one
    layer's experts each."""
    from vllm_moe_offload.core.slot_pool import SlotGroup, split_pool

    assert split_pool(3072, 48, 128) == [SlotGroup(range(48), 0, 3072)]
    assert split_pool(992, 48, 128, 992) == [SlotGroup(range(48), 0, 992)]
    groups = split_pool(3072, 48, 128, 992)
    assert [(g.layers, g.size) for g in groups] == [
        (range(12 * i, 12 * i + 12), 768) for i in range(4)]
    # 5000 slots over 48 layers: 6 groups of 8 layers, 833-834 slots each
    groups = split_pool(5000, 48, 128, 992)
    assert len(groups) == 6 and groups[-1].hi == 5000
    assert all(g.size <= 992 and g.hi == n.lo for g, n in zip(groups, groups[1:]))
    # 7 layers, 2000 slots: 3 groups hold 571-572 slots each
    groups = split_pool(2000, 7, 64, 992)
    assert [len(g.layers) for g in groups] == [2, 2, 3]
    assert [g.size for g in groups] == [571, 571, 858]
    assert split_pool(1000, 2, 520, 992) is None  # 500 slots cannot hold 520 experts
    # 3 layers of 512 experts in 1100 slots: in proportion, 366 + 734 (too few for
    # a layer); as near it as the bounds allow, 512 + 588
    assert split_pool(1100, 3, 512, 992) == [SlotGroup(range(0, 1), 0, 512),
                                             SlotGroup(range(1, 3), 512, 1100)]
    # every pool that n = ceil(S / 992) groups of >= E slots can hold is split
    for slots, layers, experts in ((1984, 3, 600), (1900, 3, 600), (2976, 5, 992),
                                   (993, 61, 496), (1500, 2, 700)):
        groups = split_pool(slots, layers, experts, 992)
        assert [g.lo for g in groups] + [groups[-1].hi] == [0] + [g.hi for g in groups]
        assert groups[-1].hi == slots and groups[-1].layers.stop == layers
        assert all(experts <= g.size <= 992 for g in groups)
    assert split_pool(1985, 3, 662, 992) is None  # 3 groups of 662 need 1986


def test_grouped_pool_evicts_within_a_layers_group():
    from vllm_moe_offload.core.slot_pool import GroupedSlotPool, SlotGroup

    pool = GroupedSlotPool([SlotGroup(range(0, 1), 0, 2), SlotGroup(range(1, 3), 2, 5)],
                           lambda: make_policy("lru", 3))
    grants = pool.acquire(keys(0, 0, 1) + keys(1, 0))
    assert sorted(g.slot for g in grants) == [0, 1, 2]
    pool.release(g.slot for g in grants)
    # group 0 is full; its next miss evicts there, though group 1 has free slots
    (g,) = pool.acquire(keys(0, 5))
    assert g.slot in (0, 1) and g.evicted == ExpertKey(0, 0)
    assert pool.lookup(ExpertKey(1, 0)) == 2 and ExpertKey(0, 0) not in pool
    # all or nothing across groups: group 0 cannot take two more while 0/5 is pinned
    assert pool.acquire(keys(0, 6, 7) + keys(2, 1)) is None
    assert pool.num_pinned() == 1 and pool.num_pinned(0) == 1 and pool.num_resident() == 3
    pool.release([g.slot])
    grants = pool.acquire(keys(2, 1, 2))
    assert all(2 <= x.slot < 5 for x in grants)
    pool.check_invariants()
