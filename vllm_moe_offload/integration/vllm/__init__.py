"""The only package that imports vLLM. `register` is the `vllm.general_plugins` entry."""

from vllm_moe_offload.integration.vllm.plugin import register

__all__ = ["register"]
