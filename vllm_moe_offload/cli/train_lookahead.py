"""Train lookahead heads by layer-wise gate alignment and write a sidecar.

    python -m vllm_moe_offload train-lookahead --model M --prompts FILE [FILE ...] \
        --depth D --out heads.safetensors

Captures router inputs and decisions from real runs of the model (HF transformers,
CPU is fine for small models), then fits one head per (layer L, distance d): the
head starts as layer L+d's gate and learns to reproduce that gate's top-k choice
from the hidden state entering layer L's experts. The sidecar carries the model's
router fingerprint; loading it with another model is refused.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from vllm_moe_offload.hf.routing import (Routing, capture_texts, check_depth, load_model,
                                         local_checkpoint_problem, read_texts, recall)
from vllm_moe_offload.runtime.predictors import (LookaheadHead, load_gates,
                                                 model_fingerprint, save_lookahead)


def train_head(gate: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, epochs: int,
               lr: float, hidden_units: int, batch: int = 1024) -> LookaheadHead:
    """x [N, H] at layer L; ids [N, k] routed at layer L+d."""
    head = LookaheadHead(gate, hidden_units)
    target = torch.zeros(len(ids), gate.shape[0]).scatter_(1, ids, 1.0)  # [N, E]
    steps = epochs * ((len(x) + batch - 1) // batch)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    for _ in range(epochs):
        for i in torch.randperm(len(x)).split(batch):
            logits = head(x[i])
            loss = (F.binary_cross_entropy_with_logits(logits, target[i])
                    + F.cross_entropy(logits, target[i] / ids.shape[1]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return head.eval()


def train(routing: Routing, gates: list[torch.Tensor], depth: int, epochs: int, lr: float,
          hidden_units: int, log=print) -> dict[tuple[int, int], LookaheadHead]:
    heads = {}
    for d in range(1, depth + 1):
        t0 = time.perf_counter()
        for layer in range(routing.num_layers - d):
            heads[(layer, d)] = train_head(gates[layer + d], routing.hidden[layer],
                                           routing.expert_ids[layer + d], epochs, lr,
                                           hidden_units)
        log(f"distance {d}: {routing.num_layers - d} heads in {time.perf_counter() - t0:.0f} s")
    return heads


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True,
                   help="a local HF MoE checkpoint directory (config.json, *.safetensors)")
    p.add_argument("--prompts", nargs="+", required=True, help="text files to train on")
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--part", default="all", choices=["all", "train"],
                   help="whole files, or the first 95%% of each (keep the rest held out)")
    p.add_argument("--max-tokens", type=int, default=90_000,
                   help="tokens to train on, an equal share from each file")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden-units", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    problem = local_checkpoint_problem(args.model)
    if problem:
        p.error(problem)
    if args.max_tokens // 10 // len(args.prompts) < 2:
        p.error(f"--max-tokens {args.max_tokens}: a tenth of it checks the heads, an "
                f"equal share from each of the {len(args.prompts)} files, at least 2 "
                f"tokens each; give {20 * len(args.prompts)} or more")
    torch.manual_seed(args.seed)
    try:  # (before the model is loaded: it may be large)
        gates = load_gates(args.model)
        check_depth(args.depth, len(gates))
    except ValueError as e:
        p.error(str(e).replace("; use --expert-predictor none", ""))
    model, tokenizer = load_model(args.model)
    texts = read_texts(args.prompts, args.part)
    cuts = [int(len(t) * 0.95) for t in texts]  # the last 5% checks the heads
    t0 = time.perf_counter()
    try:
        routing = capture_texts(model, tokenizer, [t[:c] for t, c in zip(texts, cuts)],
                                args.max_tokens, args.prompts)
        check = capture_texts(model, tokenizer, [t[c:] for t, c in zip(texts, cuts)],
                              args.max_tokens // 10, args.prompts)
    except ValueError as e:
        p.error(str(e))
    print(f"captured {len(routing.hidden[0])} tokens x {routing.num_layers} layers in "
          f"{time.perf_counter() - t0:.0f} s")
    heads = train(routing, gates, args.depth, args.epochs, args.lr, args.hidden_units)
    scores = {}
    for d in range(1, args.depth + 1):
        ours = recall(lambda l, d, x: heads[(l, d)](x).detach(), check, d)
        ref = recall(lambda l, d, x: x @ gates[l + d].T, check, d)
        scores[d] = {"lookahead": ours, "next-gate": ref}
        print(f"recall d={d}: lookahead {ours:.3f}  next-gate {ref:.3f}")
    save_lookahead(args.out, heads, model_fingerprint(gates), args.depth,
                   routing.top_k, routing.num_layers,
                   extra={"prompts": [os.path.realpath(f) for f in args.prompts],
                          "part": args.part, "tokens": len(routing.hidden[0]),
                          "check_recall": scores})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
