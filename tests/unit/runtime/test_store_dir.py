"""A store directory's files: listed with what uses them, and pruned of what no
engine uses (runtime/store_dir.py, `vllm-moe-offload store`)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.runtime.test_store import FP, LAYOUT, E, L, expert, fill, read, same
from vllm_moe_offload.cli.store import main as store_cli
from vllm_moe_offload.runtime.store import DiskStore, store_file_name
from vllm_moe_offload.runtime import store as store_module
from vllm_moe_offload.runtime.store_dir import (PARTIAL_IDLE_S, is_model, others_of, remove,
                                                removable, scan)

DAY = 86400


def build(directory, **fingerprint):
    fp = dict(FP, **fingerprint)
    store = DiskStore(directory / store_file_name(fp), LAYOUT, L, E, fp)
    fill(store)
    return store


def age(path, days):
    t = time.time() - days * DAY
    os.utime(path, (t, t))


def test_stores_in_use_are_listed_as_such_and_never_pruned(tmp_path):
    old = build(tmp_path, vllm="0.31.0")  # an earlier vLLM's build
    old.close()
    current = build(tmp_path)  # this engine's, held open
    other_model = build(tmp_path, model="other")
    other_model.close()
    files = {f.path: f for f in scan(tmp_path, details=True)}
    assert {f.kind for f in files.values()} == {"store"}  # (lock files are not listed)
    assert [f.in_use for f in (files[old.path], files[current.path])] == [False, True]
    assert "vllm 0.31.0" in files[old.path].detail
    assert [f.path for f in others_of(current.path)] == [old.path]  # not the other model's
    for p in (old.path, current.path, other_model.path):
        age(p, 20)
    chosen = removable(scan(tmp_path), unused_days=14)
    assert sorted(f.path for f in chosen) == sorted([old.path, other_model.path])
    assert [f.path for f in removable(scan(tmp_path), 14, model="tiny")] == [old.path]
    assert removable(scan(tmp_path), unused_days=30) == []
    assert [remove(f) for f in chosen] == [None, None]
    assert not old.path.exists() and not other_model.path.exists()
    assert same(read(current, 1, 2), expert(1, 2))  # the engine's store is untouched


def test_opening_a_store_marks_its_use(tmp_path):
    store = build(tmp_path)
    store.close()
    age(store.path, 20)
    again = DiskStore(store.path, LAYOUT, L, E, FP)
    assert again.reused
    assert time.time() - store.path.stat().st_mtime < 60
    again.close()
    assert removable(scan(tmp_path), unused_days=14) == []


def test_a_store_an_engine_opens_after_the_listing_is_kept(tmp_path):
    store = build(tmp_path)
    store.close()
    (listed,) = removable(scan(tmp_path), unused_days=0)
    engine = DiskStore(store.path, LAYOUT, L, E, FP)  # between the listing and the removal
    assert remove(listed) == "taken meanwhile (an engine or a builder holds it)"
    assert same(read(engine, 0, 1), expert(0, 1))


_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.readline()
"""


def test_a_partial_file_is_removed_only_once_its_builder_is_gone(tmp_path):
    path = tmp_path / store_file_name(FP)
    partial = path.with_suffix(".building")
    partial.write_bytes(b"\0" * 4096)
    age(partial, PARTIAL_IDLE_S / DAY * 2)
    builder = subprocess.Popen([sys.executable, "-c", _HOLDER, f"{path}.lock"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert builder.stdout.readline() == "held\n"
        (f,) = scan(tmp_path)
        assert f.kind == "partial" and f.in_use
        assert removable([f], unused_days=0) == []
    finally:
        builder.communicate("\n")
    (f,) = scan(tmp_path)
    assert not f.in_use and removable([f], unused_days=14) == [f]
    age(partial, 0)  # written a moment ago: a build without a lock, maybe
    assert removable(scan(tmp_path), unused_days=0) == []


def test_the_cli_lists_prunes_and_refuses_bad_values(tmp_path, capsys):
    old = build(tmp_path, vllm="0.31.0")
    old.close()
    current = build(tmp_path)
    assert store_cli([str(tmp_path), "--prune", "--unused-days", "0", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove 1 files" in out and old.path.name in out and old.path.exists()
    assert "| store | 0.00 |" in out and "| yes |" in out  # the engine's, in use
    assert store_cli([str(tmp_path), "--prune", "--unused-days", "0"]) == 0
    assert "removed 1 files" in capsys.readouterr().out
    assert not old.path.exists() and current.path.exists()
    with pytest.raises(SystemExit):
        store_cli([str(tmp_path), "--prune", "--unused-days", "-1"])
    assert "--unused-days -1.0: give 0 or more days" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        store_cli([str(tmp_path / "nowhere")])
    assert "no such directory" in capsys.readouterr().err


def test_the_listing_shows_one_models_files_with_model(tmp_path, capsys):
    """Before, --model narrowed --prune only; the listing showed every model's files."""
    mine, other = build(tmp_path), build(tmp_path, model="other")
    assert store_cli([str(tmp_path), "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    assert mine.path.name in out and other.path.name not in out


def test_a_full_disk_names_the_stores_no_engine_uses(tmp_path, monkeypatch):
    build(tmp_path, vllm="0.31.0").close()

    def enospc(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", enospc)
    with pytest.raises(ValueError) as err:
        DiskStore(tmp_path / store_file_name(FP), LAYOUT, L, E, FP)
    assert "1 stores there that no engine uses take 0.00 GiB" in str(err.value)
    assert "--prune" in str(err.value)


def test_a_hot_set_goes_with_the_last_store_of_its_model(tmp_path):
    current = build(tmp_path)  # a mixed-precision engine's store, open for weeks
    hot = tmp_path / (current.path.name + ".hot.json")
    hot.write_text("{}")
    age(hot, 20)
    assert removable(scan(tmp_path), unused_days=14) == []  # its next start reads it
    current.close()
    age(current.path, 20)
    chosen = removable(scan(tmp_path), unused_days=14)
    assert sorted(f.kind for f in chosen) == ["hot set", "store"]


_PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    (fcntl.lockf if sys.argv[2] == "lockf" else fcntl.flock)(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("free")
except OSError:
    print("busy")
"""


def probe(path, how):
    """Whether another process could take `path`'s lock now."""
    return subprocess.run([sys.executable, "-c", _PROBE, str(path), how],
                          capture_output=True, text=True).stdout.strip()


def test_an_engines_own_scans_leave_its_build_lock_and_its_store_held(tmp_path):
    """A POSIX record lock goes when its process closes any descriptor of the file:
    the start's scan (earlier stores, and a full disk's message) probed the lock
    file of the engine's own build, and released it, so a second instance built
    the same file at once. Nor may a scan's probe drop the shared lock on a store
    the engine reads (NFS emulates flock by record locks)."""
    building = DiskStore(tmp_path / store_file_name(FP), LAYOUT, L, E, FP)
    lock = tmp_path / (building.path.name + ".lock")
    assert probe(lock, "lockf") == "busy"
    others_of(building.path)
    scan(tmp_path)
    scan(tmp_path, details=True)
    assert probe(lock, "lockf") == "busy"  # before: "free"
    fill(building)
    assert probe(lock, "lockf") == "free" and probe(building.path, "flock") == "busy"
    scan(tmp_path, details=True)
    assert probe(building.path, "flock") == "busy"
    building.close()
    assert probe(building.path, "flock") == "free"


def test_a_store_pruned_as_an_engine_opens_it_is_rebuilt(tmp_path, monkeypatch):
    store = build(tmp_path)
    store.close()
    share = store_module.share

    def pruned_meanwhile(fd):  # a prune unlinks it between the open and the lock
        if store.path.exists():
            store.path.unlink()
        share(fd)

    monkeypatch.setattr(store_module, "share", pruned_meanwhile)
    again = DiskStore(store.path, LAYOUT, L, E, FP)
    assert not again.reused and "removed as it was opened" in again.problem
    monkeypatch.setattr(store_module, "share", share)
    fill(again)
    assert same(read(again, 1, 1), expert(1, 1))


def test_a_partial_file_written_since_the_listing_is_kept(tmp_path):
    partial = (tmp_path / store_file_name(FP)).with_suffix(".building")
    partial.write_bytes(b"\0" * 4096)
    age(partial, 1)
    (f,) = removable(scan(tmp_path), unused_days=0)
    age(partial, 0)  # a builder took it over and writes
    assert remove(f) == "changed since it was listed" and partial.exists()


def test_hub_models_are_matched_by_their_cache_directory():
    from pathlib import Path

    from vllm_moe_offload.runtime.store_dir import StoreFile

    snapshot = "/hf/hub/models--Qwen--Qwen3-30B-A3B/snapshots/ad44e777"
    f = StoreFile(Path("/s/ad44e777-0123456789abcdef.experts"), "store", 1, 0.0, 1,
                  False, model=snapshot)
    assert is_model(f, "Qwen/Qwen3-30B-A3B") and is_model(f, snapshot)
    assert is_model(f, "Qwen3-30B-A3B")  # the directory's name, as the help offers
    assert not is_model(f, "Qwen/Qwen3-30B-A3B-Base") and not is_model(f, "Qwen3-8B")
    local = StoreFile(Path("/s/tiny-0123456789abcdef.experts"), "store", 1, 0.0, 1, False,
                      model="/models/tiny")
    assert is_model(local, "/models/tiny") and is_model(local, "tiny")


def test_a_file_prune_cannot_remove_is_named_and_fails_the_command(tmp_path, capsys,
                                                                    monkeypatch):
    from pathlib import Path

    hot = tmp_path / "m-0123456789abcdef.experts.hot.json"
    hot.write_text("{}")
    age(hot, 30)

    def refused(self, missing_ok=False):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", refused)
    assert store_cli([str(tmp_path), "--prune"]) == 1
    out = capsys.readouterr().out
    assert f"could not remove {hot.name}: [Errno 13] Permission denied" in out


def test_prune_of_one_model_leaves_another_of_the_same_directory_name(tmp_path):
    """/a/final and /b/final share a file-name prefix: --model /a/final removed the
    stores of /b/final too (their headers say whose they are)."""
    a = build(tmp_path, model="/a/final")
    b = build(tmp_path, model="/b/final")
    for store in (a, b):
        store.close()
        age(store.path, 20)
    assert [f.path for f in removable(scan(tmp_path, details=True), 14,
                                      model="/a/final")] == [a.path]
    assert sorted(f.path for f in removable(scan(tmp_path, details=True), 14,
                                            model="final")) == sorted([a.path, b.path])


def test_this_process_knows_its_locks_under_any_spelling_of_the_path(tmp_path,
                                                                     monkeypatch):
    """A relative store_dir, or one through a symlink, named the same file otherwise:
    a second engine in the process took the lock its own process held (lockf lets
    the holder's process in) and built the same partial file."""
    from vllm_moe_offload.runtime.store_dir import hold, held, let_go

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    hold(tmp_path / "real" / "m.experts")
    assert held(Path("link") / "m.experts") and held(Path("real/../real/m.experts"))
    let_go(Path("link/m.experts"))
    assert not held(tmp_path / "real" / "m.experts")
