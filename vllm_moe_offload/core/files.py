"""Writing a small file whole or not at all (pure Python)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_UMASK = os.umask(0)  # read once, at import (os has no getter)
os.umask(_UMASK)


def write_text_atomic(path: str | Path, text: str) -> None:
    """`text` into `path`, its directory made if missing: written to a temporary file
    of this writer's own (another process may be writing the same path), then renamed
    over it, so the name never holds half a file. The file keeps the mode of the one
    it replaces (a new one: 0666 less the umask, as open() gives; mkstemp's own 0600
    would hide it from other users sharing it)."""
    path = Path(os.path.realpath(path))  # a symlink's target, not the link replaced
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o666 & ~_UMASK
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # (a crash after the rename: not an empty file)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
