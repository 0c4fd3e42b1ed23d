"""The journal schema, as named migrations. Never edit one that has shipped: add a new one.

Applied with sqlite-utils ``Migrations`` (which records each by name in
``_sqlite_migrations``); after they run, ``PRAGMA user_version`` is set to the
number applied, so the hot path (``weco observe log``) can check the version with
one cheap PRAGMA and never import sqlite-utils unless a migration must run.

The model (see README "Where data lives"):

- ``runs``: one row per run. ``id`` is the local id (``local-<ulid>``), made on
  the machine that logged it; ``server_id`` is the Weco API's id once known.
  A *remote-only* run was first seen as a server id (made by the official client,
  say): it has no create event and its steps go straight to that id.
- ``steps``: the current state of each (run, step), with the tree parent
  resolved at log time, the code manifest ``{path: blob hash}`` and the id of
  the event that last set it (so merges keep the newest state).
- ``blobs``: content-addressed (sha256 of the UTF-8 text) and zlib-compressed;
  a changed file is stored as a delta (common prefix/suffix) against the
  previous version of that file, chains capped in depth.
- ``events``: the outbox. One row per ``init`` (``create_run``) and per ``log``
  (``log_step``), holding the request body as it will be sent (code as blob
  hashes), its delivery state and attempts (``outbox.py`` owns the states and
  every transition). Nothing is ever deleted.
- ``bundles``: what was written to which bundle file, for incremental bundles.
"""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

migrations = Migrations("weco_observe")


@migrations()
def m001_initial(db: Database) -> None:
    """The first schema: runs, steps, blobs, events (the outbox)."""
    db.executescript(
        """
        CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            server_id TEXT UNIQUE,
            remote_only INTEGER NOT NULL DEFAULT 0,
            name TEXT,
            metric TEXT,
            maximize INTEGER,
            additional_instructions TEXT,
            metadata TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE TABLE blobs (
            hash TEXT PRIMARY KEY,
            size INTEGER NOT NULL,
            base TEXT,
            depth INTEGER NOT NULL DEFAULT 0,
            prefix INTEGER NOT NULL DEFAULT 0,
            suffix INTEGER NOT NULL DEFAULT 0,
            data BLOB NOT NULL
        );
        CREATE TABLE steps (
            run_id TEXT NOT NULL REFERENCES runs(id),
            step INTEGER NOT NULL,
            status TEXT NOT NULL,
            description TEXT,
            metrics TEXT,
            code TEXT,
            parent_step INTEGER,
            metadata TEXT,
            event_id TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (run_id, step)
        ) WITHOUT ROWID;
        CREATE TABLE events (
            seq INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            run_id TEXT NOT NULL REFERENCES runs(id),
            kind TEXT NOT NULL CHECK (kind IN ('create_run', 'log_step')),
            step INTEGER,
            payload TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'delivered', 'rejected', 'superseded')),
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            created_at REAL NOT NULL,
            delivered_at REAL
        );
        CREATE INDEX events_by_state ON events (state, run_id, seq);
        CREATE INDEX events_by_run ON events (run_id, seq);
        """
    )


@migrations()
def m002_bundles(db: Database) -> None:
    """Bundles: which events went into which file, so the next bundle is incremental."""
    db.executescript(
        """
        CREATE TABLE bundles (
            id TEXT PRIMARY KEY,
            path TEXT,
            created_at REAL NOT NULL,
            max_seq INTEGER NOT NULL,
            events INTEGER NOT NULL,
            run_filter TEXT
        );
        CREATE TABLE imports (
            bundle_id TEXT PRIMARY KEY,
            source TEXT,
            imported_at REAL NOT NULL,
            events INTEGER NOT NULL
        );
        """
    )


@migrations()
def m003_outbox_states(db: Database) -> None:
    """The outbox's delivery states become real column values (they were free text in ``last_error``).

    0.1.0 kept three states as prefixes of ``last_error``: a create sent with no
    answer yet ("in flight: ..."), a create whose attempt got no answer and that
    waits to be sent again ("ambiguous: ..."), and a create delivered after such an
    attempt ("possible duplicate: ..."). They become the states ``in_flight``,
    ``ambiguous`` and ``possible_duplicate``, with ``unanswered`` counting the
    attempts that may have been applied without an answer; ``discarded`` is new
    (rejected events the user gave up on, kept). SQLite cannot change a CHECK
    constraint in place, so the table is rebuilt; every row keeps its ``seq``.
    """
    db.execute(
        """
        CREATE TABLE events_m003 (
            seq INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            run_id TEXT NOT NULL REFERENCES runs(id),
            kind TEXT NOT NULL CHECK (kind IN ('create_run', 'log_step')),
            step INTEGER,
            payload TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'in_flight', 'ambiguous',
                'delivered', 'possible_duplicate', 'rejected', 'superseded', 'discarded')),
            attempts INTEGER NOT NULL DEFAULT 0,
            unanswered INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            created_at REAL NOT NULL,
            delivered_at REAL
        )
        """
    )
    in_flight = "in flight: sent, no answer yet"
    ambiguous = "ambiguous: "
    duplicate = "possible duplicate: "
    db.execute(
        """
        INSERT INTO events_m003 (seq, id, run_id, kind, step, payload, state, attempts, unanswered,
                                 last_error, created_at, delivered_at)
        SELECT seq, id, run_id, kind, step, payload,
            CASE
                WHEN state = 'pending' AND last_error = :in_flight THEN 'in_flight'
                WHEN state = 'pending' AND substr(last_error, 1, length(:ambiguous)) = :ambiguous
                     AND substr(last_error, -length(:in_flight)) = :in_flight THEN 'in_flight'
                WHEN state = 'pending' AND substr(last_error, 1, length(:ambiguous)) = :ambiguous THEN 'ambiguous'
                WHEN state = 'delivered' AND substr(last_error, 1, length(:duplicate)) = :duplicate
                     THEN 'possible_duplicate'
                ELSE state
            END,
            attempts,
            CASE
                WHEN substr(last_error, 1, length(:ambiguous)) = :ambiguous THEN 1
                WHEN state = 'delivered' AND substr(last_error, 1, length(:duplicate)) = :duplicate THEN 1
                ELSE 0
            END,
            CASE
                WHEN last_error = :in_flight THEN NULL
                WHEN substr(last_error, 1, length(:ambiguous)) = :ambiguous
                     AND substr(last_error, -length(:in_flight)) = :in_flight THEN NULL
                WHEN substr(last_error, 1, length(:ambiguous)) = :ambiguous
                     THEN substr(last_error, length(:ambiguous) + 1)
                WHEN state = 'delivered' AND substr(last_error, 1, length(:duplicate)) = :duplicate THEN NULL
                ELSE last_error
            END,
            created_at, delivered_at
        FROM events ORDER BY seq
        """,
        {"in_flight": in_flight, "ambiguous": ambiguous, "duplicate": duplicate},
    )
    db.execute("DROP TABLE events")
    db.execute("ALTER TABLE events_m003 RENAME TO events")
    db.execute("CREATE INDEX events_by_state ON events (state, run_id, seq)")
    db.execute("CREATE INDEX events_by_run ON events (run_id, seq)")


@migrations()
def m004_segment_progress(db: Database) -> None:
    """Cluster mode: how far the owner has merged each segment file.

    A live SDK writer keeps appending to its ``.open`` segment; remembering the
    offset lets each merge read only what is new. A row goes when its file does.
    """
    db.execute(
        "CREATE TABLE segment_progress (name TEXT PRIMARY KEY, offset INTEGER NOT NULL, updated_at REAL NOT NULL)"
    )


SCHEMA_VERSION = len(migrations._migrations)


def apply(conn) -> int:
    """Apply every pending migration to an open sqlite3 connection; return the new version."""
    db = Database(conn)
    migrations.apply(db)
    version = len(migrations.applied(db))
    conn.execute(f"PRAGMA user_version = {version}")
    return version
