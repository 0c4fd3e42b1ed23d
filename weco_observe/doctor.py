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
from .records import CodeRef, Event, Run, Step, loads

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


def _integrity(ctx: _Context) -> list[dict[str, str]]:
    assert ctx.conn is not None
    try:
        problems = [r[0] for r in ctx.conn.execute("PRAGMA integrity_check(20)")]
    except sqlite3.DatabaseError as exc:
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
    """Every blob decodes and hashes to its name; every payload parses; no blob is named but missing."""
    assert ctx.conn is not None
    out = []
    try:
        named, bases, bad_payloads = _manifest_hashes(ctx.conn)
        stored = dict(ctx.conn.execute("SELECT hash, length(data) FROM blobs").fetchall())
        broken = _broken_blobs(ctx.conn, named | bases)
    except (sqlite3.DatabaseError, ValueError, AttributeError) as exc:
        return [_check("code", "error" if ctx.damaged else "warn", f"cannot scan code blobs: {exc}")]
    orphans = set(stored) - named - bases
    missing = (named | bases) - set(stored)
    ctx.report.update(orphaned_blobs=len(orphans), missing_blobs=len(missing), damaged_blobs=len(broken))
    ctx.report["damaged_payloads"] = len(bad_payloads)
    if broken or bad_payloads:
        ctx.damaged = True
        what = []
        if broken:
            what.append(f"{_n(len(broken), 'code blob does', 'code blobs do')} not decode to the text they name")
        if bad_payloads:
            what.append(_n(len(bad_payloads), "event's payload is", "events' payloads are") + " unreadable")
        out.append(_check("code", "error", "; ".join(what) + ": run `weco observe doctor --repair`"))
    if missing:
        out.append(
            _check(
                "code",
                "warn",
                f"{_n(len(missing), 'code blob is', 'code blobs are')} named but missing:"
                " those steps cannot send their code",
            )
        )
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


def fix_permissions(path: Path) -> list[str]:
    """chmod the journal's files to 0600 and the folders the tool made to 0700; return what changed.

    The journal's own folder is left alone when it is not yours or is a shared
    folder (sticky bit): its mode matters to others.
    """
    fixed = []
    for p, mode, wanted in _permission_problems(JournalFiles(path)):
        if p == path.parent and (mode & stat.S_ISVTX or _owner_of(p) != os.getuid()):
            fixed.append(f"{p}: left at {mode:04o} (a shared folder; its mode is not ours to change)")
            continue
        try:
            os.chmod(p, wanted, follow_symlinks=False)
            fixed.append(f"{p}: {mode:04o} -> {wanted:04o}")
        except (OSError, NotImplementedError) as exc:
            fixed.append(f"{p}: could not chmod ({exc})")
    return fixed


def _owner_of(p: Path) -> int | None:
    try:
        return os.lstat(p).st_uid
    except OSError:
        return None


def _open_ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)


def _manifest_hashes(conn: sqlite3.Connection) -> tuple[set[str], set[str], list[str]]:
    """(hashes named by steps and events, hashes used as delta bases, ids of events whose payload is unreadable)."""
    named: set[str] = set()
    for (code,) in conn.execute("SELECT code FROM steps WHERE code IS NOT NULL"):
        try:
            named.update(CodeRef.from_manifest(loads(code)).hashes())  # type: ignore[union-attr]
        except (ValueError, AttributeError, TypeError):
            pass
    bad: list[str] = []
    for row in _rows(conn, "SELECT * FROM events"):
        try:
            code = Event.from_row(dict(row)).code()
        except (ValueError, TypeError, UnicodeDecodeError):
            bad.append(row["id"])
            continue
        if code:
            named.update(code.hashes())
    bases = {b for (b,) in conn.execute("SELECT base FROM blobs WHERE base IS NOT NULL")}
    return named, bases, bad


def _rows(conn: sqlite3.Connection, sql: str) -> Iterator[sqlite3.Row]:
    cur = conn.cursor()
    cur.row_factory = sqlite3.Row
    yield from cur.execute(sql)


def _broken_blobs(conn: sqlite3.Connection, used: set[str]) -> list[str]:
    """Blobs in use (named, or a delta base) that do not decompress, or decode to text that does not
    hash to their name (a flipped byte). An orphan is reported as one, whatever its bytes; a blob
    whose base is missing is reported as missing."""
    rows = {r["hash"]: r for r in _rows(conn, "SELECT * FROM blobs") if r["hash"] in used}
    texts: dict[str, bytes | None] = {}

    def text(digest: str, depth: int = 0) -> bytes | None:
        if digest in texts:
            return texts[digest]
        texts[digest] = None  # a loop or a missing base decodes to nothing
        row = rows.get(digest)
        if row is None or depth > 64:
            return None
        base = text(row["base"], depth + 1) if row["base"] else None
        if row["base"] and base is None:
            return None
        try:
            data = codestore.decode(row["data"], row["prefix"], row["suffix"], base, limit=row["size"])
        except (zlib.error, ValueError, TypeError):
            return None
        texts[digest] = data if codestore.text_hash(data) == digest and len(data) == row["size"] else None
        return texts[digest]

    return [
        digest
        for digest in rows
        if text(digest) is None and (rows[digest]["base"] is None or rows[digest]["base"] in rows)
    ]


def check(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check the journal at ``path`` without changing it; ``damaged`` says whether to repair.

    The file is opened read-only, so not even a checkpoint runs. Each check in
    :data:`CHECKS_ON_FILE` and :data:`CHECKS_AROUND` adds its findings.
    """
    path = Path(path)
    checks: list[dict[str, str]] = []
    report: dict[str, Any] = {"journal": str(path), "damaged": False, "checks": checks}
    ctx = _Context(path, JournalFiles(path), None, report)
    if not path.exists():
        checks.append(_check("journal", "ok", f"no journal yet at {path} (the first init or log creates it)"))
        checks.extend(_filesystem(ctx))
        return report
    try:
        ctx.conn = _open_ro(path)
    except sqlite3.Error as exc:
        checks.append(_check("integrity", "error", f"cannot open {path}: {exc}"))
        report["damaged"] = True
        return report
    try:
        for run_check in CHECKS_ON_FILE:
            checks.extend(run_check(ctx))
    finally:
        ctx.conn.close()
    for run_check in CHECKS_AROUND:
        checks.extend(run_check(ctx))
    report["damaged"] = ctx.damaged
    return report


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
        except sqlite3.DatabaseError:
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
        except sqlite3.DatabaseError:
            pass
        stats["damaged_ranges"] += 1
        limit = hi if hi is not None and hi > last else last + _PROBE_LIMIT
        probe, row = last + 1, None
        while probe <= limit:
            try:
                row = conn.execute(point_sql, (probe,)).fetchone()
            except sqlite3.DatabaseError:
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
        except sqlite3.DatabaseError:
            pass
    stats["damaged_ranges"] += 1
    for key in keys:
        if key in found:
            continue
        try:
            row = conn.execute(f"SELECT {sel} FROM steps WHERE run_id = ? AND step = ?", key).fetchone()
        except sqlite3.DatabaseError:
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
    except (sqlite3.DatabaseError, KeyError):
        return {}
    return {ids_[rowid]: sid for rowid, sid in sids.items() if rowid in ids_}


def repair(path: str | os.PathLike[str], *, lock_timeout: float = 60.0) -> dict[str, Any]:
    """Copy every readable row of a damaged journal into a fresh one, which takes its place;
    the damaged file is kept beside it. Returns per-table counts.

    >>> check(journal.path)["damaged"]  # a healthy journal needs none
    False
    """
    from .errors import JournalDamaged
    from .journal import Journal, read_seq, write_seq

    path = Path(path)
    files = JournalFiles(path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kept = files.damaged_copy(stamp)
    fresh_path = files.repair_scratch(stamp)
    stats: dict[str, Any] = {"damaged_ranges": 0}
    out: dict[str, Any] = {"kept": str(kept), "journal": str(path), "tables": {}, "rebuilt": {}}
    src = _open_ro(path)
    try:
        tables = {r[0] for r in src.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        src.close()
        raise JournalDamaged(
            f"cannot repair {path}: not even its list of tables is readable ({exc}); nothing was changed. "
            f"Move it aside (mv {path} {kept}) to start a fresh journal"
        ) from None
    from . import store
    from .ownerlock import OwnerLock
    from .settings import Settings

    lock = store.sync_lock(Settings.load(), path)  # a syncer would write its deliveries into the file being replaced
    try:
        lock.acquire("repair", wait=True, timeout=lock_timeout)
    except BaseException:
        src.close()
        raise
    fresh = Journal(fresh_path, owner=lock if isinstance(lock, OwnerLock) else None)
    moved = False
    try:
        rows: dict[str, list[dict[str, Any]]] = {}
        for table in ("runs", "blobs", "events", "bundles", "imports"):
            if table not in tables:
                continue
            cols = _columns(src, table)
            rows[table] = [dict(zip(cols, r, strict=True)) for r in _salvage_rowid(src, table, stats)]
        events = [e for e in rows.get("events", []) if _valid_event(e)]
        out["rebuilt"]["bad_events"] = len(rows.get("events", [])) - len(events)
        keys = {(e["run_id"], e["step"] if e["kind"] == "log_step" else 0) for e in events}
        keys |= {(r["id"], 0) for r in rows.get("runs", [])}
        steps = _salvage_steps(src, sorted(keys), stats) if "steps" in tables else {}
        step_cols = _columns(src, "steps")
        step_rows = {k: dict(zip(step_cols, v, strict=True)) for k, v in steps.items()}
        out["rebuilt"]["steps"] = _rebuild_steps(step_rows, events)
        runs = {r["id"]: r for r in rows.get("runs", [])}
        out["rebuilt"]["runs"] = _rebuild_runs(runs, events, step_rows, _run_server_ids(src))
        with fresh.write() as conn:
            _insert(conn, "runs", runs.values())
            _insert(conn, "blobs", rows.get("blobs", []))
            _insert(conn, "events", events)
            _insert(conn, "steps", step_rows.values())
            _insert(conn, "bundles", rows.get("bundles", []))
            _insert(conn, "imports", rows.get("imports", []))
        for table, n in (
            ("runs", len(runs)),
            ("blobs", len(rows.get("blobs", []))),
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
    finally:
        lock.release()
    return out


def _valid_event(e: dict[str, Any]) -> bool:
    try:
        event = Event.from_row(e)
    except (TypeError, ValueError, KeyError):
        return False
    return isinstance(event.payload, dict) and event.kind in ("create_run", "log_step")


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
    if rb.get("bad_events"):
        lines.append(f"dropped {_n(rb['bad_events'], 'unreadable event', 'unreadable events')}")
    lines.append(f"the damaged file is kept as {r['kept']}")
    return "\n".join(lines)
