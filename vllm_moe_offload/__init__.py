"""vllm-moe-offload: serve MoE models with a bounded pool of resident experts."""

from vllm_moe_offload.core.config import OffloadConfig

__version__ = "0.1.0"
__all__ = ["OffloadConfig", "get_stats", "__version__"]


def get_stats(llm) -> dict:
    """Per-layer hits, misses, bytes loaded and load seconds of an `LLM`'s workers.

    Returns `{"layers": {layer: {...}}, "totals": {...}, "pool": {...}}` for the
    first worker (one per engine on CPU), and its resident memory, `"rss_bytes"`:
    with offload off, only that.
    """
    from vllm_moe_offload.integration.vllm.worker import collect_stats

    return collect_stats(llm)
