"""The benchmarks' OpenAI-server helper (benchmarks/serving/server.py)."""

from pathlib import Path

from vllm_moe_offload.core.config import OffloadConfig

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_the_plain_vllm_server_gets_no_offload_setting(tmp_path, monkeypatch):
    """A store-dir variable set for every server turned offload on for the "plain
    vLLM" rows too (any setting turns it on): their baseline was offload at the
    default pool. Plain gets none, not even one from the caller's environment."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from serving.server import server_env

    monkeypatch.setenv("VLLM_MOE_OFFLOAD_POOL_SLOTS", "64")
    plain = server_env(None, tmp_path)
    assert not [k for k in plain if k.startswith("VLLM_MOE_OFFLOAD_")]
    assert not OffloadConfig.resolve(None, environ=plain).enabled
    offload = server_env({"enabled": True}, tmp_path)
    assert offload["VLLM_MOE_OFFLOAD_STORE_DIR"] == str(tmp_path / "store")
