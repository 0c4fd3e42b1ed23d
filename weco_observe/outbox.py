"""The outbox: every event's delivery state, every transition between states, every outbox query.

Each ``init`` and ``log`` adds one event (``enqueue``, inside the journal's own
transaction). The replay engine (``replay.py``) moves events through the states
below and holds no SQL of its own; ``status``, ``sync``, bundles and views read
the outbox through the queries here.

States (a real column since migration m003)::

    pending ──────────────► delivered            (2xx)
       │  ╲                 possible_duplicate   (a create delivered after an unanswered attempt)
       │   ╲─► in_flight ─► (create only: committed *before* the request goes out)
       │          │
       │          └──► ambiguous ─► in_flight ... (no answer: it may have been applied)
       ├─► rejected ─► pending (``sync --retry-rejected``) or discarded (``discard --rejected``)
       └─► superseded                             (a newer state of the same step was delivered)

- ``pending``: to send. A transient failure keeps it pending with ``attempts`` and ``last_error``.
- ``in_flight``: a create whose request is out with no answer yet. Creating a run is
  not idempotent on the server, so the attempt is committed first; a sync killed
  mid-request leaves the event here, and the next attempt knows the server may
  already hold the run.
- ``ambiguous``: a create whose attempt got no answer (timeout, dropped connection);
  sent again later. ``unanswered`` counts such attempts.
- ``delivered`` / ``possible_duplicate``: answered 2xx; the second when an earlier
  attempt went unanswered, so the server may also hold a run whose
  ``metadata.weco_observe_local_id`` is this run's local id.
- ``rejected``: the API refused it (a 4xx other than auth), with the reason in ``last_error``.
- ``superseded``: a step event older than a delivered state of the same step: never sent.
- ``discarded``: a rejected event the user gave up on (``weco observe discard --rejected``), or an
  unsent event of a run whose create was: with no run on the server it can never be sent. Kept;
  nothing is ever deleted.

An unsent event of a run whose create is ``rejected`` or ``discarded`` is *blocked*: no sync can
send it until the create is fixed and retried (``sync --retry-rejected``) or the run given up.

``last_error`` is the last failure's message, for people; no code parses it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .records import CREATE, LOG, DamagedText, Event, Run, Step, disagrees, loads

if TYPE_CHECKING:
    from .journal import Journal

__all__ = [
    "AMBIGUOUS",
    "DELIVERED",
    "DISCARDED",
    "IN_FLIGHT",
    "PENDING",
    "POSSIBLE_DUPLICATE",
    "REJECTED",
    "SENT",
    "STATES",
    "SUPERSEDED",
    "UNSENT",
    "begin_create",
    "bundle_state",
    "count_blocked",
    "count_rejected",
    "count_unsent",
    "counts",
    "create_delivered",
    "create_failed",
    "create_of",
    "current_state_event",
    "discard_rejected",
    "duplicate_note",
    "enqueue",
    "failed",
    "fingerprints",
    "import_event",
    "known",
    "known_ids",
    "newest_seq",
    "other_create",
    "plan_events",
    "problems",
    "rejected",
    "requeue_rejected",
    "run_states",
    "runs_to_send",
    "steps_delivered",
    "steps_to_send",
    "superseded",
    "sync_word",
    "unsent_and_rejected_by_run",
]

PENDING = "pending"
IN_FLIGHT = "in_flight"
AMBIGUOUS = "ambiguous"
DELIVERED = "delivered"
POSSIBLE_DUPLICATE = "possible_duplicate"
REJECTED = "rejected"
SUPERSEDED = "superseded"
DISCARDED = "discarded"
STATES = (PENDING, IN_FLIGHT, AMBIGUOUS, DELIVERED, POSSIBLE_DUPLICATE, REJECTED, SUPERSEDED, DISCARDED)
#: still to be sent
UNSENT = (PENDING, IN_FLIGHT, AMBIGUOUS)
#: the server has it
SENT = (DELIVERED, POSSIBLE_DUPLICATE)

_UNSENT = "('pending', 'in_flight', 'ambiguous')"
#: runs whose create will not be sent: their other events cannot be sent either
_BLOCKED_RUNS = "(SELECT run_id FROM events WHERE kind = 'create_run' AND state IN ('rejected', 'discarded'))"
_MAX_ERROR = 2000


def _rows(journal: Journal, sql: str, params: Any = ()) -> list[sqlite3.Row]:
    return journal.query(sql, params)


def _one(journal: Journal, sql: str, params: Any = ()) -> Any:
    return journal.query(sql, params)[0][0]


def _run_filter(run_id: str | None, column: str = "run_id") -> tuple[str, tuple[Any, ...]]:
    return (f" AND {column} = ?", (run_id,)) if run_id is not None else ("", ())


# -- writing new events (inside the journal's transaction) ---------------------------------


_INSERT_EVENT = (
    f"INSERT INTO events ({', '.join(Event.NEW_COLUMNS)}) VALUES ({', '.join('?' * len(Event.NEW_COLUMNS))})"
)


def enqueue(conn: sqlite3.Connection, event: Event) -> None:
    """Add a new event (``pending``, or the state it carries) in the caller's transaction."""
    conn.execute(_INSERT_EVENT, event.to_row())


def enqueue_many(conn: sqlite3.Connection, events: list[Event]) -> None:
    """:func:`enqueue` for many events, in their order (a merge's batch: one statement)."""
    conn.executemany(_INSERT_EVENT, [event.to_row() for event in events])


def known(conn: sqlite3.Connection, event_id: str) -> bool:
    """True if an event with this id is already journaled (replays and merges are idempotent by id)."""
    return conn.execute("SELECT 1 FROM events WHERE id = ?", (event_id,)).fetchone() is not None


def known_ids(conn: sqlite3.Connection, event_ids: list[str]) -> set[str]:
    """Which of ``event_ids`` are already journaled: :func:`known` for a batch, in few queries."""
    found: set[str] = set()
    for i in range(0, len(event_ids), 500):
        chunk = event_ids[i : i + 500]
        marks = ", ".join("?" * len(chunk))
        found.update(row[0] for row in conn.execute(f"SELECT id FROM events WHERE id IN ({marks})", chunk))
    return found


def import_event(conn: sqlite3.Connection, event: Event, *, carried: bool, newer_step: bool) -> str | None:
    """Merge an event from elsewhere (a bundle); return the state it got here, None if already known.

    ``carried``: the other journal delivered it to the same server run, so its
    ``delivered``/``superseded`` state holds here too. Otherwise it is sent from
    here (``pending``) unless ``newer_step`` says a newer state of its step is
    already here (``superseded``).
    """
    row = conn.execute("SELECT state FROM events WHERE id = ?", (event.id,)).fetchone()
    if row is not None:
        if carried and row[0] in UNSENT and event.state in (DELIVERED, SUPERSEDED):
            conn.execute(
                "UPDATE events SET state = ?, delivered_at = ? WHERE id = ?", (event.state, time.time(), event.id)
            )
        return None
    if carried and event.state in (DELIVERED, SUPERSEDED):
        state = event.state
    else:
        state = SUPERSEDED if newer_step and event.kind == LOG else PENDING
    delivered_at = None if state == PENDING else time.time()
    enqueue(conn, Event(**{**event.__dict__, "state": state, "delivered_at": delivered_at, "seq": None}))
    return state


def other_create(conn: sqlite3.Connection, run_id: str, event_id: str) -> str | None:
    """The id of a create of ``run_id`` other than ``event_id``, if this journal has one."""
    row = conn.execute(
        "SELECT id FROM events WHERE run_id = ? AND kind = 'create_run' AND id != ? LIMIT 1", (run_id, event_id)
    ).fetchone()
    return row[0] if row else None


# -- what to send --------------------------------------------------------------------------


def runs_to_send(journal: Journal, run_id: str | None = None) -> list[str]:
    """Runs with events still to send, oldest pending event first."""
    where, params = _run_filter(run_id)
    return [
        r[0]
        for r in _rows(
            journal,
            f"SELECT run_id, min(seq) AS first FROM events WHERE state IN {_UNSENT}{where}"
            " GROUP BY run_id ORDER BY first",
            params,
        )
    ]


def create_of(journal: Journal, run_id: str) -> Event | None:
    """A run's create event (None for a remote-only run); marked damaged (``Event.damage``) when its
    payload cannot be read or disagrees with the run's and step 0's rows."""
    rows = _rows(
        journal, "SELECT * FROM events WHERE run_id = ? AND kind = 'create_run' ORDER BY seq LIMIT 1", (run_id,)
    )
    return _against_step(journal, Event.from_row(rows[0]), 0) if rows else None


def _against_step(journal: Journal, event: Event, step: int) -> Event:
    """``event``, marked damaged when the step row that names it holds another state (a flipped byte
    in one copy: neither is sent until ``doctor --repair`` rebuilds the event from the step)."""
    rows = _rows(journal, "SELECT * FROM steps WHERE run_id = ? AND step = ?", (event.run_id, step))
    runs = _rows(journal, "SELECT * FROM runs WHERE id = ?", (event.run_id,)) if rows and event.kind == CREATE else []
    return _checked_against(event, rows[0] if rows else None, runs[0] if runs else None)


def _checked_against(event: Event, step_row: Any, run_row: Any = None) -> Event:
    """:func:`_against_step` on rows already read (``run_row`` for a create only)."""
    if step_row is not None and any(isinstance(step_row[k], DamagedText) for k in step_row.keys()):
        return event  # the step's row is the damaged copy (doctor says so); the event is what was logged
    try:
        state = Step.from_row(step_row) if step_row is not None else None
        run = Run.from_row(run_row) if run_row is not None else None
    except ValueError:  # the step's or run's row is the damaged copy: doctor says so; the event is fine
        return event
    if state is not None and disagrees(event, state, run):
        return replace(
            event,
            damage=f"the payload of event {event.id} disagrees with its step's row (one holds a flipped byte):"
            " run `weco observe doctor --repair`",
        )
    return event


_EVENT_COLUMNS = (
    "seq", "id", "run_id", "kind", "step", "payload", "state", "attempts", "unanswered", "last_error", "created_at",
    "delivered_at",
)  # fmt: skip
# Each unsent step event with the event its step row names (the step's current state) and that row,
# so a page of steps is read in one query, not three per step: under 32 sending threads those
# queries queued on the journal's one connection (issue 11).
_STEP_PAGE = (
    "SELECT e.*, CASE WHEN json_valid(e.payload) THEN json_extract(e.payload, '$.parent_step') IS NULL"
    " ELSE 1 END AS chained, "
    + ", ".join(f"c.{col} AS c_{col}" for col in _EVENT_COLUMNS)
    + ", "
    + ", ".join(f"s.{col} AS s_{col}" for col in Step.COLUMNS)
    + " FROM events e LEFT JOIN steps s ON s.run_id = e.run_id AND s.step = e.step"
    " LEFT JOIN events c ON c.id = s.event_id"
    f" WHERE e.state IN {_UNSENT} AND e.run_id = ? AND e.kind = 'log_step' AND e.seq > ? ORDER BY e.seq LIMIT ?"
)


def steps_to_send(journal: Journal, run_id: str, after_seq: int, limit: int) -> list[sqlite3.Row]:
    """A page of a run's unsent step events after ``after_seq``: the event's columns, ``chained`` (sent
    without a parent, left to the server's auto-chaining; a damaged payload reads as chained and is
    rejected when sent), and its step's current state for :func:`current_state_event`."""
    return _rows(journal, _STEP_PAGE, (run_id, after_seq, limit))


def current_state_event(row: sqlite3.Row) -> Event:
    """The event holding the current state of a page row's step (the step row names it; a bundle
    import can make that an event with a lower seq than the row's), else the row's own event.
    Marked damaged when it disagrees with its step's row (see :func:`_against_step`)."""
    if row["c_kind"] != LOG:
        return Event.from_row(row)
    current = Event.from_row({col: row[f"c_{col}"] for col in _EVENT_COLUMNS})
    step = {col: row[f"s_{col}"] for col in Step.COLUMNS} if row["s_run_id"] is not None else None
    return _checked_against(current, step)


def plan_events(journal: Journal, run_id: str) -> Iterator[tuple[Event, Event | None]]:
    """For ``sync --dry-run``: a run's unsent events, the create first, each paired with the unsent
    event holding its step's latest state (None when that is the event itself or settled)."""
    for row in journal.iter_query(
        "SELECT e.*, l.id AS l_id, l.payload AS l_payload, l.created_at AS l_created_at, l.state AS l_state"
        " FROM events e LEFT JOIN steps s ON s.run_id = e.run_id AND s.step = e.step"
        f" LEFT JOIN events l ON l.id = s.event_id AND l.state IN {_UNSENT} AND l.kind = 'log_step'"
        f" WHERE e.state IN {_UNSENT} AND e.run_id = ? ORDER BY e.kind = 'log_step', e.seq",
        (run_id,),
    ):
        latest = None
        if row["l_id"] is not None:
            latest = Event(
                id=row["l_id"],
                run_id=row["run_id"],
                kind=LOG,
                step=row["step"],
                payload=loads(row["l_payload"]),
                created_at=row["l_created_at"],
                state=row["l_state"],
            )
        yield Event.from_row(row), latest


def newest_seq(journal: Journal) -> int:
    """The newest event's seq (0 for none): it grows with every write, so pollers compare it."""
    return _one(journal, "SELECT coalesce(max(seq), 0) FROM events")


def count_unsent(journal: Journal, run_id: str | None = None, after_seq: int = 0) -> int:
    where, params = _run_filter(run_id)
    return _one(
        journal, f"SELECT count(*) FROM events WHERE state IN {_UNSENT} AND seq > ?{where}", (after_seq, *params)
    )


def count_rejected(journal: Journal, run_id: str | None = None) -> int:
    where, params = _run_filter(run_id)
    return _one(journal, f"SELECT count(*) FROM events WHERE state = 'rejected'{where}", params)


def count_blocked(journal: Journal, run_id: str | None = None) -> int:
    """Unsent events that no sync can send: those of runs whose create was rejected or discarded."""
    where, params = _run_filter(run_id)
    return _one(
        journal, f"SELECT count(*) FROM events WHERE state IN {_UNSENT}{where} AND run_id IN {_BLOCKED_RUNS}", params
    )


def run_states(journal: Journal, run_id: str) -> dict[str, int]:
    """``{state: count}`` of one run's events."""
    return {
        r[0]: r[1]
        for r in _rows(journal, "SELECT state, count(*) FROM events WHERE run_id = ? GROUP BY state", (run_id,))
    }


def unsent_and_rejected_by_run(journal: Journal, run_id: str | None = None) -> dict[tuple[str, str], int]:
    """``{(run_id, "pending" | "rejected"): count}`` for the views (in flight and ambiguous count as pending)."""
    where, params = _run_filter(run_id)
    out: dict[tuple[str, str], int] = {}
    for rid, state, n in _rows(
        journal,
        f"SELECT run_id, state, count(*) FROM events WHERE state IN ('pending', 'in_flight', 'ambiguous', 'rejected')"
        f"{where} GROUP BY run_id, state",
        params,
    ):
        key = (rid, REJECTED if state == REJECTED else PENDING)
        out[key] = out.get(key, 0) + n
    return out


def sync_word(state: str | None) -> str:
    """One word for a step's sync state in the views: unsent states read ``pending``, a possible
    duplicate ``delivered``; no event at all (never journaled here) ``local``."""
    if state is None:
        return "local"
    return PENDING if state in UNSENT else DELIVERED if state in SENT else state


def fingerprints(journal: Journal) -> dict[str, str | None]:
    """Each run's newest event as ``"seq:id"``: it changes whenever the run's steps change (views cache)."""
    return {
        r[0]: r[1]
        for r in _rows(
            journal,
            "SELECT r.id, (SELECT e.seq || ':' || e.id FROM events e WHERE e.run_id = r.id"
            " ORDER BY e.seq DESC LIMIT 1) FROM runs r",
        )
    }


def counts(journal: Journal) -> dict[str, int]:
    """Events by state, every state present (for ``status``)."""
    out = dict.fromkeys(STATES, 0)
    for state, n in _rows(journal, "SELECT state, count(*) FROM events GROUP BY state"):
        out[state] = n
    return out


def problems(journal: Journal | None, limit: int = 20) -> dict[str, Any]:
    """For ``status``: rejected events with their reasons, unsent events that failed before, and
    creates that may have made a second server run (all empty for no journal yet).

    Returns ``{"rejected": [{id, run_id, kind, step, last_error}], "retrying": n, "last_error":
    the newest failure's message or None, "possible_duplicates": [{run_id, note}]}``.
    """
    if journal is None:
        return {"rejected": [], "retrying": 0, "last_error": None, "possible_duplicates": []}
    rejected = [
        dict(row)
        for row in _rows(
            journal,
            "SELECT id, run_id, kind, step, last_error FROM events WHERE state = 'rejected' ORDER BY seq LIMIT ?",
            (limit,),
        )
    ]
    retrying = _one(journal, f"SELECT count(*) FROM events WHERE state IN {_UNSENT} AND attempts > 0")
    last = _rows(
        journal,
        f"SELECT last_error FROM events WHERE state IN {_UNSENT} AND last_error IS NOT NULL ORDER BY seq DESC LIMIT 1",
    )
    duplicates = [
        {"run_id": r[0], "note": duplicate_note(r[0])}
        for r in _rows(
            journal, "SELECT run_id FROM events WHERE state = 'possible_duplicate' ORDER BY seq LIMIT ?", (limit,)
        )
    ]
    return {
        "rejected": rejected,
        "retrying": retrying,
        "last_error": last[0][0] if last else None,
        "possible_duplicates": duplicates,
    }


def duplicate_note(run_id: str) -> str:
    return (
        "an earlier attempt of its create got no answer; the server may also hold a run whose"
        f" metadata.weco_observe_local_id is {run_id}"
    )


# -- transitions ---------------------------------------------------------------------------------


def begin_create(journal: Journal, event_id: str) -> bool:
    """Commit one attempt of a create *before* sending it; True if an earlier attempt may have been applied.

    An event still ``in_flight`` here means an earlier attempt was cut short (a
    kill, a crash) with no answer: it counts as unanswered.
    """
    with journal.write() as conn:
        row = conn.execute("SELECT state, unanswered FROM events WHERE id = ?", (event_id,)).fetchone()
        state, unanswered = row if row else (PENDING, 0)
        unanswered += state == IN_FLIGHT
        conn.execute(
            "UPDATE events SET state = 'in_flight', attempts = attempts + 1, unanswered = ? WHERE id = ?",
            (unanswered, event_id),
        )
    return unanswered > 0


def create_delivered(journal: Journal, event_id: str, run_id: str, server_id: str) -> bool:
    """Store the server id and mark the create delivered in one transaction; True if it is a possible duplicate."""
    with journal.write() as conn:
        conn.execute("UPDATE runs SET server_id = ? WHERE id = ?", (server_id, run_id))
        conn.execute(
            "UPDATE events SET state = CASE WHEN unanswered > 0 THEN 'possible_duplicate' ELSE 'delivered' END,"
            " delivered_at = ?, last_error = NULL WHERE id = ?",
            (time.time(), event_id),
        )
        return bool(conn.execute("SELECT unanswered FROM events WHERE id = ?", (event_id,)).fetchone()[0])


def create_failed(journal: Journal, event_id: str, error: str, *, answered: bool) -> None:
    """A create attempt failed. ``answered``: the server answered, so it was not applied; otherwise
    (timeout, dropped connection) it may have been, and the create becomes ``ambiguous``."""
    with journal.write() as conn:
        conn.execute(
            "UPDATE events SET unanswered = unanswered + ?, last_error = ?,"
            " state = CASE WHEN unanswered + ? > 0 THEN 'ambiguous' ELSE 'pending' END WHERE id = ?",
            (0 if answered else 1, error[:_MAX_ERROR], 0 if answered else 1, event_id),
        )


def failed(journal: Journal, event_id: str, error: str, attempts: int = 1) -> None:
    """A transient failure of a step: it stays unsent with its attempt count and last error."""
    with journal.write() as conn:
        conn.execute(
            "UPDATE events SET attempts = attempts + ?, last_error = ? WHERE id = ?",
            (attempts, error[:_MAX_ERROR], event_id),
        )


def rejected(journal: Journal, event_id: str, reason: str, attempts: int = 1) -> None:
    """The API refused the event, or it is damaged here: keep it, with the reason."""
    with journal.write() as conn:
        conn.execute(
            "UPDATE events SET state = 'rejected', attempts = attempts + ?, last_error = ? WHERE id = ?",
            (attempts, reason[:_MAX_ERROR], event_id),
        )


def superseded(journal: Journal, event_id: str) -> None:
    """A step event older than a settled state of its step: never send it."""
    with journal.write() as conn:
        conn.execute(
            f"UPDATE events SET state = 'superseded', delivered_at = ? WHERE id = ? AND state IN {_UNSENT}",
            (time.time(), event_id),
        )


def steps_delivered(journal: Journal, items: list[tuple[str, str, int, int, int, int]]) -> int:
    """Mark steps delivered in one transaction (one fsync) and supersede the older unsent events of
    the same (run, step), which they replaced. Returns how many were superseded.

    Each item is ``(event_id, run_id, step, seq, attempts, from_seq)``; ``from_seq``
    (the oldest unsent event of the step, when known) bounds the scan. A crash
    before the commit only means those steps are sent again, which the server's
    upsert makes harmless.
    """
    now = time.time()
    count = 0
    with journal.write() as conn:
        for event_id, run_id, step, seq, attempts, from_seq in items:
            conn.execute(
                "UPDATE events SET state = 'delivered', attempts = attempts + ?, delivered_at = ?,"
                " last_error = NULL WHERE id = ?",
                (attempts, now, event_id),
            )
            count += conn.execute(
                f"UPDATE events SET state = 'superseded', delivered_at = ? WHERE state IN {_UNSENT}"
                " AND run_id = ? AND seq >= ? AND seq < ? AND step = ? AND kind = 'log_step'",
                (now, run_id, from_seq, seq, step),
            ).rowcount
    return count


def requeue_rejected(journal: Journal, run_id: str | None = None) -> int:
    """Make rejected events unsent again (``sync --retry-rejected``); return how many."""
    where, params = _run_filter(run_id)
    with journal.write() as conn:
        return conn.execute(f"UPDATE events SET state = 'pending' WHERE state = 'rejected'{where}", params).rowcount


def discard_rejected(journal: Journal, run_id: str | None = None) -> tuple[int, int]:
    """Give up on rejected events, in one transaction: they become ``discarded`` (kept, never sent), and so
    do the unsent events of runs whose create is discarded (they could never be sent). Returns
    ``(rejected events discarded, blocked events discarded)``."""
    where, params = _run_filter(run_id)
    with journal.write() as conn:
        rejected = conn.execute(
            f"UPDATE events SET state = 'discarded' WHERE state = 'rejected'{where}", params
        ).rowcount
        blocked = conn.execute(
            f"UPDATE events SET state = 'discarded' WHERE state IN {_UNSENT}{where} AND run_id IN"
            " (SELECT run_id FROM events WHERE kind = 'create_run' AND state = 'discarded')",
            params,
        ).rowcount
    return rejected, blocked


def bundle_state(state: str) -> str:
    """The state a bundle carries (format 1 knows four): unsent states travel as ``pending``,
    a possible duplicate as ``delivered``, a discarded event as ``rejected``."""
    return {IN_FLIGHT: PENDING, AMBIGUOUS: PENDING, POSSIBLE_DUPLICATE: DELIVERED, DISCARDED: REJECTED}.get(
        state, state
    )
