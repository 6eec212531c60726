"""Atomic file writes: a crash or a kill mid-write never leaves a half-written output.

Every output of hashrec (checkpoints, metrics, tables, configs) goes through ``write_atomic``:
the bytes go to a temporary file beside the target, named ``.<name>.<pid>.tmp`` (unique per
process), are flushed and fsynced, and the file is renamed over the target (atomic on POSIX).
The temporary file is removed on every error path; one left behind by a killed process (whose
PID no longer runs) is swept by the next write to the same target.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["write_atomic", "write_bytes_atomic", "write_json_atomic", "write_text_atomic"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _sweep_stale(path: Path) -> None:
    """Remove temporaries of ``path`` left by processes that no longer run."""
    prefix = f".{path.name}."
    if not path.parent.is_dir():
        return
    for p in path.parent.iterdir():
        if not (p.name.startswith(prefix) and p.name.endswith(".tmp")):
            continue
        pid = p.name[len(prefix) : -len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            p.unlink(missing_ok=True)


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` to fill a temporary file, fsync it, rename it over ``path``.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> write_atomic(d / "a.txt", lambda tmp: tmp.write_text("hello"))
    >>> (d / "a.txt").read_text(), sorted(p.name for p in d.iterdir())
    ('hello', ['a.txt'])
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, expected a file path")
    _sweep_stale(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # some filesystems refuse fsync on a folder; the data itself is synced
        pass


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: str | Path, obj: object) -> None:
    """``obj`` as indented JSON (numpy scalars and tensors converted), atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default))


def _json_default(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    if hasattr(o, "tolist"):  # torch tensors, numpy arrays (torch not imported here)
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
