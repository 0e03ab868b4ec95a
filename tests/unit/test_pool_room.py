"""The room the pool is sized in on a GPU: what is left of vLLM's own memory budget,
less a speculative draft's weights. vLLM builds and loads the draft (an MTP module,
a draft model, EAGLE heads) after the target model, whose first MoE layer has built
the pool by then, and its experts are not offloaded. On the CPU there is no room to
size against, so these drive the GPU's sizing with numbers given by hand (gpu_room
reads the GPU's through CUDA)."""

import json
from types import SimpleNamespace

import pytest
import torch

from vllm_moe_offload.core.config import OffloadConfig
from vllm_moe_offload.integration.vllm import model_state
from vllm_moe_offload.integration.vllm.layer import _draft
from vllm_moe_offload.integration.vllm.model_state import Draft, ModelOffload
from vllm_moe_offload.integration.vllm.worker import memory_budget
from vllm_moe_offload.runtime.checkpoint import CheckpointExperts
from vllm_moe_offload.runtime.modes import room_left
from vllm_moe_offload.runtime.store import ExpertLayout, TensorSpec

MiB, GiB = 1 << 20, 1 << 30
L, E = 4, 8
LAYOUT = ExpertLayout((TensorSpec((MiB // 4,), torch.float32),))  # 1 MiB an expert


def test_what_each_kind_of_draft_keeps_on_the_device(tmp_path, caplog):
    from safetensors.torch import save_file

    target = tmp_path / "target"  # 2 layers of experts, then MTP layers 2 and 3
    target.mkdir()
    t = {f"model.layers.{i}.mlp.experts.{e}.up_proj.weight": torch.zeros(4, 8)
         for i in range(4) for e in range(2)}  # 128 bytes each
    t |= {"model.layers.2.eh_proj.weight": torch.zeros(8, 16),  # 512
          "mtp.fc.weight": torch.zeros(4, 4, dtype=torch.bfloat16),  # 32 (Qwen3.5's)
          "mtp.layers.1.w": torch.zeros(8),  # 32, the second MTP layer's
          "model.visual.layers.5.w": torch.zeros(64),  # another stack's layer 5: not MTP
          "model.embed_tokens.weight": torch.zeros(16, 8)}
    save_file(t, str(target / "model.safetensors"))

    def draft(method, model, **hf):
        config = SimpleNamespace(model=str(model), revision=None,
                                 hf_config=SimpleNamespace(**hf))
        return _draft(SimpleNamespace(method=method, draft_model_config=config),
                      CheckpointExperts(target), 2, None)

    assert draft("ngram", target) is None  # no weights (vLLM gives it the target's config)
    assert _draft(SimpleNamespace(method="suffix", draft_model_config=None),
                  CheckpointExperts(target), 2, None) is None
    # MTP: the tensors of the layers vLLM loads, in the target's checkpoint
    one = 2 * 128 + 512 + 32  # layer 2's experts and eh_proj, mtp.fc
    assert draft("mtp", target, n_predict=1) == Draft("mtp", mtp_layers=1, file_bytes=one)
    assert draft("mtp", target, n_predict=2) == Draft("mtp", mtp_layers=2,
                                                      file_bytes=one + 2 * 128 + 32)
    gone = SimpleNamespace(model=str(tmp_path / "gone"), revision=None,
                           hf_config=SimpleNamespace(n_predict=2))
    assert _draft(SimpleNamespace(method="mtp", draft_model_config=gone),
                  CheckpointExperts(tmp_path / "gone"), 2, None) == Draft("mtp", mtp_layers=2)
    # (no checkpoint to count: each layer's experts, set_aside below)
    # DSpark's heads in the target's checkpoint: counted the same way (its mtp.*)
    assert draft("dspark", target) == Draft("dspark", file_bytes=one)
    size = (target / "model.safetensors").stat().st_size  # a draft model: loaded again
    assert draft("draft_model", target) == Draft("draft_model", file_bytes=size)
    # a separate draft checkpoint: the files its index names (not a consolidated copy)
    other = tmp_path / "draft"
    other.mkdir()
    for name, size in (("model-00001-of-00002.safetensors", 3000),
                       ("model-00002-of-00002.safetensors", 500),
                       ("consolidated.safetensors", 3500), ("config.json", 99)):
        (other / name).write_bytes(b"\0" * size)
    assert draft("draft_model", other) == Draft("draft_model", file_bytes=7000)
    assert draft("mtp", other, n_predict=1) == Draft("mtp", file_bytes=7000)  # its own
    (other / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert draft("draft_model", other) == Draft("draft_model", file_bytes=3500)
    # nothing here nor on the hub (a hub draft is fetched as it loads, after the pool;
    # its size then comes from the hub's safetensors headers): said, not set aside
    (tmp_path / "empty").mkdir()
    with caplog.at_level("WARNING", logger="vllm.moe_offload"):
        assert draft("eagle", tmp_path / "empty") == Draft("eagle", file_bytes=0)
    assert "its weights are not set aside" in caplog.text


def test_the_pool_is_sized_with_the_draft_set_aside(monkeypatch):
    """32 experts of 1 MiB; 24 MiB left on the GPU. Without a draft the default pool
    takes half of the room (12 slots); with 2 MTP layers of 8 experts (16 MiB) set
    aside, half of the 8 MiB left is one layer's experts (8 slots). A pool set by
    hand that fitted before is refused, with the draft named."""

    def pool(draft, cfg=None):
        model = ModelOffload(cfg or OffloadConfig.from_dict({"enabled": True,
                                                             "store": "host"}),
                             {}, torch.device("cpu"))
        for layer in range(L):
            model.register_layer(E, 2, f"model.layers.{layer}.mlp.experts")
        store = model.ensure_store(LAYOUT)
        for layer in range(L):
            for e in range(E):
                store.put(layer, e, [torch.full((MiB // 4,), float(e))])
        model.draft = draft
        model.experts_arrived = L * E
        try:
            return model.finish_loading(None).num_slots
        finally:
            model.shutdown()  # now, not at exit (where pytest's log capture has closed)

    monkeypatch.setattr(model_state, "gpu_room", lambda *_: (24 * MiB, "left on the GPU"))
    assert pool(None) == 12
    assert pool(Draft("ngram")) == 12  # nothing to set aside
    assert pool(Draft("mtp", mtp_layers=2)) == 8  # counted as 2 layers' experts
    assert pool(Draft("mtp", mtp_layers=1, file_bytes=16 * MiB)) == 8  # its tensors
    assert pool(Draft("draft_model", file_bytes=8 * MiB)) == 8  # half of 16 MiB
    manual = OffloadConfig.from_dict({"enabled": True, "store": "host", "pool_slots": 20})
    assert pool(None, manual) == 20
    with pytest.raises(ValueError, match=r"takes 0\.02 GiB, more than the 0\.01 GiB left "
                       r"on the GPU, less 0\.02 GiB set aside for the mtp draft \(the "
                       r"experts of its 2 MTP layers\), which loads after the pool"):
        pool(Draft("mtp", mtp_layers=2), manual)
    with pytest.raises(ValueError, match="one layer's 8 experts take"):
        pool(Draft("mtp", mtp_layers=3))  # 0 MiB left for the pool


def test_the_room_is_what_is_left_of_this_instances_budget():
    """Two vLLM instances share an 80 GiB GPU at --gpu-memory-utilization 0.45 each
    (vLLM refuses one that finds less free than it requests). The first holds
    36 GiB; the second started with 44 GiB free (vLLM requested 36 GiB of it) and
    has loaded 10 GiB of weights: 26 GiB of its budget are left. Counting all that
    is used on the GPU against 0.45 x 80 left nothing, and the pool was refused."""
    snapshot = SimpleNamespace(free_memory=44 * GiB, device_="cuda:0")
    budget = memory_budget(SimpleNamespace(requested_memory=36 * GiB,
                                           init_snapshot=snapshot))
    assert budget[:2] == (36 * GiB, 44 * GiB) and callable(budget[2])
    room, where = room_left(34 * GiB, 80 * GiB, 0.45, budget[:2])
    assert room == 26 * GiB
    assert where == ("left of this instance's 36.00 GiB under --gpu-memory-utilization "
                     "0.45 (10.00 GiB used since it started)")
    assert room_left(34 * GiB, 80 * GiB, 0.45)[0] == 0  # every process's memory counted
    # alone on the GPU (the CUDA context, 0.5 GiB, came before vLLM's snapshot):
    # all but the weights of 0.9 x 80 GiB
    alone = (72 * GiB, 79.5 * GiB)
    assert room_left(69.5 * GiB, 80 * GiB, 0.9, alone)[0] == 62 * GiB
    assert memory_budget(SimpleNamespace()) is None  # a worker that keeps none (CPU)
    # more used since the start than was requested: nothing left, not less
    assert room_left(5 * GiB, 80 * GiB, 0.5, (30 * GiB, 40 * GiB))[0] == 0


def test_a_kv_cache_set_in_bytes_is_left_out_of_the_pools_room():
    """With --kv-cache-memory-bytes vLLM gives the KV cache that much whatever the
    utilization says; the pool was sized by the utilization all the same, and the
    weights, pool and KV cache could outgrow the GPU (an OOM naming no pool)."""
    snapshot = SimpleNamespace(free_memory=79 * GiB, device_="cuda:0")
    budget = memory_budget(SimpleNamespace(
        requested_memory=71 * GiB, init_snapshot=snapshot,
        cache_config=SimpleNamespace(kv_cache_memory_bytes=20 * GiB)))
    assert budget[:2] == (59 * GiB, 79 * GiB)
    room, where = room_left(60 * GiB, 80 * GiB, 0.9, budget[:2] + budget[3:])  # 19 loaded
    assert room == 40 * GiB
    assert where.startswith(f"left of this instance's 59.00 GiB beside "
                            f"--kv-cache-memory-bytes {20 * GiB}")


def test_host_mode_under_cuda_graphs_is_refused_before_the_pool_is_made(monkeypatch):
    """plugin.py keeps CUDA graphs on from the settings; a reason for host mode known
    only from the experts (device_mode_problem: e.g. a quantized store whose matrices
    differ in dtype) would sync the host inside a graph's capture. Refused, with the
    fix, before any slot is allocated."""
    model = ModelOffload(OffloadConfig.from_dict({"enabled": True, "store": "host"}), {},
                         torch.device("cpu"))
    for layer in range(L):
        model.register_layer(E, 2, f"model.layers.{layer}.mlp.experts")
    store = model.ensure_store(LAYOUT)
    for layer in range(L):
        for e in range(E):
            store.put(layer, e, [torch.zeros(MiB // 4)])
    model.experts_arrived = L * E
    model.device, model.cuda_graphs = torch.device("cuda"), True  # as on a GPU
    monkeypatch.setattr(model_state, "device_mode_problem", lambda *_: "a reason")
    with pytest.raises(NotImplementedError, match=r"need host mode \(a reason\).*Add "
                       r"--compilation-config '\{\"cudagraph_mode\": \"NONE\"\}'"):
        model.finish_loading(None)
    assert model.cache is None


def test_a_pool_that_leaves_the_kv_cache_nothing_is_named():
    """On a GPU vLLM's profile counts what its budget leaves for the KV cache after
    the pool was sized (other layers' processing, activations): none left is the
    pool's doing when it was set by hand close to the room; said, with a size."""
    from vllm_moe_offload.integration.vllm.worker import check_kv_room

    cache = SimpleNamespace(pool_bytes=8 * GiB, slot_bytes=MiB, num_slots=8192)
    model = SimpleNamespace(cache=cache, experts_per_layer=128)
    check_kv_room(1, model, 0.9)  # room left: nothing to say
    check_kv_room(-GiB, None, 0.9)  # no offload: vLLM's own error
    with pytest.raises(ValueError, match=r"the expert pool \(8192 slots, 8\.00 GiB\) leaves "
                       r"no memory for the KV cache under --gpu-memory-utilization 0\.9: "
                       r"vLLM's profile counts -1\.00 GiB left .* Set a smaller pool "
                       r"\(--expert-pool-gib 3\.50\) or raise --gpu-memory-utilization\."):
        check_kv_room(-GiB, model, 0.9)
    with pytest.raises(ValueError, match=r"in\. Raise --gpu-memory-utilization\."):
        check_kv_room(-8 * GiB + 64 * MiB, model, 0.9)  # not even one layer's 128 MiB


def test_vllms_cpu_kv_sizing_error_names_what_offload_holds(monkeypatch):
    """vLLM's CPU worker has its own KV sizing (no GPU worker method to hook): its
    "reduce CPU memory used by other processes" now says what the pool and a host
    store hold, and which setting holds less."""
    pytest.importorskip("vllm")
    from vllm.v1.worker.cpu_worker import CPUWorker

    from vllm_moe_offload.integration.vllm import model_state, worker

    worker.install()
    assert CPUWorker.determine_available_memory._moe_offload

    def too_little(self):
        raise ValueError("Reduce CPU memory used by other processes.")

    monkeypatch.setattr(CPUWorker, "determine_available_memory", too_little)
    monkeypatch.setattr(CPUWorker.determine_available_memory, "_moe_offload", False,
                        raising=False)
    worker._name_the_pool_on_cpu()
    cache = SimpleNamespace(pool_bytes=GiB, num_slots=64)
    store = SimpleNamespace(kind="host", nbytes=3 * GiB)
    monkeypatch.setattr(model_state, "_MODEL", SimpleNamespace(cache=cache, store=store))
    with pytest.raises(ValueError, match=r"other processes\. Expert offload holds 4\.00 GiB "
                       r"of it: 64 expert slots \(1\.00 GiB\) and a host store .*"
                       r"--expert-store disk .*--expert-pool-gib"):
        CPUWorker.determine_available_memory(None)
    monkeypatch.setattr(model_state, "_MODEL", None)  # offload off: vLLM's error as it is
    with pytest.raises(ValueError, match=r"processes\.$"):
        CPUWorker.determine_available_memory(None)
