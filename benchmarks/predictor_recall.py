"""How well does each predictor name the experts of layers L+1..L+3?

    .venv/bin/python benchmarks/predictor_recall.py

On the trained checkpoint ../shared/models/tiny-moe-4domains (real routing): trains
lookahead heads on the first 95% of three domains (python, c, prose), then measures
recall at d = 1, 2, 3 on the held-out last 5% of those domains (also less the
long lines found verbatim in their first 95%) and of a domain the heads never saw
(legal). References: next-gate (later gates on this layer's hidden state),
previous-token reuse, and the oracle (replays the run: 1.0 by construction).
Writes benchmarks/results/predictor_recall.{json,md,png}.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from common import RESULTS, SHARED, run_record

from vllm_moe_offload.cli.eval_predictor import evaluate
from vllm_moe_offload.hf.routing import load_model, read_texts

MODEL = SHARED / "models" / "tiny-moe-4domains"
CORPUS = SHARED / "data" / "corpus"
SEEN, UNSEEN = ["python", "c", "prose"], ["legal"]
DEPTH = 3


def sidecar() -> Path:
    out = RESULTS / "work" / "lookahead-3domains.safetensors"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "vllm_moe_offload", "train-lookahead",
                        "--model", str(MODEL), "--part", "train", "--depth", str(DEPTH),
                        "--out", str(out), "--prompts",
                        *[str(CORPUS / f"{d}.txt") for d in SEEN]], check=True)
    return out


def unseen_lines(path: str, min_chars: int = 40) -> str:
    """The held-out last 5% of a file less its lines of `min_chars` or more found
    verbatim in the first 95% (the split is by characters: repeated code and licence
    text fall on both sides of it, and the heads trained on them; short lines such
    as `}` repeat in any text and stay)."""
    text = Path(path).read_text(errors="replace")
    cut = int(len(text) * 0.95)
    seen = set(text[:cut].splitlines())
    return "\n".join(line for line in text[cut:].splitlines()
                     if len(line) < min_chars or line not in seen)


def main() -> None:
    if not MODEL.exists():
        sys.exit(f"{MODEL} not found: this benchmark needs the trained checkpoint")
    path = sidecar()
    loaded = load_model(str(MODEL))
    results = {}
    files = {d: str(CORPUS / f"{d}.txt") for d in SEEN + UNSEEN}
    for name, texts in (
            ("held-out, seen domains", read_texts([files[d] for d in SEEN], "heldout")),
            ("held-out less lines seen in training, seen domains",
             [unseen_lines(files[d]) for d in SEEN]),
            ("held-out, unseen domain", read_texts([files[d] for d in UNSEEN], "heldout"))):
        results[name] = evaluate(str(MODEL), "lookahead", str(path), texts, DEPTH,
                                 max_tokens=40_000, loaded=loaded)
    rows = ["| text | predictor | d=1 | d=2 | d=3 |", "|---|---|---|---|---|"]
    for name, r in results.items():
        for pred in ("lookahead", "next-gate"):
            rows.append(f"| {name} ({r['tokens']} tokens) | {pred} | " + " | ".join(
                f"{r['recall'][d][pred]:.3f}" for d in range(1, DEPTH + 1)) + " |")
        rows.append(f"| {name} | previous-token reuse (same layer) | "
                    f"{r['previous_token']:.3f} | | |")
        rows.append(f"| {name} | oracle (replay) | 1.000 | 1.000 | 1.000 |")
    table = "\n".join(rows)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "predictor_recall.md").write_text(
        run_record() + "\n"
        "Recall of the top-2 predicted experts against the experts routed at layer L+d "
        f"(top-2 of 16), tiny-moe-4domains. Lookahead heads trained on {', '.join(SEEN)}."
        "\nCommand: `.venv/bin/python benchmarks/predictor_recall.py`\n\n" + table + "\n")
    (RESULTS / "predictor_recall.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / "predictor_recall.png")


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    depths = list(range(1, DEPTH + 1))
    for ax, (name, r) in zip(axes[0], results.items()):
        for pred, style in (("lookahead", "o-"), ("next-gate", "s--")):
            ax.plot(depths, [r["recall"][d][pred] for d in depths], style, label=pred)
        ax.axhline(r["previous_token"], color="gray", ls=":", label="previous token")
        ax.set_xticks(depths)
        ax.set_xlabel("distance d (layers ahead)")
        ax.set_ylabel("recall")
        ax.set_ylim(0.3, 1.0)
        ax.set_title(name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
