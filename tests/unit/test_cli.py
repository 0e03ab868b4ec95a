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


def test_the_demo_serves_the_shipped_trained_model(tmp_path):
    from safetensors import safe_open

    from vllm_moe_offload.cli.demo import SHIPPED_MODEL, kv_bytes_per_token
    from vllm_moe_offload.hf.tiny_moe import build_tiny_moe

    config = json.loads((SHIPPED_MODEL / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    with safe_open(SHIPPED_MODEL / "model.safetensors", "pt") as st:  # weights, not a pointer
        assert "model.layers.7.mlp.experts.15.down_proj.weight" in st.keys()
    assert kv_bytes_per_token(str(SHIPPED_MODEL)) == 2 * 8 * 2 * 64 * 2  # K+V, 8 layers, bf16
    assert kv_bytes_per_token(str(build_tiny_moe(  # MLA: not K and V per head
        tmp_path / "dsv3", "deepseek_v3", num_layers=2, num_experts=4))) is None
    bad = run("demo", "--pool-fraction", "0")
    assert bad.returncode == 2 and "--pool-fraction=0.0: give a share" in bad.stderr
    bad = run("demo", "--model", str(tmp_path / "none"), "--max-tokens", "3")
    assert bad.returncode == 2 and "not a checkpoint directory" in bad.stderr
    bad = run("demo", "--max-tokens", "0")  # (both were tracebacks, after vLLM loaded)
    assert bad.returncode == 2 and "--max-tokens=0: give 1 or more" in bad.stderr


def test_eval_predictor_checks_the_sidecar_before_running_the_model(tmp_path, capsys,
                                                                    monkeypatch):
    """Before: the model ran over all the text first, then a TypeError (no path) or an
    error naming the engine's setting (a bad sidecar)."""
    import pytest

    from vllm_moe_offload.cli import eval_predictor
    from vllm_moe_offload.hf import routing
    from vllm_moe_offload.hf.tiny_moe import build_tiny_moe

    text = tmp_path / "t.txt"
    text.write_text("def add(a, b): return a + b\n")
    with pytest.raises(SystemExit):
        eval_predictor.main(["--model", "Qwen/Qwen3-30B-A3B", "--text", str(text)])
    assert "is not a directory with config.json" in capsys.readouterr().err
    model = build_tiny_moe(tmp_path / "m", num_layers=2)
    with pytest.raises(SystemExit):
        eval_predictor.main(["--model", str(model), "--text", str(text)])
    assert "--predictor lookahead needs --predictor-path" in capsys.readouterr().err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a sidecar")
    monkeypatch.setattr(routing, "capture", lambda *a, **k: pytest.fail("model ran"))
    with pytest.raises(SystemExit):
        eval_predictor.main(["--model", str(model), "--text", str(text),
                             "--predictor-path", str(junk), "--depth", "1"])
    assert f"--predictor-path='{junk}' is not a lookahead sidecar" in capsys.readouterr().err


SERVE_PROBE = r"""
import contextlib, io, json, sys
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm_moe_offload.cli import main

def cmd(args):  # stands in for starting the server
    from vllm.engine.arg_utils import AsyncEngineArgs
    args.model = args.model_tag or args.model
    cfg = AsyncEngineArgs.from_cli_args(args).additional_config.get("expert_offload", {})
    print(json.dumps({"model": args.model, "port": args.port,
                      "pool_slots": cfg.get("pool_slots"), "enabled": cfg.get("enabled")}))
ServeSubcommand.cmd = staticmethod(cmd)
for argv in json.loads(sys.argv[1]):
    main(["serve", *argv])
text = io.StringIO()
with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
    main(["serve", "--help=Expert offload"])
print(json.dumps({"help": text.getvalue()}))
"""


def test_serve_takes_vllm_serve_arguments_as_they_are(tmp_path):
    """`vllm-moe-offload serve` parses as `vllm serve` (before, it put --model in front
    of every argument list: --help, --model M, a flag first, --config all failed)."""
    (tmp_path / "c.yaml").write_text("model: M\nport: 8001\nexpert-pool-slots: 64\n")
    # with serve as a subcommand the top-level parser reads the file (vLLM's own CLI
    # does the same): `false` must still reach the serve parser's flag
    (tmp_path / "off.yaml").write_text("model: M\nport: 8001\nexpert-pool-slots: 64\n"
                                       "enable-expert-offload: false\n")
    argvs = [["M", "--port", "8001", "--expert-pool-slots", "64"],
             ["--port", "8001", "M", "--expert-pool-slots", "64"],
             ["--model", "M", "--port", "8001", "--expert-pool-slots", "64"],
             ["--config", "c.yaml"], ["--config", "off.yaml"]]
    out = subprocess.run([sys.executable, "-c", SERVE_PROBE, json.dumps(argvs)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    on = {"model": "M", "port": 8001, "pool_slots": 64, "enabled": True}
    assert lines[:-1] == [on] * (len(argvs) - 1) + [dict(on, enabled=False)]
    assert "--expert-pool-slots" in lines[-1]["help"]
    assert "--no-enable-expert-offload" in lines[-1]["help"]


def test_the_demo_reads_the_moe_shape_of_other_families(tmp_path):
    """DeepSeek-style configs (n_routed_experts, a dense first layer) and a
    vision-language one (text_config): before, a TypeError or a KeyError."""
    from vllm_moe_offload.cli.demo import moe_shape
    from vllm_moe_offload.hf.tiny_moe import build_tiny_moe

    for arch, want in (("deepseek_v2", (2, 8)), ("qwen3_5_moe_vl", (3, 4))):
        path = build_tiny_moe(tmp_path / arch, arch, num_layers=3,
                              num_experts=want[1])
        assert moe_shape(json.loads((path / "config.json").read_text())) == want


def test_lookahead_tools_refuse_bad_depths_and_token_counts_before_the_model_runs(
        tmp_path, capsys, monkeypatch):
    """A depth the model has no layers for was trained and evaluated as '-1 heads'
    and recall 0.000; too few tokens per file ended in a torch.cat traceback."""
    import pytest

    from vllm_moe_offload.cli import eval_predictor, train_lookahead
    from vllm_moe_offload.hf import routing
    from vllm_moe_offload.hf.tiny_moe import build_tiny_moe

    model = build_tiny_moe(tmp_path / "m", num_layers=2)
    text = tmp_path / "t.txt"
    text.write_text("def add(a, b): return a + b\n" * 50)
    monkeypatch.setattr(routing, "load_model", lambda *a: pytest.fail("model loaded"))
    monkeypatch.setattr(train_lookahead, "load_model", lambda *a: pytest.fail("loaded"))
    for tool, argv in ((train_lookahead, ["--out", str(tmp_path / "h"), "--prompts"]),
                       (eval_predictor, ["--predictor", "next-gate", "--text"])):
        for depth in ("0", "2"):
            with pytest.raises(SystemExit):
                tool.main(["--model", str(model), "--depth", depth, *argv, str(text)])
            assert (f"--depth {depth}: this model has 2 MoE layers, so 1 to 1 layers "
                    "ahead") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_lookahead.main(["--model", str(model), "--depth", "1", "--max-tokens", "30",
                              "--out", str(tmp_path / "h"), "--prompts", str(text),
                              str(text)])
    assert "--max-tokens 30: a tenth of it checks the heads" in capsys.readouterr().err


def test_eval_predictor_scores_held_out_text_by_default(tmp_path, capsys):
    """Its default was the whole file, whose start is what train-lookahead trained
    on: recall 0.970 there against 0.837 on held-out text (a review's run). Now a
    file the heads learned from is scored on its last 5% (the part they did not)."""
    from vllm_moe_offload.cli import eval_predictor, train_lookahead
    from vllm_moe_offload.hf.tiny_moe import build_tiny_moe

    model = build_tiny_moe(tmp_path / "m", num_layers=3)
    text = tmp_path / "t.txt"
    text.write_text("".join(f"def f{i}(a, b): return a * {i} + b\n" for i in range(300)))
    heads = tmp_path / "h.safetensors"
    train_lookahead.main(["--model", str(model), "--depth", "1", "--max-tokens", "600",
                          "--epochs", "1", "--hidden-units", "8", "--out", str(heads),
                          "--prompts", str(text)])
    capsys.readouterr()
    argv = ["--model", str(model), "--depth", "1", "--max-tokens", "100000", "--json",
            "--predictor-path", str(heads), "--text", str(text)]
    eval_predictor.main(argv)
    out = capsys.readouterr().out
    assert f"trained on {text}: scoring the last 5% of each" in out
    held_out = json.loads(out.splitlines()[-1])["tokens"]
    eval_predictor.main(argv + ["--part", "all"])
    out = capsys.readouterr().out
    assert f"warning: the heads were trained on {text}; --part all scores them" in out
    assert 0 < 10 * held_out < json.loads(out.splitlines()[-1])["tokens"]  # (its ~5%)
    other = tmp_path / "other.txt"  # a file they never saw: all of it, no warning
    other.write_text(text.read_text())
    eval_predictor.main(argv[:-1] + [str(other)])
    out = capsys.readouterr().out
    assert "trained on" not in out and json.loads(out)["tokens"] > 10 * held_out
