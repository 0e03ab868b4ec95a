"""How the three sources fold into one config (plugin.py), without an engine."""

from vllm_moe_offload.integration.vllm.plugin import fold_offload_config


def test_a_false_from_any_source_is_said_with_what_it_leaves_unused(caplog, monkeypatch):
    """VLLM_MOE_OFFLOAD_ENABLED=0 with --expert-pool-slots 64 kept offload off, and
    nothing said so."""
    monkeypatch.setenv("VLLM_MOE_OFFLOAD_ENABLED", "0")
    with caplog.at_level("WARNING", logger="vllm.moe_offload"):
        cfg = fold_offload_config({}, {"pool_slots": 64})["expert_offload"]
    assert cfg["enabled"] is False
    assert "off (enabled=false, from env); pool_slots set, and ignored" in caplog.text
    monkeypatch.delenv("VLLM_MOE_OFFLOAD_ENABLED")
    caplog.clear()
    with caplog.at_level("WARNING", logger="vllm.moe_offload"):  # off, nothing else: quiet
        fold_offload_config({"expert_offload": {"enabled": False, "store_dir": "/x"}})
    assert caplog.text == ""
