"""Task-aware residency and scheduling through real vLLM (in-process engines).

Checked: outputs stay token-identical to plain vLLM with task profiles, the
residency plan and the task-aware scheduler on; tasks come from extra_args or
the rule file; profiles are saved and a restarted engine starts warm from them;
a corrupt profile or rule file is refused up front; a TPOT SLO that one more
request would break makes the scheduler hold requests back (outputs unchanged);
approximate mode re-routes
misses only for the insensitive task and says so in the stats.
"""

import json
import shutil

import pytest

from tests.e2e.conftest import (LAYERS, PROMPTS, EngineFailed, assert_same_outputs, offload_spec,
                                plain_spec)

# PROMPTS[1] is Python ("def "), PROMPTS[2] is a licence (legal); the others
# fall to the rule file's default.
RULES = {"default": "prose", "rules": [{"task": "python", "keywords": ["def "]},
                                      {"task": "legal", "regex": ["[Ll]icen[cs]e"]}]}
EXTRA = [{"task": "chat"}, None, None, {"task": "chat", "slo_ttft_ms": 5000}]


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    (d / "rules.json").write_text(json.dumps(RULES))
    return d


def task_spec(model, files, profiles, **offload):
    spec = offload_spec(model, pool_slots=16, store="host", task_aware=True,
                        task_rules_path=str(files / "rules.json"),
                        task_profiles_path=str(profiles), **offload)
    return dict(spec, extra_args=EXTRA)


def test_task_aware_outputs_match_plain_and_profiles_survive_restart(models, engine,
                                                                     task_files):
    model = models["qwen3_moe"]
    plain = engine(plain_spec(model))
    profiles = task_files / "profiles.json"
    first = engine(dict(task_spec(model, task_files, profiles, replan_every=2), rounds=2))
    assert_same_outputs(first, plain)
    tasks = first["stats"]["tasks"]
    # extra_args named "chat"; the rules classified the other two.
    assert tasks["tasks"] == ["chat", "legal", "python"]
    assert tasks["prompts"] == 2 * len(PROMPTS)
    # Each round's 4 prompts arrive in one step: one re-plan per step at most.
    assert tasks["replans"] == 2
    assert tasks["planned"] == tasks["budget"] == (16 - 8) // 2
    assert "expert offload: replan 2 after 8 prompts: pinned 4 of 4" in first["log"]
    assert ("task scheduler: 8 admitted, 0 request-steps held back, 4 classified by rules"
            in first["log"])
    saved = json.loads(profiles.read_text())["profiles"]
    assert saved["num_layers"] == LAYERS
    routed = {t: sum(table[0]) for t, table in saved["counts"].items()}
    assert routed == tasks["profile_tokens"] and all(v > 0 for v in routed.values())

    # Restart: the profiles load, and the plan is made at the first step, long
    # before replan_every prompts arrived.
    warm_path = task_files / "warm.json"
    shutil.copy(profiles, warm_path)
    second = engine(task_spec(model, task_files, warm_path, replan_every=1000))
    assert_same_outputs(second, plain)
    assert "loaded task profiles of ['chat', 'legal', 'python']" in second["log"]
    assert second["stats"]["tasks"]["replans"] == 1
    assert second["stats"]["tasks"]["planned"] == 4
    again = json.loads(warm_path.read_text())["profiles"]["counts"]  # saved at shutdown
    assert all(sum(again[t][0]) > routed[t] for t in routed)


def test_corrupt_profile_and_rule_files_are_refused(models, engine, task_files):
    model = models["qwen3_moe"]
    bad_profiles = task_files / "bad_profiles.json"
    bad_profiles.write_text('{"format": "vllm-moe-offload-task-profiles/1", "sha256": "0", '
                            '"profiles": {"num_layers": 4}}')
    with pytest.raises(EngineFailed) as e:
        engine(task_spec(model, task_files, bad_profiles))
    assert "is corrupt (checksum mismatch); delete it to start cold" in e.value.output

    bad_rules = task_files / "bad_rules.json"
    bad_rules.write_text('{"rules": [{"task": "python", "regex": ["("]}]}')
    spec = task_spec(model, task_files, task_files / "unused.json")
    spec["offload"]["task_rules_path"] = str(bad_rules)
    with pytest.raises(EngineFailed) as e:
        engine(spec)
    assert "rule 0 (python): bad regular expression" in e.value.output


def test_tpot_admission_holds_requests_back_outputs_unchanged(models, engine, task_files):
    model = models["qwen3_moe"]
    plain = engine(plain_spec(model))
    spec = task_spec(model, task_files, task_files / "slo_profiles.json")
    # At the first step the latency model still has its prior (5 ms per step + 1 ms
    # per request): a batch of 1 is predicted at 6 ms, of 2 at 7 ms. A 6.5 ms TPOT
    # SLO is met by the first request alone and broken by a second one, so the
    # scheduler admits one and holds the other three back.
    spec["extra_args"] = [{"task": "chat", "slo_tpot_ms": 6.5}] * len(PROMPTS)
    out = engine(spec)
    assert out["token_ids"] == plain["token_ids"]
    line = next(l for l in out["log"].splitlines() if "task scheduler:" in l)
    held = int(line.split(" request-steps held back")[0].rsplit(" ", 1)[1])
    assert held >= len(PROMPTS) - 1, line


def test_approximate_mode_reroutes_only_the_insensitive_task(models, engine, task_files):
    model = models["qwen3_moe"]
    plain = engine(plain_spec(model))
    sens = task_files / "sensitivity.json"
    sens.write_text(json.dumps({
        "format": "vllm-moe-offload-sensitivity/1", "model": model, "num_layers": LAYERS,
        "threshold": 0.05, "metric": "hand-made for the test",
        "tasks": {"legal": {"change": [0.0] * LAYERS, "insensitive": list(range(LAYERS))}}}))
    spec = task_spec(model, task_files, task_files / "approx_profiles.json",
                     sensitivity_path=str(sens), approximate=True)
    out = engine(spec)
    totals = out["stats"]["totals"]
    assert totals["rerouted"] > 0
    assert "rerouted (approximate)" in out["log"]
    legal = 2  # the only prompt of the insensitive task
    for i in range(len(PROMPTS)):
        if i != legal:  # exact tasks: token-identical despite sharing the batch
            assert out["token_ids"][i] == plain["token_ids"][i], i
