"""What does the router-id -> slot remap cost per layer call, with nothing to load?

    .venv/bin/python benchmarks/remap_cost.py

Times `ExpertCache.map_to_slots` on the hit path (every expert resident; CPU, no
vLLM) for a decode call (1 token, top-2) and a batch of 8, and the dispatch cost of
a `torch.library` custom op like the plugin's (an identity op), against a plain call.
"""

import time

import torch

from vllm_moe_offload.runtime.expert_cache import ExpertCache
from vllm_moe_offload.runtime.store import ExpertLayout, HostStore, TensorSpec

L, E, H, I = 8, 16, 192, 192  # the shape of ../shared/models/tiny-moe-4domains


@torch.library.custom_op("remap_cost::identity", mutates_args=())
def identity_op(ids: torch.Tensor, hidden: torch.Tensor, layer: int) -> torch.Tensor:
    return ids.clone()


@identity_op.register_fake
def _(ids, hidden, layer):
    return torch.empty_like(ids)


def per_call_us(fn, n=5000) -> float:
    for _ in range(200):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    layout = ExpertLayout((TensorSpec((2 * I, H), torch.bfloat16),
                           TensorSpec((H, I), torch.bfloat16)))
    store = HostStore(layout, L, E)
    for layer in range(L):
        for e in range(E):
            store.put(layer, e, [torch.zeros(s.shape, dtype=s.dtype) for s in layout.tensors])
    store.seal()
    cache = ExpertCache(store, L * E, "cpu")
    rows = []
    for tokens in (1, 8):
        ids = torch.randint(0, E, (tokens, 2), dtype=torch.int32)
        hidden = torch.zeros(tokens, H)
        layer = iter(range(10**9))
        rows.append((f"map_to_slots, all hits, {tokens} token(s)",
                     per_call_us(lambda: cache.map_to_slots(next(layer) % L, ids))))
        rows.append((f"custom-op dispatch, {tokens} token(s)",
                     per_call_us(lambda: identity_op(ids, hidden, 0))
                     - per_call_us(lambda: ids.clone())))
    print("| what | us per layer call |\n|---|---|")
    for what, us in rows:
        print(f"| {what} | {us:.1f} |")


if __name__ == "__main__":
    main()
