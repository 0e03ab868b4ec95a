"""Tasks inside vLLM: request validation, classification, and the model-runner
hooks that tell the worker's `TaskResidency` which task each token belongs to.

- `SamplingParams` validation also checks our `extra_args` fields (task, SLOs),
  so a bad `vllm_xargs` is a 400 from the API server, not an engine crash.
- Requests without a task are classified by the rule file over the decoded
  prompt (the scheduler does it first and writes the task into `extra_args`;
  the worker repeats it only when vLLM's own scheduler runs).
- `_update_states` is wrapped: after vLLM laid out the batch, the worker knows
  each request's scheduled tokens in batch order, which is the token order the
  MoE layers see.
- `sample_tokens` is wrapped to attach the step's misses, stall and per-task
  resident share to the model runner output, for the task-aware scheduler's
  latency model (only when that scheduler runs), and the requests that routed to
  an expert the store could not deliver (NOTE #1).

NOTE #1: such a request is failed by the engine core's scheduler
(scheduler.py `install_failure_hook`, any scheduler class): its tokens of this step are dropped
before they are emitted, it finishes with finish_reason "error" (HTTP 500 on the
OpenAI server, for that request alone), and its KV blocks leave the prefix cache,
since that step wrote them from a wrong expert output.
"""

from __future__ import annotations

import logging

from vllm_moe_offload.core.tasks import REQUEST_FIELDS, TaskRules, request_fields
from vllm_moe_offload.runtime.task_residency import COUNT_ROWS
from vllm_moe_offload.integration.vllm import metrics, model_state

logger = logging.getLogger("vllm.moe_offload")

DEFAULT_TASK = "default"
REPORT_ATTR = "moe_offload"  # attribute on SchedulerOutput / ModelRunnerOutput
# task names one engine learns, the default's row aside (task_residency's count rows);
# later new ones count as the default
MAX_TASKS = COUNT_ROWS - 1


def checked_fields(params, request_id: str) -> tuple[str | None, float | None, float | None]:
    """`request_fields` of a request's SamplingParams. A bad field that got past
    their validation (params built before offload was on in the process, or changed
    since) is dropped from them with a warning, and the request runs without its
    task and SLOs: in the engine core an exception would end the engine."""
    extra = params.extra_args if params is not None else None
    try:
        return request_fields(extra)
    except ValueError as e:
        logger.warning("expert offload: request %s: %s; it runs without its task and "
                       "SLO fields", request_id, e)
        params.extra_args = {k: v for k, v in extra.items() if k not in REQUEST_FIELDS}
        return None, None, None


class TaskClassifier:
    """extra_args["task"] if given, else the rule file over the decoded prompt; at
    most MAX_TASKS names, those of the profile file (`known`) first (a client naming
    a new task per request grew the profiles, their file and its save in the step
    without bound). The scheduler writes the name it settled on into the request,
    so the worker's classifier sees no more."""

    def __init__(self, rules_path: str | None, model_config, known=()):
        self.rules = TaskRules.load(rules_path) if rules_path else None
        self.default = self.rules.default if self.rules else DEFAULT_TASK
        self._model_config = model_config  # vLLM's: its tokenizer, mode, revision, code
        self._tokenizer = None
        self._known: set[str] = set(known) - {self.default}
        self._warned = False
        self._rules_failed = False

    def _decode(self, prompt_token_ids) -> str:
        """The prompt's first 1024 tokens as text, by vLLM's own tokenizer (its mode,
        revision and trust_remote_code, as the engine loaded it)."""
        if self._tokenizer is None:
            from vllm.tokenizers.registry import cached_tokenizer_from_config

            self._tokenizer = cached_tokenizer_from_config(self._model_config)
        if self._tokenizer is None:  # skip_tokenizer_init: no text to match
            return ""
        return self._tokenizer.decode(list(prompt_token_ids or [])[:1024])

    def task_of(self, extra_args: dict | None, prompt_token_ids) -> str:
        task = (extra_args or {}).get("task")  # (checked_fields checked it)
        if not task and self.rules is not None and not self._rules_failed:
            try:
                task = self.rules.classify(self._decode(prompt_token_ids))
            except Exception as e:  # in the scheduler an exception ends the engine
                self._rules_failed = True
                logger.warning("expert offload: the task rules cannot read prompts (%r); "
                               "requests without a task are now the default task %r",
                               e, self.default)
        task = task or self.default
        if task not in self._known and task != self.default:
            if len(self._known) >= MAX_TASKS:
                if not self._warned:
                    self._warned = True
                    logger.warning("expert offload: %d task names seen; requests of new "
                                   "ones (%r first) count as the default task %r",
                                   MAX_TASKS, task, self.default)
                return self.default
            self._known.add(task)
        return task


# ---- worker side ------------------------------------------------------------------

class WorkerTasks:
    """Per worker: request -> task, and the demand seen from the model runner."""

    def __init__(self, classifier: TaskClassifier):
        self.classifier = classifier
        self.task_of: dict[str, str] = {}

    def task(self, req_id: str, state) -> str:
        task = self.task_of.get(req_id)
        if task is None:
            params = state.sampling_params
            checked_fields(params, req_id)
            task = self.task_of[req_id] = self.classifier.task_of(
                params.extra_args if params else None, state.prompt_token_ids)
        return task

    def before_update(self, runner, scheduler_output) -> None:
        """Finished requests leave the runner in `_update_states`: learn their
        output lengths first."""
        residency = model_state.current().tasks
        for req_id in scheduler_output.finished_req_ids:
            state = runner.requests.get(req_id)
            task = self.task_of.pop(req_id, None)
            if state is not None and task is not None:
                residency.outputs.observe_output(task, len(state.output_token_ids))

    def after_update(self, runner, scheduler_output) -> None:
        residency = model_state.current().tasks
        batch = runner.input_batch
        req_ids = batch.req_ids[: batch.num_reqs]
        scheduled = scheduler_output.num_scheduled_tokens
        layout = [(self.task(r, runner.requests[r]), scheduled.get(r, 0)) for r in req_ids]
        demand = (getattr(scheduler_output, REPORT_ATTR, None) or {}).get("demand")
        if demand is None:  # vLLM's own scheduler: only the runner's requests are known
            demand = {}
            for r, state in runner.requests.items():
                task = self.task(r, state)
                left_prompt = max(0, len(state.prompt_token_ids or []) - state.num_computed_tokens)
                left_out = max(0.0, residency.outputs.expected_output(task)
                               - len(state.output_token_ids))
                demand[task] = demand.get(task, 0.0) + left_prompt + left_out
        residency.begin_step(layout, len(scheduler_output.scheduled_new_reqs), demand)


def install_worker_hooks() -> None:
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner._update_states, "_moe_offload", False):
        return
    original_update = GPUModelRunner._update_states
    original_sample = GPUModelRunner.sample_tokens

    def _update_states(self, scheduler_output):
        model = model_state.current()
        if model is not None:
            model.step_began(scheduler_output.finished_req_ids)
        tasks = _tasks_for(self)
        if tasks is not None:
            tasks.before_update(self, scheduler_output)
        result = original_update(self, scheduler_output)
        if tasks is not None:
            tasks.after_update(self, scheduler_output)
        batch = self.input_batch  # the row order of this step's MoE layer calls
        self._moe_offload_layout = [
            (r, scheduler_output.num_scheduled_tokens.get(r, 0))
            for r in batch.req_ids[: batch.num_reqs]]
        return result

    def sample_tokens(self, grammar_output):
        output = original_sample(self, grammar_output)
        model = model_state.current()
        if model is None or model.cache is None:
            return output
        layout = getattr(self, "_moe_offload_layout", [])
        model.end_step(layout)
        failed = model.take_failed_requests(layout)
        metrics.after_step(model)  # /metrics reads its snapshot (metrics.py): failures
        # are counted first, so the step's snapshot has them
        if output is None or output is EMPTY_MODEL_RUNNER_OUTPUT or not hasattr(
                output, "__dict__"):
            return output
        report = {}
        if model.tasks is not None and model.cfg.use_task_scheduler:
            report = model.step_report()  # only our scheduler reads it
        if failed:  # NOTE #1
            report = _with_failed(report, failed)
        if report:
            _attach(output, report)
        return output

    _update_states._moe_offload = True
    GPUModelRunner._update_states = _update_states
    GPUModelRunner.sample_tokens = sample_tokens


def _with_failed(report, failed: dict[str, str]):
    return lambda: {**(report() if report else {}), "failed": failed}


def _attach(output, report) -> None:
    """Put `report()` on the ModelRunnerOutput that reaches the scheduler. With async
    scheduling that is the one the async wrapper hands out later, once the step ran:
    `report` is called then, so reading its device counters waits for nothing more."""
    from vllm.v1.outputs import AsyncModelRunnerOutput

    if not isinstance(output, AsyncModelRunnerOutput):
        setattr(output, REPORT_ATTR, report())
        return
    get_output = output.get_output

    def get_output_with_report():
        result = get_output()
        setattr(result, REPORT_ATTR, report())
        return result

    output.get_output = get_output_with_report


def _tasks_for(runner) -> WorkerTasks | None:
    """The worker's classifier, on its ModelOffload: a second engine in one process
    (in-process engines) gets its own rules and tokenizer, not the first's."""
    model = model_state.current()
    if model is None or model.tasks is None:
        return None
    if model.worker_tasks is None:
        model.worker_tasks = WorkerTasks(TaskClassifier(
            model.cfg.task_rules_path, runner.vllm_config.model_config,
            known=model.tasks.tasks))
    return model.worker_tasks


# ---- request validation (front end and engine) ------------------------------------

_validating = False  # this process built an engine config with offload on (plugin.py)


def validate_requests() -> None:
    """Check our extra_args fields from now on: until offload is on in this process,
    vLLM's requests go through as they would without the plugin."""
    global _validating
    _validating = True


def install_request_validation() -> None:
    from vllm.sampling_params import SamplingParams

    if getattr(SamplingParams._verify_extra_args, "_moe_offload", False):
        return
    original = SamplingParams._verify_extra_args

    def _verify_extra_args(self):
        original(self)
        if not _validating:
            return
        try:
            request_fields(self.extra_args)
        except ValueError as e:
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(str(e), parameter="vllm_xargs") from None

    _verify_extra_args._moe_offload = True
    SamplingParams._verify_extra_args = _verify_extra_args
