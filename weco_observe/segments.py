"""Cluster mode: writers append records to segment files they alone own; one owner merges them.

Layout (see docs/cluster.md)::

    segments/<run>/<ulid>-<host>-<pid>.seg    sealed: one CLI call's record, written whole, renamed in
    segments/<run>/<ulid>-<host>-<pid>.open   live: one SDK process's records for that run, appended
    segments/<run>/.<name>.tmp                a record being written (ignored; never acknowledged)

``<run>`` is the run's local id, or, for a run this journal knows only by its
server id, that server id (both are safe as a folder name: ``ids.is_local_run_id``
and ``ids.is_server_id``).

**A record** is one line: eight hex digits of the CRC-32 of the JSON that follows,
a space, the JSON, ``\\n``. The JSON is ``{"v": 2, "op": "run" | "step", "ref":
<run>, "run": Run doc, "step": Step doc, "blobs": {hash: base64 of the
zlib-compressed text}}``: the records of ``records.py``, plus the code texts the
run does not hold yet. The outbox event is made from the step (``Event.log``) or
the run (``Event.create``) when the record is merged, as ``log`` makes it; version
1 records also carried it as ``"event"``, which is read past. A line
cut short, or whose CRC does not match, is a torn record: skipped and reported,
never fatal. A record of a newer version keeps its file for a newer owner.

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
import contextlib
import gc
import json
import os
import socket
import stat
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from . import codestore, ids, outbox, treerule, validate
from .errors import JournalUnavailable, UnknownRun
from .files import JournalFiles, private_dir
from .records import CodeRef, Event, Run, Step, dumps
from .settings import Settings

__all__ = ["MergeResult", "SegmentWriter", "backlog", "check_files", "merge", "read_records"]

#: The record format written: 1, which carries the outbox event beside the step (or the run).
#: Owners of every release merge it, and on a cluster the hosts run whatever release their
#: venv has: an owner that does not read a record's format skips it as torn and removes its
#: file once the rest is merged, so a writer must not write a format before every owner reads it.
VERSION = 1
#: The formats merged. 2 is 1 without the event (the merge makes the event from the step in
#: both): half the JSON to decode. Once the owners in use all read 2, writers can switch to it.
#: Not yet: the first release with cluster mode (035fd01) reads only 1, and its owner
#: would drop a file of format 2 records as torn once the rest of the folder is merged.
_READ = (1, 2)
#: an abandoned ``.open`` file from another host (its writer cannot be asked) is sealed after this long unchanged
ABANDONED = 24 * 3600.0
#: a ``.tmp`` file older than this is a writer that died before acknowledging: removed
STALE_TMP = 3600.0
#: tries to create a segment in a run folder the owner keeps removing (0.05 s, 0.1 s, ... apart: ~2.3 s in all)
_CREATE_TRIES = 10
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
    #: the file could not be read to its end (removed or renamed meanwhile): nothing is known of it
    gone: bool = False
    #: records of a newer format than this code reads (a newer writer): the file is kept for a newer owner
    newer: int = 0


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
            doc = json.loads(body.decode("utf-8"))
        except (ValueError, RecursionError):
            out.torn.append(f"byte {where}: not JSON")
            continue
        if not isinstance(doc, dict) or doc.get("v") not in _READ or doc.get("op") not in ("run", "step"):
            if isinstance(doc, dict) and isinstance(doc.get("v"), int) and doc["v"] > max(_READ):
                out.newer += 1
            else:
                out.torn.append(f"byte {where}: not a record of this version")
            continue
        out.records.append(doc)


#: A carried code blob inflates to at most this, or to ``_INFLATE_RATIO`` times its compressed
#: size when that is more: a zlib bomb in a damaged or forged record costs bounded memory and
#: time, while real code (which compresses 3-20x) of any size still merges.
_INFLATE_FLOOR = 256 << 20
_INFLATE_RATIO = 200


def _blob_text(encoded: str) -> str:
    data = base64.b64decode(encoded, validate=True)
    limit = max(_INFLATE_FLOOR, _INFLATE_RATIO * len(data))
    inflater = zlib.decompressobj()
    text = inflater.decompress(data, limit + 1)
    if len(text) > limit or inflater.unconsumed_tail:
        raise ValueError(f"a code blob inflates past {limit >> 20} MiB")
    if not inflater.eof:
        raise ValueError("a code blob is cut short")
    return text.decode("utf-8")


def _blob_doc(text: str) -> str:
    # level 1: on the SDK's hot path, 2-3x faster than 6 for 13 KB of code, for 11% more bytes
    return base64.b64encode(zlib.compress(text.encode("utf-8"), 1)).decode("ascii")


# -- files -------------------------------------------------------------------------------


def _partitions(files: JournalFiles) -> list[Path]:
    try:
        names = sorted(os.listdir(files.segments_dir))
    except OSError:
        return []
    return [files.segments_dir / n for n in names if ids.is_local_run_id(n) or ids.is_server_id(n)]


def _segment_names(partition: str | Path) -> list[str]:
    """The names of a partition's ``.seg`` and ``.open`` files, oldest first (they begin with a ULID)."""
    try:
        names = os.listdir(partition)
    except OSError:
        return []
    return [n for n in sorted(names) if n.endswith((".seg", ".open")) and not n.startswith(".")]


def _segment_files(partition: Path) -> list[Path]:
    """The ``.seg`` and ``.open`` files of a partition, oldest first."""
    return [partition / n for n in _segment_names(partition)]


def read_records(path: Path, offset: int = 0) -> Parsed:
    """Read a segment from ``offset`` (opened afresh: under NFS close-to-open, that shows the latest).

    A file that goes while it is read reads as ``gone``, with no records: the owner removes a
    segment once its records are committed (a writer reads the journal after the segments, so
    it finds them there), and an SDK writer renames its ``.open`` file when it closes. Another
    host's removal shows up at the descriptor already open: sshfs fails ``fstat`` with ENOENT,
    NFS fails reads with ESTALE."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return Parsed(end=offset, gone=True)
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
    except OSError:
        return Parsed(end=offset, gone=True)
    finally:
        with contextlib.suppress(OSError):
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


class _Unmerged:
    """What this process has read of one run folder's segment files, folded record by record:
    the latest state of each step not known to be merged yet, the code hashes the records
    carry, and the run's create if it is there. Each file is read from where the last read
    stopped (a sealed one once), so a long-lived writer (the SDK) pays only for what is new."""

    def __init__(self) -> None:
        self.steps: dict[int, Step] = {}
        self.blobs: set[str] = set()
        #: ``(metric, maximize)`` from the run's create record, when this folder holds it
        self.run: tuple[Any, Any] | None = None
        #: how far each file (by name) was read
        self.read: dict[str, int] = {}

    def fold(self, doc: dict[str, Any], step: Step | None = None) -> None:
        """Fold in one record; ``step``: its step, when the caller made it (no need to read it back)."""
        if step is None:
            try:
                step = Step.from_doc(doc["step"])
            except (KeyError, TypeError, ValueError):
                return
        held = self.steps.get(step.step)
        if held is None or step.event_id > held.event_id:  # the latest event wins, as in a merge
            self.steps[step.step] = step
        if step.code:
            self.blobs.update(step.code.hashes())
        self.blobs.update(doc.get("blobs") or {})
        if doc.get("op") == "run":
            run = doc.get("run") or {}
            self.run = (run.get("metric"), run.get("maximize"))


class _Merged:
    """The merged journal's side of one run, as of one state of the journal (``key``: the commit
    counter and the file's inode). Read again only when the counter moved, and then only the steps
    that events newer than ``events`` touched: the cost does not grow with the run."""

    def __init__(self) -> None:
        self.key: tuple[int, int] | None = None
        self.row: dict[str, Any] | None = None
        #: step -> (status, event id)
        self.steps: dict[int, tuple[str, str]] = {}
        #: the newest ``events.seq`` of the run read so far
        self.events = 0
        #: code hashes known to be stored in the journal (a stored blob is never removed)
        self.blobs: set[str] = set()


class _RunView:
    """What every host has written for one run: the merged journal plus the unmerged segments,
    looked up in place (nothing is copied: a view costs the same for a 10-step run as for 100,000)."""

    def __init__(self, ref: str, remote_only: bool, known: bool, merged: _Merged, parts: list[_Unmerged]):
        self.ref = ref
        self.remote_only = remote_only
        #: the run exists (in the journal, or as a run record in its segments)
        self.known = known
        self.merged = merged
        self.parts = parts
        row = merged.row or {}
        created = next((p.run for p in parts if p.run is not None), None)
        self.metric, self.maximize = (row.get("metric"), row.get("maximize")) if row else (created or (None, None))
        self.server_id: str | None = row.get("server_id")

    def has_steps(self) -> bool:
        """Any host has written a step of this run (merged or not)."""
        return bool(self.merged.steps) or any(part.steps for part in self.parts)

    def latest(self, n: int) -> tuple[str, str, Step | None] | None:
        """``(status, event id, the Step if a segment holds it)`` of step ``n``'s latest event."""
        best: tuple[str, str, Step | None] | None = None
        for part in self.parts:
            held = part.steps.get(n)
            if held is not None and (best is None or held.event_id > best[1]):
                best = (held.status, held.event_id, held)
        merged = self.merged.steps.get(n)
        if merged is not None and (best is None or merged[1] > best[1]):
            best = (merged[0], merged[1], None)
        return best

    def last_kept_below(self, n: int) -> int | None:
        known = len(self.merged.steps) + sum(len(p.steps) for p in self.parts)
        if n <= 2 * known + 16:  # steps are mostly consecutive: walk down from n - 1
            candidates: Any = range(n - 1, -1, -1)
        else:
            candidates = sorted(
                {s for s in self.merged.steps if s < n}.union(*(p.steps for p in self.parts)), reverse=True
            )
        for s in candidates:
            if s >= n:
                continue
            found = self.latest(s)
            if found is not None and (found[0] != "failed" or s == 0):
                return s
        return None

    def holds_blob(self, digest: str) -> bool:
        return digest in self.merged.blobs or any(digest in p.blobs for p in self.parts)


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
        #: bytes this process appended to each of its ``.open`` files (it alone writes them)
        self._written: dict[str, int] = {}
        #: how many segment files the last ``log_step`` found unmerged for its run (a merge is due when many)
        self.backlog = 0
        #: per run folder, what its segment files held when last read (each record is read once)
        self._unmerged: dict[str, _Unmerged] = {}
        #: per run reference, the merged journal's side, read again only when the journal changed
        self._merged: dict[str, _Merged] = {}
        try:
            private_dir(self.path.parent)
            private_dir(self.files.segments_dir)
        except OSError as exc:
            raise JournalUnavailable(f"cannot write journal {self.path}: {exc}") from None

    def close(self) -> None:
        """Seal every ``.open`` file this writer appended to."""
        for ref in list(self._open):
            self._seal(ref)

    def _seal(self, ref: str) -> None:
        """Close the run's ``.open`` file and rename it ``.seg``: nothing more is appended to it (a
        torn last record, from a write that failed, is reported and skipped by the merge)."""
        fd, path = self._open.pop(ref)
        self._written.pop(path.name, None)
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(OSError):  # left .open: the owner merges it once this process is gone
            os.rename(path, path.with_suffix(".seg"))

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

    def _fold_partition(self, name: str) -> _Unmerged:
        """What the run folder ``name`` holds, its files read from where the last read stopped."""
        part = self._unmerged.setdefault(name, _Unmerged())
        folder = os.path.join(self.files.segments_dir, name)  # strings: this runs on every log_step
        found = _segment_names(folder)  # none when there is no folder
        self.backlog += len(found)
        for file in found:
            if file.endswith(".seg") and file in part.read:
                continue  # sealed: read whole already
            if part.read.get(file, -1) == self._written.get(file):
                continue  # this process's own .open file, every record of it folded as it was written
            parsed = read_records(Path(folder, file), part.read.get(file, 0))
            if parsed.gone:  # merged and removed, or sealed, meanwhile: its records are in the journal or the .seg
                continue
            part.read[file] = parsed.end
            for doc in parsed.records:
                part.fold(doc)
        if len(part.read) > len(found):
            listed = set(found)
            part.read = {n: end for n, end in part.read.items() if n in listed}
        return part

    def _journal_key(self) -> tuple[int, int] | None:
        """The state of the merged journal: its commit counter and its inode (None: no journal yet)."""
        from .journal import read_seq

        try:
            inode = os.stat(self.path).st_ino
        except OSError:
            return None
        return read_seq(self.files.commit_seq), inode

    def _merged_side(self, ref: str, digests: frozenset[str]) -> _Merged:
        """The merged journal's side of run ``ref``: the cached one while the journal has not
        changed, else the steps that newer events touched (everything, the first time)."""
        merged = self._merged.setdefault(ref, _Merged())
        key = self._journal_key()
        if key is None or (key == merged.key and key[0] % 2 == 0):
            return merged
        reader = self._reader()
        if reader is None:
            return merged

        def read(conn: Any) -> tuple[Any, list[Any], int, list[str]]:
            row = conn.execute("SELECT * FROM runs WHERE id = ? OR server_id = ?", (ref, ref)).fetchone()
            if row is None:
                return None, [], 0, []
            run_id = row["id"]
            newest = conn.execute("SELECT max(seq) FROM events WHERE run_id = ?", (run_id,)).fetchone()[0] or 0
            if merged.row is not None and merged.row["id"] == run_id:
                steps = conn.execute(
                    "SELECT step, status, event_id FROM steps WHERE run_id = ? AND step IN"
                    " (SELECT coalesce(step, 0) FROM events WHERE run_id = ? AND seq > ?)",
                    (run_id, run_id, merged.events),
                ).fetchall()
            else:
                steps = conn.execute("SELECT step, status, event_id FROM steps WHERE run_id = ?", (run_id,)).fetchall()
            held: list[str] = []
            if digests:
                marks = ", ".join("?" * len(digests))
                held = [r[0] for r in conn.execute(f"SELECT hash FROM blobs WHERE hash IN ({marks})", tuple(digests))]
            return row, steps, newest, held

        row, steps, newest, held = reader.read(read)
        if row is None or merged.row is None or merged.row["id"] != row["id"]:
            merged.steps.clear()
        merged.row = dict(row) if row is not None else None
        merged.events = newest
        for step, status, event_id in steps:
            merged.steps[step] = (status, event_id)
        merged.blobs.update(held)
        merged.key = (reader.last_seq, key[1])
        # steps now merged need not be kept from the segments (a long-lived writer would hold them all)
        for part in self._unmerged.values():
            for step, _status, event_id in steps:
                unmerged = part.steps.get(step)
                if unmerged is not None and unmerged.event_id <= event_id:
                    del part.steps[step]
        return merged

    def _view(self, ref: str, digests: frozenset[str] = frozenset()) -> _RunView:
        """Every step any host wrote for ``ref``: segments first, then the merged journal (a record
        a merge moves into the journal in between is found there: files go only after their commit).
        ``digests``: the code hashes about to be logged, asked of the journal when it is read."""
        if not (ids.is_local_run_id(ref) or ids.is_server_id(ref)):
            raise UnknownRun(
                f"unknown --run-id {ref!r}: use the id printed by `weco observe init` "
                "(or a Weco server run id); `weco observe runs` lists them"
            )
        self.backlog = 0
        parts = [self._fold_partition(ref)]
        merged = self._merged_side(ref, digests)
        row = merged.row
        if row is not None and row["id"] != ref:  # logged by server id: the run's own folder too
            parts.append(self._fold_partition(row["id"]))
        if row is not None:
            return _RunView(row["id"], bool(row["remote_only"]), True, merged, parts)
        if any(p.run is not None for p in parts):
            return _RunView(ref, False, True, merged, parts)
        if ids.looks_like_server_id(ref):
            return _RunView(ref, True, False, merged, parts)  # first seen by its server id: a remote-only run
        raise UnknownRun(
            f"unknown --run-id {ref!r}: use the id printed by `weco observe init` "
            "(or a Weco server run id); `weco observe runs` lists them"
        )

    def _prev(self, view: _RunView, step: int) -> Step | None:
        """The latest state of ``step``, whole (from a segment, or the journal's row)."""
        found = view.latest(step)
        if found is None:
            return None
        if found[2] is not None:
            return replace(found[2], run_id=view.ref)  # a record logged by server id names the run so
        reader = self._reader()
        rows = reader.query("SELECT * FROM steps WHERE run_id = ? AND step = ?", (view.ref, step)) if reader else []
        return Step.from_row(rows[0]) if rows else None

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

    def _publish(self, ref: str, doc: dict[str, Any], step: Step) -> None:
        """Make the record durable: appended to this process's ``.open`` file, or a sealed file of its own.

        The owner removes a run's folder once it is empty; when that happens between our
        ``mkdir`` and our create, the create fails with ENOENT and the folder is made again.
        Another host's removal can take a moment to show (a name cache: about 1 s on sshfs,
        until the next revalidation on NFS), hence a few tries over about two seconds."""
        line = encode(doc)
        for attempt in range(_CREATE_TRIES):
            try:
                if self.append and ref in self._open:  # our file is in the folder: it cannot go
                    self._append(ref, doc, step, line)
                    return
                partition = self.files.segments_dir / ref
                private_dir(partition)
                if self.append:
                    self._new_open(partition, step.event_id)
                    self._append(ref, doc, step, line)
                    return
                name = f"{step.event_id}-{_HOST}-{os.getpid()}.seg"
                tmp = partition / f".{name}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                try:
                    _write_all(fd, line)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, partition / name)  # our .tmp kept the folder from being removed meanwhile
                _fsync_dir(partition)
                return
            except FileNotFoundError as exc:
                if attempt + 1 == _CREATE_TRIES:
                    raise self._unwritable(ref, exc) from None
                time.sleep(0.05 * (attempt + 1))
            except OSError as exc:
                raise self._unwritable(ref, exc) from None

    def _unwritable(self, ref: str, exc: OSError) -> JournalUnavailable:
        return JournalUnavailable(f"cannot write journal segment under {self.files.segments_dir / ref}: {exc}")

    def _new_open(self, partition: Path, event_id: str) -> None:
        path = partition / f"{event_id}-{_HOST}-{os.getpid()}.open"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        _fsync_dir(partition)  # the file's name is durable before any record in it is acknowledged
        self._open[partition.name] = (fd, path)
        self._written[path.name] = 0

    def _append(self, ref: str, doc: dict[str, Any], step: Step, line: bytes) -> None:
        """Append one record to this process's ``.open`` file of run folder ``ref``, durably, and
        fold it into what this writer knows of the folder (no need to read back what it wrote)."""
        fd, path = self._open[ref]
        try:
            _write_all(fd, line)
            os.fsync(fd)
        except OSError:
            self._seal(ref)  # part of the record may be there: never append after it
            raise
        before = self._written[path.name]
        self._written[path.name] = before + len(line)
        part = self._unmerged.get(ref)
        if part is not None and part.read.get(path.name, 0) == before:
            part.read[path.name] = before + len(line)
            part.fold(doc, step)

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
        manifest, blobs = _code(code, codestore.text_hashes(code), lambda digest: False)
        step = Step.baseline(run_id, manifest, event_id=event_id, at=now)
        doc = {
            "v": VERSION,
            "op": "run",
            "ref": run_id,
            "run": run.to_doc(),
            "step": step.to_doc(),
            "event": Event.create(run, manifest, event_id=event_id).to_doc(),
            "blobs": blobs,
        }
        self._publish(run_id, doc, step)
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
        digests = codestore.text_hashes(code) if code is not None else {}
        view = self._view(run, frozenset(digests.values()))
        prev = self._prev(view, step)
        if prev is not None and prev.event_id == event_id:  # a replayed spill file: already written
            return _result(prev, updated=False)
        # An explicit parent is taken on trust (as for a remote-only run): one this host cannot
        # see may be another host's step of the last few seconds, which a cached listing of the
        # run's folder does not show yet, and --parent-step is what docs/cluster.md tells users
        # to pass for exactly that step. (In local mode an unknown parent is refused.)
        parent = treerule.resolve(
            step,
            parent_step,
            prev,
            run=run,
            remote_only=view.remote_only,
            exists=lambda n: True,
            last_kept_below=view.last_kept_below,
        )
        manifest, blobs = _code(code, digests, view.holds_blob) if code is not None else (None, {})
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
        self._publish(view.ref, doc, state)
        return _result(state, updated=prev is not None, run_first_seen=not view.known and not view.has_steps())


def _code(
    code: Mapping[str, str], digests: Mapping[str, str], held: Callable[[str], bool]
) -> tuple[CodeRef, dict[str, str]]:
    """The manifest of ``code`` and the texts the run does not hold yet (``held``), encoded for a record."""
    blobs = {digest: _blob_doc(code[path]) for path, digest in digests.items() if not held(digest)}
    return CodeRef.from_manifest(dict(digests)) or CodeRef(()), blobs


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


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (a write may be short, on a full disk say)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # some network filesystems refuse fsync on a directory; their metadata operations are synchronous
        with contextlib.suppress(OSError):
            os.fsync(fd)
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


_UPSERT_PROGRESS = (
    "INSERT INTO segment_progress (name, offset, updated_at) VALUES (?, ?, ?)"
    " ON CONFLICT (name) DO UPDATE SET offset = excluded.offset, updated_at = excluded.updated_at"
)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector off while a merge runs: the records it decodes hold no cycles,
    and the collector's passes over them, ever longer as they pile up, took a fifth of a merge."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def merge(journal: Any, *, batch: int = 2000, now: float | None = None) -> MergeResult:
    """Apply every segment record not yet in ``journal`` (opened by the owner), then remove
    what is fully merged. Idempotent by event id: merging twice changes nothing.

    One write transaction per ``batch`` records, the last one also recording how far each
    file was read; none at all when nothing is new. Every commit moves the counter that
    readers on other hosts retry on, so a merge that commits often (or an idle one that
    commits anyway) would keep them, and every writer's tree rule, waiting."""
    with _collector_paused():
        return _merge(journal, batch=batch, now=now)


def _merge(journal: Any, *, batch: int, now: float | None) -> MergeResult:
    start = time.monotonic()
    now = now if now is not None else time.time()
    result = MergeResult()
    progress: dict[str, int] = {row[0]: row[1] for row in journal.query("SELECT name, offset FROM segment_progress")}
    partitions = _partitions(journal.files)
    reads: list[tuple[Path, str, Parsed, bool]] = []
    for partition in partitions:
        for path in _segment_files(partition):
            key = f"{partition.name}/{path.name}"
            done = _finished(path, now)  # decided before reading: whatever is read is all there is
            reads.append((path, key, read_records(path, progress.get(key, 0)), done))
    # runs first: a step's file can sort before its run's when two hosts' clocks disagree
    docs = [(key, d) for _path, key, parsed, _done in reads for d in parsed.records]
    docs.sort(key=lambda kd: kd[1].get("op") != "run")
    listed = {key for _path, key, _parsed, _done in reads}
    stale = [(key,) for key in progress if key not in listed]  # files removed by an earlier merge
    # a file with records of a newer format is kept whole (and re-read) until a newer owner merges it
    blocked = {key for _path, key, parsed, _done in reads if parsed.newer}
    result.problems.extend(f"{k}: records of a newer format, kept for a newer weco-observe" for k in sorted(blocked))

    def record_progress(conn: Any) -> None:
        conn.executemany(
            _UPSERT_PROGRESS,
            [
                (key, parsed.end, now)
                for _path, key, parsed, _done in reads
                if key not in blocked and not parsed.gone and parsed.end != progress.get(key, 0)
            ],
        )
        conn.executemany("DELETE FROM segment_progress WHERE name = ?", stale)

    runs: dict[str, str | None] = {}  # ref -> the run's local id here (None: its create is not merged)
    for i in range(0, len(docs), batch):
        with journal.write() as conn:
            for key, outcome in _Applying(journal, conn, runs).apply(docs[i : i + batch]):
                if outcome == "applied":
                    result.applied += 1
                elif outcome == "known":
                    result.known += 1
                elif outcome == "no run":
                    blocked.add(key)
                else:
                    result.problems.append(f"{key}: {outcome}")
            if i + batch >= len(docs):
                record_progress(conn)
    moved = any(not p.gone and p.end != progress.get(key, 0) for _path, key, p, _done in reads)
    if not docs and (moved or stale):
        with journal.write() as conn:
            record_progress(conn)
    for path, key, parsed, done in reads:
        result.problems.extend(f"{key}: {why}" for why in parsed.torn)
        if parsed.gone:  # sealed under its new name meanwhile (or unreadable now): never removed unread
            continue
        if key in blocked:
            result.kept.append(key)
            continue
        result.files_merged += 1
        if not done:
            continue
        if parsed.tail:
            result.problems.append(f"{key}: a torn last record ({parsed.tail} bytes), never acknowledged: skipped")
        try:
            path.unlink()  # its progress row goes with the next merge's transaction
        except OSError:
            continue
        result.files_removed += 1
    for partition in partitions:
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
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > STALE_TMP:
                    path.unlink()
    with contextlib.suppress(OSError):
        partition.rmdir()  # only when empty; a writer that raced us re-creates it


class _Record(NamedTuple):
    """What one segment record sets, checked: the step (step 0 for a create), the run of a create,
    the event (made from them, as the writer made it), and the code texts it carries."""

    key: str
    ref: str
    step: Step
    event: Event
    run: Run | None
    texts: dict[str, str]


def _record(key: str, doc: dict[str, Any]) -> _Record | str:
    """The record ``doc`` holds, or why it is skipped.

    It is checked by the rules ``init`` and ``log`` apply before anything is stored, so a damaged
    or forged record (the CRC is no signature) never reaches the journal: the event's body by
    :meth:`Event.check`, the fields only the row has (times, ids, a falsy value the body leaves
    out) here. The event is made from the step, not read: a version 1 record also carries it, and
    the two could disagree (``doctor`` would call that damage)."""
    try:
        ref, fields = doc["ref"], doc["step"]
        for name in ("metrics", "metadata", "code"):  # a falsy one is not in the event's body
            if not (fields.get(name) is None or isinstance(fields[name], dict)):
                return "a record with a field of the wrong type, skipped"
        if not (validate.is_time(fields.get("created_at")) and validate.is_time(fields.get("updated_at"))):
            return "a record with a field of the wrong type, skipped"
        step = Step.from_doc(fields)
        texts = {digest: _blob_text(encoded) for digest, encoded in (doc.get("blobs") or {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError, zlib.error) as exc:
        return f"a damaged record ({type(exc).__name__}), skipped"
    if not ids.is_ulid(step.event_id) or not (ids.is_local_run_id(ref) or ids.is_server_id(ref)):
        return "a record with malformed ids, skipped"
    try:
        event = Event.log(step)
        run = None
        if doc["op"] == "run":
            event.check()  # its step 0 is stored too
            run = Run.from_doc(doc["run"])
            if run.id != ref or step.run_id != ref or run.server_id is not None or run.remote_only or step.step:
                return "a run record that does not describe a new run, skipped"
            if not (validate.is_time(run.created_at) and validate.is_time(run.updated_at)):
                return "a record with a field of the wrong type, skipped"
            if not (run.metadata is None or isinstance(run.metadata, dict)):
                return "a record with a field of the wrong type, skipped"
            event = Event.create(run, step.code or CodeRef(()), event_id=step.event_id)
        event.check()
        if texts:
            validate.check_code(texts, "code")  # text, without NUL bytes
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"a record that `log` would refuse ({exc}), skipped"
    return _Record(key, ref, step, event, run, texts)


class _Applying:
    """Applies one batch of records in one transaction of the merge, sharing what a batch can: the
    ids of the events already journaled, and the event that set each step the batch logs (one query
    per batch, or per run of it, not one per record), the local id of each run (looked up once per
    merge), and the writes (one ``executemany`` each for the steps, the events and the runs' last
    activity). A step is stored unless a newer event set it, stored or earlier in the batch."""

    def __init__(self, journal: Any, conn: Any, runs: dict[str, str | None]):
        self.journal = journal
        self.conn = conn
        self.runs = runs
        #: (run, step) -> the event id of its state: stored, or set earlier in this batch
        self.newest: dict[tuple[str, int], str] = {}
        #: (run, step) -> its code, for the steps this batch stores (delta bases, as in the journal)
        self.codes: dict[tuple[str, int], CodeRef] = {}

    def _run_id(self, ref: str) -> str | None:
        if ref not in self.runs:
            row = self.conn.execute("SELECT id FROM runs WHERE id = ? OR server_id = ?", (ref, ref)).fetchone()
            self.runs[ref] = row[0] if row is not None else None
        return self.runs[ref]

    def apply(self, docs: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, str]]:
        """Apply a batch, runs first: ``(file, outcome)`` per record, the outcome "applied", "known",
        "no run" (its create is not merged: keep the file), or why it was skipped."""
        out: list[tuple[str, str]] = []
        records: list[_Record] = []
        for key, doc in docs:
            record = _record(key, doc)
            if isinstance(record, str):
                out.append((key, record))
            else:
                records.append(record)
        known = outbox.known_ids(self.conn, [r.event.id for r in records])
        events: list[Event] = []
        steps: list[_Record] = []
        for record in records:
            if record.event.id in known:
                out.append((record.key, "known"))
                continue
            known.add(record.event.id)
            if record.run is not None:
                outcome = self._create(record)
                if outcome == "applied":
                    events.append(record.event)
                out.append((record.key, outcome))
                continue
            run_id = self._run_id(record.ref)
            if run_id is None:
                if ids.is_local_run_id(record.ref):
                    out.append((record.key, "no run"))  # its create is not merged (torn or missing): keep the file
                    continue
                run_id = ids.new_run_id()  # first seen by its server id, on another host: a remote-only run
                first = record.step.created_at
                run = Run(id=run_id, server_id=record.ref, remote_only=True, created_at=first, updated_at=first)
                self.journal.insert_run(self.conn, run)
                self.runs[record.ref] = run_id
            if record.step.run_id != run_id:
                step = replace(record.step, run_id=run_id)
                record = record._replace(step=step, event=replace(record.event, run_id=run_id))
            steps.append(record)
        self._read_newest(steps)
        rows: list[tuple[Any, ...]] = []
        touched: dict[str, float] = {}
        for record in steps:
            step = record.step
            outcome = self._store(record) if record.texts else "applied"
            out.append((record.key, outcome))
            if outcome != "applied":
                continue
            which = (step.run_id, step.step)
            if step.event_id > self.newest.get(which, ""):
                self.newest[which] = step.event_id
                if step.code:
                    self.codes[which] = step.code
                rows.append(step.to_row())
                touched[step.run_id] = max(touched.get(step.run_id, 0.0), step.updated_at)
                events.append(record.event)
            else:  # a newer event of this step is here already
                events.append(replace(record.event, state=outbox.SUPERSEDED))
        self.journal.merge_steps(self.conn, rows)
        outbox.enqueue_many(self.conn, events)
        # the runs' last activity moves forward to their newest stored step, as ``upsert_step`` does
        self.conn.executemany(
            "UPDATE runs SET updated_at = max(updated_at, ?) WHERE id = ?", [(at, rid) for rid, at in touched.items()]
        )
        return out

    def _create(self, record: _Record) -> str:
        """Apply a create at once: its run and step 0 (unless there), and its code."""
        assert record.run is not None
        conn = self.conn
        if conn.execute("SELECT 1 FROM runs WHERE id = ?", (record.run.id,)).fetchone() is None:
            self.journal.insert_run(conn, record.run)
        outcome = self._store(record) if record.texts else "applied"
        if outcome == "applied":
            self.journal.insert_baseline(conn, record.step)
            self.runs[record.run.id] = record.run.id
        return outcome

    def _read_newest(self, records: list[_Record]) -> None:
        """Which event set each step the batch logs (and the journal holds): one query per run and
        500 steps."""
        wanted: dict[str, set[int]] = {}
        for record in records:
            at = (record.step.run_id, record.step.step)
            if at not in self.newest:
                wanted.setdefault(at[0], set()).add(at[1])
        for run_id, numbers in wanted.items():
            listed = sorted(numbers)
            for i in range(0, len(listed), 500):
                chunk = listed[i : i + 500]
                marks = ", ".join("?" * len(chunk))
                for step, event_id in self.conn.execute(
                    f"SELECT step, event_id FROM steps WHERE run_id = ? AND step IN ({marks})", (run_id, *chunk)
                ):
                    self.newest[(run_id, step)] = event_id

    def _store(self, record: _Record) -> str:
        """Store the code texts a record carries for its step (the others are in the journal already),
        each as a delta against the code of the step it follows: "applied", or why it was skipped."""
        step = record.step
        if not step.code:
            return "applied"
        carried = {path: record.texts[digest] for path, digest in step.code.files if digest in record.texts}
        if not carried:
            return "applied"
        base = None
        if record.run is None:
            at = step.parent_step if step.parent_step is not None else step.step

            def base() -> CodeRef | None:
                return self.codes.get((step.run_id, at)) or self.journal._code_at_or_below(self.conn, step.run_id, at)

        stored = self.journal.store_code(self.conn, carried, base).manifest()
        if any(stored[path] != digest for path, digest in step.code.files if path in carried):
            return "a record whose code does not match its hashes, skipped"
        return "applied"


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
            with contextlib.suppress(OSError):
                out["stale_tmp"] += now - (partition / name).stat().st_mtime > STALE_TMP
    return out
