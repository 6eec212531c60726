"""One process per run folder: a lock file holding the owner's PID.

Two ``hashrec train`` runs writing into one folder would leave one run's config beside the
other's checkpoint. ``RunLock`` takes ``<folder>/.hashrec.lock`` with an exclusive ``flock`` (the
kernel drops it when the owner exits, however it exits) and writes the owner's PID into it, so a
second run is refused with the owner's PID, and a lock left by a dead process is taken over with
a notice.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

__all__ = ["LOCK_NAME", "RunLock", "RunLockedError"]

LOCK_NAME = ".hashrec.lock"


class RunLockedError(RuntimeError):
    """The run folder is held by another live process.

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with RunLock(folder):
    ...     try:
    ...         RunLock(folder).acquire()
    ...     except RunLockedError:
    ...         print("busy")
    busy
    """


class RunLock:
    """Exclusive use of a run folder while the ``with`` block runs.

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with RunLock(folder):
    ...     RunLock(folder).acquire()
    Traceback (most recent call last):
    hashrec.training.runlock.RunLockedError: ... is in use by process ...
    """

    def __init__(self, folder: str | Path, say: Callable[[str], None] | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.say = say
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise RunLockedError(
                    f"{self.folder} is in use by process {owner} (lock file {self.path}); "
                    "wait for it to finish or choose another --out"
                ) from None
            # the holder may have removed the file between our open and flock: retry on the
            # file that is there now
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if previous and self.say is not None:
            self.say(
                f"note: {self.path} was left by process {previous}, which no longer holds it; "
                "taking it over"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: no one else's file
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
