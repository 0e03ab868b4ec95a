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
+ misses_per_step * per_miss. A request is admitted only while that keeps every
running request, and the new one, within its TPOT SLO; requests whose TTFT SLO is
already lost are considered last. A request that later arrivals overtook in
MAX_OVERTAKES steps goes first, in arrival order, whatever its group: before, a
steady stream of requests of the batch's task kept a request of another task, or
a late one, waiting for ever.
"""

from __future__ import annotations

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
    overtaken: int = 0  # steps that admitted a later arrival before it (the scheduler)


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

    def expected_output(self, task: str) -> float:
        ema = self.output_tokens.get(task)
        return ema.value if ema else self.default_output_tokens

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


def can_admit(model: LatencyModel, candidate: RequestInfo, running: list[RequestInfo],
              now_s: float) -> bool:
    """Refuse only when this admission is what breaks a TPOT SLO: some running
    request (or the candidate) meets its SLO at today's batch size but would not
    at the grown one. An SLO broken either way does not stop admission (holding
    would only add queueing), and an empty batch always admits."""
    if not running:
        return True
    now_ms = model.predict_tpot_s(len(running)) * 1000
    grown_ms = model.predict_tpot_s(len(running) + 1) * 1000
    return not any(r.slo_tpot_ms is not None and now_ms <= r.slo_tpot_ms < grown_ms
                   for r in running + [candidate])


def order_waiting(model: LatencyModel, waiting: list[RequestInfo], running: int,
                  now_s: float, affinity: dict[str, float]) -> list[RequestInfo]:
    """The order in which waiting requests are considered for admission:
    0. those passed over by a later arrival in MAX_OVERTAKES steps, in arrival
       order (no starvation);
    1. urgent ones (slack under twice their predicted TTFT), least slack first;
    2. the others by expert affinity (their task's share of resident experts,
       plus how many running requests share their task), then slack;
    3. last, the late ones, whose TTFT SLO is lost anyway (best effort, FCFS)."""
    def key(r: RequestInfo):
        if r.overtaken >= MAX_OVERTAKES:
            return (-1, r.arrival_s, 0.0, 0.0)
        if is_late(model, r, running, now_s):
            return (2, 0.0, r.arrival_s, 0.0)
        slack = slack_s(r, now_s)
        if slack < 2 * model.predict_ttft_s(r, running, r.arrival_s):  # without elapsed
            return (0, slack, r.arrival_s, 0.0)
        return (1, -round(affinity.get(r.task, 0.0), 2), slack, r.arrival_s)
    return sorted(waiting, key=key)
