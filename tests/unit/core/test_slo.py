import pytest

from vllm_moe_offload.core.slo import (MAX_OVERTAKES, Batch, Ema, LatencyModel, RequestInfo,
                                       can_admit, is_late, order_waiting)


def req(rid, task="a", prompt=100, arrival=0.0, ttft=None, tpot=None, misses=0.0):
    return RequestInfo(rid, task, prompt, arrival, ttft, tpot, misses)


def model(per_token=0.001, per_miss=0.01, output=50, per_step=0.0):
    return LatencyModel(per_token_s=per_token, per_step_s=per_step, per_miss_s=Ema(per_miss),
                        default_output_tokens=output)


def test_latency_model_formula():
    m = model(per_step=0.005)
    r = req("x", prompt=200, arrival=1.0, misses=3)
    # 3 misses x 10 ms + one step (5 ms + 2 running decodes x 1 ms) + 200 x 1 ms
    # + 0.5 s waited: the prefill runs beside the decodes (continuous batching)
    assert m.predict_ttft_s(r, running=2, now_s=1.5) == pytest.approx(
        0.03 + 0.007 + 0.2 + 0.5)
    m.token_budget = 100  # chunked: 98 tokens a step beside 2 decodes, 3 steps
    assert m.predict_ttft_s(r, running=2, now_s=1.5) == pytest.approx(
        0.03 + 3 * 0.007 + 0.2 + 0.5)


def test_a_fresh_request_with_an_slo_is_not_late_behind_a_full_batch():
    """32 running requests of 200 expected tokens: before, a new request was taken
    to wait for every one to finish its output (6.4 s at 1 ms a token), so a 1 s
    TTFT SLO was lost on arrival and the request sorted behind those without one."""
    m = model(per_token=0.001, output=200, per_step=0.005)
    slo, plain = req("slo", prompt=50, ttft=1000, arrival=0.999), req("plain", arrival=0.0)
    assert not is_late(m, slo, running=32, now_s=1.0)
    got = order_waiting(m, [plain, slo], running=32, now_s=1.0, affinity={})
    assert [r.request_id for r in got] == ["slo", "plain"]


def test_a_request_overtaken_often_enough_goes_first():
    from vllm_moe_offload.core.slo import MAX_OVERTAKES

    m = model(output=0)
    late = req("late", task="legal", ttft=1, arrival=0.0)  # lost, and of another task
    chat = req("chat", task="chat", arrival=0.5)
    order = lambda: [r.request_id for r in order_waiting(  # noqa: E731
        m, [chat, late], running=1, now_s=1.0, affinity={"chat": 1.0})]
    assert order() == ["chat", "late"]
    late.overtaken = MAX_OVERTAKES
    assert order() == ["late", "chat"]


def test_learning_output_lengths_and_step_costs():
    m = model()
    m.observe_output("a", 10)
    m.observe_output("a", 20)
    assert m.expected_output("a") == pytest.approx(0.8 * 10 + 0.2 * 20)
    assert m.expected_output("b") == 50
    # Steps of 2 ms + 0.1 ms per token, plus 0.5 ms of stall per miss.
    for tokens, misses in [(4, 10), (300, 40), (8, 12), (120, 30), (6, 10), (250, 36)] * 3:
        m.observe_step(tokens, 0.002 + 0.0001 * tokens + 0.0005 * misses, misses,
                       0.0005 * misses)
    assert m.per_token_s == pytest.approx(0.0001, rel=1e-6)
    assert m.per_step_s == pytest.approx(0.002, rel=1e-6)
    assert m.per_miss_s.value == pytest.approx(0.0005)
    # A decode step of 10 requests: base + 10 tokens + the regime's misses.
    expected = 0.002 + 10 * 0.0001 + m.misses_per_step.value * 0.0005
    assert m.predict_tpot_s(10) == pytest.approx(expected)
    assert 10 < m.misses_per_step.value < 40


def test_order_urgent_first_then_affinity_then_late():
    m = model(per_token=0.001, output=0)  # predicted TTFT = prompt tokens x 1 ms
    now = 1.0
    waiting = [
        req("loose-c", task="c", ttft=60_000, arrival=0.0),
        req("none-py", task="python"),
        req("urgent", task="c", prompt=400, ttft=1_500, arrival=0.4),  # slack 0.9 s >= 2 x 0.4 s
        req("urgent2", task="c", prompt=400, ttft=1_500, arrival=0.1),  # slack 0.6 s < 0.8 s
        req("lost", task="python", prompt=100, ttft=500, arrival=0.0),  # 1 s waited > 0.5 s
        req("loose-py", task="python", ttft=60_000, arrival=0.5),
    ]
    assert is_late(m, waiting[4], running=0, now_s=now)
    got = order_waiting(m, waiting, running=0, now_s=now, affinity={"python": 0.9, "c": 0.2})
    # urgent2 first; then by affinity: python (0.9) before c (0.2), slack breaking
    # ties (no SLO = infinite slack); the lost one last.
    assert [r.request_id for r in got] == [
        "urgent2", "loose-py", "none-py", "urgent", "loose-c", "lost"]


def test_admission_keeps_running_requests_within_their_tpot_slos():
    m = model(per_token=0.01)  # no fixed or miss cost: 10 ms per request in the batch
    m.default_output_tokens = 1e9  # (prefill spread over outputs: nothing)
    running = [req(f"r{i}", tpot=45) for i in range(3)]  # 4 in batch -> 40 ms/token: ok
    assert can_admit(m, req("new", prompt=10), Batch(running))
    running.append(req("r3", tpot=45))  # 5 in batch -> 50 ms/token > 45 ms
    assert not can_admit(m, req("new", prompt=10), Batch(running))
    # the candidate's own TPOT SLO counts too
    assert not can_admit(m, req("strict", tpot=15), Batch(running[:1]))
    # an empty batch always admits: nothing starves
    assert can_admit(m, req("strict", tpot=1e-6), Batch([]))
    # an SLO already broken at today's size is not a reason to hold (it only adds
    # queueing): 4 running -> 40 ms today, nobody asks for 40..50 ms
    assert can_admit(m, req("new", tpot=5), Batch([req(f"r{i}", tpot=35) for i in range(4)]))
    # a batch grown admission by admission checks as the list did
    batch = Batch(running[:2])
    batch.add(req("x", tpot=45))
    assert batch.size == 3 and can_admit(m, req("new"), batch)
    batch.add(req("y"))
    assert not can_admit(m, req("new"), batch)


def test_a_long_prefill_counts_against_the_running_requests_tpot():
    """An 8000-token prompt beside 4 decodes with a 20 ms TPOT SLO was admitted: the
    decode step grows 10 -> 11 ms, but the prompt's 8 s of prefill lands on the
    running requests' outputs (here 50 tokens: +160 ms a token)."""
    m = model(per_token=0.001, per_step=0.006, output=50)
    running = Batch([req(f"r{i}", tpot=20) for i in range(4)])
    assert not can_admit(m, req("long", prompt=8000), running)
    assert can_admit(m, req("short", prompt=8), running)


def test_a_held_request_ages_and_is_admitted():
    """One running request's tight TPOT SLO held every waiting request for its whole
    output; a held step counts as an overtake, and an aged request goes first."""
    m = model(output=0)
    held = req("held", arrival=0.0)
    held.overtaken = MAX_OVERTAKES
    assert held.aged
    fresh = req("fresh", arrival=1.0)
    assert [r.request_id for r in order_waiting(m, [fresh, held], 1, 2.0, {})] == [
        "held", "fresh"]


def test_shorter_expected_outputs_go_first_within_an_affinity():
    m = model(output=0)
    m.observe_output("long", 4000)
    m.observe_output("short", 5)
    waiting = [req("long-1", task="long", arrival=0.0), req("short-1", task="short", arrival=1.0),
               RequestInfo("long-capped", "long", 100, 2.0, max_output_tokens=1)]
    got = [r.request_id for r in order_waiting(m, waiting, 0, 3.0, {})]
    assert got == ["long-capped", "short-1", "long-1"]
    assert m.expected_output("long", 16) == 16
