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
  hashes), its delivery state and attempts. Nothing is ever deleted.
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


SCHEMA_VERSION = len(migrations._migrations)


def apply(conn) -> int:
    """Apply every pending migration to an open sqlite3 connection; return the new version."""
    db = Database(conn)
    migrations.apply(db)
    version = len(migrations.applied(db))
    conn.execute(f"PRAGMA user_version = {version}")
    return version
