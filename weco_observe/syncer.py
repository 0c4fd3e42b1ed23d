"""The background syncer: ``python -m weco_observe.syncer JOURNAL`` (started by ``autosync.trigger``).

It takes the journal's sync lock without waiting (another syncer running means
there is nothing to do), drains the outbox, lingers ``linger`` seconds for new
events, and exits. While the API fails it backs off (1, 2, 4 ... s) and gives
up after ``give_up`` seconds, leaving the events pending and setting a cooldown
so the next ``log`` does not start another syncer at once. It gives way at once
when a foreground ``sync``/``flush`` asks (the yield file).

No lost wake-ups: after releasing the lock it looks once more for events newer
than the last it saw. An event journaled before that look is seen; one
journaled after it finds the lock free, and its ``log`` starts a new syncer.

Everything it prints goes to ``autosync.log`` in the data dir (the trigger
redirects stdout and stderr there). The API key is never printed.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

LINGER = float(os.environ.get("WECO_OBSERVE_SYNC_LINGER", "2.0"))
GIVE_UP = float(os.environ.get("WECO_OBSERVE_SYNC_GIVE_UP", "60"))
#: how long no new syncer is started after giving up (unreachable) or after a refused key
COOLDOWN_UNREACHABLE = 30.0
COOLDOWN_AUTH = 300.0
POLL = 0.05


def _log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()} {message}", flush=True)


def _max_seq(journal) -> int:
    return journal.query("SELECT coalesce(max(seq), 0) AS n FROM events")[0]["n"]


def run(journal_path: Path, *, linger: float = LINGER, give_up: float = GIVE_UP) -> int:
    """Drain, linger, exit. Returns 0, or the exit code of the last pass when it gave up."""
    from . import autosync
    from .api import WecoClient
    from .errors import ApiError
    from .journal import Journal
    from .sync import SyncLock, sync

    stopping = False

    def stop(signum, frame):  # SIGTERM: finish the request in flight, then exit
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    lock = SyncLock(journal_path)
    if not lock.try_acquire("background"):
        return 0
    journal = Journal(journal_path)
    try:
        client = WecoClient()
    except ApiError as exc:
        _log(f"not syncing: {exc}")
        lock.release()
        return exc.exit_code

    def should_stop() -> bool:
        return stopping or lock.yield_requested()

    code = 0
    try:
        while True:
            seen = _max_seq(journal)
            need_pass = True
            failing_since: float | None = None
            backoff = 1.0
            idle_since = time.monotonic()
            while not should_stop():
                if need_pass:
                    result = sync(journal, client=client, should_stop=should_stop, passes=1)
                    if result.sent:
                        _log(
                            f"delivered {result.delivered}, rejected {result.rejected}, "
                            f"pending {result.pending} in {result.elapsed:.2f}s"
                        )
                    code = result.exit_code
                    if result.auth_failed:
                        _log(f"stopping: {result.last_error}")
                        autosync.set_cooldown(journal_path, COOLDOWN_AUTH)
                        return code
                    if result.pending and (result.unreachable or result.failed):
                        failing_since = failing_since or time.monotonic()
                        if time.monotonic() - failing_since > give_up:
                            _log(f"giving up for now with {result.pending} pending: {result.last_error}")
                            autosync.set_cooldown(journal_path, COOLDOWN_UNREACHABLE)
                            return code
                        _log(f"{result.pending} pending, retrying in {backoff:.0f}s: {result.last_error}")
                        _sleep(backoff, should_stop)
                        backoff = min(backoff * 2, 30.0)
                        continue
                    if failing_since is not None or result.delivered:
                        autosync.set_cooldown(journal_path, 0)
                    failing_since, backoff, need_pass = None, 1.0, False
                    idle_since = time.monotonic()
                    continue
                # Idle: wait briefly for new events.
                if time.monotonic() - idle_since > linger:
                    break
                time.sleep(POLL)
                newest = _max_seq(journal)
                if newest > seen:
                    seen, need_pass = newest, True
            if should_stop():
                _log("gave way to a foreground sync" if lock.yield_requested() else "stopped by a signal")
                return code
            lock.release()
            if (
                journal.query("SELECT count(*) AS n FROM events WHERE state = 'pending' AND seq > ?", (seen,))[0]["n"]
                == 0
            ):
                return code
            if not lock.try_acquire("background"):
                return code  # whoever holds it now sends them
    finally:
        lock.release()
        client.close()
        journal.close()


def _sleep(seconds: float, should_stop) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not should_stop():
        time.sleep(min(POLL * 2, end - time.monotonic()))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m weco_observe.syncer JOURNAL_PATH", file=sys.stderr)
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
