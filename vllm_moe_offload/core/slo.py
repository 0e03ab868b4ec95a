"""A latency model and an SLO admission rule for the task-aware scheduler.

Pure Python. The model learns online, per task, the expected output length, and
globally the cost of a step, of one token and of one expert miss. A request's
prefill runs beside the running requests' decodes (continuous batching), in chunks
of what the step's token budget leaves them, so its predicted time to first token is

    t = load_cost + steps * (per_step + running * per_token) + prompt * per_token
        + elapsed,   steps = ceil(prompt / (token_budget - running))

(it assumed before that a new request waited for every running one to finish its
whole output, so a fresh request with a TTFT SLO was late on arrival). The time per
output token of a batch of b requests is one decode step, per_step + b * per_token
+ misses_per_step * per_miss; a new request's prefill adds prompt * per_token to
the running requests' outputs, spread over a typical output (the mean learned
output length). A request is admitted only while that keeps every running
request, and the new one, within its TPOT SLO; requests whose TTFT SLO is already
lost are considered last. A request that later arrivals overtook, or that was held
back, in MAX_OVERTAKES steps goes first, in arrival order, whatever its group, and
is admitted whatever the TPOT rule says: before, a steady stream of requests of the
batch's task kept a request of another task, or a late one, waiting for ever, and
one running request's tight TPOT SLO held every other request for its whole output.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

MAX_OVERTAKES = 8  # steps that start a later arrival before a waiting request, at most


@dataclass
class Ema:
    value: float
    alpha: float = 0.2
    samples: int = 0

    def update(self, x: float) -> None:
        self.value = x if self.samples == 0 else (1 - self.alpha) * self.value + self.alpha * x
        self.samples += 1


@dataclass
class RequestInfo:
    request_id: str
    task: str
    prompt_tokens: int
    arrival_s: float
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    expected_misses: float = 0.0  # experts this request will likely load
    overtaken: int = 0  # steps that admitted a later arrival before it, or held it
    max_output_tokens: int | None = None  # the request's own cap (max_tokens)

    @property
    def aged(self) -> bool:
        """Passed over long enough: first in line, and admitted (no starvation)."""
        return self.overtaken >= MAX_OVERTAKES


@dataclass
class LatencyModel:
    """Step time = per_step + per_token * tokens + per_miss * misses, learned online.

    per_miss is stall time per on-demand miss (as the worker reports them); the
    compute part (step time minus stall) is fitted against the step's token count
    by an exponentially weighted least-squares line, so decode steps (few tokens,
    fixed costs dominate) and prefill steps (many tokens) both inform it.
    """
    per_token_s: float = 0.001
    per_step_s: float = 0.005
    per_miss_s: Ema = field(default_factory=lambda: Ema(0.001))
    misses_per_step: Ema = field(default_factory=lambda: Ema(0.0))
    default_output_tokens: float = 64.0
    token_budget: int = 8192  # tokens per step (vLLM's max_num_batched_tokens)
    output_tokens: dict[str, Ema] = field(default_factory=dict)
    # EW moments of (tokens n, compute seconds c): E[n], E[c], E[n^2], E[n c]
    _moments: list[Ema] = field(default_factory=lambda: [Ema(0.0, 0.1) for _ in range(4)])

    def expected_output(self, task: str, cap: int | None = None) -> float:
        """Output tokens a request of `task` is expected to produce, at most `cap`."""
        ema = self.output_tokens.get(task)
        tokens = ema.value if ema else self.default_output_tokens
        return tokens if cap is None else min(tokens, cap)

    def typical_output(self) -> float:
        """The mean expected output length over the tasks seen."""
        if not self.output_tokens:
            return self.default_output_tokens
        return sum(e.value for e in self.output_tokens.values()) / len(self.output_tokens)

    def observe_output(self, task: str, tokens: int) -> None:
        self.output_tokens.setdefault(task, Ema(float(tokens))).update(float(tokens))

    def observe_step(self, tokens: int, seconds: float, misses: int, stall_s: float) -> None:
        if tokens <= 0:
            return
        compute = max(seconds - stall_s, 0.0)
        for ema, x in zip(self._moments, (tokens, compute, tokens * tokens, tokens * compute)):
            ema.update(float(x))
        n, c, nn, nc = (m.value for m in self._moments)
        var = nn - n * n
        slope = (nc - n * c) / var if var > 1e-6 * nn else c / n
        self.per_token_s = max(slope, 0.0)
        self.per_step_s = max(c - self.per_token_s * n, 0.0)
        self.misses_per_step.update(float(misses))
        if misses > 0:
            self.per_miss_s.update(stall_s / misses)

    def predict_ttft_s(self, req: RequestInfo, running: int, now_s: float) -> float:
        load_cost = req.expected_misses * self.per_miss_s.value
        steps = max(1, math.ceil(req.prompt_tokens / max(self.token_budget - running, 1)))
        compute = (steps * (self.per_step_s + running * self.per_token_s)
                   + req.prompt_tokens * self.per_token_s)
        return load_cost + compute + (now_s - req.arrival_s)

    def predict_tpot_s(self, batch_size: int) -> float:
        """One decode step of `batch_size` requests, with this regime's misses."""
        return (self.per_step_s + batch_size * self.per_token_s
                + self.misses_per_step.value * self.per_miss_s.value)


def slack_s(req: RequestInfo, now_s: float) -> float:
    """Time left before the TTFT SLO (inf without one): smaller = more urgent."""
    if req.slo_ttft_ms is None:
        return float("inf")
    return req.slo_ttft_ms / 1000 - (now_s - req.arrival_s)


def is_late(model: LatencyModel, req: RequestInfo, running: int, now_s: float) -> bool:
    """True when even admitting `req` now cannot meet its TTFT SLO."""
    return (req.slo_ttft_ms is not None
            and model.predict_ttft_s(req, running, now_s) * 1000 > req.slo_ttft_ms)


class Batch:
    """The requests running or admitted so far in a step: their number and TPOT
    SLOs, sorted, so that an admission check is a bisect, not a pass over them."""

    def __init__(self, running: list[RequestInfo]):
        self.size = len(running)
        self.tpot_slos = sorted(r.slo_tpot_ms for r in running if r.slo_tpot_ms is not None)

    def add(self, req: RequestInfo) -> None:
        self.size += 1
        if req.slo_tpot_ms is not None:
            bisect.insort(self.tpot_slos, req.slo_tpot_ms)

    def tightest_met(self, tpot_ms: float) -> float:
        """The smallest TPOT SLO that a step of `tpot_ms` still meets (inf: none)."""
        i = bisect.bisect_left(self.tpot_slos, tpot_ms)
        return self.tpot_slos[i] if i < len(self.tpot_slos) else math.inf


def can_admit(model: LatencyModel, candidate: RequestInfo, batch: Batch) -> bool:
    """Refuse only when this admission is what breaks a TPOT SLO: some running
    request (or the candidate) meets its SLO at today's batch size but would not
    with the candidate in it (for the running ones, its prefill too, spread over a
    typical output). An SLO broken either way does not stop admission (holding
    would only add queueing), and an empty batch always admits."""
    if not batch.size:
        return True
    now_ms = model.predict_tpot_s(batch.size) * 1000
    grown_ms = model.predict_tpot_s(batch.size + 1) * 1000
    prefill_ms = candidate.prompt_tokens * model.per_token_s * 1000 / max(
        model.typical_output(), 1.0)
    if batch.tightest_met(now_ms) < grown_ms + prefill_ms:
        return False
    own = candidate.slo_tpot_ms
    return not (own is not None and now_ms <= own < grown_ms)


def order_waiting(model: LatencyModel, waiting: list[RequestInfo], running: int,
                  now_s: float, affinity: dict[str, float]) -> list[RequestInfo]:
    """The order in which waiting requests are considered for admission:
    0. those passed over by a later arrival, or held, in MAX_OVERTAKES steps, in
       arrival order (no starvation);
    1. urgent ones (slack under twice their predicted TTFT), least slack first;
    2. the others by expert affinity (their task's share of resident experts,
       plus how many running requests share their task), then the shortest
       expected output (its task's learned length, at most its max_tokens), then
       slack;
    3. last, the late ones, whose TTFT SLO is lost anyway (best effort, FCFS)."""
    def key(r: RequestInfo):
        if r.aged:
            return (-1, r.arrival_s, 0.0, 0.0, 0.0)
        if is_late(model, r, running, now_s):
            return (2, 0.0, r.arrival_s, 0.0, 0.0)
        slack = slack_s(r, now_s)
        if slack < 2 * model.predict_ttft_s(r, running, r.arrival_s):  # without elapsed
            return (0, slack, r.arrival_s, 0.0, 0.0)
        return (1, -round(affinity.get(r.task, 0.0), 2),
                model.expected_output(r.task, r.max_output_tokens), slack, r.arrival_s)
    return sorted(waiting, key=key)
