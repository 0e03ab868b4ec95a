"""Device mode's kernels on the CPU, through Triton's interpreter (no GPU needed),
and compiled for an H100 (sm90_compile.py: the compiler refuses what the
interpreter accepts).

The interpreter must be switched on before Triton compiles anything, so the cases
(device_cases.py, shared with tests/gpu) run in two subprocesses with
TRITON_INTERPRET=1, beside a third that compiles; each test here reads its result.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from tests.unit.runtime.device_cases import CASES  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]


def compiles_here() -> bool:
    """sm90_compile needs Triton's CUDA backend; on a CUDA host tests/gpu compiles
    and runs the kernels for real."""
    import torch

    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except ImportError:
        return False
    return not torch.cuda.is_available()


@pytest.fixture(scope="module")
def results():
    """Two interpreter shards and the sm_90 compile, in parallel (the interpreter is
    slow, the machine has 2 cores)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)  # the compile must not be interpreted
    commands = {f"shard {k}": ["tests.unit.runtime.device_cases", "cpu", f"{k}/2"]
                for k in range(2)}
    if compiles_here():
        commands["sm90"] = ["tests.unit.runtime.sm90_compile"]
    procs = {name: subprocess.Popen(
        [sys.executable, "-m", *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=env if name == "sm90" else dict(env, TRITON_INTERPRET="1"))
        for name, args in commands.items()}
    merged = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=900)
            last = out.strip().splitlines()[-1] if out.strip() else ""
            if name == "sm90":
                merged["sm90"] = json.loads(last) if proc.returncode == 0 else err[-3000:]
                continue
            assert proc.returncode == 0, err[-3000:]
            merged.update(json.loads(last))
    finally:  # a timeout or a failed shard leaves no interpreter running
        for proc in procs.values():
            proc.kill()
            proc.wait()
    return merged


@pytest.mark.parametrize("case", sorted(CASES) + [c + "/general" for c in list(CASES)[:2]])
def test_device_case_in_interpreter(results, case):
    assert results[case] is None, results[case]


@pytest.mark.skipif(not compiles_here(), reason="a CUDA host compiles them in tests/gpu; "
                    "or Triton has no CUDA backend")
def test_kernels_compile_for_an_h100(results):
    """The interpreter accepts what the compiler refuses: every kernel, for the store
    kinds and options of device mode, compiled for sm_90 (sm90_compile.py)."""
    got = results["sm90"]
    assert isinstance(got, dict), got  # else the compiler's error
    assert set(got["compiled"]) == {"resolve_kernel", "fill_kernel", "prefetch_kernel",
                                    "decode_fill_kernel", "_dequant"}, got
    assert max(got["shared"].values()) <= 227 * 1024, got  # an H100's most per block
