"""Routing-sensitivity files: which (task, layer) pairs tolerate re-routing.

Pure Python. `python -m vllm_moe_offload sensitivity` measures, per task and MoE
layer, how often the greedy next token changes when that layer's routing is
perturbed, and marks the layers below a threshold insensitive (eMoE). The
task-aware plan and approximate re-routing read the result here. File format (JSON):

    {"format": "vllm-moe-offload-sensitivity/1", "model": DIR, "num_layers": L,
     "threshold": 0.05, "metric": "...",
     "tasks": {"python": {"change": [float per layer], "insensitive": [layer, ...]}}}
"""

from __future__ import annotations

from .tasks import read_json

SENSITIVITY_FORMAT = "vllm-moe-offload-sensitivity/1"


def load_insensitive(path, num_layers: int | None = None) -> set[tuple[str, int]]:
    """The (task, layer) pairs that `path` marks insensitive, for a model of
    `num_layers` MoE layers (None: the file's own count, a check before the model
    is built). Raises ValueError naming the file and the fix."""
    remedy = ("write one with python -m vllm_moe_offload sensitivity --model MODEL "
              "--task NAME=FILE --out PATH")

    def bad(why: str) -> ValueError:
        return ValueError(f"expert_offload.sensitivity_path {str(path)!r} {why}; {remedy}")

    data = read_json(path, bad)
    if not isinstance(data, dict) or data.get("format") != SENSITIVITY_FORMAT:
        raise bad(f"is not a sensitivity file (format is not {SENSITIVITY_FORMAT!r})")
    recorded = data.get("num_layers")
    if not isinstance(recorded, int) or isinstance(recorded, bool) or recorded < 1:
        raise bad(f"has no 'num_layers' count of MoE layers (found {recorded!r})")
    if num_layers is None:
        num_layers = recorded
    if recorded != num_layers:
        raise bad(f"was profiled on a model with {recorded} MoE layers, "
                  f"not {num_layers}")
    tasks = data.get("tasks")
    if not isinstance(tasks, dict):
        raise bad("has no 'tasks' object")
    pairs = set()
    for task, entry in tasks.items():
        layers = entry.get("insensitive") if isinstance(entry, dict) else None
        if not isinstance(layers, list):
            raise bad(f"task {task!r} has no 'insensitive' list of layers")
        for layer in layers:
            if (not isinstance(layer, int) or isinstance(layer, bool)
                    or not 0 <= layer < num_layers):  # (true is not layer 1)
                raise bad(f"task {task!r} marks layer {layer!r}, not a layer index "
                          f"0..{num_layers - 1}")
            pairs.add((task, layer))
    return pairs
