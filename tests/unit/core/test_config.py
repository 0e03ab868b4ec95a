import pytest

from vllm_moe_offload.core.config import OffloadConfig


def test_defaults_are_off():
    cfg = OffloadConfig()
    assert not cfg.enabled and cfg.store == "auto"


def test_env_then_additional_config_on_top():
    env = {"VLLM_MOE_OFFLOAD_ENABLED": "1", "VLLM_MOE_OFFLOAD_POOL_SLOTS": "12",
           "VLLM_MOE_OFFLOAD_STORE": "disk"}
    cfg = OffloadConfig.resolve({"expert_offload": {"pool_slots": 20}}, environ=env)
    assert cfg.enabled and cfg.pool_slots == 20 and cfg.store == "disk"


@pytest.mark.parametrize("values, words", [
    ({"store": "nvme"}, ["store='nvme'", "host", "disk"]),
    ({"pool_slots": 0}, ["pool_slots=0"]),
    ({"pool_slots": 4, "pool_gib": 1.0}, ["only one"]),
    ({"pool_gib": -1}, ["pool_gib=-1"]),
    ({"stats_log_interval_s": -5}, ["stats_log_interval_s=-5"]),
    ({"pool_slot": 4}, ["unknown", "pool_slot"]),
    ({"eviction": "mru"}, ["eviction='mru'", "lru", "reuse", "--expert-eviction"]),
    ({"store_bits": 5}, ["store_bits=5", "16, 8, 4, 3, 2", "--expert-store-bits"]),
    ({"store_group_size": 12}, ["store_group_size=12", "multiple of 8"]),
    ({"store_quantizer": "gptq"}, ["store_quantizer='gptq'", "hqq", "rtn"]),
    ({"store_hot_bits": 8}, ["store_hot_bits=8", "store_bits is 16", "--expert-store-bits"]),
    ({"store_bits": 4, "store_hot_bits": 2, "task_profiles_path": "p"},
     ["store_hot_bits=2", "16, 8", "more than store_bits=4"]),
    ({"store_bits": 2, "store_hot_bits": 8}, ["store_hot_bits=8", "task_profiles_path",
                                              "--expert-task-profiles"]),
    ({"store_bits": 2, "store_hot_bits": 8, "task_profiles_path": "p",
      "store_hot_share": 0}, ["store_hot_share=0", "(0, 1]"]),
    ({"eviction": "predicted"}, ["eviction='predicted'", "predictor", "next-gate",
                                 "eviction='reuse'"]),
])
def test_bad_values_name_the_field_and_value(values, words):
    with pytest.raises(ValueError) as err:
        OffloadConfig.from_dict(values)
    for w in words:
        assert w in str(err.value)


def test_bad_env_value_names_the_variable():
    with pytest.raises(ValueError, match="VLLM_MOE_OFFLOAD_POOL_SLOTS"):
        OffloadConfig.resolve({}, environ={"VLLM_MOE_OFFLOAD_POOL_SLOTS": "many"})


@pytest.mark.parametrize("values, words", [
    ({"pool_slots": 64.5}, ["pool_slots=64.5", "not a valid int", "--expert-pool-slots"]),
    ({"store_bits": 4.5}, ["store_bits=4.5"]),
    ({"pool_slots": True}, ["pool_slots=True"]),
    ({"pool_gib": float("nan")}, ["pool_gib=nan", "not a valid float"]),
    ({"pool_gib": "inf"}, ["pool_gib='inf'"]),
    ({"enabled": "maybe"}, ["enabled='maybe'", "--enable-expert-offload"]),
    ({"enabled": 2}, ["enabled=2", "not a valid bool"]),
    ({"store_dir": 5}, ["store_dir=5", "not a valid str"]),
])
def test_values_of_the_wrong_type_are_refused(values, words):
    """Values from additional_config are checked too (before: passed through, so 64.5
    slots ran, and NaN failed later without naming the setting)."""
    with pytest.raises(ValueError) as err:
        OffloadConfig.from_dict(values)
    for w in words:
        assert w in str(err.value)


def test_values_of_other_sources_become_the_fields_type(tmp_path):
    """A path object (JSON-safe afterwards: vLLM hashes additional_config with json),
    an integral float, a JSON-style string."""
    import json

    cfg = OffloadConfig.from_dict({"store_dir": tmp_path, "pool_slots": 64.0,
                                   "pool_gib": None, "task_aware": "true"})
    assert (cfg.store_dir, cfg.pool_slots, cfg.task_aware) == (str(tmp_path), 64, True)
    json.dumps(cfg.to_dict())


def test_a_source_above_replaces_the_other_of_pool_slots_and_pool_gib():
    """Before: VLLM_MOE_OFFLOAD_POOL_SLOTS exported and pool_gib passed was refused as
    both set, though a source above overrides one below."""
    env = {"VLLM_MOE_OFFLOAD_POOL_SLOTS": "64"}
    cfg = OffloadConfig.resolve({"expert_offload": {"pool_gib": 8}}, environ=env)
    assert (cfg.pool_slots, cfg.pool_gib) == (None, 8.0)
    with pytest.raises(ValueError, match="only one"):  # one source setting both
        OffloadConfig.resolve({"expert_offload": {"pool_gib": 8, "pool_slots": 4}}, env)


@pytest.mark.parametrize("section", [True, "on", ["pool_slots"]])
def test_an_expert_offload_section_that_is_not_a_mapping_is_refused(section):
    with pytest.raises(ValueError, match="must be a mapping of settings"):
        OffloadConfig.resolve({"expert_offload": section}, environ={})


def test_pool_must_cover_one_layer():
    cfg = OffloadConfig(enabled=True, pool_slots=6)
    with pytest.raises(ValueError) as err:
        cfg.num_slots(num_layers=4, experts_per_layer=8, slot_bytes=1 << 20)
    assert "pool_slots=6" in str(err.value) and "pool_slots >= 8" in str(err.value)


def test_pool_sizes():
    assert OffloadConfig(pool_slots=100).num_slots(4, 8, 1) == 32  # capped at all
    assert OffloadConfig().num_slots(4, 8, 1) == 16  # default: half
    assert OffloadConfig(pool_gib=10 / 1024).num_slots(4, 8, 1 << 20) == 10
    with pytest.raises(ValueError, match="pool_gib"):
        OffloadConfig(pool_gib=1 / 1024).num_slots(4, 8, 1 << 20)


def test_the_pool_fits_the_room_on_the_gpu():
    """room: what is left on the GPU under --gpu-memory-utilization (gpu_room). The
    default takes at most half of it (the KV cache needs the rest); a pool set by
    hand that does not fit is refused, naming a size that does."""
    MiB, room = 1 << 20, (24 << 20, "left on the GPU")
    assert OffloadConfig().num_slots(4, 8, MiB, room=room) == 12  # half: 16 MiB
    assert OffloadConfig().num_slots(4, 8, MiB, room=(64 << 20, "x")) == 16  # fits
    assert OffloadConfig(pool_slots=20).num_slots(4, 8, MiB, room=room) == 20
    assert OffloadConfig(pool_slots=99).num_slots(4, 8, MiB, room=(40 << 20, "x")) == 32
    with pytest.raises(ValueError) as err:
        OffloadConfig(pool_slots=30).num_slots(4, 8, MiB, room=room)
    assert "pool_slots=30" in str(err.value) and "--expert-pool-slots 12" in str(err.value)
    with pytest.raises(ValueError, match="--expert-pool-gib 0.01"):
        OffloadConfig(pool_gib=0.03).num_slots(4, 8, MiB, room=room)
    with pytest.raises(ValueError, match="one layer's 8 experts take"):
        OffloadConfig().num_slots(4, 8, MiB, room=(7 << 20, "left on the GPU"))
    assert OffloadConfig().num_slots(4, 8, MiB, room=(10 << 20, "x")) == 8  # one layer's


def test_auto_store_follows_the_device():
    assert OffloadConfig().resolved_store(on_gpu=False) == "disk"
    assert OffloadConfig().resolved_store(on_gpu=True) == "host"
    assert OffloadConfig(store="host").resolved_store(on_gpu=False) == "host"


def test_task_settings_need_task_aware_and_approximate_needs_sensitivity():
    with pytest.raises(ValueError, match=r"task_rules_path \(--expert-task-rules, .*\) "
                                         "needs task_aware=true"):
        OffloadConfig.from_dict({"enabled": True, "task_rules_path": "r.json"})
    with pytest.raises(ValueError, match="approximate=true needs sensitivity_path"):
        OffloadConfig.from_dict({"enabled": True, "task_aware": True, "approximate": True})
    with pytest.raises(ValueError,
                       match=r"replan_every=0 \(--expert-replan-every, .*\) must be >= 1"):
        OffloadConfig.from_dict({"task_aware": True, "replan_every": 0})
    cfg = OffloadConfig.from_dict({"task_aware": True})
    assert cfg.use_task_scheduler and cfg.replan_every == 40
    env = OffloadConfig.env_values({"VLLM_MOE_OFFLOAD_TASK_SCHEDULER": "false"})
    assert env == {"task_scheduler": False}
    assert not OffloadConfig.from_dict({"task_aware": True, **env}).use_task_scheduler


def test_eviction_auto_is_the_measured_default_and_keeps_device_mode():
    cfg = OffloadConfig(enabled=True, store="host")
    assert cfg.eviction == "auto" and cfg.host_work_reason(on_gpu=True) is None
    lru = OffloadConfig(enabled=True, store="host", eviction="lru")
    assert "eviction='lru' runs on the host" in lru.host_work_reason(on_gpu=True)
    assert OffloadConfig.resolve({}, environ={"VLLM_MOE_OFFLOAD_EVICTION": "lfu"}).eviction == "lfu"


def test_task_aware_residency_and_approximate_mode_keep_graphs(tmp_path):
    """Task-aware counting and approximate re-routing run on the device
    (task_residency.py, slot_buffers.reroute); the disk store still needs eager."""
    tasks = OffloadConfig(enabled=True, store="host", task_aware=True)
    assert tasks.host_work_reason(on_gpu=True) is None
    sens = tmp_path / "sensitivity.json"
    sens.write_text("{}")
    approx = OffloadConfig(enabled=True, store="host", task_aware=True, approximate=True,
                           sensitivity_path=str(sens))
    assert approx.host_work_reason(on_gpu=True) is None
    disk = OffloadConfig(enabled=True, store="disk", task_aware=True)
    assert "disk store" in disk.host_work_reason(on_gpu=True)


@pytest.mark.parametrize("source", ["additional_config", "env"])
def test_any_setting_turns_offload_on_unless_enabled_is_false(source):
    def resolve(values):
        if source == "env":
            env = {f"VLLM_MOE_OFFLOAD_{k.upper()}": str(v).lower() for k, v in values.items()}
            return OffloadConfig.resolve({}, environ=env)
        return OffloadConfig.resolve({"expert_offload": values}, environ={})

    assert resolve({"pool_slots": 10}).enabled  # the trap: pool settings meant offload
    assert not resolve({"pool_slots": 10, "enabled": False}).enabled
    assert not resolve({}).enabled


def test_mixed_precision_reads_profiles_without_task_aware():
    cfg = OffloadConfig.from_dict({"store_bits": 2, "store_hot_bits": 8,
                                   "task_profiles_path": "p", "sensitivity_path": "s"})
    assert not cfg.task_aware and cfg.store_hot_share == 0.25
    with pytest.raises(ValueError,
                       match=r"task_profiles_path \(--expert-task-profiles, .*\) needs task_aware"):
        OffloadConfig.from_dict({"store_bits": 2, "task_profiles_path": "p"})


def test_pool_above_the_kernels_limit():
    """The default and pool_gib are capped where the kernel's limit lies; an explicit
    pool_slots above it is refused (vLLM's CUDA align step: model_state.py)."""
    assert OffloadConfig().num_slots(48, 128, 1, max_slots=992) == 992  # half: 3072
    assert OffloadConfig().num_slots(4, 8, 1, max_slots=992) == 16  # under it
    assert OffloadConfig(pool_gib=4).num_slots(48, 128, 1 << 20, max_slots=992) == 992
    assert OffloadConfig(pool_slots=10**6).num_slots(4, 8, 1, max_slots=992) == 32
    with pytest.raises(ValueError, match=r"pool_slots=3000 is more than 992 slots, the "
                       r"most the kernel takes\. Set pool_slots <= 992"):
        OffloadConfig(pool_slots=3000).num_slots(48, 128, 1, 992, "the kernel takes")


def test_a_misspelt_env_var_is_named_in_a_warning(caplog):
    with caplog.at_level("WARNING", logger="vllm.moe_offload"):
        values = OffloadConfig.env_values({"VLLM_MOE_OFFLOAD_POOL_SLOT": "64",
                                           "VLLM_MOE_OFFLOAD_METRICS_DIR": "/tmp/m"})
    assert values == {}
    assert ("VLLM_MOE_OFFLOAD_POOL_SLOT is not an expert offload setting and is ignored; "
            "did you mean VLLM_MOE_OFFLOAD_POOL_SLOTS?") in caplog.text
    assert "METRICS_DIR" not in caplog.text


def test_where_and_how_to_report_do_not_turn_offload_on():
    """VLLM_MOE_OFFLOAD_STORE_DIR, exported for the `store` tool (its docs say so),
    made every engine of the shell offload, a dense model's refused."""
    env = {"VLLM_MOE_OFFLOAD_STORE_DIR": "/x", "VLLM_MOE_OFFLOAD_METRICS_PER_LAYER": "1"}
    cfg = OffloadConfig.resolve({}, environ=env)
    assert not cfg.enabled and cfg.store_dir == "/x"
    assert OffloadConfig.resolve({}, environ={**env, "VLLM_MOE_OFFLOAD_POOL_SLOTS": "8"}).enabled


def test_settings_nothing_reads_are_named_in_a_warning(caplog):
    """--expert-predictor-path without --expert-predictor lookahead ran with no
    prefetch at all, silently; so did depth, budget and the others here."""
    from vllm_moe_offload.core import config

    config._warned.clear()  # (each is said once per process)
    cases = [({"predictor_path": "h.safetensors"}, "predictor_path", "lookahead or oracle"),
             ({"prefetch_depth": 3}, "prefetch_depth", "a predictor"),
             ({"resident_slots": 4}, "resident_slots", "--expert-task-aware"),
             ({"store_group_size": 32}, "store_group_size", "--expert-store-bits 8, 4"),
             ({"store_hot_share": 0.5}, "store_hot_share", "--expert-store-hot-bits")]
    for values, name, needs in cases:
        caplog.clear()
        with caplog.at_level("WARNING", logger="vllm.moe_offload"):
            OffloadConfig.from_dict(values)
        assert f"expert_offload.{name} (" in caplog.text and needs in caplog.text, values
    caplog.clear()
    with caplog.at_level("WARNING", logger="vllm.moe_offload"):
        OffloadConfig.from_dict({"predictor": "lookahead", "predictor_path": "h",
                                 "prefetch_depth": 3})
        # a folded config, as the workers get it, carries every field at its default
        OffloadConfig.from_dict(OffloadConfig.from_dict({"pool_slots": 8}).to_dict())
    assert caplog.text == ""


def test_a_flags_spelling_as_an_env_var_is_pointed_to_its_variable(caplog):
    with caplog.at_level("WARNING", logger="vllm.moe_offload"):
        OffloadConfig.env_values({"VLLM_MOE_OFFLOAD_PREFETCH_BUDGET": "3"})
    assert "did you mean VLLM_MOE_OFFLOAD_PREFETCH_BUDGET_SLOTS?" in caplog.text


def test_an_empty_store_dir_is_refused():
    """'' became Path(''): the store files went to the current directory."""
    with pytest.raises(ValueError, match=r"store_dir='' \(--expert-store-dir, .*\) names "
                                         "no directory"):
        OffloadConfig.from_dict({"store_dir": "", "pool_slots": 8})
    assert OffloadConfig.resolve({}, environ={"VLLM_MOE_OFFLOAD_STORE_DIR": ""}).store_dir \
        == OffloadConfig().store_dir  # an empty variable is an unset one
