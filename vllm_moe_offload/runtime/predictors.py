"""Expert predictors: which experts will layers L+1..L+d route to?

Legend: T = tokens, H = hidden size, E = experts per layer, d = distance (1..depth).

All predictors read the hidden state that enters layer L's experts (the router's
input, after attention and its norm): that is what the slot pool sees when layer L
runs, and the loads they trigger overlap layer L's experts and the next layers'
attention. Predictions only decide what is loaded early, never what is computed.

- `NextGatePredictor`: layer L+d's own gate applied to layer L's hidden state.
- `LookaheadPredictor`: one small head per (L, d), initialised from layer L+d's gate
  and trained to reproduce that gate's top-k decisions (train_lookahead.py).
- `OraclePredictor`: replays a recorded routing trace (benchmarks: the ceiling).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn

# the decoder's routers; not an MTP draft's (`mtp.layers.N`, or layers past the last).
# Vision-language checkpoints name the decoder `model.language_model.layers.N`
# (Qwen3.5) or `language_model.model.layers.N` (Llama-4).
_GATE_NAME = re.compile(
    r"^(?:language_model\.)?model\.(?:language_model\.)?layers\.(\d+)\."
    r"(?:mlp|block_sparse_moe|feed_forward)\.(?:gate|router|router\.layer)\.weight$")


def load_gates(model_dir: str | Path) -> list[torch.Tensor]:
    """Each MoE layer's router weight [E, H] (fp32), read from the checkpoint files."""
    from safetensors import safe_open

    gates: dict[int, torch.Tensor] = {}
    config = Path(model_dir) / "config.json"
    num_layers = None
    if config.exists():
        cfg = json.loads(config.read_text())
        num_layers = (cfg.get("num_hidden_layers")
                      or (cfg.get("text_config") or {}).get("num_hidden_layers"))
    files = sorted(Path(model_dir).glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                m = _GATE_NAME.search(name)
                if m and (num_layers is None or int(m.group(1)) < num_layers):
                    gates[int(m.group(1))] = st.get_tensor(name).float()
    if not gates:
        raise ValueError(f"no router weights (model.layers.N.mlp.gate.weight, "
                         f"...block_sparse_moe.gate.weight or .router.layer.weight) found "
                         f"in {model_dir}: "
                         "next-gate and lookahead predictors need a real checkpoint (not "
                         "load_format='dummy') of a family whose routers they read (the "
                         "README's support table); use --expert-predictor none")
    return [gates[i] for i in sorted(gates)]


def model_fingerprint(gates: list[torch.Tensor]) -> str:
    """Identifies a model by its routers: same shapes *and* same weights."""
    h = hashlib.sha256()
    for g in gates:
        h.update(str(tuple(g.shape)).encode())
        h.update(g.to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


class Predictor:
    name = "none"

    def __init__(self, depth: int, top_k: int, num_layers: int):
        self.depth, self.top_k, self.num_layers = depth, top_k, num_layers

    def targets(self, layer: int) -> range:
        return range(layer + 1, min(layer + self.depth, self.num_layers - 1) + 1)

    def logits(self, layer: int, distance: int, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def all_logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [D', T, E] for every target of `layer` (D' = len(targets))."""
        return torch.stack([self.logits(layer, t - layer, hidden)
                            for t in self.targets(layer)])

    @torch.inference_mode()
    def predict(self, layer: int, hidden: torch.Tensor) -> list[tuple[int, list[int]]]:
        """[(target layer, distinct predicted experts over the batch)], nearest first;
        each target's experts in order of the rows that named them, most first (ties
        by id): where the prefetch budget runs out, the most-wanted are loaded.

        Runs in the forward pass of every layer call, so all targets are computed in
        one batched pass and read back with one host sync.
        """
        top = self._top_ids(layer, hidden)
        if top is None:
            return []
        targets, ids, num_experts = top
        flat = ids.flatten(1)
        votes = torch.zeros(len(targets), num_experts, dtype=torch.int32,
                            device=ids.device).scatter_add_(
            1, flat, torch.ones_like(flat, dtype=torch.int32))  # [D', E]
        rows = votes.tolist()
        return [(t, sorted((e for e, n in enumerate(row) if n), key=lambda e: -row[e]))
                for t, row in zip(targets, rows)]

    @torch.inference_mode()
    def predict_ids(self, layer: int, hidden: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """[(target layer, predicted ids [T, k])] on the device, with no host sync
        (device mode): the same top-k as `predict`, left for the prefetch kernel."""
        top = self._top_ids(layer, hidden)
        if top is None:
            return []
        targets, ids, _ = top
        return [(t, ids[i]) for i, t in enumerate(targets)]

    def _top_ids(self, layer: int, hidden: torch.Tensor):
        """(targets, top-k ids [D', T, k], E) of one batched pass; None without targets."""
        targets = self.targets(layer)
        if not targets:
            return None
        logits = self.all_logits(layer, hidden.float())  # [D', T, E]
        return targets, logits.topk(self.top_k, dim=-1).indices, logits.shape[-1]


class NextGatePredictor(Predictor):
    name = "next-gate"

    def __init__(self, gates: list[torch.Tensor], depth: int, top_k: int):
        super().__init__(depth, top_k, len(gates))
        self.gates = [g.float() for g in gates]
        # layer -> its targets' gates stacked [D', E, H]
        self._stacked = {l: torch.stack([self.gates[t] for t in self.targets(l)])
                         for l in range(self.num_layers) if self.targets(l)}

    def logits(self, layer, distance, hidden):
        return hidden @ self.gates[layer + distance].T  # [T, E]

    def all_logits(self, layer, hidden):
        return torch.matmul(hidden, self._stacked[layer].transpose(1, 2))  # [D', T, E]


class LookaheadHead(nn.Module):
    """gate_{L+d}(x) + a small MLP correction that starts at zero."""

    def __init__(self, gate: torch.Tensor, hidden_units: int = 512):
        super().__init__()
        num_experts, hidden = gate.shape
        f32 = dict(dtype=torch.float32)  # vLLM loads models under a bf16 default dtype
        self.gate = nn.Linear(hidden, num_experts, **f32)
        self.norm = nn.LayerNorm(hidden, **f32)
        self.up = nn.Linear(hidden, hidden_units, **f32)
        self.down = nn.Linear(hidden_units, num_experts, **f32)
        with torch.no_grad():
            self.gate.weight.copy_(gate)
            self.gate.bias.zero_()
            self.down.weight.zero_()
            self.down.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, E]
        return self.gate(x) + self.down(nn.functional.gelu(self.up(self.norm(x))))


class LookaheadPredictor(Predictor):
    name = "lookahead"

    def __init__(self, heads: dict[tuple[int, int], LookaheadHead], depth: int,
                 top_k: int, num_layers: int):
        super().__init__(depth, top_k, num_layers)
        self.heads = heads
        self._stacked: dict[int, dict[str, torch.Tensor]] = {}

    def to(self, device) -> "LookaheadPredictor":
        for head in self.heads.values():
            head.to(device)
        self._stacked.clear()
        return self

    @torch.no_grad()
    def logits(self, layer, distance, hidden):
        return self.heads[(layer, distance)](hidden)

    def _params(self, layer: int) -> dict[str, torch.Tensor]:
        """The heads of `layer`'s targets, stacked on a leading D' dimension."""
        if layer not in self._stacked:
            heads = [self.heads[(layer, t - layer)] for t in self.targets(layer)]
            stack = lambda get: torch.stack([get(h).detach() for h in heads])  # noqa: E731
            self._stacked[layer] = {
                "gate_w": stack(lambda h: h.gate.weight).transpose(1, 2),  # [D', H, E]
                "gate_b": stack(lambda h: h.gate.bias).unsqueeze(1),  # [D', 1, E]
                "ln_w": stack(lambda h: h.norm.weight).unsqueeze(1),  # [D', 1, H]
                "ln_b": stack(lambda h: h.norm.bias).unsqueeze(1),
                "up_w": stack(lambda h: h.up.weight).transpose(1, 2),  # [D', H, M]
                "up_b": stack(lambda h: h.up.bias).unsqueeze(1),  # [D', 1, M]
                "down_w": stack(lambda h: h.down.weight).transpose(1, 2),  # [D', M, E]
                "down_b": stack(lambda h: h.down.bias).unsqueeze(1),  # [D', 1, E]
                "eps": torch.tensor(heads[0].norm.eps)}
        return self._stacked[layer]

    def all_logits(self, layer, hidden):
        p = self._params(layer)
        x = hidden.unsqueeze(0)  # [1, T, H]
        xn = nn.functional.layer_norm(hidden, hidden.shape[-1:], eps=float(p["eps"]))
        xa = xn.unsqueeze(0) * p["ln_w"] + p["ln_b"]  # [D', T, H]
        up = nn.functional.gelu(torch.baddbmm(p["up_b"], xa, p["up_w"]))  # [D', T, M]
        out = torch.baddbmm(p["down_b"], up, p["down_w"])  # [D', T, E]
        return out + torch.matmul(x, p["gate_w"]) + p["gate_b"]


def save_lookahead(path: str | Path, heads: dict[tuple[int, int], LookaheadHead],
                   fingerprint: str, depth: int, top_k: int, num_layers: int,
                   extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {f"head.{l}.{d}.{k}": v.detach().contiguous()
               for (l, d), head in heads.items() for k, v in head.state_dict().items()}
    meta = {"format": "vllm-moe-offload-lookahead/1", "model_fingerprint": fingerprint,
            "depth": str(depth), "top_k": str(top_k), "num_layers": str(num_layers),
            "hidden_units": str(next(iter(heads.values())).up.out_features),
            "extra": json.dumps(extra or {})}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:  # renamed over `path` whole: a stopped write leaves the old sidecar
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_lookahead_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    if not Path(path).is_file():
        raise ValueError(f"expert_offload.predictor_path={str(path)!r} does not exist; "
                         "train one with: python -m vllm_moe_offload train-lookahead "
                         "--model M --prompts FILE --depth D --out FILE")
    try:
        with safe_open(str(path), framework="pt") as st:
            meta = st.metadata() or {}
    except Exception as e:  # not a safetensors file at all
        raise ValueError(f"expert_offload.predictor_path={str(path)!r} is not a "
                         f"lookahead sidecar ({e})") from None
    if meta.get("format") != "vllm-moe-offload-lookahead/1":
        raise ValueError(f"expert_offload.predictor_path={str(path)!r} is not a "
                         "lookahead sidecar written by train_lookahead")
    return meta


def check_sidecar(path: str | Path, fingerprint: str) -> dict:
    meta = read_lookahead_metadata(path)
    if meta["model_fingerprint"] != fingerprint:
        raise ValueError(
            f"expert_offload.predictor_path={str(path)!r} was trained for another model "
            f"(router fingerprint {meta['model_fingerprint'][:12]}, this model "
            f"{fingerprint[:12]}); retrain it for this model with python -m "
            "vllm_moe_offload train-lookahead --model THIS_MODEL ...")
    return meta


def load_lookahead(path: str | Path, gates: list[torch.Tensor], depth: int,
                   top_k: int) -> LookaheadPredictor:
    from safetensors.torch import load_file

    meta = check_sidecar(path, model_fingerprint(gates))
    trained_depth = int(meta["depth"])
    if depth > trained_depth:
        raise ValueError(f"expert_offload.prefetch_depth={depth} exceeds the depth "
                         f"{trained_depth} that {path} was trained for; lower it or "
                         "retrain with --depth")
    state = defaultdict(dict)
    for name, value in load_file(str(path)).items():
        _, l, d, key = name.split(".", 3)
        state[(int(l), int(d))][key] = value
    heads = {}
    for (l, d), sd in state.items():
        if d > depth:  # trained deeper than it runs: never asked, so never built
            continue
        head = LookaheadHead(gates[l + d], int(meta["hidden_units"]))
        head.load_state_dict(sd)
        heads[(l, d)] = head.eval()
    return LookaheadPredictor(heads, depth, top_k, len(gates))


class OraclePredictor(Predictor):
    """Predicts from a trace of an earlier, identical run: the exact future routing."""

    name = "oracle"

    def __init__(self, records, depth: int, top_k: int, num_layers: int):
        super().__init__(depth, top_k, num_layers)
        self.calls: dict[tuple[int, int], list[int]] = {}
        for r in records:
            self.calls[(r.step, r.layer)] = sorted(set(r.expert_ids))
        self.step = -1
        self._last_layer = None

    def predict(self, layer, hidden):
        if self._last_layer is None or layer <= self._last_layer:
            self.step += 1  # same step rule as the trace writer
        self._last_layer = layer
        return [(t, self.calls.get((self.step, t), [])) for t in self.targets(layer)]

    def predict_ids(self, layer, hidden):
        """The trace's ids as device tensors (a small pinned upload per target)."""
        out = []
        for t, experts in self.predict(layer, hidden):
            if experts:
                ids = torch.tensor(experts, dtype=torch.int32)
                if hidden.is_cuda:
                    ids = ids.pin_memory().to(hidden.device, non_blocking=True)
                out.append((t, ids))
        return out
