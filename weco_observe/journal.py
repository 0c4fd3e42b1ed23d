"""The local journal: the only code that writes runs, steps and code blobs, with their outbox events.

Every ``init`` and ``log`` is one SQLite transaction (``BEGIN IMMEDIATE`` ...
``COMMIT`` with ``synchronous=FULL`` in WAL mode): when the call returns, the
step is on disk, and a crash at any moment leaves either all of it or none.

Opening a journal only opens it: the schema is checked with ``PRAGMA
user_version`` and, when a migration must run, sqlite-utils and the migrations
are imported and applied under a file lock so concurrent first opens do not
race. Nothing else happens on open; replaying spill files (``spill.replay``) is
an explicit step that writers take.

Rows become records (``records.py``) and records become rows only through the
record types; the outbox's states and transitions are ``outbox.py``'s. The
tree rule is ``treerule.py``'s; this module gives it its two lookups in SQL.

**Cluster mode** (a journal on a filesystem several hosts share, see
docs/cluster.md): writers never open the journal for writing; only the holder of
the owner lock does (``Journal(path, owner=lock)``), in rollback-journal mode
through SQLite's ``unix-none`` VFS (no WAL, no mmap, no ``fcntl``), bumping the
commit counter ``journal.db.seq`` to an odd value before each write transaction
and to the next even one after it. :class:`SharedReader` reads it from any host
with that counter as a seqlock: a fresh read-only connection per query, retried
when the counter moved or was odd, so a reader never acts on a torn state.

The journal is opened on the hot path of ``weco observe log``, so this module
imports only the standard library and the package's own light modules.

    >>> j = Journal(tmp / "journal.db")
    >>> run_id = j.create_run(source_code={"train.py": "x = 1\\n"}, metric="loss", maximize=False)
    >>> j.log_step(run_id, 1, metrics={"loss": 0.5})["parent_step"]
    0
    >>> j.close()
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from . import codestore, ids, outbox, treerule, validate
from .errors import InvalidInput, JournalDamaged, JournalUnavailable, UnknownRun
from .files import JournalFiles, private_dir, private_file
from .records import Blob, CodeRef, Event, Run, Step, journal_text, loads
from .settings import Settings

if TYPE_CHECKING:
    from .ownerlock import OwnerLock

T = TypeVar("T")

#: Must equal the number of migrations in ``migrations.py`` (a test checks it).
SCHEMA_VERSION = 4

#: Insert a step or replace its state (keeping when it was first logged): one statement for
#: ``log_step`` and every merge.
_UPSERT_STEP = (
    f"INSERT INTO steps ({', '.join(Step.COLUMNS)}) VALUES ({', '.join('?' * len(Step.COLUMNS))})"
    " ON CONFLICT (run_id, step) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in Step.COLUMNS if c not in ("run_id", "step", "created_at"))
)
#: The same, unless the step's stored state comes from a newer event (ULIDs sort by time): cluster merges.
_UPSERT_STEP_IF_NEWER = _UPSERT_STEP + " WHERE excluded.event_id > steps.event_id"
_INSERT_STEP_IF_NEW = (
    f"INSERT OR IGNORE INTO steps ({', '.join(Step.COLUMNS)}) VALUES ({', '.join('?' * len(Step.COLUMNS))})"
)
_INSERT_RUN = f"INSERT INTO runs ({', '.join(Run.COLUMNS)}) VALUES ({', '.join('?' * len(Run.COLUMNS))})"
_INSERT_BLOB = f"INSERT OR IGNORE INTO blobs ({', '.join(Blob.COLUMNS)}) VALUES ({', '.join('?' * len(Blob.COLUMNS))})"


class _Flock:
    """An exclusive flock on an open descriptor, for a ``with`` block."""

    def __init__(self, fd: int):
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)


_NOTHING = nullcontext()
#: cluster mode: tries to open the journal as its owner while a name looks stale (0.05 s, 0.1 s ... apart: ~2.3 s)
_OPEN_TRIES = 10


class Journal:
    """An open journal. Thread-safe; hold one per process for speed."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        settings: Settings | None = None,
        owner: OwnerLock | None = None,
        write_lock: bool = False,
    ):
        settings = settings or Settings.load()
        self.path = Path(path) if path is not None else settings.journal_path
        self.files = JournalFiles(self.path)
        #: cluster mode: the owner lock this process holds (every commit is fenced by it)
        self.owner = owner
        #: ``write_lock``: each transaction holds an flock on ``files.write_lock`` (a relay's processes)
        self._write_lock_fd: int | None = None
        self._lock = threading.RLock()
        self._texts: OrderedDict[str, tuple[bytes, int]] = OrderedDict()
        self._known_blobs: set[str] = set()
        if owner is None and _shared(self.path, settings):
            raise JournalUnavailable(
                f"journal {self.path} is in cluster mode (a folder other hosts share): only the holder of its"
                " owner lock writes it; open it through weco_observe.store"
            )
        try:
            private_dir(self.path.parent)
            private_file(self.path)
            if owner is not None:
                self.conn = self._open_shared(settings)
            else:
                self.conn = sqlite3.connect(
                    str(self.path),
                    timeout=settings.busy_timeout,
                    isolation_level=None,
                    check_same_thread=False,
                )
            self.conn.text_factory = journal_text  # flipped bytes read as DamagedText, not an error
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if owner is not None:
                self._settle_seq(owner)
                if version < SCHEMA_VERSION:
                    self._migrate()
            elif self.conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal" or version < SCHEMA_VERSION:
                self._setup()
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if write_lock and owner is None:
                self._write_lock_fd = os.open(
                    self.files.write_lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
                )
        except (sqlite3.Error, OSError) as exc:
            raise JournalUnavailable(f"cannot open journal {self.path}: {exc}") from None
        if version > SCHEMA_VERSION:
            self.conn.close()
            raise JournalUnavailable(
                f"journal {self.path} has schema version {version}, newer than this "
                f"weco-observe understands ({SCHEMA_VERSION}): upgrade weco-observe"
            )

    def _open_shared(self, settings: Settings) -> sqlite3.Connection:
        """Cluster mode, as the owner: rollback journal, no locks of SQLite's own (the owner lock
        excludes other writers). A journal still in WAL mode (made in local mode, or by 0.1.0) is
        switched once, with the ordinary VFS, since ``unix-none`` cannot open a WAL database.

        The rollback journal is truncated at each commit, not deleted (``TRUNCATE``): the next
        owner may be on another host, whose kernel still holds the name ``journal.db-journal``
        from a look a moment before (a reader checking for a hot journal). Opening a name that
        another client deleted then fails (sshfs: ENOENT, "unable to open database file"); a
        file that is never removed cannot go stale. It also spares NFS a create and a remove
        per commit. An empty rollback journal is not hot: readers ignore it.

        A name can still be stale for a moment (the CI's kill -9 workload on sshfs once failed an
        owner's open with "unable to open database file", its lock already held), so that error
        is tried again for about two seconds, as a writer's segment create is."""
        for attempt in range(1, _OPEN_TRIES):
            try:
                return self._open_shared_once(settings)
            except sqlite3.OperationalError as exc:
                if "unable to open" not in str(exc):
                    raise
                time.sleep(0.05 * attempt)
        return self._open_shared_once(settings)  # the last try: its error is the one reported

    def _open_shared_once(self, settings: Settings) -> sqlite3.Connection:
        probe = sqlite3.connect(str(self.path), timeout=settings.busy_timeout, isolation_level=None)
        try:
            if probe.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                probe.execute("PRAGMA journal_mode=DELETE")
        finally:
            probe.close()
        for companion in (self.files.wal, self.files.shm):
            companion.unlink(missing_ok=True)
        conn = sqlite3.connect(
            f"file:{self.path}?vfs=unix-none", uri=True, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute("PRAGMA journal_mode=TRUNCATE")
            conn.execute("PRAGMA user_version").fetchone()  # the first read: a hot journal is played back here
        except BaseException:
            conn.close()
            raise
        return conn

    def _settle_seq(self, owner: OwnerLock) -> None:
        """A new owner: an odd commit counter is the mark of an owner that died mid-write. Its
        half-written transaction was rolled back when this connection first read the journal
        (``PRAGMA user_version``: the hot rollback journal is played back), so the counter goes
        even now, not at this owner's first write, which may never come: until then every
        reader on every host would wait, and every writer with them."""
        seq = read_seq(self.files.commit_seq)
        if seq % 2:
            owner.check()
            write_seq(self.files.commit_seq, seq + 1)

    def _migrate(self) -> None:
        from . import migrations

        with self._sequenced():
            migrations.apply(self.conn)

    # -- plumbing -------------------------------------------------------------

    def _setup(self) -> None:
        """Switch a new journal to WAL and apply pending migrations, one process at a time.

        Switching to WAL needs an exclusive lock that SQLite does not wait for with the
        busy handler, so concurrent first opens serialise on a file lock instead.
        """
        fd = os.open(self.files.migrate_lock, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self.conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                self.conn.execute("PRAGMA journal_mode=WAL")
            if self.conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                from . import migrations

                migrations.apply(self.conn)
        finally:
            os.close(fd)  # closing drops the flock

    def close(self) -> None:
        with self._lock:
            self.conn.close()
            if self._write_lock_fd is not None:
                os.close(self._write_lock_fd)
                self._write_lock_fd = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _sequenced(self) -> Iterator[None]:
        """Cluster mode: fence the write by the owner lock and make the commit counter odd
        while it runs, so readers on other hosts retry instead of reading a torn state."""
        if self.owner is None:
            yield
            return
        self.owner.check()
        seq = read_seq(self.files.commit_seq)
        write_seq(self.files.commit_seq, seq + 1 if seq % 2 == 0 else seq)
        try:
            yield
        finally:
            write_seq(self.files.commit_seq, (seq | 1) + 1)

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. Takes the write lock up front (``BEGIN IMMEDIATE``) so
        concurrent writers queue on the busy timeout instead of failing to upgrade.
        Any SQLite failure becomes JournalUnavailable (the caller spills or reports it)."""
        with self._lock, self._sequenced(), self._writers_queued():
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise JournalUnavailable(f"cannot write journal {self.path}: {exc}") from None
            try:
                yield self.conn
            except BaseException as exc:
                self.conn.execute("ROLLBACK")
                self._forget_uncommitted()
                if isinstance(exc, sqlite3.Error):
                    raise JournalUnavailable(f"cannot write journal {self.path}: {exc}") from None
                raise
            try:
                self.conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                self._forget_uncommitted()
                raise JournalUnavailable(f"cannot write journal {self.path}: {exc}") from None

    def _writers_queued(self) -> AbstractContextManager[Any]:
        """With ``write_lock``: hold the flock for the transaction. SQLite's busy handler sleeps
        1, 2, 5 ... 100 ms between tries; two relay workers waiting on it committed 1,260 steps/s
        with 4 s stalls, and queued on the flock 1,600-1,900 (bench_relay.py's load, 2 workers).
        Without it (every journal but a relay's), nothing: ``log_step`` pays no generator for it."""
        fd = self._write_lock_fd
        return _Flock(fd) if fd is not None else _NOTHING

    def _forget_uncommitted(self) -> None:
        # The blob caches may name blobs inserted by the rolled-back transaction.
        self._known_blobs.clear()
        self._texts.clear()

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

    def schema_version(self) -> int:
        with self._lock:
            return self.conn.execute("PRAGMA user_version").fetchone()[0]

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
        rows = self.query("SELECT base, depth, prefix, suffix, data FROM blobs WHERE hash = ?", (digest,))
        if not rows:
            raise KeyError(digest)
        row = tuple(rows[0])
        base_hash, depth, prefix, suffix, payload = row
        try:
            base = self._blob(base_hash)[0] if base_hash else None
            data = codestore.decode(payload, prefix, suffix, base)
        except (zlib.error, ValueError, TypeError, KeyError, RecursionError):
            data = None
        if data is None or codestore.text_hash(data) != digest:
            # a flipped byte (here or in its delta base): the text is lost, never passed on altered
            raise JournalDamaged(
                f"code blob {digest[:12]} is damaged in the journal: run `weco observe doctor --repair`"
            )
        self._remember(digest, data, depth)
        return data, depth

    def read_blob(self, digest: str) -> str:
        """The text of a code blob by its hash. Raises KeyError when it is missing, JournalDamaged
        when it does not decode to the text its hash names."""
        with self._lock:
            return self._blob(digest)[0].decode("utf-8")

    def read_code(self, code: Mapping[str, str] | CodeRef | None) -> dict[str, str]:
        """Turn a manifest ``{path: hash}`` (or a CodeRef) back into ``{path: text}``."""
        manifest = code.manifest() if isinstance(code, CodeRef) else (code or {})
        return {path: self.read_blob(digest) for path, digest in manifest.items()}

    def store_code(
        self,
        conn: sqlite3.Connection,
        code: Mapping[str, str],
        base: Callable[[], CodeRef | None] | None,
        digests: Mapping[str, str] | None = None,
    ) -> CodeRef:
        """Store each file's text (once per content), as a delta against the same path in the code
        ``base()`` returns (asked only when a text is new here; no base: None).
        ``digests``: each file's :func:`codestore.text_hash`, made by the caller outside the write
        transaction (the relay's writers queue for it)."""
        manifest: dict[str, str] = {}
        base_files: dict[str, str] | None = None
        for path, text in code.items():
            data = text.encode("utf-8")
            digest = digests[path] if digests is not None else codestore.text_hash(data)
            manifest[path] = digest
            if digest in self._known_blobs:
                continue
            if conn.execute("SELECT 1 FROM blobs WHERE hash = ?", (digest,)).fetchone() is None:
                if base_files is None:
                    found = base() if base is not None else None
                    base_files = found.manifest() if found else {}
                base_hash = base_files.get(path)
                base_data, base_depth = None, 0
                if base_hash:
                    try:
                        base_data, base_depth = self._blob(base_hash)
                    except (KeyError, JournalDamaged):  # a full copy, then: logging goes on
                        base_hash = None
                depth, prefix, suffix, payload = codestore.encode(data, base_data, base_depth)
                blob = Blob(digest, len(data), base_hash if depth else None, depth, prefix, suffix, payload)
                conn.execute(_INSERT_BLOB, blob.to_row())
                self._remember(digest, data, depth)
            self._known_blobs.add(digest)
        return CodeRef.from_manifest(manifest) or CodeRef(())

    def put_blob(self, conn: sqlite3.Connection, blob: Blob) -> bool:
        """Insert a blob as stored elsewhere (a bundle); True if it was new here."""
        return conn.execute(_INSERT_BLOB, blob.to_row()).rowcount > 0

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

    def run(self, run_id: str) -> Run:
        """The run record for a local id (KeyError if unknown)."""
        rows = self.query("SELECT * FROM runs WHERE id = ?", (run_id,))
        if not rows:
            raise KeyError(run_id)
        return Run.from_row(rows[0])

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
        """Record a new run with its baseline code as step 0 and queue its create; return the local id.

        ``run_id`` and ``event_id`` may be given (made before the call, by the CLI or a
        spill file): a call whose event is already journaled changes nothing.
        """
        code, name, additional_instructions, meta = validate.check_run_args(
            source_code, metric, name, additional_instructions, metadata
        )
        run_id = run_id or ids.new_run_id()
        event_id = event_id or ids.ulid()
        now = time.time()
        run = Run(
            id=run_id,
            name=name,
            metric=metric,
            maximize=bool(maximize),
            additional_instructions=additional_instructions,
            metadata=meta or None,
            created_at=now,
            updated_at=now,
        )
        with self.write() as conn:
            self.create_run_in(conn, run, code, event_id)
        return run_id

    def create_run_in(
        self,
        conn: sqlite3.Connection,
        run: Run,
        code: Mapping[str, str],
        event_id: str,
        code_digests: Mapping[str, str] | None = None,
    ) -> bool:
        """``create_run`` in the caller's write transaction, its arguments already checked
        (the relay batches many calls in one commit). False if the event is already journaled."""
        if outbox.known(conn, event_id):
            return False
        manifest = self.store_code(conn, code, None, code_digests)
        conn.execute(_INSERT_RUN, run.to_row())
        conn.execute(_UPSERT_STEP, Step.baseline(run.id, manifest, event_id=event_id, at=run.created_at).to_row())
        outbox.enqueue(conn, Event.create(run, manifest, event_id=event_id))
        return True

    def _run_for_log(self, conn: sqlite3.Connection, ref: str, now: float) -> tuple[str, bool, bool]:
        """``(local run id, remote_only, first_seen)`` for ``--run-id ref``; an unknown server id becomes a
        remote-only run (``first_seen``: made by this call)."""
        row = conn.execute("SELECT id, remote_only FROM runs WHERE id = ? OR server_id = ?", (ref, ref)).fetchone()
        if row is not None:
            return row[0], bool(row[1]), False
        if not ids.looks_like_server_id(ref):
            raise UnknownRun(
                f"unknown --run-id {ref!r}: use the id printed by `weco observe init` "
                "(or a Weco server run id); `weco observe runs` lists them"
            )
        run = Run(id=ids.new_run_id(), server_id=ref, remote_only=True, created_at=now, updated_at=now)
        conn.execute(_INSERT_RUN, run.to_row())
        return run.id, True, True

    # -- steps ----------------------------------------------------------------

    def _step(self, conn: sqlite3.Connection, run_id: str, step: int) -> Step | None:
        cur = conn.execute("SELECT * FROM steps WHERE run_id = ? AND step = ?", (run_id, step))
        cur.row_factory = sqlite3.Row
        row = cur.fetchone()
        return Step.from_row(row) if row is not None else None

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
        stored state: ``run_id``, ``step``, ``status``, ``parent_step``, ``event_id``,
        ``updated`` (the step existed before) and ``run_first_seen`` (``run`` was a
        server id this journal had never seen: this call made it a remote-only run).
        """
        description, metrics, code, metadata = validate.check_step_args(
            step, status, description, metrics, code, parent_step, metadata
        )
        event_id = event_id or ids.ulid()
        with self.write() as conn:
            return self.log_step_in(
                conn, run, step, status, description, metrics, code, parent_step, metadata, event_id
            )

    def log_step_in(
        self,
        conn: sqlite3.Connection,
        run: str,
        step: int,
        status: str,
        description: str | None,
        metrics: Mapping[str, float] | None,
        code: Mapping[str, str] | None,
        parent_step: int | None,
        metadata: Mapping[str, Any] | None,
        event_id: str,
        *,
        check_parent: bool = True,
        fresh: bool = False,
        code_digests: Mapping[str, str] | None = None,
        local_run: bool = False,
        touch_run: bool = True,
    ) -> dict[str, Any]:
        """``log_step`` in the caller's write transaction, its arguments already checked.

        ``check_parent=False`` accepts a parent the run does not have yet, as the API
        does (a relay receives a box's steps several at a time, in any order). ``fresh``: the
        caller made ``event_id`` just now, so it cannot be journaled already (one query less).
        ``local_run``: ``run`` is the local id of a run this journal holds, made by a create
        (not remote-only), so it need not be looked up; the foreign keys still refuse one it
        does not hold. ``touch_run=False``: the caller moves the run's last activity itself (a
        relay, once per group of requests)."""
        now = time.time()
        if not fresh and outbox.known(conn, event_id):
            row = conn.execute("SELECT run_id, step FROM steps WHERE event_id = ?", (event_id,)).fetchone()
            done = self._step(conn, row[0], row[1]) if row else None
            return _result(done, updated=False) if done else {"event_id": event_id}
        if local_run:
            run_id, remote_only, first_seen = run, False, False
        else:
            run_id, remote_only, first_seen = self._run_for_log(conn, run, now)
        prev = self._step(conn, run_id, step)
        parent = treerule.resolve(
            step,
            parent_step,
            prev,
            run=run,
            remote_only=remote_only or not check_parent,
            exists=lambda n: self._step_exists(conn, run_id, n),
            last_kept_below=lambda n: self._last_kept_below(conn, run_id, n),
        )
        manifest = None
        if code is not None:
            at = step if parent is None else parent
            manifest = self.store_code(
                conn,
                code,
                lambda: prev.code if prev is not None and prev.code else self._code_at_or_below(conn, run_id, at),
                code_digests,
            )
        state = Step(
            run_id=run_id,
            step=step,
            status=status,
            description=description,
            metrics=dict(metrics) if metrics is not None else None,
            code=manifest,
            parent_step=parent,
            metadata=dict(metadata) if metadata is not None else None,
            event_id=event_id,
            created_at=now,
            updated_at=now,
        ).merged_with(prev)
        conn.execute(_UPSERT_STEP, state.to_row())
        outbox.enqueue(conn, Event.log(state))
        if touch_run:
            conn.execute("UPDATE runs SET updated_at = ? WHERE id = ?", (now, run_id))
        return _result(state, updated=prev is not None, run_first_seen=first_seen)

    @staticmethod
    def _step_exists(conn: sqlite3.Connection, run_id: str, step: int) -> bool:
        return conn.execute("SELECT 1 FROM steps WHERE run_id = ? AND step = ?", (run_id, step)).fetchone() is not None

    @staticmethod
    def _last_kept_below(conn: sqlite3.Connection, run_id: str, step: int) -> int | None:
        row = conn.execute(
            "SELECT step FROM steps WHERE run_id = ? AND step < ?"
            " AND (status != 'failed' OR step = 0) ORDER BY step DESC LIMIT 1",
            (run_id, step),
        ).fetchone()
        return row[0] if row else None

    @staticmethod
    def _code_at_or_below(conn: sqlite3.Connection, run_id: str, step: int) -> CodeRef | None:
        """The delta base: the nearest code at or below ``step``. Walks the primary key backwards;
        an ORDER BY on an expression would sort the whole run."""
        row = conn.execute(
            "SELECT code FROM steps WHERE run_id = ? AND code IS NOT NULL AND step <= ? ORDER BY step DESC LIMIT 1",
            (run_id, step),
        ).fetchone()
        return CodeRef.from_manifest(loads(row[0])) if row else None

    # -- merges (bundles, cluster-mode segments): rows made elsewhere, matched by id ----

    def insert_run(self, conn: sqlite3.Connection, run: Run) -> None:
        conn.execute(_INSERT_RUN, run.to_row())

    def upsert_step(self, conn: sqlite3.Connection, step: Step) -> bool:
        """Store ``step`` unless this journal already holds the same or a newer state of it
        (newer: a higher event id; ULIDs sort by time). Moves the run's last activity forward.
        True if stored."""
        row = conn.execute(
            "SELECT event_id FROM steps WHERE run_id = ? AND step = ?", (step.run_id, step.step)
        ).fetchone()
        if row is not None and row[0] >= step.event_id:
            return False
        conn.execute(_UPSERT_STEP, step.to_row())
        conn.execute("UPDATE runs SET updated_at = max(updated_at, ?) WHERE id = ?", (step.updated_at, step.run_id))
        return True

    def merge_steps(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
        """Cluster-mode merges: ``upsert_step`` for a batch of step rows (``Step.to_row``) in one
        statement, each kept out where a newer event set the step already; the runs' last activity
        is left to the caller (once per batch, not per step)."""
        conn.executemany(_UPSERT_STEP_IF_NEWER, rows)

    def insert_baseline(self, conn: sqlite3.Connection, step: Step) -> None:
        """Step 0 from a create, unless the run already has a step 0."""
        conn.execute(_INSERT_STEP_IF_NEW, step.to_row())

    def has_newer_step(self, conn: sqlite3.Connection, run_id: str, step: int, event_id: str) -> bool:
        """True if the step's current state was set by an event newer than ``event_id``."""
        return (
            conn.execute(
                "SELECT 1 FROM steps WHERE run_id = ? AND step = ? AND event_id > ?", (run_id, step, event_id)
            ).fetchone()
            is not None
        )

    # -- reads ----------------------------------------------------------------

    def steps(self, run_id: str) -> list[dict[str, Any]]:
        """Every step of a run (by local id) as documents (``Step.to_doc``), oldest step number first."""
        rows = self.query("SELECT * FROM steps WHERE run_id = ? ORDER BY step", (run_id,))
        return [Step.from_row(row).to_doc() for row in rows]


def _result(step: Step, *, updated: bool, run_first_seen: bool = False) -> dict[str, Any]:
    return {
        "run_id": step.run_id,
        "step": step.step,
        "status": step.status,
        "parent_step": step.parent_step,
        "event_id": step.event_id,
        "updated": updated,
        "run_first_seen": run_first_seen,
    }


# -- cluster mode: the commit counter and readers on any host ---------------------------


def _shared(path: Path, settings: Settings) -> bool:
    from .fsdetect import shared_mode

    return shared_mode(path.parent, settings).shared


def read_seq(path: Path) -> int:
    """The owner's commit counter (0 when there is none yet); odd while a write runs.

    Opened afresh each time: under NFS close-to-open, the open revalidates the
    file, so a reader never sees a stale counter."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return 0
    try:
        text = os.read(fd, 64).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    return int(text) if text.isdigit() else 1  # unreadable: treat as a write in progress


def write_seq(path: Path, value: int) -> None:
    """Rewrite the counter in place (one inode, so readers' opens see the new value) and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        os.pwrite(fd, f"{value:020d}\n".encode(), 0)
        os.fsync(fd)
    finally:
        os.close(fd)


class SharedReader(Journal):
    """A cluster-mode journal read from any host, without the owner lock.

    Each query opens a fresh read-only connection (``unix-none``: no locks taken,
    no journal ever rolled back) and runs between two reads of the commit counter;
    it is retried while the counter is odd or moved: at once after it moved (the
    owner has just committed; its next commit is usually a while away), with a
    growing pause while it is odd. Writing raises.

    A counter that stays odd for :attr:`REPAIR_AFTER` seconds may be the mark of an
    owner that died mid-write: then the reader tries to become the owner for a
    moment (``OwnerLock.acquire``, which takes over a dead owner of this host at
    once and a silent one of another host after ``ownerlock.STALE``, and gives up
    as soon as the counter is even again), so that opening the journal rolls the
    half-written transaction back and settles the counter. Without that, every
    writer on every host would wait for the next sync, view or merge, and spill.
    """

    RETRIES = 200
    #: seconds the counter may stay odd before the reader suspects a dead owner
    REPAIR_AFTER = 1.0

    def __init__(self, path: str | os.PathLike[str] | None = None, *, settings: Settings | None = None):
        settings = settings or Settings.load()
        self.path = Path(path) if path is not None else settings.journal_path
        self.files = JournalFiles(self.path)
        self.owner = None
        self._lock = threading.RLock()
        self._texts = OrderedDict()
        self._known_blobs = set()
        self._timeout = settings.busy_timeout
        self._settings = settings
        #: the commit counter of the state the last query read
        self.last_seq = 0
        if not self.path.exists():
            raise JournalUnavailable(f"no journal yet at {self.path}")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(f"file:{self.path}?vfs=unix-none&mode=ro", uri=True, check_same_thread=False)
        conn.text_factory = journal_text
        return conn

    def query(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        return self.read(lambda conn: conn.execute(sql, params).fetchall())

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(connection)``, its queries all in one consistent state of the journal (rows are
        ``sqlite3.Row``); retried as a whole like :meth:`query`. ``last_seq`` is then the value
        of the commit counter that state had."""
        deadline = time.monotonic() + self._timeout
        delay = 0.002
        odd_since: float | None = None
        last: Exception | None = None
        while True:
            before = read_seq(self.files.commit_seq)
            if before % 2 == 0:
                odd_since = None
                try:
                    conn = self._connect()
                    try:
                        conn.row_factory = sqlite3.Row
                        result = fn(conn)
                    finally:
                        conn.close()
                    if read_seq(self.files.commit_seq) == before:
                        self.last_seq = before
                        return result
                    delay = 0.001  # it committed meanwhile: the next commit is likely a while away
                except sqlite3.DatabaseError as exc:  # a torn page read mid-commit, or a hot journal
                    last = exc
            else:
                odd_since = odd_since if odd_since is not None else time.monotonic()
                if time.monotonic() - odd_since >= self.REPAIR_AFTER:
                    self._repair(deadline)
                    odd_since = None
            if time.monotonic() > deadline:
                raise JournalUnavailable(f"cannot read journal {self.path}: it kept changing ({last or 'busy'})")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _repair(self, deadline: float) -> None:
        """Become the owner for a moment if the one that made the counter odd is gone (see the class)."""
        from .errors import SyncBusy
        from .ownerlock import OwnerLock

        lock = OwnerLock(self.path)
        try:
            lock.acquire(
                "repair",
                timeout=max(0.0, deadline - time.monotonic()),
                should_stop=lambda: read_seq(self.files.commit_seq) % 2 == 0,
                poll=0.2,
            )
        except (SyncBusy, OSError):  # a live owner (it beats), the counter went even, or a folder we cannot write
            return
        try:
            Journal(self.path, settings=self._settings, owner=lock).close()  # rolls back, settles the counter
        except JournalUnavailable:
            pass
        finally:
            lock.release()

    def iter_query(self, sql: str, params: Any = (), batch: int = 500) -> Iterator[sqlite3.Row]:
        yield from self.query(sql, params)

    def schema_version(self) -> int:
        return self.query("PRAGMA user_version")[0][0]

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        raise JournalUnavailable(f"journal {self.path} is read here without the owner lock: nothing may be written")
        yield  # pragma: no cover

    def close(self) -> None:
        pass
