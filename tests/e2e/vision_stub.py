"""Engine `setup` for vision-language model classes (engine_probe's "module:function"
hook): Qwen3.5's, Gemma-4's.

vLLM 0.32 imports these models (Qwen3.5's text-only class too: it shares the module)
through transformers' image processors, which import torchvision unconditionally.
The CPU set-up removes torchvision (its CUDA build breaks `import vllm`), so this
fills in the modules those imports name, in the engine's process only (an
in-process engine), with stand-ins that answer any attribute (the processors' type
hints and default arguments read `tvF.InterpolationMode.BICUBIC` at import), and
has vLLM inspect the model class in this process rather than in a fresh interpreter
without them. Text generation never calls them; transformers still reports
torchvision as missing (its check runs first)."""

import sys
import types


class _Anything:
    """Any attribute, call or `|` of it is another stand-in."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()

    def __call__(self, *args, **kwargs):
        return _Anything()

    def __or__(self, other):
        return self

    __ror__ = __or__


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__getattr__ = lambda attr: _Anything().__getattr__(attr)
    return module


def install() -> None:
    from transformers.utils import import_utils

    assert not import_utils.is_torchvision_available()  # else no stand-in is needed
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.v2",
                 "torchvision.transforms.v2.functional"):
        sys.modules.setdefault(name, _module(name))
    from vllm.model_executor.models import registry

    registry._run_in_subprocess = lambda fn: fn()  # no CUDA to keep uninitialised here
