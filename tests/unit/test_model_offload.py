"""Start-up and step bookkeeping of ModelOffload, without an engine. The oracle
predictor's trace must be of the model it runs on: a trace of another
model is refused at start-up, naming the setting (before: an IndexError in the first
forward pass, or silently wrong predictions)."""

import json

import numpy as np
import pytest
import torch

from vllm_moe_offload.core.config import OffloadConfig
from vllm_moe_offload.core.trace import TraceHeader, TraceWriter
from vllm_moe_offload.integration.vllm.model_state import ModelOffload
from vllm_moe_offload.runtime.predictors import OraclePredictor

L, E, K = 3, 6, 2


def oracle_for(path, layers=L, experts=E):
    cfg = OffloadConfig(enabled=True, predictor="oracle", predictor_path=str(path),
                        prefetch_depth=1)
    model = ModelOffload(cfg, {"model": "m"}, torch.device("cpu"))
    model.num_layers, model.experts_per_layer, model.top_k = layers, experts, K
    return model._make_predictor()


def write(path, layers, experts):
    w = TraceWriter(str(path), TraceHeader(layers, experts, K))
    for layer in range(layers):
        w.write(layer, K, np.array([layer % experts, experts - 1], "<u2").tobytes())
    w.close()


def test_a_trace_of_this_model_runs(tmp_path):
    write(tmp_path / "t.trace", L, E)
    p = oracle_for(tmp_path / "t.trace")
    assert isinstance(p, OraclePredictor)
    assert p.predict(0, torch.zeros(1, 8)) == [(1, [1, E - 1])]


@pytest.mark.parametrize("layers, experts", [(L, 64), (L + 1, E), (L - 1, E)])
def test_a_trace_of_another_model_is_refused(tmp_path, layers, experts):
    write(tmp_path / "t.trace", layers, experts)
    with pytest.raises(ValueError, match=f"predictor_path=.*{layers} MoE layers of "
                                         f"{experts} experts.*this model has {L} of {E}"):
        oracle_for(tmp_path / "t.trace")


def test_a_jsonl_trace_naming_experts_the_model_lacks_is_refused(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"layer": 0, "topk_ids": [0, 40]}) + "\n")
    with pytest.raises(ValueError, match="of 41 experts"):
        oracle_for(path)


def test_a_request_that_fails_in_two_steps_counts_once():
    """Async scheduling runs a failed request one more step before the scheduler ends
    it; a lost expert that cannot be re-derived fails it there again."""
    from types import SimpleNamespace

    model = ModelOffload(OffloadConfig(enabled=True), {"model": "m"}, torch.device("cpu"))
    model.cache = SimpleNamespace(failed_rows={})
    layout = [("a", 2), ("b", 1)]
    for step in range(2):
        model.cache.failed_rows.update({1: "expert (0, 3) lost"})  # a row of request a
        assert model.take_failed_requests(layout) == {"a": "expert (0, 3) lost"}
    model.cache.failed_rows.update({2: "expert (0, 3) lost"})
    assert model.take_failed_requests(layout) == {"b": "expert (0, 3) lost"}
    assert model.failed_requests == 2
    model.step_began({"a"})  # vLLM ended a: it is forgotten (the set only grew)
    assert model._failed_ids == {"b"}


def test_rows_that_failed_outside_a_step_do_not_fail_the_first_requests():
    """vLLM's profiling and warm-up runs sample nothing, so their failed rows were
    still there at the first real step and failed its requests by row number."""
    from types import SimpleNamespace

    model = ModelOffload(OffloadConfig(enabled=True), {"model": "m"}, torch.device("cpu"))
    model.cache = SimpleNamespace(failed_rows={r: "expert (0, 3) lost" for r in range(6)})
    model.step_began()  # the first real step begins
    assert model.take_failed_requests([("req-A", 1), ("req-B", 1)]) == {}
    assert model.failed_requests == 0


def test_approximate_mode_refuses_router_weights_that_do_not_match_the_layers(tmp_path):
    """Re-routing scores a layer's misses with that layer's router: a checkpoint whose
    routers the reader finds for other layers than vLLM built shifted every layer's
    scores silently (or failed with an IndexError at capture)."""
    from types import SimpleNamespace

    from vllm_moe_offload.core.sensitivity import SENSITIVITY_FORMAT
    from vllm_moe_offload.hf.tiny_moe import build_tiny_moe

    path = build_tiny_moe(tmp_path / "m", num_layers=3, num_experts=E)
    sens = tmp_path / "s.json"
    sens.write_text(json.dumps({"format": SENSITIVITY_FORMAT, "model": str(path),
                                "num_layers": 2, "threshold": 0.05, "metric": "m",
                                "tasks": {"chat": {"change": [0.0, 0.0],
                                                   "insensitive": [0, 1]}}}))
    cfg = OffloadConfig(enabled=True, task_aware=True, approximate=True,
                        sensitivity_path=str(sens))
    model = ModelOffload(cfg, {"model": str(path)}, torch.device("cpu"))
    model.num_layers, model.experts_per_layer = 2, E  # vLLM built 2 MoE layers
    model.cache = SimpleNamespace(plan_room=4, num_slots=2 * E, groups=[None])
    with pytest.raises(ValueError, match="found 3 router weights .* for 2 MoE layers"):
        model._make_task_residency()


def test_a_later_engine_in_the_process_gets_a_state_of_its_own(monkeypatch):
    """Engine A's state, loaded, was handed to engine B of the same model (with A's
    config), and after A shut down it stayed `loaded()`: B's layers were taken for a
    draft model's and kept every expert resident."""
    from vllm_moe_offload.integration.vllm import model_state

    monkeypatch.setattr(model_state, "_MODEL", None)
    fingerprint = {"model": "m"}
    a = model_state.get_or_create(OffloadConfig(pool_slots=8), fingerprint, torch.device("cpu"))
    assert model_state.get_or_create(OffloadConfig(), fingerprint, torch.device("cpu")) is a
    closed = []
    a.cache = object()  # loaded: its pool is built
    monkeypatch.setattr(a, "shutdown", lambda: closed.append(a))
    assert model_state.loaded() is a
    model_state.release(a)  # A's worker shuts down
    assert closed == [a] and model_state.loaded() is None and model_state.current() is None
    b = model_state.get_or_create(OffloadConfig(pool_slots=4), fingerprint, torch.device("cpu"))
    assert b is not a and b.cfg.pool_slots == 4
    b.cache = object()  # and if A never shut down, B still starts afresh
    c = model_state.get_or_create(OffloadConfig(), fingerprint, torch.device("cpu"))
    assert c is not b
    monkeypatch.setattr(b, "shutdown", lambda: closed.append(b))
    model_state.release(b)  # an older engine's shutdown leaves the current one
    assert closed == [a, b] and model_state.current() is c


def test_a_checkpoint_of_many_shards_fits_the_store_header(tmp_path):
    """Each shard's [name, size, mtime] went into the disk store's 4 KiB header:
    DeepSeek-V3's 163 shards overflowed it and the engine failed to start. The files
    are a digest now, and a changed shard still changes the store's name."""
    from types import SimpleNamespace

    from vllm_moe_offload.integration.vllm.layer import _fingerprint
    from vllm_moe_offload.runtime.store import (DiskStore, ExpertLayout, TensorSpec,
                                                store_file_name)

    model = tmp_path / "DeepSeek-V3"
    model.mkdir()
    for i in range(163):
        (model / f"model-{i + 1:05d}-of-000163.safetensors").write_bytes(b"x" * i)
    config = SimpleNamespace(
        model_config=SimpleNamespace(model=str(model), revision=None, dtype="bfloat16",
                                     seed=0),
        load_config=SimpleNamespace(download_dir=None, load_format="auto"))
    fingerprint = _fingerprint(config)
    assert fingerprint["files"].startswith("163:")
    layout = ExpertLayout((TensorSpec((4, 4), torch.float32),))
    store = DiskStore(tmp_path / "s.experts", layout, 1, 2, fingerprint)
    for e in range(2):
        store.put(0, e, [torch.full((4, 4), float(e))])
    store.seal()
    store.close()
    (model / "model-00001-of-000163.safetensors").write_bytes(b"changed")
    assert store_file_name(_fingerprint(config)) != store_file_name(fingerprint)


def test_a_second_engine_beside_a_live_one_is_named_in_a_warning(monkeypatch, caplog):
    """Both in one process (VLLM_ENABLE_V1_MULTIPROCESSING=0): the layers find their
    model state through the process's one current state, so B's took over A's layer
    calls, silently. Not refused: an engine dropped without a shutdown may live on
    (vLLM freezes its objects out of the garbage collector's reach)."""
    import weakref

    from vllm_moe_offload.integration.vllm import model_state

    class Worker:
        pass

    monkeypatch.setattr(model_state, "_MODEL", None)
    a = model_state.get_or_create(OffloadConfig(), {"model": "m"}, torch.device("cpu"))
    worker = Worker()
    a.cache, a.owner = object(), weakref.ref(worker)
    with caplog.at_level("WARNING", logger="vllm.moe_offload"):
        b = model_state.get_or_create(OffloadConfig(), {"model": "m2"}, torch.device("cpu"))
    assert b is not a and model_state.current() is b
    assert "an engine in this process already serves m with expert offload" in caplog.text
    caplog.clear()
    monkeypatch.setattr(model_state, "_MODEL", a)
    del worker  # its worker gone: nothing to say
    with caplog.at_level("WARNING", logger="vllm.moe_offload"):
        model_state.get_or_create(OffloadConfig(), {"model": "m2"}, torch.device("cpu"))
    assert caplog.text == ""


def test_a_start_that_fails_after_loading_lets_go_of_its_model_state(monkeypatch):
    """vLLM's memory profile, the KV cache's allocation or the warm-up fails after the
    pool was built ("set a smaller pool"): the state stayed current, its files open,
    and a retry in the same process was warned about as a second live engine."""
    import weakref
    from types import SimpleNamespace

    from vllm_moe_offload.integration.vllm import model_state, worker

    monkeypatch.setattr(model_state, "_MODEL", None)
    a = model_state.get_or_create(OffloadConfig(), {"model": "m"}, torch.device("cpu"))
    w = SimpleNamespace(_moe_offload_model=a)
    a.cache, a.owner = object(), weakref.ref(model_state)  # (an owner that stays alive)
    monkeypatch.setattr(a, "shutdown", lambda: None)

    def profile():
        raise ValueError("no memory left for the KV cache")

    with pytest.raises(ValueError, match="no memory left"):
        worker._released_on_failure(w, profile)
    assert model_state.current() is None
    assert model_state.get_or_create(OffloadConfig(), {"model": "m"},
                                     torch.device("cpu")) is not a
