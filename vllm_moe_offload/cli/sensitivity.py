"""Routing sensitivity per task and MoE layer (eMoE), for the task-aware plan.

    python -m vllm_moe_offload sensitivity --model M --task python=python.txt \
        --task legal=legal.txt --out sensitivity.json [--threshold 0.05]

For each task the greedy next token at every position of `--tokens` tokens of its
text is the baseline. Then, one MoE layer at a time, every token loses its top-1
expert at that layer (it goes to ranks 2..k+1, as approximate re-routing of a
missing expert would do), and change = the share of positions whose greedy next
token differs from the baseline. Layers with change < threshold are insensitive
for that task: the file written here (core/sensitivity.py reads it) lets the plan
ignore them and approximate re-routing use them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vllm_moe_offload.core.files import write_text_atomic
from vllm_moe_offload.core.sensitivity import SENSITIVITY_FORMAT
from vllm_moe_offload.hf.routing import _routers, load_model, local_checkpoint_problem, read_texts

SEQ_LEN = 256


def _drop_top1(module, _args, out):
    """Forward hook on a router: route each token as if its top-1 expert were absent.

    Routers of transformers 4 are Linear layers returning logits (the MoE block takes
    the top-k of their softmax), so masking the logits is enough. Routers of
    transformers 5 return (logits, scores, indices) and pick the top-k themselves, so
    scores and indices are recomputed from the masked logits the way they do it."""
    if isinstance(out, torch.Tensor):
        return _mask_top1(out)
    if not (isinstance(out, tuple) and len(out) == 3):
        raise TypeError(f"{type(module).__name__} returned {type(out).__name__}, not "
                        "logits or (logits, scores, indices): unknown router")
    logits, scores, indices = out
    masked = _mask_top1(logits)
    top, ids = torch.softmax(masked.float(), dim=-1).topk(indices.shape[-1], dim=-1)
    if getattr(module, "norm_topk_prob", True):  # Mixtral's router always normalises
        top = top / top.sum(dim=-1, keepdim=True)
    return masked, top.to(scores.dtype), ids


def _mask_top1(logits: torch.Tensor) -> torch.Tensor:
    return logits.scatter(-1, logits.argmax(-1, keepdim=True), float("-inf"))


def _token_ids(tokenizer, text: str, n: int) -> list[int]:
    """First `n` token ids of `text`, tokenizing only as much of it as needed."""
    chars = 8 * n
    while True:
        ids = tokenizer(text[:chars])["input_ids"]
        if len(ids) > n or chars >= len(text):
            return ids[:n]
        chars *= 2


def _greedy(model, ids: list[int]) -> torch.Tensor:
    """Greedy next token at every position of `ids`, run in SEQ_LEN windows."""
    return torch.cat([model(torch.tensor([ids[s:s + SEQ_LEN]]), use_cache=False)
                      .logits[0].argmax(-1) for s in range(0, len(ids), SEQ_LEN)])


@torch.inference_mode()
def layer_changes(model, routers, ids: list[int]) -> list[float]:
    """Per MoE layer: share of positions whose greedy next token changes when that
    layer (alone) drops every token's top-1 expert."""
    baseline = _greedy(model, ids)
    changes = []
    for router in routers:
        hook = router.register_forward_hook(_drop_top1)
        try:
            changes.append((_greedy(model, ids) != baseline).float().mean().item())
        finally:
            hook.remove()
    return changes


def _fail(message: str):
    raise SystemExit(f"sensitivity: {message}")


def _parse_tasks(specs: list[str], part: str) -> dict[str, str]:
    """NAME=FILE specs -> {name: text}; one-line errors for bad specs and files."""
    texts = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            _fail(f"--task {spec!r} is not NAME=FILE; write e.g. --task python=python.txt")
        if name in texts:
            _fail(f"--task {spec!r}: task {name!r} is given twice; give each task once")
        try:
            texts[name] = read_texts([path], part)[0]
        except OSError as e:
            _fail(f"--task {spec!r}: cannot read {path!r} ({e.strerror}); give an "
                  "existing text file of that task")
    return texts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF MoE checkpoint directory")
    p.add_argument("--task", action="append", required=True, metavar="NAME=FILE",
                   help="a task and a text file of it; repeat for each task")
    p.add_argument("--out", required=True, help="sensitivity JSON file to write")
    p.add_argument("--threshold", type=float, default=0.05,
                   help="layers whose change is below this are insensitive")
    p.add_argument("--tokens", type=int, default=2048, help="tokens of text per task")
    p.add_argument("--part", default="all", choices=["all", "train", "heldout"],
                   help="use the whole files, or the first 95%% / last 5%% of each")
    args = p.parse_args(argv)
    if args.tokens < 2:
        _fail(f"--tokens {args.tokens}: give at least 2 tokens per task")
    problem = local_checkpoint_problem(args.model)
    if problem:
        _fail(problem)
    texts = _parse_tasks(args.task, args.part)
    torch.set_num_threads(2)
    try:
        model, tokenizer = load_model(args.model)
        routers = _routers(model)
    except (OSError, ValueError) as e:
        _fail(f"--model {args.model!r}: {str(e).splitlines()[0]}; give a MoE checkpoint "
              "directory of a family whose routers it reads (README's support table)")

    tasks, token_counts = {}, {}
    for name, text in texts.items():
        ids = _token_ids(tokenizer, text, args.tokens)
        if len(ids) < 2:
            _fail(f"--task {name}: its text has {len(ids)} tokens; give a longer file")
        changes = layer_changes(model, routers, ids)
        token_counts[name] = len(ids)
        tasks[name] = {"change": [round(c, 6) for c in changes],
                       "insensitive": [l for l, c in enumerate(changes)
                                       if c < args.threshold]}

    metric = (f"share of up to {args.tokens} positions per task whose greedy next token "
              "changes when that layer alone routes each token to its ranks 2..k+1 "
              "(top-1 expert removed)")
    body = {"format": SENSITIVITY_FORMAT, "model": args.model, "num_layers": len(routers),
            "threshold": args.threshold, "metric": metric, "tasks": tasks}
    out = Path(args.out)
    write_text_atomic(out, json.dumps(body, indent=1))

    print(f"change = {metric}; * = insensitive (< {args.threshold})")
    width = max(len(n) for n in tasks)
    print(" " * width + "".join(f"  L{l:<6}" for l in range(len(routers))))
    for name, row in tasks.items():
        cells = "".join(f"  {c:.4f}{'*' if l in row['insensitive'] else ' '}"
                        for l, c in enumerate(row["change"]))
        print(f"{name:<{width}}{cells}  ({token_counts[name]} tokens)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
