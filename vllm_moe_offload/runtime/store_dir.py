"""A store directory's files: what they are, which are in use, and pruning.

Every change to a disk store's identity (a vLLM upgrade, another dtype, bit width or
kernel) names a new file of the model's full expert size, and the old one stays
(it may be another host's, in a shared directory). This module lists them and
removes what nothing uses:
- `<model>-<digest>.experts`: a sealed store. In use while an engine holds it open:
  each holds a shared `flock` on it (DiskStore), so an exclusive one here fails.
  Its modification time is its last use: an engine touches it when it opens it.
- `.building`: a build's partial file; abandoned when its `.lock` is free (the
  builder died or failed) and it was not written for `PARTIAL_IDLE_S`.
- `.experts.hot.json`: a mixed-precision hot set, touched when used; kept while a
  store of its model stays.
- `.experts.lock`: a build's lock file (a few bytes), kept: removing one that a
  waiter has open would let two builders work on one file.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

PARTIAL_IDLE_S = 600  # a partial file not written for this long, its lock free: abandoned


@dataclass
class StoreFile:
    path: Path
    kind: str  # "store", "partial" or "hot set"
    nbytes: int
    last_used: float  # seconds since the epoch (modification time)
    in_use: bool
    detail: str  # what built it: vLLM version, dtype, store codec, kernel


def model_prefix(store_name: str) -> str:
    """`Qwen3-30B-A3B-0123456789abcdef.experts` -> `Qwen3-30B-A3B-`."""
    return store_name.rsplit("-", 1)[0] + "-"


def scan(directory: str | Path) -> list[StoreFile]:
    """The directory's store files, oldest use first ([] if there is no directory)."""
    found = []
    try:
        entries = list(Path(directory).iterdir())
    except FileNotFoundError:
        return []
    for p in entries:
        kind = _kind(p.name)
        if kind is None:
            continue
        try:
            st = p.stat()
        except FileNotFoundError:  # removed meanwhile
            continue
        found.append(StoreFile(p, kind, st.st_size, st.st_mtime, _in_use(p, kind),
                               _detail(p) if kind == "store" else ""))
    return sorted(found, key=lambda f: (f.last_used, f.path.name))


def _kind(name: str) -> str | None:
    if name.endswith(".experts"):
        return "store"
    if name.endswith(".building"):
        return "partial"
    if name.endswith(".experts.hot.json"):
        return "hot set"
    return None


def _in_use(path: Path, kind: str) -> bool:
    """A store held open by an engine, or a partial file whose builder holds its lock."""
    if kind == "hot set":
        return False
    lock = path.with_suffix(".experts.lock") if kind == "partial" else None
    try:
        fd = _open_to_lock(lock or path)
    except FileNotFoundError:
        return False  # (no lock file: a build without one, or none)
    except OSError:
        return True  # cannot tell: treated as used, never removed
    try:
        if lock:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:  # held, or (NFS, a read-only file) cannot tell: used
        return True
    finally:
        os.close(fd)  # (releases what this took)


def _open_to_lock(path: Path) -> int:
    """Read-write where allowed: NFS emulates flock by record locks, and an
    exclusive one needs a file open for writing."""
    try:
        return os.open(path, os.O_RDWR)
    except PermissionError:
        return os.open(path, os.O_RDONLY)


def _detail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
        n = int.from_bytes(head[8:12], "little")
        meta = json.loads(head[12:12 + n])
    except (OSError, ValueError):
        return "unreadable header"
    fp = meta.get("fingerprint", {})
    codec = fp.get("store_codec") or {}
    kernel = fp.get("kernel") or {}
    parts = [str(fp.get("model", "")), f"vllm {fp['vllm']}" if "vllm" in fp else "",
             str(fp.get("dtype", "")).replace("torch.", ""),
             f"{codec['bits']}-bit {codec.get('method', '')}" if "bits" in codec else "",
             " ".join(k if v is True else str(v) for k, v in kernel.items()
                      if v not in (False, None, "")) if isinstance(kernel, dict) else "",
             "" if meta.get("sealed") else "unsealed"]
    return ", ".join(p for p in parts if p)


def removable(files: list[StoreFile], unused_days: float, now: float | None = None,
              model: str | None = None) -> list[StoreFile]:
    """What `prune` removes: files not in use, unused for `unused_days` (partial
    files: abandoned), of `model` (a file name prefix) if given. A hot set goes
    only with the last store of its model: an engine reads it at start only."""
    now = time.time() if now is None else now
    out = []
    for f in files:
        if f.in_use or (model and model_prefix(f.path.name) != model_prefix_of(model)):
            continue
        idle = now - f.last_used
        if idle >= (PARTIAL_IDLE_S if f.kind == "partial" else unused_days * 86400):
            out.append(f)
    kept = {model_prefix(f.path.name) for f in files if f.kind == "store" and f not in out}
    return [f for f in out if f.kind != "hot set" or model_prefix(f.path.name) not in kept]


def model_prefix_of(model: str) -> str:
    return (Path(model).name or model) + "-"


def remove(f: StoreFile) -> bool:
    """Remove one file unless an engine took it meanwhile; True if removed."""
    if f.kind == "store":
        try:
            fd = _open_to_lock(f.path)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while it goes
            f.path.unlink()
            return True
        except OSError:
            return False
        finally:
            os.close(fd)
    if f.kind == "partial" and _in_use(f.path, f.kind):
        return False
    f.path.unlink(missing_ok=True)
    return True


def others_of(path: Path) -> list[StoreFile]:
    """Stores of the same model as `path` beside it that no engine uses (earlier builds)."""
    prefix = model_prefix(path.name)
    return [f for f in scan(path.parent) if f.kind == "store" and not f.in_use
            and f.path != path and model_prefix(f.path.name) == prefix]


def mark_used(path: Path, fd: int | None = None) -> None:
    """An engine opened a sealed store (`fd`) or a hot set: its time of last use
    (where the file is ours to touch), and a store's shared lock for as long as `fd`
    is open, so `prune` leaves it."""
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        pass  # (a prune removing it now: this engine keeps its open file)
    try:
        os.utime(path)
    except OSError:
        pass  # (a read-only directory, another user's file)
