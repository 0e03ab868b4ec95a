"""Demo: serve a small MoE trained on real text with only part of its experts resident.

    python -m vllm_moe_offload demo [--pool-fraction 0.5] [--store disk] [--model DIR]

Serves `models/tiny-moe-4domains` of this repository (8 MoE layers x 16 experts,
trained on Python, C, English prose and licence text; models/README.md) with
vLLM on this machine and expert offload on, prints what it writes, the cache
statistics, the expert memory no longer resident and the KV cache that memory
holds. Without the repository's model it builds a random-weight one (no hub
needed; its text is gibberish, but still token for token plain vLLM's).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-moe-4domains"
PROMPTS = [  # one per domain the model was trained on
    "/* Copyright (C) 1991-2022 Free Software Foundation, Inc.\n   This file is part of",
    "This program is free software; you can redistribute it",
    "To open a new window, type",
    "class Queue:\n    def __init__(self",
]


def kv_bytes_per_token(model_dir: str) -> int | None:
    """K and V of every attention layer for one token, in the checkpoint's dtype; None
    where that formula does not hold (MLA, linear or sliding-window attention)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = config.get("text_config") or config
    types = cfg.get("layer_types") or []
    if (cfg.get("kv_lora_rank") or cfg.get("use_sliding_window") or "num_attention_heads"
            not in cfg or any(t != "full_attention" for t in types)):
        return None
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    dtype = cfg.get("dtype", cfg.get("torch_dtype", config.get("torch_dtype")))
    dtype_bytes = 4 if dtype == "float32" else 2
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes


def moe_shape(config: dict) -> tuple[int, int]:
    """(MoE layers, experts per layer) of an HF config.json (a vision-language one's
    text_config), by the plugin's own count (plugin.py)."""
    from types import SimpleNamespace

    from vllm_moe_offload.integration.vllm.plugin import moe_layer_count, routed_experts

    text = SimpleNamespace(**(config.get("text_config") or config))
    return moe_layer_count(text), routed_experts(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(SHIPPED_MODEL) if SHIPPED_MODEL.is_dir() else None,
                   help="a MoE checkpoint directory (README: supported models; "
                        "default: the repository's tiny-moe-4domains)")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(),
                                                      "vllm_moe_offload_demo"),
                   help="where the disk store (and a generated model) go")
    p.add_argument("--pool-fraction", type=float, default=0.5)
    p.add_argument("--store", default="disk", choices=["host", "disk"])
    p.add_argument("--max-tokens", type=int, default=40)
    args = p.parse_args(argv)
    if not 0 < args.pool_fraction <= 1:
        p.error(f"--pool-fraction={args.pool_fraction}: give a share of the experts in (0, 1]")
    if args.max_tokens < 1:
        p.error(f"--max-tokens={args.max_tokens}: give 1 or more tokens to generate")
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        p.error(f"--model {args.model}: not a checkpoint directory with a config.json "
                "(the demo reads local checkpoints; nothing is downloaded)")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from vllm_moe_offload.hf.tiny_moe import build_tiny_moe, expert_bytes

    model = args.model
    trained = model is not None and Path(model).resolve() == SHIPPED_MODEL.resolve()
    if model is None:
        model = str(build_tiny_moe(Path(args.work_dir) / "tiny-qwen3-moe", "qwen3_moe",
                                   num_layers=6, num_experts=16, hidden_size=256,
                                   expert_ffn=512))
    layers, experts = moe_shape(json.loads((Path(model) / "config.json").read_text()))
    if not experts:
        p.error(f"--model {model}: its config.json names no routed experts (a dense model?)")
    slots = max(experts, int(layers * experts * args.pool_fraction))

    from vllm import LLM, SamplingParams

    import vllm_moe_offload

    started = time.perf_counter()
    llm = LLM(model=model, max_model_len=512, gpu_memory_utilization=0.5, seed=0,
              additional_config={"expert_offload": {
                  "pool_slots": slots, "store": args.store,
                  "store_dir": str(Path(args.work_dir) / "store")}})
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=args.max_tokens))
    elapsed = time.perf_counter() - started

    print("\n=== vllm-moe-offload demo ===")
    print(f"model: {model}\n  {layers} MoE layers x {experts} experts" + (
        ", trained on Python, C, English prose and licence text" if trained else
        "" if args.model else ", random weights, so the text is gibberish (tests/e2e "
        "check it is token for token plain vLLM's)"))
    bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
    for prompt, out in zip(PROMPTS, outputs):
        print(f"\n>>> {prompt}{bold}{out.outputs[0].text}{plain}")
    stats = vllm_moe_offload.get_stats(llm)
    t, pool = stats["totals"], stats["pool"]
    all_bytes = expert_bytes(model) or pool["store_bytes"]  # (the checkpoint's, else the store's)
    # in this host's fast memory: the pool, and on a CPU a host store's copy of all
    from vllm.platforms import current_platform

    from vllm_moe_offload.runtime.store_dir import RAM_FILE_SYSTEMS, file_system_of

    fs = file_system_of(pool["store_path"]) if pool["store"] == "disk" else None
    where = "a host store" if fs is None else f"a disk store on {fs}"
    in_ram = current_platform.is_cpu() and (fs is None or fs in RAM_FILE_SYSTEMS)
    held = pool["pool_bytes"] + (pool["store_bytes"] if in_ram else 0)
    freed = all_bytes - held
    per_token = kv_bytes_per_token(model)
    print(f"\npool: {pool['num_slots']} of {pool['num_layers'] * pool['experts_per_layer']} "
          f"expert slots, store: {pool['store']}")
    print(f"cache: hit rate {t['hit_rate']:.1%} ({t['hits']} hits, {t['misses']} misses, "
          f"{t['evictions']} evictions), {t['bytes_loaded'] / 2**20:.1f} MiB loaded in "
          f"{t['load_seconds']:.3f} s")
    if freed <= 0:  # a store in RAM on a CPU host: RAM is the fast memory too
        print(f"expert memory: the pool ({pool['pool_bytes'] / 2**20:.1f} MiB) and "
              f"{where} ({pool['store_bytes'] / 2**20:.1f} MiB) both sit in RAM, the fast "
              "memory here: nothing saved. Use --store disk with --work-dir on a disk.")
        print(f"total time {elapsed:.1f} s (start-up included)")
        return
    print(f"expert memory: {pool['pool_bytes'] / 2**20:.1f} MiB resident instead of "
          f"{all_bytes / 2**20:.1f} MiB ({freed / all_bytes:.0%} saved); worker RSS "
          f"{stats['rss_bytes'] / 2**30:.2f} GiB")
    if per_token:
        print(f"KV cache room: the {freed / 2**20:.1f} MiB of experts left in the store "
              f"would hold {freed // per_token:,} more tokens of KV cache at this model's "
              f"{per_token / 1024:.0f} KiB per token (on a GPU, vLLM's memory profiling "
              "gives them to the KV cache; on CPU its size is VLLM_CPU_KVCACHE_SPACE)")
    print(f"total time {elapsed:.1f} s (start-up included)")


if __name__ == "__main__":
    main()
