"""Routing captured from HF transformers runs (training and evaluating predictors).

Legend: N = tokens, H = hidden size, E = experts per layer, k = top-k.
For every MoE layer we record the router's input `x [N, H]` (the hidden state that
enters the layer's experts: the same tensor the plugin sees in vLLM) and the
experts it picked `ids [N, k]`, recomputed from the router weight so the result
does not depend on how a transformers version shapes the router's output.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Routing:
    hidden: list[torch.Tensor]  # per layer [N, H] fp32: input of that layer's router
    expert_ids: list[torch.Tensor]  # per layer [N, k] int64: experts it routed to
    top_k: int

    @property
    def num_layers(self) -> int:
        return len(self.hidden)


def local_checkpoint_problem(model_dir: str) -> str | None:
    """Why `model_dir` is not a checkpoint these tools read (they read its files
    themselves: a hub id is not downloaded), or None."""
    if (Path(model_dir) / "config.json").is_file():
        return None
    return (f"--model {model_dir!r} is not a directory with config.json; give a local "
            "HF MoE checkpoint directory (download a hub model first)")


def load_model(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def _routers(model) -> list[torch.nn.Module]:
    """The router of every MoE layer, in order; dense layers (DeepSeek's and GLM's
    first ones) have none and are skipped."""
    routers = []
    for layer in model.model.layers:
        block = (getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
                 or getattr(layer, "feed_forward", None))
        gate = getattr(block, "gate", None) or getattr(block, "router", None)
        if gate is not None and hasattr(gate, "weight"):
            routers.append(gate)
    if not routers:
        raise ValueError(f"{type(model).__name__} has no MoE router (a gate or router with a "
                         "weight under mlp, block_sparse_moe or feed_forward); the "
                         "predictors do not support it yet")
    return routers


def _choice(hidden: torch.Tensor, gate, k: int) -> torch.Tensor:
    """The experts `gate` picks: top-k of the logits (with the router's own bias,
    gpt-oss); with `group_limited_greedy` (DeepSeek-V2), within the best `topk_group`
    of `n_group` expert groups (a group scores its best expert); with a correction
    bias (GLM-4-MoE, DeepSeek-V3: sigmoid scores), of sigmoid(logits) + bias within
    the best `topk_group` groups (a group scores its top two), or (ERNIE-4.5) of
    softmax(logits) + bias."""
    scores = hidden @ gate.weight.float().T
    if isinstance(getattr(gate, "bias", None), torch.Tensor):  # gpt-oss: a linear's bias
        scores = scores + gate.bias.float()
    statics = getattr(gate, "moe_statics", None)
    if statics is not None:  # ERNIE-4.5: softmax probabilities plus the bias
        bias = statics.e_score_correction_bias.float().squeeze()
        return (scores.softmax(-1) + bias).topk(k, dim=-1).indices
    groups = getattr(gate, "num_group", None) or getattr(gate, "n_group", None) or 1
    bias = getattr(gate, "e_score_correction_bias", None)
    if bias is None:
        if groups > 1 and getattr(gate, "topk_method", None) == "group_limited_greedy":
            # DeepSeek-V2: softmax scores within the best `topk_group` groups, a group
            # scoring its best expert (softmax keeps the logits' order)
            return _in_best_groups(scores, groups, gate.topk_group, 1).topk(k, dim=-1).indices
        return scores.topk(k, dim=-1).indices
    scores = scores.sigmoid() + bias.float()
    if groups > 1:
        scores = _in_best_groups(scores, groups, gate.topk_group, 2)
    return scores.topk(k, dim=-1).indices


def _in_best_groups(scores: torch.Tensor, groups: int, topk_group: int,
                    per_group: int) -> torch.Tensor:
    """`scores` with every expert outside the best `topk_group` of `groups` equal
    groups at -inf; a group scores the sum of its best `per_group`."""
    n, e = scores.shape
    by_group = scores.view(n, groups, e // groups)
    best = by_group.topk(per_group, dim=-1).values.sum(-1).topk(topk_group, dim=-1).indices
    keep = torch.zeros(n, groups, dtype=torch.bool).scatter_(1, best, True)
    return by_group.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(n, e)


def top_k_of(config) -> int:
    return int(getattr(config, "num_experts_per_tok", None) or config.moe_k)  # moe_k: ERNIE


@torch.no_grad()
def capture(model, tokenizer, text: str, max_tokens: int, seq_len: int = 256) -> Routing:
    """Run `text` (first `max_tokens` tokens, in `seq_len` windows) and record routing."""
    routers = _routers(model)
    k = top_k_of(model.config)
    xs: list[list[torch.Tensor]] = [[] for _ in routers]
    hooks = []
    for i, gate in enumerate(routers):
        def hook(module, args, _out, i=i):
            xs[i].append(args[0].reshape(-1, args[0].shape[-1]).float().clone())
        hooks.append(gate.register_forward_hook(hook))
    try:
        ids = tokenizer(text)["input_ids"][:max_tokens]
        for start in range(0, len(ids), seq_len):
            window = ids[start:start + seq_len]
            if len(window) > 1:
                model(torch.tensor([window]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    hidden = [torch.cat(x) for x in xs]
    expert_ids = [_choice(h, g, k) for h, g in zip(hidden, routers)]
    return Routing(hidden, expert_ids, k)


@torch.no_grad()
def recall(logits_fn, routing: Routing, distance: int) -> float:
    """Fraction of routed (token, layer, expert) triples at layer L+d that the top-k
    of `logits_fn(L, d, x_L)` predicted."""
    hit = total = 0
    for layer in range(routing.num_layers - distance):
        predicted = logits_fn(layer, distance, routing.hidden[layer]).topk(
            routing.top_k, dim=-1).indices  # [N, k]
        routed = routing.expert_ids[layer + distance]  # [N, k]
        hit += (predicted.unsqueeze(-1) == routed.unsqueeze(-2)).any(-2).sum().item()
        total += routed.numel()
    return hit / total if total else 0.0


def previous_token_recall(routing: Routing) -> float:
    """Baseline: predict that each token reuses the previous token's experts."""
    hit = total = 0
    for ids in routing.expert_ids:
        hit += (ids[:-1].unsqueeze(-1) == ids[1:].unsqueeze(-2)).any(-2).sum().item()
        total += ids[1:].numel()
    return hit / total if total else 0.0


def read_texts(paths: list[str], part: str = "all") -> list[str]:
    """Text of each file; `part` 'train' = its first 95%, 'heldout' = its last 5%."""
    texts = []
    for p in paths:
        text = Path(p).read_text(errors="replace")
        cut = int(len(text) * 0.95)
        texts.append({"all": text, "train": text[:cut], "heldout": text[cut:]}[part])
    return texts


def capture_texts(model, tokenizer, texts: list[str], max_tokens: int,
                  names: list[str] | None = None) -> Routing:
    """Capture an equal share of `max_tokens` from each text (domains weigh the same);
    `names`: the texts' files, for errors."""
    share = max_tokens // len(texts)
    if share < 2:
        raise ValueError(f"--max-tokens {max_tokens} gives each of {len(texts)} texts "
                         f"{share} tokens; give at least {2 * len(texts)}")
    parts = [capture(model, tokenizer, t, share) for t in texts]
    for i, part in enumerate(parts):
        if len(part.hidden[0]) == 0:
            name = names[i] if names else f"text {i + 1}"
            raise ValueError(f"{name}: no tokens to capture here (empty, or too short "
                             "for this part of it)")
    return Routing([torch.cat([p.hidden[l] for p in parts]) for l in range(parts[0].num_layers)],
                   [torch.cat([p.expert_ids[l] for p in parts])
                    for l in range(parts[0].num_layers)], parts[0].top_k)


def check_depth(depth: int, num_moe_layers: int) -> None:
    """A lookahead depth the model has layers for: 1 .. MoE layers - 1."""
    if not 1 <= depth < num_moe_layers:
        raise ValueError(f"--depth {depth}: this model has {num_moe_layers} MoE layers, "
                         f"so 1 to {num_moe_layers - 1} layers ahead")


def trained_on(sidecar: str, paths: list[str]) -> list[str]:
    """Those of `paths` that a lookahead sidecar was trained on (its metadata)."""
    from vllm_moe_offload.runtime.predictors import read_lookahead_metadata

    try:
        extra = json.loads(read_lookahead_metadata(sidecar).get("extra", "{}"))
    except ValueError:
        return []  # (evaluate says what is wrong with it)
    stored = extra.get("prompts", [])
    seen = {os.path.realpath(p) for p in stored}
    names = {os.path.basename(p) for p in stored if not os.path.isabs(p)}  # (older
    return [p for p in paths  # sidecars kept paths as typed, from where they ran)
            if os.path.realpath(p) in seen or os.path.basename(p) in names]
