"""Atomic file writes: a crash leaves either the old file or the new one, never a torn file."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes, fsync: bool = True) -> None:
    """Write through a temp file in the same folder (+ fsync), then ``os.replace``.
    The file gets the usual umask permissions (mkstemp would leave it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(obj: object, path: str | Path, indent: int = 2) -> None:
    """``obj`` as indented JSON (trailing newline), written atomically."""
    import json

    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")
