import json

import pytest

from vllm_moe_offload.core.slot_pool import ExpertKey
from vllm_moe_offload.core.tasks import (ReplanClock, TaskProfiles, TaskRules, expected_load,
                                         hot_experts, plan_residency)


def rules(tmp_path, data):
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_rules_first_match_wins_and_default(tmp_path):
    r = TaskRules.load(rules(tmp_path, {"default": "prose", "rules": [
        {"task": "python", "keywords": ["def ", "import "]},
        {"task": "c", "regex": [r"#include\s*<"]},
        {"task": "legal", "keywords": ["LICENSE", "copyright"]}]}))
    assert r.classify("def f(x): return x") == "python"
    assert r.classify("#include <stdio.h>") == "c"
    assert r.classify("Copyright 2020 the authors") == "legal"  # keywords ignore case
    assert r.classify("Once upon a time") == "prose"


@pytest.mark.parametrize("content, words", [
    ("{not json", "is corrupt (not JSON"),
    ({"rules": [{"keywords": ["x"]}]}, "rule 0 has no 'task'"),
    ({"rules": [{"task": "a", "regex": ["("]}]}, "bad regular expression"),
    ({"rules": [{"task": "a"}]}, "neither keywords nor regex"),
    ({"rules": "python"}, "no 'rules' list"),
    # a bare string was read letter by letter: "def " matched every prompt with an
    # e, "^Licence" compiled "^" (matches everything); a number crashed
    ({"rules": [{"task": "a", "keywords": "def "}]}, "'keywords' must be a list"),
    ({"rules": [{"task": "a", "regex": "^Licence"}]}, "'regex' must be a list"),
    ({"rules": [{"task": "a", "keywords": [""]}]}, "non-empty strings"),
    ({"rules": [{"task": "a", "keywords": [3]}]}, "not [3]"),
    ({"default": "", "rules": []}, "'default' task must be a non-empty name"),
])
def test_bad_rule_files_are_refused_with_the_reason(tmp_path, content, words):
    with pytest.raises(ValueError) as err:
        TaskRules.load(rules(tmp_path, content))
    assert words in str(err.value) and "rules.json" in str(err.value)


def make_profiles():
    p = TaskProfiles(num_layers=2, experts_per_layer=4)
    p.record("python", 0, [0, 0, 0, 1])  # f(python, 0) = [.75, .25, 0, 0]
    p.record("python", 1, [2, 2])
    p.record("legal", 0, [3, 3, 1, 1])  # f(legal, 0) = [0, .5, 0, .5]
    p.record("legal", 1, [0])
    return p


def test_expected_load_is_the_documented_sum():
    load = expected_load(make_profiles(), {"python": 100, "legal": 40})
    assert load[ExpertKey(0, 0)] == pytest.approx(75)
    assert load[ExpertKey(0, 1)] == pytest.approx(100 * 0.25 + 40 * 0.5)
    assert load[ExpertKey(0, 3)] == pytest.approx(20)
    assert load[ExpertKey(1, 2)] == pytest.approx(100)
    assert load[ExpertKey(1, 0)] == pytest.approx(40)


def test_plan_takes_the_largest_loads_and_skips_insensitive_pairs():
    p = make_profiles()
    plan = plan_residency(p, {"python": 100, "legal": 40}, budget_slots=3)
    assert plan == [ExpertKey(1, 2), ExpertKey(0, 0), ExpertKey(0, 1)]
    # python's layer 1 is insensitive to routing: it stops steering the plan.
    plan = plan_residency(p, {"python": 100, "legal": 40}, 3, insensitive={("python", 1)})
    assert ExpertKey(1, 2) not in plan and plan[0] == ExpertKey(0, 0)
    assert plan_residency(p, {"python": 0, "legal": 0}, 3) == []


def test_profiles_survive_a_restart_and_corruption_is_refused(tmp_path):
    path = tmp_path / "profiles.json"
    make_profiles().save(path)
    again = TaskProfiles.load(path, 2, 4)
    assert again.frequency("python", 0) == [0.75, 0.25, 0.0, 0.0]
    with pytest.raises(ValueError, match="2 layers x 4 experts"):
        TaskProfiles.load(path, 3, 4)
    data = json.loads(path.read_text())
    data["profiles"]["counts"]["python"][0][0] = 999  # edited: checksum no longer holds
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="checksum"):
        TaskProfiles.load(path, 2, 4)
    path.write_text(json.dumps({**data, "format": "vllm-moe-offload-task-profiles/2"}))
    with pytest.raises(ValueError, match="its format: 'vllm-moe-offload-task-profiles/2'"):
        TaskProfiles.load(path, 2, 4)  # (a later version's file: which one, said)
    path.write_text(path.read_text()[:40])
    with pytest.raises(ValueError, match="corrupt"):
        TaskProfiles.load(path, 2, 4)


def test_profiles_saved_by_two_writers_at_once_stay_whole(tmp_path):
    """Two instances sharing one profiles file: each writes a temporary file of its
    own, so neither renames the other's away (before: one shared `.tmp` name, and
    FileNotFoundError in the engine's step) and the file is always one whole save."""
    import threading

    path = tmp_path / "new_dir" / "profiles.json"  # a directory not made yet
    errors = []

    def writer():
        try:
            for _ in range(200):
                make_profiles().save(path)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert TaskProfiles.load(path, 2, 4).frequency("python", 0) == [0.75, 0.25, 0.0, 0.0]
    assert [p.name for p in path.parent.iterdir()] == ["profiles.json"]  # no temp left
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600: others read it
    path.chmod(0o664)
    make_profiles().save(path)
    assert path.stat().st_mode & 0o777 == 0o664  # a save keeps the file's mode


def test_replan_every_p_prompts():
    clock = ReplanClock(every=3)
    assert [clock.on_prompt() for _ in range(7)] == [False, False, True, False, False, True, False]


def test_request_fields_from_extra_args():
    from vllm_moe_offload.core.tasks import request_fields

    assert request_fields(None) == (None, None, None)
    assert request_fields({"task": "python", "slo_ttft_ms": "250", "slo_tpot_ms": 40,
                           "other": 1}) == ("python", 250.0, 40.0)
    with pytest.raises(ValueError, match="slo_ttft_ms='soon' must be a positive, finite"):
        request_fields({"slo_ttft_ms": "soon"})
    with pytest.raises(ValueError, match="slo_tpot_ms=0 must be a positive, finite number"):
        request_fields({"slo_tpot_ms": 0})
    with pytest.raises(ValueError, match="task=3 must be a non-empty string"):
        request_fields({"task": 3})
    # True is not 1 ms, b"7" not 7 ms, "inf" no SLO; a blank or huge name no task
    for bad in (True, b"7", "inf", float("nan"), [5]):
        with pytest.raises(ValueError, match="must be a positive, finite number"):
            request_fields({"slo_ttft_ms": bad})
    for bad in (" ", "x" * 129):
        with pytest.raises(ValueError, match="at most 128 characters"):
            request_fields({"task": bad})


def test_hot_experts_are_each_layers_most_used_share():
    p = TaskProfiles(2, 8)
    for e, n in ((0, 5), (3, 9), (5, 1), (6, 9)):
        for _ in range(n):
            p.record("python", 0, [e])
    p.record("python", 1, [7])
    for _ in range(4):
        p.record("prose", 0, [5])  # prose's only expert: f = 1, the largest sum
        p.record("prose", 1, [2])
    hot = hot_experts(p, 0.25, {("prose", 1)})
    assert hot == {ExpertKey(0, 5), ExpertKey(0, 3), ExpertKey(1, 7)}  # ties: lower id
    assert len(hot_experts(p, 1.0)) == 4 + 2  # only experts with some use


def test_equal_sums_tie_to_the_lower_expert_whatever_the_task_order():
    """Loads equal but for float rounding (3.1 either way) went to whichever expert
    the tasks' order rounded up: the plan and the hot set hung on arrival order."""
    import itertools

    rows = {"t0": [[3, 1]], "t1": [[0, 3]], "t2": [[8, 8]]}
    demand = {"t0": 2.4, "t1": 1.2, "t2": 2.6}
    hot_rows = {"t0": [[3, 3]], "t1": [[3, 6]], "t2": [[6, 3]]}  # 1.5 either way
    for order in itertools.permutations(rows):
        p = TaskProfiles(1, 2, {t: rows[t] for t in order})
        assert plan_residency(p, {t: demand[t] for t in order}, 1) == [ExpertKey(0, 0)]
        q = TaskProfiles(1, 2, {t: hot_rows[t] for t in order})
        assert hot_experts(q, 0.5) == {ExpertKey(0, 0)}
