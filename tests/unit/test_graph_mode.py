"""On CUDA, host work per layer call (the disk store, say) turns vLLM's CUDA graphs
off, and only them: torch.compile stays (integration/vllm/plugin.py
_choose_graph_mode). `enforce_eager` dropped both. Driven on the CPU with the
platform's CUDA check stood in for; the engine itself is not built."""

import pytest

pytest.importorskip("vllm")


@pytest.mark.parametrize("store", ["disk", "host"])
def test_host_work_turns_cuda_graphs_off_and_keeps_compilation(monkeypatch, caplog, store):
    from vllm.config import CUDAGraphMode
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    from vllm_moe_offload.core.config import OffloadConfig
    from vllm_moe_offload.integration.vllm.plugin import _choose_graph_mode

    monkeypatch.setattr(current_platform, "is_cuda_alike", lambda: True)
    args = EngineArgs(model="m", compilation_config={"mode": 3})
    before = args.compilation_config.mode
    with caplog.at_level("INFO", logger="vllm.moe_offload"):
        _choose_graph_mode(args, OffloadConfig(enabled=True, store=store))
    assert not args.enforce_eager
    assert args.compilation_config.mode == before  # torch.compile as the user set it
    if store == "disk":
        assert args.compilation_config.cudagraph_mode == CUDAGraphMode.NONE
        assert "the disk store" in caplog.text and "torch.compile stays on" in caplog.text
    else:  # device mode: graphs as vLLM picks them
        assert args.compilation_config.cudagraph_mode is None
        assert "CUDA graphs stay on" in caplog.text
