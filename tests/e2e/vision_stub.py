"""Engine `setup` for Qwen3.5 (engine_probe's "module:function" hook).

vLLM 0.32 imports its text-only Qwen3.5 model from the same module as the vision
one, which imports transformers' Qwen2-VL image processor, which imports
torchvision unconditionally. The CPU set-up removes torchvision (its CUDA build
breaks `import vllm`), so this fills in the one module that import names, in the
engine's process only (an in-process engine), and has vLLM inspect the model class
in this process rather than in a fresh interpreter without the stand-in. Text
generation never calls it; transformers still reports torchvision as missing (its
check runs first)."""

import sys
import types


def install() -> None:
    from transformers.utils import import_utils

    assert not import_utils.is_torchvision_available()  # else no stand-in is needed
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.v2",
                 "torchvision.transforms.v2.functional"):
        sys.modules.setdefault(name, types.ModuleType(name))
    from vllm.model_executor.models import registry

    registry._run_in_subprocess = lambda fn: fn()  # no CUDA to keep uninitialised here
