"""End-to-end fixtures: tiny generated checkpoints and engines in subprocesses.

Each engine runs in its own process (tests/e2e/run_engine.py), one at a time:
this machine has 2 cores. Results are cached per configuration for the session.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_moe_offload.tiny_moe import build_tiny_moe

ROOT = Path(__file__).resolve().parents[2]
ARCHS = ["qwen3_moe", "mixtral", "qwen2_moe"]
LAYERS, EXPERTS = 4, 8

PROMPTS = [
    "Hello world",
    "def add(a, b):",
    "The licence grants permission to use, copy and modify the software. " * 12,
    "Mixture of experts models route each token",
]


class EngineFailed(Exception):
    def __init__(self, output: str):
        super().__init__(output[-3000:])
        self.output = output


def run_engine(spec: dict, env: dict | None = None, timeout: int = 600) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.e2e.run_engine", json.dumps(spec)],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})})
    output = proc.stdout + proc.stderr
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["log"] = output
            return result
    raise EngineFailed(output)


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    return {arch: str(build_tiny_moe(base / arch, arch, num_layers=LAYERS,
                                     num_experts=EXPERTS))
            for arch in ARCHS + ["llama"]}


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("expert_store"))


_cache: dict[str, dict] = {}


@pytest.fixture(scope="session")
def engine():
    """engine(spec) -> result, memoised: identical specs start one engine."""
    def run(spec: dict, **kw) -> dict:
        key = json.dumps(spec, sort_keys=True)
        if key not in _cache:
            _cache[key] = run_engine(spec, **kw)
        return _cache[key]
    return run


def plain_spec(model: str, **extra) -> dict:
    return {"model": model, "offload": None, "prompts": PROMPTS, **extra}


def offload_spec(model: str, **offload) -> dict:
    return {"model": model, "offload": {"enabled": True, **offload}, "prompts": PROMPTS}
