"""Writing a small file whole or not at all (pure Python)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> None:
    """`text` into `path`, its directory made if missing: written to a temporary file
    of this writer's own (another process may be writing the same path), then renamed
    over it, so the name never holds half a file. The file keeps the mode of the one
    it replaces (a new one gets 0644: mkstemp's own 0600 would hide it from other
    users sharing it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
