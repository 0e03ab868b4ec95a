"""Mixed precision on the disk store: a restart whose task profiles rank other
experts hot reuses the pair of stores it built (no encode of every expert again),
keeping the hot set they were built with beside them, and says so."""

import torch

from vllm_moe_offload.core.config import OffloadConfig
from vllm_moe_offload.core.tasks import TaskProfiles
from vllm_moe_offload.integration.vllm.model_state import ModelOffload
from vllm_moe_offload.runtime.store import ExpertLayout, TensorSpec

L, E = 2, 8
SOURCE = ExpertLayout((TensorSpec((16, 64), torch.bfloat16),  # groups of 8
                       TensorSpec((64, 8), torch.bfloat16)))


def profiles(path, favourite: int):
    p = TaskProfiles(L, E)
    for layer in range(L):
        p.record("chat", layer, [favourite, favourite, (favourite + 1) % E])
    p.save(path)


def start(tmp_path, profiles_file="profiles.json"):
    cfg = OffloadConfig(enabled=True, store="disk", store_dir=str(tmp_path / "store"),
                        store_bits=2, store_hot_bits=8, store_quantizer="rtn",
                        store_group_size=8,
                        task_profiles_path=str(tmp_path / profiles_file))
    model = ModelOffload(cfg, {"model": "m", "vllm": "test", "kernel": {"amx": False}},
                         torch.device("cpu"))
    model.num_layers, model.experts_per_layer = L, E
    store = model.ensure_store(SOURCE, SOURCE)
    reused = store.reused
    if not reused:
        g = torch.Generator().manual_seed(0)
        for layer in range(L):
            for e in range(E):
                model.put_expert(layer, e, [torch.randn(s.shape, generator=g).to(s.dtype)
                                            for s in SOURCE.tensors])
        store.seal()
    return store, reused


def test_changed_profiles_reuse_the_stores_and_their_hot_set(tmp_path, caplog):
    profiles(tmp_path / "profiles.json", favourite=0)
    first, reused = start(tmp_path)
    assert not reused and first.hot.inner.keys == [(0, 0), (0, 1), (1, 0), (1, 1)]
    profiles(tmp_path / "profiles.json", favourite=4)  # a task-aware run wrote others
    with caplog.at_level("INFO", logger="vllm.moe_offload"):
        again, reused = start(tmp_path)
    assert reused  # before: a new pair of files, every expert encoded again
    assert again.hot.inner.keys == first.hot.inner.keys
    assert "the profiles now rank 4 of them otherwise" in caplog.text
    files = sorted(p.name for p in (tmp_path / "store").iterdir()
                   if p.suffix == ".experts")
    assert len(files) == 2  # the one pair
    hot_file = next((tmp_path / "store").glob("*.hot.json"))
    hot_file.unlink()  # the documented way to rank them again
    third, reused = start(tmp_path)
    assert not reused and third.hot.inner.keys == [(0, 4), (0, 5), (1, 4), (1, 5)]
    profiles(tmp_path / "other.json", favourite=6)  # another profiles file: ranked again
    fourth, reused = start(tmp_path, "other.json")
    assert not reused and fourth.hot.inner.keys == [(0, 6), (0, 7), (1, 6), (1, 7)]


def test_a_hot_set_whose_stores_are_gone_is_ranked_again(tmp_path, caplog):
    """Store files deleted (by hand, or `vllm-moe-offload store --prune`): the stores
    are encoded again either way, so the hot set is ranked from the profiles as
    they are now; before, the sidecar's old set was built again."""
    profiles(tmp_path / "profiles.json", favourite=0)
    first, _ = start(tmp_path)
    for s in first.stores:
        s.close()
    profiles(tmp_path / "profiles.json", favourite=4)
    for p in (tmp_path / "store").glob("*.experts"):
        p.unlink()
    with caplog.at_level("INFO", logger="vllm.moe_offload"):
        again, reused = start(tmp_path)
    assert not reused and again.hot.inner.keys == [(0, 4), (0, 5), (1, 4), (1, 5)]
    assert "is gone: ranked again" in caplog.text


def test_earlier_stores_of_the_model_are_named_at_start(tmp_path, caplog):
    """A store built for another identity stays on disk: the start says how much it
    takes and how to remove it; the pair this engine holds open is not counted."""
    profiles(tmp_path / "profiles.json", favourite=0)
    first, _ = start(tmp_path)
    for s in first.stores:
        s.close()
    profiles(tmp_path / "other.json", favourite=6)
    with caplog.at_level("INFO", logger="vllm.moe_offload"):
        start(tmp_path, "other.json")  # another basis: a second pair
    assert "2 earlier disk stores of this model that no engine uses" in caplog.text
    assert f"`vllm-moe-offload store {tmp_path / 'store'} --prune`" in caplog.text


def test_a_missing_profiles_file_is_refused_before_the_engine_starts(tmp_path):
    """Before: refused only in the worker, once loading began, with advice for a
    damaged file ('delete it to start cold')."""
    import pytest

    from vllm_moe_offload.integration.vllm.plugin import check_task_files

    cfg = OffloadConfig(enabled=True, store_bits=2, store_hot_bits=8,
                        task_profiles_path=str(tmp_path / "none.json"))
    with pytest.raises(ValueError, match="task_profiles_path=.*none.json' does not exist.*"
                                         "store_hot_bits=8"):
        check_task_files(cfg)
    profiles(tmp_path / "none.json", favourite=0)
    check_task_files(cfg)


def test_a_disk_store_in_memory_is_said_to_save_none(tmp_path, caplog, monkeypatch):
    """A store_dir on tmpfs (/tmp on several distributions) keeps the "disk" store in
    RAM: said at start, with the setting that fixes it."""
    from vllm_moe_offload.integration.vllm import model_state
    from vllm_moe_offload.runtime.store_dir import file_system_of

    assert file_system_of("/proc/self") == "proc" and file_system_of(tmp_path) != "?"
    monkeypatch.setattr(model_state, "file_system_of", lambda path: "tmpfs")
    profiles(tmp_path / "profiles.json", favourite=0)
    with caplog.at_level("WARNING", logger="vllm.moe_offload"):
        start(tmp_path)
    assert "is on tmpfs, which is memory: it saves none. Set --expert-store-dir" in caplog.text
