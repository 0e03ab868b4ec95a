"""Device mode's kernels on the CPU, through Triton's interpreter (no GPU needed).

The interpreter must be switched on before Triton compiles anything, so the cases
(device_cases.py, shared with tests/gpu) run in two subprocesses with
TRITON_INTERPRET=1; each test here reads its case's result.
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


@pytest.fixture(scope="module")
def results():
    """Two shards in parallel (the interpreter is slow, the machine has 2 cores)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-m", "tests.unit.runtime.device_cases",
                               "cpu", f"{k}/2"], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for k in range(2)]
    merged = {}
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=900)
            assert proc.returncode == 0, err[-3000:]
            merged.update(json.loads(out.strip().splitlines()[-1]))
    finally:  # a timeout or a failed shard leaves no interpreter running
        for proc in procs:
            proc.kill()
            proc.wait()
    return merged


@pytest.mark.parametrize("case", sorted(CASES) + [c + "/general" for c in list(CASES)[:2]])
def test_device_case_in_interpreter(results, case):
    assert results[case] is None, results[case]
