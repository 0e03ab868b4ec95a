"""TaskAwareScheduler driven the way vLLM's engine core drives it, with no engine,
and the worker's step reports it reads.

vLLM's CPU build turns async scheduling off, so no engine here runs vLLM's
AsyncScheduler. These tests build the scheduler from a real VllmConfig (a tiny
generated checkpoint, task-aware offload on) and call schedule() and
update_from_output() in the order EngineCore.step (sync) or
EngineCore.step_with_batch_queue (async, two batches in flight) calls them, with a
stand-in model output of one token per scheduled request.
"""

import copy
from collections import deque

import pytest
import torch

pytest.importorskip("vllm")

from vllm_moe_offload.hf.tiny_moe import build_tiny_moe  # noqa: E402

MAX_TOKENS = 4
PROMPTS = {"a": ("chat", 5), "b": ("python", 7), "c": ("chat", 3), "d": ("legal", 9)}


@pytest.fixture(scope="module")
def vllm_config(tmp_path_factory):
    from vllm.engine.arg_utils import EngineArgs

    model = build_tiny_moe(tmp_path_factory.mktemp("sched") / "m", "qwen3_moe",
                           num_layers=2, num_experts=4)
    args = EngineArgs(model=str(model), max_model_len=128, enforce_eager=True,
                      additional_config={"expert_offload": {
                          "enabled": True, "pool_slots": 6, "task_aware": True}})
    return args.create_engine_config()


def make_scheduler(vllm_config, async_scheduling: bool, max_num_seqs: int | None = None):
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig,
                                            KVCacheGroupSpec)
    from vllm.v1.structured_output import StructuredOutputManager

    config = copy.copy(vllm_config)
    config.scheduler_config = copy.copy(vllm_config.scheduler_config)
    config.scheduler_config.async_scheduling = async_scheduling
    if max_num_seqs is not None:
        config.scheduler_config.max_num_seqs = max_num_seqs
    config.cache_config = copy.copy(vllm_config.cache_config)
    config.cache_config.num_gpu_blocks = 64  # set by the engine after profiling
    cls = resolve_obj_by_qualname(config.scheduler_config.scheduler_cls)  # the plugin's
    spec = FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=32,
                             dtype=torch.float32)
    kv = KVCacheConfig(num_blocks=64, kv_cache_tensors=[],
                       kv_cache_groups=[KVCacheGroupSpec(["layers.0.attn"], spec)])
    scheduler = cls(vllm_config=config, kv_cache_config=kv,
                    structured_output_manager=StructuredOutputManager(config),
                    block_size=16)
    assert isinstance(scheduler, AsyncScheduler) == async_scheduling
    return scheduler


def add_requests(scheduler):
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    for req_id, (task, n) in PROMPTS.items():
        params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True,
                                extra_args={"task": task})
        scheduler.add_request(Request(req_id, list(range(1, n + 1)), params, None,
                                      arrival_time=0.0))


def model_output(scheduler_output, step: int):
    """One sampled token per scheduled request (every prompt fits one step), and the
    worker's report, as tasks.py attaches it."""
    from vllm.v1.outputs import ModelRunnerOutput

    from vllm_moe_offload.integration.vllm.tasks import REPORT_ATTR

    ids = list(scheduler_output.num_scheduled_tokens)
    out = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                            sampled_token_ids=[[100 + step] for _ in ids])
    # step 0: a report of failed requests only (none here), as a worker without
    # task-aware residency sends beside a hand-set --scheduler-cls
    setattr(out, REPORT_ATTR, {"failed": {}} if step == 0 else {
        "misses": 2, "stall_s": 0.0, "resident_share": {"chat": 0.5}})
    return out


def run(scheduler, in_flight: int):
    """The engine core's loop with `in_flight` batches queued (1: EngineCore.step)."""
    queue, outputs, scheduled, step = deque(), {}, [], 0
    while scheduler.has_requests() or queue:
        if scheduler.has_requests() and len(queue) < in_flight:
            so = scheduler.schedule()
            scheduled.append(dict(so.num_scheduled_tokens))
            queue.append((so, model_output(so, step)))
            step += 1
            if len(queue) < in_flight:
                continue
        so, mo = queue.popleft()
        for client in scheduler.update_from_output(so, mo).values():
            for o in client.outputs:
                outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
        assert step < 50, "no progress"
    return outputs, scheduled


def test_async_variant_overlaps_steps_and_matches_sync(vllm_config):
    sync = make_scheduler(vllm_config, False)
    add_requests(sync)
    sync_out, sync_steps = run(sync, in_flight=1)

    asynch = make_scheduler(vllm_config, True)
    add_requests(asynch)
    async_out, async_steps = run(asynch, in_flight=2)

    assert set(sync_out) == set(PROMPTS)
    assert all(len(tokens) == MAX_TOKENS for tokens in sync_out.values())
    # The async variant schedules every request's next token before its last one
    # came back: every step that runs the model is one token of every request, as in
    # sync (the empty steps at the end clear finished requests).
    assert async_steps[0] == {r: n for r, (_, n) in PROMPTS.items()}
    assert async_steps[1] == {r: 1 for r in PROMPTS}  # before step 0's output
    assert [s for s in async_steps if s] == [s for s in sync_steps if s]
    assert len([s for s in sync_steps if s]) == MAX_TOKENS
    assert {r: len(t) for r, t in async_out.items()} == {r: MAX_TOKENS for r in PROMPTS}
    for s in (sync, asynch):
        assert s.counters["admitted"] == len(PROMPTS) and s.counters["steps"] == MAX_TOKENS
        assert s.latency.misses_per_step.value > 0  # the worker's report was read
        assert s._resident_share == {"chat": 0.5}
        assert not s._info  # every finished request was forgotten


def test_sync_scheduler_under_async_loop_stalls(vllm_config):
    """Why the async variant exists: vLLM's synchronous Scheduler, run with two
    batches in flight, schedules nothing while a request's token is outstanding."""
    sync = make_scheduler(vllm_config, False)
    add_requests(sync)
    _, steps = run(sync, in_flight=2)
    assert steps[1] == {}
    assert len(steps) >= 2 * MAX_TOKENS - 1  # an empty step after each working one


def test_the_first_step_report_leaves_out_warm_up_misses():
    """The worker's side: vLLM's profiling and warm-up runs load experts before the
    first step; the first report counts that step's misses only (step_began, called
    from vLLM's _update_states, takes the count before it)."""
    from vllm_moe_offload.core.config import OffloadConfig
    from vllm_moe_offload.integration.vllm.model_state import ModelOffload
    from vllm_moe_offload.runtime.expert_cache import ExpertCache
    from vllm_moe_offload.runtime.store import ExpertLayout, HostStore, TensorSpec
    from vllm_moe_offload.runtime.task_residency import TaskResidency

    L, E = 2, 4
    store = HostStore(ExpertLayout((TensorSpec((4, 4), torch.float32),)), L, E)
    for layer in range(L):
        for e in range(E):
            store.put(layer, e, [torch.full((4, 4), float(e))])
    store.seal()
    model = ModelOffload(OffloadConfig.from_dict({"enabled": True}), {}, torch.device("cpu"))
    model.cache = ExpertCache(store, L * E, "cpu")
    model.tasks = TaskResidency(model.cache, budget=0, replan_every=1000)

    def call(layer, *experts):
        model.cache.map_to_slots(layer, torch.tensor([list(experts)]))

    call(0, 0, 1, 2)  # warm-up: 3 misses
    model.step_began()
    call(1, 0, 1)  # step 1: 2 misses
    first = model.step_report()
    model.step_began()  # only the first step takes the baseline
    call(0, 0, 3)  # step 2: 1 miss
    second = model.step_report()
    # read in any order (a KV connector's step output comes back at once)
    assert second()["misses"] == 1 and first()["misses"] == 2


def test_a_request_of_another_task_is_not_starved_by_a_stream_of_the_batchs(vllm_config):
    """Two sequences at a time, one 'chat' request arriving each step: the waiting
    order is rebuilt every step and the batch's task goes first, so a 'legal'
    request that came before them was never admitted (300 steps, 150 chat requests
    admitted meanwhile). Overtaken MAX_OVERTAKES times, it goes first."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    from vllm_moe_offload.core.slo import MAX_OVERTAKES

    scheduler = make_scheduler(vllm_config, False, max_num_seqs=2)
    arrivals = iter(range(1000))

    def add(req_id, task):
        params = SamplingParams(max_tokens=4, ignore_eos=True, extra_args={"task": task})
        scheduler.add_request(Request(req_id, [1, 2, 3, 4, 5], params, None,
                                      arrival_time=float(next(arrivals))))

    started = {}
    for step in range(12 * MAX_OVERTAKES):
        if step in (0, 2):
            add(f"chat-{step}", "chat")
        if step == 3:
            add("legal", "legal")
        if step >= 3:
            add(f"chat-{step}", "chat")
        so = scheduler.schedule()
        for req in so.scheduled_new_reqs:
            started[req.req_id] = step
        scheduler.update_from_output(so, model_output(so, step))
    assert "legal" in started, "starved"
    overtook = [r for r, s in started.items() if r.startswith("chat") and s < started["legal"]
                and int(r.split("-")[1]) > 3]
    assert len(overtook) <= MAX_OVERTAKES + 2  # (+ a step's admissions)


def test_task_names_past_the_cap_count_as_the_default_task(caplog):
    """A client naming a new task per request grew the profiles (L x E counts each),
    their file and its save inside the step without bound."""
    from vllm_moe_offload.integration.vllm.tasks import MAX_TASKS, TaskClassifier

    from vllm_moe_offload.runtime.task_residency import COUNT_ROWS

    assert MAX_TASKS + 1 == COUNT_ROWS  # with the default: a step's tasks fit the rows
    classifier = TaskClassifier(None, None, known=["from-the-file"])
    names = [classifier.task_of({"task": f"t{i}"}, []) for i in range(MAX_TASKS - 1)]
    assert names == [f"t{i}" for i in range(MAX_TASKS - 1)]
    assert classifier.task_of({"task": "from-the-file"}, []) == "from-the-file"
    with caplog.at_level("WARNING", logger="vllm.moe_offload"):
        assert classifier.task_of({"task": "one-more"}, []) == "default"
        assert classifier.task_of({"task": "and-another"}, []) == "default"
    assert caplog.text.count("task names seen") == 1
    assert classifier.task_of({"task": "t5"}, []) == "t5"  # known ones stay
    assert classifier.task_of(None, []) == "default"


def test_ageing_leaves_the_affinity_order_under_a_backlog(vllm_config):
    """Ageing counted admissions: a step admits up to max_num_seqs, so within a
    step or two every request of a backlog had 8 and the order was FCFS (24 of the
    40 admissions after the first 16 of the resident task, not 40). It counts steps."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    scheduler = make_scheduler(vllm_config, False, max_num_seqs=16)
    for i in range(96):
        task = "chat" if i % 2 else "legal"
        params = SamplingParams(max_tokens=3, ignore_eos=True, extra_args={"task": task})
        scheduler.add_request(Request(f"{task}-{i}", [1, 2, 3], params, None,
                                      arrival_time=float(i)))
    order = []
    for step in range(400):
        if not scheduler.has_requests():
            break
        so = scheduler.schedule()
        order += [r.req_id for r in so.scheduled_new_reqs]
        scheduler.update_from_output(so, model_output(so, step))  # chat is resident
    assert len(order) == len(set(order)) == 96  # every request admitted, once
    assert sum(r.startswith("chat") for r in order[16:56]) >= 36


def test_rules_read_prompts_with_vllms_tokenizer_and_a_failure_is_not_fatal(
        vllm_config, tmp_path, caplog, monkeypatch):
    """The classifier decodes with the engine's own tokenizer (its mode, revision and
    trust_remote_code; before, a bare AutoTokenizer), and in the scheduler, where an
    exception ends the engine, a tokenizer that cannot load makes untagged requests
    the default task, with one warning."""
    import json

    from vllm.tokenizers.registry import cached_tokenizer_from_config

    from vllm_moe_offload.integration.vllm import tasks

    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"default": "general", "rules": [
        {"task": "python", "keywords": ["def "]}]}))
    model_config = vllm_config.model_config
    ids = cached_tokenizer_from_config(model_config).encode("def add(a, b):")
    assert tasks.TaskClassifier(str(rules), model_config).task_of(None, ids) == "python"
    broken = tasks.TaskClassifier(str(rules), model_config)
    monkeypatch.setattr(broken, "_decode", lambda ids: 1 / 0)
    with caplog.at_level("WARNING", logger="vllm.moe_offload"):
        assert broken.task_of(None, ids) == "general"
        assert broken.task_of(None, ids) == "general"
        assert broken.task_of({"task": "python"}, ids) == "python"  # tagged: as given
    assert caplog.text.count("the task rules cannot read prompts") == 1


def test_approximate_tasks_keep_their_kv_blocks_apart(tmp_path):
    """Approximate mode: a task whose layers re-route computes KV that an exact task's
    request with the same prefix must not read from the prefix cache (its block
    hashes covered tokens and cache_salt, not the task)."""
    import json

    from vllm.engine.arg_utils import EngineArgs
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    from vllm_moe_offload.core.sensitivity import SENSITIVITY_FORMAT

    model = build_tiny_moe(tmp_path / "m", "qwen3_moe", num_layers=2, num_experts=4)
    sensitivity = tmp_path / "s.json"
    sensitivity.write_text(json.dumps({
        "format": SENSITIVITY_FORMAT, "model": str(model), "num_layers": 2,
        "threshold": 0.05, "metric": "m",
        "tasks": {"chat": {"change": [0.0, 0.2], "insensitive": [0]},
                  "python": {"change": [0.3, 0.2], "insensitive": []}}}))
    config = EngineArgs(model=str(model), max_model_len=128, enforce_eager=True,
                        additional_config={"expert_offload": {
                            "enabled": True, "pool_slots": 6, "task_aware": True,
                            "approximate": True,
                            "sensitivity_path": str(sensitivity)}}).create_engine_config()
    scheduler = make_scheduler(config, async_scheduling=False)
    init_none_hash(sha256)
    hasher = get_request_block_hasher(16, sha256)
    requests = {}
    for task in ("chat", "python", "general"):
        params = SamplingParams(max_tokens=2, extra_args={"task": task})
        requests[task] = Request(task, list(range(1, 40)), params, None, arrival_time=0.0,
                                 block_hasher=hasher)
        scheduler.add_request(requests[task])
    assert "approximate:chat" in requests["chat"].cache_salt
    assert requests["python"].cache_salt is None  # exact tasks share blocks as before
    assert requests["chat"].block_hashes[0] != requests["python"].block_hashes[0]
    assert requests["python"].block_hashes == requests["general"].block_hashes
    # vLLM's own scheduler cannot keep them apart: refused while prefix caching is on
    for prefix_caching in (None, False):
        args = EngineArgs(model=str(model), max_model_len=128, enforce_eager=True,
                          enable_prefix_caching=prefix_caching,
                          additional_config={"expert_offload": {
                              "enabled": True, "pool_slots": 6, "task_aware": True,
                              "task_scheduler": False, "approximate": True,
                              "sensitivity_path": str(sensitivity)}})
        if prefix_caching is None:  # vLLM's default: on
            with pytest.raises(ValueError, match="--no-enable-prefix-caching"):
                args.create_engine_config()
        else:
            args.create_engine_config()


def frozen_latency(scheduler, per_step=0.005, per_token=0.001):
    """A latency model that learns nothing: decode steps of per_step + b x per_token."""
    scheduler.latency.per_step_s, scheduler.latency.per_token_s = per_step, per_token
    scheduler.latency.observe_step = lambda *args: None


def test_one_tight_tpot_slo_holds_the_queue_at_most_max_overtakes_steps(vllm_config):
    """R's 6.5 ms TPOT SLO is met alone (6 ms) and not beside one more (7 ms): every
    request behind it was held for R's whole output (200 steps), none overtaken, so
    none aged. A held step now counts, and the aged request is admitted."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    from vllm_moe_offload.core.slo import MAX_OVERTAKES

    scheduler = make_scheduler(vllm_config, False, max_num_seqs=8)
    frozen_latency(scheduler)
    params = SamplingParams(max_tokens=13, ignore_eos=True,  # (a block of 16 tokens)
                            extra_args={"task": "chat", "slo_tpot_ms": 6.5})
    scheduler.add_request(Request("R", [1, 2], params, None, arrival_time=0.0))
    started = {}
    for step in range(12):
        if step == 1:
            for i in range(5):
                params = SamplingParams(max_tokens=4, ignore_eos=True,
                                        extra_args={"task": "chat"})
                scheduler.add_request(Request(f"w{i}", [1, 2, 3], params, None,
                                              arrival_time=1.0 + i))
        so = scheduler.schedule()
        for req in so.scheduled_new_reqs:
            started[req.req_id] = step
        scheduler.update_from_output(so, model_output(so, step))
    first = min(started.get(f"w{i}", 99) for i in range(5))
    assert started["R"] == 0 and first == 1 + MAX_OVERTAKES
    assert scheduler.counters["held"] >= MAX_OVERTAKES


def test_only_the_batchs_free_room_is_checked_for_admission(vllm_config):
    """Every waiting request was checked against a batch grown by every one before
    it (O(N^2) a step: 1.5 s at 10,000 waiting), though vLLM starts max_num_seqs."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    scheduler = make_scheduler(vllm_config, False, max_num_seqs=4)
    frozen_latency(scheduler)
    for i in range(300):
        params = SamplingParams(max_tokens=2, ignore_eos=True,
                                extra_args={"task": "chat", "slo_tpot_ms": 7.5})
        scheduler.add_request(Request(f"r{i}", [1, 2], params, None, arrival_time=float(i)))
    so = scheduler.schedule()
    # 6 + 1 ms alone, 8 ms with 3: the third breaks the first two's 7.5 ms SLO
    assert [r.req_id for r in so.scheduled_new_reqs] == ["r0", "r1"]
    assert scheduler.counters["held"] == 2  # r2, r3: the room left, not 298
    assert len(scheduler.waiting) == 298


def test_bad_task_fields_past_validation_do_not_end_the_engine(vllm_config, caplog):
    """SamplingParams built before offload was on, or changed since, skip the check:
    the scheduler's ValueError in add_request ended the engine core."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    scheduler = make_scheduler(vllm_config, False)
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    params.extra_args = {"slo_ttft_ms": "fast", "task": "chat", "other": 1}
    with caplog.at_level("WARNING", logger="vllm.moe_offload"):
        scheduler.add_request(Request("bad", [1, 2, 3], params, None, arrival_time=0.0))
    assert "request bad: vllm_xargs slo_ttft_ms='fast'" in caplog.text
    assert params.extra_args == {"other": 1, "task": "default"}  # what the worker reads
    outputs, _ = run(scheduler, 1)
    assert len(outputs["bad"]) == 2
