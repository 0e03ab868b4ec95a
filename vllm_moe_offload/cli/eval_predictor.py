"""Recall of an expert predictor on any text, per distance, against next-gate.

    python -m vllm_moe_offload eval-predictor --model M --predictor lookahead \
        --predictor-path heads.safetensors --text FILE --depth 3

Recall at distance d: of the (token, layer L+d, expert) triples the model routed,
the fraction that the predictor's top-k from layer L's hidden state named.
Prints one line per distance with next-gate and previous-token reuse as references.
"""

from __future__ import annotations

import argparse
import json

import torch

from vllm_moe_offload.hf.routing import (capture_texts, check_depth, load_model,
                                         local_checkpoint_problem, previous_token_recall,
                                         read_texts, recall, top_k_of, trained_on)
from vllm_moe_offload.runtime.predictors import (NextGatePredictor, check_sidecar, load_gates,
                                                 load_lookahead, model_fingerprint)


def evaluate(model_dir: str, predictor: str, predictor_path: str | None,
             texts: list[str], depth: int, max_tokens: int = 40_000, loaded=None) -> dict:
    """Recall per distance over `texts` (an equal share of `max_tokens` from each)."""
    if predictor not in ("next-gate", "lookahead"):
        raise ValueError(f"--predictor {predictor!r}: evaluate next-gate or lookahead "
                         "(oracle is exact by construction; none predicts nothing)")
    if predictor == "lookahead" and not predictor_path:
        raise ValueError("--predictor lookahead needs --predictor-path: a sidecar from "
                         "python -m vllm_moe_offload train-lookahead")
    gates = load_gates(model_dir)  # (these checks before the model: it may be large)
    check_depth(depth, len(gates))
    if predictor == "lookahead":
        check_sidecar(predictor_path, model_fingerprint(gates))
    model, tokenizer = loaded or load_model(model_dir)
    top_k = top_k_of(model.config)
    reference = NextGatePredictor(gates, depth, top_k)
    chosen = (reference if predictor == "next-gate"
              else load_lookahead(predictor_path, gates, depth, top_k))
    routing = capture_texts(model, tokenizer, texts, max_tokens)
    out = {"tokens": len(routing.hidden[0]), "previous_token": previous_token_recall(routing),
           "recall": {}}
    for d in range(1, depth + 1):
        out["recall"][d] = {
            predictor: recall(lambda l, d, x: chosen.logits(l, d, x), routing, d),
            "next-gate": recall(lambda l, d, x: reference.logits(l, d, x), routing, d)}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True,
                   help="a local HF MoE checkpoint directory (config.json, *.safetensors)")
    p.add_argument("--predictor", default="lookahead", choices=["next-gate", "lookahead"])
    p.add_argument("--predictor-path")
    p.add_argument("--text", nargs="+", required=True)
    p.add_argument("--part", default="auto", choices=["auto", "all", "train", "heldout"],
                   help="the whole file, its first 95%% or its last 5%%; auto (the "
                        "default): the last 5%% of a file the heads were trained on "
                        "(train-lookahead trains on the rest), else the whole file")
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=40_000)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    problem = local_checkpoint_problem(args.model)
    if problem:
        p.error(problem)
    torch.manual_seed(0)
    try:
        seen = (trained_on(args.predictor_path, args.text)
                if args.predictor == "lookahead" and args.predictor_path else [])
        if seen and args.part in ("all", "train"):
            print(f"warning: the heads were trained on {', '.join(seen)}; --part "
                  f"{args.part} scores them on text they learned (use --part heldout)")
        elif seen and args.part == "auto":
            print(f"the heads were trained on {', '.join(seen)}: scoring the last 5% of "
                  "each, which they did not learn from")
        texts = [read_texts([f], "heldout" if f in seen else "all")[0] for f in args.text] \
            if args.part == "auto" else read_texts(args.text, args.part)
        result = evaluate(args.model, args.predictor, args.predictor_path, texts,
                          args.depth, args.max_tokens)
    except ValueError as e:  # the shared loaders name the engine's settings
        p.error(str(e).replace("expert_offload.predictor_path", "--predictor-path")
                .replace("expert_offload.prefetch_depth", "--depth")
                .replace("; use --expert-predictor none", ""))
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['tokens']} tokens; previous-token reuse recall "
          f"{result['previous_token']:.3f}")
    for d, row in result["recall"].items():
        print(f"d={d}: " + "  ".join(f"{name} {value:.3f}" for name, value in row.items()))


if __name__ == "__main__":
    main()
