"""One process per resource: one hexiao-hostd per journal (and one sim board per folder).

Rules this module keeps:
- A lock is an flock on a lock file, taken before anything else opens the resource and held for
  the process's life; the kernel drops it when the process dies (SIGKILL included), so a stale
  lock never needs cleaning up, and the file is never unlinked (that would race a new owner).
- The lock file records the owner's pid, so a refusal can say who holds the resource.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


class InstanceError(Exception):
    """Another process holds the lock; the message says which and what to do."""

    def __init__(self, message: str, owner: int | None) -> None:
        super().__init__(message)
        self.owner = owner


class PidLock:
    def __init__(self, path: Path, refusal: str) -> None:
        """`refusal` is the message when held: "{who}" becomes " (pid N)" when known."""
        self.path, self._refusal, self._fd = path, refusal, -1

    def acquire(self) -> PidLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = ""
            with contextlib.suppress(OSError, UnicodeDecodeError):
                owner = os.pread(fd, 32, 0).decode().strip()
            os.close(fd)
            pid = int(owner) if owner.isdigit() else None
            raise InstanceError(self._refusal.format(who=f" (pid {pid})" if pid else ""),
                                pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def journal_lock(journal: Path) -> PidLock:
    return PidLock(journal.with_name(journal.name + ".lock"),
                   f"another hexiao-hostd{{who}} is already using the journal {journal}; stop it "
                   f"first (systemctl stop hexiao-hostd), or give this one its own "
                   f"hostd.state_dir")
