"""Tasks: classify prompts, learn per-task expert profiles, plan what stays resident.

Pure Python. Requests of one task route to similar experts (eMoE), so per (task,
layer) expert frequencies, weighted by how much work of each task is queued, say
which experts are worth pinning:

    N_e = sum over tasks t of demand(t) * s(t, layer) * f(t, layer, e)

demand(t) = queued prompt tokens + expected output tokens of t's requests;
s(t, layer) = 1 if the task is sensitive to that layer's routing, else 0;
f(t, layer, e) = the share of t's routed tokens at `layer` that went to expert e.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .files import write_text_atomic
from .slot_pool import ExpertKey

PROFILE_FORMAT = "vllm-moe-offload-task-profiles/1"


def read_json(path, bad):
    """A user-given JSON file; `bad(why)` builds the error that names the file."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise bad(f"cannot be read ({e.strerror})") from None
    except ValueError as e:
        raise bad(f"is corrupt (not JSON: {e})") from None


# ---- classification ------------------------------------------------------------

@dataclass(frozen=True)
class TaskRule:
    task: str
    keywords: tuple[str, ...] = ()
    patterns: tuple[re.Pattern, ...] = ()

    def matches(self, prompt: str) -> bool:
        low = prompt.lower()
        return (any(k in low for k in self.keywords)
                or any(p.search(prompt) for p in self.patterns))


@dataclass(frozen=True)
class TaskRules:
    """First matching rule wins; otherwise `default`. File format (JSON):
    {"default": "general", "rules": [{"task": "python", "keywords": ["def "],
    "regex": ["^import \\\\w+"]}, ...]}"""
    rules: tuple[TaskRule, ...]
    default: str = "default"

    def classify(self, prompt: str) -> str:
        for rule in self.rules:
            if rule.matches(prompt):
                return rule.task
        return self.default

    @classmethod
    def load(cls, path: str | Path) -> "TaskRules":
        def bad(why: str) -> ValueError:
            return ValueError(f"task rule file {str(path)!r}: {why}. Expected JSON "
                              '{"default": NAME, "rules": [{"task": NAME, "keywords": '
                              '[...], "regex": [...]}]}')
        data = read_json(path, bad)
        if not isinstance(data, dict) or not isinstance(data.get("rules", []), list):
            raise bad("has no 'rules' list")
        rules = []
        for i, r in enumerate(data.get("rules", [])):
            if not isinstance(r, dict) or not isinstance(r.get("task"), str):
                raise bad(f"rule {i} has no 'task' name")
            for name in ("keywords", "regex"):  # a bare string was read letter by letter
                value = r.get(name, [])
                if not isinstance(value, list) or not all(
                        isinstance(v, str) and v for v in value):
                    raise bad(f"rule {i} ({r['task']}): {name!r} must be a list of "
                              f"non-empty strings, not {value!r}")
            try:
                patterns = tuple(re.compile(p) for p in r["regex"]) if "regex" in r else ()
            except re.error as e:
                raise bad(f"rule {i} ({r['task']}): bad regular expression ({e})") from None
            keywords = tuple(k.lower() for k in r.get("keywords", []))
            if not keywords and not patterns:
                raise bad(f"rule {i} ({r['task']}) has neither keywords nor regex")
            rules.append(TaskRule(r["task"], keywords, patterns))
        default = data.get("default", "default")
        if not isinstance(default, str) or not default:
            raise bad(f"its 'default' task must be a non-empty name, not {default!r}")
        return cls(tuple(rules), default)


# ---- profiles ------------------------------------------------------------------

@dataclass
class TaskProfiles:
    """Per (task, layer) routed-token counts per expert, learned online."""
    num_layers: int
    experts_per_layer: int
    # task -> layer -> expert -> tokens routed
    counts: dict[str, list[list[int]]] = field(default_factory=dict)

    def record(self, task: str, layer: int, expert_ids) -> None:
        table = self.counts.get(task)
        if table is None:
            table = self.counts[task] = [[0] * self.experts_per_layer
                                         for _ in range(self.num_layers)]
        row = table[layer]
        for e in expert_ids:
            row[e] += 1

    def frequency(self, task: str, layer: int) -> list[float]:
        row = self.counts.get(task, [[0] * self.experts_per_layer] * self.num_layers)[layer]
        total = sum(row)
        return [c / total if total else 0.0 for c in row]

    def save(self, path: str | Path) -> None:
        body = {"num_layers": self.num_layers, "experts_per_layer": self.experts_per_layer,
                "counts": self.counts}
        text = json.dumps(body, sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()
        write_text_atomic(path, json.dumps({"format": PROFILE_FORMAT, "sha256": digest,
                                            "profiles": body}))  # instances may share it

    @classmethod
    def load(cls, path: str | Path, num_layers: int | None = None,
             experts_per_layer: int | None = None) -> "TaskProfiles":
        """Read and verify a profile file; with shapes given, also check that it
        was learned on a model of that many MoE layers x experts."""
        def bad(why: str) -> ValueError:
            return ValueError(f"task profile file {str(path)!r} {why}; delete it to start "
                              "cold, or point task_profiles_path elsewhere")
        data = read_json(path, bad)
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise bad(f"is not a task profile file of format {PROFILE_FORMAT!r} (its "
                      f"format: {data.get('format') if isinstance(data, dict) else None!r})")
        body = data.get("profiles")
        text = json.dumps(body, sort_keys=True)
        if hashlib.sha256(text.encode()).hexdigest() != data.get("sha256"):
            raise bad("is corrupt (checksum mismatch)")
        if num_layers is None:
            num_layers, experts_per_layer = body["num_layers"], body["experts_per_layer"]
        if (body["num_layers"], body["experts_per_layer"]) != (num_layers, experts_per_layer):
            raise bad(f"was learned on a model with {body['num_layers']} layers x "
                      f"{body['experts_per_layer']} experts, not {num_layers} x "
                      f"{experts_per_layer}")
        return cls(num_layers, experts_per_layer, body["counts"])


# ---- residency plan ------------------------------------------------------------

def expected_load(profiles: TaskProfiles, demand: dict[str, float],
                  insensitive: set[tuple[str, int]] = frozenset()) -> dict[ExpertKey, float]:
    """N_e for every (layer, expert) with a non-zero expected load."""
    load: dict[ExpertKey, float] = defaultdict(float)
    for task, tokens in sorted(demand.items()):  # (a sum's rounding: not arrival order)
        if tokens <= 0:
            continue
        for layer in range(profiles.num_layers):
            if (task, layer) in insensitive:
                continue  # s(task, layer) = 0: this pair does not steer the plan
            for expert, f in enumerate(profiles.frequency(task, layer)):
                if f:
                    load[ExpertKey(layer, expert)] += tokens * f
    return dict(load)


def _tied(value: float) -> float:
    """A sum to 12 significant digits: sums equal but for float rounding tie, and the
    lower key wins, as documented (else 3.1 against 3.0999999999999996 decides)."""
    return float(f"{value:.12g}")


def plan_residency(profiles: TaskProfiles, demand: dict[str, float], budget_slots: int,
                   insensitive: set[tuple[str, int]] = frozenset()) -> list[ExpertKey]:
    """The `budget_slots` (layer, expert) pairs with the largest N_e, largest first."""
    load = expected_load(profiles, demand, insensitive)
    ranked = sorted(load.items(), key=lambda kv: (-_tied(kv[1]), kv[0]))
    return [key for key, _ in ranked[:budget_slots]]


def hot_experts(profiles: TaskProfiles, share: float,
                insensitive: set[tuple[str, int]] = frozenset()) -> set[ExpertKey]:
    """Mixed precision: per layer, the ceil(share * E) experts with the largest
    sum over tasks of s(t, layer) * f(t, layer, e) (every task weighs the same),
    experts no sensitive task routes to left out."""
    hot = set()
    per_layer = math.ceil(share * profiles.experts_per_layer)
    for layer in range(profiles.num_layers):
        score = [0.0] * profiles.experts_per_layer
        for task in sorted(profiles.counts):
            if (task, layer) in insensitive:
                continue
            for expert, f in enumerate(profiles.frequency(task, layer)):
                score[expert] += f
        ranked = sorted((e for e in range(len(score)) if score[e] > 0),
                        key=lambda e: (-_tied(score[e]), e))
        hot.update(ExpertKey(layer, e) for e in ranked[:per_layer])
    return hot


@dataclass
class ReplanClock:
    """Re-plan every `every` prompts, not every prompt (eMoE's p)."""
    every: int = 40
    seen: int = 0

    def on_prompt(self) -> bool:
        self.seen += 1
        return self.seen % self.every == 0


# ---- request fields ------------------------------------------------------------

REQUEST_FIELDS = ("task", "slo_ttft_ms", "slo_tpot_ms")
MAX_TASK_NAME = 128  # characters: names are kept in the profile file


def request_fields(extra_args: dict | None) -> tuple[str | None, float | None, float | None]:
    """(task, slo_ttft_ms, slo_tpot_ms) from `SamplingParams.extra_args` (the OpenAI
    API's `vllm_xargs`); absent fields are None, bad ones raise ValueError."""
    args = extra_args or {}
    task = args.get("task")
    if task is not None and (not isinstance(task, str) or not task.strip()
                             or len(task) > MAX_TASK_NAME):
        raise ValueError(f"vllm_xargs task={repr(task)[:40]} must be a non-empty string "
                         f"of at most {MAX_TASK_NAME} characters naming the request's task")
    slos = []
    for name in REQUEST_FIELDS[1:]:
        value = args.get(name)
        if value is not None:
            ok = isinstance(value, (int, float, str)) and not isinstance(value, bool)
            try:
                value = float(value) if ok else -1.0
            except ValueError:
                value = -1.0
            if not 0 < value < math.inf:
                raise ValueError(f"vllm_xargs {name}={args.get(name)!r} must be a "
                                 "positive, finite number of milliseconds")
        slos.append(value)
    return task, slos[0], slos[1]
