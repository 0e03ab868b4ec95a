"""The worker's resident memory really falls when experts live on disk (the pool
holds a quarter of them: three quarters of the expert bytes can be saved)."""

from tests.e2e.conftest import run_engine
from vllm_moe_offload.hf.tiny_moe import build_tiny_moe, expert_bytes

LAYERS, EXPERTS = 6, 32


def test_disk_store_at_quarter_pool_frees_most_expert_memory(tmp_path_factory):
    # Experts are ~97% of this checkpoint's weights (576 MiB of experts).
    model = str(build_tiny_moe(tmp_path_factory.mktemp("big") / "m", "qwen3_moe",
                               num_layers=LAYERS, num_experts=EXPERTS, hidden_size=512,
                               expert_ffn=1024))
    experts = expert_bytes(model)
    prompts = ["Hello world", "def add(a, b):"]
    plain = run_engine({"model": model, "offload": None, "prompts": prompts,
                        "max_tokens": 8, "in_process": True})
    off = run_engine({"model": model, "prompts": prompts, "max_tokens": 8,
                      "in_process": True, "offload": {
        "enabled": True, "pool_slots": LAYERS * EXPERTS // 4, "store": "disk",
        "store_dir": str(tmp_path_factory.mktemp("store"))}})
    assert off["token_ids"] == plain["token_ids"]
    saved = plain["stats"]["rss_bytes"] - off["stats"]["rss_bytes"]
    print(f"expert bytes {experts / 2**20:.0f} MiB, RSS plain "
          f"{plain['stats']['rss_bytes'] / 2**20:.0f} MiB, offload "
          f"{off['stats']['rss_bytes'] / 2**20:.0f} MiB, saved {saved / 2**20:.0f} MiB")
    assert off["stats"]["pool"]["pool_bytes"] <= experts / 4 * 1.01
    assert saved >= 0.6 * experts
