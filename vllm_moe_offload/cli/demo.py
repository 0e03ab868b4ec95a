"""Demo: serve a tiny generated MoE with only part of its experts resident.

    python -m vllm_moe_offload demo [--pool-fraction 0.5] [--store disk]

Builds a random-weight Qwen3-MoE checkpoint (no hub needed), generates with
vLLM on this machine with expert offload on, and prints the text, the cache
statistics and the memory the experts no longer take.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "vllm_moe_offload_demo"))
    p.add_argument("--pool-fraction", type=float, default=0.5)
    p.add_argument("--store", default="disk", choices=["host", "disk"])
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from vllm_moe_offload.hf.tiny_moe import build_tiny_moe, expert_bytes

    layers, experts = 6, 16
    model = str(build_tiny_moe(Path(args.model_dir) / "tiny-qwen3-moe", "qwen3_moe",
                               num_layers=layers, num_experts=experts, hidden_size=256,
                               expert_ffn=512))
    slots = max(experts, int(layers * experts * args.pool_fraction))

    from vllm import LLM, SamplingParams

    import vllm_moe_offload

    started = time.perf_counter()
    llm = LLM(model=model, max_model_len=512, gpu_memory_utilization=0.5, seed=0,
              additional_config={"expert_offload": {
                  "enabled": True, "pool_slots": slots, "store": args.store,
                  "store_dir": str(Path(args.model_dir) / "store")}})
    prompts = ["The quick brown fox", "def add(a, b):",
               "Expert offloading keeps only a bounded pool of experts in fast memory. " * 8]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens))
    elapsed = time.perf_counter() - started

    print("\n=== vllm-moe-offload demo ===")
    print(f"model: {model} ({layers} MoE layers x {experts} experts; random weights, so the "
          "text is gibberish; tests/e2e check it is token for token plain vLLM's)")
    for prompt, out in zip(prompts, outputs):
        print(f"- prompt {prompt[:40]!r}... -> {out.outputs[0].text!r}")
    stats = vllm_moe_offload.get_stats(llm)
    t, pool = stats["totals"], stats["pool"]
    all_bytes = expert_bytes(model)
    print(f"pool: {pool['num_slots']} of {layers * experts} expert slots, store: {pool['store']}")
    print(f"cache: hit rate {t['hit_rate']:.1%} ({t['hits']} hits, {t['misses']} misses, "
          f"{t['evictions']} evictions), {t['bytes_loaded'] / 2**20:.1f} MiB loaded in "
          f"{t['load_seconds']:.3f} s")
    print(f"expert memory: {pool['pool_bytes'] / 2**20:.1f} MiB resident instead of "
          f"{all_bytes / 2**20:.1f} MiB ({1 - pool['pool_bytes'] / all_bytes:.0%} saved); "
          f"worker RSS {stats['rss_bytes'] / 2**30:.2f} GiB")
    print(f"total time {elapsed:.1f} s (start-up included)")


if __name__ == "__main__":
    main()
