"""The background syncer: started after a write, it drains the outbox and exits.

**The trigger** (:func:`trigger`, after every successful ``init``/``log``/``log_step``):
when auto-sync is on and a key is configured, it starts a detached syncer
(``python -m weco_observe.background JOURNAL``) unless one already holds the
journal's sync lock or a cooldown is set. The caller never waits for it: the
check is a ``stat`` and a non-blocking ``flock`` (tens of microseconds), and the
start is one ``posix_spawn`` (about 0.3 ms) into a new session, with stdin from
/dev/null and all output appended to ``autosync.log``, never to the user's
terminal. An SDK-given ``api_key`` reaches the child through its environment
(``WECO_API_KEY``), never through a file or its command line.

**The process** (:func:`run`): it takes the sync lock without waiting (another
syncer running means there is nothing to do), drains with
``DrainPolicy.background`` (linger briefly for new events; back off 1, 2, 4 ...
s while the API fails and give up after ``sync_give_up`` seconds), then exits.
Giving up sets a cooldown; a refused key sets a longer one. It gives way at
once when a foreground ``sync``/``flush`` asks. No lost wake-ups: after
releasing the lock it looks once more for events newer than the last it saw;
one journaled after that look finds the lock free, and its write starts a new
syncer.

Only the standard library is imported at module level: the trigger runs on the ``log`` hot path.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import synclock
from .files import JournalFiles
from .settings import Settings

__all__ = ["cooldown_for", "run", "spawn", "trigger"]

#: how long no new syncer is started after giving up (unreachable) or after a refused key
COOLDOWN_UNREACHABLE = 30.0
COOLDOWN_AUTH = 300.0
#: the longest cooldown a server's ``Retry-After`` can set (a later ``log`` then tries again)
COOLDOWN_RETRY_AFTER_MAX = 3600.0

#: Children started by this process, reaped without blocking on the next trigger.
_children: list[int] = []


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
    log = str(JournalFiles(journal_path).autosync_log)
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    argv = [sys.executable, "-m", "weco_observe.background", str(journal_path)]
    pid = os.posix_spawn(sys.executable, argv, env, file_actions=actions, setsid=True)
    _children.append(pid)
    return pid


def trigger(
    journal_path: Path, api_key: str | None = None, settings: Settings | None = None, *, merge: bool = False
) -> None:
    """Start a background syncer for ``journal_path`` if one is needed. Never raises.

    ``merge``: a cluster-mode writer saw many unmerged segments for its run, so a
    background process is worth starting to merge them even when nothing can be synced.
    """
    try:
        if _children:
            _reap()
        settings = settings or Settings.load()
        if not settings.auto_sync_active(api_key) and not merge:
            return
        if synclock.in_cooldown(journal_path) and not merge:
            return
        if _held(Path(journal_path)):
            return
        spawn(Path(journal_path), api_key)
    except Exception:  # auto-sync is best effort: the step is journaled, `sync` will send it
        return


def cooldown_for(retry_at: float | None) -> float:
    """The cooldown after giving up: until the time a server asked for (``Retry-After``), bounded
    by ``COOLDOWN_UNREACHABLE`` and ``COOLDOWN_RETRY_AFTER_MAX``; otherwise ``COOLDOWN_UNREACHABLE``.

    >>> cooldown_for(None), cooldown_for(time.time() + 10**6)
    (30.0, 3600.0)
    """
    if retry_at is None:
        return COOLDOWN_UNREACHABLE
    return min(COOLDOWN_RETRY_AFTER_MAX, max(COOLDOWN_UNREACHABLE, retry_at - time.time()))


def _held(journal_path: Path) -> bool:
    """Some process holds the journal as its syncer: the flock (local mode) or the owner folder (cluster)."""
    return synclock.running(journal_path) or JournalFiles(journal_path).owner_lock.exists()


# -- the process ---------------------------------------------------------------------


def _log(message: str) -> None:
    """One line in autosync.log. Every line is redacted: it may quote a server's answer or an exception."""
    from .redact import redact

    line = " ".join(redact(message).splitlines())
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()} {line}", flush=True)


def run(journal_path: Path, settings: Settings | None = None) -> int:
    """Drain, linger, exit. Returns 0, or the exit code of the last pass when it gave up."""
    from . import outbox, store
    from .api import WecoClient
    from .errors import ApiError, InvalidInput, SyncBusy, WecoObserveError
    from .replay import DrainPolicy, PassResult, drain, retry_clock

    settings = settings or Settings.load()
    stopping = False

    def on_pass(result: PassResult) -> None:
        _log(
            f"delivered {result.delivered}, rejected {result.rejected}, "
            f"pending {result.pending} in {result.elapsed:.2f}s"
            + (f"; last error: {result.last_error}" if result.pending and result.last_error else "")
        )

    def stop(signum: int, frame: Any) -> None:  # SIGTERM: finish the request in flight, then exit
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    shared = store.is_shared(settings, journal_path)
    # Cluster mode: a node with no route out must neither hammer the API nor keep the owner
    # lock from the login node's sync, so it tries once and gives up at once (the cooldown
    # file is in the shared folder: every node then waits).
    policy = DrainPolicy.background(settings.sync_linger, 0.0 if shared else settings.sync_give_up)
    code = 0
    while True:
        try:
            with store.exclusive(settings, "background", journal_path=journal_path, wait=False) as held:
                lock, journal = held.lock, held.journal

                def should_stop(lock: Any = lock) -> bool:
                    return stopping or bool(lock.yield_requested())

                key = settings.api_key
                if not key or not settings.auto_sync:
                    return 0  # started only to merge (cluster mode): done
                with WecoClient(api_key=key) as client:
                    done = drain(
                        journal,
                        client,
                        policy,
                        should_stop=should_stop,
                        on_pass=on_pass,
                        refresh=held.merge,
                    )
                code = done.total.exit_code
                if done.reason in ("auth", "misconfigured"):  # a wrong key or URL: wait as long for either
                    _log(f"stopping: {done.total.last_error}")
                    synclock.set_cooldown(journal_path, COOLDOWN_AUTH)
                    return code
                if done.reason == "gave_up":
                    retry_at = done.total.retry_at
                    asked = f"the server asked to retry after {retry_clock(retry_at)}; " if retry_at else ""
                    _log(f"giving up for now with {done.total.pending} pending: {asked}{done.total.last_error}")
                    synclock.set_cooldown(journal_path, cooldown_for(retry_at))
                    return code
                if done.reason == "stopped":
                    _log("gave way to a foreground sync" if lock.yield_requested() else "stopped by a signal")
                    return code
                if done.total.delivered or not done.total.pending:
                    synclock.set_cooldown(journal_path, 0)
        except (SyncBusy, ApiError, WecoObserveError) as exc:
            if not isinstance(exc, SyncBusy):
                _log(f"not syncing: {exc}")
                if isinstance(exc, (ApiError, InvalidInput)):
                    # a malformed key or setting: every later log would start a syncer that fails
                    # the same way, so wait as after a refused key
                    synclock.set_cooldown(journal_path, COOLDOWN_AUTH)
                return exc.exit_code
            return code  # another syncer holds the journal: it sends what is there
        # the lock is released: anything journaled after the drain's last look starts its own syncer,
        # anything before it is ours to send
        with store.reader(settings, journal_path, wait=0) as journal:
            if outbox.count_unsent(journal, after_seq=done.seen) == 0 and not _backlog(journal_path, shared):
                return code


def _backlog(journal_path: Path, shared: bool) -> bool:
    if not shared:
        return False
    from . import segments

    return segments.backlog(JournalFiles(journal_path))["files"] > 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m weco_observe.background JOURNAL_PATH", file=sys.stderr)
        return 2
    try:
        if os.fstat(1).st_size > 5_000_000:  # keep autosync.log bounded
            os.ftruncate(1, 0)
    except OSError:
        pass
    try:
        return run(Path(args[0]))
    except Exception as exc:  # the log file is the only place anyone will look
        _log(f"crashed: {type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
