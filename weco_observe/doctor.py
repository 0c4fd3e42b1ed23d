"""Journal health: ``weco observe doctor`` checks, ``doctor --repair`` salvages.

A journal can live for months on a training box. ``check`` looks at it without
changing it (the file is opened read-only, so not even a checkpoint runs):

- ``integrity``: SQLite's ``PRAGMA integrity_check``;
- ``schema``: its version against the one this weco-observe writes;
- ``wal``: the size of the write-ahead log (it grows when a reader never lets go);
- ``code``: every code blob decompresses and hashes to its name, every event's
  payload parses (a few flipped bytes pass the integrity check but break sync);
  orphaned code blobs (named by no step, no event and no other blob's delta
  base) and code blobs that manifests name but the journal lacks;
- ``permissions``: the directory 0700 and every file beside the journal 0600
  (locks, logs, caches, spill files: ``JournalFiles`` names them), owned by you;
- ``filesystem``: a warning when the journal sits on a network filesystem (NFS,
  Lustre, CIFS, sshfs, ...), where SQLite's locking is not safe;
- ``spill``: spill files waiting to be imported.

``repair`` copies every row it can still read into a fresh journal and puts the
damaged file beside it (``journal.db.damaged-<time>``, with its ``-wal``). It
reads around damaged pages: rowid tables are walked in rowid order, and past a
damaged page one rowid at a time; steps are walked in key order and looked up
by the (run, step) keys the events name; a step whose row is lost is rebuilt
from its newest event (a step event's payload is the step's whole state), step
0 from the run's create; a run whose row is lost is rebuilt from its create
event and the server id its index still holds. It holds the sync lock (asking a
background syncer to yield); stop loggers while it runs: writes made to the old
file during a repair stay in the damaged copy.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import stat
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import codestore
from .files import JournalFiles
from .fsdetect import NETWORK_FILESYSTEMS, is_shared  # noqa: F401 (kept: a public name of doctor)
from .fsdetect import filesystem_of as mount_of
from .records import CREATE, Blob, CodeRef, DamagedText, Event, Run, Step, disagrees, dumps, journal_text, loads

WAL_WARN_BYTES = 64 * 1024 * 1024
_PROBE_LIMIT = 100_000  # rowids probed past a damaged page when the table's end is unknown


def _check(name: str, level: str, message: str) -> dict[str, str]:
    # one line, whatever it quotes (SQLite's integrity_check report spans several)
    message = "; ".join(part.strip() for part in message.splitlines() if part.strip())
    return {"name": name, "level": level, "message": message}


def filesystem_check(path: Path, mounts: str | None = None) -> dict[str, str]:
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return _check("filesystem", "ok", "cannot read /proc/mounts; filesystem type unknown")
    found = mount_of(path, mounts)
    if found is None:
        return _check("filesystem", "ok", "filesystem type unknown")
    point, fstype = found
    if is_shared(fstype):
        return _check(
            "filesystem",
            "warn",
            f"the journal is on a network filesystem ({fstype} at {point}), where SQLite's locking is "
            "unsafe: concurrent loggers can corrupt it. Set WECO_OBSERVE_DIR to a local disk on each "
            "machine (node-local scratch, /tmp, ~/.local/share), and bring the runs together with "
            "`weco observe bundle` / `weco observe sync --bundle` or by syncing each machine",
        )
    return _check("filesystem", "ok", f"local filesystem ({fstype} at {point})")


@dataclass
class _Context:
    """What the checks share: the journal's files, a read-only connection, the report being built."""

    path: Path
    files: JournalFiles
    conn: sqlite3.Connection | None
    report: dict[str, Any]
    damaged: bool = False
    #: cluster mode: read without SQLite's locks (``unix-none``), between two reads of the commit counter
    shared: bool = False
    #: why the journal cannot be written here (a read-only folder or file), when it cannot
    read_only: str | None = None


class _Unchecked(Exception):
    """The file checks could not run: the journal is locked or cannot be read. Not damage."""

    def __init__(self, verdict: str, name: str, message: str):
        super().__init__(message)
        self.verdict, self.name, self.message = verdict, name, message


#: What doctor concludes, and the exit code of each (``doctor_cmd``).
VERDICTS = ("healthy", "damaged", "locked", "busy", "read-only")
_LOCKED_HINT = "nothing was checked or changed; run doctor again when it is done"


def _classify(exc: sqlite3.Error) -> str:
    """``locked``, ``read-only`` or ``damaged`` for an error SQLite raised while reading the journal.

    A lock held by another process, or a read-only file or folder, is never damage: only
    SQLite's own corruption codes (and generic errors on a file it could open) are.
    """
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or name == "SQLITE_READONLY_ROLLBACK":
        return "locked"
    if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH")):
        return "read-only"
    if not name and "locked" in str(exc):
        return "locked"
    return "damaged"


def _unchecked(exc: sqlite3.Error, ctx: _Context) -> _Unchecked:
    kind = _classify(exc)
    if getattr(exc, "sqlite_errorname", "") == "SQLITE_READONLY_ROLLBACK" or (
        kind == "locked" and ctx.shared and ctx.files.rollback.exists()
    ):
        return _Unchecked(
            "locked",
            "journal",
            f"{ctx.path} holds a write that was interrupted (its owner is gone) and needs an owner to roll it"
            " back: `weco observe merge` (or any sync or view) does; " + _LOCKED_HINT,
        )
    if kind == "locked":
        return _Unchecked(
            "locked",
            "journal",
            f"{ctx.path} is locked by another process (a long write, or a connection in exclusive mode): "
            + _LOCKED_HINT,
        )
    return _Unchecked("read-only", "journal", f"cannot read {ctx.path}: {exc}; " + _access_hint(ctx.path))


def _whose(path: Path) -> str:
    """``mode 0555, owned by uid 1001 (you are 1001)``, for messages about access."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return exc.strerror or str(exc)
    return f"mode {stat.S_IMODE(st.st_mode):04o}, owned by uid {st.st_uid} (you are {os.getuid()})"


def _access_hint(path: Path) -> str:
    return f"{_whose(path)}: not damage, nothing was changed"


def _integrity(ctx: _Context) -> list[dict[str, str]]:
    assert ctx.conn is not None
    try:
        problems = [r[0] for r in ctx.conn.execute("PRAGMA integrity_check(20)")]
    except sqlite3.DatabaseError as exc:
        if _classify(exc) != "damaged":
            raise _unchecked(exc, ctx) from None
        problems = [str(exc)]
    if problems == ["ok"]:
        return [_check("integrity", "ok", "integrity_check passed")]
    ctx.damaged = True
    shown = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
    return [_check("integrity", "error", f"the journal is damaged ({shown}): run `weco observe doctor --repair`")]


def _schema(ctx: _Context) -> list[dict[str, str]]:
    from .journal import SCHEMA_VERSION

    assert ctx.conn is not None
    try:
        version = ctx.conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        if _classify(exc) != "damaged":
            raise _unchecked(exc, ctx) from None
        ctx.report["schema_version"] = None
        return [_check("schema", "error", f"cannot read the schema version: {exc}")]
    ctx.report["schema_version"] = version
    if version == SCHEMA_VERSION:
        return [_check("schema", "ok", f"schema version {version}")]
    if version < SCHEMA_VERSION:
        return [
            _check(
                "schema",
                "ok",
                f"schema version {version}; migrated to {SCHEMA_VERSION} the next time a command opens it",
            )
        ]
    return [
        _check(
            "schema",
            "error",
            f"schema version {version} is newer than this weco-observe ({SCHEMA_VERSION}): upgrade weco-observe",
        )
    ]


def _code(ctx: _Context) -> list[dict[str, str]]:
    """Every blob in use decodes and hashes to its name; every event's payload and every step's and
    run's row parses, and all their text is UTF-8; no blob is named but missing."""
    assert ctx.conn is not None
    out = []
    try:
        named, bases, bad_payloads, bad_rows = _manifest_hashes(ctx.conn)
        stored = dict(ctx.conn.execute("SELECT hash, length(data) FROM blobs").fetchall())
        broken = broken_blobs(ctx.conn, sorted(named | bases))
    except sqlite3.DatabaseError as exc:
        if _classify(exc) != "damaged":
            raise _unchecked(exc, ctx) from None
        ctx.damaged = True
        return [_check("code", "error", f"cannot scan code blobs ({exc}): run `weco observe doctor --repair`")]
    orphans = set(stored) - named - bases
    missing = (named | bases) - set(stored)
    ctx.report.update(orphaned_blobs=len(orphans), missing_blobs=len(missing), damaged_blobs=len(broken))
    ctx.report["damaged_payloads"] = len(bad_payloads)
    ctx.report["damaged_rows"] = bad_rows
    if broken or bad_payloads or bad_rows or missing:
        ctx.damaged = True
        what = []
        if broken:
            what.append(f"{_n(len(broken), 'code blob does', 'code blobs do')} not decode to the text they name")
        if missing:  # sync cannot send those steps: as much damage as a blob that does not decode
            what.append(f"{_n(len(missing), 'code blob is', 'code blobs are')} named but missing")
        if bad_payloads:
            what.append(
                _n(len(bad_payloads), "event's payload is", "events' payloads are")
                + " unreadable or disagree with their steps"
            )
        if bad_rows:
            what.append(
                f"{_n(bad_rows, 'step or run row holds', 'step or run rows hold')} bytes that are not what was written"
            )
        out.append(_check("code", "error", "; ".join(what) + ": run `weco observe doctor --repair`"))
    if orphans:
        size = sum(stored[h] for h in orphans)
        out.append(
            _check(
                "code",
                "warn",
                f"{_n(len(orphans), 'orphaned code blob', 'orphaned code blobs')} ({size} bytes) that no step, event"
                " or delta names; harmless, kept",
            )
        )
    return out or [
        _check("code", "ok", f"{_n(len(stored), 'code blob', 'code blobs')}, all readable, none orphaned or missing")
    ]


def _wal(ctx: _Context) -> list[dict[str, str]]:
    try:
        wal_size = ctx.files.wal.stat().st_size
    except OSError:
        wal_size = 0
    ctx.report["wal_bytes"] = wal_size
    if wal_size > WAL_WARN_BYTES:
        return [
            _check(
                "wal",
                "warn",
                f"write-ahead log is {wal_size / 2**20:.0f} MiB: a long-lived reader "
                "(a dashboard, an open SDK process) keeps SQLite from folding it back; "
                "stop it and the next write shrinks it",
            )
        ]
    return [_check("wal", "ok", f"write-ahead log {wal_size / 1024:.0f} KiB")]


def _permissions(ctx: _Context) -> list[dict[str, str]]:
    perms = _permission_problems(ctx.files)
    owners = _owner_problems(ctx.files)
    if not perms and not owners:
        return [_check("permissions", "ok", "the journal's folder and every file beside it are private and yours")]
    what = [f"{p} is {mode:04o} (want {wanted:04o})" for p, mode, wanted in perms[:5]]
    what += [f"{p} is owned by another user" for p in owners[:5]]
    more = len(perms) + len(owners) - len(what)
    return [
        _check(
            "permissions",
            "warn",
            "; ".join(what)
            + (f"; and {more} more" if more > 0 else "")
            + ": others may read your code and metrics; `weco observe doctor --repair` fixes the modes",
        )
    ]


def _filesystem(ctx: _Context) -> list[dict[str, str]]:
    from . import store
    from .settings import Settings

    mode = store.mode(Settings.load(), ctx.path)
    ctx.report["mode"] = {
        "shared": mode.shared,
        "source": mode.source,
        "fstype": mode.fstype,
        "mount_point": mode.mount_point,
    }
    where = f"{mode.fstype} at {mode.mount_point}" if mode.fstype else "filesystem type unknown"
    why = "set by WECO_OBSERVE_SHARED_FS" if mode.source == "WECO_OBSERVE_SHARED_FS" else "detected"
    if mode.shared:
        return [
            _check(
                "filesystem",
                "ok",
                f"cluster mode ({why}; {where}): writers append to segment files, one owner merges them"
                " into the journal (docs/cluster.md)",
            )
        ]
    found = filesystem_check(ctx.path)
    if found["level"] != "ok":
        return [found]
    return [_check("filesystem", "ok", f"local mode ({why}; {where})")]


def _segments(ctx: _Context) -> list[dict[str, str]]:
    """Cluster mode: every segment read and checked (CRC, torn tails, abandoned writers)."""
    from . import segments

    found = segments.check_files(ctx.files)
    ctx.report["segments"] = {k: v if isinstance(v, int) else len(v) for k, v in found.items()}
    if not found["files"]:
        return []
    out = []
    size = f"{_n(found['records'], 'record', 'records')}, {found['bytes'] / 1024:.0f} KiB"
    summary = _n(found["files"], f"segment file ({size}) waits", f"segment files ({size}) wait") + " to be merged"
    out.append(_check("segments", "ok", summary + " (the next sync, view or `weco observe merge` merges them)"))
    if found["torn"]:
        out.append(
            _check(
                "segments",
                "warn",
                f"{_n(len(found['torn']), 'torn or damaged record', 'torn or damaged records')} will be skipped"
                f" when merged ({found['torn'][0]})",
            )
        )
    if found["abandoned"]:
        out.append(
            _check(
                "segments",
                "warn",
                f"{_n(len(found['abandoned']), 'segment was', 'segments were')} left open by writers that are gone"
                f" ({found['abandoned'][0]}); the next merge takes what they hold",
            )
        )
    return out


def _spill(ctx: _Context) -> list[dict[str, str]]:
    from . import spill

    out = []
    waiting = spill.pending(ctx.path)
    if waiting:
        out.append(
            _check(
                "spill",
                "warn",
                f"{_n(len(waiting), 'spill file waits', 'spill files wait')} to be imported"
                " (the next successful init, log or sync imports them)",
            )
        )
    refused = spill.refused(ctx.path)
    if refused:
        path, why = refused[0]
        out.append(
            _check(
                "spill",
                "warn",
                f"{_n(len(refused), 'file', 'files')} in a spill folder will never be imported ({path}: {why});"
                + (" remove it if you did not put it there" if len(refused) == 1 else " remove them")
                + ("" if len(refused) == 1 else " if you did not put them there"),
            )
        )
    return out


#: The checks ``doctor`` runs, in order; each returns its findings. Those in the first list need the
#: journal to open; the second list runs whatever state the file is in.
CHECKS_ON_FILE: list[Callable[[_Context], list[dict[str, str]]]] = [_integrity, _schema, _code]
CHECKS_AROUND: list[Callable[[_Context], list[dict[str, str]]]] = [
    _wal,
    _permissions,
    _filesystem,
    _segments,
    _spill,
]


def _mode(p: Path) -> int | None:
    try:
        return stat.S_IMODE(os.lstat(p).st_mode)
    except OSError:
        return None


def _permission_problems(files: JournalFiles) -> list[tuple[Path, int, int]]:
    """``(path, mode, wanted)`` for each of the journal's files and folders that others can read or write."""
    out = []
    for p, wanted in files.private_paths():
        mode = _mode(p)
        if mode is not None and mode & 0o077:
            out.append((p, mode, wanted))
    return out


def _owner_problems(files: JournalFiles) -> list[Path]:
    uid = os.getuid()
    out = []
    for p, _wanted in files.private_paths():
        try:
            if os.lstat(p).st_uid != uid:
                out.append(p)
        except OSError:
            pass
    return out


def _made_by_us(folder: Path) -> bool:
    """The journal's folder is one weco-observe chose and made: the platform's data folder, or the
    private subfolder in a shared one. A folder the user named (WECO_OBSERVE_DIR) is theirs."""
    from .files import is_private_subfolder
    from .settings import Settings

    settings = Settings.load()
    return is_private_subfolder(folder) or (settings.dir_override is None and folder == settings.data_dir)


def fix_permissions(path: Path) -> list[str]:
    """chmod the journal's files to 0600 and the folders the tool made to 0700; return what changed.

    The journal's own folder is changed only when weco-observe made it (see
    :func:`_made_by_us`): a folder the user named keeps its mode, which may matter
    to others (a sticky bit, a group); the message says how to change it by hand.
    """
    fixed = []
    for p, mode, wanted in _permission_problems(JournalFiles(path)):
        if p == path.parent and not _made_by_us(p):
            fixed.append(
                f"{p}: left at {mode:04o} (you named this folder, so its mode is yours to choose:"
                f" `chmod {wanted:o} {p}` if only you should see it)"
            )
            continue
        try:
            os.chmod(p, wanted, follow_symlinks=False)
            fixed.append(f"{p}: {mode:04o} -> {wanted:04o}")
        except (OSError, NotImplementedError) as exc:
            fixed.append(f"{p}: could not chmod ({exc})")
    return fixed


def _open_ro(path: Path, shared: bool = False) -> sqlite3.Connection:
    """Read-only; in cluster mode without SQLite's locks (the caller holds the owner lock)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro{'&vfs=unix-none' if shared else ''}", uri=True, timeout=5)
    conn.text_factory = journal_text
    return conn


def _manifest_hashes(conn: sqlite3.Connection) -> tuple[set[str], set[str], list[str], int]:
    """(hashes named by steps and events, hashes used as delta bases, ids of events whose payload is
    unreadable or disagrees with the step row that names it, how many step and run rows hold damaged
    bytes)."""
    named: set[str] = set()
    bad_rows = 0
    by_event: dict[str, Step] = {}
    for found in _rows(conn, "SELECT * FROM steps"):
        row = dict(found)
        if not _sound_record(Step, row):
            bad_rows += 1
            continue
        step = Step.from_row(row)
        by_event[step.event_id] = step
        named.update(step.code.hashes() if step.code else ())
    runs: dict[str, Run] = {}
    for found in _rows(conn, "SELECT * FROM runs"):
        if _sound_record(Run, dict(found)):
            runs[found["id"]] = Run.from_row(found)
        else:
            bad_rows += 1
    bad: list[str] = []
    for found in _rows(conn, "SELECT * FROM events"):
        row = dict(found)
        try:
            if not _sound_text(row, "id", "run_id", "kind", "state"):
                raise ValueError("damaged text")
            event = Event.from_row(row).checked()
            named_by = by_event.get(event.id)
            if named_by is not None and disagrees(event, named_by, runs.get(event.run_id)):
                raise ValueError("disagrees with its step")
            code = event.code()
        except (ValueError, TypeError, UnicodeDecodeError):
            bad.append(row["id"])
            continue
        if code:
            named.update(code.hashes())
    bases = {b for (b,) in conn.execute("SELECT base FROM blobs WHERE base IS NOT NULL")}
    return named, bases, bad, bad_rows


def _rows(conn: sqlite3.Connection, sql: str) -> Iterator[sqlite3.Row]:
    cur = conn.cursor()
    cur.row_factory = sqlite3.Row
    yield from cur.execute(sql)


def broken_blobs(conn: sqlite3.Connection, used: Iterable[str]) -> list[str]:
    """Blobs in ``used`` (named, or a delta base) that do not decompress, or decode to text that does
    not hash to their name (a flipped byte); see ``codestore.broken``. Also used by ``bundle``."""
    cols = "base, prefix, suffix, data, size"

    def fetch(digest: str) -> tuple[Any, ...] | None:
        found = conn.execute(f"SELECT {cols} FROM blobs WHERE hash = ?", (digest,)).fetchone()
        return tuple(found) if found is not None else None

    return codestore.broken(used, fetch)  # type: ignore[arg-type]


def check(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check the journal at ``path`` without changing it; ``verdict`` says what to do.

    The file is opened read-only, so not even a checkpoint runs. Each check in
    :data:`CHECKS_ON_FILE` and :data:`CHECKS_AROUND` adds its findings. The
    verdict (:data:`VERDICTS`) is ``damaged`` only for damage SQLite or the
    checks found in the bytes: a journal another process holds locked is
    ``locked``, one this user cannot read or write is ``read-only``.

    In cluster mode the journal is read as any host reads it (``unix-none``: no
    lock taken, no journal rolled back), between two reads of the owner's commit
    counter: a state read while the owner writes is read again, and a hot rollback
    journal left by a dead owner is ``locked`` (the next owner rolls it back).
    """
    from . import store
    from .settings import Settings

    path = Path(path)
    checks: list[dict[str, str]] = []
    report: dict[str, Any] = {"journal": str(path), "damaged": False, "verdict": "healthy", "checks": checks}
    ctx = _Context(path, JournalFiles(path), None, report, shared=store.is_shared(Settings.load(), path))
    if not path.exists():
        checks.append(_check("journal", "ok", f"no journal yet at {path} (the first init or log creates it)"))
        checks.extend(_filesystem(ctx))
        return report
    verdict = None
    try:
        checks.extend(_file_checks(ctx))
    except _Unchecked as stop:
        checks.append(_check(stop.name, "error", stop.message))
        verdict = stop.verdict
    for run_check in CHECKS_AROUND:
        checks.extend(run_check(ctx))
    if ctx.read_only and verdict is None:
        checks.append(
            _check(
                "writable",
                "error",
                f"{ctx.read_only}: init and log cannot write the journal (they keep calls in spill files)"
                " and --repair cannot run; not damage",
            )
        )
    report["damaged"] = ctx.damaged
    report["verdict"] = verdict or ("damaged" if ctx.damaged else "read-only" if ctx.read_only else "healthy")
    return report


def _not_writable(path: Path) -> str | None:
    for p, what in ((path.parent, "its folder"), (path, "the journal file")):
        if not os.access(p, os.W_OK):
            return f"{what} {p} is read-only for you ({_whose(p)})"
    return None


def _connect(ctx: _Context, immutable: bool = False) -> sqlite3.Connection:
    vfs = "&vfs=unix-none" if ctx.shared else ""
    extra = "&immutable=1" if immutable else ""
    conn = sqlite3.connect(f"file:{ctx.path}?mode=ro{vfs}{extra}", uri=True, timeout=5)
    conn.text_factory = journal_text  # text that is not UTF-8 on disk is found by the checks, not an error
    try:
        conn.execute("PRAGMA schema_version").fetchone()  # the first read: locks, WAL index, hot journal
    except sqlite3.DatabaseError:
        conn.close()
        raise
    return conn


def _open_checked(ctx: _Context) -> sqlite3.Connection:
    """A read-only connection, or _Unchecked saying why there is none (damage only for a file SQLite
    refuses as such). A folder this user cannot write is read with ``immutable`` when the
    write-ahead log holds nothing: the file is then the whole journal."""
    if not os.access(ctx.path, os.R_OK):
        raise _Unchecked("read-only", "journal", f"cannot read {ctx.path}: {_access_hint(ctx.path)}")
    ctx.read_only = _not_writable(ctx.path)
    try:
        return _connect(ctx)
    except sqlite3.DatabaseError as exc:
        kind = _classify(exc)
        if kind == "damaged":
            ctx.damaged = True
            raise _Unchecked(
                "damaged", "integrity", f"cannot open {ctx.path}: {exc}: run `weco observe doctor --repair`"
            ) from None
        wal = ctx.files.wal
        if kind == "read-only" and ctx.read_only and not ctx.shared and (not wal.exists() or not wal.stat().st_size):
            try:
                return _connect(ctx, immutable=True)
            except sqlite3.DatabaseError as again:
                exc = again
        elif kind == "read-only" and ctx.read_only:
            raise _Unchecked(
                "read-only",
                "journal",
                f"cannot check {ctx.path}: {ctx.read_only}, and its write-ahead log holds commits SQLite"
                " reads only with write access to the folder; not damage, nothing was changed",
            ) from None
        raise _unchecked(exc, ctx) from None


def _file_checks(ctx: _Context) -> list[dict[str, str]]:
    """:data:`CHECKS_ON_FILE` on one consistent state of the file (cluster mode: retried while the
    owner writes; its commit counter stays odd, or moves, while it does)."""
    from .journal import read_seq

    deadline = time.monotonic() + 5.0
    delay = 0.01
    while True:
        before = read_seq(ctx.files.commit_seq) if ctx.shared else 0
        found: list[dict[str, str]] = []
        if before % 2 == 0:
            saved = dict(ctx.report), ctx.damaged
            try:
                ctx.conn = _open_checked(ctx)
                try:
                    for run_check in CHECKS_ON_FILE:
                        found.extend(run_check(ctx))
                finally:
                    ctx.conn.close()
                    ctx.conn = None
            except _Unchecked as stop:
                if not ctx.shared or stop.verdict == "read-only":
                    raise
                found = [_check(stop.name, "error", stop.message)]
                last: _Unchecked | None = stop
            else:
                last = None
            if not ctx.shared or read_seq(ctx.files.commit_seq) == before:
                if last is not None:
                    raise last
                return found
            ctx.report.clear()
            ctx.report.update(saved[0])
            ctx.damaged = saved[1]
        if time.monotonic() > deadline:
            raise _Unchecked("locked", "journal", _owner_busy(ctx))
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _owner_busy(ctx: _Context) -> str:
    from .ownerlock import _pid_alive, _read_info

    info = _read_info(ctx.files.owner_lock) or {}
    if info and (info.get("host") != socket.gethostname() or _pid_alive(info.get("pid"))):
        who = f"{info.get('host')} pid {info.get('pid')}, {info.get('mode')}"
        return f"{ctx.path} is being written by its owner ({who}): " + _LOCKED_HINT
    return (
        f"{ctx.path} holds a write that was interrupted (its owner is gone) and needs an owner to finish it:"
        " `weco observe merge` (or any sync or view) does; " + _LOCKED_HINT
    )


# -- repair ----------------------------------------------------------------------


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def _indexes(conn: sqlite3.Connection, table: str) -> dict[str, list[str]]:
    out = {}
    for row in conn.execute(f"PRAGMA index_list({table})"):
        out[row[1]] = [r[2] for r in conn.execute(f"PRAGMA index_info({row[1]})")]
    return out


def _max_rowid(conn: sqlite3.Connection, table: str) -> int | None:
    best = None
    for sql in [f"SELECT max(rowid) FROM {table}"] + [
        f"SELECT max(rowid) FROM {table} INDEXED BY {name}" for name in _indexes(conn, table)
    ]:
        try:
            value = conn.execute(sql).fetchone()[0]
        except sqlite3.DatabaseError as exc:
            _not_damage(exc)
            continue
        if value is not None:
            best = value if best is None else max(best, value)
    return best


def _salvage_rowid(conn: sqlite3.Connection, table: str, stats: dict[str, Any]) -> Iterator[tuple]:
    """Every readable row of a rowid table, stepping over damaged pages one rowid at a time."""
    cols = ", ".join(_columns(conn, table))
    scan_sql = f"SELECT rowid, {cols} FROM {table} WHERE rowid > ? ORDER BY rowid"
    point_sql = f"SELECT rowid, {cols} FROM {table} WHERE rowid = ?"
    hi = _max_rowid(conn, table)
    last = 0
    while True:
        try:
            for row in conn.execute(scan_sql, (last,)):  # rows stream until a damaged page
                yield row[1:]
                last = row[0]
            return
        except sqlite3.DatabaseError as exc:
            _not_damage(exc)
        stats["damaged_ranges"] += 1
        limit = hi if hi is not None and hi > last else last + _PROBE_LIMIT
        probe, row = last + 1, None
        while probe <= limit:
            try:
                row = conn.execute(point_sql, (probe,)).fetchone()
            except sqlite3.DatabaseError as exc:
                _not_damage(exc)
                row = None
            if row is not None:
                break
            probe += 1
        if row is None:
            return
        yield row[1:]
        last = probe


def _salvage_steps(conn: sqlite3.Connection, keys: Iterable[tuple[str, int]], stats: dict[str, Any]) -> dict:
    """Readable step rows by (run_id, step): walked from both ends, then looked up by known keys."""
    sel = ", ".join(_columns(conn, "steps"))
    found: dict[tuple[str, int], tuple] = {}
    for order in ("ASC", "DESC"):
        try:
            for row in conn.execute(f"SELECT {sel} FROM steps ORDER BY run_id {order}, step {order}"):
                found[(row[0], row[1])] = row
            return found  # the whole table was readable
        except sqlite3.DatabaseError as exc:
            _not_damage(exc)
    stats["damaged_ranges"] += 1
    for key in keys:
        if key in found:
            continue
        try:
            row = conn.execute(f"SELECT {sel} FROM steps WHERE run_id = ? AND step = ?", key).fetchone()
        except sqlite3.DatabaseError as exc:
            _not_damage(exc)
            continue
        if row is not None:
            found[key] = row
    return found


def _run_server_ids(conn: sqlite3.Connection) -> dict[str, str]:
    """(local id -> server id) read from the runs table's two unique indexes alone."""
    by_col = {tuple(c): name for name, c in _indexes(conn, "runs").items()}
    try:
        ids_ = dict(conn.execute(f"SELECT rowid, id FROM runs INDEXED BY {by_col[('id',)]}"))
        sids = dict(
            conn.execute(
                f"SELECT rowid, server_id FROM runs INDEXED BY {by_col[('server_id',)]} WHERE server_id IS NOT NULL"
            )
        )
    except sqlite3.DatabaseError as exc:
        _not_damage(exc)
        return {}
    except KeyError:
        return {}
    return {ids_[rowid]: sid for rowid, sid in sids.items() if rowid in ids_}


def repair(path: str | os.PathLike[str], *, lock_timeout: float = 60.0) -> dict[str, Any] | None:
    """Copy every readable row of a damaged journal into a fresh one, which takes its place;
    the damaged file is kept beside it. Returns per-table counts.

    The journal is checked again once the sync lock is held: a journal that is then
    healthy returns None, and one that is locked or read-only raises JournalLocked or
    JournalReadOnly. Either way nothing is moved: only damage is ever repaired.

    >>> check(journal.path)["damaged"]  # a healthy journal needs none
    False
    >>> repair(journal.path) is None
    True
    """
    from . import store
    from .errors import JournalReadOnly
    from .settings import Settings

    path = Path(path)
    settings = Settings.load()
    why = _not_writable(path)
    if why:
        raise JournalReadOnly(f"cannot repair {path}: {why}; nothing was changed")
    lock = store.sync_lock(settings, path)  # a syncer would write its deliveries into the file being replaced
    lock.acquire("repair", wait=True, timeout=lock_timeout)
    try:
        return _repair_held(path, lock, store.is_shared(settings, path))
    finally:
        lock.release()


def _not_damage(exc: sqlite3.Error) -> None:
    """Raise JournalLocked or JournalReadOnly when ``exc`` is not damage: a repair stops there."""
    from .errors import JournalLocked, JournalReadOnly

    kind = _classify(exc)
    if kind == "locked":
        raise JournalLocked(f"repair stopped, nothing was changed: another process locked the journal ({exc})")
    if kind == "read-only":
        raise JournalReadOnly(f"repair stopped, nothing was changed: the journal cannot be read ({exc})")


def _repair_held(path: Path, lock: Any, shared: bool) -> dict[str, Any] | None:
    from .errors import JournalDamaged, JournalLocked, JournalReadOnly
    from .journal import Journal, read_seq, write_seq
    from .ownerlock import OwnerLock

    found = check(path)  # under the lock: the state that will be repaired
    if found["verdict"] == "healthy":
        return None
    if found["verdict"] != "damaged":
        error = next((c["message"] for c in found["checks"] if c["level"] == "error"), found["verdict"])
        raise (JournalLocked if found["verdict"] == "locked" else JournalReadOnly)(f"not repaired: {error}")
    files = JournalFiles(path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kept = files.damaged_copy(stamp)
    fresh_path = files.repair_scratch(stamp)
    stats: dict[str, Any] = {"damaged_ranges": 0}
    out: dict[str, Any] = {"kept": str(kept), "journal": str(path), "tables": {}, "rebuilt": {}}
    src = _open_ro(path, shared)
    try:
        tables = {r[0] for r in src.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        src.close()
        _not_damage(exc)
        raise JournalDamaged(
            f"cannot repair {path}: not even its list of tables is readable ({exc}); nothing was changed. "
            f"Move it aside (mv {path} {kept}) to start a fresh journal"
        ) from None
    fresh = Journal(fresh_path, owner=lock if isinstance(lock, OwnerLock) else None)
    moved = False
    try:
        rows: dict[str, list[dict[str, Any]]] = {}
        for table in ("runs", "blobs", "events", "bundles", "imports"):
            if table not in tables:
                continue
            cols = _columns(src, table)
            rows[table] = [dict(zip(cols, r, strict=True)) for r in _salvage_rowid(src, table, stats)]
        raw_events = [e for e in rows.get("events", []) if _sound_text(e, "id", "run_id", "kind")]
        keys = {(e["run_id"], e["step"] if e["kind"] == "log_step" else 0) for e in raw_events}
        keys |= {(r["id"], 0) for r in rows.get("runs", []) if _sound_text(r, "id")}
        steps = _salvage_steps(src, sorted(keys), stats) if "steps" in tables else {}
        step_cols = _columns(src, "steps")
        salvaged_steps = {k: dict(zip(step_cols, v, strict=True)) for k, v in steps.items()}
        # rows whose bytes were damaged in place are dropped, then rebuilt from what else holds them
        step_rows = {k: row for k, row in salvaged_steps.items() if _sound_record(Step, row)}
        runs = {r["id"]: r for r in rows.get("runs", []) if _sound_record(Run, r)}
        out["rebuilt"]["damaged_rows"] = len(salvaged_steps) - len(step_rows) + len(rows.get("runs", [])) - len(runs)
        events, out["rebuilt"]["payloads"] = _mend_events(raw_events, step_rows, runs)
        out["rebuilt"]["bad_events"] = len(rows.get("events", [])) - len(events)
        blobs, out["rebuilt"]["lost_files"] = _mend_code(rows.get("blobs", []), events, step_rows)
        out["rebuilt"]["requeued"] = _requeue(events)
        out["rebuilt"]["steps"] = _rebuild_steps(step_rows, events)
        out["rebuilt"]["runs"] = _rebuild_runs(runs, events, step_rows, _run_server_ids(src))
        with fresh.write() as conn:
            _insert(conn, "runs", runs.values())
            _insert(conn, "blobs", blobs)
            _insert(conn, "events", events)
            _insert(conn, "steps", step_rows.values())
            _insert(conn, "bundles", rows.get("bundles", []))
            _insert(conn, "imports", rows.get("imports", []))
        for table, n in (
            ("runs", len(runs)),
            ("blobs", len(blobs)),
            ("events", len(events)),
            ("steps", len(step_rows)),
        ):
            out["tables"][table] = n
        integrity = fresh.query("PRAGMA integrity_check")[0][0]
        if integrity != "ok":  # pragma: no cover - a fresh file written by SQLite itself
            raise RuntimeError(f"the repaired journal fails its integrity check: {integrity}")
        out["damaged_ranges"] = stats["damaged_ranges"]
        src.close()
        fresh.close()
        moved = True  # from here on the salvaged copy is the only journal: never delete it
        shared = isinstance(lock, OwnerLock)
        if shared:  # readers on other hosts retry while the file is swapped
            seq = read_seq(files.commit_seq)
            write_seq(files.commit_seq, seq | 1)
        os.replace(path, kept)
        for old, new in zip(files.sqlite_companions(), files.sqlite_companions(kept), strict=True):
            if old == files.shm:
                old.unlink(missing_ok=True)
            elif old.exists():
                os.replace(old, new)
        scratch = JournalFiles(fresh_path)
        for leftover in (*scratch.sqlite_companions(), scratch.migrate_lock, scratch.commit_seq):
            leftover.unlink(missing_ok=True)
        os.replace(fresh_path, path)
        if shared:
            write_seq(files.commit_seq, (seq | 1) + 1)
    except BaseException:
        src.close()
        fresh.close()
        if not moved:
            scratch = JournalFiles(fresh_path)
            for leftover in (fresh_path, *scratch.sqlite_companions(), scratch.migrate_lock, scratch.commit_seq):
                leftover.unlink(missing_ok=True)
        raise
    return out


def _valid_event(e: dict[str, Any]) -> bool:
    try:
        event = Event.from_row(e)
    except (TypeError, ValueError, KeyError):
        return False
    if event.kind not in ("create_run", "log_step"):
        return False
    try:
        event.checked()
    except ValueError:
        return False
    return True


def _sound_text(row: dict[str, Any], *columns: str) -> bool:
    """None of ``columns`` (all, when none are named) held bytes that were not UTF-8."""
    return not any(isinstance(row[c], DamagedText) for c in columns or row)


def _sound_record(kind: type[Step] | type[Run], row: dict[str, Any]) -> bool:
    """A step or run row whose text is intact and whose JSON columns parse."""
    if not _sound_text(row):
        return False
    try:
        kind.from_row(row)
    except (ValueError, TypeError, AttributeError):
        return False
    return True


def _mend_events(
    rows: list[dict[str, Any]], steps: dict[tuple[str, int], dict[str, Any]], runs: dict[str, dict[str, Any]]
) -> tuple[list[dict[str, Any]], int]:
    """The events to keep, and how many got their payload back.

    An event whose payload was damaged is rebuilt from the record that holds the same
    state: a step event from its step's row when that row names it (the step's current
    state), a create from its run's row and the baseline code of step 0. Any other
    damaged event is an older state of a step that has a newer one, or cannot be
    rebuilt: it is dropped.
    """
    out, rebuilt = [], 0
    for row in rows:
        if _valid_event(row) and not _disagrees(row, steps, runs):
            out.append(row)
            continue
        payload = None
        if row["kind"] == "log_step":
            step = steps.get((row["run_id"], row["step"]))
            if step is not None and step["event_id"] == row["id"]:
                payload = Step.from_row(step).payload()
        elif row["kind"] == "create_run" and row["run_id"] in runs and not runs[row["run_id"]]["remote_only"]:
            base = steps.get((row["run_id"], 0))
            code = (Step.from_row(base).code if base is not None else None) or CodeRef(())
            payload = Run.from_row(runs[row["run_id"]]).create_payload(code)
        if payload is not None:
            out.append({**row, "payload": dumps(payload)})
            rebuilt += 1
    return out, rebuilt


def _disagrees(row: dict[str, Any], steps: dict[tuple[str, int], dict[str, Any]], runs: dict[str, Any]) -> bool:
    """The event's step row names it but holds another state: the step's row wins (it is what every
    view showed), and the event is rebuilt from it."""
    event = Event.from_row(row)
    step = steps.get((event.run_id, event.step if event.kind == "log_step" and event.step is not None else 0))
    if step is None:
        return False
    run = Run.from_row(runs[event.run_id]) if event.run_id in runs else None
    return disagrees(event, Step.from_row(step), run)


def _requeue(events: list[dict[str, Any]]) -> int:
    """Events sync rejected as damaged here are sound again now: they wait to be sent. Rejections by
    the server stay (``sync --retry-rejected`` is for those)."""
    from . import outbox
    from .replay import DAMAGED

    prefix = DAMAGED.split(":")[0]
    n = 0
    for e in events:
        if e["state"] == outbox.REJECTED and str(e.get("last_error") or "").startswith(prefix):
            e.update(state=outbox.PENDING, last_error=None, attempts=0)
            n += 1
    return n


def _lost_note(digest: str) -> str:
    return (
        "# weco-observe: the text of this file was lost to damage in the local journal\n"
        f"# (sha256 {digest}); `weco observe doctor --repair` put this note in its place.\n"
    )


def _mend_code(
    blobs: list[dict[str, Any]], events: list[dict[str, Any]], steps: dict[tuple[str, int], dict[str, Any]]
) -> tuple[list[dict[str, Any]], int]:
    """The blobs to keep, and how many files' text was lost.

    A blob that does not decode to the text its hash names (or needs a base that does
    not) cannot be read back; every manifest that names it, in the steps and in the
    events' payloads, names instead a note saying the text was lost, so the steps and
    their metrics still sync and the dashboard shows what happened to the file.
    """
    stored = {b["hash"]: b for b in blobs if _sound_text(b, "hash")}

    def fetch(digest: str) -> tuple[Any, ...] | None:
        b = stored.get(digest)
        return None if b is None else (b["base"], b["prefix"], b["suffix"], b["data"], b["size"])

    lost = set(codestore.broken(stored, fetch))  # type: ignore[arg-type]
    lost |= {h for h in stored if not _base_chain_present(h, fetch)}  # deltas whose base is gone
    kept = {h: b for h, b in stored.items() if h not in lost}
    named = {h for e in events for h in _event_code(e)} | {
        h for row in steps.values() for h in (loads(row["code"]) or {}).values()
    }
    lost |= named - set(kept)  # named but missing: no step can send it either
    if not lost:
        return list(kept.values()), 0
    notes: dict[str, str] = {}
    for digest in sorted(lost):
        text = _lost_note(digest).encode("utf-8")
        note = codestore.text_hash(text)
        notes[digest] = note
        kept[note] = dict(
            zip(Blob.COLUMNS, Blob(note, len(text), None, 0, 0, 0, zlib.compress(text)).to_row(), strict=True)
        )

    def mend(manifest: Any) -> Any:
        if not isinstance(manifest, dict):
            return manifest
        return {path: notes.get(digest, digest) for path, digest in manifest.items()}

    for e in events:
        payload = loads(e["payload"])
        key = "source_code" if e["kind"] == CREATE else "code"
        if isinstance(payload.get(key), dict) and set(payload[key].values()) & lost:
            payload[key] = mend(payload[key])
            e["payload"] = dumps(payload)
    for row in steps.values():
        manifest = loads(row["code"])
        if isinstance(manifest, dict) and set(manifest.values()) & lost:
            row["code"] = dumps(mend(manifest))
    return list(kept.values()), len(lost)


def _event_code(row: dict[str, Any]) -> list[str]:
    code = Event.from_row(row).code()
    return code.hashes() if code else []


def _base_chain_present(digest: str, fetch: Callable[[str], tuple[Any, ...] | None]) -> bool:
    seen = set()
    while digest not in seen:
        seen.add(digest)
        row = fetch(digest)
        if row is None:
            return False
        if row[0] is None:
            return True
        digest = row[0]
    return False


def _rebuild_steps(steps: dict[tuple[str, int], dict[str, Any]], events: list[dict[str, Any]]) -> int:
    """Steps whose rows were lost, from their newest event (its payload is the step's whole state)."""
    newest: dict[tuple[str, int], Event] = {}
    for row in events:
        e = Event.from_row(row)
        key = (e.run_id, e.step if e.kind == "log_step" and e.step is not None else 0)
        held = newest.get(key)
        # a logged step 0 is newer than the create's baseline
        if held is None or (e.kind == "log_step" and (held.kind == "create_run" or e.id > held.id)):
            newest[key] = e
    rebuilt = 0
    for key, e in newest.items():
        if key in steps:
            continue
        steps[key] = dict(zip(Step.COLUMNS, e.as_step().to_row(), strict=True))
        rebuilt += 1
    return rebuilt


def _rebuild_runs(
    runs: dict[str, dict[str, Any]],
    events: list[dict[str, Any]],
    steps: dict[tuple[str, int], dict[str, Any]],
    server_ids: dict[str, str],
) -> int:
    """Runs whose rows were lost but whose events or steps survive, from their create event."""
    creates = {row["run_id"]: Event.from_row(row) for row in events if row["kind"] == "create_run"}
    needed = {e["run_id"] for e in events} | {k[0] for k in steps}
    rebuilt = 0
    now = time.time()
    for run_id in sorted(needed - set(runs)):
        create = creates.get(run_id)
        if create is not None:
            run = create.as_run()
        else:  # no create survives: it was first seen by its server id, or its create is lost
            run = Run(id=run_id, remote_only=True, created_at=now)
        run = replace(run, server_id=server_ids.get(run_id), updated_at=now)
        runs[run_id] = dict(zip(Run.COLUMNS, run.to_row(), strict=True))
        rebuilt += 1
    return rebuilt


def _insert(conn: sqlite3.Connection, table: str, rows: Iterable[dict[str, Any]]) -> None:
    cols = _columns(conn, table)
    sql = f"INSERT OR IGNORE INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    conn.executemany(sql, ([row.get(c) for c in cols] for row in rows))


def _n(count: int, one: str, many: str) -> str:
    """``_n(1, "step", "steps")`` is "1 step"; ``_n(2, "file waits", "files wait")`` is "2 files wait"."""
    return f"{count} {one if count == 1 else many}"


def describe_repair(r: dict[str, Any]) -> str:
    t, rb = r["tables"], r["rebuilt"]
    lines = [
        (
            f"repaired: {r['journal']} now holds {_n(t['runs'], 'run', 'runs')}, {_n(t['steps'], 'step', 'steps')},"
            f" {_n(t['events'], 'event', 'events')}, {_n(t['blobs'], 'code blob', 'code blobs')}"
            f" (read around {_n(r['damaged_ranges'], 'damaged range', 'damaged ranges')})"
        )
    ]
    if rb.get("steps") or rb.get("runs"):
        lines.append(
            f"rebuilt from their events: {_n(rb.get('steps', 0), 'step', 'steps')},"
            f" {_n(rb.get('runs', 0), 'run', 'runs')}"
        )
    if rb.get("damaged_rows"):
        lines.append(
            f"{_n(rb['damaged_rows'], 'step or run row', 'step or run rows')} held damaged bytes:"
            " rebuilt from their events"
        )
    if rb.get("payloads"):
        lines.append(
            f"rebuilt {_n(rb['payloads'], 'damaged event payload', 'damaged event payloads')}"
            " (unreadable, or not what their step's row holds) from the steps and runs they describe"
        )
    if rb.get("bad_events"):
        lines.append(
            f"dropped {_n(rb['bad_events'], 'unreadable event', 'unreadable events')}"
            " (older states of their steps, or beyond rebuilding)"
        )
    if rb.get("requeued"):
        lines.append(f"{_n(rb['requeued'], 'event', 'events')} sync had refused as damaged here wait to be sent again")
    if rb.get("lost_files"):
        lines.append(
            f"{_n(rb['lost_files'], 'code file', 'code files')}' text was damaged beyond reading:"
            " a note saying so stands in their place"
        )
    lines.append(f"the damaged file is kept as {r['kept']}")
    return "\n".join(lines)
