"""Registration: idempotent, flags on vLLM's own parser, config folded into the hash."""

import os
import subprocess
import sys

SCRIPT = r"""
import os
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
from vllm.model_executor.custom_op import op_registry_oot
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm_moe_offload.integration.vllm import register
from vllm_moe_offload.integration.vllm.layer import OffloadedRoutedExperts

register(); register()  # vLLM may load plugins several times per process
assert op_registry_oot["RoutedExperts"] is OffloadedRoutedExperts
# inert until offload is on: no metrics directory for this process's children to inherit
assert "VLLM_MOE_OFFLOAD_METRICS_DIR" not in os.environ
parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
args = parser.parse_args(["--model", "m", "--enable-expert-offload",
                          "--expert-pool-slots", "12", "--expert-store", "disk",
                          "--expert-predictor", "next-gate"])
ea = AsyncEngineArgs.from_cli_args(args)
cfg = ea.additional_config["expert_offload"]
assert cfg["enabled"] and cfg["pool_slots"] == 12 and cfg["store"] == "disk", cfg
assert cfg["predictor"] == "next-gate"
os.environ["VLLM_MOE_OFFLOAD_POOL_SLOTS"] = "99"  # env is below the CLI
ea2 = AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", "m", "--enable-expert-offload"]))
from vllm_moe_offload.integration.vllm.plugin import fold_offload_config
assert fold_offload_config(ea2.additional_config)["expert_offload"]["pool_slots"] == 99
del os.environ["VLLM_MOE_OFFLOAD_POOL_SLOTS"]
ea3 = AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", "m", "--expert-pool-slots", "8"]))
assert ea3.additional_config["expert_offload"]["enabled"]  # a setting means offload
# on/off settings say false too: on the command line, and in a vLLM YAML --config
# (which passes `key: false` as --no-key when that flag exists, and drops it otherwise)
def folded(argv):
    return AsyncEngineArgs.from_cli_args(parser.parse_args(argv)).additional_config[
        "expert_offload"]
cfg = folded(["--model", "m", "--expert-pool-slots", "8", "--no-enable-expert-offload"])
assert cfg["enabled"] is False, cfg
cfg = folded(["--model", "m", "--expert-task-aware", "--expert-task-scheduler", "false"])
assert cfg["task_scheduler"] is False, cfg  # the form this flag was first documented in
import pathlib, tempfile
yaml = pathlib.Path(tempfile.mkdtemp()) / "c.yaml"
yaml.write_text("model: m\nenable-expert-offload: false\nexpert-pool-slots: 64\n"
                "expert-task-aware: true\nexpert-task-scheduler: false\n")
cfg = folded(["--config", str(yaml)])
assert (cfg["enabled"], cfg["task_aware"], cfg["task_scheduler"]) == (False, True, False), cfg
yaml.write_text("model: m\nexpert-task-aware: true\nexpert-task-scheduler: true\n")
cfg = folded(["--config", str(yaml)])
assert (cfg["enabled"], cfg["task_scheduler"]) == (True, True), cfg
yaml.write_text("model: m\nenable_expert_offload: false\nexpert_pool_slots: 64\n"
                "expert_task_aware: true\nexpert_task_scheduler: false\n")  # vLLM takes _
cfg = folded(["--config", str(yaml)])  # (the false ones were dropped: offload stayed on)
assert (cfg["enabled"], cfg["task_aware"], cfg["task_scheduler"]) == (False, True, False), cfg
# a bad value is a usage error that names the flag and its choices, at parse time
import contextlib, io
for argv, words in ((["--expert-store", "nvme"], "invalid choice: 'nvme'"),
                    (["--expert-pool-slots", "abc"], "pool_slots='abc' is not a valid int")):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
        parser.parse_args(["--model", "m", *argv])
        raise AssertionError(f"{argv} parsed")
    assert words in err.getvalue() and argv[0] in err.getvalue(), err.getvalue()
# --api-server-count > 1: vLLM spawns API servers that build engine args from the
# parsed namespace before they load plugins; the flags must reach them even so
import pickle, subprocess, sys
args = parser.parse_args(["--model", "m", "--expert-pool-slots", "12",
                          "--expert-predictor-path", "h.safetensors"])
AsyncEngineArgs.from_cli_args(args)
child = '''
import os, pickle, sys
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
assert not getattr(EngineArgs.create_engine_config, "_moe_offload", False)
ea = AsyncEngineArgs.from_cli_args(pickle.loads(sys.stdin.buffer.read()))
from vllm_moe_offload.integration.vllm.plugin import fold_offload_config
os.environ["VLLM_MOE_OFFLOAD_PREDICTOR"] = "lookahead"  # valid with the flag's path
cfg = fold_offload_config(ea.additional_config)["expert_offload"]
assert (cfg["pool_slots"], cfg["predictor_path"]) == (12, "h.safetensors"), cfg
print("CHILD OK")
'''
out = subprocess.run([sys.executable, "-c", child], input=pickle.dumps(args),
                     capture_output=True)
assert out.stdout.decode().strip().endswith("CHILD OK"), out.stderr.decode()[-3000:]
print("OK")
"""


def test_register_twice_and_flags_reach_additional_config():
    env = dict(os.environ)  # as a fresh process: no metrics directory to inherit (tests
    env.pop("VLLM_MOE_OFFLOAD_METRICS_DIR", None)  # before this one built offload configs)
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.stdout.strip().endswith("OK"), out.stdout[-2000:] + out.stderr[-3000:]
