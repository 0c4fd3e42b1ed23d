"""``weco observe serve``: a Weco-compatible relay and team dashboard for a site with no route out.

Boxes ``sync`` to the relay as if it were Weco (``WECO_BASE_URL=https://relay:8420/v1``);
so can the official ``weco`` client and SDK. The relay keeps everything in a
weco-observe journal of its own (``show``, ``report``, ``ui``, ``bundle`` and
``doctor`` work on it unchanged, with ``WECO_OBSERVE_DIR`` pointing at its data
folder), shows every run of the site in one dashboard, and forwards its journal
upstream with the ordinary replay engine when a gateway opens.

- **The API** is the wire contract's (``shared/reference/weco-api.md``), as the
  emulator serves it: ``POST /v1/external/runs`` answers ``{"run_id": <uuid>}``;
  ``POST /v1/external/runs/{id}/steps`` upserts by (run, step) and answers
  ``{"run_id", "step", "parent_step"}``; 401 for a wrong or revoked key, 404 for
  an unknown run or path, 422 with ``{"detail"}`` for a bad body.
- **Durable before it answers.** Requests go to one writer thread that commits
  them in groups (one transaction, one fsync, for everything queued meanwhile),
  each request in its own savepoint so a bad one fails alone; a request is
  answered only after its group committed and the WAL holding it was fsync'd.
  ``kill -9`` at any moment, or a power cut, loses no answered request.
- **Exactly once from a box.** A create carrying ``metadata.weco_observe_local_id``
  gets the same relay run back when it is sent again (after a lost answer), so box
  to relay never makes a duplicate; steps upsert.
- **Keys** (``relay_keys``): stored as SHA-256 hashes; each run records the key that
  made it (``relay_runs``), which the dashboard shows as the box or user.
- **Upstream**: a process of its own drains the journal to ``--upstream`` with
  ``replay.drain``, backing off quietly while the route is down.

The relay's own tables live in a migration set of their own, so a box's journal
never has them. This module needs the ``server`` extra (uvicorn); nothing on a
training box imports it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import queue
import secrets
import socket
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

from . import codestore, ids, outbox, validate
from .errors import InvalidInput, JournalUnavailable, UnknownRun, WecoObserveError
from .files import JournalFiles
from .journal import Journal
from .records import LOCAL_ID_KEY, Run, run_args_from_wire, step_args_from_wire
from .settings import Settings, is_loopback

__all__ = ["Relay", "RelayKeys", "RelayStore", "keys_add", "keys_list", "keys_revoke"]

#: a request body larger than this is refused (413): a step with its code is far smaller
MAX_BODY = 64 << 20
#: requests committed together at most, and how long the writer waits for more once it has one
GROUP = 512
KEY_PREFIX = "wor_"
SESSION_COOKIE = "weco_relay"
#: a dashboard session ends after this long without a request, and after SESSION_MAX whatever happens;
#: the open page polls every 1.5 s, so only the hard limit ends a session left open in a tab
SESSION_IDLE = 12 * 3600
SESSION_MAX = 7 * 86400
#: the largest login form read (the key is about 50 bytes)
LOGIN_BODY = 4096
#: sessions kept at most (only holders of a valid key can make one; the oldest go first)
MAX_SESSIONS = 10_000
#: keys a serving process remembers as valid at most (a site has tens)
MAX_REMEMBERED_KEYS = 1000
#: a session's last use is written at most this often (it ends after SESSION_IDLE without one)
SESSION_SEEN_EVERY = 60


# -- the relay's own tables ----------------------------------------------------------------


def _migrate(conn: sqlite3.Connection) -> None:
    """The relay's tables, a migration set of their own (a box's journal never has them)."""
    from sqlite_utils import Database
    from sqlite_utils.migrations import Migrations

    relay_migrations = Migrations("weco_observe_relay")

    @relay_migrations()
    def r001_keys_and_runs(db: Database) -> None:
        """Keys (only their hash) and which key made each run, under which id boxes know it."""
        db.execute(
            "CREATE TABLE relay_keys (name TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE,"
            " read_only INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, revoked_at REAL)"
        )
        db.execute(
            "CREATE TABLE relay_runs (run_id TEXT PRIMARY KEY REFERENCES runs(id), relay_id TEXT NOT NULL UNIQUE,"
            " key_name TEXT, origin_local_id TEXT UNIQUE, created_at REAL NOT NULL)"
        )

    @relay_migrations()
    def r002_sessions(db: Database) -> None:
        """Dashboard sessions (only the cookie's hash), so every worker process knows them, and a
        restart no longer logs everyone out."""
        db.execute(
            "CREATE TABLE relay_sessions (id TEXT PRIMARY KEY, key_hash TEXT NOT NULL,"
            " created_at REAL NOT NULL, seen_at REAL NOT NULL)"
        )

    relay_migrations.apply(Database(conn))


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class RelayKeys:
    """The keys a relay accepts: add (printed once, only its hash kept), list, revoke, check."""

    def __init__(self, journal: Journal):
        self.journal = journal

    def add(self, name: str, *, read_only: bool = False) -> str:
        if not name or not all(c.isalnum() or c in "-_." for c in name) or len(name) > 64:
            raise InvalidInput(f"key name {name!r}: use letters, digits, '-', '_' or '.' (at most 64)")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.journal.write() as conn:
            if conn.execute("SELECT 1 FROM relay_keys WHERE name = ?", (name,)).fetchone():
                raise InvalidInput(f"a key named {name!r} exists already: revoke it or pick another name")
            conn.execute(
                "INSERT INTO relay_keys (name, hash, read_only, created_at) VALUES (?, ?, ?, ?)",
                (name, _hash(key), int(read_only), time.time()),
            )
        self._changed()
        return key

    def list(self) -> list[dict[str, Any]]:
        return [
            {
                "name": r["name"],
                "read_only": bool(r["read_only"]),
                "created_at": r["created_at"],
                "revoked_at": r["revoked_at"],
            }
            for r in self.journal.query("SELECT * FROM relay_keys ORDER BY created_at")
        ]

    def revoke(self, name: str) -> None:
        with self.journal.write() as conn:
            done = conn.execute(
                "UPDATE relay_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL", (time.time(), name)
            ).rowcount
        if not done:
            raise InvalidInput(f"no active key named {name!r}: see `weco observe serve keys list`")
        self._changed()

    def _changed(self) -> None:
        """Replace the keys' marker (after the commit): serving processes drop the keys they remember."""
        marker = self.journal.files.keys_changed
        fresh = marker.with_name(f".{marker.name}.{secrets.token_hex(6)}")
        os.close(os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        os.replace(fresh, marker)

    def count_active(self) -> int:
        return self.journal.query("SELECT count(*) FROM relay_keys WHERE revoked_at IS NULL")[0][0]


def _marker_stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _check_key(conn: sqlite3.Connection, token: str) -> tuple[str, bool] | None:
    """``(name, read_only)`` of an active key, None for a wrong or revoked one."""
    if not token.startswith(KEY_PREFIX) or len(token) > 200:
        return None
    row = conn.execute(
        "SELECT name, read_only, hash FROM relay_keys WHERE hash = ? AND revoked_at IS NULL", (_hash(token),)
    ).fetchone()
    if row is None or not hmac.compare_digest(row[2], _hash(token)):
        return None
    return row[0], bool(row[1])


def open_journal(data_dir: Path, settings: Settings | None = None, *, write_lock: bool = False) -> Journal:
    """The relay's journal, with its tables. Refused on a shared filesystem: the relay writes its
    journal directly, many times a second, which only a local disk allows (docs/cluster.md).
    ``write_lock``: queue on the journal's flock for each transaction (the relay's own writers)."""
    from . import store

    settings = settings or Settings.load()
    path = Path(data_dir) / "journal.db"
    if store.is_shared(settings, path):
        raise InvalidInput(
            f"--data {data_dir} is on a filesystem other hosts share: give the relay a folder on a local disk"
        )
    journal = Journal(path, settings=settings, write_lock=write_lock)
    with journal._lock:  # the relay's tables, once; the migrations lock their own transaction
        have = {r[0] for r in journal.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"relay_runs", "relay_sessions"} <= have:
            _migrate(journal.conn)
    return journal


def keys_add(data_dir: Path, name: str, read_only: bool = False) -> str:
    with open_journal(data_dir) as journal:
        return RelayKeys(journal).add(name, read_only=read_only)


def keys_list(data_dir: Path) -> list[dict[str, Any]]:
    with open_journal(data_dir) as journal:
        return RelayKeys(journal).list()


def keys_revoke(data_dir: Path, name: str) -> None:
    with open_journal(data_dir) as journal:
        RelayKeys(journal).revoke(name)


# -- the store: group commit ---------------------------------------------------------------------


@dataclass
class _Op:
    """One request for the writer thread: ``apply(conn)`` runs in the group's transaction."""

    apply: Callable[[sqlite3.Connection], Any]
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)


class RelayStore:
    """The relay's journal behind one writer thread that commits requests in groups."""

    def __init__(self, data_dir: Path, settings: Settings | None = None):
        self.settings = settings or Settings.load()
        self.data_dir = Path(data_dir)
        self.journal = open_journal(self.data_dir, self.settings, write_lock=True)
        # The commit writes the WAL but leaves its fsync to _sync_wal, after the write lock is
        # released: the other workers' groups go in while this one's reaches the disk, where
        # SQLite (synchronous=FULL) would hold the lock through it. With 2 workers the lock was
        # held through an fsync in every commit, and ingest fell from about 2,000 to 1,400 steps/s.
        self.journal.conn.execute("PRAGMA synchronous=NORMAL")
        self._wal: tuple[int, int] | None = None  # (fd, inode) of the WAL this writer fsyncs
        self._queue: queue.Queue[_Op | None] = queue.Queue()
        self._thread = threading.Thread(target=self._writer, name="weco-relay-writer", daemon=True)
        self._thread.start()
        self.commits = 0
        self.committed_ops = 0
        #: relay id -> local run id, as committed (only the writer thread reads or fills it)
        self._run_ids: dict[str, str] = {}
        #: local run id -> the time of its newest step in the group being written (writer thread only)
        self._touched: dict[str, float] = {}

    # -- the writer ------------------------------------------------------------------

    def _writer(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < GROUP:
                try:
                    op = self._queue.get_nowait()
                except queue.Empty:
                    break
                if op is None:
                    self._queue.put(None)  # stop after this group
                    break
                batch.append(op)
            self._commit(batch)

    def _commit(self, batch: list[_Op]) -> None:
        results: list[tuple[_Op, Any, BaseException | None]] = []
        journal = self.journal
        try:
            with journal.write() as conn:
                for op in batch:
                    conn.execute("SAVEPOINT op")
                    try:
                        value = op.apply(conn)
                    except (WecoObserveError, ValueError, TypeError, KeyError) as exc:
                        conn.execute("ROLLBACK TO op")
                        conn.execute("RELEASE op")
                        journal._forget_uncommitted()  # blobs of the rolled-back request are gone
                        results.append((op, None, exc))
                        continue
                    conn.execute("RELEASE op")
                    results.append((op, value, None))
                # the runs' last activity, once per run and group instead of once per step
                touched, self._touched = self._touched, {}
                conn.executemany(
                    "UPDATE runs SET updated_at = max(updated_at, ?) WHERE id = ?", [(t, r) for r, t in touched.items()]
                )
        except BaseException as exc:  # the commit itself failed: nothing of the group is durable
            self._touched.clear()
            self._run_ids.clear()  # it may name a run whose create was in this group
            for op in batch:
                op.future.set_exception(exc)
            return
        try:
            self._sync_wal()
        except OSError as exc:  # committed, but maybe not on disk: no request is answered as durable
            failure = JournalUnavailable(f"cannot fsync journal {self.journal.files.wal}: {exc}")
            for op in batch:
                op.future.set_exception(failure)
            return
        self.commits += 1
        self.committed_ops += len(batch)
        for op, value, error in results:  # answered only now: everything above is on disk
            if error is not None:
                op.future.set_exception(error)
            else:
                op.future.set_result(value)

    def _sync_wal(self) -> None:
        """fsync the WAL: the frames of every commit so far, this group's included, are on disk.

        A group's frames are in the WAL when its commit returns, and stay there until a
        checkpoint has copied them into ``journal.db`` and synced it (SQLite syncs the WAL
        before a checkpoint and the database after it, with synchronous=NORMAL), so this
        fsync, or that checkpoint, makes them durable. The WAL is never removed while this
        connection is open; a new file in its place (the journal closed and opened again by
        everything else) is opened afresh."""
        path = self.journal.files.wal
        inode = os.stat(path).st_ino
        if self._wal is None or self._wal[1] != inode:
            if self._wal is not None:
                os.close(self._wal[0])
                self._wal = None
            self._wal = (os.open(path, os.O_RDONLY | os.O_NOFOLLOW), inode)
        os.fsync(self._wal[0])

    def submit(self, apply: Callable[[sqlite3.Connection], Any]) -> concurrent.futures.Future[Any]:
        op = _Op(apply)
        self._queue.put(op)
        return op.future

    def close(self) -> None:
        """Commit what is queued, then stop."""
        self._queue.put(None)
        self._thread.join()
        if self._wal is not None:
            os.close(self._wal[0])
            self._wal = None
        self.journal.close()

    # -- the two requests -------------------------------------------------------------

    def create(self, body: dict[str, Any], key_name: str) -> concurrent.futures.Future[Any]:
        """Validate a create now; commit it in the next group; the future gives its relay id."""
        args = run_args_from_wire(body)
        code, name, instructions, meta = validate.check_run_args(
            args["source_code"], args["metric"], args["name"], args["additional_instructions"], args["metadata"]
        )
        if not isinstance(args["maximize"], bool):
            raise InvalidInput("maximize is required and must be a boolean")
        origin = meta.get(LOCAL_ID_KEY) if meta else None
        origin = origin if isinstance(origin, str) and origin else None
        journal = self.journal
        # ids made here, on the event loop: the writer holds the journal's write lock, which the
        # other workers wait for, and its time there bounds the relay's ingest
        run_id, event_id, relay_id = ids.new_run_id(), ids.ulid(), str(uuid.uuid4())
        digests = codestore.text_hashes(code)

        def apply(conn: sqlite3.Connection) -> str:
            if origin is not None:
                row = conn.execute("SELECT relay_id FROM relay_runs WHERE origin_local_id = ?", (origin,)).fetchone()
                if row is not None:
                    return str(row[0])  # the same box's create again, after a lost answer
            now = time.time()
            run = Run(
                id=run_id,
                name=name,
                metric=args["metric"],
                maximize=args["maximize"],
                additional_instructions=instructions,
                metadata=meta or None,
                created_at=now,
                updated_at=now,
            )
            journal.create_run_in(conn, run, code, event_id, digests)
            conn.execute(
                "INSERT INTO relay_runs (run_id, relay_id, key_name, origin_local_id, created_at) VALUES (?,?,?,?,?)",
                (run.id, relay_id, key_name, origin, now),
            )
            return relay_id

        return self.submit(apply)

    def log_step(self, relay_id: str, body: dict[str, Any]) -> concurrent.futures.Future[Any]:
        args = step_args_from_wire(body)
        step = args["step"]
        description, metrics, code, metadata = validate.check_step_args(**args)
        journal = self.journal
        event_id = ids.ulid()  # here, not under the write lock (see create)
        digests = codestore.text_hashes(code) if code is not None else None
        runs = self._run_ids

        def apply(conn: sqlite3.Connection) -> dict[str, Any]:
            run_id = runs.get(relay_id)
            if run_id is None:
                row = conn.execute("SELECT run_id FROM relay_runs WHERE relay_id = ?", (relay_id,)).fetchone()
                if row is None:
                    raise UnknownRun(f"run {relay_id} not found")
                if len(runs) >= 100_000:
                    runs.clear()
                run_id = runs[relay_id] = str(row[0])  # never changes once committed (runs are kept)
            stored = journal.log_step_in(
                conn,
                run_id,
                step,
                args["status"],
                description,
                metrics,
                code,
                args["parent_step"],
                metadata,
                event_id,
                check_parent=False,
                fresh=True,
                code_digests=digests,
                local_run=True,
                touch_run=False,
            )
            self._touched[run_id] = time.time()
            return {"run_id": relay_id, "step": step, "parent_step": stored["parent_step"]}

        return self.submit(apply)


# -- upstream ------------------------------------------------------------------------------------


class Forwarder:
    """Drains the relay's journal to an upstream Weco API (or another relay) while the relay runs.

    From a process of its own: forwarding is Python work per step (building each request,
    reading code blobs, the outbox's transitions) in many threads, and in the relay's
    process those threads took the GIL from the event loop and the writer thread. In
    bench_relay.py section 5 the boxes' syncs into the relay then took 8 s of the 10 s
    it took to get 2,020 steps upstream. The process stops when asked (``stop``), and of
    itself when the relay is gone (a ``kill -9``), so it never sends for a dead relay;
    its log lines come back through a pipe to the relay's log.
    """

    #: requests in flight upstream. At 50 ms a round trip, 32 forwarded ~490 steps/s and 64 ~600/s, at the
    #: same CPU per step (bench_relay.py, forwarding a backlog, 2026-11-26); the upstream's 429 and
    #: Retry-After still pace them all.
    WORKERS = 64

    def __init__(self, data_dir: Path, upstream: str, key: str, *, log: Callable[[str], None], workers: int = WORKERS):
        self.data_dir = Path(data_dir)
        self.upstream = upstream
        self.key = key
        self.log = log
        self.workers = workers
        self._process: Any = None
        self._stop: Any = None
        self._logs: Any = None
        self._log_thread = threading.Thread(target=self._relay_logs, name="weco-relay-upstream-log", daemon=True)

    def start(self) -> Forwarder:
        import multiprocessing

        # spawn, not fork: the relay has threads (the writer, uvicorn's), which a fork would copy mid-step
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._logs, child_logs = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_forward,
            args=(str(self.data_dir), self.upstream, self.key, self.workers, self._stop, child_logs),
            name="weco-relay-upstream",
            daemon=True,
        )
        self._process.start()
        child_logs.close()  # the child's end: our copy closed, the pipe ends when the child does
        self._log_thread.start()
        return self

    def stop(self) -> None:
        """Let the requests in flight finish (as a ``sync`` does on SIGTERM), then end the process."""
        if self._process is None:
            return
        self._stop.set()
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=5)
        self._log_thread.join(timeout=5)

    def _relay_logs(self) -> None:
        while True:
            try:
                message = self._logs.recv()
            except (EOFError, OSError):
                return
            self.log(message)


def _forward(data_dir: str, upstream: str, key: str, workers: int, stop: Any, logs: Any) -> None:
    """The forwarding process: ``replay.drain`` of the relay's journal, for as long as the relay runs."""
    import multiprocessing

    from .api import WecoClient
    from .replay import DrainPolicy, PassResult, drain
    from .synclock import SyncLock

    parent = multiprocessing.parent_process()

    def stopping() -> bool:
        return stop.is_set() or (parent is not None and not parent.is_alive())

    def pause(seconds: float) -> None:
        end = time.monotonic() + seconds
        while not stopping() and (left := end - time.monotonic()) > 0:
            stop.wait(min(left, 1.0))

    def log(message: str) -> None:
        with contextlib.suppress(OSError):  # the relay is gone
            logs.send(message)

    def on_pass(result: PassResult) -> None:
        log(
            f"upstream: {result.delivered} delivered, {result.pending} pending"
            + (f", {result.rejected} rejected" if result.rejected else "")
        )

    path = Path(data_dir) / "journal.db"
    lock = SyncLock(path)
    while not stopping():
        if not lock.try_acquire("relay-upstream"):
            pause(5)  # a `weco observe sync` on the relay's data is running: let it
            continue
        try:
            with (
                Journal(path, write_lock=True) as journal,
                WecoClient(upstream, key, max_connections=workers) as client,
            ):
                done = drain(
                    journal,
                    client,
                    DrainPolicy(poll=0.5, backoff=1.0, max_backoff=60.0, passes=1),
                    should_stop=stopping,
                    on_pass=on_pass,
                    workers=workers,
                    step_window=workers,
                )
            if done.reason not in ("stopped", "idle"):
                # the upstream refused the key or is not the Weco API: retrying at once would hammer it
                log(f"upstream: stopped ({done.reason}): {done.total.last_error}; trying again in 5 minutes")
                pause(300)
        except Exception as exc:  # never let the relay lose its upstream to one error
            log(f"upstream: {type(exc).__name__}: {exc}")
            pause(5)
        finally:
            lock.release()


# -- the ASGI application ------------------------------------------------------------------------


Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class _HttpError(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


class Relay:
    """The ASGI application: the Weco API, ``/healthz`` and the dashboard over one relay store."""

    def __init__(
        self,
        data_dir: Path,
        *,
        upstream: str | None = None,
        upstream_key: str | None = None,
        json_log: bool = False,
        secure_cookies: bool = False,
        log: Callable[[str], None] | None = None,
    ):
        self.data_dir = Path(data_dir)
        self.upstream = upstream
        self.upstream_key = upstream_key
        self.json_log = json_log
        self.secure_cookies = secure_cookies
        self._log = log or _stderr_line
        self.store: RelayStore | None = None
        self.forwarder: Forwarder | None = None
        self.session_idle = SESSION_IDLE
        self.session_max = SESSION_MAX
        self._clock = time.time  # tests move it to expire sessions
        self._runs_lock = threading.Lock()
        self._runs_memo: tuple[int, list[dict[str, Any]]] | None = None
        self._auth: sqlite3.Connection | None = None
        self._reader: Journal | None = None
        self._page: bytes | None = None
        self._version_fd: int | None = None
        self._keys_marker = JournalFiles(self.data_dir / "journal.db").keys_changed
        self._keys: dict[str, tuple[str, bool]] = {}  # active keys seen, until the marker changes
        self._keys_stamp: tuple[int, int] | None = None
        self._seen_change: int | None = None

    # -- lifecycle ------------------------------------------------------------------

    def startup(self) -> None:
        self.store = RelayStore(self.data_dir)
        self._auth = sqlite3.connect(str(self.data_dir / "journal.db"), check_same_thread=False)
        self._reader = Journal(self.data_dir / "journal.db")
        self._version_fd = os.open(
            self._reader.files.dashboard_version, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        if self.upstream and self.upstream_key:
            self.forwarder = Forwarder(self.data_dir, self.upstream, self.upstream_key, log=self.log).start()

    def shutdown(self) -> None:
        if self.forwarder is not None:
            self.forwarder.stop()
        if self.store is not None:
            self.store.close()
            self.log(f"stopped: every request answered was committed ({self.store.committed_ops} in this run)")
        if self._auth is not None:
            self._auth.close()
        if self._reader is not None:
            self._reader.close()
        if self._version_fd is not None:
            os.close(self._version_fd)

    def log(self, message: str) -> None:
        self._log(_event_line(message, self.json_log))

    # -- ASGI ----------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        started = time.monotonic()
        status, who = 500, "-"
        try:
            status, headers, body, who = await self._route(scope, receive)
        except _HttpError as exc:
            status, headers, body = exc.status, exc.headers, json.dumps({"detail": exc.detail}).encode()
            headers.setdefault("content-type", "application/json")
        except Exception as exc:  # a bug must not take the relay down, nor leak a traceback to a client
            self.log(f"error: {type(exc).__name__}: {exc}")
            status, headers, body = 500, {"content-type": "application/json"}, b'{"detail":"internal error"}'
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in {**_SECURITY_HEADERS, **headers}.items()]
                + [(b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
        self._access(scope, status, time.monotonic() - started, who)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await asyncio.to_thread(self.startup)
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await asyncio.to_thread(self.shutdown)
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _access(self, scope: dict[str, Any], status: int, seconds: float, who: str) -> None:
        client = scope.get("client") or ("-", 0)
        path = scope.get("path", "")
        if self.json_log:
            self._log(
                json.dumps(
                    {
                        "ts": time.time(),
                        "client": client[0],
                        "method": scope.get("method"),
                        "path": path,
                        "status": status,
                        "ms": round(seconds * 1000, 2),
                        "key": who,
                    }
                )
            )
        else:
            self._log(f"{client[0]} {scope.get('method')} {path} {status} {seconds * 1000:.1f}ms {who}")

    async def _body(self, receive: Receive, limit: int = MAX_BODY) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _HttpError(413, f"request body over {limit >> 20} MiB" if limit >= 1 << 20 else "form too large")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    # -- routing --------------------------------------------------------------------------

    async def _route(self, scope: dict[str, Any], receive: Receive) -> tuple[int, dict[str, str], bytes, str]:
        method, path = scope["method"], scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if path == "/healthz" and method in ("GET", "HEAD"):
            # off the event loop: the count reads the journal, which a dashboard query may hold
            return 200, _JSON, json.dumps(await asyncio.to_thread(self._health)).encode(), "-"
        parts = [unquote(p) for p in path.split("/") if p]
        if parts == ["v1", "events"] and method == "POST":
            # The official client posts usage events beside each call; a site relay keeps none of them.
            return 204, {}, b"", "-"
        if parts[:2] == ["v1", "external"] and method == "POST":
            return await self._api(parts, headers, receive)
        if method == "POST" and parts == ["login"]:
            return await self._login(scope, headers, receive)
        if method == "POST" and parts == ["logout"]:
            return await self._logout(scope, headers)
        if method in ("GET", "HEAD"):
            return await self._dashboard(parts, scope, headers)
        raise _HttpError(405 if parts[:1] in (["api"], []) else 404, "not found")

    def _health(self) -> dict[str, Any]:
        assert self._reader is not None
        pending = outbox.count_unsent(self._reader)
        return {
            "ok": True,
            "upstream": self.upstream,
            "pending_upstream": pending if self.upstream else None,
            "commits": self.store.commits if self.store else 0,
        }

    def _key(self, token: str) -> tuple[str, bool] | None:
        """:func:`_check_key`, remembered while the keys' marker is unchanged: ``keys add`` and
        ``keys revoke`` replace it after their commit, so a revoked key is refused at its next
        request. The lookup was about 15% of the CPU of an ingested step (bench_relay.py)."""
        assert self._auth is not None
        stamp = _marker_stamp(self._keys_marker)
        if stamp != self._keys_stamp:
            self._keys.clear()
            self._keys_stamp = stamp
        found = self._keys.get(token)
        if found is None:
            found = _check_key(self._auth, token)
            if found is not None and len(self._keys) < MAX_REMEMBERED_KEYS:
                self._keys[token] = found
        return found

    def _authenticate(self, headers: dict[str, str], *, write: bool) -> str:
        """The name of the key that made the request; 401 for none, a wrong or a revoked one."""
        auth = headers.get("authorization", "")
        token = auth[7:].strip() if auth.startswith("Bearer ") else ""
        assert self._auth is not None
        found = self._key(token) if token else None
        if found is None:
            raise _HttpError(401, "Invalid or missing API key")
        name, read_only = found
        if write and read_only:
            raise _HttpError(403, f"key {name!r} is read-only: it opens the dashboard but cannot log")
        return name

    async def _api(
        self, parts: list[str], headers: dict[str, str], receive: Receive
    ) -> tuple[int, dict[str, str], bytes, str]:
        if parts == ["v1", "external", "runs"]:
            relay_id: str | None = None
        elif len(parts) == 5 and parts[:3] == ["v1", "external", "runs"] and parts[4] == "steps":
            relay_id = parts[3]
        else:
            raise _HttpError(404, "not found")
        who = self._authenticate(headers, write=True)
        raw = await self._body(receive)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise _HttpError(422, "body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _HttpError(422, "body must be a JSON object")
        assert self.store is not None
        try:
            if relay_id is None:
                future = self.store.create(body, who)
            else:
                future = self.store.log_step(relay_id, body)
            result = await asyncio.wrap_future(future)
        except UnknownRun as exc:
            raise _HttpError(404, str(exc)) from None
        except (InvalidInput, ValueError, TypeError) as exc:
            raise _HttpError(422, str(exc)) from None
        answer = {"run_id": result} if relay_id is None else result
        return 200, _JSON, json.dumps(answer).encode(), who

    # -- the dashboard --------------------------------------------------------------------

    async def _viewer(self, headers: dict[str, str]) -> str | None:
        """The key behind a dashboard request (a session cookie, or a Bearer key), None if none.

        Sessions live in the journal (``relay_sessions``), so every worker process sees a login
        and a logout. The key is looked up on every request, so revoking it (``keys revoke``,
        from any process) ends its sessions at their next request, as it does for the API."""
        assert self._auth is not None and self.store is not None
        sid = self._session_id(headers)
        if sid:
            now = self._clock()
            row = self._auth.execute(  # the key's name is NULL once it is revoked
                "SELECT k.name, s.created_at, s.seen_at FROM relay_sessions s LEFT JOIN relay_keys k"
                " ON k.hash = s.key_hash AND k.revoked_at IS NULL WHERE s.id = ?",
                (sid,),
            ).fetchone()
            if row is not None:  # an unknown cookie writes nothing
                name, created, seen = row
                if name is None or now - seen > self.session_idle or now - created > self.session_max:
                    await self._end_session(sid)  # expired, or its key was revoked
                else:
                    if now - seen >= SESSION_SEEN_EVERY:  # the page polls every 1.5 s: not a commit each time
                        await asyncio.wrap_future(
                            self.store.submit(
                                lambda conn: conn.execute(
                                    "UPDATE relay_sessions SET seen_at = ? WHERE id = ?", (now, sid)
                                )
                            )
                        )
                    return str(name)
        auth = headers.get("authorization", "")
        if auth.startswith("Bearer "):
            found = self._key(auth[7:].strip())
            return found[0] if found else None
        return None

    async def _end_session(self, sid: str) -> None:
        assert self.store is not None
        await asyncio.wrap_future(
            self.store.submit(lambda conn: conn.execute("DELETE FROM relay_sessions WHERE id = ?", (sid,)))
        )

    @staticmethod
    def _session_id(headers: dict[str, str]) -> str | None:
        # Only the token's hash is kept, so the table in memory holds nothing a browser could replay.
        token = _cookie(headers).get(SESSION_COOKIE)
        return _hash(token) if token else None

    def _cookie(self, value: str, max_age: int) -> str:
        return f"{SESSION_COOKIE}={value}; Max-Age={max_age}; Path=/; HttpOnly; SameSite=Strict" + (
            "; Secure" if self.secure_cookies else ""
        )

    async def _login(
        self, scope: dict[str, Any], headers: dict[str, str], receive: Receive
    ) -> tuple[int, dict[str, str], bytes, str]:
        # Anyone may post here, before any key is checked: a login form is tiny, so buffer no more.
        raw = await self._body(receive, limit=LOGIN_BODY)
        if not _same_origin(scope, headers):
            # Another site's form could otherwise log a visitor in under the attacker's key (login CSRF).
            return 403, _LOGIN_HEADERS, _login_page("Log in from this relay's own page.").encode(), "-"
        form = parse_qs(raw.decode("utf-8", "replace"))
        key = (form.get("key") or [""])[0].strip()
        assert self._auth is not None
        found = self._key(key)
        if found is None:
            return 401, _LOGIN_HEADERS, _login_page("That key is not valid here.").encode(), "-"
        now = self._clock()
        token = secrets.token_urlsafe(32)
        idle, hard = self.session_idle, self.session_max

        def apply(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM relay_sessions WHERE seen_at < ? OR created_at < ?", (now - idle, now - hard))
            conn.execute(  # only holders of a valid key can make one; past the cap, the oldest go first
                "DELETE FROM relay_sessions WHERE id IN"
                " (SELECT id FROM relay_sessions ORDER BY created_at DESC LIMIT -1 OFFSET ?)",
                (MAX_SESSIONS - 1,),
            )
            conn.execute(
                "INSERT INTO relay_sessions (id, key_hash, created_at, seen_at) VALUES (?, ?, ?, ?)",
                (_hash(token), _hash(key), now, now),
            )

        assert self.store is not None
        await asyncio.wrap_future(self.store.submit(apply))
        return 303, {"location": "/", "set-cookie": self._cookie(token, self.session_max)}, b"", found[0]

    async def _logout(self, scope: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, str], bytes, str]:
        # SameSite=Strict already keeps the cookie off another site's POST; the origin check is the
        # same rule as /login's, for browsers that predate SameSite.
        if not _same_origin(scope, headers):
            raise _HttpError(403, "log out from this relay's own page")
        sid = self._session_id(headers)
        if sid:
            await self._end_session(sid)
        return 303, {"location": "/", "set-cookie": self._cookie("", 0)}, b"", "-"

    async def _dashboard(
        self, parts: list[str], scope: dict[str, Any], headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes, str]:
        who = await self._viewer(headers)
        if who is None:
            if parts[:1] == ["api"]:
                raise _HttpError(
                    401, "open the dashboard with a key first", {"www-authenticate": 'Bearer realm="weco-observe"'}
                )
            # A cookie that opens nothing any more: say why the key is asked for again.
            ended = "Your session has ended (it expired, you logged out, or its key was revoked): paste a key."
            return 200, _LOGIN_HEADERS, _login_page(ended if self._session_id(headers) else "").encode(), "-"
        if not parts:
            if self._page is None:
                from . import report

                self._page = report.page("ui", "weco-observe relay", dashboard=True).encode("utf-8")
            return 200, _HTML, self._page, who
        if parts[0] != "api":
            raise _HttpError(404, "not found")
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        data = await asyncio.to_thread(self._api_data, parts[1:], query)
        if parts[1:] == ["state"]:
            data["viewer"] = who  # the page shows whose key it is open with
        return 200, _JSON, json.dumps(data, ensure_ascii=False).encode("utf-8"), who

    def _version(self) -> int:
        """Moves whenever the relay's journal changes, which is when the page refetches; the same
        number from every worker process.

        ``PRAGMA data_version`` on this process's reader moves when any other connection
        commits: its worker siblings' writers, the upstream forwarder, a ``keys revoke`` in
        another process; the store's own counter is added so a group commit shows even before
        this connection has looked again. But it is this connection's own count, so it is not
        what the page is shown: a worker that sees it move bumps a counter all workers share
        (``journal.db.dashboard-version``) and every worker answers that. Each change is seen
        by each worker, so a page may refetch once more than it had to, never too few times."""
        journal, fd = self._reader, self._version_fd
        assert journal is not None and fd is not None
        change = int(journal.query("PRAGMA data_version")[0][0]) + (self.store.commits if self.store else 0)
        moved = change != self._seen_change
        fcntl.flock(fd, fcntl.LOCK_EX if moved else fcntl.LOCK_SH)
        try:
            value = int.from_bytes(os.pread(fd, 8, 0), "little")
            if moved:
                value += 1
                os.pwrite(fd, value.to_bytes(8, "little"), 0)
                self._seen_change = change
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return value

    def _api_data(self, parts: list[str], query: dict[str, list[str]]) -> Any:
        """The ui's JSON API over the relay's journal, each run with the key that made it and its relay id."""
        from . import diffs, report, views

        journal = self._reader
        assert journal is not None
        if parts == ["state"]:
            return {"version": self._version()}
        if parts == ["runs"]:
            # Every open page refetches the list when the version moves, so it is computed once per
            # version. The version is read first: a commit landing meanwhile only makes the next
            # request compute again, never serves older runs under a newer version.
            with self._runs_lock:
                version = self._version()
                if self._runs_memo is not None and self._runs_memo[0] == version:
                    return self._runs_memo[1]
                attribution = {
                    r["run_id"]: (r["relay_id"], r["key_name"])
                    for r in journal.query("SELECT run_id, relay_id, key_name FROM relay_runs")
                }
                out = []
                for summary in views.list_runs(journal, cache=False):
                    relay_id, key = attribution.get(summary["id"], (None, None))
                    public = {k: v for k, v in summary.items() if k != "last_activity_ts"}
                    out.append({**public, "relay_id": relay_id, "key": key})
                self._runs_memo = (version, out)
                return out
        try:
            if len(parts) == 2 and parts[0] == "runs":
                data = report.page_data(views.run_view(journal, parts[1]))
                row = journal.query("SELECT relay_id, key_name FROM relay_runs WHERE run_id = ?", (data["run"]["id"],))
                data["run"]["relay_id"], data["run"]["key"] = (row[0][0], row[0][1]) if row else (None, None)
                return data
            if len(parts) == 3 and parts[0] == "runs" and parts[2] == "diff":
                step = _int(query, "step")
                if step is None:
                    raise InvalidInput("give ?step=N")
                return diffs.step_diff(journal, parts[1], step, _int(query, "against"))
        except UnknownRun as exc:
            raise _HttpError(404, str(exc)) from None
        except InvalidInput as exc:
            raise _HttpError(400, str(exc)) from None
        raise _HttpError(404, "not found")


_JSON = {"content-type": "application/json"}
_HTML = {"content-type": "text/html; charset=utf-8"}
# The login page's form must send a real Origin (under no-referrer a browser sends "null" on a POST),
# for browsers without Sec-Fetch-Site; nothing leaves the relay's own origin either way.
_LOGIN_HEADERS = {**_HTML, "referrer-policy": "same-origin"}
_SECURITY_HEADERS = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


def _int(query: dict[str, list[str]], name: str) -> int | None:
    values = query.get(name)
    if not values:
        return None
    try:
        return int(values[0])
    except ValueError:
        raise InvalidInput(f"?{name} must be a whole number") from None


def _same_origin(scope: dict[str, Any], headers: dict[str, str]) -> bool:
    """Whether a browser sent this POST from the relay's own pages (CSRF check).

    Every current browser says where a request comes from in ``Sec-Fetch-Site``; older
    ones send ``Origin`` on a POST, which must then be this relay's. A client with
    neither is no browser, and has no cookie of a visitor's to abuse."""
    site = headers.get("sec-fetch-site")
    if site is not None:
        return site == "same-origin"
    origin = headers.get("origin")
    if origin is None:
        return True
    host = headers.get("host", "")
    return bool(host) and origin == f"{scope.get('scheme', 'http')}://{host}"


def _cookie(headers: dict[str, str]) -> dict[str, str]:
    out = {}
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name:
            out[name] = value
    return out


def _login_page(error: str = "") -> str:
    import html

    note = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        "form-action 'self'\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>weco-observe relay</title>"
        "<style>body{font:15px/1.45 system-ui,sans-serif;max-width:30rem;margin:4rem auto;padding:0 1rem}"
        "label{display:block;font-weight:600;margin-top:1rem}input{width:100%;padding:.45rem;margin:.35rem 0 .8rem;"
        "box-sizing:border-box}.error{color:#b00}@media (prefers-color-scheme:dark){body{background:#0f1216;"
        "color:#e6e9ee}.error{color:#ff8080}}</style></head><body>"
        "<h1>weco-observe relay</h1><p>The team dashboard needs a key of this relay: a box's API key, or a"
        " read-only one from <code>weco observe serve keys add NAME --read-only</code>.</p>"
        f'{note}<form method="post" action="/login"><label for="key">Key</label><input type="password"'
        ' id="key" name="key" autocomplete="off" spellcheck="false" required autofocus>'
        '<button type="submit">Open the dashboard</button></form></body></html>'
    )


# -- serving ----------------------------------------------------------------------------------------


def serve(
    *,
    host: str,
    port: int,
    data_dir: Path,
    upstream: str | None,
    upstream_key: str | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    insecure: bool,
    json_log: bool,
    workers: int = 1,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Run the relay until SIGTERM/SIGINT; requests in flight finish, then the queue is committed.

    With ``workers`` > 1 this process binds the socket, forwards upstream, and supervises that
    many serving processes on the socket (:func:`_supervise`)."""
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        raise InvalidInput("the relay needs its web server: pip install 'weco-observe[server]'") from None
    if (tls_cert is None) != (tls_key is None):
        raise InvalidInput("give both --tls-cert and --tls-key, or neither")
    if not 1 <= workers <= MAX_WORKERS:
        raise InvalidInput(f"--workers must be between 1 and {MAX_WORKERS}")
    if not is_loopback(host):
        with open_journal(data_dir) as journal:
            if RelayKeys(journal).count_active() == 0:
                raise InvalidInput(
                    f"refusing to listen on {host} with no key: run `weco observe serve keys add NAME` first"
                )
        if tls_cert is None and not insecure:
            raise InvalidInput(
                f"refusing to listen on {host} without TLS: give --tls-cert/--tls-key"
                " (or --insecure on a trusted network)"
            )
    else:
        open_journal(data_dir).close()
    site = _Site(host, port, Path(data_dir), upstream, json_log, tls_cert, tls_key)
    if workers > 1:
        _supervise(site, workers, upstream_key, ready)
        return
    app = Relay(
        data_dir,
        upstream=upstream,
        upstream_key=upstream_key,
        json_log=json_log,
        secure_cookies=tls_cert is not None,
    )
    if not _run_server(site, app, None, ready):
        raise InvalidInput(f"cannot listen on {host}:{port}: is it in use? try --port 0")


#: serving processes at most (each holds a journal connection, a writer thread and about 50 MB)
MAX_WORKERS = 32


@dataclass(frozen=True)
class _Site:
    """What every serving process needs to know: where to listen, the data, the log's form, TLS."""

    host: str
    port: int
    data_dir: Path
    upstream: str | None
    json_log: bool
    tls_cert: Path | None
    tls_key: Path | None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_cert else 'http'}://{f'[{self.host}]' if ':' in self.host else self.host}"


def _run_server(site: _Site, app: Relay, sock: socket.socket | None, ready: Callable[[str], None] | None) -> bool:
    """Serve ``app`` with uvicorn (on ``sock`` when given) until a signal; False if it never listened."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=site.host,
        port=site.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        ssl_certfile=str(site.tls_cert) if site.tls_cert else None,
        ssl_keyfile=str(site.tls_key) if site.tls_key else None,
        backlog=4096,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=30,
    )
    server = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock] if sock is not None else None))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started and ready is not None:
            sockets = [s for srv in getattr(server, "servers", []) for s in srv.sockets]
            ready(f"{site.url}:{sockets[0].getsockname()[1] if sockets else site.port}")
        await task

    try:
        import uvloop  # uvicorn[standard] (the `server` extra) installs it
    except ImportError:
        asyncio.run(main())
    else:
        # uvicorn.run() would pick uvloop itself; serving through Server.serve() means choosing it here.
        # It cut the relay's CPU per ingested step by about 6% (0.96 -> 0.90 ms, bench_relay.py's load).
        uvloop.run(main())
    return bool(server.started)


def _supervise(site: _Site, workers: int, upstream_key: str | None, ready: Callable[[str], None] | None) -> None:
    """``serve --workers N``: bind the socket here, run N serving processes on it, forward upstream.

    One process serves about 1,300 steps/s on a core (bench_relay.py): the request cycle, the
    JSON and the checks are Python under one GIL. The processes share the listening socket (the
    kernel hands each connection to one), queue on the journal's write flock, and keep sessions
    and the dashboard's version in the journal, so any of them can answer any request. This
    process forwards upstream (one forwarder per journal), restarts a worker that dies, and on
    SIGTERM or SIGINT passes SIGTERM on and waits: each worker finishes its requests and commits
    its queue. Workers are killed with it (``PR_SET_PDEATHSIG``) if it is killed itself."""
    import multiprocessing
    import multiprocessing.connection
    import signal

    try:
        sock = socket.create_server(
            (site.host, site.port), family=socket.AF_INET6 if ":" in site.host else socket.AF_INET, backlog=4096
        )
    except OSError as exc:
        raise InvalidInput(f"cannot listen on {site.host}:{site.port}: {exc.strerror}; try --port 0") from None

    def log(message: str) -> None:
        _stderr_line(_event_line(message, site.json_log))

    context = multiprocessing.get_context("spawn")  # this process has threads: a fork would copy them mid-step
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    def start() -> tuple[Any, Any]:
        answers, child_end = context.Pipe(duplex=False)
        process = context.Process(
            target=_worker, args=(site, sock, child_end, os.getpid()), name="weco-relay-worker", daemon=False
        )
        process.start()
        child_end.close()
        return process, answers

    def listening(process: Any, answers: Any) -> bool:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not stop.is_set():
            if answers.poll(0.2):
                try:
                    return bool(answers.recv())
                except (EOFError, OSError):
                    return False
            if not process.is_alive():
                return False
        return False

    forwarder = None
    running: list[Any] = []
    try:
        for _ in range(workers):
            process, answers = start()
            running.append(process)
            if not listening(process, answers):
                if stop.is_set():
                    return
                raise InvalidInput(f"a worker could not serve on {site.host}:{site.port} (see its error above)")
        if site.upstream and upstream_key:
            forwarder = Forwarder(site.data_dir, site.upstream, upstream_key, log=log).start()
        if ready is not None:
            ready(f"{site.url}:{sock.getsockname()[1]}")
        log(f"serving with {workers} worker processes: {', '.join(str(p.pid) for p in running)}")
        restarts: list[float] = []
        while not stop.is_set():
            ended = multiprocessing.connection.wait([p.sentinel for p in running], timeout=0.5)
            for process in [p for p in running if p.sentinel in ended]:
                if stop.is_set():
                    break
                running.remove(process)
                process.join(timeout=5)  # its sentinel can fire before its exit code is there to read
                restarts = [t for t in restarts if time.monotonic() - t < 60] + [time.monotonic()]
                if len(restarts) > 2 * workers:
                    log(f"worker {process.pid} exited ({process.exitcode}); too many restarts in a minute: stopping")
                    stop.set()
                    break
                log(f"worker {process.pid} exited ({process.exitcode}): starting another")
                replacement, answers = start()
                running.append(replacement)
                listening(replacement, answers)
    finally:
        for process in running:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        for process in running:
            process.join(timeout=45)  # the graceful shutdown's 30 s, then the commit of its queue
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        if forwarder is not None:
            forwarder.stop()
        sock.close()
    log("stopped: every worker finished its requests and committed them")


def _worker(site: _Site, sock: socket.socket, answers: Any, parent: int) -> None:
    """One serving process of ``serve --workers N`` (spawned by :func:`_supervise`)."""
    _die_with(parent)
    os.setpgid(0, 0)  # Ctrl-C reaches the supervisor only, which passes one SIGTERM on
    # The workers' commits are serialised (the journal's write flock), so what bounds ingest is the
    # time a writer holds it: each SQLite call gives the GIL to the event loop, and getting it back
    # took up to the 5 ms switch interval. At 1 ms the lock was held 0.39-0.43 ms per step instead
    # of 0.53-0.55 ms (bench_relay.py's load, 2 workers).
    sys.setswitchinterval(0.001)
    app = Relay(site.data_dir, upstream=site.upstream, json_log=site.json_log, secure_cookies=bool(site.tls_cert))

    def ready(url: str) -> None:
        with contextlib.suppress(OSError):
            answers.send(True)

    if not _run_server(site, app, sock, ready):
        sys.exit(1)


def _die_with(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (a ``kill -9`` of the relay); a
    worker left behind would keep the port, so the relay could not start again."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


def _event_line(message: str, json_log: bool) -> str:
    """A log line about the relay itself (not a request): as it is, or as JSON for collectors."""
    return json.dumps({"ts": time.time(), "event": message}) if json_log else message


def _stderr_line(line: str) -> None:
    """One log line, in one write(2) (a line under 4 KiB is never interleaved with another
    process's). print() with flush took about 8% of the CPU of an ingested step."""
    with contextlib.suppress(OSError):  # a closed or full stderr must not fail a request
        os.write(2, (line + "\n").encode("utf-8", "replace"))
