"""The local journal: the only code that writes runs, steps, code blobs and the outbox.

Every ``init`` and ``log`` is one SQLite transaction (``BEGIN IMMEDIATE`` ...
``COMMIT`` with ``synchronous=FULL`` in WAL mode): when the call returns, the
step is on disk, and a crash at any moment leaves either all of it or none.

The journal is opened on the hot path of ``weco observe log``, so this module
imports only the standard library. The schema version is read with ``PRAGMA
user_version``; sqlite-utils and the migrations are imported only when one must
run, under a file lock so concurrent first opens do not race.

Tree rule (resolved once, at log time, and stored): a step logged with
``parent_step`` has that parent. Otherwise its parent is the highest-numbered
step below it, among the run's steps in this journal, whose status is not
``failed``; step 0 (the baseline) has none. Because the parent is stored, the
tree never depends on the order in which events later reach a server.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import codestore, ids, paths, validate
from .errors import InvalidInput, JournalUnavailable, UnknownRun

#: Must equal the number of migrations in ``migrations.py`` (a test checks it).
SCHEMA_VERSION = 2
DEFAULT_BUSY_TIMEOUT = 30.0


#: Insert a step or replace its state (keeping when it was first logged): one statement
#: for ``log_step`` and for bundle merges.
_UPSERT_STEP = (
    "INSERT INTO steps (run_id, step, status, description, metrics, code, parent_step,"
    " metadata, event_id, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT (run_id, step) DO UPDATE SET status = excluded.status,"
    " description = excluded.description, metrics = excluded.metrics, code = excluded.code,"
    " parent_step = excluded.parent_step, metadata = excluded.metadata,"
    " event_id = excluded.event_id, updated_at = excluded.updated_at"
)


def busy_timeout() -> float:
    """Seconds a writer waits for the lock: ``$WECO_OBSERVE_BUSY_TIMEOUT`` or 30."""
    try:
        return float(os.environ.get("WECO_OBSERVE_BUSY_TIMEOUT", DEFAULT_BUSY_TIMEOUT))
    except ValueError:
        return DEFAULT_BUSY_TIMEOUT


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _loads(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        try:
            os.chmod(path, 0o700)
        except OSError:
            pass


def _private_file(path: Path) -> None:
    """Create the journal file 0600 before SQLite does (SQLite copies its mode to -wal/-shm)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except FileExistsError:
        return
    os.close(fd)


class Journal:
    """An open journal. Thread-safe; hold one per process for speed.

    >>> j = Journal("/tmp/demo/journal.db")  # doctest: +SKIP
    >>> run_id = j.create_run(source_code={"train.py": "x = 1\\n"}, metric="loss", maximize=False)
    >>> j.log_step(run_id, 1, metrics={"loss": 0.5})["parent_step"]
    0
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, replay_spill: bool = True):
        self.path = Path(path) if path is not None else paths.journal_path()
        self._lock = threading.RLock()
        self._texts: OrderedDict[str, tuple[bytes, int]] = OrderedDict()
        self._known_blobs: set[str] = set()
        try:
            _private_dir(self.path.parent)
            _private_file(self.path)
            self.conn = sqlite3.connect(
                str(self.path),
                timeout=busy_timeout(),
                isolation_level=None,
                check_same_thread=False,
            )
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            wal = self.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if not wal or version < SCHEMA_VERSION:
                self._setup()
                version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise JournalUnavailable(
                    f"journal {self.path} has schema version {version}, newer than this "
                    f"weco-observe understands ({SCHEMA_VERSION}): upgrade weco-observe"
                )
        except (sqlite3.Error, OSError) as exc:
            raise JournalUnavailable(f"cannot open journal {self.path}: {exc}") from None
        if replay_spill:
            from . import spill

            spill.replay(self)

    # -- plumbing -------------------------------------------------------------

    def _setup(self) -> None:
        """Switch a new journal to WAL and apply pending migrations, one process at a time.

        Switching to WAL needs an exclusive lock that SQLite does not wait for with the
        busy handler, so concurrent first opens serialise on a file lock instead.
        """
        import fcntl

        with open(self.path.with_name(self.path.name + ".migrate-lock"), "a") as lock:
            os.chmod(lock.name, 0o600)
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self.conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    self.conn.execute("PRAGMA journal_mode=WAL")
                if self.conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                    from . import migrations

                    migrations.apply(self.conn)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. Takes the write lock up front (``BEGIN IMMEDIATE``) so
        concurrent writers queue on the busy timeout instead of failing to upgrade."""
        with self._lock:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise JournalUnavailable(f"cannot write journal {self.path}: {exc}") from None
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                self._forget_uncommitted()
                raise
            try:
                self.conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                self._forget_uncommitted()
                raise JournalUnavailable(f"cannot write journal {self.path}: {exc}") from None

    def _forget_uncommitted(self) -> None:
        # The blob caches may name blobs inserted by the rolled-back transaction.
        self._known_blobs.clear()
        self._texts.clear()

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        try:
            with self.write() as conn:
                yield conn
        except sqlite3.Error as exc:
            raise JournalUnavailable(f"cannot write journal {self.path}: {exc}") from None

    def query(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        """Read rows as ``sqlite3.Row`` (mapping-like)."""
        with self._lock:
            cur = self.conn.execute(sql, params)
            cur.row_factory = sqlite3.Row
            return cur.fetchall()

    def iter_query(self, sql: str, params: Any = (), batch: int = 500) -> Iterator[sqlite3.Row]:
        """Stream rows in batches (for 100k-event outboxes); holds a read snapshot while iterating."""
        with self._lock:
            cur = self.conn.cursor()
            cur.row_factory = sqlite3.Row
            cur.execute(sql, params)
        while True:
            with self._lock:
                rows = cur.fetchmany(batch)
            if not rows:
                return
            yield from rows

    # -- code blobs -----------------------------------------------------------

    def _remember(self, digest: str, data: bytes, depth: int) -> None:
        self._texts[digest] = (data, depth)
        self._texts.move_to_end(digest)
        while len(self._texts) > 256:
            self._texts.popitem(last=False)

    def _blob(self, digest: str) -> tuple[bytes, int]:
        cached = self._texts.get(digest)
        if cached is not None:
            return cached
        row = self.conn.execute(
            "SELECT base, depth, prefix, suffix, data FROM blobs WHERE hash = ?", (digest,)
        ).fetchone()
        if row is None:
            raise KeyError(digest)
        base_hash, depth, prefix, suffix, payload = row
        base = self._blob(base_hash)[0] if base_hash else None
        data = codestore.decode(payload, prefix, suffix, base)
        self._remember(digest, data, depth)
        return data, depth

    def read_blob(self, digest: str) -> str:
        """The text of a code blob by its hash."""
        with self._lock:
            return self._blob(digest)[0].decode("utf-8")

    def read_code(self, manifest: Mapping[str, str] | None) -> dict[str, str]:
        """Turn a manifest ``{path: hash}`` back into ``{path: text}``."""
        return {path: self.read_blob(digest) for path, digest in (manifest or {}).items()}

    def _store_code(
        self, conn: sqlite3.Connection, code: Mapping[str, str], base: Mapping[str, str] | None
    ) -> dict[str, str]:
        manifest: dict[str, str] = {}
        for path, text in code.items():
            data = text.encode("utf-8")
            digest = codestore.text_hash(data)
            manifest[path] = digest
            if digest in self._known_blobs:
                continue
            if conn.execute("SELECT 1 FROM blobs WHERE hash = ?", (digest,)).fetchone() is None:
                base_hash = (base or {}).get(path)
                base_data, base_depth = None, 0
                if base_hash:
                    try:
                        base_data, base_depth = self._blob(base_hash)
                    except KeyError:
                        base_hash = None
                depth, prefix, suffix, payload = codestore.encode(data, base_data, base_depth)
                conn.execute(
                    "INSERT INTO blobs (hash, size, base, depth, prefix, suffix, data) VALUES (?,?,?,?,?,?,?)",
                    (digest, len(data), base_hash if depth else None, depth, prefix, suffix, payload),
                )
                self._remember(digest, data, depth)
            self._known_blobs.add(digest)
        return manifest

    # -- runs -----------------------------------------------------------------

    def find_run(self, ref: str, *, prefix: bool = False) -> sqlite3.Row | None:
        """The run whose local id or server id is ``ref`` (or, with ``prefix``, starts with it uniquely).

        Raises InvalidInput when a prefix matches more than one run.
        """
        rows = self.query("SELECT * FROM runs WHERE id = ? OR server_id = ?", (ref, ref))
        if rows or not prefix or not ref:
            return rows[0] if rows else None
        like = ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self.query(
            "SELECT * FROM runs WHERE id LIKE ? ESCAPE '\\' OR server_id LIKE ? ESCAPE '\\' LIMIT 3",
            (like, like),
        )
        if len(rows) > 1:
            raise InvalidInput(f"run id prefix {ref!r} matches several runs: give more characters")
        return rows[0] if rows else None

    def require_run(self, ref: str, *, prefix: bool = True) -> sqlite3.Row:
        run = self.find_run(ref, prefix=prefix)
        if run is None:
            raise UnknownRun(f"no run {ref!r} in journal {self.path}: see `weco observe runs`")
        return run

    def create_run(
        self,
        *,
        source_code: Mapping[str, str],
        metric: str,
        maximize: bool = False,
        name: str | None = None,
        additional_instructions: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        event_id: str | None = None,
    ) -> str:
        """Record a new run with its baseline code as step 0 and queue its create; return the local id."""
        code, name, additional_instructions, meta = validate.check_run_args(
            source_code, metric, name, additional_instructions, metadata
        )
        run_id = run_id or ids.new_run_id()
        event_id = event_id or ids.ulid()
        now = time.time()
        with self._writing() as conn:
            if conn.execute("SELECT 1 FROM events WHERE id = ?", (event_id,)).fetchone():
                return run_id
            manifest = self._store_code(conn, code, None)
            conn.execute(
                "INSERT INTO runs (id, server_id, remote_only, name, metric, maximize,"
                " additional_instructions, metadata, created_at, updated_at)"
                " VALUES (?, NULL, 0, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    name,
                    metric,
                    int(bool(maximize)),
                    additional_instructions,
                    _dumps(meta) if meta else None,
                    now,
                    now,
                ),
            )
            conn.execute(
                "INSERT INTO steps (run_id, step, status, description, metrics, code, parent_step,"
                " metadata, event_id, created_at, updated_at)"
                " VALUES (?, 0, 'completed', NULL, NULL, ?, NULL, NULL, ?, ?, ?)",
                (run_id, _dumps(manifest), event_id, now, now),
            )
            payload: dict[str, Any] = {
                "source_code": manifest,
                "metric_name": metric,
                "maximize": bool(maximize),
            }
            if name is not None:
                payload["name"] = name
            if additional_instructions is not None:
                payload["additional_instructions"] = additional_instructions
            if meta:
                payload["metadata"] = meta
            conn.execute(
                "INSERT INTO events (id, run_id, kind, step, payload, created_at)"
                " VALUES (?, ?, 'create_run', NULL, ?, ?)",
                (event_id, run_id, _dumps(payload), now),
            )
        return run_id

    def _run_for_log(self, conn: sqlite3.Connection, ref: str, now: float) -> tuple[str, str | None, bool]:
        row = conn.execute(
            "SELECT id, server_id, remote_only FROM runs WHERE id = ? OR server_id = ?", (ref, ref)
        ).fetchone()
        if row is not None:
            return row[0], row[1], bool(row[2])
        if not ids.looks_like_server_id(ref):
            raise UnknownRun(
                f"unknown --run-id {ref!r}: use the id printed by `weco observe init` "
                "(or a Weco server run id); `weco observe runs` lists them"
            )
        local = ids.new_run_id()
        conn.execute(
            "INSERT INTO runs (id, server_id, remote_only, created_at, updated_at) VALUES (?, ?, 1, ?, ?)",
            (local, ref, now, now),
        )
        return local, ref, True

    # -- steps ----------------------------------------------------------------

    def log_step(
        self,
        run: str,
        step: int,
        *,
        status: str = "completed",
        description: str | None = None,
        metrics: Mapping[str, float] | None = None,
        code: Mapping[str, str] | None = None,
        parent_step: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        event_id: str | None = None,
    ) -> dict[str, Any]:
        """Record one step (insert or update) and queue it for sync, in one transaction.

        ``run`` is a local id or a server id; an unknown server id becomes a
        remote-only run. Fields left as None keep the step's previous value when
        the step is logged again (the API's upsert does the same). Returns the
        stored state: ``run_id``, ``step``, ``status``, ``parent_step``, ``event_id``.
        """
        description, metrics, code, metadata = validate.check_step_args(
            step, status, description, metrics, code, parent_step, metadata
        )
        event_id = event_id or ids.ulid()
        now = time.time()
        with self._writing() as conn:
            if conn.execute("SELECT 1 FROM events WHERE id = ?", (event_id,)).fetchone():
                existing = self.query("SELECT * FROM steps WHERE event_id = ?", (event_id,))
                return _step_result(existing[0]) if existing else {"event_id": event_id}
            run_id, _server_id, remote_only = self._run_for_log(conn, run, now)
            prev = conn.execute(
                "SELECT description, metrics, code, metadata, parent_step FROM steps WHERE run_id = ? AND step = ?",
                (run_id, step),
            ).fetchone()
            if parent_step is not None:
                known = conn.execute(
                    "SELECT 1 FROM steps WHERE run_id = ? AND step = ?", (run_id, parent_step)
                ).fetchone()
                if known is None and not remote_only:
                    raise InvalidInput(
                        f"--parent-step {parent_step}: run {run} has no step {parent_step}; "
                        "log that step first or pick an existing one"
                    )
                parent = parent_step
            elif step == 0:
                parent = None
            elif prev is not None:
                parent = prev[4]  # a re-log keeps the parent, like every field it leaves out
            else:
                # The last successful step below; the baseline when every later one failed.
                row = conn.execute(
                    "SELECT step FROM steps WHERE run_id = ? AND step < ?"
                    " AND (status != 'failed' OR step = 0) ORDER BY step DESC LIMIT 1",
                    (run_id, step),
                ).fetchone()
                parent = row[0] if row else None
            prev_code = _loads(prev[2]) if prev else None
            manifest = None
            if code is not None:
                base = prev_code
                if base is None:
                    # The delta base: the parent's code, or the nearest code below it. Walk the
                    # primary key backwards; an ORDER BY on an expression would sort the whole run.
                    base_row = conn.execute(
                        "SELECT code FROM steps WHERE run_id = ? AND code IS NOT NULL"
                        " AND step <= ? ORDER BY step DESC LIMIT 1",
                        (run_id, step if parent is None else parent),
                    ).fetchone()
                    base = _loads(base_row[0]) if base_row else None
                manifest = self._store_code(conn, code, base)
            if prev is not None:
                description = description if description is not None else prev[0]
                metrics = metrics if metrics is not None else _loads(prev[1])
                manifest = manifest if manifest is not None else prev_code
                metadata = metadata if metadata is not None else _loads(prev[3])
            payload: dict[str, Any] = {"step": step, "status": status}
            if description is not None:
                payload["description"] = description
            if metrics:
                payload["metrics"] = metrics
            if manifest:
                payload["code"] = manifest
            if parent is not None:
                payload["parent_step"] = parent
            if metadata:
                payload["metadata"] = metadata
            conn.execute(
                _UPSERT_STEP,
                (
                    run_id,
                    step,
                    status,
                    description,
                    _dumps(metrics) if metrics is not None else None,
                    _dumps(manifest) if manifest is not None else None,
                    parent,
                    _dumps(metadata) if metadata is not None else None,
                    event_id,
                    now,
                    now,
                ),
            )
            conn.execute(
                "INSERT INTO events (id, run_id, kind, step, payload, created_at) VALUES (?, ?, 'log_step', ?, ?, ?)",
                (event_id, run_id, step, _dumps(payload), now),
            )
            conn.execute("UPDATE runs SET updated_at = ? WHERE id = ?", (now, run_id))
        return {
            "run_id": run_id,
            "step": step,
            "status": status,
            "parent_step": parent,
            "event_id": event_id,
            # Only when the step existed, so replaying a first log's event_id (answered by _step_result above)
            # returns the same dict.
            **({"updated": True} if prev is not None else {}),
        }

    # -- outbox (used by sync) ------------------------------------------------

    def mark_failed(self, event_id: str, error: str, attempts: int = 1) -> None:
        """A transient failure: the event stays pending with its attempt count and last error."""
        with self._writing() as conn:
            conn.execute(
                "UPDATE events SET attempts = attempts + ?, last_error = ? WHERE id = ?",
                (attempts, error[:2000], event_id),
            )

    def mark_rejected(self, event_id: str, reason: str, attempts: int = 1) -> None:
        """The API refused the event (a 4xx other than auth): keep it, with the reason."""
        with self._writing() as conn:
            conn.execute(
                "UPDATE events SET state = 'rejected', attempts = attempts + ?, last_error = ? WHERE id = ?",
                (attempts, reason[:2000], event_id),
            )

    def requeue_rejected(self, run_id: str | None = None) -> int:
        """Make rejected events pending again (``sync --retry-rejected``); return how many."""
        with self._writing() as conn:
            if run_id is None:
                cur = conn.execute("UPDATE events SET state = 'pending' WHERE state = 'rejected'")
            else:
                cur = conn.execute(
                    "UPDATE events SET state = 'pending' WHERE state = 'rejected' AND run_id = ?", (run_id,)
                )
            return cur.rowcount

    # -- outbox (used by sync): attempts, per-step delivery ---------------------
    # A create is not idempotent on the server, so its attempt is committed
    # *before* the request goes out: a sync killed mid-request leaves a marker
    # that the next sync turns into a "possible duplicate" note.

    IN_FLIGHT = "in flight: sent, no answer yet"
    AMBIGUOUS = "ambiguous: "
    POSSIBLE_DUPLICATE = "possible duplicate: "

    def begin_create_attempt(self, event_id: str) -> bool:
        """Count one attempt of a create before sending it; True if an earlier attempt may have been applied."""
        with self._writing() as conn:
            row = conn.execute("SELECT last_error FROM events WHERE id = ?", (event_id,)).fetchone()
            last = (row[0] if row else None) or ""
            earlier = last.startswith((self.IN_FLIGHT, self.AMBIGUOUS))
            conn.execute(
                "UPDATE events SET attempts = attempts + 1, last_error = ? WHERE id = ?",
                (
                    self.AMBIGUOUS + "an earlier attempt got no answer; " + self.IN_FLIGHT
                    if earlier
                    else self.IN_FLIGHT,
                    event_id,
                ),
            )
        return earlier

    def mark_create_delivered(
        self, event_id: str, run_id: str, server_id: str, possible_duplicate: bool = False
    ) -> None:
        """Store the server id and mark the create delivered in one transaction (the attempt is already counted).

        After an ambiguous earlier attempt the server may hold a second run for
        this local id; the note stays in ``last_error`` so ``sync`` can report it.
        """
        note = (
            (
                f"{self.POSSIBLE_DUPLICATE}an earlier attempt got no answer; the server may also hold a run"
                f" whose metadata.weco_observe_local_id is {run_id}"
            )
            if possible_duplicate
            else None
        )
        with self._writing() as conn:
            conn.execute("UPDATE runs SET server_id = ? WHERE id = ?", (server_id, run_id))
            conn.execute(
                "UPDATE events SET state = 'delivered', delivered_at = ?, last_error = ? WHERE id = ?",
                (time.time(), note, event_id),
            )

    def mark_step_delivered(
        self, event_id: str, run_id: str, step: int, seq: int, attempts: int = 1, from_seq: int = 0
    ) -> int:
        """A step's latest state was answered 2xx: mark it delivered and supersede the
        older pending events of the same (run, step), which it replaced. Returns how many.

        ``from_seq`` (the oldest pending event of the step, when the caller knows it)
        bounds the scan: the events index is by (state, run, seq), not by step."""
        return self.mark_steps_delivered([(event_id, run_id, step, seq, attempts, from_seq)])

    def mark_steps_delivered(self, items: list[tuple[str, str, int, int, int, int]]) -> int:
        """Group commit of :meth:`mark_step_delivered` for many steps, one transaction (one fsync).

        Each item is ``(event_id, run_id, step, seq, attempts, from_seq)``. Sync
        batches these: a crash before the commit only means those steps are sent
        again, which the server's upsert makes harmless. Returns how many older
        events were superseded."""
        now = time.time()
        superseded = 0
        with self._writing() as conn:
            for event_id, run_id, step, seq, attempts, from_seq in items:
                conn.execute(
                    "UPDATE events SET state = 'delivered', attempts = attempts + ?, delivered_at = ?,"
                    " last_error = NULL WHERE id = ?",
                    (attempts, now, event_id),
                )
                superseded += conn.execute(
                    "UPDATE events SET state = 'superseded', delivered_at = ? WHERE state = 'pending'"
                    " AND run_id = ? AND seq >= ? AND seq < ? AND step = ? AND kind = 'log_step'",
                    (now, run_id, from_seq, seq, step),
                ).rowcount
        return superseded

    def mark_superseded(self, event_id: str) -> None:
        """A pending step event older than a state of its step that is already delivered: never send it."""
        with self._writing() as conn:
            conn.execute(
                "UPDATE events SET state = 'superseded', delivered_at = ? WHERE id = ? AND state = 'pending'",
                (time.time(), event_id),
            )

    # -- reads ----------------------------------------------------------------

    def steps(self, run_id: str) -> list[dict[str, Any]]:
        """Every step of a run (by local id), oldest step number first, JSON columns decoded."""
        return [_step_row(row) for row in self.query("SELECT * FROM steps WHERE run_id = ? ORDER BY step", (run_id,))]

    def counts(self) -> dict[str, int]:
        """Totals for ``status``: runs, steps and events by state."""
        out = {"runs": 0, "steps": 0, "pending": 0, "delivered": 0, "rejected": 0, "superseded": 0}
        with self._lock:
            out["runs"] = self.conn.execute("SELECT count(*) FROM runs").fetchone()[0]
            out["steps"] = self.conn.execute("SELECT count(*) FROM steps").fetchone()[0]
            for state, n in self.conn.execute("SELECT state, count(*) FROM events GROUP BY state"):
                out[state] = n
        return out

    def problems(self, limit: int = 20) -> dict[str, Any]:
        """For ``status``: rejected events with their reasons, and pending events that failed before.

        Returns ``{"rejected": [{id, run_id, kind, step, last_error}, ...], "retrying": n,
        "last_error": the newest failure's message or None, "possible_duplicates": [{run_id,
        note}, ...]}`` (creates that may have made a second server run after a lost answer).
        """
        rejected = [
            dict(row)
            for row in self.query(
                "SELECT id, run_id, kind, step, last_error FROM events WHERE state = 'rejected' ORDER BY seq LIMIT ?",
                (limit,),
            )
        ]
        with self._lock:
            retrying = self.conn.execute(
                "SELECT count(*) FROM events WHERE state = 'pending' AND attempts > 0"
            ).fetchone()[0]
            last = self.conn.execute(
                "SELECT last_error FROM events WHERE state = 'pending' AND last_error IS NOT NULL"
                " ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            duplicates = [
                {"run_id": run_id, "note": note}
                for run_id, note in self.conn.execute(
                    "SELECT run_id, last_error FROM events WHERE kind = 'create_run' AND state = 'delivered'"
                    " AND last_error LIKE ? ORDER BY seq LIMIT ?",
                    (self.POSSIBLE_DUPLICATE + "%", limit),
                )
            ]
        return {
            "rejected": rejected,
            "retrying": retrying,
            "last_error": last[0] if last else None,
            "possible_duplicates": duplicates,
        }

    def schema_version(self) -> int:
        with self._lock:
            return self.conn.execute("PRAGMA user_version").fetchone()[0]

    # -- bundles (issue 5: air-gapped transfer by file; see bundle.py) ---------

    def record_bundle(self, bundle_id: str, path: str, max_seq: int, events: int, run_filter: str | None) -> None:
        """Remember that every event up to ``max_seq`` (of ``run_filter``, or all runs) is in a bundle."""
        with self._writing() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO bundles (id, path, created_at, max_seq, events, run_filter)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (bundle_id, path, time.time(), max_seq, events, run_filter),
            )

    def merge_bundle(
        self,
        bundle_id: str,
        source: str,
        runs: list[dict[str, Any]],
        blobs: Iterator[dict[str, Any]],
        steps: Iterator[dict[str, Any]],
        events: Iterator[dict[str, Any]],
        batch: int = 2000,
    ) -> dict[str, Any]:
        """Merge a verified bundle idempotently by id; return what changed.

        Runs match by local id, then by server id (two boxes that logged to the
        same server run share it). A bundle's server id is adopted only by a run
        that has none here. A step row replaces ours only if its event id is
        newer. A new event arrives ``pending`` unless the bundle says the server
        already has it on the same server run (then it keeps ``delivered`` /
        ``superseded``), or a newer state of its step is already here
        (``superseded``).

        Written in transactions of ``batch`` rows, so loggers wait at most one
        batch (not a whole 100k-event bundle) for the lock; steps before events,
        so a step's newest state is known before its events are queued. An
        interrupted merge is finished by importing the bundle again: the import
        is recorded only at the end, and every row merges by id.
        """
        out: dict[str, Any] = {
            "bundle_id": bundle_id,
            "already_imported": False,
            "runs_new": 0,
            "runs_known": 0,
            "server_ids_adopted": 0,
            "blobs_new": 0,
            "steps_updated": 0,
            "events_new": 0,
            "events_known": 0,
            "events_pending": 0,
            "conflicts": [],
        }
        with self._writing() as conn:
            if conn.execute("SELECT 1 FROM imports WHERE bundle_id = ?", (bundle_id,)).fetchone():
                out["already_imported"] = True
                return out
            mapping, same_server = self._merge_runs(conn, runs, out)
        for rows, merge in ((blobs, self._merge_blobs), (steps, self._merge_steps), (events, self._merge_events)):
            chunk: list[dict[str, Any]] = []
            for row in rows:
                chunk.append(row)
                if len(chunk) >= batch:
                    with self._writing() as conn:
                        merge(conn, chunk, mapping, same_server, out)
                    chunk = []
            if chunk:
                with self._writing() as conn:
                    merge(conn, chunk, mapping, same_server, out)
        with self._writing() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO imports (bundle_id, source, imported_at, events) VALUES (?, ?, ?, ?)",
                (bundle_id, source, time.time(), out["events_new"]),
            )
        return out

    def _merge_runs(
        self, conn: sqlite3.Connection, runs: list[dict[str, Any]], out: dict[str, Any]
    ) -> tuple[dict[str, str], dict[str, bool]]:
        """Insert or match each run; return (bundle run id -> local run id, local id -> same server run)."""
        now = time.time()
        mapping: dict[str, str] = {}
        same_server: dict[str, bool] = {}
        for run in runs:
            rid, sid = run["id"], run.get("server_id")
            row = conn.execute("SELECT id, server_id FROM runs WHERE id = ?", (rid,)).fetchone()
            if row is None and sid:
                row = conn.execute("SELECT id, server_id FROM runs WHERE server_id = ?", (sid,)).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO runs (id, server_id, remote_only, name, metric, maximize,"
                    " additional_instructions, metadata, created_at, updated_at)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        rid,
                        sid,
                        int(bool(run.get("remote_only"))),
                        run.get("name"),
                        run.get("metric"),
                        run.get("maximize"),
                        run.get("additional_instructions"),
                        _dumps(run["metadata"]) if run.get("metadata") is not None else None,
                        run.get("created_at") or now,
                        run.get("updated_at") or now,
                    ),
                )
                mapping[rid], same_server[rid] = rid, bool(sid)
                out["runs_new"] += 1
                continue
            local, local_sid = row
            mapping[rid] = local
            out["runs_known"] += 1
            if sid and local_sid is None:
                if conn.execute("SELECT 1 FROM runs WHERE server_id = ?", (sid,)).fetchone():
                    out["conflicts"].append(f"run {rid}: server id {sid} already belongs to another run here")
                else:
                    conn.execute("UPDATE runs SET server_id = ? WHERE id = ?", (sid, local))
                    local_sid = sid
                    out["server_ids_adopted"] += 1
            elif sid and local_sid != sid:
                out["conflicts"].append(
                    f"run {rid}: the bundle's box synced it as {sid}, this box as {local_sid}; "
                    f"new steps go to {local_sid}"
                )
            same_server[local] = bool(sid) and local_sid == sid
        return mapping, same_server

    def _merge_blobs(
        self,
        conn: sqlite3.Connection,
        blobs: list[dict[str, Any]],
        mapping: dict[str, str],
        same_server: dict[str, bool],
        out: dict[str, Any],
    ) -> None:
        for blob in blobs:
            cur = conn.execute(
                "INSERT OR IGNORE INTO blobs (hash, size, base, depth, prefix, suffix, data) VALUES (?,?,?,?,?,?,?)",
                (blob["hash"], blob["size"], blob["base"], blob["depth"], blob["prefix"], blob["suffix"], blob["data"]),
            )
            out["blobs_new"] += cur.rowcount

    def _merge_steps(
        self,
        conn: sqlite3.Connection,
        steps: list[dict[str, Any]],
        mapping: dict[str, str],
        same_server: dict[str, bool],
        out: dict[str, Any],
    ) -> None:
        now = time.time()
        for step in steps:
            run_id = mapping[step["run_id"]]
            row = conn.execute(
                "SELECT event_id FROM steps WHERE run_id = ? AND step = ?", (run_id, step["step"])
            ).fetchone()
            if row is not None and row[0] >= step["event_id"]:
                continue
            conn.execute(
                _UPSERT_STEP,
                (
                    run_id,
                    step["step"],
                    step["status"],
                    step.get("description"),
                    *(_dumps(step[k]) if step.get(k) is not None else None for k in ("metrics", "code")),
                    step.get("parent_step"),
                    _dumps(step["metadata"]) if step.get("metadata") is not None else None,
                    step["event_id"],
                    step.get("created_at") or now,
                    step.get("updated_at") or now,
                ),
            )
            # The run's last activity is its newest step's, wherever that step was logged.
            conn.execute(
                "UPDATE runs SET updated_at = max(updated_at, ?) WHERE id = ?",
                (step.get("updated_at") or now, run_id),
            )
            out["steps_updated"] += 1

    def _merge_events(
        self,
        conn: sqlite3.Connection,
        events: list[dict[str, Any]],
        mapping: dict[str, str],
        same_server: dict[str, bool],
        out: dict[str, Any],
    ) -> None:
        now = time.time()
        for event in events:
            run_id = mapping[event["run_id"]]
            carried = event["state"] in ("delivered", "superseded") and same_server.get(run_id, False)
            row = conn.execute("SELECT state FROM events WHERE id = ?", (event["id"],)).fetchone()
            if row is not None:
                if carried and row[0] == "pending":
                    conn.execute(
                        "UPDATE events SET state = ?, delivered_at = ? WHERE id = ?", (event["state"], now, event["id"])
                    )
                out["events_known"] += 1
                continue
            state = event["state"] if carried else "pending"
            if state == "pending" and event["kind"] == "log_step":
                newer = conn.execute(
                    "SELECT 1 FROM steps WHERE run_id = ? AND step = ? AND event_id > ?",
                    (run_id, event["step"], event["id"]),
                ).fetchone()
                state = "superseded" if newer else state
            conn.execute(
                "INSERT INTO events (id, run_id, kind, step, payload, state, created_at, delivered_at)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (
                    event["id"],
                    run_id,
                    event["kind"],
                    event["step"],
                    _dumps(event["payload"]),
                    state,
                    event.get("created_at") or now,
                    None if state == "pending" else now,
                ),
            )
            if event["kind"] == "create_run":
                # A bundle that carries a create but not step 0's row still gets its baseline.
                conn.execute(
                    "INSERT OR IGNORE INTO steps (run_id, step, status, code, event_id, created_at, updated_at)"
                    " VALUES (?, 0, 'completed', ?, ?, ?, ?)",
                    (run_id, _dumps(event["payload"]["source_code"]), event["id"], now, now),
                )
            out["events_new"] += 1
            out["events_pending"] += state == "pending"


def _step_row(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    for key in ("metrics", "code", "metadata"):
        out[key] = _loads(out[key])
    return out


def _step_result(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "run_id": row["run_id"],
        "step": row["step"],
        "status": row["status"],
        "parent_step": row["parent_step"],
        "event_id": row["event_id"],
    }
