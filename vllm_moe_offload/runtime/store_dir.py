"""A store directory's files: what they are, which are in use, and pruning.

Every change to a disk store's identity (a vLLM upgrade, another dtype, bit width or
kernel) names a new file of the model's full expert size, and the old one stays
(it may be another host's, in a shared directory). This module lists them and
removes what nothing uses:
- `<model>-<digest>.experts`: a sealed store. In use while an engine holds it open:
  each holds a shared `flock` on it (DiskStore), so an exclusive one here fails.
  Its modification time is its last use: an engine touches it when it opens it.
- `.building`: a build's partial file; abandoned when its `.lock` is free (the
  builder died or failed) and it was not written for `PARTIAL_IDLE_S`. Removed
  holding that lock, so no builder starts on it meanwhile.
- `.experts.hot.json`: a mixed-precision hot set, touched when used; removed only
  once no store of its model is left.
- `.experts.lock`: a build's lock file (a few bytes), kept: removing one that a
  waiter has open would let two builders work on one file.
NOTE #1: a POSIX record lock (the build's `lockf`) is dropped when its process
closes *any* descriptor of the file. So this process never opens a file it holds
a lock on (`hold`/`let_go` keep the set): a probe of its own build's lock file
released the build's lock (a second instance then built the same file). The same
goes for a store's flock on NFS, which emulates flock by record locks.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PARTIAL_IDLE_S = 600  # a partial file not written for this long, its lock free: abandoned
KINDS = ("store", "partial", "hot set")

_own: dict[str, int] = {}  # NOTE #1: files this process holds a lock on -> holders
_own_guard = threading.Lock()


def _key(path: Path) -> str:
    """One name per file, however its directory is spelt (relative, a symlink):
    by the name given, two engines of one process missed each other's lock."""
    return os.path.realpath(path)


def hold(path: Path) -> None:
    with _own_guard:
        _own[_key(path)] = _own.get(_key(path), 0) + 1


def let_go(path: Path) -> None:
    with _own_guard:
        n = _own.pop(_key(path), 0) - 1
        if n > 0:
            _own[_key(path)] = n


def held(path: Path) -> bool:
    with _own_guard:
        return _key(path) in _own


@dataclass
class StoreFile:
    path: Path
    kind: str  # "store", "partial" or "hot set"
    nbytes: int
    last_used: float  # seconds since the epoch (modification time)
    inode: int
    in_use: bool
    model: str = ""  # the checkpoint the header names (with `details`)
    detail: str = ""  # what built it: model, vLLM version, dtype, bits, kernel


def model_prefix(store_name: str) -> str:
    """`Qwen3-30B-A3B-0123456789abcdef.experts` -> `Qwen3-30B-A3B-`."""
    return store_name.rsplit("-", 1)[0] + "-"


def scan(directory: str | Path, kinds=KINDS, details: bool = False) -> list[StoreFile]:
    """The directory's store files of `kinds`, oldest use first ([] if there is no
    directory); `details`: read each store's header (what built it)."""
    found = []
    try:
        entries = list(Path(directory).iterdir())
    except FileNotFoundError:
        return []
    for p in entries:
        kind = _kind(p.name)
        if kind not in kinds:
            continue
        try:
            st = p.stat()
        except FileNotFoundError:  # removed meanwhile
            continue
        f = StoreFile(p, kind, st.st_size, st.st_mtime, st.st_ino, _in_use(p, kind))
        if details and kind != "hot set" and not held(p):
            f.model, f.detail = _header(p)
        found.append(f)
    return sorted(found, key=lambda f: (f.last_used, f.path.name))


def _kind(name: str) -> str | None:
    if name.endswith(".experts"):
        return "store"
    if name.endswith(".building"):
        return "partial"
    if name.endswith(".experts.hot.json"):
        return "hot set"
    return None


def _lock_file(partial: Path) -> Path:
    return partial.with_suffix(".experts.lock")


def _in_use(path: Path, kind: str) -> bool:
    """A store held open by an engine, or a partial file whose builder holds its lock."""
    if kind == "hot set":
        return False
    target = _lock_file(path) if kind == "partial" else path
    if held(target):  # NOTE #1: this process's own
        return True
    try:
        fd = _open_to_lock(target)
    except FileNotFoundError:
        return False  # (no lock file: a build without one, or none)
    except OSError:
        return True  # cannot tell: treated as used, never removed
    try:
        _take(fd, kind)
        return False
    except OSError:  # held, or (NFS, a read-only file) cannot tell: used
        return True
    finally:
        os.close(fd)  # (releases what this took)


def _take(fd: int, kind: str) -> None:
    """A partial file's build lock (lockf on its lock file) or a store's exclusive
    flock, without waiting (OSError if another holds it)."""
    lock = fcntl.lockf if kind == "partial" else fcntl.flock
    lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _open_to_lock(path: Path) -> int:
    """Read-write where allowed: NFS emulates flock by record locks, and an
    exclusive one needs a file open for writing."""
    try:
        return os.open(path, os.O_RDWR)
    except PermissionError:
        return os.open(path, os.O_RDONLY)


def _header(path: Path) -> tuple[str, str]:
    """(the checkpoint the header names, what built the file in words)."""
    from vllm_moe_offload.runtime.store import read_header  # (store imports this module)

    try:
        with open(path, "rb") as f:
            meta = read_header(f.read(4096), path)
    except (OSError, ValueError):  # (StoreFileError is a ValueError)
        return "", "unreadable header"
    fp = meta.get("fingerprint", {})
    codec = fp.get("store_codec") or {}
    kernel = fp.get("kernel") or {}
    parts = [str(fp.get("model", "")), f"vllm {fp['vllm']}" if "vllm" in fp else "",
             str(fp.get("dtype", "")).replace("torch.", ""),
             f"{codec['bits']}-bit {codec.get('method', '')}" if "bits" in codec else "",
             " ".join(k if v is True else str(v) for k, v in kernel.items()
                      if v not in (False, None, "")) if isinstance(kernel, dict) else "",
             "" if meta.get("sealed") else "unsealed"]
    return str(fp.get("model", "")), ", ".join(p for p in parts if p)


def is_model(f: StoreFile, model: str) -> bool:
    """Whether `f` is of `model`: a local checkpoint directory, a hub id (its files
    sit in the hub cache's `models--org--name` snapshots) or a directory's name.
    Where the file's header names its checkpoint, by that alone: by the file's name,
    `/a/final` was `/b/final` too, and a prune removed the other model's stores."""
    name = Path(model).name or model
    if f.model:
        if os.path.abspath(os.path.expanduser(model)) == os.path.abspath(f.model):
            return True
        if "/" in model:  # a path or a hub id: not a bare name
            return f"models--{model.strip('/').replace('/', '--')}/" in f.model
        return Path(f.model).name == name or f"--{name}/snapshots/" in f.model
    return model_prefix(f.path.name) == name + "-"


def removable(files: list[StoreFile], unused_days: float, now: float | None = None,
              model: str | None = None) -> list[StoreFile]:
    """What `prune` removes: files not in use, unused for `unused_days` (partial
    files: abandoned), of `model` if given (read with `details`); hot sets only
    with the last store of their model (an engine reads one at its start)."""
    now = time.time() if now is None else now
    mine = [f for f in files if model is None or (f.kind != "hot set" and is_model(f, model))]
    ours = {model_prefix(f.path.name) for f in mine}  # (a hot set has no header: by name)
    out = []
    for f in files:
        if f.in_use or not (f in mine or f.kind == "hot set"
                            and model_prefix(f.path.name) in ours):
            continue
        idle = now - f.last_used
        if idle >= (PARTIAL_IDLE_S if f.kind == "partial" else unused_days * 86400):
            out.append(f)
    kept = {model_prefix(f.path.name) for f in files if f.kind == "store" and f not in out}
    return [f for f in out if f.kind != "hot set" or model_prefix(f.path.name) not in kept]


def remove(f: StoreFile) -> str | None:
    """Remove one listed file unless it changed or was taken since (an engine
    opened it, a builder started); None if removed, else why not. OSError: it
    could not be removed (permissions, say)."""
    if f.kind == "hot set":
        if _changed(f):
            return "used since it was listed"
        f.path.unlink()
        return None
    target = _lock_file(f.path) if f.kind == "partial" else f.path
    try:
        fd = _open_to_lock(target)
    except FileNotFoundError:
        if f.kind == "store":
            return "gone already"
        fd = None  # (a partial without a lock file: its idle time decides)
    try:
        if fd is not None:
            try:
                _take(fd, f.kind)  # held while the file goes
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    return "taken meanwhile (an engine or a builder holds it)"
                raise
        if _changed(f):
            return "changed since it was listed"
        f.path.unlink()
        return None
    finally:
        if fd is not None:
            os.close(fd)


def _changed(f: StoreFile) -> bool:
    try:
        st = f.path.stat()
    except FileNotFoundError:
        return True
    return (st.st_ino, st.st_mtime) != (f.inode, f.last_used)


def prune(directory: str | Path, files: list[StoreFile]):
    """Remove `files` (from `removable`): stores and partial files first, then the
    hot sets whose model has no store left. Returns (removed, [(kept, why)],
    [(failed, error)])."""
    removed, kept, failed = [], [], []
    for f in sorted(files, key=lambda f: f.kind == "hot set"):
        if f.kind == "hot set" and model_prefix(f.path.name) in {
                model_prefix(g.path.name) for g in scan(directory, kinds=("store",))}:
            kept.append((f, "a store of its model is left"))
            continue
        try:
            why = remove(f)
        except OSError as e:
            failed.append((f, str(e)))
            continue
        (removed.append(f) if why is None else kept.append((f, why)))
    return removed, kept, failed


def others_of(path: Path) -> list[StoreFile]:
    """Stores of the same model as `path` beside it that no engine uses (earlier
    builds). Stores only: NOTE #1."""
    prefix = model_prefix(path.name)
    return [f for f in scan(path.parent, kinds=("store",)) if not f.in_use
            and f.path != path and model_prefix(f.path.name) == prefix]


def share(fd: int) -> None:
    """A shared lock on an opened store for as long as `fd` is open (so `prune`
    leaves it); waits out a prune's exclusive one, which it holds a moment."""
    for _ in range(50):
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(0.02)
        except OSError:
            return  # (no flock here: unprotected, as before)
    logging.getLogger("vllm.moe_offload").warning(
        "expert offload: a store file stayed locked by a prune for 1 s; serving it "
        "without the shared lock that keeps prune away from it")


RAM_FILE_SYSTEMS = ("tmpfs", "ramfs")  # a "disk" store there is in memory after all


def file_system_of(path) -> str:
    """The file system type of `path` (from /proc/mounts: the longest mount prefix)."""
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split()[1:3] for line in f]
    except OSError:
        return "?"
    path = os.path.realpath(path)
    best = max((m for m in mounts if path == m[0] or path.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=("", "?"))
    return best[1]


def touch(path: Path) -> None:
    """Its time of last use, where the file is ours to touch."""
    try:
        os.utime(path)
    except OSError:
        pass  # (a read-only directory, another user's file)
