"""Bundles: move runs between journals by file, for boxes that never reach the API.

``weco observe bundle -o FILE`` writes everything not yet bundled (or, with
``--all``, everything) to one zip file; ``weco observe import FILE`` (or ``sync
--bundle FILE``) on a machine with network merges it into that machine's journal,
and its ordinary sync sends it. Do it as often as you like, from as many boxes as
you like: everything carries the id it was given on the box that logged it
(``local-<ulid>`` runs, ULID events, sha256 code blobs), so merging is by id and
a bundle imported twice, or two bundles that overlap, change nothing the second
time and send nothing twice.

The file (format ``weco-observe-bundle``, version 1) is a zip of four JSON-lines
members and a manifest::

    runs.jsonl     one row per run touched: local id, server id if known, name, metric ...
    blobs.jsonl    the code blobs those rows name, with their whole delta chains
                   (stored compressed, as in the journal; ``data`` in base64)
    steps.jsonl    the current state of each step changed since the last bundle
    events.jsonl   the outbox events: id, run, kind, step, payload (code as blob hashes), state
    manifest.json  format, version, bundle id, source, counts, the sha256, size and line
                   count of each member, and a sha256 over the rest of the manifest

Every bundle is self-contained: it repeats the ``create_run`` event of each run
it touches and the full chain of every blob it names, so it can be imported
without the bundles before it (an incremental bundle still holds only the steps
changed since the previous one).

Import copies the file next to the journal (so it cannot change under it) and
verifies the copy completely before it writes anything: the zip's own CRCs, every
member's sha256 and line count against the manifest, the manifest's own
checksum, every row's shape, that every event and step names a run in the
bundle, that every code hash names a blob in the bundle, and that every blob
decodes to text whose sha256 is its name. Then it merges in transactions of a
few thousand rows, so loggers on the receiving box wait briefly; the import is
recorded last, so an import that was killed is completed by running it again.

The server id: a run's identity is its local id, which travels in the bundle; a
server id is the sending box's knowledge that the run already exists on the
server. A receiving box adopts it only for a run it has no server id for, and
keeps ``delivered`` states only when its server id for the run is that same one,
so a box that synced the run itself never sends its create again, and a box
that never synced sends everything. The API key is never in a bundle.

Incremental: each bundle written is recorded in the ``bundles`` table with the
highest event ``seq`` of its snapshot; an event is "already bundled" when some
bundle for all runs, or for its run, reached its ``seq``. The bundle is read in
one SQLite read transaction, so loggers may keep writing while it is made; what
they write lands in the next bundle.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import sqlite3
import time
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from . import codestore, ids
from .errors import BundleInvalid, InvalidInput, JournalDamaged, JournalUnavailable
from .journal import SCHEMA_VERSION, Journal, busy_timeout

FORMAT = "weco-observe-bundle"
VERSION = 1
MANIFEST = "manifest.json"
MEMBERS = ("runs.jsonl", "blobs.jsonl", "steps.jsonl", "events.jsonl")
#: A longer line is refused before it is parsed (a decompression bomb, not a bundle).
MAX_LINE = 256 << 20

_RUN_COLUMNS = (
    "id",
    "server_id",
    "remote_only",
    "name",
    "metric",
    "maximize",
    "additional_instructions",
    "metadata",
    "created_at",
    "updated_at",
)
_STEP_COLUMNS = (
    "run_id",
    "step",
    "status",
    "description",
    "metrics",
    "code",
    "parent_step",
    "metadata",
    "event_id",
    "created_at",
    "updated_at",
)
_STATES = ("pending", "delivered", "rejected", "superseded")


def _line(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8") + b"\n"


def _json(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def _manifest_checksum(manifest: dict[str, Any]) -> str:
    rest = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _event_hashes(kind: str, payload: dict[str, Any]) -> list[str]:
    code = payload.get("source_code" if kind == "create_run" else "code")
    return list(code.values()) if isinstance(code, dict) else []


class _Writer:
    """One zip member written line by line, hashed and counted as it goes."""

    def __init__(self, zf: zipfile.ZipFile, name: str, opened: list[_Writer]):
        self.name = name
        self.stream = zf.open(name, "w", force_zip64=True)
        opened.append(self)  # so a failure can close it before the zip file closes
        self.sha = hashlib.sha256()
        self.buffer = bytearray()
        self.bytes = 0
        self.lines = 0

    def write(self, value: Any) -> None:
        data = _line(value)
        self.buffer += data
        self.sha.update(data)
        self.bytes += len(data)
        self.lines += 1
        if len(self.buffer) >= 1 << 20:  # one compress call per MiB, not per line
            self.stream.write(self.buffer)
            self.buffer.clear()

    def close(self) -> dict[str, Any]:
        self.stream.write(self.buffer)
        self.stream.close()
        return {"sha256": self.sha.hexdigest(), "bytes": self.bytes, "lines": self.lines}


def write_bundle(
    journal: Journal,
    out_path: str | os.PathLike[str],
    *,
    run_ref: str | None = None,
    everything: bool = False,
) -> dict[str, Any]:
    """Write a bundle of what is not yet bundled (or ``everything``) and record it; return a summary.

    With nothing new, writes no file and returns ``events == 0``.

    >>> write_bundle(Journal(), "box-a.weco")  # doctest: +SKIP
    {'bundle_id': '01j...', 'path': 'box-a.weco', 'runs': 2, 'steps': 14, 'events': 16, ...}
    """
    run_id = journal.require_run(run_ref)["id"] if run_ref else None
    out_path = Path(out_path)
    if out_path.is_dir():
        raise InvalidInput(f"-o {out_path} is a directory: give a file name, e.g. -o {out_path}/box-a.weco")
    if not out_path.parent.is_dir():
        raise InvalidInput(f"-o {out_path}: directory {out_path.parent} does not exist")
    bundle_id = ids.ulid()
    tmp = out_path.with_name(f".{out_path.name}.{bundle_id}.tmp")
    snap = sqlite3.connect(str(journal.path), timeout=busy_timeout())
    snap.row_factory = sqlite3.Row
    try:
        snap.execute("BEGIN")  # one read snapshot for the whole bundle; loggers keep writing
        max_seq = snap.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
        where = ["e.seq <= :max_seq"]
        if run_id is not None:
            where.append("e.run_id = :run")
        if not everything:
            where.append(
                "NOT EXISTS (SELECT 1 FROM bundles b WHERE b.max_seq >= e.seq"
                " AND (b.run_filter IS NULL OR b.run_filter = e.run_id))"
            )
        params = {"max_seq": max_seq, "run": run_id}
        if snap.execute(f"SELECT 1 FROM events e WHERE {' AND '.join(where)} LIMIT 1", params).fetchone() is None:
            return {
                "bundle_id": None,
                "path": None,
                "runs": 0,
                "steps": 0,
                "events": 0,
                "blobs": 0,
                "bytes": 0,
                "incremental": not everything,
            }
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as raw:
                manifest = _write_members(
                    snap, raw, where, params, run_id, everything, bundle_id, max_seq, journal.path
                )
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, out_path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    finally:
        snap.close()
    journal.record_bundle(bundle_id, str(out_path.resolve()), max_seq, manifest["counts"]["events"], run_id)
    return {
        "bundle_id": bundle_id,
        "path": str(out_path),
        **manifest["counts"],
        "bytes": out_path.stat().st_size,
        "incremental": not everything,
    }


def _write_members(
    snap: sqlite3.Connection,
    raw: BinaryIO,
    where: list[str],
    params: dict[str, Any],
    run_id: str | None,
    everything: bool,
    bundle_id: str,
    max_seq: int,
    source: Path,
) -> dict[str, Any]:
    included: set[str] = set()
    touched: dict[str, None] = {}
    hashes: set[str] = set()
    members: dict[str, Any] = {}
    with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        opened: list[_Writer] = []
        try:
            events = _Writer(zf, "events.jsonl", opened)

            def put(row: sqlite3.Row) -> None:
                payload = json.loads(row["payload"])
                included.add(row["id"])
                touched.setdefault(row["run_id"])
                hashes.update(_event_hashes(row["kind"], payload))
                events.write(
                    {
                        "id": row["id"],
                        "run_id": row["run_id"],
                        "kind": row["kind"],
                        "step": row["step"],
                        "payload": payload,
                        "state": row["state"],
                        "created_at": row["created_at"],
                    }
                )

            for row in snap.execute(f"SELECT e.* FROM events e WHERE {' AND '.join(where)} ORDER BY e.seq", params):
                put(row)
            for rid in list(touched):  # repeat each run's create, so any bundle imports on its own
                for row in snap.execute(
                    "SELECT * FROM events WHERE run_id = ? AND kind = 'create_run' AND seq <= ?", (rid, max_seq)
                ):
                    if row["id"] not in included:
                        put(row)
            members["events.jsonl"] = events.close()

            steps = _Writer(zf, "steps.jsonl", opened)
            for rid in touched:
                for row in snap.execute("SELECT * FROM steps WHERE run_id = ? ORDER BY step", (rid,)):
                    if row["event_id"] not in included:
                        continue
                    step = {k: row[k] for k in _STEP_COLUMNS}
                    for key in ("metrics", "code", "metadata"):
                        step[key] = _json(step[key])
                    hashes.update((step["code"] or {}).values())
                    steps.write(step)
            members["steps.jsonl"] = steps.close()

            runs = _Writer(zf, "runs.jsonl", opened)
            for rid in touched:
                row = snap.execute("SELECT * FROM runs WHERE id = ?", (rid,)).fetchone()
                run = {k: row[k] for k in _RUN_COLUMNS}
                run["metadata"] = _json(run["metadata"])
                runs.write(run)
            members["runs.jsonl"] = runs.close()

            closure: set[str] = set()
            todo = sorted(hashes)
            while todo:  # every named blob and its delta bases, checked before the member is opened
                digest = todo.pop()
                if digest in closure:
                    continue
                row = snap.execute("SELECT base FROM blobs WHERE hash = ?", (digest,)).fetchone()
                if row is None:  # refuse here, not on the far side of the air gap
                    raise JournalDamaged(
                        f"code blob {digest} is named by a step but missing from the journal: run `weco observe doctor`"
                    )
                closure.add(digest)
                if row[0]:
                    todo.append(row[0])
            blobs = _Writer(zf, "blobs.jsonl", opened)
            for digest in sorted(closure):
                row = snap.execute("SELECT * FROM blobs WHERE hash = ?", (digest,)).fetchone()
                blobs.write(
                    {
                        "hash": row["hash"],
                        "size": row["size"],
                        "base": row["base"],
                        "depth": row["depth"],
                        "prefix": row["prefix"],
                        "suffix": row["suffix"],
                        "data": base64.b64encode(row["data"]).decode("ascii"),
                    }
                )
            members["blobs.jsonl"] = blobs.close()

            manifest: dict[str, Any] = {
                "format": FORMAT,
                "version": VERSION,
                "bundle_id": bundle_id,
                "created_at": time.time(),
                "source": {"host": socket.gethostname(), "journal": str(source.resolve())},
                "schema_version": SCHEMA_VERSION,
                "incremental": not everything,
                "run_filter": run_id,
                "max_seq": max_seq,
                "counts": {
                    "runs": members["runs.jsonl"]["lines"],
                    "steps": members["steps.jsonl"]["lines"],
                    "events": members["events.jsonl"]["lines"],
                    "blobs": members["blobs.jsonl"]["lines"],
                },
                "members": members,
            }
            manifest["checksum"] = _manifest_checksum(manifest)
            zf.writestr(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
        except BaseException:
            for writer in opened:  # else closing the zip file raises and hides the real error
                if not writer.stream.closed:
                    writer.stream.close()
            raise
    return manifest


# -- reading and verifying ----------------------------------------------------


class _Reader:
    """The members of an open bundle, each checked against the manifest as it is read."""

    def __init__(self, path: Path, shown: Path | None = None):
        self.path = shown or path  # the name the user gave, for messages
        try:
            self.zf = zipfile.ZipFile(path)
        except FileNotFoundError:
            raise InvalidInput(f"no bundle file {path}") from None
        except IsADirectoryError:
            raise InvalidInput(f"{path} is a directory, not a bundle file") from None
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise self.refuse(f"it is not a zip file, or it is truncated ({exc})") from None
        try:
            names = self.zf.namelist()
            if MANIFEST not in names:
                raise self.refuse("it has no manifest.json (not a weco-observe bundle)")
            manifest = json.loads(self.zf.read(MANIFEST))
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as exc:
            self.zf.close()
            raise self.refuse(f"its manifest is unreadable ({exc})") from None
        except BundleInvalid:
            self.zf.close()
            raise
        self.manifest = manifest
        try:
            self._check_manifest(names)
        except BundleInvalid:
            self.zf.close()
            raise

    def refuse(self, why: str) -> BundleInvalid:
        return BundleInvalid(f"bundle {self.path} refused, nothing imported: {why}")

    def _check_manifest(self, names: list[str]) -> None:
        m = self.manifest
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise self.refuse(f"its manifest is not a {FORMAT} manifest (a foreign file?)")
        if not isinstance(m.get("version"), int) or m["version"] > VERSION:
            raise self.refuse(
                f"format version {m.get('version')!r} is newer than this weco-observe "
                f"reads ({VERSION}): upgrade weco-observe"
            )
        if m.get("checksum") != _manifest_checksum(m):
            raise self.refuse("the manifest's checksum does not match (the manifest was edited or damaged)")
        if sorted(names) != sorted((*MEMBERS, MANIFEST)):
            raise self.refuse(
                f"its members {sorted(names)} are not {sorted((*MEMBERS, MANIFEST))} (files were added or removed)"
            )
        if not isinstance(m.get("bundle_id"), str) or not m["bundle_id"]:
            raise self.refuse("its manifest has no bundle id")
        for name in MEMBERS:
            info = (m.get("members") or {}).get(name)
            if (
                not isinstance(info, dict)
                or not all(_is_int(info.get(k)) for k in ("bytes", "lines"))
                or not isinstance(info.get("sha256"), str)
            ):
                raise self.refuse(f"its manifest does not describe {name}")

    def rows(self, name: str) -> Iterator[dict[str, Any]]:
        """Each line of a member as a JSON object; raises BundleInvalid once the member is
        read if its sha256, size or line count differ from the manifest."""
        expected = self.manifest["members"][name]
        sha = hashlib.sha256()
        size = lines = 0
        try:
            with self.zf.open(name) as stream:
                while raw := stream.readline(MAX_LINE + 1):
                    if len(raw) > MAX_LINE:
                        raise self.refuse(f"{name} line {lines + 1} is over {MAX_LINE >> 20} MiB (not a bundle)")
                    sha.update(raw)
                    size += len(raw)
                    lines += 1
                    if size > expected["bytes"]:
                        raise self.refuse(f"{name} is longer than the manifest says (edited)")
                    try:
                        row = json.loads(raw)
                    except ValueError:
                        raise self.refuse(f"{name} line {lines} is not JSON (corrupted or edited)") from None
                    if not isinstance(row, dict):
                        raise self.refuse(f"{name} line {lines} is not a JSON object")
                    yield row
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
            raise self.refuse(f"{name} is corrupted ({exc})") from None
        if sha.hexdigest() != expected["sha256"] or size != expected["bytes"] or lines != expected["lines"]:
            raise self.refuse(f"{name} does not match its sha256 in the manifest (corrupted or edited)")

    def close(self) -> None:
        self.zf.close()

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _need(ok: bool, reader: _Reader, what: str) -> None:
    if not ok:
        raise reader.refuse(what)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _typed(row: dict[str, Any], kind: type | tuple[type, ...], *keys: str) -> bool:
    """Each of ``keys`` is absent, None or of ``kind`` (SQLite must be able to store it)."""
    return all(row.get(k) is None or isinstance(row[k], kind) for k in keys)


def _check_manifest_hashes(code: Any, blobs: dict[str, Any], reader: _Reader, where: str) -> None:
    _need(
        code is None
        or (isinstance(code, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in code.items())),
        reader,
        f"{where}: its code is not a {{path: hash}} manifest",
    )
    missing = [h for h in (code or {}).values() if h not in blobs]
    _need(not missing, reader, f"{where}: code blob {missing[:1]} is not in the bundle")


def verify(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a bundle completely without importing it; return its manifest.

    Raises BundleInvalid (exit 2) saying what is wrong.
    """
    reader = _Reader(Path(path))
    try:
        _verify(reader)
        return reader.manifest
    finally:
        reader.close()


def _verify(reader: _Reader) -> None:
    m = reader.manifest
    runs: set[str] = set()
    for run in reader.rows("runs.jsonl"):
        _need(isinstance(run.get("id"), str) and bool(run["id"]), reader, "runs.jsonl: a run has no id")
        _need(
            run.get("server_id") is None or isinstance(run["server_id"], str),
            reader,
            f"runs.jsonl: run {run['id']} has a bad server id",
        )
        _need(
            run.get("metadata") is None or isinstance(run["metadata"], dict),
            reader,
            f"runs.jsonl: run {run['id']} has bad metadata",
        )
        _need(run["id"] not in runs, reader, f"runs.jsonl: run {run['id']} appears twice")
        _need(
            _typed(run, str, "server_id", "name", "metric", "additional_instructions")
            and _typed(run, (int, float), "maximize", "remote_only", "created_at", "updated_at"),
            reader,
            f"runs.jsonl: run {run['id']} has a field of the wrong type",
        )
        runs.add(run["id"])

    blobs: dict[str, dict[str, Any]] = {}
    for blob in reader.rows("blobs.jsonl"):
        ok = (
            isinstance(blob.get("hash"), str)
            and len(blob["hash"]) == 64
            and all(_is_int(blob.get(k)) for k in ("size", "depth", "prefix", "suffix"))
            and (blob.get("base") is None or isinstance(blob["base"], str))
            and isinstance(blob.get("data"), str)
        )
        _need(ok, reader, f"blobs.jsonl: blob {blob.get('hash')!r} is malformed")
        try:
            blob["data"] = base64.b64decode(blob["data"], validate=True)
        except ValueError:
            raise reader.refuse(f"blobs.jsonl: blob {blob['hash']} data is not base64") from None
        blobs[blob["hash"]] = blob
    _check_blobs(blobs, reader)

    for step in reader.rows("steps.jsonl"):
        where = f"steps.jsonl: step {step.get('step')!r} of run {step.get('run_id')!r}"
        _need(step.get("run_id") in runs, reader, f"{where}: its run is not in the bundle")
        _need(_is_int(step.get("step")) and step["step"] >= 0, reader, f"{where}: bad step number")
        _need(step.get("status") in ("completed", "failed"), reader, f"{where}: bad status")
        _need(isinstance(step.get("event_id"), str), reader, f"{where}: no event id")
        _need(step.get("parent_step") is None or _is_int(step["parent_step"]), reader, f"{where}: bad parent")
        for key in ("metrics", "metadata"):
            _need(step.get(key) is None or isinstance(step[key], dict), reader, f"{where}: bad {key}")
        _need(
            _typed(step, str, "description") and _typed(step, (int, float), "created_at", "updated_at"),
            reader,
            f"{where}: a field of the wrong type",
        )
        _check_manifest_hashes(step.get("code"), blobs, reader, where)

    seen: set[str] = set()
    for event in reader.rows("events.jsonl"):
        where = f"events.jsonl: event {event.get('id')!r}"
        _need(isinstance(event.get("id"), str) and bool(event["id"]), reader, f"{where}: no id")
        _need(event["id"] not in seen, reader, f"{where}: appears twice")
        seen.add(event["id"])
        _need(event.get("run_id") in runs, reader, f"{where}: its run is not in the bundle")
        _need(event.get("state") in _STATES, reader, f"{where}: bad state")
        _need(_typed(event, (int, float), "created_at"), reader, f"{where}: bad created_at")
        payload = event.get("payload")
        if not isinstance(payload, dict):
            raise reader.refuse(f"{where}: payload is not an object")
        if event.get("kind") == "create_run":
            _need(
                event.get("step") is None
                and isinstance(payload.get("source_code"), dict)
                and isinstance(payload.get("metric_name"), str),
                reader,
                f"{where}: malformed create",
            )
        else:
            _need(
                event.get("kind") == "log_step" and _is_int(event.get("step")) and payload.get("step") == event["step"],
                reader,
                f"{where}: malformed step event",
            )
        _check_manifest_hashes(
            payload.get("source_code" if event["kind"] == "create_run" else "code"), blobs, reader, where
        )

    counts = m.get("counts") or {}
    actual = {
        "runs": len(runs),
        "blobs": len(blobs),
        "events": len(seen),
        "steps": m["members"]["steps.jsonl"]["lines"],
    }
    _need(
        all(counts.get(k) == v for k, v in actual.items()),
        reader,
        f"the manifest's counts {counts} do not match the members {actual}",
    )


def _check_blobs(blobs: dict[str, dict[str, Any]], reader: _Reader) -> None:
    """Every blob must decode (through its delta chain, all in the bundle) to text hashing to its name.

    Walks each chain from its full copy down, depth first, so every blob is decoded once.
    """
    children: dict[str | None, list[str]] = {}
    for name, blob in blobs.items():
        base = blob["base"] or None
        _need(base is None or base in blobs, reader, f"blobs.jsonl: delta base {base} is not in the bundle")
        children.setdefault(base, []).append(name)
    stack: list[tuple[str, bytes | None]] = [(name, None) for name in children.get(None, [])]
    done = 0
    while stack:
        name, base_data = stack.pop()
        blob = blobs[name]
        try:
            data = codestore.decode(blob["data"], blob["prefix"], blob["suffix"], base_data)
        except zlib.error:
            raise reader.refuse(f"blobs.jsonl: blob {name} does not decompress (corrupted)") from None
        _need(
            codestore.text_hash(data) == name and len(data) == blob["size"],
            reader,
            f"blobs.jsonl: blob {name} does not hash to its name (corrupted or edited)",
        )
        done += 1
        stack.extend((child, data) for child in children.get(name, ()))
    _need(done == len(blobs), reader, "blobs.jsonl: some delta chains loop")


# -- importing -----------------------------------------------------------------


def _source(manifest: dict[str, Any]) -> str | None:
    src = manifest.get("source")
    return f"{src.get('host')}:{src.get('journal')}" if isinstance(src, dict) else None


def _remove_stale_copies(directory: Path) -> None:
    """Private copies left by an import that was killed (its pid is gone)."""
    for stale in directory.glob(".import-*-*.weco"):
        try:
            os.kill(int(stale.name.split("-")[1]), 0)
        except ProcessLookupError:
            stale.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            pass


def import_bundle(journal: Journal, path: str | os.PathLike[str], *, batch: int = 2000) -> dict[str, Any]:
    """Verify a bundle, then merge it into ``journal``; return what changed.

    Raises BundleInvalid (and imports nothing) for a truncated, corrupted,
    edited or foreign file. Importing the same bundle again returns
    ``already_imported: True`` and changes nothing. ``sync --bundle`` calls this
    and then syncs. The merge commits every ``batch`` rows; an interrupted
    import is completed by importing the same file again.

    >>> import_bundle(Journal(), "box-a.weco")["events_pending"]  # doctest: +SKIP
    16
    """
    with _Reader(Path(path)) as reader:
        m = reader.manifest
        if journal.query("SELECT 1 FROM imports WHERE bundle_id = ?", (m["bundle_id"],)):
            counts = dict.fromkeys(
                (
                    "runs_new",
                    "runs_known",
                    "server_ids_adopted",
                    "blobs_new",
                    "steps_updated",
                    "events_new",
                    "events_known",
                    "events_pending",
                ),
                0,
            )
            return {
                "bundle_id": m["bundle_id"],
                "already_imported": True,
                **counts,
                "conflicts": [],
                "path": str(path),
                "source": _source(m),
            }
    # Verify and merge a private copy, so the file cannot change between the check and the
    # merge (which commits in batches, to keep loggers waiting briefly).
    _remove_stale_copies(journal.path.parent)
    copy = journal.path.with_name(f".import-{os.getpid()}-{ids.ulid()}.weco")
    try:
        try:
            fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except OSError as exc:
            raise JournalUnavailable(f"cannot copy bundle {path} next to the journal to import it: {exc}") from None
        with _Reader(copy, shown=Path(path)) as reader:
            _verify(reader)
            m = reader.manifest
            source = _source(m)

            def blobs() -> Iterator[dict[str, Any]]:
                for blob in reader.rows("blobs.jsonl"):
                    blob["data"] = base64.b64decode(blob["data"])
                    yield blob

            summary = journal.merge_bundle(
                m["bundle_id"],
                source or "",
                list(reader.rows("runs.jsonl")),
                blobs(),
                reader.rows("steps.jsonl"),
                reader.rows("events.jsonl"),
                batch=batch,
            )
    finally:
        copy.unlink(missing_ok=True)
    summary["path"] = str(path)
    summary["source"] = source
    return summary
