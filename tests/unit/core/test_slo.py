import pytest

from vllm_moe_offload.core.slo import (Ema, LatencyModel, RequestInfo, affinity_order,
                                       can_admit, order_by_slo)


def req(rid, task="a", prompt=100, arrival=0.0, ttft=None, tpot=None, misses=0.0):
    return RequestInfo(rid, task, prompt, arrival, ttft, tpot, misses)


def model(per_token=0.001, per_miss=0.01, output=50):
    m = LatencyModel(per_token_s=Ema(per_token), per_miss_s=Ema(per_miss),
                     default_output_tokens=output)
    return m


def test_latency_model_formula():
    m = model()
    r = req("x", prompt=200, arrival=1.0, misses=3)
    # 3 misses x 10 ms + (200 + 2 running x 50 expected) x 1 ms + 0.5 s waited
    assert m.predict_ttft_s(r, running=2, now_s=1.5) == pytest.approx(0.03 + 0.3 + 0.5)


def test_learning_output_lengths_and_costs():
    m = model()
    m.observe_output("a", 10)
    m.observe_output("a", 20)
    assert m.expected_output("a") == pytest.approx(0.8 * 10 + 0.2 * 20)
    assert m.expected_output("b") == 50
    m.observe_step(tokens=100, seconds=0.5, misses=10, stall_s=0.2)
    assert m.per_token_s.value == pytest.approx(0.003)  # first sample replaces the prior
    assert m.per_miss_s.value == pytest.approx(0.02)


def test_order_by_slo_puts_least_slack_first():
    waiting = [req("loose", ttft=5000, arrival=0.0), req("none"),
               req("tight", ttft=1000, arrival=0.5), req("late", ttft=2000, arrival=0.0)]
    assert [r.request_id for r in order_by_slo(waiting, now_s=1.0)] == [
        "tight", "late", "loose", "none"]


def test_admission_keeps_running_requests_within_their_slos():
    m = model(per_token=0.01)
    running = [req(f"r{i}", tpot=45) for i in range(3)]  # 4 in batch -> 40 ms/token: ok
    assert can_admit(m, req("new", prompt=10), running, now_s=0.0)
    running.append(req("r3", tpot=45))  # 5 in batch -> 50 ms/token > 45 ms
    assert not can_admit(m, req("new", prompt=10), running, now_s=0.0)
    # a candidate that would miss its own TTFT is held back while others run...
    hopeless = req("h", prompt=10_000, ttft=100)
    assert not can_admit(m, hopeless, running[:1], now_s=0.0)
    # ...but admitted when nothing runs (waiting only makes it later)
    assert can_admit(m, hopeless, [], now_s=0.0)


def test_affinity_prefers_tasks_whose_experts_are_resident():
    waiting = [req("1", task="legal"), req("2", task="python"), req("3", task="c")]
    got = affinity_order(waiting, {"python": 0.9, "legal": 0.2})
    assert [r.request_id for r in got] == ["2", "1", "3"]
