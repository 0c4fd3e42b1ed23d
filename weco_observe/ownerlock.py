"""The owner lock of a journal on a shared filesystem: a directory, not an ``fcntl`` lock.

In cluster mode one process at a time may write ``journal.db`` (merge segments,
sync, serve views). ``fcntl`` and ``flock`` locks are local to each client on
``nolock`` NFS, Lustre ``localflock`` and sshfs, so the lock is a directory,
``journal.db.owner/``, made whole under a name of its own and renamed into place
(a rename onto a folder that exists fails, atomically, on every filesystem here). It
holds ``owner.json``: host, pid, a random token, the owner's mode and a heartbeat
counter that a thread rewrites in place every :data:`HEARTBEAT` seconds (in
place, so a reader's ``open`` revalidates it under NFS close-to-open).

- **Stale owners.** On the same host an owner whose pid is gone is stale at once.
  From another host a waiter watches the heartbeat with its own clock, and
  declares the owner stale after :data:`STALE` seconds without a change: no
  clocks are compared across hosts.
- **Takeover.** The waiter first makes ``journal.db.owner.break-<token>`` with
  ``mkdir``, so only one waiter breaks a given owner; it moves the stale folder
  aside, checks that what it moved carries the token it judged stale (putting it
  back otherwise), removes it, and competes for the lock like anyone else.
- **Fencing.** :meth:`OwnerLock.check` re-reads the token; an owner calls it before
  each commit and stops when the lock is no longer its own.
- **Giving way.** A waiter asks a background owner to yield by creating
  ``yield`` inside the folder.

See docs/cluster.md for the whole design.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import SyncBusy

__all__ = ["HEARTBEAT", "STALE", "LockLost", "OwnerLock"]

#: seconds between heartbeats of a live owner
HEARTBEAT = 2.0
#: seconds without a heartbeat after which an owner on another host is presumed dead
STALE = 30.0
_INFO = "owner.json"
_YIELD = "yield"


class LockLost(SyncBusy):
    """The owner lock was taken over (this process was presumed dead): it must stop writing."""


def _host() -> str:
    return socket.gethostname()


def _read_info(directory: Path) -> dict[str, Any] | None:
    try:
        with open(directory / _INFO, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _name_taken(exc: OSError, target: Path) -> bool:
    """Whether a rename of a folder onto ``target`` failed because another process made it first:
    EEXIST or ENOTEMPTY, or, as SFTP says it (sshfs: a rename onto a folder is a "failure"),
    EPERM, EACCES or EBUSY with ``target`` there."""
    if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
        return True
    return exc.errno in (errno.EPERM, errno.EACCES, errno.EBUSY) and os.path.lexists(target)


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OwnerLock:
    """The owner lock directory of one journal (``<journal>.owner``).

    >>> lock = OwnerLock(tmp / "journal.db")
    >>> lock.acquire("merge", timeout=30)
    >>> lock.holder()["mode"]
    'merge'
    >>> lock.check()  # before each commit: raises LockLost once another process took it over
    >>> lock.release()
    """

    def __init__(self, journal_path: str | os.PathLike[str], *, stale: float = STALE, heartbeat: float = HEARTBEAT):
        db = Path(journal_path)
        self.path = db.with_name(db.name + ".owner")
        self.stale = stale
        self.heartbeat = heartbeat
        self.token: str | None = None
        self.mode = ""
        self._beat = 0
        self._since = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- holding it ----------------------------------------------------------------

    def _write_info(self, directory: Path | None = None) -> None:
        """Rewrite owner.json in place (same inode) and fsync it."""
        data = {
            "host": _host(),
            "pid": os.getpid(),
            "token": self.token,
            "mode": self.mode,
            "since": self._since,
            "beat": self._beat,
        }
        blob = (json.dumps(data) + "\n").encode()
        fd = os.open((directory or self.path) / _INFO, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.pwrite(fd, blob.ljust(256), 0)  # fixed size: a reader never sees a shorter file with old bytes
            os.fsync(fd)
        finally:
            os.close(fd)

    def try_acquire(self, mode: str = "owner") -> bool:
        """Take the lock if it is free (or its owner is dead on this host); never waits.

        The lock folder is made whole under a name of its own, owner.json inside, then renamed
        into place. A rename onto a folder that exists fails (the lock is never an empty
        folder), so only one process takes it; and no one ever sees the lock without its
        owner.json. An owner killed while taking it leaves only its own ``.new-`` folder, not
        a lock that no one could judge (no host, no pid) before :data:`STALE` had passed."""
        for _ in range(3):
            if os.path.lexists(self.path):
                info = _read_info(self.path)
                if info is None or info.get("host") != _host() or _pid_alive(info.get("pid")):
                    return False
                self._break(info.get("token"))  # its owner died on this host: no need to wait
                continue
            token = secrets.token_hex(12)
            staging = self.path.with_name(f"{self.path.name}.new-{token}")
            try:
                os.mkdir(staging, 0o700)
            except FileNotFoundError:
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                continue
            self.token, self.mode, self._since, self._beat = token, mode, time.time(), 0
            try:
                self._write_info(staging)
                os.rename(staging, self.path)
            except OSError as exc:
                self.token = None
                shutil.rmtree(staging, ignore_errors=True)
                if _name_taken(exc, self.path):
                    continue  # another process took it first
                raise
            break
        else:
            return False
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="weco-owner-heartbeat", daemon=True)
        self._thread.start()
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            with self._lock:
                if self.token is None:
                    return
                info = _read_info(self.path)
                if info is None or info.get("token") != self.token:
                    return  # taken over: check() will say so
                self._beat += 1
                try:
                    self._write_info()
                except OSError:
                    pass

    def check(self) -> None:
        """Raise LockLost unless this process still holds the lock (fencing, before each commit)."""
        if self.token is None:
            raise LockLost("this process does not hold the journal's owner lock")
        info = _read_info(self.path)
        if info is None or info.get("token") != self.token:
            raise LockLost(
                "the journal's owner lock was taken over (this process was presumed dead): stopping without writing"
            )

    @property
    def held(self) -> bool:
        return self.token is not None

    def yield_requested(self) -> bool:
        return self.token is not None and (self.path / _YIELD).exists()

    def release(self) -> None:
        with self._lock:
            token, self.token = self.token, None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat + 1)
            self._thread = None
        if token is None:
            return
        info = _read_info(self.path)
        if info is not None and info.get("token") == token:
            aside = self.path.with_name(f"{self.path.name}.released-{token}")
            try:
                os.rename(self.path, aside)  # atomic: a waiter's rename succeeds only once we are out
            except OSError:
                return
            shutil.rmtree(aside, ignore_errors=True)
            self._tidy()

    def _tidy(self) -> None:
        """Remove the folders of processes killed while taking, giving up or breaking the lock
        (``.new-``, ``.released-``, ``.stale-``), once they are clearly abandoned."""
        prefix = self.path.name + "."
        try:
            names = [n for n in os.listdir(self.path.parent) if n.startswith(prefix)]
        except OSError:
            return
        for name in names:
            if not name[len(prefix) :].startswith(("new-", "released-", "stale-")):
                continue
            leftover = self.path.parent / name
            try:
                if time.time() - leftover.stat().st_mtime > 5 * self.stale:
                    shutil.rmtree(leftover, ignore_errors=True)
            except OSError:
                pass

    def __enter__(self) -> OwnerLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- waiting for it ----------------------------------------------------------------

    def holder(self) -> dict[str, Any]:
        return _read_info(self.path) or {}

    def acquire(
        self,
        mode: str = "owner",
        *,
        wait: bool = True,
        timeout: float | None = None,
        on_wait: Callable[[dict[str, Any]], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        poll: float = 0.1,
    ) -> None:
        """Take the lock; with ``wait``, poll until it is free, asking a background owner to yield
        and breaking an owner that stopped beating. Raises SyncBusy when ``wait`` is False or
        ``timeout`` passes. A ``timeout`` of at least ``stale`` is enough to take over an owner
        that is silent from the start (the deadline and the staleness clock start together)."""
        start = time.monotonic()
        if self.try_acquire(mode):
            return
        holder = self.holder()
        if not wait:
            raise SyncBusy(_busy(holder))
        if on_wait is not None:
            on_wait(holder)
        deadline = None if timeout is None else start + timeout
        seen = (holder.get("token"), holder.get("beat"))
        seen_at = start
        asked = False
        named = holder  # the last owner.json read whole, to name the owner in a message
        try:
            while True:
                time.sleep(poll)
                if self.try_acquire(mode):
                    return
                holder = self.holder()
                if holder.get("mode") == "background" and not asked:
                    asked = _touch(self.path / _YIELD)
                now = (holder.get("token"), holder.get("beat"))
                if now != seen:
                    seen, seen_at, asked = now, time.monotonic(), False
                elif time.monotonic() - seen_at >= self.stale:  # no beat (or no owner.json) for too long
                    self._break(holder.get("token"))
                    seen_at = time.monotonic()
                    if self.try_acquire(mode):  # at once: the deadline may be due in this same round
                        return
                if should_stop is not None and should_stop():
                    raise SyncBusy("stopped while waiting for the journal's owner")
                if holder:
                    named = holder
                if deadline is not None and time.monotonic() > deadline:
                    raise SyncBusy(_busy(holder or named))  # owner.json may be mid-rewrite: the last one read
        finally:
            if asked and not self.held:
                (self.path / _YIELD).unlink(missing_ok=True)

    def _break(self, token: Any) -> None:
        """Remove a stale owner's folder, once, whoever else tries at the same moment."""
        if not isinstance(token, str) or not token.isalnum():
            token = "unknown"
        marker = self.path.with_name(f"{self.path.name}.break-{token}")
        if not self._claim_marker(marker):
            return  # another waiter is breaking it
        try:
            current = _read_info(self.path)
            if current is not None and current.get("token") not in (token, None) and token != "unknown":
                return  # a fresh owner took the lock since it was judged (another breaker was first)
            aside = self.path.with_name(f"{self.path.name}.stale-{token}-{secrets.token_hex(4)}")
            try:
                os.rename(self.path, aside)
            except OSError:
                return
            moved = _read_info(aside)
            if moved is not None and moved.get("token") not in (token, None) and token != "unknown":
                try:  # a fresh owner took the lock meanwhile: that was not ours to break
                    os.rename(aside, self.path)
                except OSError:
                    pass
                return
            shutil.rmtree(aside, ignore_errors=True)
        finally:
            # moved aside whole, then removed: the name never holds an empty folder, which the
            # next breaker's rename would replace while this one is still here
            done = self.path.with_name(f"{self.path.name}.stale-break-{secrets.token_hex(4)}")
            with contextlib.suppress(OSError):
                os.rename(marker, done)
                shutil.rmtree(done, ignore_errors=True)

    def _claim_marker(self, marker: Path) -> bool:
        """Make the break marker, saying who made it. A marker whose maker died on this host
        (killed mid-break) is cleared at once; one from another host, or not signed, once it
        is clearly abandoned (5 x :data:`STALE`).

        The marker is made whole under a name of its own, signed, then renamed into place, as
        the lock is: a breaker killed between a bare ``mkdir`` and its signature (seen in CI's
        kill -9 workload) left a marker no one could judge, and every later owner waited 150 s.
        A killed breaker now leaves only its ``.new-`` folder, which :meth:`_tidy` removes."""
        for _ in range(2):
            staging = self.path.with_name(f"{self.path.name}.new-{secrets.token_hex(12)}")
            try:
                os.mkdir(staging, 0o700)
                self._sign(staging)
                os.rename(staging, marker)
            except OSError as exc:
                shutil.rmtree(staging, ignore_errors=True)
                if not _name_taken(exc, marker) or not self._clear_abandoned(marker):
                    return False
                continue
            return True
        return False

    def _sign(self, marker: Path) -> None:
        blob = json.dumps({"host": _host(), "pid": os.getpid(), "token": secrets.token_hex(8)}).encode()
        fd = os.open(marker / _INFO, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, blob)
        finally:
            os.close(fd)

    def _clear_abandoned(self, marker: Path) -> bool:
        by = _read_info(marker)
        if by is not None and by.get("host") == _host():
            abandoned = not _pid_alive(by.get("pid"))
        else:
            try:
                abandoned = time.time() - marker.stat().st_mtime > 5 * self.stale
            except OSError:
                return True  # gone meanwhile: try again
        if not abandoned:
            return False
        aside = self.path.with_name(f"{self.path.name}.stale-{marker.name.rsplit('.', 1)[-1]}-{secrets.token_hex(4)}")
        try:
            os.rename(marker, aside)  # one waiter clears it; the others find it gone or fresh
        except OSError:
            return False
        if _read_info(aside) != by:  # a live breaker made it anew between our look and the move
            with contextlib.suppress(OSError):
                os.rename(aside, marker)
            return False
        shutil.rmtree(aside, ignore_errors=True)
        return True


def _touch(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        return True
    except OSError:
        return False


def _busy(holder: dict[str, Any]) -> str:
    who = f"{holder.get('mode', 'owner')} on {holder.get('host', '?')}, pid {holder.get('pid', '?')}"
    return f"another process ({who}) holds this journal: wait for it, or run the command again later"
