"""`TaskAwareScheduler`: vLLM's scheduler, with the waiting queue ordered and
admitted by SLO, expert affinity and expected output length.

Set by the plugin when `expert_offload.task_aware` is on (unless
`task_scheduler=false`), or by hand: `--scheduler-cls
vllm_moe_offload.integration.vllm.scheduler.TaskAwareScheduler`.

Each step, before vLLM's own `schedule()` runs:
1. fresh waiting requests are ordered by `core.slo.order_waiting` (urgent
   first, then by the share of their task's experts that are resident and the
   shortest expected output, late ones last); preempted or blocked requests keep
   their place in front;
2. up to the free room of the batch (max_num_seqs), requests are admitted in that
   order while `core.slo.can_admit` says the grown batch keeps every running
   request within its TPOT SLO; the rest are held out of the queue for this step
   (vLLM then applies its own token budget). A request held or overtaken in
   MAX_OVERTAKES steps is admitted first, whatever the rule says;
3. the expected work per task (demand) rides on the SchedulerOutput to the
   worker, whose residency planner weighs tasks by it.
After each step the latency model learns the per-token and per-miss costs
(step time, and the misses and stall the worker reports on its output), and at
each finish the task's output length.

With vLLM's async scheduling on (its default on CUDA), the scheduler is a
`TaskAwareAsyncScheduler`: the same policy over vLLM's `AsyncScheduler`, which
schedules the next step while the device runs this one. (A subclass of the
synchronous `Scheduler` would run there too, but schedule nothing for a request
whose last token is still on the device: no overlap.) A step's time is counted
from when it was scheduled or when the step before it finished, whichever is
later, so the overlap does not count twice.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from vllm_moe_offload.core.config import OffloadConfig
from vllm_moe_offload.core.sensitivity import load_insensitive
from vllm_moe_offload.core.slo import (Batch, LatencyModel, RequestInfo, can_admit,
                                      order_waiting)
from vllm_moe_offload.core.tasks import TaskProfiles
from vllm_moe_offload.integration.vllm.tasks import (REPORT_ATTR, TaskClassifier,
                                                     checked_fields)

logger = logging.getLogger("vllm.moe_offload")

SCHEDULER_CLS = "vllm_moe_offload.integration.vllm.scheduler.TaskAwareScheduler"
_SCHEDULED_AT = "_moe_offload_scheduled_at"  # on a SchedulerOutput: perf_counter()


def _salt(request: Request, task: str) -> None:
    """Approximate mode: the KV blocks of a task whose layers may re-route are its
    own in the prefix cache. vLLM's block hashes cover the tokens and cache_salt,
    not the task, so another task's request with the same prefix (one that must stay
    exact) would have read them."""
    request.cache_salt = f"{request.cache_salt or ''}|vllm-moe-offload approximate:{task}"
    request.block_hashes = []
    request.update_block_hashes()


class TaskAwareScheduler(Scheduler):
    def __new__(cls, *args, **kwargs):
        """vLLM builds `--scheduler-cls` before it is known whether async scheduling
        runs (the platform decides last): pick the matching variant here."""
        config = kwargs.get("vllm_config", args[0] if args else None)
        if cls is TaskAwareScheduler and config.scheduler_config.async_scheduling:
            cls = TaskAwareAsyncScheduler
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = OffloadConfig.resolve(self.vllm_config.additional_config)
        self._classifier = TaskClassifier(cfg.task_rules_path, self.vllm_config.model_config,
                                          known=_profiled_tasks(cfg.task_profiles_path))
        # approximate mode: the tasks whose KV cache may come from re-routed experts
        self._approximate = ({t for t, _ in load_insensitive(cfg.sensitivity_path)}
                             if cfg.approximate and cfg.sensitivity_path else set())
        self.latency = LatencyModel(
            token_budget=self.scheduler_config.max_num_batched_tokens or 8192)
        self._info: dict[str, tuple[RequestInfo, Request]] = {}
        self._resident_share: dict[str, float] = {}
        self._last_done = 0.0  # perf_counter() when the last step's output came
        self.counters = {"admitted": 0, "held": 0, "classified": 0, "steps": 0}
        self._last_log = time.monotonic()
        self._log_interval = cfg.stats_log_interval_s
        if not isinstance(self.waiting, deque):
            logger.warning("task-aware scheduler: policy %r keeps vLLM's own order; SLO "
                           "ordering needs the fcfs policy", self.scheduler_config.policy)
        logger.info("expert offload: task-aware scheduler on, %s (rules: %s)",
                    "over vLLM's AsyncScheduler" if isinstance(self, AsyncScheduler)
                    else "synchronous", cfg.task_rules_path
                    or "none, untagged requests are 'default'")

    # ---- requests -------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id not in self.requests:
            params = request.sampling_params
            given, ttft, tpot = checked_fields(params, request.request_id)
            task = self._classifier.task_of(params.extra_args if params else None,
                                            request.prompt_token_ids)
            self.counters["classified"] += given is None
            if task != given and params is not None:  # the worker reads it from here
                params.extra_args = dict(params.extra_args or {}, task=task)
            if task in self._approximate:
                _salt(request, task)
            info = RequestInfo(request.request_id, task, request.num_prompt_tokens,
                               request.arrival_time, ttft, tpot,
                               max_output_tokens=request.max_tokens)
            self._info[request.request_id] = (info, request)
        super().add_request(request)

    # ---- one step -------------------------------------------------------------------

    def schedule(self, *args, **kwargs):
        demand = self._demand()  # before vLLM counts this step's prompt tokens as done
        held, aged = self._order_and_hold(time.time())
        try:
            output = super().schedule(*args, **kwargs)
        finally:
            if held:  # back in front, in order, for the next step
                self.waiting.extendleft(reversed(held))
        self._count_overtakes(output, aged)
        setattr(output, REPORT_ATTR, {"demand": demand})
        setattr(output, _SCHEDULED_AT, time.perf_counter())
        return output

    def _order_and_hold(self, now: float) -> tuple[list[Request], set[str]]:
        """Order the fresh waiting requests and admit them into the queue; returns
        those held out of it for this step, and the ids of those that aged for it."""
        if not isinstance(self.waiting, deque) or not self.waiting:
            return [], set()
        fresh, keep = [], []
        for r in self.waiting:
            new = (r.status == RequestStatus.WAITING and r.num_computed_tokens == 0
                   and r.request_id in self._info)
            (fresh if new else keep).append(r)
        running = [self._info[r.request_id][0] for r in self.running
                   if r.request_id in self._info]
        affinity = dict(self._resident_share)
        for info in running:  # sharing a task with the batch shares its experts
            affinity[info.task] = affinity.get(info.task, 0.0) + 1 / len(running)
        infos = [self._info[r.request_id][0] for r in fresh]
        for info in infos:  # a prefill loads about a step's misses, less what is resident
            info.expected_misses = self.latency.misses_per_step.value * (
                1 - self._resident_share.get(info.task, 0.0))
        ordered = order_waiting(self.latency, infos, len(running), now, affinity)
        # vLLM starts at most this many: the rest wait in order, not held or checked
        room = max(0, self.max_num_active_reqs - len(self.running))
        admitted, held, aged = [], [], set()
        batch = Batch(running)
        for i, info in enumerate(ordered[:room]):
            if info.aged or can_admit(self.latency, info, batch):
                admitted.append(self._info[info.request_id][1])
                batch.add(info)
            else:  # once one waits, later ones wait too (the order)
                held = [self._info[r.request_id][1] for r in ordered[i:]]
                for r in ordered[i:room]:
                    r.overtaken += 1  # a step held: it ages (no starvation)
                    aged.add(r.request_id)
                self.counters["held"] += room - i
                break
        else:
            admitted += [self._info[r.request_id][1] for r in ordered[room:]]
        self.waiting.clear()
        self.waiting.extend(keep + admitted)
        return held, aged

    def _count_overtakes(self, output, aged: set[str]) -> None:
        """Each waiting request counts the steps that started a later arrival before
        it (core/slo.py MAX_OVERTAKES: past that many, it goes first). Steps, not
        admissions: a step admits up to max_num_seqs, and counting each made every
        request of a backlog first within a step or two, and the order FCFS. Those
        `aged` by a hold this step counted it already."""
        latest = max((self._info[d.req_id][0].arrival_s for d in output.scheduled_new_reqs
                      if d.req_id in self._info), default=None)
        if latest is None:
            return
        for r in self.waiting:
            entry = self._info.get(r.request_id)
            if (entry is not None and r.num_computed_tokens == 0  # a step, not each
                    and r.request_id not in aged):
                entry[0].overtaken += latest > entry[0].arrival_s

    def _demand(self) -> dict[str, float]:
        """Per task: prompt tokens still to compute + output tokens still expected."""
        demand: dict[str, float] = {}
        for info, request in self._info.values():
            left = max(0, request.num_prompt_tokens - request.num_computed_tokens)
            expected = self.latency.expected_output(info.task, request.max_tokens)
            left += max(0.0, expected - request.num_output_tokens)
            demand[info.task] = demand.get(info.task, 0.0) + left
        return demand

    def update_from_output(self, scheduler_output, model_runner_output):
        report = getattr(model_runner_output, REPORT_ATTR, None)
        tokens = scheduler_output.total_num_scheduled_tokens
        scheduled_at = getattr(scheduler_output, _SCHEDULED_AT, None)
        now = time.perf_counter()
        if scheduled_at is not None and tokens:
            report_ = report or {}  # one of failed requests only: no counts
            misses, stall = report_.get("misses", 0), report_.get("stall_s", 0.0)
            self.latency.observe_step(tokens, now - max(scheduled_at, self._last_done),
                                      misses, stall)
            self.counters["steps"] += 1
        self._last_done = now
        if report and "resident_share" in report:
            self._resident_share = report["resident_share"]
        self.counters["admitted"] += len(scheduler_output.scheduled_new_reqs)
        result = super().update_from_output(scheduler_output, model_runner_output)
        self._forget_finished()
        if self._log_interval and time.monotonic() - self._last_log >= self._log_interval:
            self._last_log = time.monotonic()
            logger.info(self.summary_line())
        return result

    def _forget_finished(self) -> None:
        for req_id in [r for r in self._info if r not in self.requests]:
            info, request = self._info.pop(req_id)
            if request.status != RequestStatus.FINISHED_ABORTED:
                self.latency.observe_output(info.task, request.num_output_tokens)

    def summary_line(self) -> str:
        c, m = self.counters, self.latency
        outputs = {t: round(e.value) for t, e in sorted(m.output_tokens.items())}
        return (f"task scheduler: {c['admitted']} admitted, "
                f"{c['held']} request-steps held back, "
                f"{c['classified']} classified by rules; step {m.per_step_s * 1e3:.2f} ms "
                f"+ {m.per_token_s * 1e3:.3f} ms/token + {m.misses_per_step.value:.1f} "
                f"misses x {m.per_miss_s.value * 1e3:.2f} ms; expected outputs {outputs}")

    def shutdown(self) -> None:
        logger.info("%s (shutdown)", self.summary_line())
        super().shutdown()


class TaskAwareAsyncScheduler(TaskAwareScheduler, AsyncScheduler):
    """TaskAwareScheduler over vLLM's AsyncScheduler (chosen by its __new__)."""


# ---- requests that routed to an unavailable expert (tasks.py NOTE #1) -------------

def install_failure_hook() -> None:
    """Every scheduler fails the requests a worker reports as routed to an expert
    that the store could not deliver, instead of emitting their tokens."""
    if getattr(Scheduler.update_from_output, "_moe_offload", False):
        return
    original = Scheduler.update_from_output

    def update_from_output(self, scheduler_output, model_runner_output):
        failed = (getattr(model_runner_output, REPORT_ATTR, None) or {}).get("failed")
        if not failed:
            return original(self, scheduler_output, model_runner_output)
        for req_id in failed:  # its tokens of this step came from a wrong expert output
            i = model_runner_output.req_id_to_index.get(req_id)
            if i is not None and i < len(model_runner_output.sampled_token_ids):
                model_runner_output.sampled_token_ids[i] = []
        outputs = original(self, scheduler_output, model_runner_output)
        return fail_requests(self, failed, outputs)

    update_from_output._moe_offload = True
    Scheduler.update_from_output = update_from_output


def fail_requests(scheduler, failed: dict[str, str], outputs: dict) -> dict:
    """Finish `failed` (request id -> why) with FINISHED_ERROR; their KV blocks leave
    the prefix cache first. Adds their final outputs to `outputs` (client -> outputs)."""
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs

    blocks = set()
    for req_id in failed:
        if req_id in scheduler.requests:
            for group in scheduler.kv_cache_manager.get_block_ids(req_id):
                blocks.update(group)
    scheduler.kv_cache_manager.evict_blocks(blocks)
    for request in scheduler.finish_requests(failed, RequestStatus.FINISHED_ERROR):
        logger.error("expert offload: request %s failed: %s", request.request_id,
                     failed[request.request_id])
        outs = outputs.setdefault(request.client_index, EngineCoreOutputs())
        outs.outputs.append(EngineCoreOutput(
            request_id=request.request_id, new_token_ids=[],
            finish_reason=request.get_finished_reason(), events=request.take_events(),
            trace_headers=request.trace_headers))
    return outputs


def _profiled_tasks(path: str | None) -> list[str]:
    """The task names of the profile file, if it reads (the worker says if not)."""
    if not path or not os.path.exists(path):
        return []
    try:
        return list(TaskProfiles.load(path).counts)
    except (ValueError, KeyError, TypeError):
        return []
