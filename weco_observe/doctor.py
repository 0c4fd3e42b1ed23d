"""Journal health: ``weco observe doctor`` checks, ``doctor --repair`` salvages.

A journal can live for months on a training box. ``check`` looks at it without
changing it (the file is opened read-only, so not even a checkpoint runs):

- ``integrity``: SQLite's ``PRAGMA integrity_check``;
- ``schema``: its version against the one this weco-observe writes;
- ``wal``: the size of the write-ahead log (it grows when a reader never lets go);
- ``code``: orphaned code blobs (named by no step, no event and no other blob's
  delta base) and code blobs that manifests name but the journal lacks;
- ``permissions``: the directory 0700 and the files 0600, owned by you;
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

import json
import os
import sqlite3
import stat
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .fsdetect import NETWORK_FILESYSTEMS, is_shared  # noqa: F401 (kept: a public name of doctor)
from .fsdetect import filesystem_of as mount_of

WAL_WARN_BYTES = 64 * 1024 * 1024
_PROBE_LIMIT = 100_000  # rowids probed past a damaged page when the table's end is unknown


def _check(name: str, level: str, message: str) -> dict[str, str]:
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


def _mode(p: Path) -> int | None:
    try:
        return stat.S_IMODE(p.stat().st_mode)
    except OSError:
        return None


def _permission_problems(path: Path) -> list[tuple[Path, int, int]]:
    """``(path, mode, wanted)`` for the directory and files that others can read or that you do not own."""
    out = []
    for p, wanted in ((path.parent, 0o700), (path, 0o600), (Path(f"{path}-wal"), 0o600), (Path(f"{path}-shm"), 0o600)):
        mode = _mode(p)
        if mode is not None and mode & 0o077:
            out.append((p, mode, wanted))
    return out


def _owner_problems(path: Path) -> list[Path]:
    uid = os.getuid()
    out = []
    for p in (path.parent, path, Path(f"{path}-wal")):
        try:
            if p.stat().st_uid != uid:
                out.append(p)
        except OSError:
            pass
    return out


def fix_permissions(path: Path) -> list[str]:
    """chmod the directory to 0700 and the journal files to 0600; return what changed."""
    fixed = []
    for p, mode, wanted in _permission_problems(path):
        try:
            os.chmod(p, wanted)
            fixed.append(f"{p}: {mode:04o} -> {wanted:04o}")
        except OSError as exc:
            fixed.append(f"{p}: could not chmod ({exc})")
    return fixed


def _open_ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)


def _manifest_hashes(conn: sqlite3.Connection) -> tuple[set[str], set[str]]:
    """(hashes named by steps and events, hashes used as delta bases)."""
    named: set[str] = set()
    for (code,) in conn.execute("SELECT code FROM steps WHERE code IS NOT NULL"):
        named.update(json.loads(code).values())
    for kind, payload in conn.execute("SELECT kind, payload FROM events"):
        body = json.loads(payload)
        code = body.get("source_code" if kind == "create_run" else "code")
        if isinstance(code, dict):
            named.update(code.values())
    bases = {b for (b,) in conn.execute("SELECT base FROM blobs WHERE base IS NOT NULL")}
    return named, bases


def check(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check the journal at ``path`` without changing it; ``damaged`` says whether to repair.

    >>> check(paths.journal_path())["damaged"]  # doctest: +SKIP
    False
    """
    from . import spill
    from .journal import SCHEMA_VERSION

    path = Path(path)
    checks: list[dict[str, str]] = []
    report: dict[str, Any] = {"journal": str(path), "damaged": False, "checks": checks}
    if not path.exists():
        checks.append(_check("journal", "ok", f"no journal yet at {path} (the first init or log creates it)"))
        checks.append(filesystem_check(path))
        return report
    damaged = False
    try:
        conn = _open_ro(path)
    except sqlite3.Error as exc:
        checks.append(_check("integrity", "error", f"cannot open {path}: {exc}"))
        report["damaged"] = True
        return report
    try:
        try:
            problems = [r[0] for r in conn.execute("PRAGMA integrity_check(20)")]
        except sqlite3.DatabaseError as exc:
            problems = [str(exc)]
        if problems == ["ok"]:
            checks.append(_check("integrity", "ok", "integrity_check passed"))
        else:
            damaged = True
            checks.append(
                _check(
                    "integrity",
                    "error",
                    f"the journal is damaged ({'; '.join(problems[:3])}"
                    f"{'; ...' if len(problems) > 3 else ''}): run `weco observe doctor --repair`",
                )
            )
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            version = None
            checks.append(_check("schema", "error", f"cannot read the schema version: {exc}"))
        report["schema_version"] = version
        if version is not None:
            if version == SCHEMA_VERSION:
                checks.append(_check("schema", "ok", f"schema version {version}"))
            elif version < SCHEMA_VERSION:
                checks.append(
                    _check(
                        "schema",
                        "ok",
                        f"schema version {version}; migrated to {SCHEMA_VERSION} the next time a command opens it",
                    )
                )
            else:
                checks.append(
                    _check(
                        "schema",
                        "error",
                        f"schema version {version} is newer than this "
                        f"weco-observe ({SCHEMA_VERSION}): upgrade weco-observe",
                    )
                )
        try:
            named, bases = _manifest_hashes(conn)
            stored = dict(conn.execute("SELECT hash, length(data) FROM blobs").fetchall())
            orphans = set(stored) - named - bases
            missing = (named | bases) - set(stored)
            report["orphaned_blobs"] = len(orphans)
            report["missing_blobs"] = len(missing)
            if missing:
                checks.append(
                    _check(
                        "code",
                        "warn",
                        f"{len(missing)} code blobs are named but missing: those steps cannot send their code",
                    )
                )
            if orphans:
                size = sum(stored[h] for h in orphans)
                checks.append(
                    _check(
                        "code",
                        "warn",
                        f"{len(orphans)} orphaned code blobs ({size} bytes) that "
                        "no step, event or delta names; harmless, kept",
                    )
                )
            if not missing and not orphans:
                checks.append(_check("code", "ok", f"{len(stored)} code blobs, none orphaned or missing"))
        except (sqlite3.DatabaseError, ValueError, AttributeError) as exc:
            checks.append(_check("code", "error" if damaged else "warn", f"cannot scan code blobs: {exc}"))
    finally:
        conn.close()

    wal = Path(f"{path}-wal")
    wal_size = wal.stat().st_size if wal.exists() else 0
    report["wal_bytes"] = wal_size
    if wal_size > WAL_WARN_BYTES:
        checks.append(
            _check(
                "wal",
                "warn",
                f"write-ahead log is {wal_size / 2**20:.0f} MiB: a long-lived reader "
                "(a dashboard, an open SDK process) keeps SQLite from folding it back; "
                "stop it and the next write shrinks it",
            )
        )
    else:
        checks.append(_check("wal", "ok", f"write-ahead log {wal_size / 1024:.0f} KiB"))

    perms = _permission_problems(path)
    owners = _owner_problems(path)
    if perms or owners:
        what = [f"{p} is {mode:04o} (want {wanted:04o})" for p, mode, wanted in perms]
        what += [f"{p} is owned by another user" for p in owners]
        checks.append(
            _check(
                "permissions",
                "warn",
                "; ".join(what) + ": others may read your code and "
                "metrics; `weco observe doctor --repair` fixes the modes",
            )
        )
    else:
        checks.append(_check("permissions", "ok", "directory 0700, files 0600, all yours"))
    checks.append(filesystem_check(path))
    waiting = spill.pending(path)
    if waiting:
        checks.append(
            _check(
                "spill",
                "warn",
                f"{len(waiting)} spill files wait to be imported (the next successful init/log/status imports them)",
            )
        )
    report["damaged"] = damaged
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

    >>> repair(paths.journal_path())["kept"]  # doctest: +SKIP
    '/home/me/.local/share/weco-observe/journal.db.damaged-20261125T2210Z'
    """
    from .errors import JournalDamaged
    from .journal import Journal

    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kept = path.with_name(f"{path.name}.damaged-{stamp}")
    fresh_path = path.with_name(f".{path.name}.repair-{stamp}")
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
    from .sync import SyncLock

    lock = SyncLock(path)  # a syncer would write its deliveries into the file being replaced
    try:
        lock.acquire("repair", wait=True, timeout=lock_timeout)
    except BaseException:
        src.close()
        raise
    fresh = Journal(fresh_path, replay_spill=False)
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
        os.replace(path, kept)
        for suffix in ("-wal", "-journal"):
            if Path(f"{path}{suffix}").exists():
                os.replace(f"{path}{suffix}", f"{kept}{suffix}")
        Path(f"{path}-shm").unlink(missing_ok=True)
        for suffix in ("-wal", "-shm", ".migrate-lock"):
            Path(f"{fresh_path}{suffix}").unlink(missing_ok=True)
        os.replace(fresh_path, path)
    except BaseException:
        src.close()
        fresh.close()
        if not moved:
            for suffix in ("", "-wal", "-shm", ".migrate-lock"):
                Path(f"{fresh_path}{suffix}").unlink(missing_ok=True)
        raise
    finally:
        lock.release()
    return out


def _valid_event(e: dict[str, Any]) -> bool:
    try:
        payload = json.loads(e["payload"])
    except (TypeError, ValueError):
        return False
    return (
        isinstance(payload, dict)
        and e["kind"] in ("create_run", "log_step")
        and isinstance(e["id"], str)
        and isinstance(e["run_id"], str)
    )


def _rebuild_steps(steps: dict[tuple[str, int], dict[str, Any]], events: list[dict[str, Any]]) -> int:
    """Steps whose rows were lost, from their newest event (its payload is the step's whole state)."""
    newest: dict[tuple[str, int], dict[str, Any]] = {}
    for e in events:
        if e["kind"] == "create_run":
            newest.setdefault((e["run_id"], 0), e)  # a logged step 0 is newer than the create's baseline
            continue
        key = (e["run_id"], e["step"])
        if key not in newest or newest[key]["kind"] == "create_run" or e["id"] > newest[key]["id"]:
            newest[key] = e
    rebuilt = 0
    for key, e in newest.items():
        if key in steps:
            continue
        body = json.loads(e["payload"])
        if e["kind"] == "create_run":
            row = {
                "status": "completed",
                "description": None,
                "metrics": None,
                "code": _json_or_none(body.get("source_code")),
                "parent_step": None,
                "metadata": None,
            }
        else:
            row = {
                "status": body.get("status", "completed"),
                "description": body.get("description"),
                "metrics": _json_or_none(body.get("metrics")),
                "code": _json_or_none(body.get("code")),
                "parent_step": body.get("parent_step"),
                "metadata": _json_or_none(body.get("metadata")),
            }
        steps[key] = {
            "run_id": key[0],
            "step": key[1],
            **row,
            "event_id": e["id"],
            "created_at": e["created_at"],
            "updated_at": e["created_at"],
        }
        rebuilt += 1
    return rebuilt


def _rebuild_runs(
    runs: dict[str, dict[str, Any]],
    events: list[dict[str, Any]],
    steps: dict[tuple[str, int], dict[str, Any]],
    server_ids: dict[str, str],
) -> int:
    """Runs whose rows were lost but whose events or steps survive, from their create event."""
    creates = {e["run_id"]: e for e in events if e["kind"] == "create_run"}
    needed = {e["run_id"] for e in events} | {k[0] for k in steps}
    rebuilt = 0
    now = time.time()
    for run_id in sorted(needed - set(runs)):
        create = creates.get(run_id)
        body = json.loads(create["payload"]) if create else {}
        meta = body.get("metadata")
        runs[run_id] = {
            "id": run_id,
            "server_id": server_ids.get(run_id),
            "remote_only": 0 if create else 1,
            "name": body.get("name"),
            "metric": body.get("metric_name"),
            "maximize": int(bool(body.get("maximize"))) if create else None,
            "additional_instructions": body.get("additional_instructions"),
            "metadata": json.dumps(meta, separators=(",", ":")) if meta else None,
            "created_at": create["created_at"] if create else now,
            "updated_at": now,
        }
        rebuilt += 1
    return rebuilt


def _insert(conn: sqlite3.Connection, table: str, rows: Iterable[dict[str, Any]]) -> None:
    cols = _columns(conn, table)
    sql = f"INSERT OR IGNORE INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    conn.executemany(sql, ([row.get(c) for c in cols] for row in rows))


def describe_repair(r: dict[str, Any]) -> str:
    t, rb = r["tables"], r["rebuilt"]
    lines = [
        (
            f"repaired: {r['journal']} now holds {t['runs']} runs, {t['steps']} steps, {t['events']} events, "
            f"{t['blobs']} code blobs (read around {r['damaged_ranges']} damaged ranges)"
        )
    ]
    if rb.get("steps") or rb.get("runs"):
        lines.append(f"rebuilt from their events: {rb.get('steps', 0)} steps, {rb.get('runs', 0)} runs")
    if rb.get("bad_events"):
        lines.append(f"dropped {rb['bad_events']} unreadable events")
    lines.append(f"the damaged file is kept as {r['kept']}")
    return "\n".join(lines)


def _json_or_none(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), ensure_ascii=False)
