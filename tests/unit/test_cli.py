"""The front door: `python -m vllm_moe_offload SUBCOMMAND` (= `vllm-moe-offload`)."""

import json
import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "vllm_moe_offload", *args],
                          capture_output=True, text=True, timeout=120)


def test_no_subcommand_lists_them_and_fails():
    out = run()
    assert out.returncode != 0
    for command in ("serve", "demo", "replay", "train-lookahead", "eval-predictor",
                    "sensitivity"):
        assert command in out.stderr


def test_replay_runs_through_the_front_door(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps({"layer": l, "token_idx": t, "topk_ids": [t % 4]})
                               for t in range(4) for l in range(2)))
    out = run("replay", str(trace), "--pool-slots", "2", "--predictor", "none",
              "--policy", "lru,reuse", "--profile", "olmoe-1b-7b-pcie4")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("| olmoe-1b-7b-pcie4 |") == 2
    bad = run("replay", str(trace))
    assert bad.returncode == 2 and "usage: vllm-moe-offload replay" in bad.stderr
