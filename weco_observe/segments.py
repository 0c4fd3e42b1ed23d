"""Cluster mode: writers append records to segment files they alone own; one owner merges them.

Layout (see docs/cluster.md)::

    segments/<run>/<ulid>-<host>-<pid>.seg    sealed: one CLI call's record, written whole, renamed in
    segments/<run>/<ulid>-<host>-<pid>.open   live: one SDK process's records for that run, appended
    segments/<run>/.<name>.tmp                a record being written (ignored; never acknowledged)

``<run>`` is the run's local id, or, for a run this journal knows only by its
server id, that server id (both are safe as a folder name: ``ids.is_local_run_id``
and ``ids.is_server_id``).

**A record** is one line: eight hex digits of the CRC-32 of the JSON that follows,
a space, the JSON, ``\\n``. The JSON is ``{"v": 1, "op": "run" | "step", "ref":
<run>, "run": Run doc, "step": Step doc, "event": Event doc, "blobs": {hash:
base64 of the zlib-compressed text}}``: the records of ``records.py``, plus the
code texts the run does not hold yet. A line cut short, or whose CRC does not
match, is a torn record: skipped and reported, never fatal.

**Writers** (:class:`SegmentWriter`) never take a lock and never write
``journal.db``. Each ``log`` resolves the step's parent with the tree rule over
what every host has written for the run: the records of ``segments/<run>/`` first,
then the merged journal (read with the seqlock), in that order, so a record a
merge moves into the journal in between is still seen.

**The owner** (:func:`merge`) applies every record it has not applied yet, in
file order, idempotently by event id, in batches of transactions; remembers how
far it read each file (table ``segment_progress``); removes a file only after
its records are committed, and an ``.open`` file only once its writer is gone.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import ids, outbox, treerule, validate
from .errors import JournalUnavailable, UnknownRun
from .files import JournalFiles, private_dir
from .records import CodeRef, Event, Run, Step, dumps
from .settings import Settings

__all__ = ["MergeResult", "SegmentWriter", "backlog", "check_files", "merge", "read_records"]

VERSION = 1
#: an abandoned ``.open`` file from another host (its writer cannot be asked) is sealed after this long unchanged
ABANDONED = 24 * 3600.0
#: a ``.tmp`` file older than this is a writer that died before acknowledging: removed
STALE_TMP = 3600.0
_HOST = socket.gethostname().replace("/", "_").replace("-", "_")[:64] or "host"


# -- the record format ----------------------------------------------------------------------


def encode(doc: Mapping[str, Any]) -> bytes:
    """One record as a line: CRC-32 of the JSON, a space, the JSON.

    >>> encode({"v": 1})
    b'84dbe73d {"v":1}\\n'
    """
    body = dumps(doc).encode("utf-8")
    return b"%08x %s\n" % (zlib.crc32(body), body)


@dataclass
class Parsed:
    """What a read of a segment found: whole records, where the last whole line ends, torn lines."""

    records: list[dict[str, Any]] = field(default_factory=list)
    end: int = 0
    torn: list[str] = field(default_factory=list)
    #: bytes after the last newline (a record being appended, or cut short)
    tail: int = 0


def decode(data: bytes, offset: int = 0) -> Parsed:
    """Parse the whole lines of ``data`` (which starts at file offset ``offset``)."""
    out = Parsed(end=offset)
    pos = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            out.tail = len(data) - pos
            return out
        line = data[pos:nl]
        where = offset + pos
        pos = nl + 1
        out.end = offset + pos
        if len(line) < 10 or line[8:9] != b" ":
            out.torn.append(f"byte {where}: not a record")
            continue
        body = line[9:]
        try:
            ok = int(line[:8], 16) == zlib.crc32(body)
        except ValueError:
            ok = False
        if not ok:
            out.torn.append(f"byte {where}: checksum mismatch")
            continue
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            out.torn.append(f"byte {where}: not JSON")
            continue
        if not isinstance(doc, dict) or doc.get("v") != VERSION or doc.get("op") not in ("run", "step"):
            out.torn.append(f"byte {where}: not a record of this version")
            continue
        out.records.append(doc)


def _blob_text(encoded: str) -> str:
    return zlib.decompress(base64.b64decode(encoded, validate=True)).decode("utf-8")


def _blob_doc(text: str) -> str:
    return base64.b64encode(zlib.compress(text.encode("utf-8"), 6)).decode("ascii")


# -- files -------------------------------------------------------------------------------


def _partitions(files: JournalFiles) -> list[Path]:
    try:
        names = sorted(os.listdir(files.segments_dir))
    except OSError:
        return []
    return [files.segments_dir / n for n in names if ids.is_local_run_id(n) or ids.is_server_id(n)]


def _segment_files(partition: Path) -> list[Path]:
    """The ``.seg`` and ``.open`` files of a partition, oldest first (names begin with a ULID)."""
    try:
        names = os.listdir(partition)
    except OSError:
        return []
    return [partition / n for n in sorted(names) if n.endswith((".seg", ".open")) and not n.startswith(".")]


def read_records(path: Path, offset: int = 0) -> Parsed:
    """Read a segment from ``offset`` (opened afresh: under NFS close-to-open, that shows the latest)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return Parsed(end=offset)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            return Parsed(end=offset, torn=["not a regular file of yours"])
        chunks = []
        pos = offset
        while True:
            chunk = os.pread(fd, 1 << 20, pos)
            if not chunk:
                break
            chunks.append(chunk)
            pos += len(chunk)
    finally:
        os.close(fd)
    return decode(b"".join(chunks), offset)


def backlog(files: JournalFiles) -> dict[str, int]:
    """For ``status``: segment files waiting to be merged, and their bytes (no file is read)."""
    count = size = 0
    for partition in _partitions(files):
        for path in _segment_files(partition):
            try:
                size += path.stat().st_size
            except OSError:
                continue
            count += 1
    return {"files": count, "bytes": size}


def _writer_alive(path: Path) -> bool | None:
    """For an ``.open`` file: is its writer alive? None when it runs on another host (cannot tell)."""
    try:
        _ulid, host, pid = path.name.rsplit(".", 1)[0].rsplit("-", 2)
    except ValueError:
        return False
    if host != _HOST:
        return None
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _finished(path: Path, now: float) -> bool:
    """A segment whose writer will add nothing more: sealed, or open with its writer gone."""
    if path.name.endswith(".seg"):
        return True
    alive = _writer_alive(path)
    if alive is not None:
        return not alive
    try:
        return now - path.stat().st_mtime > ABANDONED
    except OSError:
        return True


# -- the writer ----------------------------------------------------------------------------


class _RunView:
    """What every host has written for one run: the merged journal plus the unmerged segments."""

    def __init__(self, run_id: str | None, ref: str, remote_only: bool, known: bool):
        self.run_id = run_id
        self.ref = ref
        self.remote_only = remote_only
        #: the run exists (in the journal, or as a run record in its segments)
        self.known = known
        self.steps: dict[int, Step] = {}
        self.blobs: set[str] = set()
        self.metric: str | None = None
        self.maximize: bool | None = None
        self.server_id: str | None = None

    def add(self, step: Step) -> None:
        held = self.steps.get(step.step)
        if held is None or step.event_id > held.event_id:  # the latest event wins, as in a merge
            self.steps[step.step] = step
        if step.code:
            self.blobs.update(step.code.hashes())

    def last_kept_below(self, n: int) -> int | None:
        kept = [s for s, st in self.steps.items() if s < n and (st.status != "failed" or s == 0)]
        return max(kept) if kept else None


class _FileRecords:
    """What one segment file holds, as far as it was read."""

    def __init__(self) -> None:
        self.end = 0
        self.steps: list[Step] = []
        self.blobs: set[str] = set()
        self.run: tuple[Any, Any] | None = None

    def add(self, doc: dict[str, Any]) -> None:
        try:
            step = Step.from_doc(doc["step"])
        except (KeyError, TypeError, ValueError):
            return
        self.steps.append(step)
        if step.code:
            self.blobs.update(step.code.hashes())
        self.blobs.update(doc.get("blobs") or {})
        if doc.get("op") == "run":
            run = doc.get("run") or {}
            self.run = (run.get("metric"), run.get("maximize"))


class SegmentWriter:
    """The cluster-mode writer: ``create_run``/``log_step``/``find_run`` as ``Journal`` has them,
    writing segment files instead of the journal.

    ``append`` (the SDK) keeps one ``.open`` file per run and process, appended
    with one write and one fsync per record; without it (the CLI), each call
    publishes one sealed ``.seg`` file.
    """

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, settings: Settings | None = None, append: bool = False
    ):
        self.settings = settings or Settings.load()
        self.path = Path(path) if path is not None else self.settings.journal_path
        self.files = JournalFiles(self.path)
        self.append = append
        if append:
            import atexit

            atexit.register(self.close)  # seal this process's .open files when it exits normally
        self._open: dict[str, tuple[int, Path]] = {}
        #: how many segment files the last ``log_step`` found unmerged for its run (a merge is due when many)
        self.backlog = 0
        #: what each segment file held when last read, so a long-lived writer reads each record once
        self._files: dict[Path, _FileRecords] = {}
        try:
            private_dir(self.path.parent)
            private_dir(self.files.segments_dir)
        except OSError as exc:
            raise JournalUnavailable(f"cannot write journal {self.path}: {exc}") from None

    def close(self) -> None:
        """Seal every ``.open`` file this writer appended to."""
        for fd, path in self._open.values():
            try:
                os.close(fd)
                os.rename(path, path.with_suffix(".seg"))
            except OSError:
                pass
        self._open.clear()

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading what is there --------------------------------------------------------------

    def _reader(self) -> Any:
        from .journal import SharedReader

        try:
            return SharedReader(self.path, settings=self.settings)
        except JournalUnavailable:
            return None  # no journal yet: nothing merged

    def _journal_run(self, reader: Any, ref: str) -> Any:
        if reader is None:
            return None
        rows = reader.query("SELECT * FROM runs WHERE id = ? OR server_id = ?", (ref, ref))
        return rows[0] if rows else None

    def _partition_steps(self, partition: Path, view: _RunView) -> bool:
        """Fold the partition's records into ``view``; True if it holds the run's create.

        Each file is read once, an ``.open`` one from where the last read stopped:
        a long-lived writer (the SDK) pays only for what is new."""
        created = False
        found = _segment_files(partition)
        self.backlog += len(found)
        for path in found:
            held = self._files.get(path)
            if held is None or not path.name.endswith(".seg"):
                held = held or _FileRecords()
                parsed = read_records(path, held.end)
                held.end = parsed.end
                for doc in parsed.records:
                    held.add(doc)
                self._files[path] = held
            for step in held.steps:
                view.add(step)
            view.blobs |= held.blobs
            if held.run is not None:
                created = True
                view.metric, view.maximize = held.run
        return created

    def _view(self, ref: str) -> _RunView:
        """Every step any host wrote for ``ref``: segments first, then the merged journal."""
        if not (ids.is_local_run_id(ref) or ids.is_server_id(ref)):
            raise UnknownRun(
                f"unknown --run-id {ref!r}: use the id printed by `weco observe init` "
                "(or a Weco server run id); `weco observe runs` lists them"
            )
        partition = self.files.segments_dir / ref
        probe = _RunView(None, ref, False, False)
        self.backlog = 0
        created = self._partition_steps(partition, probe) if partition.is_dir() else False
        reader = self._reader()
        row = self._journal_run(reader, ref)
        if row is not None and row["id"] != ref:  # logged by server id: the run's own folder too
            own = self.files.segments_dir / row["id"]
            if own.is_dir():
                created = self._partition_steps(own, probe) or created
        if row is not None:
            view = _RunView(row["id"], row["id"], bool(row["remote_only"]), True)
            view.metric, view.maximize, view.server_id = row["metric"], row["maximize"], row["server_id"]
            for r in reader.query("SELECT * FROM steps WHERE run_id = ?", (row["id"],)):
                view.add(Step.from_row(r))
        elif created:
            view = _RunView(ref, ref, False, True)
            view.metric, view.maximize = probe.metric, probe.maximize
        elif ids.looks_like_server_id(ref):
            view = _RunView(None, ref, True, False)  # first seen by its server id: a remote-only run
        else:
            raise UnknownRun(
                f"unknown --run-id {ref!r}: use the id printed by `weco observe init` "
                "(or a Weco server run id); `weco observe runs` lists them"
            )
        for step in probe.steps.values():
            view.add(replace(step, run_id=view.ref))
        view.blobs |= probe.blobs
        return view

    def find_run(self, ref: str, *, prefix: bool = False) -> dict[str, Any] | None:
        """The run ``ref`` names, merged or not (a prefix is looked up in the merged journal only)."""
        try:
            view = self._view(ref)
        except UnknownRun:
            view = None
        if view is not None and view.known:
            return {"id": view.ref, "server_id": view.server_id, "metric": view.metric, "maximize": view.maximize}
        if prefix:
            reader = self._reader()
            if reader is not None:
                row = reader.find_run(ref, prefix=True)
                return dict(row) if row is not None else None
        return None

    # -- writing ----------------------------------------------------------------------------

    def _publish(self, ref: str, doc: dict[str, Any], event_id: str) -> None:
        """Make the record durable: appended to this process's ``.open`` file, or a sealed file of its own."""
        partition = self.files.segments_dir / ref
        line = encode(doc)
        try:
            private_dir(partition)
            if self.append:
                fd, path = self._open.get(ref) or self._new_open(partition, event_id)
                os.write(fd, line)
                os.fsync(fd)
                return
            name = f"{event_id}-{_HOST}-{os.getpid()}.seg"
            tmp = partition / f".{name}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, partition / name)
            _fsync_dir(partition)
        except OSError as exc:
            raise JournalUnavailable(f"cannot write journal segment under {partition}: {exc}") from None

    def _new_open(self, partition: Path, event_id: str) -> tuple[int, Path]:
        path = partition / f"{event_id}-{_HOST}-{os.getpid()}.open"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        _fsync_dir(partition)  # the file's name is durable before any record in it is acknowledged
        self._open[partition.name] = (fd, path)
        return fd, path

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
        """Record a new run and its baseline as one record of its own folder; return the local id."""
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
        manifest, blobs = _code(code, set())
        step = Step.baseline(run_id, manifest, event_id=event_id, at=now)
        event = Event.create(run, manifest, event_id=event_id)
        doc = {
            "v": VERSION,
            "op": "run",
            "ref": run_id,
            "run": run.to_doc(),
            "step": step.to_doc(),
            "event": event.to_doc(),
            "blobs": blobs,
        }
        self._publish(run_id, doc, event_id)
        return run_id

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
        """Record one step as a segment record, its parent resolved over every host's steps."""
        description, metrics, code, metadata = validate.check_step_args(
            step, status, description, metrics, code, parent_step, metadata
        )
        event_id = event_id or ids.ulid()
        now = time.time()
        view = self._view(run)
        prev = view.steps.get(step)
        if prev is not None and prev.event_id == event_id:  # a replayed spill file: already written
            return _result(prev, updated=False)
        parent = treerule.resolve(
            step,
            parent_step,
            prev,
            run=run,
            remote_only=view.remote_only,
            exists=view.steps.__contains__,
            last_kept_below=view.last_kept_below,
        )
        manifest, blobs = _code(code, view.blobs) if code is not None else (None, {})
        state = Step(
            run_id=view.ref,
            step=step,
            status=status,
            description=description,
            metrics=metrics,
            code=manifest,
            parent_step=parent,
            metadata=metadata,
            event_id=event_id,
            created_at=now,
            updated_at=now,
        ).merged_with(prev)
        doc = {
            "v": VERSION,
            "op": "step",
            "ref": view.ref,
            "step": state.to_doc(),
            "event": Event.log(state).to_doc(),
            "blobs": blobs,
        }
        self._publish(view.ref, doc, event_id)
        return _result(state, updated=prev is not None, run_first_seen=not view.known and not view.steps)


def _code(code: Mapping[str, str], known: set[str]) -> tuple[CodeRef, dict[str, str]]:
    """The manifest of ``code`` and the texts the run does not hold yet, encoded for a record."""
    from .codestore import text_hash

    manifest: dict[str, str] = {}
    blobs: dict[str, str] = {}
    for path, text in code.items():
        digest = text_hash(text.encode("utf-8"))
        manifest[path] = digest
        if digest not in known:
            blobs[digest] = _blob_doc(text)
    return CodeRef.from_manifest(manifest) or CodeRef(()), blobs


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some network filesystems refuse fsync on a directory; their metadata ops are synchronous
    finally:
        os.close(fd)


# -- the owner: merging ------------------------------------------------------------------


@dataclass
class MergeResult:
    """What a merge did: records applied, records already in the journal, files removed, problems."""

    applied: int = 0
    known: int = 0
    files_merged: int = 0
    files_removed: int = 0
    #: torn or damaged records, skipped: ``"<file>: <why>"``
    problems: list[str] = field(default_factory=list)
    #: files kept because a record could not be applied yet (its run's create is missing)
    kept: list[str] = field(default_factory=list)
    elapsed: float = 0.0


def _progress(journal: Any, key: str) -> int:
    rows = journal.query("SELECT offset FROM segment_progress WHERE name = ?", (key,))
    return rows[0][0] if rows else 0


def merge(journal: Any, *, batch: int = 2000, now: float | None = None) -> MergeResult:
    """Apply every segment record not yet in ``journal`` (opened by the owner), then remove
    what is fully merged. Idempotent by event id: merging twice changes nothing."""
    start = time.monotonic()
    now = now if now is not None else time.time()
    result = MergeResult()
    files = journal.files
    for partition in _partitions(files):
        paths = _segment_files(partition)
        reads: list[tuple[Path, str, Parsed, bool]] = []
        for path in paths:
            key = f"{partition.name}/{path.name}"
            done = _finished(path, now)  # decided before reading: whatever is read is all there is
            parsed = read_records(path, _progress(journal, key))
            reads.append((path, key, parsed, done))
        # runs first: a step's file can sort before its run's when two hosts' clocks disagree
        docs = [(key, d) for _path, key, parsed, _done in reads for d in parsed.records]
        docs.sort(key=lambda kd: kd[1].get("op") != "run")
        blocked: set[str] = set()
        for i in range(0, len(docs), batch):
            with journal.write() as conn:
                for key, doc in docs[i : i + batch]:
                    outcome = _apply(journal, conn, doc)
                    if outcome == "applied":
                        result.applied += 1
                    elif outcome == "known":
                        result.known += 1
                    elif outcome == "no run":
                        blocked.add(key)
                    else:
                        result.problems.append(f"{key}: {outcome}")
        with journal.write() as conn:
            for _path, key, parsed, _done in reads:
                if key in blocked:
                    continue
                conn.execute(
                    "INSERT INTO segment_progress (name, offset, updated_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (name) DO UPDATE SET offset = excluded.offset, updated_at = excluded.updated_at",
                    (key, parsed.end, now),
                )
        for path, key, parsed, done in reads:
            result.problems.extend(f"{key}: {why}" for why in parsed.torn)
            if key in blocked:
                result.kept.append(key)
                continue
            result.files_merged += 1
            if not done:
                continue
            if parsed.tail:
                result.problems.append(f"{key}: a torn last record ({parsed.tail} bytes), never acknowledged: skipped")
            try:
                path.unlink()
            except OSError:
                continue
            result.files_removed += 1
            with journal.write() as conn:
                conn.execute("DELETE FROM segment_progress WHERE name = ?", (key,))
        _tidy(partition, now)
    result.elapsed = time.monotonic() - start
    return result


def _tidy(partition: Path, now: float) -> None:
    """Remove temporary files of writers that died before acknowledging, and an empty folder."""
    try:
        names = os.listdir(partition)
    except OSError:
        return
    for name in names:
        if name.startswith(".") and name.endswith(".tmp"):
            path = partition / name
            try:
                if now - path.stat().st_mtime > STALE_TMP:
                    path.unlink()
            except OSError:
                pass
    try:
        partition.rmdir()  # only when empty; a writer that raced us re-creates it
    except OSError:
        pass


def _apply(journal: Any, conn: Any, doc: dict[str, Any]) -> str:
    """Apply one record in the caller's transaction: "applied", "known", "no run", or why it was skipped."""
    try:
        event = Event.from_doc(doc["event"])
        step = Step.from_doc(doc["step"])
        ref = doc["ref"]
        texts = {digest: _blob_text(encoded) for digest, encoded in (doc.get("blobs") or {}).items()}
    except (KeyError, TypeError, ValueError, zlib.error, UnicodeDecodeError) as exc:
        return f"a damaged record ({type(exc).__name__}), skipped"
    if not ids.is_ulid(event.id) or not (ids.is_local_run_id(ref) or ids.is_server_id(ref)):
        return "a record with malformed ids, skipped"
    if outbox.known(conn, event.id):
        return "known"
    if doc["op"] == "run":
        try:
            run = Run.from_doc(doc["run"])
        except (KeyError, TypeError, ValueError) as exc:
            return f"a damaged run record ({type(exc).__name__}), skipped"
        if conn.execute("SELECT 1 FROM runs WHERE id = ?", (run.id,)).fetchone() is None:
            journal.insert_run(conn, run)
        _store(journal, conn, step.code, texts, None)
        journal.insert_baseline(conn, step)
        outbox.enqueue(conn, event)
        return "applied"
    row = conn.execute("SELECT id FROM runs WHERE id = ? OR server_id = ?", (ref, ref)).fetchone()
    if row is not None:
        run_id = row[0]
    elif ids.is_local_run_id(ref):
        return "no run"  # its create is not merged (a torn or missing record): keep the file
    else:
        run_id = ids.new_run_id()  # first seen by its server id, on another host: a remote-only run
        journal.insert_run(
            conn,
            Run(id=run_id, server_id=ref, remote_only=True, created_at=step.created_at, updated_at=step.created_at),
        )
    step = replace(step, run_id=run_id)
    event = replace(event, run_id=run_id)
    base = journal._code_at_or_below(conn, run_id, step.parent_step if step.parent_step is not None else step.step)
    _store(journal, conn, step.code, texts, base)
    newer = journal.has_newer_step(conn, run_id, step.step, event.id)
    journal.upsert_step(conn, step)
    outbox.enqueue(conn, replace(event, state=outbox.SUPERSEDED if newer else outbox.PENDING))
    return "applied"


def _store(journal: Any, conn: Any, code: CodeRef | None, texts: dict[str, str], base: CodeRef | None) -> None:
    """Store the texts a record carries for its manifest (the others are in the journal already)."""
    if not code:
        return
    carried = {path: texts[digest] for path, digest in code.files if digest in texts}
    if carried:
        journal.store_code(conn, carried, base)


def check_files(files: JournalFiles, now: float | None = None) -> dict[str, Any]:
    """For ``doctor``: every segment read and checked, nothing changed.

    Returns ``{"files", "records", "torn": ["<file>: why"], "open": n, "abandoned": ["<file>"],
    "stale_tmp": n, "bytes"}``.
    """
    now = now if now is not None else time.time()
    out: dict[str, Any] = {"files": 0, "records": 0, "torn": [], "open": 0, "abandoned": [], "stale_tmp": 0, "bytes": 0}
    for partition in _partitions(files):
        for path in _segment_files(partition):
            key = f"{partition.name}/{path.name}"
            parsed = read_records(path)
            out["files"] += 1
            out["records"] += len(parsed.records)
            out["bytes"] += parsed.end + parsed.tail
            out["torn"] += [f"{key}: {why}" for why in parsed.torn]
            if path.name.endswith(".open"):
                out["open"] += 1
                if _finished(path, now):
                    out["abandoned"].append(key)
                    if parsed.tail:
                        out["torn"].append(f"{key}: a torn last record ({parsed.tail} bytes), never acknowledged")
            elif parsed.tail:
                out["torn"].append(f"{key}: a torn last record ({parsed.tail} bytes)")
        try:
            tmps = [n for n in os.listdir(partition) if n.startswith(".") and n.endswith(".tmp")]
        except OSError:
            tmps = []
        for name in tmps:
            try:
                out["stale_tmp"] += now - (partition / name).stat().st_mtime > STALE_TMP
            except OSError:
                pass
    return out
