"""Run one vLLM engine in its own process and print its results as JSON.

Used by the e2e tests so that every engine configuration starts clean:
    python -m tests.e2e.run_engine '{"model": ..., "offload": {...} | null, ...}'
Prints one line `RESULT <json>` with greedy token ids and offload stats.
"""

import json
import os
import sys


def main(spec: dict) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    import vllm_moe_offload

    kwargs = dict(model=spec["model"], gpu_memory_utilization=0.5,
                  max_model_len=spec.get("max_model_len", 512),
                  enforce_eager=spec.get("enforce_eager", True), seed=0,
                  load_format=spec.get("load_format", "auto"))
    if spec.get("offload") is not None:
        kwargs["additional_config"] = {"expert_offload": spec["offload"]}
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 24),
                            ignore_eos=True)
    outputs = llm.generate(spec["prompts"], params, use_tqdm=False)
    return {
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "texts": [o.outputs[0].text for o in outputs],
        "prompt_lens": [len(o.prompt_token_ids) for o in outputs],
        "stats": vllm_moe_offload.get_stats(llm),
    }


if __name__ == "__main__":
    result = main(json.loads(sys.argv[1]))
    print("RESULT " + json.dumps(result), flush=True)
