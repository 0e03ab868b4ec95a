"""Triton kernels that keep expert residency on the GPU (device mode).

Legend: L = MoE layers, E = experts per layer, S = slots, n = ids in one call
(tokens x top-k), J = most jobs of one call (min(E, n)), key = layer * E + expert.
An id of -1 is no expert (vLLM routes the rows it pads a batch with there): never
needed, never counted, slot id -1.

Device state (int32 unless noted), read and written only by these kernels while
the model runs, so a layer call needs no host sync and can sit in a CUDA graph:
- `table [L * E]`: slot of each key, -1 when not resident;
- `owner [S]`: key held by each slot, -1 when free;
- `flags [S]`: PROTECT (prefetched for a later call, not a victim until that call
  settles it), PINNED (residency plan), AHEAD (filled by prefetch, not yet scored),
  REF (CLOCK reference bit), TAKEN (picked as a victim inside this kernel);
- `state [3]`: error code (1: no victim), the last layer called and the step count
  (the `reuse` clock);
- slot groups (core/slot_pool.py; one unless vLLM's kernels take fewer slots than
  the pool has): `group_of [L]` each layer's group, `groups [G, 5]` its slots
  [LO, HI), CLOCK's hand (from LO), the slots prefetch locked in it and its
  prefetch budget (slots prefetch may lock; the host changes it with the plan). A
  key takes a slot of its layer's group only, and resolve hands out slot ids that
  count from the group's LO;
- `counters [L, NSTAT]` int64 (the columns below), `pred [L, D, 3]` int64;
- `reuse` eviction, float32: `uses [L * E]` log2 of each key's decayed use count,
  `clock [1]` log2 of the decayed step count (core/eviction.py NOTE #2, #3), and
  `values [S]`, scratch for the victim search.

`resolve` runs one layer call in one CTA: marks the needed experts, settles the
layer's prefetched slots, picks victims for its misses (never a slot this call
needs, never a locked one, in its layer's group: by `reuse`, the farthest expected
next use, one pass over the group's slots per victim; or by CLOCK from the hand),
updates table/owner/flags in place, writes the fill jobs and the slot ids. `fill`
then copies each job's expert from pinned host memory (read in place over the link,
UVA) into its slot; its grid is fixed, and a program whose job is empty returns at
once, so an all-hit call costs two tiny launches (a record of N > 4 tensors: 1 +
ceil(N / 4)). `prefetch` is `resolve` for a predicted later layer: its fill runs on
the copy stream, and the target layer's call waits for it with an event.
`decode_fill_kernel` is fill for a quantized store: it decodes each job's matrices
from the record in host memory (read in place) into the slot, gathering into the
kernel's layout where it differs (a launch of its own; biases, if any, through
`fill_kernel`). A mixed-precision store is two stores of some experts each: both
fills run once per store, over the jobs whose expert it holds (ROWS).

NOTE #1: in one CTA a tensor smaller than the CTA is held by every warp, and only
one copy of a store is written; a reduction within a warp needs no barrier. So a
warp that loads slot state after another warp stored it computes other values, and
in a loop with a barrier it may then leave after a different number of passes: a
hang. A victim search therefore waits for every warp's loads before it stores, and
so does every other store to slot state that warps read just before (the resolve's
settled flags, the prefetch's locks): a count or a lock budget would differ by warp.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dequant_kernel import decode_values, store_values

# Kernels may only read globals that are constexpr; host code reads `.value`.
PROTECT, PINNED, AHEAD, REF, TAKEN = (tl.constexpr(1 << i) for i in range(5))
CALLS, HITS, MISSES, EVICTIONS, PREFETCHED, PF_HITS, PF_WASTED = (
    tl.constexpr(i) for i in range(7))
NSTAT = tl.constexpr(8)
ERROR, LAST, STEP = (tl.constexpr(i) for i in range(3))
NSTATE = 3
LO, HI, HAND, LOCKS, BUDGET = (tl.constexpr(i) for i in range(5))  # a slot group's
NGROUP = tl.constexpr(5)  # words per slot group in group_state
CLOCK, REUSE = tl.constexpr(0), tl.constexpr(1)  # eviction policies (POLICY)
NEVER = tl.constexpr(-1e30)  # log2 use count of a key no call used
# REUSE victim order: free slots, then cold keys (never used, or not for 60
# half-lives) by layer distance (x 2^100, above any finite expected distance)
FREE_VALUE, COLD_SCALE = tl.constexpr(2e37), tl.constexpr(2.0 ** 100)


@triton.jit
def _log2_add(a, b):
    """log2(2^a + 2^b); NEVER + b = b."""
    hi = tl.maximum(a, b)
    return hi + tl.log2(1.0 + tl.exp2(tl.minimum(a, b) - hi))


@triton.jit
def _start_call(layer, state_ptr, clock_ptr, uses_ptr, n_keys, inv_half_life,
                rebase_steps, KB: tl.constexpr):
    """Advance the step clock (core/eviction.py `_DecayedUses.start_call`): a new
    forward step starts when the layer index does not grow. Every `rebase_steps`
    steps the clock and all use counts move back together (their differences, and
    so every decision, stay; float32 keeps its precision on a server that runs for
    weeks). Returns (now, log2 of the decayed step count, how far counts moved)."""
    last = tl.load(state_ptr + LAST)
    step = tl.load(state_ptr + STEP)
    steps = tl.load(clock_ptr)
    tl.debug_barrier()  # every thread has read the old values before they change
    new_step = (layer <= last) | (steps <= NEVER)
    step += (layer <= last).to(tl.int32)
    shift = steps * 0.0
    if step >= rebase_steps:
        step -= rebase_steps
        shift += rebase_steps * inv_half_life
        steps = tl.where(steps > NEVER, steps - shift, steps)
        for start in range(0, n_keys, KB):
            k = start + tl.arange(0, KB)
            u = tl.load(uses_ptr + k, mask=k < n_keys, other=NEVER)
            tl.store(uses_ptr + k, tl.where(u > NEVER, u - shift, u), mask=k < n_keys)
        tl.debug_barrier()
    tl.store(state_ptr + LAST, layer)
    tl.store(state_ptr + STEP, step)
    now = step.to(tl.float32) * inv_half_life
    steps = tl.where(new_step, _log2_add(steps, now), steps)
    tl.store(clock_ptr, steps)
    return now, steps, shift


@triton.jit
def _pick_reuse(owner_ptr, flags_ptr, need_ptr, vict_ptr, uses_ptr, val_ptr, layer,
                n_want, lo, hi, E, L, steps, CH: tl.constexpr):
    """`reuse` (core/eviction.py ReuseDistance): take the `n_want` candidates (as in
    `_pick_victims`) whose key's next use is expected furthest away: dist(l) + L *
    (1/p - 1) layer calls, p = 2^(score - steps) capped at 1; free slots first, then
    keys no call used (or not for 60 half-lives), by dist(l); ties to the lowest
    slot. Slots [lo, hi) only. One pass writes each slot's value to val_ptr, then
    each victim is one max over them."""
    offs = tl.arange(0, CH)
    for start in range(lo, hi, CH):
        s = start + offs
        live = s < hi
        f = tl.load(flags_ptr + s, mask=live, other=PINNED)
        o = tl.load(owner_ptr + s, mask=live, other=-1)
        held = live & (o >= 0)
        o_layer = tl.where(held, o // E, 0)
        o_need = tl.load(need_ptr + tl.where(held, o % E, 0), mask=held, other=0)
        in_use = held & (o_layer == layer) & (o_need != 0)
        cand = live & ((f & (PROTECT | PINNED | TAKEN)) == 0) & (in_use == 0)
        age = steps - tl.load(uses_ptr + tl.where(held, o, 0), mask=held, other=NEVER)
        dist = (o_layer - layer - 1 + L) % L + 1
        value = dist.to(tl.float32) + L * (tl.exp2(tl.minimum(tl.maximum(age, 0.0), 60.0))
                                           - 1.0)
        value = tl.where(age > 60.0, dist.to(tl.float32) * COLD_SCALE, value)
        value = tl.where(held, value, FREE_VALUE)
        tl.store(val_ptr + s, tl.where(cand, value, -1.0), mask=live)
    tl.debug_barrier()
    taken = n_want * 0
    for _ in range(0, n_want):
        best = tl.full([], -1.0, tl.float32)
        best_slot = n_want * 0
        for start in range(lo, hi, CH):
            s = start + offs
            v = tl.load(val_ptr + s, mask=s < hi, other=-2.0)
            top = tl.max(v, 0)
            at = tl.min(tl.where(v == top, s, hi), 0)
            better = top > best
            best_slot = tl.where(better, at, best_slot)
            best = tl.where(better, top, best)
        tl.debug_barrier()  # NOTE #1
        if best >= 0.0:
            tl.store(vict_ptr + taken, best_slot)
            tl.store(flags_ptr + best_slot, tl.load(flags_ptr + best_slot) | TAKEN)
            tl.store(val_ptr + best_slot, -1.0)
            taken += 1
        tl.debug_barrier()
    return taken


@triton.jit
def _mark(ids_ptr, n_ids, mask_ptr, E, E_PAD: tl.constexpr, ID_BLOCK: tl.constexpr,
          COUNT: tl.constexpr = False):
    """mask[e] = 1 for every expert in ids[:n_ids], 0 otherwise (COUNT: how many of
    them name e, by atomics); returns it [E_PAD]."""
    e = tl.arange(0, E_PAD)
    tl.store(mask_ptr + e, tl.zeros([E_PAD], tl.int32), mask=e < E)
    tl.debug_barrier()
    for start in range(0, n_ids, ID_BLOCK):
        i = start + tl.arange(0, ID_BLOCK)
        ids = tl.load(ids_ptr + i, mask=i < n_ids, other=-1)
        one = tl.full([ID_BLOCK], 1, tl.int32)
        if COUNT:
            tl.atomic_add(mask_ptr + ids, one, mask=ids >= 0)
        else:
            tl.store(mask_ptr + ids, one, mask=ids >= 0)
    tl.debug_barrier()
    return tl.load(mask_ptr + e, mask=e < E, other=0)


@triton.jit
def _pick_victims(owner_ptr, flags_ptr, group_ptr, need_ptr, vict_ptr, layer, n_want,
                  E, CH: tl.constexpr):
    """CLOCK over a slot group's slots from its hand: take `n_want` slots that are
    neither locked (PROTECT, PINNED, TAKEN) nor holding an expert that `layer`'s call
    needs (need_ptr). A candidate with REF set loses the bit and is passed over once
    (second chance). Writes the victims to vict_ptr[0:taken] (marked TAKEN) and
    returns `taken`."""
    lo = tl.load(group_ptr + LO)
    num_slots = tl.load(group_ptr + HI) - lo
    hand = tl.load(group_ptr + HAND)
    offs = tl.arange(0, CH)
    width = tl.minimum(num_slots, CH)  # a chunk never holds a slot twice
    limit = 2 * num_slots + CH  # two sweeps clear every REF bit
    taken = n_want * 0
    scanned = n_want * 0
    while (taken < n_want) & (scanned < limit):
        live = offs < width
        s = lo + (hand + scanned + offs) % num_slots
        f = tl.load(flags_ptr + s, mask=live, other=PINNED)
        o = tl.load(owner_ptr + s, mask=live, other=-1)
        held = live & (o >= 0)
        o_layer = tl.where(held, o // E, -1)
        o_need = tl.load(need_ptr + tl.where(held, o % E, 0), mask=held, other=0)
        in_use = held & (o_layer == layer) & (o_need != 0)
        cand = live & ((f & (PROTECT | PINNED | TAKEN)) == 0) & (in_use == 0)
        ok = cand & ((f & REF) == 0)
        rank = tl.cumsum(ok.to(tl.int32), 0) - 1 + taken
        chosen = ok & (rank < n_want)
        n_chosen = tl.sum(chosen.to(tl.int32), 0)
        last = tl.max(tl.where(chosen, offs, -1), 0)
        done = taken + n_chosen >= n_want
        adv = tl.where(done, last + 1, width)
        passed = cand & ((f & REF) != 0) & (offs < adv)
        tl.debug_barrier()  # NOTE #1
        tl.store(vict_ptr + rank, s, mask=chosen)
        tl.store(flags_ptr + s, f | TAKEN, mask=chosen)
        tl.store(flags_ptr + s, f & ~REF, mask=passed)
        tl.debug_barrier()
        taken += n_chosen
        scanned += adv
    tl.store(group_ptr + HAND, (hand + scanned) % num_slots)
    tl.debug_barrier()
    return taken


@triton.jit
def _assign(layer, e, sel, rank, vict_ptr, table_ptr, owner_ptr, flags_ptr,
            counters_ptr, new_flags, E):
    """Give expert e (where `sel`) the victim vict[rank]: evict its old key, then
    point table and owner at the new one. Returns the slots [E_PAD] (0 where not sel)."""
    slot = tl.load(vict_ptr + rank, mask=sel, other=0)
    old = tl.load(owner_ptr + slot, mask=sel, other=-1)
    evict = sel & (old >= 0)
    # `old` is resident and the new keys are not, so these stores never collide.
    tl.store(table_ptr + old, tl.full(old.shape, -1, tl.int32), mask=evict)
    old_layer = tl.where(evict, old // E, 0)
    tl.atomic_add(counters_ptr + old_layer * NSTAT + EVICTIONS,
                  tl.full(old.shape, 1, tl.int64), mask=evict)
    key = layer * E + e
    tl.store(owner_ptr + slot, key, mask=sel)
    tl.store(table_ptr + key, slot, mask=sel)
    tl.store(flags_ptr + slot, tl.full(old.shape, 0, tl.int32) + new_flags, mask=sel)
    return slot


@triton.jit
def _add(ptr, value):
    tl.store(ptr, tl.load(ptr) + value.to(tl.int64))


@triton.jit
def _need_small(ids_ptr, n_ids, need_ptr, E, E_PAD: tl.constexpr, ID_BLOCK: tl.constexpr):
    """All ids in one block: the need mask in registers (no scatter, no barrier)."""
    e = tl.arange(0, E_PAD)
    i = tl.arange(0, ID_BLOCK)
    ids = tl.load(ids_ptr + i, mask=i < n_ids, other=-1)
    need = (tl.max((ids[:, None] == e[None, :]).to(tl.int32), 0) != 0) & (e < E)
    tl.store(need_ptr + e, need.to(tl.int32), mask=e < E)  # for victim search, prefetch
    return need, ids


@triton.jit
def _resolve(ids_ptr, n_ids, out_ptr, layer, table_ptr, owner_ptr, flags_ptr, state_ptr,
             group_of_ptr, groups_ptr, need_ptr, vict_ptr, job_key_ptr, job_slot_ptr,
             counters_ptr, pmask_ptr, pvalid_ptr, pred_ptr, uses_ptr, clock_ptr, val_ptr,
             E, J, L, inv_half_life, rebase_steps, DEPTH: tl.constexpr,
             E_PAD: tl.constexpr, ID_BLOCK: tl.constexpr, CH: tl.constexpr,
             SMALL: tl.constexpr, POLICY: tl.constexpr):
    e = tl.arange(0, E_PAD)
    group_ptr = groups_ptr + tl.load(group_of_ptr + layer) * NGROUP
    lo = tl.load(group_ptr + LO)
    steps = tl.full([], NEVER, tl.float32)
    if POLICY == REUSE:  # loads that do not wait for the need mask go first
        uses = tl.load(uses_ptr + layer * E + e, mask=e < E, other=NEVER)
        now, steps, shift = _start_call(layer, state_ptr, clock_ptr, uses_ptr, L * E,
                                        inv_half_life, rebase_steps, CH)
        uses = tl.where(uses > NEVER, uses - shift, uses)
    if SMALL:
        need, ids = _need_small(ids_ptr, n_ids, need_ptr, E, E_PAD, ID_BLOCK)
    else:
        need = _mark(ids_ptr, n_ids, need_ptr, E, E_PAD, ID_BLOCK) != 0
    if POLICY == REUSE:  # this call's experts count one use each
        tl.store(uses_ptr + layer * E + e, _log2_add(uses, now), mask=need)
    row = tl.load(table_ptr + layer * E + e, mask=e < E, other=-1)
    resident = row >= 0
    miss = need & (resident == 0)
    n_need = tl.sum(need.to(tl.int32), 0)
    n_miss = tl.sum(miss.to(tl.int32), 0)
    # Settle this layer's slots: mark the hits used; with prefetch, score it and
    # drop its locks.
    f = tl.load(flags_ptr + row, mask=resident, other=0)
    settled = tl.where(need, f | REF, f)
    n_pf_hit = n_need * 0
    n_pf_waste = n_need * 0
    if DEPTH > 0:
        ahead = resident & ((f & AHEAD) != 0)
        n_pf_hit = tl.sum((ahead & need).to(tl.int32), 0)
        n_pf_waste = tl.sum((ahead & (need == 0)).to(tl.int32), 0)
        n_unlock = tl.sum((resident & ((f & PROTECT) != 0)).to(tl.int32), 0)
        settled = settled & ~(PROTECT | AHEAD)
        tl.store(group_ptr + LOCKS, tl.load(group_ptr + LOCKS) - n_unlock)
    tl.debug_barrier()  # NOTE #1
    tl.store(flags_ptr + row, settled, mask=resident)
    for d in tl.static_range(DEPTH):  # prediction precision / recall per distance
        at = layer * DEPTH + d
        valid = tl.load(pvalid_ptr + at)
        pm = (tl.load(pmask_ptr + at * E + e, mask=e < E, other=0) * valid) != 0
        _add(pred_ptr + at * 3 + 0, tl.sum((pm & need).to(tl.int32), 0))
        _add(pred_ptr + at * 3 + 1, tl.sum(pm.to(tl.int32), 0))
        _add(pred_ptr + at * 3 + 2, n_need * valid)
        tl.store(pvalid_ptr + at, valid * 0)
    j = tl.arange(0, E_PAD)
    tl.store(job_key_ptr + j, tl.full([E_PAD], -1, tl.int32), mask=j < J)
    rank = tl.cumsum(miss.to(tl.int32), 0) - 1
    taken = n_miss * 0
    slot = row * 0
    if n_miss > 0:
        tl.debug_barrier()
        if POLICY == REUSE:
            taken = _pick_reuse(owner_ptr, flags_ptr, need_ptr, vict_ptr, uses_ptr, val_ptr,
                                layer, n_miss, lo, tl.load(group_ptr + HI), E, L, steps,
                                CH)
        else:
            taken = _pick_victims(owner_ptr, flags_ptr, group_ptr, need_ptr, vict_ptr,
                                  layer, n_miss, E, CH)
        got = miss & (rank < taken)
        slot = _assign(layer, e, got, rank, vict_ptr, table_ptr, owner_ptr, flags_ptr,
                       counters_ptr, REF, E)
        tl.store(job_key_ptr + rank, layer * E + e, mask=got)
        tl.store(job_slot_ptr + rank, slot, mask=got)
        tl.store(state_ptr + ERROR,
                 tl.load(state_ptr + ERROR) | (taken < n_miss).to(tl.int32))
        tl.debug_barrier()
    new_row = tl.where(miss & (rank < taken), slot, row)
    # ids -> slots in the group; -1 (a row vLLM pads a batch with) stays -1, which
    # vLLM's kernels skip; so does an expert no victim was found for (ERROR: the
    # sizing rule broken), which read slot 0, another expert's weights, before
    if SMALL:  # through the row in registers
        i = tl.arange(0, ID_BLOCK)
        slots = tl.sum(tl.where(ids[:, None] == e[None, :], new_row[None, :], 0), 1)
        slots = tl.where((ids >= 0) & (slots >= 0), slots - lo, -1)
        tl.store(out_ptr + i, slots.to(out_ptr.dtype.element_ty), mask=i < n_ids)
    else:
        for start in range(0, n_ids, ID_BLOCK):
            i = start + tl.arange(0, ID_BLOCK)
            ids = tl.load(ids_ptr + i, mask=i < n_ids, other=-1)
            slots = tl.load(table_ptr + layer * E + ids, mask=ids >= 0, other=-1)
            slots = tl.where((ids >= 0) & (slots >= 0), slots - lo, -1)
            tl.store(out_ptr + i, slots.to(out_ptr.dtype.element_ty), mask=i < n_ids)
    c = tl.arange(0, NSTAT)
    base = counters_ptr + layer * NSTAT
    delta = (tl.where(c == CALLS, 1, 0) + tl.where(c == HITS, n_need - n_miss, 0)
             + tl.where(c == MISSES, n_miss, 0) + tl.where(c == PF_HITS, n_pf_hit, 0)
             + tl.where(c == PF_WASTED, n_pf_waste, 0))
    tl.store(base + c, tl.load(base + c) + delta.to(tl.int64))


@triton.jit
def resolve_kernel(ids_ptr, n_ids, out_ptr, layer, table_ptr, owner_ptr, flags_ptr,
                   state_ptr, group_of_ptr, groups_ptr, need_ptr, vict_ptr, job_key_ptr,
                   job_slot_ptr, counters_ptr, pmask_ptr, pvalid_ptr, pred_ptr, uses_ptr,
                   clock_ptr, val_ptr, E, J, L, inv_half_life, rebase_steps,
                   DEPTH: tl.constexpr, E_PAD: tl.constexpr, ID_BLOCK: tl.constexpr,
                   CH: tl.constexpr, SMALL: tl.constexpr, POLICY: tl.constexpr,
                   PDL: tl.constexpr = False):
    """One layer call in one program: ids [n] -> out [n] slot ids (from the layer's
    group's first slot); misses become fill jobs for `fill_kernel`, the next launch
    on the same stream.
    (A fused variant, whose other programs waited on a doorbell and copied, measured
    slower on an H100: docs/results.md.) PDL: the fill is a programmatic dependent
    launch, let onto the SMs at once; it waits for this kernel in `gdc_wait`."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    _resolve(ids_ptr, n_ids, out_ptr, layer, table_ptr, owner_ptr, flags_ptr,
             state_ptr, group_of_ptr, groups_ptr, need_ptr, vict_ptr, job_key_ptr,
             job_slot_ptr, counters_ptr, pmask_ptr, pvalid_ptr, pred_ptr, uses_ptr,
             clock_ptr, val_ptr, E, J, L, inv_half_life, rebase_steps, DEPTH, E_PAD,
             ID_BLOCK, CH, SMALL, POLICY)


@triton.jit
def prefetch_kernel(ids_ptr, n_ids, layer, target, dist, table_ptr, owner_ptr,
                    flags_ptr, group_of_ptr, groups_ptr, need_ptr, vict_ptr, job_key_ptr,
                    job_slot_ptr, counters_ptr, pmask_ptr, pvalid_ptr, uses_ptr, clock_ptr,
                    val_ptr, E, J, L, DEPTH: tl.constexpr, E_PAD: tl.constexpr,
                    ID_BLOCK: tl.constexpr, CH: tl.constexpr, POLICY: tl.constexpr):
    """Layer `layer` predicts ids [n] for layer `target` (= layer + dist): within the
    budget of the target's group, minus the slots already locked there, take the
    predicted experts most named first (ties: the lower id), as host mode does:
    lock the resident ones, give slots to the missing ones (fill jobs for the copy
    stream). The vector axis runs over the experts in that order, so each cumsum
    below ranks by it."""
    group_ptr = groups_ptr + tl.load(group_of_ptr + target) * NGROUP
    at = target * DEPTH + dist - 1
    votes = _mark(ids_ptr, n_ids, pmask_ptr + at * E, E, E_PAD, ID_BLOCK, True)  # [E_PAD]
    tl.store(pvalid_ptr + at, n_ids * 0 + 1)
    i = tl.arange(0, E_PAD)
    order = tl.sort(tl.minimum(votes, 1 << 20) * E_PAD + (E_PAD - 1 - i), 0,
                    descending=True)  # (padding lanes, 0 votes and ids >= E: last)
    e = E_PAD - 1 - order % E_PAD  # [E_PAD] experts, most named first
    pm = (order // E_PAD) > 0
    row = tl.load(table_ptr + target * E + e, mask=e < E, other=-1)
    resident = row >= 0
    hit = pm & resident
    f = tl.load(flags_ptr + row, mask=hit, other=0)
    # the budget bounds every lock, a hit's too (NOTE #4 of device_cache.py)
    budget = tl.load(group_ptr + BUDGET)
    locks = tl.load(group_ptr + LOCKS)
    lockable = hit & ((f & PROTECT) == 0)
    wanted = lockable | (pm & (resident == 0))  # each takes one unit of the budget
    within = wanted & (tl.cumsum(wanted.to(tl.int32), 0) <= budget - locks)
    newly = within & lockable
    tl.debug_barrier()  # NOTE #1: `want` below decides a loop with barriers
    tl.store(flags_ptr + row, f | PROTECT, mask=newly)
    locks += tl.sum(newly.to(tl.int32), 0)
    miss = within & (resident == 0)
    want = tl.sum(miss.to(tl.int32), 0)
    j = tl.arange(0, E_PAD)
    tl.store(job_key_ptr + j, tl.full([E_PAD], -1, tl.int32), mask=j < J)
    tl.debug_barrier()
    if POLICY == REUSE:
        taken = want * 0
        if want > 0:  # its first pass reads every slot
            taken = _pick_reuse(owner_ptr, flags_ptr, need_ptr, vict_ptr, uses_ptr,
                                val_ptr, layer, want, tl.load(group_ptr + LO),
                                tl.load(group_ptr + HI), E, L, tl.load(clock_ptr), CH)
    else:
        taken = _pick_victims(owner_ptr, flags_ptr, group_ptr, need_ptr, vict_ptr, layer,
                              want, E, CH)
    rank = tl.cumsum(miss.to(tl.int32), 0) - 1
    sel = miss & (rank < taken)
    slot = _assign(target, e, sel, rank, vict_ptr, table_ptr, owner_ptr, flags_ptr,
                   counters_ptr, PROTECT | AHEAD, E)
    tl.store(job_key_ptr + rank, target * E + e, mask=sel)
    tl.store(job_slot_ptr + rank, slot, mask=sel)
    tl.store(group_ptr + LOCKS, locks + taken)
    _add(counters_ptr + target * NSTAT + PREFETCHED, taken)


@triton.jit
def _copy_part(src, dst, n, part, PARTS: tl.constexpr, BLOCK: tl.constexpr):
    """Copy this program's share [part/PARTS] of n words from src to dst, two
    blocks in flight per step (a host read waits the link's latency)."""
    per = tl.cdiv(tl.cdiv(n, PARTS), BLOCK) * BLOCK
    lo = part * per
    hi = tl.minimum(lo + per, n)
    for start in range(lo, hi, 2 * BLOCK):
        i0 = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK), BLOCK), BLOCK)
        i1 = i0 + BLOCK
        a = tl.load(src + i0, mask=i0 < hi)
        b = tl.load(src + i1, mask=i1 < hi)
        tl.store(dst + i0, a, mask=i0 < hi)
        tl.store(dst + i1, b, mask=i1 < hi)


@triton.jit
def _record_row(key, row_ptr, loads_ptr, E, first, ROWS: tl.constexpr,
                COUNT: tl.constexpr):
    """The record of job `key` in this store: row `key`, or with ROWS (a store of
    some experts only: mixed precision) `rows[key]`; -1 for no job, or where another
    store holds it. COUNT: the `first` program counts the job in `loads[layer]`."""
    row = key
    if ROWS:
        row = tl.where(key >= 0, tl.load(row_ptr + tl.maximum(key, 0)), -1)
    if COUNT:
        if first & (row >= 0):
            tl.atomic_add(loads_ptr + key // E, 1)
    return row


@triton.jit
def _fill_jobs(src_ptr, job_key_ptr, job_slot_ptr, J, part, record_words,
               dst0, off0, n0, dst1, off1, n1, dst2, off2, n2, dst3, off3, n3, row_ptr,
               loads_ptr, E, NT: tl.constexpr, PARTS: tl.constexpr, BLOCK: tl.constexpr,
               E_PAD: tl.constexpr, ROWS: tl.constexpr, COUNT: tl.constexpr):
    """This program's part of every job: expert record `key` (host memory) into
    slot `slot` of each slot buffer. One vector read decides that there is none."""
    j = tl.arange(0, E_PAD)
    keys = tl.load(job_key_ptr + j, mask=j < J, other=-1, cache_modifier=".cg")
    if tl.max(keys, 0) >= 0:
        for k in range(0, J):
            key = tl.load(job_key_ptr + k, cache_modifier=".cg")
            row = _record_row(key, row_ptr, loads_ptr, E, part == 0, ROWS, COUNT)
            if row >= 0:
                slot = tl.load(job_slot_ptr + k, cache_modifier=".cg").to(tl.int64)
                src = src_ptr + row.to(tl.int64) * record_words
                _copy_part(src + off0, dst0 + slot * n0, n0, part, PARTS, BLOCK)
                if NT > 1:
                    _copy_part(src + off1, dst1 + slot * n1, n1, part, PARTS, BLOCK)
                if NT > 2:
                    _copy_part(src + off2, dst2 + slot * n2, n2, part, PARTS, BLOCK)
                if NT > 3:
                    _copy_part(src + off3, dst3 + slot * n3, n3, part, PARTS, BLOCK)


@triton.jit
def fill_kernel(src_ptr, job_key_ptr, job_slot_ptr, J, record_words,
                dst0, off0, n0, dst1, off1, n1, dst2, off2, n2, dst3, off3, n3, row_ptr,
                loads_ptr, E, NT: tl.constexpr, PARTS: tl.constexpr, BLOCK: tl.constexpr,
                E_PAD: tl.constexpr, ROWS: tl.constexpr = False, COUNT: tl.constexpr = False,
                PDL: tl.constexpr = False):
    """Grid (PARTS,): demand fills on the compute stream, prefetch fills on the copy
    stream. PDL: launched as a programmatic dependent of the kernel before it. ROWS:
    see `_record_row`; COUNT: as in `decode_fill_kernel` (a store it copies whole)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
    _fill_jobs(src_ptr, job_key_ptr, job_slot_ptr, J, tl.program_id(0), record_words,
               dst0, off0, n0, dst1, off1, n1, dst2, off2, n2, dst3, off3, n3, row_ptr,
               loads_ptr, E, NT, PARTS, BLOCK, E_PAD, ROWS, COUNT)


@triton.jit
def _decode_range(codes_ptr, half_ptr, base, slot, dst, codes_off, scale_off, zero_off, n,
                  n_out, index, lo, hi, GATHER: tl.constexpr, BITS: tl.constexpr,
                  GROUP: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr):
    """Slot values [lo, hi) of one matrix of one job: its record (at byte `base` of
    host memory: codes_ptr its bytes, codes_off in bytes; half_ptr the same memory as
    fp16, scale_off and zero_off in fp16 elements) holds n values; with GATHER, slot
    value j is record value index[j] (-1: zero)."""
    codes = codes_ptr + base + codes_off
    scale = half_ptr + base // 2 + scale_off
    zero = half_ptr + base // 2 + zero_off
    for start in range(lo, hi, BLOCK):
        i = start + tl.arange(0, BLOCK).to(tl.int64)
        m = i < hi
        src = i
        if GATHER:
            src = tl.load(index + i, mask=m, other=-1).to(tl.int64)
        w = decode_values(codes, scale, zero, tl.maximum(src, 0), m & (src >= 0), n, BITS,
                          GROUP)
        store_values(dst + slot * n_out + i, tl.where(src >= 0, w, 0.0), m, BF16)


@triton.jit
def decode_fill_kernel(codes_ptr, half_ptr, job_key_ptr, job_slot_ptr, J, record_bytes,
                       dst0, codes0, scale0, zero0, n0, n_out0, index0,
                       dst1, codes1, scale1, zero1, n1, n_out1, index1,
                       row_ptr, loads_ptr, E,
                       NM: tl.constexpr, GATHER: tl.constexpr, BITS: tl.constexpr,
                       GROUP: tl.constexpr, BF16: tl.constexpr, PARTS: tl.constexpr,
                       BLOCK: tl.constexpr, E_PAD: tl.constexpr, ROWS: tl.constexpr = False,
                       COUNT: tl.constexpr = False, PDL: tl.constexpr = False):
    """Grid (PARTS,), fill for a quantized store: the slot values of its NM (1 or 2)
    matrices, w13's then w2's, are one range that the programs split evenly; each
    decodes its part of every job. PDL: as in `fill_kernel`; ROWS: see `_record_row`;
    COUNT: program 0 counts the jobs this store filled per layer in `loads [L]`
    (a mixed store's misses differ in bytes by store)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
    j = tl.arange(0, E_PAD)
    keys = tl.load(job_key_ptr + j, mask=j < J, other=-1, cache_modifier=".cg")
    if tl.max(keys, 0) >= 0:
        total = n_out0
        if NM == 2:
            total += n_out1
        per = tl.cdiv(tl.cdiv(total, PARTS), BLOCK) * BLOCK
        lo = tl.program_id(0) * per
        hi = tl.minimum(lo + per, total)
        for k in range(0, J):
            key = tl.load(job_key_ptr + k, cache_modifier=".cg")
            row = _record_row(key, row_ptr, loads_ptr, E, tl.program_id(0) == 0, ROWS,
                              COUNT)
            if row >= 0:
                slot = tl.load(job_slot_ptr + k, cache_modifier=".cg").to(tl.int64)
                base = row.to(tl.int64) * record_bytes
                _decode_range(codes_ptr, half_ptr, base, slot, dst0, codes0, scale0, zero0,
                              n0, n_out0, index0, lo, tl.minimum(hi, n_out0), GATHER, BITS,
                              GROUP, BF16, BLOCK)
                if NM == 2:
                    _decode_range(codes_ptr, half_ptr, base, slot, dst1, codes1, scale1,
                                  zero1, n1, n_out1, index1, tl.maximum(lo - n_out0, 0),
                                  hi - n_out0, GATHER, BITS, GROUP, BF16, BLOCK)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))
