"""The replayer: pending outbox events -> the Weco API -> delivered, rejected or still pending.

One *pass* (:meth:`Syncer.run_pass`) works like this:

- Runs go in parallel (``workers`` threads, one keep-alive pool); the events of
  one run go in order, oldest first.
- A run's create goes first. Its server id is stored in the same transaction
  that marks the create delivered. A create is not idempotent on the server, so
  its attempt is committed to the journal *before* the request is sent: if the
  answer never comes (timeout, dropped connection, a kill -9), the next attempt
  is flagged as a possible duplicate, reported by ``sync`` and kept in the
  event's ``last_error``. The local run id travels in the create's metadata
  (``weco_observe_local_id``) so a duplicate can be traced on the server.
- Then its steps, addressed by the server id. Every event of a step carries
  the step's full state, so when a step was logged several times only its
  latest event is sent and the older ones become ``superseded``. The parent
  resolved at log time is always sent as ``parent_step`` (for every step that
  has one), so the server's tree equals the local tree whatever the order of
  arrival.
- Retries (tenacity): exponential backoff with jitter, ``Retry-After`` honoured
  up to ``max_retry_after``, at most ``attempts`` tries per event per pass. An
  event that still fails stays pending with its attempt count and last error,
  and the rest of its run waits for the next pass (order is kept). When no
  connection can be opened at all the whole pass stops after a few quick tries,
  so an offline ``sync`` fails in seconds.
- A 401/403 stops the pass and changes nothing. Any other 4xx marks the event
  ``rejected`` with the server's ``detail``: a rejected create blocks only its
  own run, a rejected step blocks nothing. ``requeue_rejected`` (``sync
  --retry-rejected``) makes them pending again. Nothing is ever deleted.

One syncer per journal at a time: :class:`SyncLock` is an ``flock`` on
``journal.db.sync-lock``. A background syncer that holds it gives way when a
foreground ``sync`` asks (it touches ``journal.db.sync-yield``).

Events are streamed page by page (never all loaded): a 100,000-event outbox
syncs in bounded memory.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import paths
from .errors import ApiAuthFailed, ApiError, ApiRejected, SyncBusy
from .journal import Journal

__all__ = ["LOCAL_ID_KEY", "PassResult", "SyncLock", "Syncer", "flush", "pending_count", "sync"]

#: metadata key carrying the local run id on every create, to trace duplicates
LOCAL_ID_KEY = "weco_observe_local_id"
PAGE = 500


@dataclass
class RunSummary:
    """One run after a pass (counts are over all of its events, not only this pass)."""

    run_id: str
    name: str | None
    server_id: str | None
    delivered: int = 0
    pending: int = 0
    rejected: int = 0
    superseded: int = 0
    possible_duplicate: bool = False
    dashboard: str | None = None
    blocked: str | None = None


@dataclass
class PassResult:
    """What a pass (or a whole ``sync``) did, and what is left."""

    sent: int = 0
    delivered: int = 0
    superseded: int = 0
    rejected: int = 0
    failed: int = 0
    pending: int = 0
    rejected_total: int = 0
    possible_duplicates: int = 0
    auth_failed: bool = False
    unreachable: bool = False
    last_error: str | None = None
    elapsed: float = 0.0
    runs: list[RunSummary] = field(default_factory=list)
    #: what each ``sync --bundle FILE`` import merged before sending
    imports: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        from .errors import EXIT_AUTH, EXIT_OK, EXIT_PENDING, EXIT_REJECTED

        if self.auth_failed:
            return EXIT_AUTH
        if self.pending:
            return EXIT_PENDING
        if self.rejected_total:
            return EXIT_REJECTED
        return EXIT_OK

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["exit_code"] = self.exit_code
        return out


def pending_count(journal: Journal, run_id: str | None = None) -> int:
    if run_id is None:
        return journal.query("SELECT count(*) AS n FROM events WHERE state = 'pending'")[0]["n"]
    return journal.query("SELECT count(*) AS n FROM events WHERE state = 'pending' AND run_id = ?", (run_id,))[0]["n"]


class _Halt(Exception):
    """The pass was told to stop (auth failure, unreachable API, deadline, signal)."""


class Syncer:
    """Replays one journal's outbox through one API client.

    ``sleep`` is injectable so tests can record the waits; by default it is an
    interruptible wait on the halt flag, so a stop request is honoured at once.
    """

    def __init__(
        self,
        journal: Journal,
        client: Any,
        *,
        workers: int = 8,
        attempts: int = 5,
        unreachable_attempts: int = 3,
        initial_wait: float = 0.25,
        max_wait: float = 8.0,
        max_retry_after: float = 30.0,
        sleep: Callable[[float], Any] | None = None,
        deadline: float | None = None,
        progress: Callable[[int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        batch_size: int = 200,
        batch_age: float = 0.2,
        step_window: int | None = None,
    ):
        self.journal = journal
        #: steps of one run in flight at once (they carry explicit parents); default: ``workers``
        self.step_window = max(1, step_window if step_window is not None else workers)
        self._step_pool: ThreadPoolExecutor | None = None
        self.client = client
        self.workers = max(1, workers)
        self.attempts = max(1, attempts)
        self.unreachable_attempts = max(1, unreachable_attempts)
        self.initial_wait = initial_wait
        self.max_wait = max_wait
        self.max_retry_after = max_retry_after
        self.deadline = deadline
        self.progress = progress
        self.should_stop = should_stop
        self._halt = threading.Event()
        self.batch_size = batch_size
        self.batch_age = batch_age
        self._marks: list[tuple[str, str, int, int, int, int]] = []
        self._marks_lock = threading.Lock()
        self._marks_since = 0.0
        self._sleep = sleep or self._interruptible_sleep
        self._lock = threading.Lock()
        self._result = PassResult()

    # -- retry policy -----------------------------------------------------------

    def _interruptible_sleep(self, seconds: float) -> None:
        self._halt.wait(seconds)

    def _wait(self, state: Any) -> float:
        # exponential backoff with full jitter on top: initial * 2^(n-1), capped, + U(0, initial)
        base = min(self.max_wait, self.initial_wait * 2 ** (state.attempt_number - 1))
        base += random.uniform(0, self.initial_wait)
        exc = state.outcome.exception()
        retry_after = getattr(exc, "retry_after", None)
        if retry_after:
            return min(max(base, retry_after), self.max_retry_after)
        return base

    def _stop(self, state: Any) -> bool:
        from . import api

        if self._halted():
            return True
        if state.attempt_number >= self.attempts:
            return True
        exc = state.outcome.exception()
        if api.is_unreachable(exc) and state.attempt_number >= self.unreachable_attempts:
            return True
        if self.deadline is not None and time.monotonic() + self._wait(state) > self.deadline:
            return True
        return False

    def _halted(self) -> bool:
        if not self._halt.is_set() and self.should_stop is not None and self.should_stop():
            self._halt.set()
        return self._halt.is_set()

    def call(self, fn: Callable[[], Any]) -> tuple[Any, int]:
        """Call ``fn`` with the retry policy; return ``(result, attempts)`` or raise the last error
        (with ``attempts`` set on it)."""
        import tenacity

        from . import api

        attempts = 0

        def attempt() -> Any:
            nonlocal attempts
            if self._halted():
                raise _Halt()
            attempts += 1
            return fn()

        retrying = tenacity.Retrying(
            stop=self._stop,
            wait=self._wait,
            sleep=self._sleep,
            reraise=True,
            retry=tenacity.retry_if_exception(api.is_retryable),
        )
        try:
            return retrying(attempt), attempts
        except ApiError as exc:
            exc.attempts = attempts  # type: ignore[attr-defined]
            raise

    # -- one pass -----------------------------------------------------------------

    def run_pass(self, run_id: str | None = None) -> PassResult:
        """Send everything pending (for one run, or all) once; return what happened."""
        start = time.monotonic()
        self._result = result = PassResult()
        if run_id is None:
            rows = self.journal.query(
                "SELECT run_id, min(seq) AS first FROM events WHERE state = 'pending' GROUP BY run_id ORDER BY first"
            )
        else:
            rows = self.journal.query(
                "SELECT run_id, min(seq) AS first FROM events WHERE state = 'pending' AND run_id = ? GROUP BY run_id",
                (run_id,),
            )
        run_ids = [r["run_id"] for r in rows]
        step_pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="weco-sync-step")
        self._step_pool = step_pool if self.step_window > 1 else None
        try:
            if run_ids:
                with ThreadPoolExecutor(
                    max_workers=min(self.workers, len(run_ids)), thread_name_prefix="weco-sync"
                ) as pool:
                    try:
                        for _ in pool.map(self._sync_run_safely, run_ids):
                            pass
                    except BaseException:  # Ctrl-C: stop the workers after their request in flight
                        self._halt.set()
                        raise
        finally:
            step_pool.shutdown(wait=True)
            self._step_pool = None
            self.flush_marks()
        result.pending = pending_count(self.journal, run_id)
        result.rejected_total = self.journal.query(
            "SELECT count(*) AS n FROM events WHERE state = 'rejected'" + (" AND run_id = ?" if run_id else ""),
            (run_id,) if run_id else (),
        )[0]["n"]
        result.elapsed = time.monotonic() - start
        result.runs = run_summaries(self.journal, run_ids)
        result.possible_duplicates = sum(1 for r in result.runs if r.possible_duplicate)
        return result

    def _tick(self, **counts: int) -> None:
        with self._lock:
            for key, n in counts.items():
                setattr(self._result, key, getattr(self._result, key) + n)
            done = self._result.delivered + self._result.superseded + self._result.rejected + self._result.failed
        if self.progress is not None:
            self.progress(done)

    def _failed(self, exc: ApiError) -> None:
        with self._lock:
            self._result.last_error = str(exc)
        if isinstance(exc, ApiAuthFailed):
            self._result.auth_failed = True
            self._halt.set()
        else:
            from . import api

            if api.is_unreachable(exc):
                self._result.unreachable = True
                self._halt.set()

    def _sync_run_safely(self, run_id: str) -> None:
        try:
            self._sync_run(run_id)
        except _Halt:
            pass

    def _sync_run(self, run_id: str) -> None:
        journal = self.journal
        if self._halted():
            return
        run = journal.query("SELECT * FROM runs WHERE id = ?", (run_id,))[0]
        server_id = run["server_id"]
        if server_id is None:
            creates = journal.query(
                "SELECT * FROM events WHERE run_id = ? AND kind = 'create_run' ORDER BY seq LIMIT 1", (run_id,)
            )
            if not creates or creates[0]["state"] != "pending":
                return  # rejected (or missing): the run waits; its steps stay pending
            server_id = self._send_create(run, creates[0])
            if server_id is None:
                return
        done_upto: dict[int, int] = {}
        cursor = 0
        while True:
            page = journal.query(
                "SELECT seq, id, step, json_extract(payload, '$.parent_step') IS NULL AS chained FROM events"
                " WHERE state = 'pending' AND run_id = ? AND kind = 'log_step' AND seq > ? ORDER BY seq LIMIT ?",
                (run_id, cursor, PAGE),
            )
            if not page:
                return
            cursor = page[-1]["seq"]
            batch, steps = [], set()
            for ev in page:
                if ev["seq"] <= done_upto.get(ev["step"], -1) or ev["step"] in steps:
                    continue  # superseded by the latest state already sent (or about to be)
                steps.add(ev["step"])
                batch.append(ev)
            if not self._send_steps(run_id, server_id, batch, done_upto):
                return

    def _send_steps(self, run_id: str, server_id: str, batch: list[Any], done_upto: dict[int, int]) -> bool:
        """Send a page of steps in order, up to ``step_window`` at a time; False if the run must wait.

        Steps carry their parent explicitly, so their order of arrival cannot change
        the server's tree and several may be in flight at once. A step sent without
        a parent (left to the server's auto-chaining: a remote-only run's step whose
        parent this journal never knew) waits for every earlier one and goes alone.
        """
        from concurrent.futures import FIRST_COMPLETED, wait

        inflight: set[Any] = set()
        ok = True

        def drain(all_: bool) -> None:
            nonlocal inflight, ok
            while inflight and (all_ or len(inflight) >= self.step_window):
                done, inflight = wait(inflight, return_when=FIRST_COMPLETED)
                for future in done:
                    ok = future.result() and ok

        try:
            for ev in batch:
                if not ok or self._halted():
                    break
                if self._step_pool is None or self.step_window <= 1 or (ev["chained"] and ev["step"] != 0):
                    drain(all_=True)
                    if not ok:
                        break
                    ok = self._send_step(run_id, server_id, ev, done_upto)
                    continue
                drain(all_=False)
                inflight.add(self._step_pool.submit(self._send_step, run_id, server_id, ev, done_upto))
        finally:
            drain(all_=True)
        if self._halted():
            raise _Halt()
        return ok

    def _send_create(self, run: Any, event: Any) -> str | None:
        journal = self.journal
        payload = json.loads(event["payload"])
        try:
            body = dict(payload, source_code=journal.read_code(payload["source_code"]))
        except KeyError as exc:
            journal.mark_rejected(event["id"], f"local: code blob {exc} missing from the journal", attempts=0)
            self._tick(rejected=1)
            return None
        body["metadata"] = {**(payload.get("metadata") or {}), LOCAL_ID_KEY: run["id"]}
        earlier = False

        def send() -> str:
            nonlocal earlier
            earlier = journal.begin_create_attempt(event["id"]) or earlier
            try:
                return self.client.create_run(body)
            except ApiError as exc:
                if not exc.ambiguous:  # answered, so not applied: clear the in-flight marker
                    journal.mark_failed(event["id"], (journal.AMBIGUOUS if earlier else "") + str(exc), attempts=0)
                raise

        try:
            server_id, _attempts = self.call(send)
        except ApiRejected as exc:
            journal.mark_rejected(event["id"], exc.detail or str(exc), attempts=0)
            self._tick(rejected=1, sent=1)
            return None
        except ApiError as exc:
            note = (journal.AMBIGUOUS if exc.ambiguous or earlier else "") + str(exc)
            journal.mark_failed(event["id"], note, attempts=0)
            self._tick(failed=1, sent=1)
            self._failed(exc)
            return None
        journal.mark_create_delivered(event["id"], run["id"], server_id, possible_duplicate=earlier)
        self._tick(delivered=1, sent=1)
        return server_id

    def _send_step(self, run_id: str, server_id: str, ev: Any, done_upto: dict[int, int]) -> bool:
        """Send the latest state of ``ev``'s step; False if the rest of the run must wait."""
        journal = self.journal
        latest = journal.query(
            "SELECT e.seq, e.id, e.kind, e.state, e.payload FROM steps s JOIN events e ON e.id = s.event_id"
            " WHERE s.run_id = ? AND s.step = ?",
            (run_id, ev["step"]),
        )
        # The step row names the event holding the step's current state (a bundle
        # import can make that an event with a lower seq than ``ev``).
        target = latest[0] if latest else None
        if target is None or target["kind"] != "log_step":
            target = journal.query("SELECT seq, id, kind, state, payload FROM events WHERE seq = ?", (ev["seq"],))[0]
        elif target["id"] != ev["id"] and target["state"] != "pending":
            journal.mark_superseded(ev["id"])  # the current state of this step is already settled
            done_upto[ev["step"]] = max(done_upto.get(ev["step"], -1), ev["seq"])
            self._tick(superseded=1)
            return True
        payload = json.loads(target["payload"])
        body = dict(payload)
        try:
            if payload.get("code"):
                body["code"] = journal.read_code(payload["code"])
        except KeyError as exc:
            journal.mark_rejected(target["id"], f"local: code blob {exc} missing from the journal", attempts=0)
            self._tick(rejected=1)
            return True
        try:
            _answer, attempts = self.call(lambda: self.client.log_step(server_id, body))
        except ApiRejected as exc:
            journal.mark_rejected(target["id"], exc.detail or str(exc), attempts=getattr(exc, "attempts", 1))
            self._tick(rejected=1, sent=1)
            return True
        except ApiError as exc:
            journal.mark_failed(target["id"], str(exc), attempts=getattr(exc, "attempts", 1))
            self._tick(failed=1, sent=1)
            self._failed(exc)
            return False
        self._mark_delivered((target["id"], run_id, ev["step"], target["seq"], attempts, min(ev["seq"], target["seq"])))
        if ev["seq"] > target["seq"]:
            journal.mark_superseded(ev["id"])
            self._tick(superseded=1)
        done_upto[ev["step"]] = max(target["seq"], ev["seq"])
        self._tick(delivered=1, sent=1)
        return True

    # -- group commit of delivered steps ------------------------------------------
    # Each commit of the journal is an fsync (synchronous=FULL); one per step
    # would cap sync at a few hundred steps/s. Delivered steps are committed in
    # batches: a crash before the batch commits means those steps are sent
    # again, which the server's upsert makes harmless. Creates are never
    # batched (their server id must be durable before any step uses it).

    def _mark_delivered(self, item: tuple[str, str, int, int, int, int]) -> None:
        with self._marks_lock:
            if not self._marks:
                self._marks_since = time.monotonic()
            self._marks.append(item)
            due = len(self._marks) >= self.batch_size or time.monotonic() - self._marks_since > self.batch_age
        if due:
            self.flush_marks()

    def flush_marks(self) -> None:
        with self._marks_lock:
            batch, self._marks = self._marks, []
        if batch:
            superseded = self.journal.mark_steps_delivered(batch)
            if superseded:
                self._tick(superseded=superseded)


def run_summaries(journal: Journal, run_ids: list[str]) -> list[RunSummary]:
    """Per-run counts and dashboard links, for the final summary."""
    out: list[RunSummary] = []
    dashboard = paths.dashboard_url()
    for run_id in run_ids:
        rows = journal.query("SELECT id, name, server_id FROM runs WHERE id = ?", (run_id,))
        if not rows:
            continue
        run = rows[0]
        summary = RunSummary(run_id=run_id, name=run["name"], server_id=run["server_id"])
        for row in journal.query("SELECT state, count(*) AS n FROM events WHERE run_id = ? GROUP BY state", (run_id,)):
            setattr(summary, row["state"], row["n"])
        create = journal.query(
            "SELECT state, last_error FROM events WHERE run_id = ? AND kind = 'create_run' ORDER BY seq LIMIT 1",
            (run_id,),
        )
        if create:
            summary.possible_duplicate = (create[0]["last_error"] or "").startswith(Journal.POSSIBLE_DUPLICATE)
            if create[0]["state"] == "rejected":
                summary.blocked = f"create rejected: {create[0]['last_error']}"
        if run["server_id"]:
            summary.dashboard = f"{dashboard}/runs/{run['server_id']}"
        out.append(summary)
    return out


# -- one syncer per journal ---------------------------------------------------------


class SyncLock:
    """An exclusive ``flock`` on ``<journal>.sync-lock``; the file names the holder (pid, mode)."""

    def __init__(self, journal_path: Path):
        self.path = Path(f"{journal_path}.sync-lock")
        self.yield_path = Path(f"{journal_path}.sync-yield")
        self._fd: int | None = None

    def try_acquire(self, mode: str = "sync") -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
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
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SyncLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# -- entry points -------------------------------------------------------------------


def _merge(total: PassResult, one: PassResult) -> None:
    for key in ("sent", "delivered", "superseded", "rejected", "failed"):
        setattr(total, key, getattr(total, key) + getattr(one, key))
    total.pending = one.pending
    total.rejected_total = one.rejected_total
    total.auth_failed = total.auth_failed or one.auth_failed
    total.unreachable = one.unreachable
    total.last_error = one.last_error or total.last_error
    known = {r.run_id: r for r in total.runs}
    for r in one.runs:
        known[r.run_id] = r
    total.runs = list(known.values())
    total.possible_duplicates = sum(1 for r in total.runs if r.possible_duplicate)


def sync(
    journal: Journal,
    *,
    client: Any = None,
    api_key: str | None = None,
    run_id: str | None = None,
    retry_rejected: bool = False,
    workers: int = 8,
    attempts: int = 5,
    passes: int = 3,
    deadline: float | None = None,
    progress: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    **syncer_options: Any,
) -> PassResult:
    """Deliver everything pending (the caller holds the :class:`SyncLock`).

    Runs up to ``passes`` passes while a pass makes progress (a later pass picks
    up events logged meanwhile and runs whose create was delivered late).
    """
    from .api import WecoClient

    if retry_rejected:
        journal.requeue_rejected(run_id)
    own_client = client is None
    if own_client:
        client = WecoClient(api_key=api_key, max_connections=workers)
    total = PassResult()
    start = time.monotonic()
    try:
        for _ in range(max(1, passes)):
            syncer = Syncer(
                journal,
                client,
                workers=workers,
                attempts=attempts,
                deadline=deadline,
                progress=progress,
                should_stop=should_stop,
                **syncer_options,
            )
            one = syncer.run_pass(run_id)
            _merge(total, one)
            if not one.pending or one.auth_failed or one.unreachable or one.sent == 0:
                break
            if should_stop is not None and should_stop():
                break
            if deadline is not None and time.monotonic() > deadline:
                break
    finally:
        if own_client:
            client.close()
    total.elapsed = time.monotonic() - start
    return total


def plan(journal: Journal, run_id: str | None = None, limit: int = 10_000) -> list[dict[str, Any]]:
    """What a sync would send, in the order it would (``sync --dry-run``): one dict per request.

    Runs in order of their oldest pending event; within a run the create, then each
    step once, at the place of its oldest pending event, with its latest state.
    """
    out: list[dict[str, Any]] = []
    if run_id is None:
        runs = [
            r["run_id"]
            for r in journal.query(
                "SELECT run_id, min(seq) AS first FROM events WHERE state = 'pending' GROUP BY run_id ORDER BY first"
            )
        ]
    else:
        runs = [run_id]
    for rid in runs:
        run = journal.query("SELECT id, name, server_id FROM runs WHERE id = ?", (rid,))[0]
        target = run["server_id"] or f"<server id of {rid}>"
        listed: set[int] = set()
        for ev in journal.iter_query(
            "SELECT e.id, e.kind, e.step, e.payload, s.event_id AS latest, l.payload AS latest_payload"
            " FROM events e LEFT JOIN steps s ON s.run_id = e.run_id AND s.step = e.step"
            " LEFT JOIN events l ON l.id = s.event_id AND l.state = 'pending' AND l.kind = 'log_step'"
            " WHERE e.state = 'pending' AND e.run_id = ? ORDER BY e.kind = 'log_step', e.seq",
            (rid,),
        ):
            if len(out) >= limit:
                return out
            if ev["kind"] == "create_run":
                payload = json.loads(ev["payload"])
                out.append(
                    {
                        "method": "POST",
                        "path": "/external/runs",
                        "run_id": rid,
                        "name": run["name"],
                        "event": ev["id"],
                        "files": sorted(payload.get("source_code", {})),
                    }
                )
                continue
            if ev["step"] in listed:
                continue
            listed.add(ev["step"])
            event = ev["latest"] if ev["latest_payload"] else ev["id"]
            payload = json.loads(ev["latest_payload"] or ev["payload"])
            out.append(
                {
                    "method": "POST",
                    "path": f"/external/runs/{target}/steps",
                    "run_id": rid,
                    "event": event,
                    "step": ev["step"],
                    "status": payload.get("status"),
                    "parent_step": payload.get("parent_step"),
                    "files": sorted(payload.get("code") or {}),
                }
            )
    return out


def flush(
    journal_path: str | os.PathLike[str] | Path, timeout: float | None = 30.0, api_key: str | None = None
) -> bool:
    """Deliver everything pending now, waiting at most ``timeout`` seconds; True if nothing is left pending.

    Used by ``WecoObserver.flush()``. Without an API key nothing can be sent
    (False if events are pending). A background syncer holding the journal is
    asked to give way.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    with Journal(journal_path) as journal:
        if pending_count(journal) == 0:
            return True
        key = api_key or paths.api_key()
        if not key:
            return False
        lock = SyncLock(journal.path)
        try:
            lock.acquire("flush", timeout=timeout)
        except SyncBusy:
            return pending_count(journal) == 0
        try:
            delay = 0.2
            while True:
                result = sync(journal, api_key=key, deadline=deadline)
                if result.pending == 0:
                    return True
                if result.auth_failed or (deadline is not None and time.monotonic() + delay > deadline):
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        finally:
            lock.release()


# -- the `weco observe sync` command ------------------------------------------------


def command(
    *,
    run_ref: str | None = None,
    bundles: list[str] | None = None,
    retry_rejected: bool = False,
    watch: bool = False,
    wait: bool = True,
    workers: int = 8,
    api_key: str | None = None,
    on_wait: Callable[[dict[str, Any]], None] | None = None,
    progress_factory: Callable[[int], Callable[[int], None] | None] | None = None,
    on_pass: Callable[[PassResult], None] | None = None,
    poll: float = 0.5,
) -> PassResult:
    """Everything ``weco observe sync`` does, minus the formatting.

    Takes the sync lock (waiting for another syncer unless ``wait`` is False),
    sends what is pending and returns the result. ``bundles`` are imported
    first (``sync --bundle FILE``, see ``bundle.py``). With ``watch`` it keeps
    sending new events as they are journaled until SIGINT/SIGTERM, calling
    ``on_pass`` after each pass that sent something, and returns the last state.
    """
    import signal

    from . import autosync
    from .errors import ApiAuthFailed

    stopping = threading.Event()
    previous: dict[int, Any] = {}
    if watch and threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda *_: stopping.set())
    try:
        with Journal() as journal:
            imports = []
            if bundles:
                from . import bundle

                imports = [bundle.import_bundle(journal, path) for path in bundles]
            run_id = journal.require_run(run_ref)["id"] if run_ref else None
            key = api_key or paths.api_key()
            if not key and not watch and not retry_rejected and pending_count(journal, run_id) == 0:
                return PassResult(imports=imports)  # nothing to send: no key needed
            if not key:
                raise ApiAuthFailed(
                    f"no API key: {pending_count(journal, run_id)} events wait in the journal;"
                    " run `weco login` (or set WECO_API_KEY), then `weco observe sync`"
                )
            lock = SyncLock(journal.path)
            lock.acquire("sync", wait=wait, on_wait=on_wait, should_stop=stopping.is_set)
            try:
                result = _command_locked(
                    journal,
                    lock,
                    key,
                    run_id,
                    retry_rejected,
                    watch,
                    workers,
                    progress_factory,
                    on_pass,
                    stopping,
                    poll,
                    autosync,
                )
                result.imports = imports
                return result
            finally:
                lock.release()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _command_locked(
    journal: Journal,
    lock: SyncLock,
    key: str,
    run_id: str | None,
    retry_rejected: bool,
    watch: bool,
    workers: int,
    progress_factory: Any,
    on_pass: Any,
    stopping: threading.Event,
    poll: float,
    autosync: Any,
) -> PassResult:
    from .api import WecoClient

    if retry_rejected:
        journal.requeue_rejected(run_id)
    total = PassResult()
    start = time.monotonic()
    with WecoClient(api_key=key, max_connections=workers) as client:
        backoff = 1.0
        while True:
            seen = journal.query("SELECT coalesce(max(seq), 0) AS n FROM events")[0]["n"]
            pending = pending_count(journal, run_id)
            progress = progress_factory(pending) if progress_factory and pending else None
            one = sync(
                journal, client=client, run_id=run_id, workers=workers, progress=progress, should_stop=stopping.is_set
            )
            _merge(total, one)
            if not one.pending:
                autosync.set_cooldown(journal.path, 0)
            if not watch or stopping.is_set() or one.auth_failed:
                break
            if one.sent and on_pass is not None:
                on_pass(one)
            if one.pending and (one.unreachable or one.failed):
                stopping.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 1.0
            while not stopping.is_set():  # wait for new events
                stopping.wait(poll)
                newest = journal.query("SELECT coalesce(max(seq), 0) AS n FROM events")[0]["n"]
                if newest > seen:
                    break
            if stopping.is_set():
                break
    total.elapsed = time.monotonic() - start
    return total


def dry_run(run_ref: str | None = None) -> list[dict[str, Any]]:
    """What ``sync`` would send now, without sending (``sync --dry-run``)."""
    with Journal() as journal:
        run_id = journal.require_run(run_ref)["id"] if run_ref else None
        return plan(journal, run_id)
