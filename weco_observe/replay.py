"""The replay engine: unsent outbox events -> the Weco API -> delivered, rejected or still unsent.

One *pass* (:meth:`Replayer.run_pass`) works like this:

- Runs go in parallel (``workers`` threads, one keep-alive pool); the events of
  one run go in order, oldest first.
- A run's create goes first. Its server id is stored in the same transaction
  that marks the create delivered. A create is not idempotent on the server, so
  its attempt is committed *before* the request is sent (``outbox.begin_create``):
  if the answer never comes (timeout, dropped connection, a kill -9), the next
  attempt knows, and a delivered create is then flagged as a possible duplicate.
  The local run id travels in the create's metadata (``weco_observe_local_id``)
  so a duplicate can be traced on the server.
- Then its steps, addressed by the server id. Every event of a step carries
  the step's full state, so when a step was logged several times only its
  latest event is sent and the older ones become ``superseded``. The parent
  resolved at log time is always sent as ``parent_step``, so the server's tree
  equals the local tree whatever the order of arrival; several steps of a run
  are in flight at once (``step_window``).
- Retries (tenacity): exponential backoff with jitter, at most ``attempts`` tries
  per event per pass. A ``Retry-After`` up to ``max_retry_after`` (30 s) is
  waited for as asked, never less; a longer one stops the whole pass at once
  (the server asked everyone to come back later) and the result says when
  (``retry_at``). No retry wait ends past ``retry_budget`` (60 s) after the
  sync began, so a server answering "later" to everything cannot keep a
  ``sync`` busy for minutes. An
  event that still fails stays unsent with its attempt count and last error,
  and the rest of its run waits for the next pass (order is kept). When no
  connection can be opened at all the whole pass stops after a few quick tries,
  so an offline ``sync`` fails in seconds.
- A 401/403 stops the pass and changes nothing; so does an answer that is not
  the Weco API's (``ApiMisconfigured``: a wrong ``WECO_BASE_URL``), so a wrong
  URL never rejects an event or makes a create ambiguous. Any other 4xx marks the event
  ``rejected`` with the server's ``detail``: a rejected create blocks only its
  own run, a rejected step blocks nothing. An event whose code or payload is
  damaged in this journal is rejected too ("damaged locally"), and the rest
  is delivered. Nothing is ever deleted.

Every state change goes through ``outbox.py``; this module holds no SQL.

:func:`drain` is the one loop around passes ("send, then wait for new events,
backing off while the API fails") that serves ``sync``, ``sync --watch``, the
background syncer and ``WecoObserver.flush()``, each with its own
:class:`DrainPolicy`.

Events are streamed page by page (never all loaded): a 100,000-event outbox
syncs in bounded memory.
"""

from __future__ import annotations

import queue
import random
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import outbox
from .errors import ApiAuthFailed, ApiError, ApiMisconfigured, ApiRejected
from .journal import Journal
from .records import Event, wire_body
from .redact import redact
from .settings import Settings

__all__ = ["DrainPolicy", "PassResult", "Replayer", "RunSummary", "drain", "plan", "retry_clock", "sync"]

PAGE = 500
#: seconds of retry waiting one ``sync`` may spend in all (its passes share it)
RETRY_BUDGET = 60.0
#: the longest a draining loop (``sync --watch``) sleeps on a server's ``Retry-After`` before it looks again
MAX_RETRY_AT_WAIT = 3600.0
#: the error an event gets when this journal cannot build its request (a damaged blob or payload)
DAMAGED = "damaged locally: run `weco observe doctor --repair`"
_DAMAGE = (KeyError, ValueError, UnicodeDecodeError, zlib.error, TypeError)


def _text(exc: ApiError) -> str:
    """An error as it is stored (``last_error``) and reported: redacted, whatever made it."""
    return redact(str(exc))


def _reason(exc: ApiError) -> str:
    """A rejection's reason as it is stored: the server's ``detail``, redacted."""
    return redact(exc.detail or str(exc))


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
    discarded: int = 0
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
    #: unsent events a later sync can still send (not counting ``blocked``)
    pending: int = 0
    rejected_total: int = 0
    #: unsent events of runs whose create was rejected or discarded: no sync sends them until the
    #: create is fixed (``--retry-rejected``) or they are given up (``weco observe discard --rejected``)
    blocked: int = 0
    possible_duplicates: int = 0
    auth_failed: bool = False
    #: the server asked not to be retried before this time (epoch seconds; from ``Retry-After``)
    retry_at: float | None = None
    #: WECO_BASE_URL is wrong (what answers is not the Weco API): the pass stopped, nothing marked
    misconfigured: bool = False
    unreachable: bool = False
    last_error: str | None = None
    elapsed: float = 0.0
    runs: list[RunSummary] = field(default_factory=list)
    #: what each ``sync --bundle FILE`` import merged before sending
    imports: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """What is still actionable, and by whom: 78 the configuration (``WECO_BASE_URL``); 5 the key
        (``weco login``); 4 events a later sync can send (wait, then sync again); 6 events only the user
        can move (rejected, or blocked behind a rejected create: fix the cause and ``sync
        --retry-rejected``, or ``discard --rejected``); else 0. Discarded events count for nothing."""
        from .errors import EXIT_AUTH, EXIT_CONFIG, EXIT_OK, EXIT_PENDING, EXIT_REJECTED

        if self.misconfigured:
            return EXIT_CONFIG
        if self.auth_failed:
            return EXIT_AUTH
        if self.pending:
            return EXIT_PENDING
        if self.rejected_total or self.blocked:
            return EXIT_REJECTED
        return EXIT_OK

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["exit_code"] = self.exit_code
        if self.retry_at is not None:  # ISO 8601 in UTC, as JSON readers expect a time
            from datetime import datetime, timezone

            stamp = datetime.fromtimestamp(self.retry_at, timezone.utc).replace(microsecond=0)
            out["retry_at"] = stamp.isoformat().replace("+00:00", "Z")
        return out

    def add(self, one: PassResult) -> None:
        """Fold a later pass into this running total (its leftovers are the latest word)."""
        for key in ("sent", "delivered", "superseded", "rejected", "failed"):
            setattr(self, key, getattr(self, key) + getattr(one, key))
        self.pending = one.pending
        self.rejected_total = one.rejected_total
        self.blocked = one.blocked
        self.auth_failed = self.auth_failed or one.auth_failed
        self.misconfigured = self.misconfigured or one.misconfigured
        self.unreachable = one.unreachable
        self.retry_at = one.retry_at
        self.last_error = one.last_error or self.last_error
        known = {r.run_id: r for r in self.runs}
        for r in one.runs:
            known[r.run_id] = r
        self.runs = list(known.values())
        self.possible_duplicates = sum(1 for r in self.runs if r.possible_duplicate)


def retry_clock(at: float) -> str:
    """When the server may be retried, for people: ``HH:MM`` local time (with seconds when it is
    minutes away, with the date when it is not today).

    >>> len(retry_clock(time.time() + 3600)) in (5, 16)
    True
    """
    now = time.time()
    local = time.localtime(at)
    if time.strftime("%Y-%m-%d", local) != time.strftime("%Y-%m-%d", time.localtime(now)):
        return time.strftime("%Y-%m-%d %H:%M", local)
    return time.strftime("%H:%M:%S" if at - now < 600 else "%H:%M", local)


class _Halt(Exception):
    """The pass was told to stop (auth failure, unreachable API, deadline, signal)."""


class Replayer:
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
        wait_deadline: float | None = None,
        progress: Callable[[int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        batch_size: int = 200,
        batch_age: float = 0.2,
        step_window: int | None = None,
        dashboard_url: str | None = None,
    ):
        self.journal = journal
        self.client = client
        self.workers = max(1, workers)
        #: steps of one run in flight at once (they carry explicit parents); default: ``workers``
        self.step_window = max(1, step_window if step_window is not None else workers)
        self._step_pool: ThreadPoolExecutor | None = None
        self.attempts = max(1, attempts)
        self.unreachable_attempts = max(1, unreachable_attempts)
        self.initial_wait = initial_wait
        self.max_wait = max_wait
        self.max_retry_after = max_retry_after
        self.deadline = deadline
        #: no retry wait may end after this monotonic time (the sync's budget for waiting)
        self.wait_deadline = wait_deadline
        self.progress = progress
        self.should_stop = should_stop
        self.dashboard_url = dashboard_url
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
        # exponential backoff with full jitter on top: initial * 2^(n-1), capped, + U(0, initial);
        # never less than the server's Retry-After (a longer one than we wait stops the pass: _stop)
        base = min(self.max_wait, self.initial_wait * 2 ** (state.attempt_number - 1))
        base += random.uniform(0, self.initial_wait)
        exc = state.outcome.exception()
        retry_after = getattr(exc, "retry_after", None)
        if retry_after:
            return max(base, retry_after)
        return base

    def _stop(self, state: Any) -> bool:
        from . import api

        if self._halted():
            return True
        exc = state.outcome.exception()
        retry_after = getattr(exc, "retry_after", None)
        if retry_after and retry_after > self.max_retry_after:
            self._come_back_later(retry_after)
            return True
        if state.attempt_number >= self.attempts:
            return True
        if api.is_unreachable(exc) and state.attempt_number >= self.unreachable_attempts:
            return True
        end = time.monotonic() + self._wait(state)
        for deadline in (self.deadline, self.wait_deadline):
            if deadline is not None and end > deadline:
                if retry_after:
                    self._come_back_later(retry_after)
                return True
        return False

    def _come_back_later(self, retry_after: float) -> None:
        """The server asked not to be retried for longer than this sync will wait: stop the pass
        (every request would get the same answer) and remember when it may be retried."""
        at = time.time() + retry_after
        with self._lock:
            self._result.retry_at = max(self._result.retry_at or 0.0, at)
        self._halt.set()

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
            exc.attempts = attempts  # type: ignore[attr-defined]  # read back by the callers of call()
            raise

    # -- one pass -----------------------------------------------------------------

    def run_pass(self, run_id: str | None = None) -> PassResult:
        """Send everything unsent (for one run, or all) once; return what happened."""
        start = time.monotonic()
        self._result = result = PassResult()
        run_ids = outbox.runs_to_send(self.journal, run_id)
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
        result.blocked = outbox.count_blocked(self.journal, run_id)
        result.pending = outbox.count_unsent(self.journal, run_id) - result.blocked
        result.rejected_total = outbox.count_rejected(self.journal, run_id)
        result.elapsed = time.monotonic() - start
        result.runs = run_summaries(self.journal, run_ids, self.dashboard_url)
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
            self._result.last_error = _text(exc)
        if isinstance(exc, ApiAuthFailed):
            self._result.auth_failed = True
            self._halt.set()
        elif isinstance(exc, ApiMisconfigured):  # every request would meet the same server
            self._result.misconfigured = True
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
        run = journal.run(run_id)
        server_id = run.server_id
        if server_id is None:
            create = outbox.create_of(journal, run_id)
            if create is None or create.state not in outbox.UNSENT:
                return  # rejected (or missing): the run waits; its steps stay unsent
            server_id = self._send_create(run_id, create)
            if server_id is None:
                return
        else:
            create = outbox.create_of(journal, run_id)
            if create is not None and create.state in outbox.UNSENT:
                # The server already holds this run (an import, or an attempt cut short after the id was
                # stored): sending the create again would make a second run, so it is settled as delivered.
                outbox.create_delivered(journal, create.id, run_id, server_id)
        done_upto: dict[int, int] = {}
        cursor = 0
        while True:
            page = outbox.steps_to_send(journal, run_id, cursor, PAGE)
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
        # Finished sends come back through a queue (a done-callback), not wait(FIRST_COMPLETED): that
        # installs and removes a waiter on every future in flight for each step sent, under their locks.
        finished: queue.SimpleQueue[Future[bool]] = queue.SimpleQueue()
        inflight = 0
        ok = True

        def settle(most: int) -> None:
            """Take the sends that finished, waiting for more until at most ``most`` are in flight."""
            nonlocal inflight, ok
            while inflight > most or not finished.empty():
                future = finished.get()
                inflight -= 1
                ok = future.result() and ok

        try:
            for ev in batch:
                if not ok or self._halted():
                    break
                if self._step_pool is None or self.step_window <= 1 or (ev["chained"] and ev["step"] != 0):
                    settle(0)
                    if not ok:
                        break
                    ok = self._send_step(run_id, server_id, ev, done_upto)
                    continue
                settle(self.step_window - 1)
                if not ok:
                    break
                future = self._step_pool.submit(self._send_step, run_id, server_id, ev, done_upto)
                inflight += 1
                future.add_done_callback(finished.put)
        finally:
            settle(0)
        if self._halted():
            raise _Halt()
        return ok

    def _send_create(self, run_id: str, event: Event) -> str | None:
        journal = self.journal
        try:
            body = wire_body(event, journal.read_blob, local_id=run_id)
        except _DAMAGE as exc:
            outbox.rejected(journal, event.id, f"{DAMAGED} ({type(exc).__name__} reading its code)", attempts=0)
            self._tick(rejected=1)
            return None

        def send() -> str:
            outbox.begin_create(journal, event.id)
            try:
                return self.client.create_run(body)
            except ApiError as exc:
                if not exc.ambiguous:  # answered, so not applied: back to waiting
                    outbox.create_failed(journal, event.id, _text(exc), answered=True)
                raise

        try:
            server_id, _attempts = self.call(send)
        except ApiRejected as exc:
            outbox.rejected(journal, event.id, _reason(exc), attempts=0)
            self._tick(rejected=1, sent=1)
            return None
        except ApiError as exc:
            outbox.create_failed(journal, event.id, _text(exc), answered=not exc.ambiguous)
            self._tick(failed=1, sent=1)
            self._failed(exc)
            return None
        outbox.create_delivered(journal, event.id, run_id, server_id)
        self._tick(delivered=1, sent=1)
        return server_id

    def _send_step(self, run_id: str, server_id: str, ev: Any, done_upto: dict[int, int]) -> bool:
        """Send the latest state of ``ev``'s step; False if the rest of the run must wait."""
        journal = self.journal
        try:
            target = outbox.current_state_event(ev)
        except _DAMAGE as exc:
            outbox.rejected(journal, ev["id"], f"{DAMAGED} ({type(exc).__name__} reading its payload)", attempts=0)
            self._tick(rejected=1)
            return True
        if target.id != ev["id"] and target.state not in outbox.UNSENT:
            outbox.superseded(journal, ev["id"])  # the current state of this step is already settled
            done_upto[ev["step"]] = max(done_upto.get(ev["step"], -1), ev["seq"])
            self._tick(superseded=1)
            return True
        assert target.seq is not None
        try:
            body = wire_body(target, journal.read_blob)
        except _DAMAGE as exc:
            outbox.rejected(journal, target.id, f"{DAMAGED} ({type(exc).__name__} reading its code)", attempts=0)
            self._tick(rejected=1)
            return True
        try:
            _answer, attempts = self.call(lambda: self.client.log_step(server_id, body))
        except ApiRejected as exc:
            outbox.rejected(journal, target.id, _reason(exc), attempts=getattr(exc, "attempts", 1))
            self._tick(rejected=1, sent=1)
            return True
        except ApiError as exc:
            outbox.failed(journal, target.id, _text(exc), attempts=getattr(exc, "attempts", 1))
            self._tick(failed=1, sent=1)
            self._failed(exc)
            return False
        self._mark_delivered((target.id, run_id, ev["step"], target.seq, attempts, min(ev["seq"], target.seq)))
        if ev["seq"] > target.seq:
            outbox.superseded(journal, ev["id"])
            self._tick(superseded=1)
        done_upto[ev["step"]] = max(target.seq, ev["seq"])
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
            superseded = outbox.steps_delivered(self.journal, batch)
            if superseded:
                self._tick(superseded=superseded)


def run_summaries(journal: Journal, run_ids: list[str], dashboard_url: str | None = None) -> list[RunSummary]:
    """Per-run counts and dashboard links, for the final summary."""
    out: list[RunSummary] = []
    dashboard = dashboard_url or Settings.load().dashboard_url
    for run_id in run_ids:
        try:
            run = journal.run(run_id)
        except KeyError:
            continue
        summary = RunSummary(run_id=run_id, name=run.name, server_id=run.server_id)
        for state, n in outbox.run_states(journal, run_id).items():
            if state in outbox.UNSENT:
                summary.pending += n
            elif state in outbox.SENT:
                summary.delivered += n
            else:
                setattr(summary, state, n)
        create = outbox.create_of(journal, run_id)
        if create is not None:
            summary.possible_duplicate = create.state == outbox.POSSIBLE_DUPLICATE
            if create.state == outbox.REJECTED:
                summary.blocked = f"create rejected: {create.last_error}"
            elif create.state == outbox.DISCARDED and summary.pending:
                summary.blocked = "its create was discarded (`weco observe discard --rejected` gives these up too)"
        if run.server_id:
            summary.dashboard = f"{dashboard}/runs/{run.server_id}"
        out.append(summary)
    return out


# -- passes and the drain loop ---------------------------------------------------------


def sync(
    journal: Journal,
    client: Any,
    *,
    run_id: str | None = None,
    workers: int = 8,
    attempts: int = 5,
    passes: int = 3,
    deadline: float | None = None,
    retry_budget: float | None = RETRY_BUDGET,
    progress: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    **replayer_options: Any,
) -> PassResult:
    """Up to ``passes`` passes while a pass makes progress (a later pass picks up events logged
    meanwhile and runs whose create was delivered late). The caller holds the sync lock.

    Retry waits in all the passes end within ``retry_budget`` seconds of the start; a pass
    that the server asked to come back later (``retry_at``) is the last."""
    total = PassResult()
    start = time.monotonic()
    wait_deadline = None if retry_budget is None else start + retry_budget
    for _ in range(max(1, passes)):
        replayer = Replayer(
            journal,
            client,
            workers=workers,
            attempts=attempts,
            deadline=deadline,
            wait_deadline=wait_deadline,
            progress=progress,
            should_stop=should_stop,
            **replayer_options,
        )
        one = replayer.run_pass(run_id)
        total.add(one)
        if not one.pending or one.auth_failed or one.misconfigured or one.unreachable or one.sent == 0:
            break
        if one.retry_at is not None:
            break
        if should_stop is not None and should_stop():
            break
        if deadline is not None and time.monotonic() > deadline:
            break
    total.elapsed = time.monotonic() - start
    return total


@dataclass(frozen=True)
class DrainPolicy:
    """How :func:`drain` waits. The four users differ only here.

    - ``sync``: :meth:`once` (one round of passes, then return);
    - ``sync --watch``: :meth:`forever` (until stopped; back off while the API fails);
    - the background syncer: :meth:`background` (linger briefly for new events, give up after a while);
    - ``flush(timeout)``: :meth:`until` (until nothing is unsent or the deadline).
    """

    #: return once no new event arrived for this long (None: never)
    idle_exit: float | None = None
    #: return once the API has been failing for this long (None: never)
    give_up: float | None = None
    #: a monotonic time after which to return
    deadline: float | None = None
    backoff: float = 1.0
    max_backoff: float = 30.0
    poll: float = 0.5
    passes: int = 3

    @classmethod
    def once(cls) -> DrainPolicy:
        return cls(idle_exit=0.0, give_up=0.0)

    @classmethod
    def forever(cls, poll: float = 0.5) -> DrainPolicy:
        return cls(poll=poll)

    @classmethod
    def background(cls, linger: float, give_up: float) -> DrainPolicy:
        return cls(idle_exit=linger, give_up=give_up, poll=0.05, passes=1)

    @classmethod
    def until(cls, deadline: float | None) -> DrainPolicy:
        return cls(idle_exit=0.0, deadline=deadline, backoff=0.2, max_backoff=5.0)


@dataclass
class DrainResult:
    """A drain's running total and why it returned: ``idle``, ``stopped``, ``auth``, ``misconfigured``,
    ``gave_up`` or ``deadline``."""

    total: PassResult
    reason: str
    #: the newest event seq the drain had seen when it returned (no lost wake-ups)
    seen: int = 0


def drain(
    journal: Journal,
    client: Any,
    policy: DrainPolicy,
    *,
    run_id: str | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_pass: Callable[[PassResult], None] | None = None,
    progress_factory: Callable[[int], Callable[[int], None] | None] | None = None,
    refresh: Callable[[], Any] | None = None,
    **sync_options: Any,
) -> DrainResult:
    """Send what is unsent, then keep sending new events as they are journaled, until the policy says stop.

    While the API fails (unreachable, or events still failing after their
    retries) it waits ``backoff`` seconds, doubling up to ``max_backoff``; an
    idle drain polls the outbox's newest seq every ``poll`` seconds. Every wait
    ends early when ``should_stop`` turns true. ``on_pass`` gets each pass that
    sent something. ``refresh`` runs before each look for new events (cluster mode: it
    merges what writers appended to their segments, which is where new events arrive).
    """
    total = PassResult()
    start = time.monotonic()
    seen = outbox.newest_seq(journal)
    backoff = policy.backoff
    failing_since: float | None = None
    idle_since = time.monotonic()
    need_pass = True
    reason = "idle"

    def sleep(seconds: float) -> None:
        end = time.monotonic() + seconds
        while not should_stop() and (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))

    while True:
        if should_stop():
            reason = "stopped"
            break
        if need_pass:
            pending = outbox.count_unsent(journal, run_id) - outbox.count_blocked(journal, run_id)
            progress = progress_factory(pending) if progress_factory and pending else None
            one = sync(
                journal,
                client,
                run_id=run_id,
                passes=policy.passes,
                deadline=policy.deadline,
                progress=progress,
                should_stop=should_stop,
                **sync_options,
            )
            total.add(one)
            if one.sent and on_pass is not None:
                on_pass(one)
            if one.auth_failed:
                reason = "auth"
                break
            if one.misconfigured:
                reason = "misconfigured"
                break
            if one.pending and (one.unreachable or one.failed or one.retry_at is not None):
                now = time.monotonic()
                failing_since = failing_since or now
                # the next pass goes no sooner than the server asked (bounded: --watch re-checks hourly)
                wait = backoff
                if one.retry_at is not None:
                    wait = max(wait, min(one.retry_at - time.time(), MAX_RETRY_AT_WAIT))
                asked_past_give_up = one.retry_at is not None and now + wait > failing_since + (policy.give_up or 0)
                if policy.give_up is not None and (now - failing_since >= policy.give_up or asked_past_give_up):
                    reason = "gave_up"
                    break
                if policy.deadline is not None and now + wait > policy.deadline:
                    reason = "deadline"
                    break
                sleep(wait)
                backoff = min(backoff * 2, policy.max_backoff)
                continue
            failing_since, backoff, need_pass = None, policy.backoff, False
            idle_since = time.monotonic()
        if policy.idle_exit is not None and time.monotonic() - idle_since >= policy.idle_exit:
            break
        if policy.deadline is not None and time.monotonic() >= policy.deadline:
            reason = "deadline"
            break
        sleep(policy.poll)
        if refresh is not None:
            refresh()
        newest = outbox.newest_seq(journal)
        if newest > seen:
            seen, need_pass = newest, True
            idle_since = time.monotonic()
    total.elapsed = time.monotonic() - start
    return DrainResult(total, reason, seen)


def plan(journal: Journal, run_id: str | None = None, limit: int = 10_000) -> list[dict[str, Any]]:
    """What a sync would send, in the order it would (``sync --dry-run``): one dict per request.

    Runs in order of their oldest unsent event; within a run the create, then each
    step once, at the place of its oldest unsent event, with its latest state.
    """
    from .api import create_path, steps_path

    out: list[dict[str, Any]] = []
    for rid in [run_id] if run_id is not None else outbox.runs_to_send(journal):
        run = journal.run(rid)
        listed: set[int] = set()
        for event, latest in outbox.plan_events(journal, rid):
            if len(out) >= limit:
                return out
            if event.kind == "create_run":
                code = event.code()
                out.append(
                    {
                        "method": "POST",
                        "path": create_path(),
                        "run_id": rid,
                        "name": run.name,
                        "event": event.id,
                        "files": sorted(code.manifest()) if code else [],
                    }
                )
                continue
            assert event.step is not None
            if event.step in listed:
                continue
            listed.add(event.step)
            state = (latest or event).as_step()
            out.append(
                {
                    "method": "POST",
                    "path": steps_path(run.server_id)
                    if run.server_id
                    else f"/external/runs/<server id of {rid}>/steps",
                    "run_id": rid,
                    "event": (latest or event).id,
                    "step": event.step,
                    "status": state.status,
                    "parent_step": state.parent_step,
                    "files": sorted(state.code.manifest()) if state.code else [],
                }
            )
    return out


# -- entry points: `weco observe sync` and WecoObserver.flush() ---------------------------


def flush(journal_path: str | Path, timeout: float | None = 30.0, api_key: str | None = None) -> bool:
    """Deliver everything unsent now, waiting at most ``timeout`` seconds; True if nothing is left.

    Used by ``WecoObserver.flush()``. Without an API key nothing can be sent
    (False if events are unsent). A background syncer holding the journal is
    asked to give way.
    """
    from . import store
    from .api import WecoClient
    from .errors import ApiAuthFailed, InvalidInput, SyncBusy

    settings = Settings.load()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        with store.exclusive(settings, "flush", journal_path=Path(journal_path), timeout=timeout) as held:
            journal = held.journal
            if outbox.count_unsent(journal) == 0:
                return True
            with WecoClient(api_key=api_key) as client:
                done = drain(journal, client, DrainPolicy.until(deadline), refresh=held.merge)
            return done.total.pending == 0 and outbox.count_unsent(journal) == 0
    except SyncBusy:
        with store.reader(settings, Path(journal_path), wait=0) as journal:
            return outbox.count_unsent(journal) == 0
    except ApiAuthFailed:  # no key at all: nothing can be sent (documented: False)
        return False
    except (InvalidInput, ApiMisconfigured) as exc:  # a malformed key or URL: say why nothing was sent
        _warn(str(exc))
        return False


def _warn(message: str) -> None:
    """A warning from ``flush()``, as the SDK gives its own (a ``WecoObserveWarning``)."""
    import warnings

    from .sdk import WecoObserveWarning

    warnings.warn(f"weco-observe: flush: {redact(message)}", WecoObserveWarning, stacklevel=4)


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

    Replays spill files, imports ``bundles`` (``sync --bundle FILE``), takes the
    sync lock (waiting for another syncer unless ``wait`` is False), sends what
    is unsent and returns the result. With ``watch`` it keeps sending new events
    as they are journaled until SIGINT/SIGTERM, calling ``on_pass`` after each
    pass that sent something, and returns the last state.
    """
    import signal

    from . import spill, store, synclock
    from .api import WecoClient
    from .errors import ApiAuthFailed

    settings = Settings.load()
    stopping = threading.Event()
    previous: dict[Any, Any] = {}
    if watch and threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda *_: stopping.set())
    try:
        key = api_key or settings.api_key
        with store.exclusive(settings, "sync", wait=wait, on_wait=on_wait, should_stop=stopping.is_set) as held:
            journal = held.journal
            spill.replay(journal)
            imports = []
            if bundles:
                from . import bundle

                imports = [bundle.import_bundle(journal, path) for path in bundles]
            run_id = journal.require_run(run_ref)["id"] if run_ref else None
            if not key and not watch and not retry_rejected and outbox.count_unsent(journal, run_id) == 0:
                return PassResult(imports=imports)  # nothing to send: no key needed
            if not key:
                raise ApiAuthFailed(
                    f"no API key: {outbox.count_unsent(journal, run_id)} events wait in the journal;"
                    " run `weco login` (or set WECO_API_KEY), then `weco observe sync`"
                )
            if retry_rejected:
                outbox.requeue_rejected(journal, run_id)
            policy = DrainPolicy.forever(poll) if watch else DrainPolicy.once()
            with WecoClient(api_key=key, max_connections=workers) as client:
                done = drain(
                    journal,
                    client,
                    policy,
                    run_id=run_id,
                    should_stop=stopping.is_set,
                    on_pass=on_pass if watch else None,
                    progress_factory=progress_factory,
                    refresh=held.merge,
                    workers=workers,
                    dashboard_url=settings.dashboard_url,
                )
            if not done.total.pending:
                synclock.set_cooldown(journal.path, 0)
            done.total.imports = imports
            return done.total
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def dry_run(run_ref: str | None = None) -> list[dict[str, Any]]:
    """What ``sync`` would send now, without sending (``sync --dry-run``)."""
    from . import store

    with store.reader(Settings.load()) as journal:
        run_id = journal.require_run(run_ref)["id"] if run_ref else None
        return plan(journal, run_id)


def discard(run_ref: str | None = None) -> dict[str, Any]:
    """Give up on rejected events (``weco observe discard --rejected``): they stay in the journal,
    marked ``discarded``, and are never sent; so are the unsent events of a run whose create is
    discarded. Holds the journal as a sync does, so no sync is sending meanwhile.

    Returns ``{"rejected": n, "blocked": n, "runs": [{run_id, server_id, name, rejected}], "left":
    {"pending": n, "rejected": n, "blocked": n}}``: what was discarded, by run, and what the whole
    journal still holds unsent.
    """
    from . import store

    settings = Settings.load()
    with store.exclusive(settings, "discard", timeout=settings.busy_timeout) as held:
        journal = held.journal
        run_id = journal.require_run(run_ref)["id"] if run_ref else None
        by_run = {
            rid: n
            for (rid, state), n in outbox.unsent_and_rejected_by_run(journal, run_id).items()
            if state == outbox.REJECTED
        }
        rejected, blocked = outbox.discard_rejected(journal, run_id)
        runs = []
        for rid, n in sorted(by_run.items()):
            run = journal.run(rid)
            runs.append({"run_id": rid, "server_id": run.server_id, "name": run.name, "rejected": n})
        still_blocked = outbox.count_blocked(journal)
        left = {
            "pending": outbox.count_unsent(journal) - still_blocked,
            "rejected": outbox.count_rejected(journal),
            "blocked": still_blocked,
        }
    return {"rejected": rejected, "blocked": blocked, "runs": runs, "left": left}
