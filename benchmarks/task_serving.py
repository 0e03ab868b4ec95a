"""Task-aware expert residency and SLO scheduling, through the real OpenAI server.

    .venv/bin/python benchmarks/task_serving.py [--quick] [--configs a,b,c,d]
        [--sensitivity SENS.json] [--slo-scale 1.0] [--rate 4] [--requests 120]

Trained checkpoint ../shared/models/tiny-moe-4domains (8 MoE layers x 16 experts,
top-2). Four tasks, one per corpus domain (python, c, prose, legal); prompts are
--prompt-chars characters of each domain's held-out last 5%, at seeded offsets.
Each task has its own output length and TTFT/TPOT SLOs (TASKS, scaled by
--slo-scale). A client sends --requests streamed /v1/completions requests, task
drawn uniformly, Poisson arrivals at --rate req/s; every other request names its
task in vllm_xargs, the rest are classified by the server's rule file (RULES,
written to the work dir; its accuracy on the prompts used is printed).

Configurations, each in its own freshly started `python -m
vllm.entrypoints.openai.api_server` (one at a time):
  a  plain vLLM (all experts resident)
  b  expert offload, pool --pool-slots of 128 experts, --eviction (default reuse)
  c  task-aware residency (profiles + re-plan every --replan-every prompts)
  d  c + the SLO scheduler
  e  d + approximate routing (only with --sensitivity PATH)
c-e start from one task-profile file learned by a warm-up server (config c,
--warmup unmeasured requests of the same mix, another seed); each config gets a
fresh copy of it. Rows: SLO attainment, output tokens/s and req/s over the
makespan (first send to last completion), TTFT/TPOT p50/p99 (client side), the
pool hit rate (the plugin's last periodic `expert offload: hit rate` log line) and
re-plans (log lines with "replan"); for e, the similarity of its outputs to d's
(mean fraction of leading tokens identical, tokens from the model's tokenizer).
Writes benchmarks/results/task_serving.{md,json,png}; server logs, the rule file,
profiles and per-request results go to benchmarks/results/work/task_serving/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

from common import write_results
from serving.client import load_tokenizer, run_load, similarity, summarize
from serving.server import flush_stats, parse_log, serving
from serving.tasks import (CONFIGS, MODEL, TASKS, TOTAL_EXPERTS, WORK, Workload,
                           build_workload, rule_accuracy, write_rules)

# ---- driver --------------------------------------------------------------------

def offload_configs(args, rules: Path, sens: str | None) -> dict[str, dict | None]:
    base = {"enabled": True, "pool_slots": args.pool_slots, "eviction": args.eviction,
            "stats_log_interval_s": args.stats_interval}
    task = {**base, "task_aware": True, "task_scheduler": False,
            "task_rules_path": str(rules), "replan_every": args.replan_every}
    out = {"a": None, "b": base, "c": task, "d": {**task, "task_scheduler": True}}
    if sens:
        out["e"] = {**out["d"], "approximate": True, "sensitivity_path": sens}
    return out


def run_config(key: str, cfg: dict | None, workload: Workload, args, work: Path,
               profiles: Path | None = None, tag: str | None = None) -> tuple[list, dict]:
    tag = tag or key
    if cfg is not None and "task_aware" in cfg:
        cfg = {**cfg, "task_profiles_path": str(profiles)}
    log_path = work / f"server-{tag}.log"
    with serving(args.model, cfg, log_path, work, args.startup_timeout,
                 args.enforce_eager) as (url, _):
        t = time.monotonic()
        results = asyncio.run(run_load(url, workload, args.request_timeout))
        print(f"  load done in {time.monotonic() - t:.1f} s", flush=True)
        if cfg is not None:
            asyncio.run(flush_stats(url, workload.model, args.stats_interval + 0.5))
    return results, parse_log(log_path)


def warm_up(args, configs, work: Path) -> Path:
    """Learn task profiles with a config-c server on an unmeasured workload; return
    the read-only master copy."""
    learned = work / "profiles-warmup.json"
    learned.unlink(missing_ok=True)
    wl = build_workload(args.model, args.warmup, args.rate, args.seed + 1000,
                        args.prompt_chars, args.slo_scale)
    print(f"warm-up: {len(wl.requests)} requests, config c, profiles -> {learned}",
          flush=True)
    results, log = run_config("c", configs["c"], wl, args, work, learned, tag="warmup")
    print(f"  warm-up completed {sum(r['ok'] for r in results)}/{len(results)}, "
          f"replan lines {log['replans'] or 'n/a'}; profile file exists: "
          f"{learned.exists()}", flush=True)
    if not learned.exists():
        sys.exit(f"task profile file {learned} was not written by the warm-up server "
                 f"(it saves at each re-plan, every {args.replan_every} prompts; warm-up "
                 f"sent {args.warmup}). Server log: {work / 'server-warmup.log'}")
    master = work / "profiles.json"
    master.unlink(missing_ok=True)
    shutil.copyfile(learned, master)
    master.chmod(0o444)
    return master


def aggregate(rows: list[dict]) -> dict:
    """Median of every numeric metric over repeated runs of one config; the SLO
    attainment also keeps its min and max."""
    out = dict(rows[0])
    for k, v in rows[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            values = [r[k] for r in rows if r.get(k) is not None]
            out[k] = statistics.median(values) if values else None
    for t in TASKS:
        values = [r["per_task"][t]["slo_attainment_pct"] for r in rows]
        out["per_task"] = {**out["per_task"],
                           t: {**out["per_task"][t],
                               "slo_attainment_pct": statistics.median(values)}}
    slo = [r["slo_attainment_pct"] for r in rows]
    out["slo_attainment_range"] = (min(slo), max(slo))
    return out


def _f(v, spec):
    return "n/a" if v is None else format(v, spec)


def markdown(rows) -> str:
    lines = ["| config | requests | completed | SLO % | out tok/s | req/s | TTFT p50 ms | "
             "TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | client send lag p99 ms | hit rate | "
             "MiB loaded | load s | replans | similarity to d | same as plain |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sim = (_f(r["similarity_to_d"], ".3f") + f" ({r['similarity_unit']})"
               if r.get("similarity_to_d") is not None else "-")
        lines.append(
            f"| {r['key']}) {r['config']} | {r['requests']} | {r['completed']} | "
            f"{_f(r['slo_attainment_pct'], '.1f')} ({r['slo_attainment_range'][0]:.0f}-"
            f"{r['slo_attainment_range'][1]:.0f}) | {_f(r['throughput_tok_s'], '.1f')} | "
            f"{_f(r['req_per_s'], '.2f')} | {_f(r['ttft_p50_ms'], '.0f')} | "
            f"{_f(r['ttft_p99_ms'], '.0f')} | {_f(r['tpot_p50_ms'], '.1f')} | "
            f"{_f(r['tpot_p99_ms'], '.1f')} | {_f(r.get('send_lag_p99_ms'), '.0f')} | "
            f"{_f(r['hit_rate'], '.1%')} | "
            f"{_f(r['mib_loaded'], '.0f')} | {_f(r['load_s'], '.2f')} | "
            f"{_f(r['replans'], '.0f')} | {sim} | {_f(r.get('same_as_plain'), '.3f')} |")
    lines += ["", "Per-task SLO attainment %:", "",
              "| config | " + " | ".join(TASKS) + " |",
              "|---|" + "---|" * len(TASKS)]
    for r in rows:
        lines.append(f"| {r['key']}) {r['config']} | " + " | ".join(
            _f(r["per_task"][t]["slo_attainment_pct"], ".1f") for t in TASKS) + " |")
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{r['key']}) {r['config']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    slo = [r["slo_attainment_pct"] or 0 for r in rows]
    spread = [[v - r["slo_attainment_range"][0] for v, r in zip(slo, rows)],
              [r["slo_attainment_range"][1] - v for v, r in zip(slo, rows)]]
    ax[0, 0].bar(x, slo, yerr=spread, capsize=4, color="tab:green")
    ax[0, 0].set_title("SLO attainment % (median, min-max over runs)")
    ax[0, 0].set_ylim(0, 100)
    ax[0, 1].bar(x, [r["throughput_tok_s"] or 0 for r in rows], color="tab:blue")
    ax[0, 1].set_title("output tokens/s over the makespan (mostly the offered load)")
    for a, metric, unit in ((ax[1, 0], "ttft", "TTFT ms"), (ax[1, 1], "tpot", "TPOT ms")):
        a.bar(x - 0.2, [r[f"{metric}_p50_ms"] or 0 for r in rows], 0.4, label="p50")
        a.bar(x + 0.2, [r[f"{metric}_p99_ms"] or 0 for r in rows], 0.4, label="p99")
        a.set_title(unit)
        top = max([r[f"{metric}_p99_ms"] or 0 for r in rows] + [1])
        a.set_ylim(0, top * 1.25)  # room for the legend
        a.legend(loc="upper right")
    for a in ax.flat:
        a.set_xticks(x)
        a.set_xticklabels(labels, rotation=25, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--configs", default=None,
                   help="comma-separated subset of a,b,c,d,e (default a,b,c,d, plus e "
                        "with --sensitivity)")
    p.add_argument("--sensitivity", default=None, metavar="PATH",
                   help="sensitivity file for config e (approximate routing)")
    p.add_argument("--requests", type=int, default=None, help="measured requests (120)")
    p.add_argument("--warmup", type=int, default=None,
                   help="unmeasured warm-up requests that learn the task profiles (40)")
    p.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate, req/s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per config, interleaved (a b c .., a b c ..); medians")
    p.add_argument("--prompt-chars", type=int, default=300)
    p.add_argument("--slo-scale", type=float, default=1.0,
                   help="multiplies every task's TTFT and TPOT SLO")
    p.add_argument("--pool-slots", type=int, default=48,
                   help=f"expert slots of {TOTAL_EXPERTS} for b-e")
    p.add_argument("--eviction", default="reuse",
                   help="eviction policy of b-e (named, so that a later default cannot "
                        "change a row)")
    p.add_argument("--replan-every", type=int, default=None,
                   help="re-plan residency every N prompts (20; 6 with --quick)")
    p.add_argument("--profiles", default=None, metavar="PATH",
                   help="use this task-profile file instead of a warm-up run")
    p.add_argument("--stats-interval", type=float, default=5.0,
                   help="the plugin's stats_log_interval_s for b-e")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--request-timeout", type=float, default=900.0,
                   help="client timeout of each request, s")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                   help="pass --enforce-eager to the server (as tests/e2e does)")
    p.add_argument("--work-dir", default=str(WORK))
    p.add_argument("--name", default="task_serving",
                   help="result files benchmarks/results/NAME.{md,json,png}")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 24 requests, warm-up 12, re-plan every 6")
    args = p.parse_args(argv)
    args.requests = args.requests or (24 if args.quick else 120)
    args.warmup = args.warmup or (12 if args.quick else 40)
    args.replan_every = args.replan_every or (6 if args.quick else 20)
    keys = (args.configs or ("a,b,c,d" + (",e" if args.sensitivity else ""))).split(",")
    args.configs = [k.strip() for k in keys if k.strip()]
    bad = [k for k in args.configs if k not in CONFIGS]
    if bad:
        p.error(f"unknown config(s) {bad}; choose from {','.join(CONFIGS)}")
    if "e" in args.configs and not args.sensitivity:
        p.error("config e (approximate) needs --sensitivity PATH")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    command = ".venv/bin/python benchmarks/task_serving.py " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    rules = write_rules(work / "task_rules.json")
    configs = offload_configs(args, rules, args.sensitivity)
    workload = build_workload(args.model, args.requests, args.rate, args.seed,
                              args.prompt_chars, args.slo_scale)
    acc = rule_accuracy(rules, workload)
    print(f"rule file {rules}: classification accuracy {acc['overall']:.1%} on the "
          f"{len(workload.requests)} prompts (" + ", ".join(
              f"{t} {_f(v, '.0%')}" for t, v in acc["per_task"].items()) + ")",
          flush=True)
    print(f"workload: {len(workload.requests)} requests over "
          f"{workload.requests[-1]['arrival_s']:.1f} s of arrivals "
          f"({args.rate} req/s), tasks " + json.dumps(
              {t: sum(r['task'] == t for r in workload.requests) for t in TASKS}),
          flush=True)

    profiles = None
    if any(k in args.configs for k in "cde"):
        if args.profiles:
            profiles = Path(args.profiles)
            if not profiles.exists():
                sys.exit(f"--profiles {profiles} does not exist")
        else:
            if args.warmup < args.replan_every:
                print(f"warning: warm-up ({args.warmup}) < replan_every "
                      f"({args.replan_every}): the server may never save profiles")
            profiles = warm_up(args, configs, work)

    runs: dict[str, list[dict]] = {k: [] for k in args.configs}
    raw: dict[str, list[list[dict]]] = {k: [] for k in args.configs}
    for rep in range(args.repeats):  # interleaved, so drift on the host hits all alike
        for key in args.configs:
            print(f"config {key}) {CONFIGS[key]}, run {rep + 1}/{args.repeats}", flush=True)
            copy = None
            if key in "cde":
                copy = work / f"profiles-{key}.json"
                copy.unlink(missing_ok=True)
                shutil.copyfile(profiles, copy)
                copy.chmod(0o644)
            results, log = run_config(key, configs[key], workload, args, work, copy)
            raw[key].append(results)
            (work / f"requests-{key}-{rep}.json").write_text(json.dumps(results, indent=1))
            row = {"key": key, "config": CONFIGS[key], **summarize(results),
                   "hit_rate": log["hit_rate"], "hits": log["hits"],
                   "misses": log["misses"], "evictions": log["evictions"],
                   "rerouted": log["rerouted"], "replans": log["replans"],
                   "mib_loaded": log["mib_loaded"], "load_s": log["load_s"],
                   "stats_line": log["stats_line"], "scheduler_line": log["scheduler_line"]}
            runs[key].append(row)
            print("  " + json.dumps({k: v for k, v in row.items() if k not in (
                "per_task", "stats_line", "scheduler_line")}), flush=True)

    tokenizer = None
    if "a" in raw or ("d" in raw and "e" in raw):
        tokenizer = load_tokenizer(args.model)
    rows = []
    for key in args.configs:
        row = aggregate(runs[key])
        row.update(additional_config=configs[key], rule_accuracy=acc, runs=runs[key],
                   similarity_to_d=None, similarity_unit=None)
        if "a" in raw and key != "a":
            sims = [similarity(x, y, tokenizer) for x, y in zip(raw["a"], raw[key])]
            row["same_as_plain"] = statistics.median(v for v, _ in sims)
        if key == "e" and "d" in raw:
            sims = [similarity(x, y, tokenizer) for x, y in zip(raw["d"], raw["e"])]
            row["similarity_to_d"] = statistics.median(v for v, _ in sims)
            row["similarity_unit"] = sims[0][1]
        rows.append(row)

    table = markdown(rows)
    table += (f"\n\nMedians of {args.repeats} interleaved runs per config (SLO % also "
              f"min-max). Workload: {args.requests} requests, Poisson {args.rate} req/s, seed "
              f"{args.seed}, {args.prompt_chars}-char prompts, SLO scale {args.slo_scale},"
              f" pool {args.pool_slots}/{TOTAL_EXPERTS} slots, {args.eviction} eviction,"
              f" re-plan every "
              f"{args.replan_every}, warm-up {args.warmup}. Rule-file accuracy "
              f"{acc['overall']:.1%}. Similarity to d: mean fraction of leading "
              f"{'tokens' if tokenizer else 'characters'} identical.")
    print(table)
    write_results(args.name, command, table, rows, plot)


if __name__ == "__main__":
    main()
