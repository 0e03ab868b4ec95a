"""End-to-end fixtures: tiny generated checkpoints and engines in subprocesses.

Each engine runs in its own process (vllm_moe_offload/cli/engine_probe.py), one at a time:
this machine has 2 cores. Results are cached per configuration for the session.
Most specs run vLLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), in a fork of a
server that imported vLLM once: ~5 s per engine instead of ~30 s (compiled mode
too). The server tests use vLLM's default multi-process engine. The memory test
runs in-process too: a fork's RSS counts the server's pages, alike for plain and
offload, so their difference is still what offload saves.
"""

import json

import pytest

from vllm_moe_offload.cli.engine_probe import EngineFailed  # noqa: F401 (used by tests)
from vllm_moe_offload.cli.engine_probe import run_in_subprocess as run_engine
from vllm_moe_offload.hf.tiny_moe import build_tiny_moe

ARCHS = ["qwen3_moe", "mixtral", "qwen2_moe"]
FAMILIES = ["olmoe", "glm4_moe", "deepseek_v2", "deepseek_v3", "phimoe", "granitemoe",
            "qwen3_next", "ernie4_5_moe", "llama4", "gpt_oss",
            "gemma4", "qwen3_5_moe"]  # test_families.py
# engine setups a family needs here (engine_probe's `setup`)
SETUP = {"qwen3_5_moe": "tests.e2e.vision_stub:install"}
LAYERS, EXPERTS = 4, 8

PROMPTS = [
    "Hello world",
    "def add(a, b):",
    "The licence grants permission to use, copy and modify the software. " * 12,
    "Mixture of experts models route each token",
]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    return {arch: str(build_tiny_moe(base / arch, arch, num_layers=LAYERS,
                                     num_experts=EXPERTS))
            for arch in ARCHS + FAMILIES + ["llama"]}


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("expert_store"))


_cache: dict[str, dict] = {}


@pytest.fixture(scope="session")
def engine():
    """engine(spec) -> result, memoised: identical specs start one engine."""
    def run(spec: dict, **kw) -> dict:
        key = json.dumps([spec, kw], sort_keys=True)  # (an env= is part of the run)
        if key not in _cache:
            _cache[key] = run_engine(spec, **kw)
        return _cache[key]
    return run


def failure(spec: dict, **kw) -> str:
    """The output of an engine that must refuse `spec` (fails if it starts)."""
    with pytest.raises(EngineFailed) as err:
        run_engine(spec, **kw)
    return err.value.output


def plain_spec(model: str, **extra) -> dict:
    return {"model": model, "offload": None, "prompts": PROMPTS, "in_process": True,
            "logprobs": LOGPROBS, **extra}


def offload_spec(model: str, **offload) -> dict:
    return {"model": model, "offload": {"enabled": True, **offload}, "prompts": PROMPTS,
            "in_process": True, "logprobs": LOGPROBS}


LOGPROBS = 5  # top log-probabilities compared, not only the greedy tokens


def assert_same_outputs(off: dict, plain: dict, atol: float = 1e-4) -> None:
    """Token-identical greedy outputs, and the top LOGPROBS log-probabilities of each
    step alike (the same kernel over the same weights). Tokens alone missed a wrong
    expert in one slot, or gate and up swapped in one expert: too small a change to
    flip a greedy token of a tiny model."""
    assert off["token_ids"] == plain["token_ids"]
    for a, b in zip(off["logprobs"], plain["logprobs"]):
        for step_a, step_b in zip(a, b):
            mine, theirs = dict(step_a), dict(step_b)
            common = mine.keys() & theirs.keys()  # (a near-tie may swap the last one)
            assert len(common) >= LOGPROBS - 1, (step_a, step_b)
            worst = max(abs(mine[t] - theirs[t]) for t in common)
            assert worst <= atol, f"a top-{LOGPROBS} logprob moved by {worst:.2e}"
