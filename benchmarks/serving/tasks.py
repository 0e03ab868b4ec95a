"""The four-domain task workload: per task output lengths and SLOs, the server's rule
file, prompts from held-out text with Poisson arrivals."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from common import RESULTS, SHARED

MODEL = SHARED / "models" / "tiny-moe-4domains"
CORPUS = SHARED / "data" / "corpus"
WORK = RESULTS / "work" / "task_serving"
TOTAL_EXPERTS = 8 * 16

# Per task: output tokens and SLOs at --slo-scale 1.0 (TTFT and TPOT in ms). Code
# tasks write longer outputs with looser SLOs; prose and legal are short and tight.
TASKS = {
    "python": {"max_tokens": 48, "slo_ttft_ms": 2000.0, "slo_tpot_ms": 150.0},
    "c": {"max_tokens": 48, "slo_ttft_ms": 2000.0, "slo_tpot_ms": 150.0},
    "prose": {"max_tokens": 24, "slo_ttft_ms": 1000.0, "slo_tpot_ms": 100.0},
    "legal": {"max_tokens": 16, "slo_ttft_ms": 800.0, "slo_tpot_ms": 100.0},
}

# The server's rule file (first match wins). Tuned on the held-out text: "legal" is
# Debian copyright files and licences, "prose" is Vim's help text, "c" is C/C++
# sources and headers. Strong signals first, weak python hints last.
RULES = {
    "default": "prose",
    "rules": [
        {"task": "legal", "regex": [
            r"(?m)^\s*(Files|Copyright|License|Upstream-Name|Upstream-Contact|Source"
            r"|Format):"]},
        {"task": "prose", "regex": [r"\|[\w:.<>+-]+\|", r"\*[\w:.<>+-]+\*",
                                    r"(?i)\bvim\b"]},
        {"task": "c", "keywords": ["#include", "#define", "#ifdef", "#ifndef", "#endif",
                                   "};", "->", "/*", "*/", "::"],
         "regex": [r"(?m);[ \t]*$", r"\b(unsigned|struct|static|void|const char|size_t"
                   r"|extern)\b", r"(?m)[{}][ \t]*$"]},
        {"task": "python", "keywords": ["def ", "self.", "import ", '"""', "__"],
         "regex": [r"\bNone\b", r"(?m)^\s*(elif|except|try:|return|raise)\b"]},
        {"task": "legal", "keywords": ["copyright", "license", "licence", "warranty",
                                       "permission", "redistribut", "merchantab", "liab",
                                       "gpl", "debian", "shall", "pursuant", " at ",
                                       "rights"]},
        {"task": "python", "regex": [r"(?m):[ \t]*$", r"(?m)^\s*# ", r"'\w+',"]},
    ],
}

CONFIGS = {
    "a": "plain",
    "b": "offload",
    "c": "task-residency",
    "d": "task-aware + sched",
    "e": "approximate",
}


# ---- workload ------------------------------------------------------------------

@dataclass
class Workload:
    model: str
    requests: list[dict] = field(default_factory=list)  # in send order


def held_out(task: str) -> str:
    text = (CORPUS / f"{task}.txt").read_text(errors="replace")
    return text[int(len(text) * 0.95):]


def build_workload(model: str, n: int, rate: float, seed: int, prompt_chars: int,
                   slo_scale: float) -> Workload:
    """n requests: uniform task, Poisson arrivals (offsets in s from the start),
    prompts from distinct seeded offsets of the task's held-out text."""
    rng = random.Random(seed)
    tails = {t: held_out(t) for t in TASKS}
    used: dict[str, set[int]] = {t: set() for t in TASKS}
    requests, at = [], 0.0
    for i in range(n):
        task = rng.choice(list(TASKS))
        tail = tails[task]
        while True:
            start = rng.randrange(0, max(1, len(tail) - 2 * prompt_chars))
            # begin at a word boundary so a prompt does not open mid-word
            space = re.search(r"\s", tail[start:start + 64])
            start += space.end() if space else 0
            if start not in used[task]:
                used[task].add(start)
                break
        spec = TASKS[task]
        requests.append({
            "index": i, "task": task, "arrival_s": at,
            "prompt": tail[start:start + prompt_chars], "offset": start,
            "max_tokens": spec["max_tokens"],
            "slo_ttft_ms": spec["slo_ttft_ms"] * slo_scale,
            "slo_tpot_ms": spec["slo_tpot_ms"] * slo_scale,
            "send_task": i % 2 == 0,  # the odd ones are classified by the server
        })
        at += rng.expovariate(rate)
    return Workload(model, requests)


def write_rules(path: Path) -> Path:
    path.write_text(json.dumps(RULES, indent=1))
    return path


def rule_accuracy(rules_path: Path, workload: Workload) -> dict:
    """Classify every prompt locally with the plugin's own classifier."""
    from vllm_moe_offload.core.tasks import TaskRules

    rules = TaskRules.load(rules_path)
    per = {t: [0, 0] for t in TASKS}
    for r in workload.requests:
        per[r["task"]][1] += 1
        per[r["task"]][0] += rules.classify(r["prompt"]) == r["task"]
    right = sum(ok for ok, _ in per.values())
    return {"overall": right / max(1, len(workload.requests)),
            "per_task": {t: ok / n if n else None for t, (ok, n) in per.items()}}
