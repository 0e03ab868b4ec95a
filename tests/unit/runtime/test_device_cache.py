"""Device mode's kernels on the CPU, through Triton's interpreter (no GPU needed).

The interpreter must be switched on before Triton compiles anything, so the cases
(device_cases.py, shared with tests/gpu) run in one subprocess with
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
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "tests.unit.runtime.device_cases", "cpu"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", sorted(CASES) + [c + "/general" for c in list(CASES)[:2]])
def test_device_case_in_interpreter(results, case):
    assert results[case] is None, results[case]
