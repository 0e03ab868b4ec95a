"""Routing-sensitivity command and file: perturbation, thresholds, errors."""

import json

import pytest
import torch

from vllm_moe_offload.core.sensitivity import SENSITIVITY_FORMAT, load_insensitive
from vllm_moe_offload.cli.sensitivity import _drop_top1, main
from vllm_moe_offload.hf.tiny_moe import build_tiny_moe

LAYERS = 2
TEXT = "def add(a, b):\n    return a + b\nThe licence grants permission to use it.\n" * 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sensitivity")
    model = build_tiny_moe(root / "model", num_layers=LAYERS)
    (root / "python.txt").write_text(TEXT)
    (root / "prose.txt").write_text(TEXT[::-1])
    return root, str(model)


def _run(setup, threshold, extra=()):
    root, model = setup
    out = root / f"sens-{threshold}.json"
    main(["--model", model, "--task", f"python={root / 'python.txt'}",
          "--task", f"prose={root / 'prose.txt'}", "--out", str(out),
          "--tokens", "256", "--threshold", str(threshold), *extra])
    return out


def test_threshold_zero_marks_nothing_and_perturbation_changes_outputs(setup):
    out = _run(setup, 0)
    data = json.loads(out.read_text())
    assert data["format"] == SENSITIVITY_FORMAT and data["num_layers"] == LAYERS
    assert set(data["tasks"]) == {"python", "prose"}
    for entry in data["tasks"].values():
        assert len(entry["change"]) == LAYERS
    # Dropping the top-1 expert really re-routes: some greedy tokens change.
    assert max(c for e in data["tasks"].values() for c in e["change"]) > 0
    assert load_insensitive(out, LAYERS) == set()


def test_threshold_above_one_marks_every_layer(setup):
    out = _run(setup, 1.01)
    assert load_insensitive(out, LAYERS) == {(t, l) for t in ("python", "prose")
                                             for l in range(LAYERS)}


def test_hook_masks_logits_of_a_linear_router():
    # transformers 4 routers are Linear layers; the MoE block takes the top-k itself.
    gate = torch.nn.Linear(4, 3, bias=False)
    x = torch.randn(5, 4)
    base = gate(x)
    gate.register_forward_hook(_drop_top1)
    masked = gate(x)
    assert torch.equal(masked.argmax(-1), base.topk(2, dim=-1).indices[:, 1])
    assert torch.isinf(masked).sum() == 5


def _write(tmp_path, body):
    path = tmp_path / "s.json"
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    return path


def _good(**changes):
    body = {"format": SENSITIVITY_FORMAT, "model": "m", "num_layers": 2, "threshold": 0.05,
            "metric": "m", "tasks": {"python": {"change": [0.0, 0.2], "insensitive": [0]}}}
    body.update(changes)
    return body


def test_load_reads_pairs(tmp_path):
    assert load_insensitive(_write(tmp_path, _good()), 2) == {("python", 0)}


@pytest.mark.parametrize("body, words", [
    ("{not json", "is corrupt (not JSON"),
    (_good(format="something/1"), "is not a sensitivity file"),
    (_good(num_layers=4), "with 4 MoE layers, not 2"),
    (_good(tasks={"python": {"change": [0.0, 0.0]}}), "no 'insensitive' list"),
    (_good(tasks={"python": {"change": [0.0, 0.0], "insensitive": [2]}}),
     "layer 2, not a layer index 0..1"),
    (_good(tasks={"python": {"change": [0.0, 0.0], "insensitive": [True]}}),
     "layer True, not a layer index"),  # (a bool was read as layer 1)
])
def test_load_rejects_bad_files(tmp_path, body, words):
    with pytest.raises(ValueError, match="sensitivity_path") as e:
        load_insensitive(_write(tmp_path, body), 2)
    assert words in str(e.value) and "python -m vllm_moe_offload sensitivity" in str(e.value)


@pytest.mark.parametrize("count", [None, "2", 0])
def test_a_file_without_its_layer_count_is_refused_by_the_early_check(tmp_path, count):
    """The check before the model is built (no count to compare with) read a file
    without num_layers as a TypeError."""
    body = _good(num_layers=count)
    with pytest.raises(ValueError, match="has no 'num_layers' count of MoE layers"):
        load_insensitive(_write(tmp_path, body))


def test_load_rejects_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"cannot be read \(No such file"):
        load_insensitive(tmp_path / "none.json", 2)


def test_command_rejects_bad_inputs(setup, tmp_path):
    root, model = setup
    out = str(tmp_path / "s.json")
    cases = [
        (["--model", model, "--task", "python"], "--task 'python' is not NAME=FILE"),
        (["--model", model, "--task", "python=/nonexistent.txt"],
         "cannot read '/nonexistent.txt' (No such file or directory)"),
        (["--model", str(tmp_path / "none"), "--task", f"python={root / 'python.txt'}"],
         "is not a directory with config.json"),
        (["--model", str(build_tiny_moe(tmp_path / "dense", "llama", num_layers=1)),
          "--task", f"python={root / 'python.txt'}"], "has no MoE router"),
    ]
    for argv, words in cases:
        with pytest.raises(SystemExit) as e:
            main([*argv, "--out", out])
        assert words in str(e.value) and "\n" not in str(e.value)
