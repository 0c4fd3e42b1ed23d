"""Background auto-sync trigger, called after every successful ``init``/``log``/``log_step``.

When an API key is configured and ``WECO_OBSERVE_AUTO_SYNC`` is not ``0``,
:func:`trigger` starts a detached background syncer (``python -m
weco_observe.syncer``) unless one already holds the journal's sync lock. The
caller never waits for it: the check is a ``stat`` and a non-blocking
``flock`` (tens of microseconds), and the start is one ``posix_spawn`` (about
0.3 ms) into a new session, with stdin from /dev/null and all output appended
to ``autosync.log`` in the data dir, never to the user's terminal.

When the background syncer gives up (API unreachable, key refused) it sets a
*cooldown*: the modification time of ``journal.db.sync-cooldown`` is set to the
moment before which no new syncer should be started, so a loop that logs while
offline does not start a process per step. A successful ``sync`` clears it.

An SDK-given ``api_key`` reaches the child through its environment
(``WECO_API_KEY``), never through a file or its command line.

Only the standard library is imported here: this runs on the ``log`` hot path.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

#: Children started by this process, reaped without blocking on the next trigger.
_children: list[int] = []


def enabled() -> bool:
    return os.environ.get("WECO_OBSERVE_AUTO_SYNC", "1").strip().lower() not in ("0", "false", "no", "off")


def lock_path(journal_path: Path) -> Path:
    return Path(f"{journal_path}.sync-lock")


def cooldown_path(journal_path: Path) -> Path:
    return Path(f"{journal_path}.sync-cooldown")


def log_path(journal_path: Path) -> Path:
    return Path(journal_path).parent / "autosync.log"


def set_cooldown(journal_path: Path, seconds: float) -> None:
    """No background syncer is started for ``seconds`` (0 clears it)."""
    path = cooldown_path(journal_path)
    if seconds <= 0:
        path.unlink(missing_ok=True)
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    until = time.time() + seconds
    os.utime(path, (until, until))


def in_cooldown(journal_path: Path) -> bool:
    try:
        return os.stat(cooldown_path(journal_path)).st_mtime > time.time()
    except OSError:
        return False


def _key_configured(api_key: str | None) -> bool:
    if api_key or os.environ.get("WECO_API_KEY"):
        return True
    from . import paths

    return paths.credentials_path().exists()


def syncer_running(journal_path: Path) -> bool:
    """True if some process holds the journal's sync lock."""
    try:
        fd = os.open(lock_path(journal_path), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops our probe lock, if we got it
    return False


def _reap() -> None:
    for pid in list(_children):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            _children.remove(pid)


def spawn(journal_path: Path, api_key: str | None = None) -> int:
    """Start a detached background syncer for ``journal_path``; return its pid."""
    journal_path = Path(journal_path)
    env = dict(os.environ)
    if api_key:
        env["WECO_API_KEY"] = api_key
    log = str(log_path(journal_path))
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    argv = [sys.executable, "-m", "weco_observe.syncer", str(journal_path)]
    pid = os.posix_spawn(sys.executable, argv, env, file_actions=actions, setsid=True)
    _children.append(pid)
    return pid


def trigger(journal_path: Path, api_key: str | None = None) -> None:
    """Start a background syncer for ``journal_path`` if one is needed. Never raises."""
    try:
        if _children:
            _reap()
        if not enabled() or not _key_configured(api_key):
            return
        journal_path = Path(journal_path)
        if in_cooldown(journal_path) or syncer_running(journal_path):
            return
        spawn(journal_path, api_key)
    except Exception:  # auto-sync is best effort: the step is journaled, `sync` will send it
        return
