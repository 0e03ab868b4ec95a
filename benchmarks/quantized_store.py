"""What a quantized slow tier costs in quality, and what it saves (--expert-store-bits).

    .venv/bin/python -m pip install -e ".[eval]"    # lm-eval, the evaluation client
    .venv/bin/python benchmarks/quantized_store.py [--bits 16 8 4 3 2] [--docs 32]

Model: the trained ../shared/models/tiny-moe-4domains. One fresh OpenAI server
(`python -m vllm.entrypoints.openai.api_server`) per row: plain vLLM, then offload
with the disk store, the pool at 50% of all experts, no predictor, and the store at
each bit width (HQQ, groups of 64; `--quantizer rtn` for round-to-nearest).
1. Perplexity, measured by lm-eval's `local-completions` model against the server
   over a local text task: `docs` held-out documents (the last 5% of each domain
   file of ../shared/data/corpus, 2,000 characters each, domains in turn), scored
   with loglikelihood_rolling (word and byte perplexity, bits per byte). The lm-eval
   command is printed and saved; it runs against any server.
2. Greedy agreement: 16 held-out prompts, 64 greedy tokens each, sent one at a time;
   the share of token positions equal to the 16-bit row's, and the mean length of
   the prefix they share.
3. Bytes and speed: bytes per miss from the server's /metrics (loaded bytes over
   misses, first pass of step 2), the store files' size, and output tokens/s at
   batch 1: step 2 timed `--speed-passes` times (3), the median (a pass must give
   the same tokens as the first).
`--mixed 8/2 ...` adds mixed-precision rows (--expert-store-hot-bits): the quarter
of each layer's experts that per-domain task profiles rank hot at the first width,
the rest at the second. The profiles are counted from the model's own routing
(transformers) over the training part (first 95%) of each domain file, 4,096
tokens per domain, and written to the work directory.
Plain vLLM's perplexity must equal the 16-bit row's (offload is exact there).
Writes benchmarks/results/quantized_store.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from common import RESULTS, SHARED, held_out_prompts, write_results
from serving.server import serving

MODEL = SHARED / "models" / "tiny-moe-4domains"
WORK = RESULTS / "work" / "quantized_store"
TASK = """task: heldout_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def held_out_docs(n: int, chars: int = 2000) -> list[str]:
    files = sorted((SHARED / "data" / "corpus").glob("*.txt"))
    docs = []
    for i in range(n):
        text = files[i % len(files)].read_text(errors="replace")
        tail = text[int(len(text) * 0.95):]
        start = (i // len(files)) * chars + chars // 2  # not the prompts' start
        docs.append(tail[start:start + chars])
    return docs


def write_task(work: Path, docs: list[str]) -> Path:
    task_dir = work / "lm_eval_task"
    task_dir.mkdir(parents=True, exist_ok=True)
    data = task_dir / "heldout.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (task_dir / "heldout_text.yaml").write_text(TASK.format(data=data))
    return task_dir


def lm_eval_command(url: str, task_dir: Path, out: Path) -> list[str]:
    args = ",".join([f"model={MODEL}", f"base_url={url}/v1/completions",
                     "tokenizer_backend=huggingface", f"tokenizer={MODEL}",
                     "max_length=1024", "num_concurrent=1", "max_retries=2"])
    return [sys.executable, "-m", "lm_eval", "--model", "local-completions",
            "--model_args", args, "--tasks", "heldout_text", "--include_path",
            str(task_dir), "--batch_size", "1", "--output_path", str(out)]


def perplexity(url: str, task_dir: Path, out: Path) -> dict:
    cmd = lm_eval_command(url, task_dir, out)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"lm-eval failed:\n{proc.stderr[-3000:]}")
    result = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())
    r = result["results"]["heldout_text"]
    return {"word_perplexity": r["word_perplexity,none"],
            "byte_perplexity": r["byte_perplexity,none"],
            "bits_per_byte": r["bits_per_byte,none"], "lm_eval_command": shlex.join(cmd)}


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def greedy(url: str, prompts: list[str], max_tokens: int) -> tuple[list[list[int]], float]:
    """Token ids of greedy completions, one request at a time; output tokens/s."""
    ids, t0 = [], time.perf_counter()
    for p in prompts:
        r = post(url + "/v1/completions",
                 {"model": str(MODEL), "prompt": p, "max_tokens": max_tokens,
                  "temperature": 0.0, "ignore_eos": True, "logprobs": 0,
                  "return_tokens_as_token_ids": True})
        tokens = r["choices"][0]["logprobs"]["tokens"]
        ids.append([int(t.split(":", 1)[1]) for t in tokens])
    seconds = time.perf_counter() - t0
    return ids, sum(map(len, ids)) / seconds


def scrape(url: str) -> dict:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("vllm_moe_offload_") and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            if "{" not in name:
                out[name] = float(value)
    return out


def agreement(ids: list[list[int]], ref: list[list[int]]) -> tuple[float, float]:
    same = total = prefix = 0
    for a, b in zip(ids, ref):
        same += sum(x == y for x, y in zip(a, b))
        total += len(b)
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefix += n
    return same / total, prefix / len(ref)


def write_profiles(path: Path, tokens_per_domain: int = 4096) -> Path:
    """Task profiles (one task per domain) from the model's routing on training text."""
    from vllm_moe_offload.core.tasks import TaskProfiles
    from vllm_moe_offload.hf.routing import capture, load_model, read_texts

    model, tokenizer = load_model(str(MODEL))
    files = sorted((SHARED / "data" / "corpus").glob("*.txt"))
    profiles = None
    for f, text in zip(files, read_texts([str(f) for f in files], "train")):
        routing = capture(model, tokenizer, text, tokens_per_domain)
        if profiles is None:
            profiles = TaskProfiles(routing.num_layers, model.config.num_local_experts)
        for layer, ids in enumerate(routing.expert_ids):
            profiles.record(f.stem, layer, ids.reshape(-1).tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    profiles.save(path)
    return path


def run_row(name: str, offload: dict | None, task_dir: Path, prompts, max_tokens,
            speed_passes: int) -> dict:
    work = WORK / name.replace(" ", "_")
    shutil.rmtree(work / "store", ignore_errors=True)  # size and build of this run alone
    work.mkdir(parents=True, exist_ok=True)
    with serving(str(MODEL), offload, work / "server.log", work,
                 startup_timeout=900) as (url, _):
        ppl = perplexity(url, task_dir, work / "lm_eval")
        before = scrape(url)
        ids, tps = greedy(url, prompts, max_tokens)
        after = scrape(url)
        speeds = [tps]
        for _ in range(speed_passes - 1):
            again, tps = greedy(url, prompts, max_tokens)
            if again != ids:
                raise RuntimeError(f"{name}: greedy tokens changed between passes")
            speeds.append(tps)
    bits = (offload or {}).get("store_bits", 16)
    if (offload or {}).get("store_hot_bits"):  # the mean over experts
        share = offload["store_hot_share"]
        bits = share * offload["store_hot_bits"] + (1 - share) * bits
    row = {"row": name, "bits": bits,
           "offload": offload is not None, **ppl, "token_ids": ids,
           "tokens_per_s": statistics.median(speeds), "tokens_per_s_passes": speeds}
    if offload is not None:
        misses = after["vllm_moe_offload_misses_total"] - before.get(
            "vllm_moe_offload_misses_total", 0)
        loaded = after["vllm_moe_offload_loaded_bytes_total"] - before.get(
            "vllm_moe_offload_loaded_bytes_total", 0)
        stores = list((work / "store").glob("*.experts"))
        row.update(misses=int(misses), bytes_per_miss=loaded / max(misses, 1),
                   store_mib=sum(s.stat().st_size for s in stores) / 2**20)
    print(json.dumps({k: v for k, v in row.items() if k != "token_ids"}), flush=True)
    return row


def markdown(rows) -> str:
    lines = ["| row | bits | word ppl | byte ppl | bits/byte | greedy tokens = 16-bit | "
             "shared prefix (of 64) | MiB per miss | store MiB | tokens/s (batch 1, median) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        off = r["offload"]
        lines.append(
            f"| {r['row']} | {r['bits']:g} | {r['word_perplexity']:.3f} | "
            f"{r['byte_perplexity']:.4f} | {r['bits_per_byte']:.4f} | "
            f"{r['agreement']:.1%} | {r['prefix']:.1f} | "
            + (f"{r['bytes_per_miss'] / 2**20:.4f} | {r['store_mib']:.1f} | " if off
               else "- | - | ")
            + f"{r['tokens_per_s']:.1f} |")
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    off = sorted((r for r in rows if r["offload"] and not r.get("mixed")),
                 key=lambda r: -r["bits"])
    mixed = [r for r in rows if r.get("mixed")]
    bits = [r["bits"] for r in off]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(bits, [r["byte_perplexity"] for r in off], "o-", label="byte perplexity")
    for r in mixed:  # mixed precision, at its mean bits
        a.plot([r["bits"]], [r["byte_perplexity"]], "D", color="tab:green")
        a.annotate(r["row"].replace("offload ", ""), (r["bits"], r["byte_perplexity"]),
                   fontsize=7, xytext=(3, 3), textcoords="offset points")
    a.set_xlabel("store bits")
    a.set_ylabel("byte perplexity (held-out text)")
    a.invert_xaxis()
    a2 = a.twinx()
    a2.plot(bits, [100 * r["agreement"] for r in off], "s--", color="tab:orange",
            label="greedy tokens = 16-bit (%)")
    a2.set_ylabel("greedy tokens equal to 16-bit (%)")
    a.set_title("quality")
    b.bar([f"{r['bits']:g}" + (" mixed" if r.get("mixed") else "") for r in off + mixed],
          [r["bytes_per_miss"] / 2**10 for r in off + mixed])
    b.set_xlabel("store bits (mean)")
    b.set_ylabel("KiB moved per miss")
    b.set_title("bytes per miss (pool 50%, disk store)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[16, 8, 4, 3, 2])
    ap.add_argument("--quantizer", default="hqq", choices=["hqq", "rtn"])
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--mixed", nargs="*", default=[], metavar="HOT/COLD",
                    help="mixed-precision rows, e.g. 8/2: hot experts at 8 bits, the rest at 2")
    ap.add_argument("--hot-share", type=float, default=0.25)
    ap.add_argument("--no-plain", action="store_true", help="skip the plain vLLM row")
    ap.add_argument("--speed-passes", type=int, default=3,
                    help="timed passes of the greedy prompts per row; tokens/s is their median")
    ap.add_argument("--name", default="quantized_store")
    args = ap.parse_args(argv)
    config = json.loads((MODEL / "config.json").read_text())
    total = config["num_hidden_layers"] * config["num_local_experts"]
    task_dir = write_task(WORK, held_out_docs(args.docs))
    prompts = held_out_prompts(args.prompts)
    rows = []
    if not args.no_plain:
        rows.append(run_row("plain vLLM", None, task_dir, prompts, args.max_tokens,
                            args.speed_passes))
    for bits in sorted(set(args.bits) | {16}, reverse=True):
        offload = {"enabled": True, "store": "disk", "pool_slots": total // 2,
                   "store_bits": bits}
        if bits < 16:
            offload.update(store_group_size=args.group, store_quantizer=args.quantizer)
        rows.append(run_row(f"offload {bits}-bit", offload, task_dir, prompts,
                            args.max_tokens, args.speed_passes))
    profiles = write_profiles(WORK / "profiles.json") if args.mixed else None
    for mix in args.mixed:
        hot, cold = (int(x) for x in mix.split("/"))
        offload = {"enabled": True, "store": "disk", "pool_slots": total // 2,
                   "store_bits": cold, "store_hot_bits": hot,
                   "store_hot_share": args.hot_share, "task_profiles_path": str(profiles),
                   "store_group_size": args.group, "store_quantizer": args.quantizer}
        rows.append(run_row(f"offload {cold}-bit, hot {args.hot_share:.0%} at {hot}",
                            offload, task_dir, prompts, args.max_tokens,
                            args.speed_passes))
        rows[-1]["mixed"] = True
    ref = next(r for r in rows if r["offload"] and r["bits"] == 16)["token_ids"]
    for r in rows:
        r["agreement"], r["prefix"] = agreement(r["token_ids"], ref)
    command = "python benchmarks/quantized_store.py " + " ".join(argv or sys.argv[1:])
    table = markdown(rows)
    print(table)
    write_results(args.name, command.strip(), table + "\n\nlm-eval command (per row): `"
                  + rows[-1]["lm_eval_command"] + "`", rows, plot)


if __name__ == "__main__":
    main()
