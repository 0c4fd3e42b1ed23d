"""One syncer per journal: the sync lock, the yield request and the background cooldown.

- **The lock** (:class:`SyncLock`): an exclusive ``flock`` on ``<journal>.sync-lock``,
  whose content names the holder (pid, mode, since). ``sync``, ``flush()``,
  ``doctor --repair`` and the background syncer take it; a crashed holder
  releases it with its process.
- **Yield**: a foreground ``sync`` or ``flush()`` that finds a *background* syncer
  holding the lock touches ``<journal>.sync-yield``; the background syncer checks
  it between requests and gives way.
- **Cooldown**: when the background syncer gives up (API unreachable, key
  refused) it sets the mtime of ``<journal>.sync-cooldown`` to the moment before
  which no new background syncer should start, so a loop that logs while offline
  does not start a process per step. A sync that leaves nothing pending clears it.

Every file name comes from ``JournalFiles``. Only the standard library is
imported: ``running`` and ``in_cooldown`` are on the ``log`` hot path.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import SyncBusy
from .files import JournalFiles

__all__ = ["SyncLock", "in_cooldown", "running", "set_cooldown"]


class SyncLock:
    """The journal's sync lock. ``mode`` (sync, flush, repair, background) is recorded for others to see."""

    def __init__(self, journal_path: str | os.PathLike[str]):
        files = JournalFiles(Path(journal_path))
        self.path = files.sync_lock
        self.yield_path = files.sync_yield
        self._fd: int | None = None

    def try_acquire(self, mode: str = "sync") -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "mode": mode, "since": time.time()}).encode(), 0)
        self._fd = fd
        return True

    def acquire(
        self,
        mode: str = "sync",
        *,
        wait: bool = True,
        timeout: float | None = None,
        on_wait: Callable[[dict[str, Any]], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        """Take the lock; with ``wait`` poll until free (asking a background holder to yield).

        Raises SyncBusy if it is held and ``wait`` is False or ``timeout`` passes.
        """
        if self.try_acquire(mode):
            return
        holder = self.holder()
        if not wait:
            raise SyncBusy(
                f"another syncer (pid {holder.get('pid', '?')}, {holder.get('mode', 'sync')}) is "
                "running on this journal: wait for it, or run `weco observe sync` without --no-wait"
            )
        if on_wait is not None:
            on_wait(holder)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                if self.holder().get("mode") == "background":
                    self.yield_path.touch()
                time.sleep(0.05)
                if self.try_acquire(mode):
                    return
                if should_stop is not None and should_stop():
                    raise SyncBusy("stopped while waiting for another syncer")
                if deadline is not None and time.monotonic() > deadline:
                    raise SyncBusy(f"another syncer (pid {holder.get('pid', '?')}) still holds the journal")
        finally:
            self.yield_path.unlink(missing_ok=True)

    def yield_requested(self) -> bool:
        return self.yield_path.exists()

    def holder(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SyncLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def running(journal_path: str | os.PathLike[str]) -> bool:
    """True if some process holds the journal's sync lock (a probe: tens of microseconds)."""
    try:
        fd = os.open(JournalFiles(Path(journal_path)).sync_lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops our probe lock, if we got it
    return False


def set_cooldown(journal_path: str | os.PathLike[str], seconds: float) -> None:
    """No background syncer is started for ``seconds`` (0 clears it)."""
    path = JournalFiles(Path(journal_path)).sync_cooldown
    if seconds <= 0:
        path.unlink(missing_ok=True)
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    os.close(fd)
    until = time.time() + seconds
    os.utime(path, (until, until))


def in_cooldown(journal_path: str | os.PathLike[str]) -> bool:
    try:
        return os.stat(JournalFiles(Path(journal_path)).sync_cooldown).st_mtime > time.time()
    except OSError:
        return False
