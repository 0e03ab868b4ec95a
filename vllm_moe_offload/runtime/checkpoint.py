"""One expert's weights, read straight from the safetensors checkpoint.

The disk store is a cache of the checkpoint; when one of its records is damaged,
the expert is read again from here (store.py NOTE #1). Names follow the
checkpoints of the supported families: `{prefix}.{e}.gate_proj|up_proj|down_proj
.weight` (Qwen-MoE and most others), `{prefix}.{e}.w1|w3|w2.weight` (Mixtral, PhiMoE),
or one fused tensor per layer, `[E, 2I, H]` (gate first) and `[E, H, I]`:
`{prefix}.gate_up_proj|down_proj` (Qwen3.5; transposed, `[E, H, 2I]` and `[E, I, H]`,
in Llama-4, gpt-oss and Qwen3-VL-MoE, told apart by their shapes; gpt-oss's biases are
`{prefix}.gate_up_proj_bias|down_proj_bias`) or `input_linear|output_linear.weight` beside
the experts module (Granite-MoE); `prefix` being the layer's module path
(`model.layers.3.mlp.experts`).

Where the model renames checkpoint tensors as it loads them (a vision-language
wrapper: vLLM's `language_model.model.layers.3.mlp.experts` is the checkpoint's
`model.language_model.layers.3.mlp.experts`), `rename` (checkpoint name -> module
name, None for a dropped tensor: vLLM's `hf_to_vllm_mapper.map_name`) finds the
checkpoint's prefix of a module path (`checkpoint_prefix`).
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

# the checkpoint's names of gate, up and down (vLLM's shards w1, w3, w2)
PROJECTIONS = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


class CheckpointExperts:
    def __init__(self, model_dir: str | Path,
                 rename: Callable[[str], str | None] | None = None):
        self.model_dir = Path(model_dir)
        self.rename = rename
        self._file_of: dict[str, Path] | None = None  # tensor name -> shard file
        self._prefixes: dict[str, str] = {}  # module path -> checkpoint prefix
        self._sorted: list[str] = []  # the tensor names, sorted (with _file_of)
        self._of_layer: dict[str | None, list[str]] = {}

    def checkpoint_prefix(self, path: str) -> str:
        """The checkpoint's name of module `path` (`...layers.N.mlp.experts`): `path`
        itself where the checkpoint has tensors under it; else the prefix of the
        tensors that `rename` maps under `path`; else the one prefix ending in
        `path`'s `layers.N...` whose renamed form ends `path` (a wrapper's inner
        model renames without the wrapper's own prefix; an MTP layer's tensors, of the
        same tail, do not end it). `path` where none is found: reads then name it."""
        if path not in self._prefixes:
            self._index()
            at = _layer_at(path)
            tail = path[at:] if at >= 0 else path
            # that layer's tensors; with no `layers.N` in the path, those without one
            near = [k for k in self._of_layer.get(_layer_of(path), [])
                    if k.startswith(tail + ".") or f".{tail}." in k]
            found = path if any(k.startswith(path + ".") for k in near) else None
            ends = set()
            for key in near if found is None else ():
                name = self.rename(key) if self.rename else key
                rest = key[key.rindex(tail + "."):]  # the tail and the tensor's own name
                if name is None or not name.endswith(rest):
                    continue
                module = name[:len(name) - len(rest) + len(tail)]
                prefix = key[:len(key) - len(rest) + len(tail)]
                if module == path:
                    found = prefix
                    break
                if f".{path}".endswith(f".{module}"):
                    ends.add(prefix)
            if found is None:
                found = ends.pop() if len(ends) == 1 else path
            self._prefixes[path] = found
        return self._prefixes[path]

    def _under(self, head: str) -> list[str]:
        """The checkpoint's tensor names that start with `head`, in order."""
        self._index()
        keys = self._sorted
        i = bisect.bisect_left(keys, head)
        out = []
        while i < len(keys) and keys[i].startswith(head):
            out.append(keys[i])
            i += 1
        return out

    def _index(self) -> dict[str, Path]:
        if self._file_of is None:
            if not self.model_dir.is_dir():
                raise FileNotFoundError(f"checkpoint directory {self.model_dir} is gone")
            index = self.model_dir / "model.safetensors.index.json"
            if index.exists():
                weight_map = json.loads(index.read_text())["weight_map"]
                file_of = {k: self.model_dir / v for k, v in weight_map.items()}
            else:
                file_of = {}
                for f in sorted(self.model_dir.glob("*.safetensors")):
                    with safe_open(f, "pt") as st:
                        file_of.update((k, f) for k in st.keys())
            if not file_of:
                raise FileNotFoundError(f"no *.safetensors weights in {self.model_dir}")
            self._file_of = file_of
            self._sorted = sorted(file_of)
            self._of_layer = {}  # "layers.N" -> the names of that layer's tensors
            for k in self._sorted:
                self._of_layer.setdefault(_layer_of(k), []).append(k)
        return self._file_of

    def mtp_bytes(self, num_layers: int, mtp_layers: int) -> int:
        """Bytes of the checkpoint's first `mtp_layers` MTP layers (those vLLM loads):
        its tensors under an `mtp*` name (Qwen3.5's `mtp.*`, MiMo's `mtp_layers`,
        DSpark's `mtp.0-2`; a numbered one from `mtp_layers` on left out), and those
        of layers `num_layers` (the model's own count) to `num_layers + mtp_layers - 1`
        in a stack of experts (DeepSeek-V3's and GLM-4.5's `model.layers.61.*`).
        From the safetensors headers: nothing is read but them."""
        names = self._index()
        stacks = {k[:_layer_at(k)] for k in self._sorted if ".experts." in k
                  and _layer_at(k) >= 0}

        def mtp(name: str) -> bool:
            parts = name.split(".")
            at = next((i for i, p in enumerate(parts) if p.startswith("mtp")), None)
            if at is not None:
                number = next((p for p in parts[at + 1:] if p.isdigit()), None)
                return number is None or int(number) < mtp_layers
            at = _layer_at(name)
            number = _layer_of(name)[len("layers."):] if at >= 0 else ""
            return (name[:at] in stacks and number.isdigit()
                    and num_layers <= int(number) < num_layers + mtp_layers)

        of_file: dict[Path, list[str]] = {}
        for k in self._sorted:
            if mtp(k):
                of_file.setdefault(names[k], []).append(k)
        return sum(_header_bytes(f, ks) for f, ks in of_file.items())

    def read(self, prefix: str, expert: int) -> tuple[torch.Tensor, ...]:
        """(w13 [2I, H] = gate ++ up, w2 [H, I]) as the checkpoint holds them, then
        (w13_bias [2I], w2_bias [H]) where it has biases (gpt-oss: gate and up
        interleaved, as vLLM's swigluoai reads them)."""
        return self._again_if_moved(self._read, prefix, expert)

    def _again_if_moved(self, read, path: str, expert: int):
        try:
            return read(self.checkpoint_prefix(path), expert)
        except (OSError, KeyError, SafetensorError):
            # the files may have moved (or come back) since they were indexed
            self._file_of, self._prefixes = None, {}
            return read(self.checkpoint_prefix(path), expert)

    def _read(self, prefix: str, expert: int) -> tuple[torch.Tensor, ...]:
        index = self._index()
        for names in PROJECTIONS:
            keys = [f"{prefix}.{expert}.{n}.weight" for n in names]
            if all(k in index for k in keys):
                gate, up, down = (self._tensor(index[k], k) for k in keys)
                return torch.cat([gate, up]), down
        parent = prefix.rsplit(".experts", 1)[0]
        biases = (f"{prefix}.gate_up_proj_bias", f"{prefix}.down_proj_bias")  # gpt-oss
        has_bias = all(b in index for b in biases)
        for up, down in ((f"{prefix}.gate_up_proj", f"{prefix}.down_proj"),
                         (f"{parent}.input_linear.weight", f"{parent}.output_linear.weight")):
            if up in index and down in index:  # fused [E, 2I, H] and [E, H, I]
                out = _oriented(self._tensor(index[up], up, expert),
                                self._tensor(index[down], down, expert), up)
                if has_bias:
                    out += tuple(self._tensor(index[b], b, expert) for b in biases)
                return out
        raise KeyError(f"{prefix}.{expert}.gate_proj.weight (or .w1.weight, or fused "
                       f"{prefix}.gate_up_proj / {parent}.input_linear.weight) is not in "
                       f"the checkpoint at {self.model_dir}")

    @staticmethod
    def _tensor(path: Path, name: str, expert: int | None = None) -> torch.Tensor:
        """The tensor `name`, or only its row `expert` (a fused [E, ...] tensor)."""
        with safe_open(path, "pt") as st:
            if expert is None:
                return st.get_tensor(name)
            return st.get_slice(name)[expert:expert + 1][0]

    def expert_tensor_names(self, prefix: str, expert: int) -> list[str]:
        """The checkpoint's tensors of one expert stored apart, relative to
        `{prefix}.{expert}.` (`gate_proj.weight`, `gate_proj.weight_scale`, ...)."""
        head = f"{self.checkpoint_prefix(prefix)}.{expert}."
        return [k[len(head):] for k in self._under(head)]

    def fused_tensor_names(self, prefix: str) -> list[str]:
        """The checkpoint's tensors that hold all experts of the layer, `[E, ...]`,
        relative to `{prefix}.` (gpt-oss MXFP4: `gate_up_proj_blocks`, ...)."""
        head = f"{self.checkpoint_prefix(prefix)}."
        return [k[len(head):] for k in self._under(head) if "." not in k[len(head):]]

    def read_named(self, prefix: str, expert: int) -> dict[str, torch.Tensor]:
        """One expert's tensors by their names relative to `{prefix}.{expert}.`, or
        where the checkpoint fuses the layer's experts, row `expert` of each fused
        tensor by its name relative to `{prefix}.` (store repair of a quantized
        checkpoint's experts)."""
        return self._again_if_moved(self._read_named, prefix, expert)

    def _read_named(self, prefix: str, expert: int) -> dict[str, torch.Tensor]:
        index = self._index()
        names = self.expert_tensor_names(prefix, expert)
        if names:
            return {n: self._tensor(index[f"{prefix}.{expert}.{n}"],
                                    f"{prefix}.{expert}.{n}") for n in names}
        fused = self.fused_tensor_names(prefix)
        if not fused:
            raise KeyError(f"no tensors {prefix}.{expert}.* nor {prefix}.* in the "
                           f"checkpoint at {self.model_dir}")
        return {n: self._tensor(index[f"{prefix}.{n}"], f"{prefix}.{n}", expert)
                for n in fused}


def _oriented(w13: torch.Tensor, w2: torch.Tensor, name: str) -> tuple[torch.Tensor, ...]:
    """(w13 [2I, H], w2 [H, I]) from one row of fused tensors stored either way: as
    vLLM's layout, or transposed ([H, 2I], [I, H]: Llama-4, gpt-oss, Qwen3-VL-MoE).
    The shapes decide: both readings fit only if I were 0."""
    (a, b), (c, d) = w13.shape, w2.shape
    if b == c and a == 2 * d:
        return w13, w2
    if a == d and b == 2 * c:
        return w13.t().contiguous(), w2.t().contiguous()
    raise ValueError(f"{name}: an expert of shapes {tuple(w13.shape)} and {tuple(w2.shape)} "
                   f"is neither [2I, H] and [H, I] nor their transposes")


def _layer_at(name: str) -> int:
    """Where the last `layers.` component of a tensor or module name starts; -1."""
    i = name.rfind("layers.")
    while i > 0 and name[i - 1] != ".":
        i = name.rfind("layers.", 0, i)
    return i


def _layer_of(name: str) -> str | None:
    """`layers.N` of a tensor or module name (its last), None if it has none."""
    i = _layer_at(name)
    if i < 0:
        return None
    j = name.find(".", i + len("layers."))
    return name[i:j] if j > 0 else name[i:]


def _header_bytes(path: Path, names: list[str]) -> int:
    """The bytes of tensors `names` of a safetensors file, from its header."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return sum(header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in names)
