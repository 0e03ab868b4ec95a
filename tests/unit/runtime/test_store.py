import os
import socket
import time

import pytest
import torch

from vllm_moe_offload.runtime.store import (DiskStore, ExpertLayout, HostStore,
                                            StoreFileError, TensorSpec, store_file_name)

LAYOUT = ExpertLayout((TensorSpec((6, 4), torch.bfloat16), TensorSpec((4, 3), torch.bfloat16)))
L, E = 2, 3
FP = {"model": "tiny", "dtype": "bfloat16", "vllm": "test"}


def expert(layer, e):
    g = torch.Generator().manual_seed(layer * 10 + e)
    return [torch.randn(s.shape, generator=g).to(s.dtype) for s in LAYOUT.tensors]


def fill(store):
    for layer in range(L):
        for e in range(E):
            store.put(layer, e, expert(layer, e))
    store.seal()


def empty_slot():
    return [torch.zeros(s.shape, dtype=s.dtype) for s in LAYOUT.tensors]


def test_layout_sizes():
    assert LAYOUT.expert_bytes == (24 + 12) * 2
    assert LAYOUT.record_bytes == 4096


@pytest.mark.parametrize("kind", ["host", "disk"])
def test_round_trip(tmp_path, kind):
    store = (HostStore(LAYOUT, L, E) if kind == "host"
             else DiskStore(tmp_path / "s.experts", LAYOUT, L, E, FP))
    fill(store)
    for layer in range(L):
        for e in range(E):
            dst = empty_slot()
            assert store.read_into(layer, e, dst) == LAYOUT.expert_bytes
            for got, want in zip(dst, expert(layer, e)):
                assert torch.equal(got, want)
    store.close()


def test_disk_store_is_reused_when_valid(tmp_path):
    path = tmp_path / "s.experts"
    fill(DiskStore(path, LAYOUT, L, E, FP))
    again = DiskStore(path, LAYOUT, L, E, FP)
    assert again.reused and again.is_complete()
    dst = empty_slot()
    again.read_into(1, 2, dst)
    assert torch.equal(dst[1], expert(1, 2)[1])


def test_truncated_file_is_rebuilt_not_read(tmp_path):
    path = tmp_path / "s.experts"
    fill(DiskStore(path, LAYOUT, L, E, FP))
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(StoreFileError, match="truncated"):
        DiskStore.validate(_bare(path))
    store = DiskStore(path, LAYOUT, L, E, FP)
    assert not store.reused and "truncated" in store.problem
    with pytest.raises(RuntimeError, match="before the store was sealed"):
        store.read_into(0, 0, empty_slot())
    fill(store)
    assert DiskStore(path, LAYOUT, L, E, FP).reused


def test_stale_file_for_another_model_is_rebuilt(tmp_path):
    path = tmp_path / "s.experts"
    fill(DiskStore(path, LAYOUT, L, E, dict(FP, model="other")))
    store = DiskStore(path, LAYOUT, L, E, FP)
    assert not store.reused and "stale" in store.problem


def test_unsealed_build_is_not_reused(tmp_path):
    path = tmp_path / "s.experts"
    fill(DiskStore(path, LAYOUT, L, E, FP))
    head = bytearray(path.read_bytes())
    i = head.index(b'"sealed": true')
    head[i:i + 14] = b'"sealed":false'
    path.write_bytes(bytes(head))
    store = DiskStore(path, LAYOUT, L, E, FP)
    assert not store.reused and "unsealed" in store.problem


def test_garbage_file_is_not_a_store(tmp_path):
    path = tmp_path / "s.experts"
    path.write_bytes(b"hello" * 1000)
    store = DiskStore(path, LAYOUT, L, E, FP)
    assert not store.reused and "not an expert store" in store.problem


def test_seal_refuses_a_store_with_missing_experts(tmp_path):
    store = DiskStore(tmp_path / "s.experts", LAYOUT, L, E, FP)
    store.put(0, 0, expert(0, 0))
    with pytest.raises(RuntimeError, match="never arrived"):
        store.seal()


def test_unwritable_directory_names_the_setting(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the directory should be
    with pytest.raises(ValueError) as err:
        DiskStore(blocker / "sub" / "s.experts", LAYOUT, L, E, FP)
    assert "store_dir" in str(err.value) and "--expert-store-dir" in str(err.value)


def test_layout_mismatch_is_refused():
    store = HostStore(LAYOUT, L, E)
    with pytest.raises(ValueError, match="do not match"):
        store.put(0, 0, [torch.zeros(6, 4, dtype=torch.bfloat16)])


def test_file_name_depends_on_fingerprint():
    assert store_file_name(FP) != store_file_name(dict(FP, dtype="float16"))
    assert store_file_name(FP).startswith("tiny-")


def _bare(path):
    """A DiskStore object that only knows its path and fingerprint (for validate)."""
    s = DiskStore.__new__(DiskStore)
    s.path, s.num_layers, s.experts_per_layer, s.layout = path, L, E, LAYOUT
    s.fingerprint = dict(FP, layout=LAYOUT.describe(), num_layers=L,
                         experts_per_layer=E, record_bytes=LAYOUT.record_bytes)
    return s


# ---- a self-healing cache of the checkpoint ------------------------------------------

def healing_store(tmp_path):
    path = tmp_path / "s.experts"
    fill(DiskStore(path, LAYOUT, L, E, FP))
    store = DiskStore(path, LAYOUT, L, E, FP)
    assert store.reused
    store.rederive = expert  # the checkpoint's copy of every expert
    return path, store


def record_offset(store, layer, e):
    return store._offset(layer, e)


def read(store, layer, e):
    dst = empty_slot()
    store.read_into(layer, e, dst)
    return dst


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_flipped_bytes_are_caught_re_derived_and_repaired(tmp_path, caplog):
    path, store = healing_store(tmp_path)
    with open(path, "r+b") as f:  # one flipped byte inside expert (1, 2)
        f.seek(record_offset(store, 1, 2) + 5)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert same(read(store, 1, 2), expert(1, 2))
    assert store.repairs == 1
    assert "expert (1, 2): checksum mismatch; re-derived it from the checkpoint" in caplog.text
    assert str(path) in caplog.text
    assert same(read(store, 1, 2), expert(1, 2)) and store.repairs == 1  # repaired on disk
    assert same(read(DiskStore(path, LAYOUT, L, E, FP), 1, 2), expert(1, 2))


def test_truncated_file_under_a_running_store_is_healed(tmp_path):
    path, store = healing_store(tmp_path)
    os.truncate(path, record_offset(store, 1, 1) + 7)
    for layer in range(L):
        for e in range(E):
            assert same(read(store, layer, e), expert(layer, e))
    assert store.repairs == 2  # (1, 1) and (1, 2), the cut-off records


def test_a_failing_read_is_served_from_the_checkpoint(tmp_path, monkeypatch):
    _, store = healing_store(tmp_path)

    def eio(*args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "preadv", eio)
    assert same(read(store, 0, 1), expert(0, 1))
    assert store.repairs == 1


def test_read_only_store_serves_the_checkpoint_and_says_it_could_not_repair(
        tmp_path, caplog, monkeypatch):
    path, store = healing_store(tmp_path)
    with open(path, "r+b") as f:
        f.seek(record_offset(store, 0, 0))
        f.write(b"\0" * 8)
    real_open = os.open

    def read_only(name, flags, *args):  # as on a read-only mount (root writes 0o444 files)
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(30, "Read-only file system", str(name))
        return real_open(name, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    assert same(read(store, 0, 0), expert(0, 0))
    assert store.repairs == 0 and "could not be repaired" in caplog.text
    store.rederive = lambda layer, e: expert(layer, e)
    assert same(read(store, 0, 0), expert(0, 0))  # again, straight from the checkpoint


def test_no_checkpoint_to_re_derive_from_is_an_error_not_garbage(tmp_path):
    path, store = healing_store(tmp_path)
    with open(path, "r+b") as f:
        f.seek(record_offset(store, 0, 2) + 3)
        f.write(b"\x55\xaa")
    store.rederive = None
    with pytest.raises(StoreFileError, match=r"expert \(0, 2\): checksum mismatch, and "
                                              "there is no checkpoint"):
        read(store, 0, 2)

    def gone(layer, e):
        raise FileNotFoundError("model.safetensors")

    store.rederive = gone
    with pytest.raises(StoreFileError, match="re-deriving it from the checkpoint failed "
                                              r"\(model.safetensors\); restore"):
        read(store, 0, 2)


def test_a_re_derived_expert_unlike_the_sealed_record_is_not_served(tmp_path):
    """A checkpoint changed since the build, or read under another layer's names: the
    re-derived copy must have the checksum the build sealed, or it is refused and
    the record is left as it is."""
    path, store = healing_store(tmp_path)
    with open(path, "r+b") as f:
        f.seek(record_offset(store, 1, 0) + 3)
        f.write(b"\x55\xaa")
    damaged = path.read_bytes()
    store.rederive = lambda layer, e: expert(0, e)  # another layer's expert
    with pytest.raises(StoreFileError, match=r"expert \(1, 0\): checksum mismatch, and "
                       "the checkpoint's copy of it differs from the record sealed"):
        read(store, 1, 0)
    assert store.repairs == 0 and path.read_bytes() == damaged
    store.rederive = expert
    assert same(read(store, 1, 0), expert(1, 0)) and store.repairs == 1


def test_a_damaged_checksum_table_has_the_file_rebuilt(tmp_path):
    path = tmp_path / "s.experts"
    fill(DiskStore(path, LAYOUT, L, E, FP))
    store = DiskStore(path, LAYOUT, L, E, FP)
    with open(path, "r+b") as f:  # one checksum of the table at the file's end
        f.seek(-8 * L * E + 2, os.SEEK_END)
        f.write(b"\x01")
    with pytest.raises(StoreFileError, match="its table of checksums is damaged"):
        _bare(path).validate()
    again = DiskStore(path, LAYOUT, L, E, FP)
    assert not again.reused and "table of checksums is damaged" in again.problem
    del store


def test_a_full_disk_leaves_no_file_and_says_how_much_space(tmp_path, monkeypatch):
    def enospc(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", enospc)
    with pytest.raises(ValueError) as err:
        DiskStore(tmp_path / "s.experts", LAYOUT, L, E, FP)
    assert "store_dir" in str(err.value) and "GiB are free" in str(err.value)
    assert "needs 0.00 GiB" in str(err.value) and "--expert-store host" in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["s.experts.lock"]  # no partial store


def test_a_build_killed_midway_is_not_reused(tmp_path):
    path = tmp_path / "s.experts"
    store = DiskStore(path, LAYOUT, L, E, FP)
    store.put(0, 0, expert(0, 0))  # then the process dies: nothing sealed, nothing renamed
    os.close(store._fd)  # what the kernel does then: its descriptors and lock go
    store._unlock()
    assert not path.exists() and path.with_suffix(".building").exists()
    again = DiskStore(path, LAYOUT, L, E, FP)
    assert not again.reused


def test_a_second_build_of_one_path_in_one_process_is_refused(tmp_path):
    """A POSIX lock lets its own process in: a second DiskStore of the path truncated
    the first's partial file (its records read back as zeros), and its abandon
    removed the file and the first build's lock."""
    path = tmp_path / "s.experts"
    first = DiskStore(path, LAYOUT, L, E, FP)
    first.put(0, 0, expert(0, 0))
    with pytest.raises(RuntimeError, match="is building the disk store .* already"):
        DiskStore(path, LAYOUT, L, E, FP)
    for layer in range(L):
        for e in range(E):
            if (layer, e) != (0, 0):
                first.put(layer, e, expert(layer, e))
    first.seal()
    assert same(read(DiskStore(path, LAYOUT, L, E, FP), 0, 0), expert(0, 0))


_BUILDER = """
import os, signal, sys, time
from tests.unit.runtime.test_store import DiskStore, LAYOUT, L, E, FP, expert
store = DiskStore(sys.argv[1], LAYOUT, L, E, FP)
store.put(0, 0, expert(0, 0))
print("building", flush=True)
sys.stdin.readline()  # until the test has seen the other process wait for the lock
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if sys.argv[2] == "abandon":  # its load failed, and the process lives on
    store.abandon()
    print("abandoned", flush=True)
    time.sleep(60)
for layer in range(L):
    for e in range(E):
        store.put(layer, e, expert(layer, e))
store.seal()
"""


def _builder(path, how):
    """Another process building the store at `path`; returns once it has begun. It
    goes on when `_open_while_building` lets it (a line on its stdin)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", _BUILDER, str(path), how],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                                 os.path.dirname(os.path.abspath(__file__))))))
    assert child.stdout.readline() == "building\n"
    return child


def _open_while_building(path, child, caplog):
    """DiskStore(path) opened while `child` builds it: once it says it waits for the
    child's lock, the child goes on (no sleep that a loaded machine outruns)."""
    import threading

    out = {}
    with caplog.at_level("WARNING", logger="vllm.moe_offload"):
        opener = threading.Thread(target=lambda: out.setdefault(
            "store", DiskStore(path, LAYOUT, L, E, FP)))
        opener.start()
        deadline = time.monotonic() + 60
        holder = f"process {child.pid}@{socket.gethostname()}"  # (the host: NFS)
        while f"{holder} is building the disk store" not in caplog.text:
            assert opener.is_alive() and time.monotonic() < deadline, caplog.text
            time.sleep(0.01)
        child.stdin.write("go\n")
        child.stdin.flush()
        opener.join(60)
    return out["store"]


def test_a_second_process_waits_for_the_build_then_reuses_it(tmp_path, caplog):
    path = tmp_path / "s.experts"
    child = _builder(path, "seal")
    # without the lock it truncated the child's file, built and renamed it, so the
    # child's rename failed
    store = _open_while_building(path, child, caplog)
    assert child.wait() == 0
    assert store.reused
    for layer in range(L):
        for e in range(E):
            assert same(read(store, layer, e), expert(layer, e))
    assert store.repairs == 0


def test_a_builder_killed_midway_does_not_block_the_next(tmp_path, caplog):
    path = tmp_path / "s.experts"
    child = _builder(path, "kill")
    store = _open_while_building(path, child, caplog)  # the kernel drops the dead's lock
    assert child.wait() == -9
    assert not store.reused
    fill(store)
    assert same(read(DiskStore(path, LAYOUT, L, E, FP), 1, 2), expert(1, 2))


def test_a_file_system_without_locks_builds_without_one_and_says_so(tmp_path, monkeypatch,
                                                                    caplog):
    import fcntl

    def no_locks(fd, how):
        raise OSError(37, "No locks available")  # ENOLCK: an NFS mount without lockd

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    path = tmp_path / "s.experts"
    with caplog.at_level("WARNING", logger="vllm.moe_offload"):
        fill(DiskStore(path, LAYOUT, L, E, FP))
    assert "without its lock" in caplog.text and "No locks available" in caplog.text
    assert same(read(DiskStore(path, LAYOUT, L, E, FP), 0, 1), expert(0, 1))


def test_an_abandoned_build_gives_back_its_file_and_lock_while_its_process_lives(
        tmp_path):
    """A load that fails in a process that lives on (an in-process engine): the
    worker hook abandons the store, so other instances do not wait on it forever."""
    path = tmp_path / "s.experts"
    child = _builder(path, "abandon")
    try:
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline() == "abandoned\n"
        assert not path.with_suffix(".building").exists()
        store = DiskStore(path, LAYOUT, L, E, FP)  # at once: the lock was given back
        assert child.poll() is None and not store.reused
        fill(store)
    finally:
        child.kill()
        child.wait()
    assert same(read(DiskStore(path, LAYOUT, L, E, FP), 1, 0), expert(1, 0))


def test_abandoning_a_build_that_failed_already_leaves_the_next_builder_s_file(
        tmp_path, monkeypatch):
    """A put that fails (a full disk) gives back the partial file and the lock at
    once; the load's abandon() afterwards must not remove the `.building` file that
    another instance, no longer waiting, has begun since."""
    path = tmp_path / "s.experts"
    store = DiskStore(path, LAYOUT, L, E, FP)

    def full(fd, data, offset):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "pwrite", full)
        with pytest.raises(ValueError, match="GiB are free"):
            store.put(0, 0, expert(0, 0))
    path.with_suffix(".building").write_bytes(b"another instance's build")
    store.abandon()
    assert path.with_suffix(".building").exists()


@pytest.mark.parametrize("kind", ["host", "disk"])
def test_a_store_of_some_experts_holds_those_alone(tmp_path, kind):
    keys = [(1, 2), (0, 1)]
    store = (HostStore(LAYOUT, L, E, keys=keys) if kind == "host"
             else DiskStore(tmp_path / "s.experts", LAYOUT, L, E, FP, keys=keys))
    assert store.nbytes == 2 * LAYOUT.record_bytes and store.missing() == [(0, 1), (1, 2)]
    with pytest.raises(IndexError, match="2 of them"):
        store.put(0, 0, expert(0, 0))
    for key in keys:
        store.put(*key, expert(*key))
    store.seal()
    assert store.contains(1, 2) and not store.contains(0, 0) and store.is_complete()
    for key in keys:
        dst = empty_slot()
        store.read_into(*key, dst)
        assert all(torch.equal(a, b) for a, b in zip(dst, expert(*key)))
    if kind == "disk":
        assert os.path.getsize(store.path) == 4096 + 2 * (LAYOUT.record_bytes + 8)
        assert DiskStore(store.path, LAYOUT, L, E, FP, keys=keys).reused
        other = DiskStore(store.path, LAYOUT, L, E, FP, keys=[(0, 1), (1, 1)])
        assert not other.reused and "stale" in other.problem


def test_a_large_model_s_subset_fits_the_header(tmp_path):
    """48 layers x 128 experts, half of them: the keys go in as a digest."""
    keys = [(l, e) for l in range(48) for e in range(0, 128, 2)]
    store = DiskStore(tmp_path / "big.experts", LAYOUT, 48, 128, FP, keys=keys)
    assert store.nbytes == len(keys) * LAYOUT.record_bytes
    store.close()


# A stand-in for libcuda.so.1: the calls the store makes to page-lock itself, recorded
# (the CUDA driver's signatures; CUresult 0 is success).
FAKE_LIBCUDA = r"""
#include <stddef.h>
#include <stdint.h>
int fail_register = 0, depth = 0, max_depth = 0, retained = 0, registered = 0, lost = 0;
uintptr_t last_ptr = 0; size_t last_size = 0; unsigned last_flags = 0;
uintptr_t unregistered_ptr = 0;
int cuInit(unsigned f) { return 0; }
int cuDeviceGet(int *d, int ordinal) { *d = ordinal; return 0; }
int cuDeviceGetAttribute(int *v, int attr, int d) { *v = attr == 91; return 0; }
int cuDevicePrimaryCtxRetain(void **ctx, int d) { *ctx = (void *)0x1234; retained++; return 0; }
int cuDevicePrimaryCtxRelease_v2(int d) {  /* the last reference resets the context */
    if (--retained == 0) { lost += registered; registered = 0; }
    return 0;
}
int cuCtxPushCurrent_v2(void *ctx) {
    if (ctx != (void *)0x1234) return 201;  /* CUDA_ERROR_INVALID_CONTEXT */
    if (++depth > max_depth) max_depth = depth;
    return 0;
}
int cuCtxPopCurrent_v2(void **ctx) { depth--; *ctx = (void *)0x1234; return 0; }
int cuMemHostRegister_v2(void *p, size_t n, unsigned flags) {
    if (depth != 1) return 201;
    if (fail_register) return 712;  /* CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED */
    last_ptr = (uintptr_t)p; last_size = n; last_flags = flags; registered++;
    return 0;
}
int cuMemHostUnregister(void *p) {
    if (depth != 1) return 201;
    unregistered_ptr = (uintptr_t)p; registered--;
    return 0;
}
"""


@pytest.fixture
def fake_libcuda(tmp_path, monkeypatch):
    import ctypes
    import shutil
    import subprocess

    from vllm_moe_offload.runtime import store

    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build the stand-in driver")
    (tmp_path / "fake_cuda.c").write_text(FAKE_LIBCUDA)
    lib = tmp_path / "libfakecuda.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(tmp_path / "fake_cuda.c")],
                   check=True)
    monkeypatch.setattr(store, "_LIBCUDA", str(lib))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return ctypes.CDLL(str(lib))


def test_the_pinned_store_registers_whole_pages_of_its_own(fake_libcuda):
    """On CUDA the host store page-locks itself through the driver (store.py
    `_page_lock`): whole pages that no other allocation shares, mapped for the
    device, with torch's context current and held (the last reference resets it),
    unlocked when the store goes. Through the
    driver API a refusal leaves the runtime's last error alone (torch would raise it
    at its next kernel launch), and the store falls back to torch's pinning."""
    import ctypes
    import gc

    from vllm_moe_offload.runtime.store import _page_lock, _whole_pages

    def value(name, kind=ctypes.c_int):
        return kind.in_dll(fake_libcuda, name).value

    page = os.sysconf("SC_PAGE_SIZE")
    store = HostStore(LAYOUT, L, E, pin_memory=True)
    data = store._data
    assert value("registered") == 1 and value("last_flags", ctypes.c_uint) == 0x3
    ptr, size = value("last_ptr", ctypes.c_size_t), value("last_size", ctypes.c_size_t)
    assert ptr % page == 0 and size % page == 0
    assert ptr == data.data_ptr() and data.nbytes <= size < data.nbytes + page
    # torch's is_pinned asks the driver about the storage's first byte: it must be
    # the first registered one (a page-aligned slice of a larger tensor had it in the
    # page before, so on CUDA device mode refused every pinned store)
    assert data.untyped_storage().data_ptr() == ptr
    assert data.shape == (L * E, LAYOUT.record_bytes)
    # the store holds the context: released, it would reset and drop the registration
    assert value("max_depth") == 1 and value("depth") == 0 and value("retained") == 1
    fill(store)
    dst = empty_slot()
    store.read_into(1, 2, dst)
    assert all(torch.equal(a, b) for a, b in zip(dst, expert(1, 2)))
    second = HostStore(LAYOUT, L, E, pin_memory=True)  # pages of its own: registered too
    assert value("registered") == 2 and value("retained") == 2 and value("lost") == 0
    del store, data
    gc.collect()
    assert value("unregistered_ptr", ctypes.c_size_t) == ptr
    assert value("registered") == 1 and value("retained") == 1
    del second
    gc.collect()
    assert value("registered") == 0 and value("retained") == 0 and value("lost") == 0
    assert value("depth") == 0

    ctypes.c_int.in_dll(fake_libcuda, "fail_register").value = 1
    owner = type("Owner", (), {})()
    assert not _page_lock(owner, _whole_pages(3 * page + 5))
    assert value("registered") == 0 and value("depth") == 0 and value("retained") == 0


def test_a_short_write_is_a_full_disk(tmp_path, monkeypatch):
    """Where fallocate reserves nothing (copy-on-write file systems), a full disk shows
    as a short write: before, the build sealed a damaged record and said nothing."""
    store = DiskStore(tmp_path / "s.experts", LAYOUT, L, E, FP)
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: real(fd, data[:7], offset))
    with pytest.raises(ValueError, match="GiB are free"):
        store.put(0, 0, expert(0, 0))


def test_a_re_derived_expert_of_the_wrong_shape_fails_its_requests_not_the_engine(
        tmp_path):
    """A checkpoint read transposed has the right number of elements: an exact store
    raised a ValueError naming nothing (the engine died), and a quantized store, whose
    codes depend on element counts alone, encoded and served it."""
    from vllm_moe_offload.runtime.quant import GroupQuant, QuantizedStore
    from vllm_moe_offload.runtime.store import ExpertUnavailable

    source = ExpertLayout((TensorSpec((16, 8), torch.bfloat16),
                           TensorSpec((8, 16), torch.bfloat16)))

    def weights(layer, e):
        g = torch.Generator().manual_seed(layer * 10 + e)
        return [torch.randn(t.shape, generator=g).to(t.dtype) for t in source.tensors]

    for quantized in (False, True):
        path = tmp_path / f"s{int(quantized)}.experts"
        codec = GroupQuant(4, 8, "rtn")
        inner = DiskStore(path, codec.layout(source) if quantized else source, L, E, FP)
        store = QuantizedStore(inner, codec, source) if quantized else inner
        for layer in range(L):
            for e in range(E):
                store.put(layer, e, weights(layer, e))
        store.seal()
        store.rederive = lambda layer, e: [t.t().contiguous() for t in weights(layer, e)]
        with open(path, "r+b") as f:  # damage expert (1, 2)'s record
            f.seek(inner._offset(1, 2) + 3)
            byte = f.read(1)[0]
            f.seek(inner._offset(1, 2) + 3)
            f.write(bytes([byte ^ 0xFF]))
        dst = [torch.empty(t.shape, dtype=t.dtype) for t in source.tensors]
        with pytest.raises(ExpertUnavailable, match=r"expert \(1, 2\).*re-deriving it from "
                                                    r"the checkpoint failed.*do not match"):
            store.read_into(1, 2, dst)
