"""Shared by every test directory. VLLM_MOE_OFFLOAD_TEST_SHARD=i/n keeps every n-th
test from the i-th: scripts/gpu_checks runs the device-mode CUDA tests as n
processes at once, since compiling their Triton kernels on a fresh machine is most
of their time."""

import os

import pytest

SHARD_ENV = "VLLM_MOE_OFFLOAD_TEST_SHARD"


def pytest_collection_modifyitems(config, items):
    shard = os.environ.get(SHARD_ENV)
    if not shard:
        return
    parts = shard.split("/")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or \
            int(parts[0]) >= int(parts[1]):
        raise pytest.UsageError(f"{SHARD_ENV}={shard!r} is not i/n with 0 <= i < n "
                                "(e.g. 0/4)")
    i, n = int(parts[0]), int(parts[1])
    keep = items[i::n]
    config.hook.pytest_deselected(items=[t for k, t in enumerate(items) if k % n != i])
    items[:] = keep
