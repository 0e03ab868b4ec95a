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


def test_folding_twice_says_nothing_new_and_lone_report_settings_are_named(caplog):
    """vLLM folds the folded config again (every field in it): the 'off' warning then
    listed all 21 of them. --expert-trace-path alone no longer turns offload on, and
    wrote no trace, silently."""
    with caplog.at_level("WARNING", logger="vllm.moe_offload"):
        once = fold_offload_config({}, {"trace_path": "t.bin"})
    assert once["expert_offload"]["enabled"] is False
    assert ("off; trace_path set, which alone does not turn it on (add "
            "--enable-expert-offload)") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="vllm.moe_offload"):
        fold_offload_config(once)
        off = fold_offload_config({}, {"enabled": False, "pool_slots": 64})
        fold_offload_config(off)
    assert caplog.text.count("expert offload: off (enabled=false") == 1, caplog.text
    assert "pool_slots set, and ignored" in caplog.text and "eviction" not in caplog.text
