"""Run one vLLM engine in its own process and print what it did as JSON.

    python -m vllm_moe_offload.cli.engine_probe '{"model": ..., "offload": {...} | null, ...}'

Tests and benchmarks start every engine configuration this way, so each starts
clean and one at a time. Prints one line `RESULT <json>`: greedy token ids and
texts, offload stats (with the worker's RSS), the KV-cache capacity in tokens,
and the timed generation (when `timed` is set: one warm-up batch, then `repeats`
timed batches; stats["timed"] holds the counters of the timed batches alone).
`setup`: "module:function" (or several, comma-separated), called in the engine's
process before the engine is built (tests/e2e/quant_reference.py puts a reference
in place of a vLLM kernel).

`run_in_subprocess` does not start a new interpreter per engine: importing vLLM
takes ~9 s of an in-process engine's ~15 s on this machine. One fork server
(`--fork-server`) imports vLLM once, and every engine runs in a fork of it: a
fresh process as before (its own environment, patches and exit), minus the import.
"""

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path


class EngineFailed(Exception):
    """The engine process ended without a result; `output` is everything it printed."""

    def __init__(self, output: str):
        super().__init__(output[-3000:])
        self.output = output


def run_in_subprocess(spec: dict, env: dict | None = None, timeout: int = 900) -> dict:
    """Run `spec` in a process of its own (a fork of the fork server); return its
    RESULT (+ log). `env` overrides this process's environment; a value of None
    unsets the variable. TRITON_INTERPRET=1 (device mode on the CPU, in Triton's
    interpreter) must be set before Triton is imported: such specs fork from a
    second server that imported vLLM with it."""
    full_env = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    from vllm_moe_offload.runtime.modes import triton_interpreter

    interpret = triton_interpreter(full_env)
    output = _ForkServer.get(interpret).run(spec, full_env, timeout)
    for line in output.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT "):]), log=output)
    raise EngineFailed(output)


class _ForkServer:
    """Client side: one server process per client process and interpreter setting,
    started on first use."""
    _instances: dict[bool, "_ForkServer"] = {}

    def __init__(self, interpret: bool):
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        if interpret:
            env["TRITON_INTERPRET"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_moe_offload.cli.engine_probe", "--fork-server"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        atexit.register(self.proc.kill)

    @classmethod
    def get(cls, interpret: bool = False) -> "_ForkServer":
        server = cls._instances.get(interpret)
        if server is None or server.proc.poll() is not None:
            server = cls._instances[interpret] = cls(interpret)
        return server

    def run(self, spec: dict, env: dict, timeout: int) -> str:
        self.proc.stdin.write(json.dumps({"spec": spec, "env": env, "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise EngineFailed(f"the engine fork server exited ({self.proc.wait()})")
        return json.loads(line)["output"]


def fork_server() -> None:
    """Import vLLM once; run each request line's spec in a fork; reply with its output."""
    reply = os.fdopen(os.dup(1), "w")  # requests' replies; fd 1 takes the logs instead
    os.dup2(2, 1)
    import vllm  # noqa: F401  (the slow part, once)
    from vllm import LLM  # noqa: F401

    for line in sys.stdin:
        request = json.loads(line)
        fd, out_path = tempfile.mkstemp(prefix="engine_probe_", suffix=".log")
        pid = os.fork()
        if pid == 0:
            _run_child(request, fd)
        os.close(fd)
        status = _wait(pid, request["timeout"])
        output = Path(out_path).read_text(errors="replace")
        os.unlink(out_path)
        if status is None:
            output += f"\nengine_probe: timed out after {request['timeout']} s (killed)"
        reply.write(json.dumps({"output": output}) + "\n")
        reply.flush()


def _run_child(request: dict, fd: int) -> None:
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.clear()
    os.environ.update(request["env"])
    code = 0
    try:
        result = main(request["spec"])
        print("RESULT " + json.dumps(result), flush=True)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()  # as at a normal exit: shutdown summaries, clean-ups
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pid: int, timeout: float) -> int | None:
    """The child's exit status, or None after killing it at `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.05)


def damage_store(path: str, how: str, record: int | None = None,
                 record_bytes: int | None = None) -> None:
    """Damage a disk store file under the running engine: 'flip' one byte in every
    4 KiB of expert records (of record number `record` alone, if given), 'truncate'
    it to half, 'remove' it, 'eio': the next 16 reads in this process fail with an
    I/O error (an in-process engine's worker reads here), or 'readonly': 'flip', and
    opening the file for writing fails in this process as on a read-only mount
    (root ignores file modes, so a chmod would not do)."""
    from vllm_moe_offload.runtime.store import read_header

    size = os.path.getsize(path)
    with open(path, "rb") as f:  # the header's page
        meta = read_header(f.read(4096), path)
    records = (size - 4096) // (meta["fingerprint"]["record_bytes"] + 8)
    start, end = 4096, 4096 + records * meta["fingerprint"]["record_bytes"]  # not the table
    if record is not None:
        start += record * record_bytes
        end = start + record_bytes
    if how == "truncate":
        os.truncate(path, size // 2)
    elif how == "remove":
        os.remove(path)
    elif how == "eio":
        real, failures = os.preadv, iter(range(16))

        def failing_preadv(fd, buffers, offset, *args):
            if next(failures, None) is not None:
                raise OSError(5, "Input/output error")
            return real(fd, buffers, offset, *args)

        os.preadv = failing_preadv
    else:
        if how == "readonly":
            real_open = os.open

            def read_only(name, flags, *args, **kwargs):
                if os.fspath(name) == path and flags & (os.O_WRONLY | os.O_RDWR):
                    raise OSError(30, "Read-only file system", path)
                return real_open(name, flags, *args, **kwargs)

            os.open = read_only
        with open(path, "r+b") as f:
            for offset in range(start + 17, end, 4096):
                f.seek(offset)
                byte = f.read(1)
                f.seek(offset)
                f.write(bytes([byte[0] ^ 0x5A]))


def hide_checkpoint(model_dir: str):
    """Rename the checkpoint's weight files away; returns the function that puts
    them back (the store then has nothing to re-derive from)."""
    hidden = []
    for f in Path(model_dir).glob("*.safetensors"):
        f.rename(f.with_name(f.name + ".hidden"))
        hidden.append(f)

    def restore():
        for f in hidden:
            f.with_name(f.name + ".hidden").rename(f)
    return restore


def main(spec: dict) -> dict:
    if spec.get("in_process"):  # engine core and worker in this process: starts in ~3 s
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if spec.get("kv_cache_gib", 1) is not None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.get("kv_cache_gib", 1)))
    if spec.get("setup"):  # "module:function[,...]", called before the engine is built
        import importlib
        for item in spec["setup"].split(","):
            module, _, func = item.partition(":")
            getattr(importlib.import_module(module), func)()
    from vllm import LLM, SamplingParams

    import vllm_moe_offload

    kwargs = dict(model=spec["model"], max_model_len=spec.get("max_model_len", 512),
                  gpu_memory_utilization=spec.get("gpu_memory_utilization", 0.5),
                  enforce_eager=spec.get("enforce_eager", True), seed=0,
                  load_format=spec.get("load_format", "auto"))
    if spec.get("speculative_config"):
        kwargs["speculative_config"] = spec["speculative_config"]
        kwargs["disable_log_stats"] = False  # its acceptance counters are reported
    if spec.get("quantization"):  # vLLM's own (online) quantization of the checkpoint
        kwargs["quantization"] = spec["quantization"]
    if spec.get("language_model_only"):  # a vision-language model, its text part only
        kwargs["language_model_only"] = True
    if spec.get("max_num_seqs"):  # requests decoded together: the batch size
        kwargs["max_num_seqs"] = spec["max_num_seqs"]
    if spec.get("offload") is not None:
        kwargs["additional_config"] = {"expert_offload": spec["offload"]}
    llm = LLM(**kwargs)
    cache = llm.llm_engine.vllm_config.cache_config
    logprobs = spec.get("logprobs")  # top-N log-probabilities of every output token
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 24),
                            ignore_eos=True, logprobs=logprobs)
    if spec.get("extra_args"):  # per prompt: task / SLO fields, or None
        params = [SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 24),
                                 ignore_eos=True, logprobs=logprobs, extra_args=args)
                  for args in spec["extra_args"]]
    repeats = spec.get("repeats", 1) if spec.get("timed") else spec.get("rounds", 1)
    if spec.get("timed"):
        llm.generate(spec["prompts"], params, use_tqdm=False)  # warm-up
        before = vllm_moe_offload.get_stats(llm).get("totals", {})
    start = time.perf_counter()
    repeat_seconds, rounds, restore = [], [], None
    for i in range(repeats):  # the same batch again: more time measured, less noise
        t0 = time.perf_counter()
        outputs = llm.generate(spec["prompts"], params, use_tqdm=False)
        repeat_seconds.append(time.perf_counter() - t0)
        rounds.append({"token_ids": [list(o.outputs[0].token_ids) for o in outputs],
                       "finish_reasons": [o.outputs[0].finish_reason for o in outputs],
                       "logprobs": _logprobs(outputs) if logprobs else None})
        if spec.get("damage_store") and i == 0:  # fault tests: the next batch reads it
            pool = vllm_moe_offload.get_stats(llm)["pool"]
            damage_store(pool["store_path"], spec["damage_store"], spec.get("damage_record"),
                         pool["record_bytes"])
            if spec.get("hide_checkpoint"):  # nothing to re-derive from, for one round
                restore = hide_checkpoint(spec["model"])
        elif restore is not None:
            restore()
            restore = None
    if restore is not None:
        restore()
    seconds = time.perf_counter() - start
    stats = vllm_moe_offload.get_stats(llm)
    exposition = None
    if spec.get("metrics"):  # what /metrics would serve, from this process's registry
        from prometheus_client import REGISTRY, generate_latest

        time.sleep(0.5)  # the worker's last snapshot is at most 0.2 s behind
        exposition = generate_latest(REGISTRY).decode()
    if spec.get("timed") and before:  # report the timed batches alone
        stats["timed"] = {k: stats["totals"][k] - before.get(k, 0)
                          for k in ("hits", "misses", "bytes_loaded", "load_seconds",
                                    "stall_seconds", "prefetched", "prefetch_hits",
                                    "prefetch_wasted")}
        earlier = before.get("predictions", {})
        stats["timed"]["recall"] = {  # per distance, of the timed batches alone
            d: (p["correct"] - earlier.get(d, {}).get("correct", 0))
            / max(1, p["routed"] - earlier.get(d, {}).get("routed", 0))
            for d, p in stats["totals"].get("predictions", {}).items()}
    return {
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "texts": [o.outputs[0].text for o in outputs],
        "logprobs": _logprobs(outputs) if logprobs else None,
        "prompt_lens": [len(o.prompt_token_ids) for o in outputs],
        "generated_tokens": repeats * sum(len(o.outputs[0].token_ids) for o in outputs),
        "gen_seconds": seconds,
        "repeat_seconds": repeat_seconds,  # per batch: a median resists noise
        "rounds": rounds,  # per batch: token ids and finish reasons
        "kv_cache_tokens": (cache.num_gpu_blocks or 0) * cache.block_size,
        "stats": stats,
        "metrics": exposition,
        "spec": spec_counts(llm) if spec.get("speculative_config") else None,
    }


def _logprobs(outputs) -> list:
    """Per prompt, per output token: [[token id, logprob], ...] of the top N."""
    return [[sorted([t, lp.logprob] for t, lp in step.items())
             for step in o.outputs[0].logprobs] for o in outputs]


def spec_counts(llm) -> dict:
    """vLLM's speculative-decoding counters: tokens proposed and accepted."""
    out = {"draft_tokens": 0, "accepted_tokens": 0}
    for m in llm.get_metrics():
        for key in out:
            if m.name == f"vllm:spec_decode_num_{key}":
                out[key] += m.value
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["--fork-server"]:
        fork_server()
    else:
        result = main(json.loads(sys.argv[1]))
        print("RESULT " + json.dumps(result), flush=True)
