"""`python -m vllm_moe_offload SUBCOMMAND ...`: the same front door as `vllm-moe-offload`."""

from vllm_moe_offload.cli import main

main()
