"""benchmarks/gpu_stack.py cannot rot: its CPU mode runs one step of every row."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_stack_runs_on_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_stack.py", "--device", "cpu", "--steps", "1",
         "--warmup", "0", "--batches", "1", "--repeats", "2", "--disk-dir", str(tmp_path),
         "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_stack_cpu.json").read_text())
    assert result["done"] and not result["failed"], result["failed"]  # a row that raises
    rows = result["rows"]  # is reported, and the others still run
    names = {r["row"] for r in rows}
    assert {"plain eager", "resident", "S50 on-demand", "S50 prefetch", "S50 oracle",
            "stream (cpu-offload)", "S50 disk (host mode)", "S50 4-bit store (host mode)",
            "S50 2-bit store (host mode)", "S50 4-bit store, every 4th expert 8-bit (host mode)",
            "S50 2 slot groups, on-demand", "S50 2 slot groups, prefetch"} <= names
    # every row computes plain's outputs (quantized rows: over the decoded weights)
    assert all(r["identical"] for r in rows)
    quantized = {r["row"]: r["mib_per_step"] / r["misses_per_step"] for r in rows
                 if "bit store" in r["row"]}
    full = [r["mib_per_step"] / r["misses_per_step"] for r in on_demand_rows(rows)][0]
    assert quantized["S50 2-bit store (host mode)"] < quantized["S50 4-bit store (host mode)"]
    assert quantized["S50 4-bit store (host mode)"] < full * 5 / 16
    # a quarter of the experts at 8 bits: more bytes per miss than 4-bit alone, fewer
    # than 8-bit alone
    mixed = quantized["S50 4-bit store, every 4th expert 8-bit (host mode)"]
    assert quantized["S50 4-bit store (host mode)"] < mixed < full * 9 / 16
    on_demand = on_demand_rows(rows)
    assert all(r["misses_per_step"] > 0 and r["mib_per_step"] > 0 for r in on_demand)
    assert (tmp_path / "gpu_stack_cpu.png").stat().st_size > 0


def on_demand_rows(rows):
    return [r for r in rows if r["row"] == "S50 on-demand"]


def test_gpu_scripts_run_from_a_bare_checkout(tmp_path):
    """A GPU machine runs scripts/gpu_checks on a checkout with no install: the
    benchmarks it runs find the package by their own path. Here the installed
    package is hidden (`-S`: no .pth files, so no editable install)."""
    import site
    import torch

    paths = [p for p in site.getsitepackages() if Path(torch.__file__).is_relative_to(p)]
    for script in ("gpu_stack.py", "dequant_kernel.py"):
        proc = subprocess.run(
            [sys.executable, "-S", str(ROOT / "benchmarks" / script), "--help"],
            cwd=tmp_path, env={"PYTHONPATH": ":".join(paths), "PATH": "/usr/bin:/bin"},
            capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{script}: {proc.stderr[-2000:]}"
    hidden = subprocess.run([sys.executable, "-S", "-c", "import vllm_moe_offload"],
                            cwd=tmp_path, env={"PYTHONPATH": ":".join(paths)},
                            capture_output=True, text=True, timeout=60)
    assert hidden.returncode != 0  # the check above really ran without the install


def test_a_failure_is_reported_and_the_rows_before_it_kept(tmp_path, monkeypatch):
    """On a GPU a run is cut at the command's limit, and code not run there before may
    fail: a row or a set-up that raises is reported, and what ran is written."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_stack

    def broken(*args, **kwargs):
        raise RuntimeError("a store that cannot be built")
    monkeypatch.setattr(gpu_stack, "quantized_store", broken)
    monkeypatch.setattr(sys, "argv", [
        "gpu_stack.py", "--device", "cpu", "--steps", "1", "--warmup", "0", "--batches",
        "1", "4", "--disk-shapes", "--store-bits", "4", "--disk-dir", str(tmp_path),
        "--out", str(tmp_path)])
    gpu_stack.main()
    result = json.loads((tmp_path / "gpu_stack_cpu.json").read_text())
    assert result["done"]
    assert [(f["batch"], f["row"]) for f in result["failed"]] == [(1, "(set-up)")]
    assert {r["batch"] for r in result["rows"]} == {1, 4}  # the rows of both batches
    assert "FAILED: tiny batch 1 (set-up): RuntimeError" in (
        tmp_path / "gpu_stack_cpu.md").read_text()
