"""What host mode (ExpertCache) and device mode (DeviceExpertCache) share."""

from __future__ import annotations

import torch

from .store import ExpertStore


class SlotBuffers:
    """What both modes share: the slot buffers [S, *shape], one per expert tensor."""

    store: ExpertStore
    buffers: list[torch.Tensor]

    @property
    def slot_bytes(self) -> int:
        return self.store.layout.expert_bytes

    @property
    def read_bytes(self) -> int:
        """Bytes one expert load moves from the store (less than a slot when quantized)."""
        return self.store.read_bytes

    @property
    def pool_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def slot_views(self, slot: int) -> list[torch.Tensor]:
        return [b[slot] for b in self.buffers]


def reroute(resident: torch.Tensor, topk_ids: torch.Tensor, scores: torch.Tensor,
            tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`resident` [E] bool; see `ExpertCache.reroute_misses`. Returns (ids, swaps)."""
    resident = resident.to(topk_ids.device)
    tokens = tokens.to(topk_ids.device)
    if not bool(tokens.any()) or bool(resident[topk_ids[tokens]].all()):
        return topk_ids, 0
    scores = scores.float().masked_fill(~resident, float("-inf"))
    scores = scores.scatter(1, topk_ids.long(), float("-inf"))
    best_scores, best = scores.topk(topk_ids.shape[1], dim=1)
    miss = ~resident[topk_ids.long()] & tokens.unsqueeze(1)
    rank = (miss.cumsum(1) - 1).clamp(min=0)  # a row's i-th miss takes its i-th best
    swap = miss & torch.isfinite(best_scores.gather(1, rank))
    return torch.where(swap, best.gather(1, rank).to(topk_ids.dtype), topk_ids), int(swap.sum())
