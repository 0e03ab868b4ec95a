"""The key of one expert everywhere: which MoE layer, which expert."""

from typing import NamedTuple


class ExpertKey(NamedTuple):
    layer: int  # MoE layer index (0-based, in model order)
    expert: int  # expert id as the router emits it (global id)
