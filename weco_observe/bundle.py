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

A bundle is untrusted input. Import caps every size from the zip's own
directory before a byte is inflated (a small file can inflate to gigabytes),
copies the file next to the journal (so it cannot change under it) and verifies
the copy completely before it writes anything: the zip's own CRCs, every
member's sha256 and line count against the manifest, the manifest's own
checksum, every row by the CLI's rules (``validate.py``), every id by its shape
(a server id becomes part of a request path), that every event and step names a
run in the bundle and every code hash a blob in the bundle, that each run has
its one create, and that every blob decodes to text whose sha256 is its name.
Then it merges in transactions of a few thousand rows, so loggers on the
receiving box wait briefly; each run with its create, so no interruption leaves
a run sync cannot finish; the import is recorded last, so an import that was
killed is completed by running it again.

The checksums catch damage, not a forger, who can recompute them: ``--sign``
adds an HMAC of the manifest with a key the boxes share (in the zip's comment,
so the format stays version 1), and ``--verify-key`` or
``$WECO_OBSERVE_BUNDLE_KEY`` makes import insist on it (docs/bundles.md).

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

import hashlib
import hmac
import json
import os
import re
import socket
import sqlite3
import stat
import struct
import time
import zipfile
import zlib
from collections.abc import Container, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

from . import codestore, ids, outbox, validate
from .errors import BundleInvalid, InvalidInput, JournalDamaged, JournalUnavailable
from .journal import SCHEMA_VERSION, Journal
from .records import CREATE, EVENT_KINDS, Blob, CodeRef, Event, Run, Step, disagrees, dumps, journal_text
from .settings import Settings

FORMAT = "weco-observe-bundle"
VERSION = 1
MANIFEST = "manifest.json"
MEMBERS = ("runs.jsonl", "blobs.jsonl", "steps.jsonl", "events.jsonl")

#: the states a bundle carries (format 1); see ``outbox.bundle_state``
_STATES = (outbox.PENDING, outbox.DELIVERED, outbox.REJECTED, outbox.SUPERSEDED)


def _line(value: Any) -> bytes:
    return dumps(value).encode("utf-8") + b"\n"


def _manifest_checksum(manifest: dict[str, Any]) -> str:
    rest = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
        if len(data) > MAX_LINE:  # import would refuse it: say so here, not on the far side of the air gap
            raise InvalidInput(
                f"cannot bundle: a row of {self.name} is {len(data) >> 20} MiB, over the {MAX_LINE >> 20} MiB"
                " a bundle line may hold (a code file that large cannot travel by bundle)"
            )
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
    sign: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Write a bundle of what is not yet bundled (or ``everything``) and record it; return a summary.

    With nothing new, writes no file and returns ``events == 0``. ``sign``: a key
    file (see :func:`load_key`); the bundle then carries an HMAC of its manifest.

    >>> summary = write_bundle(journal, tmp / "all.weco", everything=True)  # --all
    >>> summary["runs"], summary["steps"], summary["events"]
    (1, 5, 6)
    """
    key = load_key(sign) if sign is not None else None
    run_id = journal.require_run(run_ref)["id"] if run_ref else None
    out_path = Path(out_path)
    if out_path.is_dir():
        raise InvalidInput(f"-o {out_path} is a directory: give a file name, e.g. -o {out_path}/box-a.weco")
    if not out_path.parent.is_dir():
        raise InvalidInput(f"-o {out_path}: directory {out_path.parent} does not exist")
    bundle_id = ids.ulid()
    tmp = out_path.with_name(f".{out_path.name}.{bundle_id}.tmp")
    snap = sqlite3.connect(str(journal.path), timeout=Settings.load().busy_timeout)
    snap.row_factory = sqlite3.Row
    snap.text_factory = journal_text  # damaged text is refused by the records below, not a traceback
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
                "signed_by": None,
            }
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as raw:
                manifest = _write_members(
                    snap, raw, where, params, run_id, everything, bundle_id, max_seq, journal.path, key
                )
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, out_path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    finally:
        snap.close()
    with journal.write() as conn:  # every event up to max_seq (of run_id, or all runs) is now in a bundle
        conn.execute(
            "INSERT INTO bundles (id, path, created_at, max_seq, events, run_filter) VALUES (?, ?, ?, ?, ?, ?)",
            (bundle_id, str(out_path.resolve()), time.time(), max_seq, manifest["counts"]["events"], run_id),
        )
    return {
        "bundle_id": bundle_id,
        "path": str(out_path),
        **manifest["counts"],
        "bytes": out_path.stat().st_size,
        "incremental": not everything,
        "signed_by": key.id if key else None,
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
    key: BundleKey | None,
) -> dict[str, Any]:
    included: dict[str, Event] = {}
    touched: dict[str, None] = {}
    hashes: set[str] = set()
    members: dict[str, Any] = {}
    with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        opened: list[_Writer] = []
        try:
            events = _Writer(zf, "events.jsonl", opened)

            def put(row: sqlite3.Row) -> None:
                event = Event.from_row(row).checked()  # a damaged payload is refused, never carried
                included[event.id] = event
                touched.setdefault(event.run_id)
                hashes.update((event.code() or CodeRef(())).hashes())
                events.write({**event.to_doc(), "state": outbox.bundle_state(event.state)})

            for row in snap.execute(f"SELECT e.* FROM events e WHERE {' AND '.join(where)} ORDER BY e.seq", params):
                put(row)
            for rid in list(touched):  # repeat each run's create, so any bundle imports on its own
                create = snap.execute(
                    "SELECT * FROM events WHERE run_id = ? AND kind = 'create_run' AND seq <= ?", (rid, max_seq)
                ).fetchone()
                if create is None:
                    if not snap.execute("SELECT remote_only FROM runs WHERE id = ?", (rid,)).fetchone()[0]:
                        raise JournalDamaged(  # import would refuse the bundle: say so before the air gap
                            f"run {rid} has lost its create event (a repaired journal?): it cannot be bundled;"
                            " bundle the other runs with --run-id"
                        )
                elif create["id"] not in included:
                    put(create)
            members["events.jsonl"] = events.close()

            steps = _Writer(zf, "steps.jsonl", opened)
            for rid in touched:
                for row in snap.execute("SELECT * FROM steps WHERE run_id = ? ORDER BY step", (rid,)):
                    if row["event_id"] not in included:
                        continue
                    step = Step.from_row(row)
                    if disagrees(included[step.event_id], step):  # one copy holds a flipped byte
                        raise JournalDamaged(
                            f"step {step.step} of run {rid} disagrees with its event:"
                            " run `weco observe doctor --repair`"
                        )
                    hashes.update(step.code.hashes() if step.code else [])
                    steps.write(step.to_doc())
            members["steps.jsonl"] = steps.close()

            runs = _Writer(zf, "runs.jsonl", opened)
            for rid in touched:
                runs.write(Run.from_row(snap.execute("SELECT * FROM runs WHERE id = ?", (rid,)).fetchone()).to_doc())
            members["runs.jsonl"] = runs.close()

            closure: set[str] = set()
            todo = sorted(hashes)
            while todo:  # every named blob and its delta bases, checked before the member is opened
                digest = todo.pop()
                if digest in closure:
                    continue
                found = snap.execute("SELECT base FROM blobs WHERE hash = ?", (digest,)).fetchone()
                if found is None:  # refuse here, not on the far side of the air gap
                    raise JournalDamaged(
                        f"code blob {digest} is named by a step but missing from the journal: run `weco observe doctor`"
                    )
                closure.add(digest)
                if found[0]:
                    todo.append(found[0])
            from .doctor import broken_blobs

            damaged = broken_blobs(snap, sorted(closure))
            if damaged:  # refuse here: the far side would refuse the whole bundle
                raise JournalDamaged(
                    f"{len(damaged)} code blobs this bundle needs are damaged in the journal (e.g. {damaged[0][:12]}):"
                    " run `weco observe doctor --repair`, then bundle again"
                )
            blobs = _Writer(zf, "blobs.jsonl", opened)
            for digest in sorted(closure):
                blob = Blob.from_row(snap.execute("SELECT * FROM blobs WHERE hash = ?", (digest,)).fetchone())
                problem = _blob_problem(blob)
                if problem:
                    raise InvalidInput(f"cannot bundle code blob {digest}: import would refuse it ({problem})")
                blobs.write(blob.to_doc())
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
            manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
            zf.writestr(MANIFEST, manifest_bytes)
            if key is not None:
                zf.comment = key.signature(manifest_bytes)
        except BaseException:
            for writer in opened:  # else closing the zip file raises and hides the real error
                if not writer.stream.closed:
                    writer.stream.close()
            raise
    return manifest


# -- signing ------------------------------------------------------------------
# The checksums catch damage, not a forger: whoever edits a bundle can recompute them.
# A site that carries bundles over an untrusted path shares a secret key between the
# boxes; ``bundle --sign KEY`` stores an HMAC-SHA256 of the manifest (which holds the
# sha256 of every member, all checked on import) and ``import --verify-key KEY`` (or
# WECO_OBSERVE_BUNDLE_KEY) refuses a bundle without a valid one. The signature lives in
# the zip's comment, not in a member: format version 1 stays as it was, and a
# receiver older than signing still imports a signed bundle (without checking it).

SIGNATURE_FORMAT = "weco-observe-bundle-signature"
#: what the HMAC covers besides the manifest's bytes: this purpose and version, nothing else
_SIGNED_PREFIX = b"weco-observe bundle manifest, signature v1\n"
#: a key file holds at least this many hex digits (256 bits)
_KEY_HEX = 64


class BundleKey:
    """A shared secret that signs and verifies bundles; ``id`` names it without revealing it."""

    def __init__(self, secret: bytes, path: Path):
        self.secret = secret
        self.path = path
        self.id = hashlib.sha256(b"weco-observe bundle key id\n" + secret).hexdigest()[:16]

    def hmac(self, manifest: bytes) -> str:
        return hmac.new(self.secret, _SIGNED_PREFIX + manifest, hashlib.sha256).hexdigest()

    def signature(self, manifest: bytes) -> bytes:
        """The zip comment of a bundle whose manifest is ``manifest``."""
        doc = {"format": SIGNATURE_FORMAT, "algorithm": "hmac-sha256", "key_id": self.id, "hmac": self.hmac(manifest)}
        return json.dumps(doc, sort_keys=True).encode()


def load_key(path: str | os.PathLike[str]) -> BundleKey:
    """Read a bundle key file: at least 64 hex digits (``openssl rand -hex 32``), in a regular
    file owned by you that no one else may read or write (0600 or 0400). Anything else is refused
    with a one-line InvalidInput: a key others can read signs nothing.
    """
    path = Path(path).expanduser()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise InvalidInput(f"no key file {path}: make one with `(umask 077; openssl rand -hex 32 > {path})`") from None
    except OSError as exc:
        raise InvalidInput(f"cannot read key file {path}: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise InvalidInput(f"key file {path} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        if info.st_uid != os.getuid():
            raise InvalidInput(
                f"key file {path} belongs to another user (uid {info.st_uid}): use a key file of your own"
            )
        if info.st_mode & 0o077:
            raise InvalidInput(
                f"key file {path} has mode {stat.S_IMODE(info.st_mode):04o}, so others may read or change it:"
                f" chmod 600 {path}"
            )
        data = f.read(4097)
    text = data.strip()
    if (
        len(data) > 4096
        or len(text) < _KEY_HEX
        or len(text) % 2
        or not all(c in b"0123456789abcdefABCDEF" for c in text)
    ):
        raise InvalidInput(
            f"key file {path} is not a bundle key: it must hold at least {_KEY_HEX} hex digits,"
            " as `openssl rand -hex 32` writes"
        )
    return BundleKey(bytes.fromhex(text.decode()), path)


def _required_key(verify_key: str | os.PathLike[str] | None) -> BundleKey | None:
    """The key an import must verify with: the one given, else ``$WECO_OBSERVE_BUNDLE_KEY``'s."""
    path = verify_key if verify_key is not None else Settings.load().bundle_key
    return load_key(path) if path is not None else None


# -- reading and verifying ----------------------------------------------------
# A bundle is a file this process did not write: every byte is hostile until checked.
# Sizes are capped from the zip's own directory before a member is opened (a small
# file can inflate to gigabytes), then enforced while streaming; every row is
# checked by the same rules the CLI applies to a user's input before anything is
# written; ids are checked by shape, because a server id becomes part of a URL.

#: the manifest is small; a larger one is not a bundle
MAX_MANIFEST = 1 << 20
#: A longer line is refused before it is parsed, and never written. The longest real line
#: is a code blob: a source file compressed, in base64 (a 40 MiB file of code is ~10 MiB).
MAX_LINE = 16 << 20
#: how far a member may inflate: JSON lines compress up to a few dozen times, a bomb a thousand
MAX_RATIO = 100
#: ... but blobs.jsonl is mostly compressed data in base64, which inflates 1.3 to 5 times
_MEMBER_RATIO = {"blobs.jsonl": 16}
#: below this a member is too small for its ratio to matter
_RATIO_FLOOR = 1 << 20
#: a code blob's text may inflate past MAX_RATIO up to this size (an ordinary source file)
_BLOB_RATIO_FLOOR = MAX_LINE
#: a bundle's zip directory lists its five members in a few hundred bytes
_MAX_ENTRIES, _MAX_DIRECTORY = len(MEMBERS) + 2, 64 << 10
#: bytes of the file outside every member (zip headers, directory, comment)
_MAX_SLACK = 256 << 10
#: SQLite's integers
_MAX_INT = 2**63 - 1


def _shown(value: Any, limit: int = 60) -> str:
    """A value from the bundle as a message may quote it: repr'd (no control characters) and short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(text: str, limit: int = 400) -> str:
    """Text for a one-line message: anything unprintable escaped, at most ``limit`` characters."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _directory(fp: BinaryIO, size: int) -> tuple[int, int] | None:
    """``(entries, bytes)`` of the zip's central directory, from its end record: read before
    zipfile parses the directory, so a directory of a million entries is never built."""
    tail = min(size, 22 + 0xFFFF)
    fp.seek(size - tail)
    data = fp.read(tail)
    at = data.rfind(b"PK\x05\x06")
    if at < 0 or len(data) - at < 22:
        return None  # zipfile says what is wrong
    entries, nbytes = struct.unpack_from("<HI", data, at + 10)
    return entries, nbytes


def _blob_problem(blob: Blob) -> str | None:
    """Why a blob's description cannot be true of a blob a journal wrote, or None. Checked before it
    is decoded: its sizes fit SQLite, a delta stays inside its base, its chain is no deeper than a
    journal makes them, and its text does not inflate like a bomb."""
    if not all(0 <= v <= _MAX_INT for v in (blob.size, blob.depth, blob.prefix, blob.suffix)):
        return "a size out of range"
    if blob.prefix + blob.suffix > blob.size:
        return "a delta larger than its text"
    if blob.depth > codestore.MAX_DEPTH or (blob.depth == 0) != (blob.base is None):
        return "a delta depth that does not fit its base"
    if blob.base is None and (blob.prefix or blob.suffix):
        return "a full copy with a delta's prefix or suffix"
    middle = blob.size - blob.prefix - blob.suffix
    if middle > _BLOB_RATIO_FLOOR and middle > MAX_RATIO * max(len(blob.data), 1):
        return f"its text would inflate {middle // max(len(blob.data), 1)} times (a decompression bomb)"
    return None


class _Reader:
    """The members of an open bundle, each checked against the zip's sizes and the manifest as it is read."""

    def __init__(self, path: Path, shown: Path | None = None, key: BundleKey | None = None):
        self.path = shown or path  # the name the user gave, for messages
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO must not hang the import
        except FileNotFoundError:
            raise InvalidInput(f"no bundle file {path}") from None
        except OSError as exc:
            raise self.refuse(f"it cannot be read ({exc.strerror})") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            if stat.S_ISDIR(info.st_mode):
                raise InvalidInput(f"{path} is a directory, not a bundle file")
            raise self.refuse("it is not a regular file")
        self.file = os.fdopen(fd, "rb")
        self.size = info.st_size
        try:
            directory = _directory(self.file, self.size)
            if directory is not None and (directory[0] > _MAX_ENTRIES or directory[1] > _MAX_DIRECTORY):
                raise self.refuse(
                    f"its zip directory lists {directory[0]} files in {directory[1]} bytes (not a bundle)"
                )
            try:
                self.zf = zipfile.ZipFile(self.file)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
                raise self.refuse(f"it is not a zip file, or it is truncated ({exc})") from None
        except BaseException:
            self.file.close()
            raise
        try:
            names = self.zf.namelist()
            if MANIFEST not in names:
                raise self.refuse("it has no manifest.json (not a weco-observe bundle)")
            self._check_sizes()
            with self.zf.open(MANIFEST) as stream:
                self.manifest_bytes = stream.read(MAX_MANIFEST + 1)
            if len(self.manifest_bytes) > MAX_MANIFEST:
                raise self.refuse(f"its manifest is over {MAX_MANIFEST >> 10} KiB (not a bundle)")
            self.signature = self._check_signature(key)
            self.manifest = json.loads(self.manifest_bytes, parse_constant=_no_constant)
            self._check_manifest(names)
        except BundleInvalid:  # (a ValueError too: it must not be caught as one below)
            self.close()
            raise
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, RecursionError, zlib.error) as exc:
            self.close()
            raise self.refuse(f"its manifest is unreadable ({type(exc).__name__})") from None

    def _check_signature(self, key: BundleKey | None) -> dict[str, Any] | None:
        """``{"key_id", "verified"}`` of the signature in the zip's comment, or None. With ``key``, a
        bundle that is unsigned, signed with another key, or changed since it was signed is refused."""
        try:
            doc = json.loads(self.zf.comment) if self.zf.comment else None
        except (ValueError, RecursionError):
            doc = None
        if not (isinstance(doc, dict) and doc.get("format") == SIGNATURE_FORMAT and isinstance(doc.get("key_id"), str)):
            doc = None
        if key is None:
            return None if doc is None else {"key_id": _one_line(doc["key_id"], 32), "verified": False}
        if doc is None:
            raise self.refuse(f"it is not signed, and imports here must be signed with key {key.id} ({key.path})")
        if doc["key_id"] != key.id:
            raise self.refuse(f"it is signed with key {_shown(doc['key_id'])}, not with {key.id} ({key.path})")
        good = doc.get("algorithm") == "hmac-sha256" and isinstance(doc.get("hmac"), str)
        if not (good and hmac.compare_digest(doc["hmac"].encode(), key.hmac(self.manifest_bytes).encode())):
            raise self.refuse("its signature does not match: it was changed after it was signed")
        return {"key_id": key.id, "verified": True}

    def refuse(self, why: str) -> BundleInvalid:
        return BundleInvalid(f"bundle {self.path} refused, nothing imported: {_one_line(why)}")

    def _check_sizes(self) -> None:
        """Before a byte is inflated: every member's method, declared size and inflation ratio, and
        that the file holds nothing but its members."""
        infos = self.zf.infolist()
        slack = self.size - sum(info.compress_size for info in infos)
        if slack > _MAX_SLACK:
            raise self.refuse(f"{slack} bytes of it belong to no member (not a bundle)")
        for info in infos:
            name = _shown(info.filename)
            if info.compress_type not in (zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED):
                raise self.refuse(f"{name} is compressed with method {info.compress_type}, not deflate")
            if info.filename == MANIFEST and info.file_size > MAX_MANIFEST:
                raise self.refuse(f"{name} would inflate to {info.file_size} bytes (not a bundle)")
            ratio = _MEMBER_RATIO.get(info.filename, MAX_RATIO)
            if info.file_size > _RATIO_FLOOR and info.file_size > ratio * max(info.compress_size, 1):
                raise self.refuse(
                    f"{name} would inflate {info.file_size // max(info.compress_size, 1)} times"
                    " (a decompression bomb, not a bundle)"
                )

    def _check_manifest(self, names: list[str]) -> None:
        m = self.manifest
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise self.refuse(f"its manifest is not a {FORMAT} manifest (a foreign file?)")
        if not _is_int(m.get("version")) or m["version"] > VERSION:
            raise self.refuse(
                f"format version {_shown(m.get('version'))} is newer than this weco-observe "
                f"reads ({VERSION}): upgrade weco-observe"
            )
        if m.get("checksum") != _manifest_checksum(m):
            raise self.refuse("the manifest's checksum does not match (the manifest was edited or damaged)")
        if sorted(names) != sorted((*MEMBERS, MANIFEST)):
            odd = sorted(set(names) ^ {*MEMBERS, MANIFEST})
            raise self.refuse(f"its members are not the five of a bundle (files were added or removed: {_shown(odd)})")
        if not ids.is_ulid(m.get("bundle_id")):
            raise self.refuse("its manifest has no valid bundle id")
        for name in MEMBERS:
            info = (m.get("members") or {}).get(name)
            if (
                not isinstance(info, dict)
                or not all(_is_int(info.get(k)) and info[k] >= 0 for k in ("bytes", "lines"))
                or not isinstance(info.get("sha256"), str)
            ):
                raise self.refuse(f"its manifest does not describe {name}")
            if info["bytes"] != self.zf.getinfo(name).file_size:
                raise self.refuse(f"{name}'s size in the zip is not the manifest's (edited)")

    def rows(self, name: str) -> Iterator[dict[str, Any]]:
        """Each line of a member as a JSON object; raises BundleInvalid once the member is
        read if its sha256, size or line count differ from the manifest."""
        expected = self.manifest["members"][name]
        sha = hashlib.sha256()
        size = lines = 0
        try:
            with self.zf.open(name) as stream:
                for raw in _lines(stream):
                    if raw is None:
                        raise self.refuse(f"{name} line {lines + 1} is over {MAX_LINE >> 20} MiB (not a bundle)")
                    sha.update(raw)
                    size += len(raw)
                    lines += 1
                    if size > expected["bytes"]:
                        raise self.refuse(f"{name} is longer than the manifest says (edited)")
                    escaped = _SURROGATE.search(raw)
                    try:
                        text = raw.decode("utf-8")
                        del raw  # a long line is held once, not three times, while it is parsed
                        row = json.loads(text, parse_constant=_no_constant)
                    except (ValueError, RecursionError):
                        raise self.refuse(f"{name} line {lines} is not JSON (corrupted or edited)") from None
                    if not isinstance(row, dict):
                        raise self.refuse(f"{name} line {lines} is not a JSON object")
                    if escaped and not _encodable(row):
                        raise self.refuse(f"{name} line {lines} holds text that is not UTF-8 (a lone surrogate)")
                    yield row
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
            raise self.refuse(f"{name} is corrupted ({exc})") from None
        if sha.hexdigest() != expected["sha256"] or size != expected["bytes"] or lines != expected["lines"]:
            raise self.refuse(f"{name} does not match its sha256 in the manifest (corrupted or edited)")

    def close(self) -> None:
        if hasattr(self, "zf"):
            self.zf.close()
        self.file.close()

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


#: a line with a lone surrogate has a \uD800-\uDFFF escape (raw surrogate bytes fail UTF-8 decoding);
#: only such a line is walked, so the common case costs one search
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def _lines(stream: Any) -> Iterator[bytes | None]:
    """The lines of a binary stream, read a MiB at a time; None (and the end) for a line over
    MAX_LINE, which is never joined into one piece. Faster than ``readline``, which peeks 512
    bytes at a time in a zip member."""
    parts: list[bytes] = []
    held = 0
    while chunk := stream.read(1 << 20):
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            if held + end + 1 - start > MAX_LINE:
                yield None
                return
            parts.append(chunk[start : end + 1])
            parts[:] = [b"".join(parts)]
            held, start = 0, end + 1
            yield parts.pop()  # the caller holds the only reference
        held += len(chunk) - start
        if held > MAX_LINE:
            yield None
            return
        if start < len(chunk):
            parts.append(chunk[start:])
    if parts:
        yield b"".join(parts)


def _encodable(value: Any) -> bool:
    """Every string (key or value) in ``value`` is valid UTF-8 text: SQLite and the API accept it."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not validate.is_encodable(item):
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: Any) -> bool:
    return value is None or (isinstance(value, str) and validate.is_encodable(value))


class _Rows:
    """Turns a bundle's JSON documents into records, checking each by the CLI's rules; raises BundleInvalid."""

    def __init__(self, reader: _Reader):
        self.reader = reader

    def need(self, ok: Any, what: str) -> None:
        if not ok:
            raise self.reader.refuse(what)

    def run(self, doc: dict[str, Any]) -> Run:
        rid = doc.get("id")
        where = f"runs.jsonl: run {_shown(rid)}"
        self.need(ids.is_local_run_id(rid), f"{where}: not a local run id")
        server_id = doc.get("server_id")
        self.need(server_id is None or ids.is_server_id(server_id), f"{where}: a malformed server id")
        self.need(
            all(_text(doc.get(k)) for k in ("name", "metric", "additional_instructions"))
            and all(doc.get(k) in (None, 0, 1) for k in ("maximize", "remote_only"))
            and validate.is_time(doc.get("created_at"))
            and validate.is_time(doc.get("updated_at")),
            f"{where}: a field of the wrong type",
        )
        self.valid(lambda: validate.check_metadata(doc["metadata"]) if doc.get("metadata") is not None else None, where)
        return Run.from_doc(doc)

    def valid(self, check: Any, where: str) -> None:
        try:
            check()
        except InvalidInput as exc:
            raise self.reader.refuse(f"{where}: {exc}") from None

    def code(self, code: Any, blobs: set[str], where: str) -> None:
        self.need(
            code is None
            or (
                isinstance(code, dict)
                and all(isinstance(k, str) and k and _text(k) and isinstance(v, str) for k, v in code.items())
            ),
            f"{where}: its code is not a {{path: hash}} manifest",
        )
        missing = [h for h in (code or {}).values() if h not in blobs]
        self.need(not missing, f"{where}: code blob {missing[:1]} is not in the bundle")

    def step_fields(self, doc: dict[str, Any], where: str, status: Any) -> None:
        self.need(_text(doc.get("description")), f"{where}: a description that is not text")
        self.valid(
            lambda: validate.check_step_args(
                doc.get("step"),
                status,
                doc.get("description"),
                doc.get("metrics"),
                None,
                doc.get("parent_step"),
                doc.get("metadata"),
            ),
            where,
        )

    def step(self, doc: dict[str, Any], runs: Container[str], blobs: set[str]) -> Step:
        where = f"steps.jsonl: step {_shown(doc.get('step'))} of run {_shown(doc.get('run_id'))}"
        self.need(doc.get("run_id") in runs, f"{where}: its run is not in the bundle")
        self.need(ids.is_ulid(doc.get("event_id")), f"{where}: no valid event id")
        times = (doc.get("created_at"), doc.get("updated_at"))
        self.need(all(validate.is_time(t) for t in times), f"{where}: bad times")
        self.step_fields(doc, where, doc.get("status"))  # a step row always has one
        self.code(doc.get("code"), blobs, where)
        return Step.from_doc(doc)

    def event(self, doc: dict[str, Any], runs: Container[str], blobs: set[str]) -> Event:
        where = f"events.jsonl: event {_shown(doc.get('id'))}"
        self.need(ids.is_ulid(doc.get("id")), f"{where}: no valid id")
        self.need(doc.get("run_id") in runs, f"{where}: its run is not in the bundle")
        self.need(doc.get("state") in _STATES, f"{where}: bad state")
        self.need(doc.get("kind") in EVENT_KINDS, f"{where}: bad kind")
        self.need(validate.is_time(doc.get("created_at")), f"{where}: bad created_at")
        payload = doc.get("payload")
        if not isinstance(payload, dict):
            raise self.reader.refuse(f"{where}: payload is not an object")
        if doc["kind"] == CREATE:
            self.need(doc.get("step") is None, f"{where}: a create has no step")
            self.need(
                set(payload)
                <= {"source_code", "metric_name", "maximize", "name", "additional_instructions", "metadata"}
                and isinstance(payload.get("maximize", False), bool)
                and all(_text(payload.get(k)) for k in ("name", "additional_instructions")),
                f"{where}: malformed create",
            )
            self.code(payload.get("source_code") or None, blobs, where)
            self.valid(
                lambda: validate.check_run_args(
                    payload.get("source_code"),
                    payload.get("metric_name"),
                    payload.get("name"),
                    payload.get("additional_instructions"),
                    payload.get("metadata"),
                ),
                where,
            )
        else:
            self.need(_is_int(doc.get("step")) and payload.get("step") == doc["step"], f"{where}: malformed step event")
            self.need(
                set(payload) <= {"step", "status", "description", "metrics", "code", "parent_step", "metadata"},
                f"{where}: malformed step event",
            )
            self.step_fields(payload, where, payload.get("status", "completed"))  # (as Step.from_payload reads it)
            self.code(payload.get("code"), blobs, where)
        return Event.from_doc(doc)

    def blob(self, doc: dict[str, Any]) -> Blob:
        digest = doc.get("hash")
        ok = (
            isinstance(digest, str)
            and len(digest) == 64
            and all(c in "0123456789abcdef" for c in digest)
            and all(_is_int(doc.get(k)) and doc[k] >= 0 for k in ("size", "depth", "prefix", "suffix"))
            and (doc.get("base") is None or isinstance(doc["base"], str))
            and isinstance(doc.get("data"), str)
        )
        self.need(ok, f"blobs.jsonl: blob {_shown(digest)} is malformed")
        try:
            blob = Blob.from_doc(doc)
        except ValueError:
            raise self.reader.refuse(f"blobs.jsonl: blob {digest} data is not base64") from None
        problem = _blob_problem(blob)
        self.need(problem is None, f"blobs.jsonl: blob {digest}: {problem}")
        return blob


def verify(path: str | os.PathLike[str], *, verify_key: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Check a bundle completely without importing it; return its manifest.

    Raises BundleInvalid (exit 2) saying what is wrong. With ``verify_key`` (or
    ``$WECO_OBSERVE_BUNDLE_KEY``) it must also carry a valid signature by that key.
    """
    reader = _Reader(Path(path), key=_required_key(verify_key))
    try:
        _verify(reader)
        return reader.manifest
    finally:
        reader.close()


def _verify(reader: _Reader) -> None:
    """Read every member once and check everything; nothing is kept but ids and blob names."""
    m = reader.manifest
    rows = _Rows(reader)
    #: run id -> remote-only (a run logged to a server id: it has no create)
    runs: dict[str, bool] = {}
    run_rows: dict[str, Run] = {}
    server_ids: set[str] = set()
    for doc in reader.rows("runs.jsonl"):
        run = rows.run(doc)
        run_rows[run.id] = run
        rows.need(run.id not in runs, f"runs.jsonl: run {run.id} appears twice")
        rows.need(run.server_id or not run.remote_only, f"runs.jsonl: remote-only run {run.id} has no server id")
        if run.server_id:  # else both would merge into one run here, with two creates
            rows.need(run.server_id not in server_ids, f"runs.jsonl: server id {run.server_id} names two runs")
            server_ids.add(run.server_id)
        runs[run.id] = run.remote_only
    server_ids.clear()

    blobs: dict[str, Blob] = {}
    for doc in reader.rows("blobs.jsonl"):
        blob = rows.blob(doc)
        blobs[blob.hash] = blob
    _check_blobs(blobs, reader)
    names = set(blobs)
    blobs.clear()

    # A step row holds the state its event's payload holds (they are written together): keep what each
    # row says, small (a digest; step 0 whole, for its run's create), to hold each event against it.
    stated: dict[str, str | Step] = {}
    for doc in reader.rows("steps.jsonl"):
        step = rows.step(doc, runs, names)
        stated[step.event_id] = step if step.step == 0 else _digest(step.payload())

    seen: set[str] = set()
    creates: set[str] = set()
    for doc in reader.rows("events.jsonl"):
        event = rows.event(doc, runs, names)
        row = stated.get(event.id)
        if row is not None:
            differs = (
                disagrees(event, row, run_rows.get(event.run_id))
                if isinstance(row, Step)
                else event.kind != CREATE and _digest(event.payload) != row
            )
            rows.need(not differs, f"events.jsonl: event {event.id} is not the state its step row holds")
        rows.need(event.id not in seen, f"events.jsonl: event {event.id} appears twice")
        seen.add(event.id)
        if event.kind == CREATE:
            rows.need(event.run_id not in creates, f"events.jsonl: run {event.run_id} has two creates")
            creates.add(event.run_id)
    for rid, remote_only in runs.items():  # sync sends a run's create first; without one it waits forever
        if remote_only:
            rows.need(rid not in creates, f"events.jsonl: remote-only run {rid} has a create")
        else:
            rows.need(rid in creates, f"events.jsonl: run {rid} has no create (a bundle carries every run's)")

    counts = m.get("counts") or {}
    actual = {
        "runs": len(runs),
        "blobs": len(names),
        "events": len(seen),
        "steps": m["members"]["steps.jsonl"]["lines"],
    }
    rows.need(
        all(counts.get(k) == v for k, v in actual.items()),
        f"the manifest's counts {counts} do not match the members {actual}",
    )


def _digest(payload: Any) -> str:
    """A short fingerprint of a payload, equal exactly when the payloads are equal as JSON objects."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, allow_nan=False).encode()).hexdigest()[:32]


def _check_blobs(blobs: dict[str, Blob], reader: _Reader) -> None:
    """Every blob must decode (through its delta chain, all in the bundle) to text hashing to its name.

    Walks each chain from its full copy down, depth first, so every blob is decoded once. A
    text is held as pieces (slices of the inflated middles of its chain), never joined: a
    delta shares its base's bytes, so a deep, bushy tree of deltas over one large text holds
    that text once, not once per level.
    """
    children: dict[str | None, list[str]] = {}
    for name, blob in blobs.items():
        base = blob.base or None
        if base is not None and base not in blobs:
            raise reader.refuse(f"blobs.jsonl: delta base {base} is not in the bundle")
        children.setdefault(base, []).append(name)
    #: (blob, its base's text as pieces, their total length, the base's depth)
    stack: list[tuple[str, list[memoryview], int, int]] = [(n, [], 0, -1) for n in children.get(None, [])]
    done = 0
    while stack:
        name, base_text, base_len, base_depth = stack.pop()
        blob = blobs[name]
        if blob.depth != base_depth + 1 or blob.prefix + blob.suffix > base_len:
            raise reader.refuse(f"blobs.jsonl: blob {name} does not fit its delta base (corrupted or edited)")
        try:  # inflated to at most what its size leaves for it: a bomb stops there
            middle = codestore.decode(blob.data, 0, 0, None, limit=blob.size - blob.prefix - blob.suffix)
        except (zlib.error, ValueError):
            raise reader.refuse(f"blobs.jsonl: blob {name} does not decompress (corrupted)") from None
        pieces = [
            *_cut(base_text, 0, blob.prefix),
            memoryview(middle),
            *_cut(base_text, base_len - blob.suffix, base_len),
        ]
        sha = hashlib.sha256()
        for piece in pieces:
            sha.update(piece)
        if sha.hexdigest() != name or sum(map(len, pieces)) != blob.size:
            raise reader.refuse(f"blobs.jsonl: blob {name} does not hash to its name (corrupted or edited)")
        done += 1
        stack.extend((child, pieces, blob.size, blob.depth) for child in children.get(name, ()))
    if done != len(blobs):
        raise reader.refuse("blobs.jsonl: some delta chains loop")


def _cut(pieces: list[memoryview], start: int, end: int) -> list[memoryview]:
    """Bytes ``start:end`` of the text made of ``pieces``, as slices of them (nothing copied)."""
    out, at = [], 0
    for piece in pieces:
        lo, hi = max(start - at, 0), min(end - at, len(piece))
        if lo < hi:
            out.append(piece[lo:hi])
        at += len(piece)
        if at >= end:
            break
    return out


# -- importing -----------------------------------------------------------------


def _source(manifest: dict[str, Any]) -> str | None:
    """``host:journal`` the bundle says it comes from, if that is short printable text (it is
    printed to a terminal and stored)."""
    src = manifest.get("source")
    if not isinstance(src, dict):
        return None
    host, where = src.get("host"), src.get("journal")
    ok = all(isinstance(v, str) and len(v) <= 4096 and v.isprintable() for v in (host, where))
    return f"{host}:{where}" if ok else None


def _remove_stale_copies(journal: Journal) -> None:
    """Private copies left by an import that was killed (its pid is gone)."""
    for stale in journal.files.import_copies():
        try:
            os.kill(int(stale.name.split("-")[1]), 0)
        except ProcessLookupError:
            stale.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            pass


def _merge_summary(bundle_id: str) -> dict[str, Any]:
    return {
        "bundle_id": bundle_id,
        "already_imported": False,
        "runs_new": 0,
        "runs_known": 0,
        "server_ids_adopted": 0,
        "blobs_new": 0,
        "steps_updated": 0,
        "events_new": 0,
        "events_known": 0,
        "events_pending": 0,
        "conflicts": [],
        "signature": None,
    }


def import_bundle(
    journal: Journal,
    path: str | os.PathLike[str],
    *,
    batch: int = 2000,
    verify_key: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Verify a bundle, then merge it into ``journal``; return what changed.

    Raises BundleInvalid (and imports nothing) for a truncated, corrupted,
    edited or foreign file. Importing the same bundle again returns
    ``already_imported: True`` and changes nothing. ``sync --bundle`` calls this
    and then syncs. The merge commits every ``batch`` rows; an interrupted
    import is completed by importing the same file again. With ``verify_key``
    (a key file; default ``$WECO_OBSERVE_BUNDLE_KEY``) an unsigned bundle, or one
    not signed by that key, is refused.

    >>> write_bundle(journal, tmp / "box-a.weco", everything=True)["events"]
    6
    >>> with Journal(tmp / "other-box" / "journal.db") as other:
    ...     import_bundle(other, tmp / "box-a.weco")["events_pending"]
    6
    """
    key = _required_key(verify_key)
    with _Reader(Path(path), key=key) as first:
        m = first.manifest
        if journal.query("SELECT 1 FROM imports WHERE bundle_id = ?", (m["bundle_id"],)):
            summary = _merge_summary(m["bundle_id"])
            summary.update(already_imported=True, path=str(path), source=_source(m), signature=first.signature)
            return summary
        # Verify and merge a private copy of the file just checked (the same open file, so the
        # same inode, no more bytes than it had), so it cannot change between the check and the
        # merge, which commits in batches to keep loggers waiting briefly.
        _remove_stale_copies(journal)
        copy = journal.files.import_copy(ids.ulid())
        try:
            fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as dst:
                first.file.seek(0)
                left = first.size
                while left and (chunk := first.file.read(min(left, 1 << 20))):
                    dst.write(chunk)
                    left -= len(chunk)
        except OSError as exc:
            copy.unlink(missing_ok=True)
            raise JournalUnavailable(f"cannot copy bundle {path} next to the journal to import it: {exc}") from None
    try:
        with _Reader(copy, shown=Path(path), key=key) as reader:
            _verify(reader)
            m = reader.manifest
            source = _source(m)
            summary = _Merge(journal, reader, m["bundle_id"]).run(source or "", batch)
            summary["signature"] = reader.signature
    finally:
        copy.unlink(missing_ok=True)
    summary["path"] = str(path)
    summary["source"] = source
    return summary


class _Merge:
    """Merge a verified bundle idempotently by id, on top of the journal's write API.

    Runs match by local id, then by server id (two boxes that logged to the
    same server run share it). A bundle's server id is adopted only by a run
    that has none here. A step row replaces ours only if its event id is newer.
    A new event arrives ``pending`` unless the bundle says the server already
    has it on the same server run (then it keeps ``delivered`` / ``superseded``),
    or a newer state of its step is already here (``superseded``). A create for
    a run that already has a different create here is refused: one run id, one
    create. A run that ends up with the bundle's server id has its create
    settled as delivered: the server has that run.

    Written in transactions of ``batch`` rows, so loggers wait at most one batch
    (not a whole 100k-event bundle) for the lock. Blobs first; then every run
    with its create and step 0 in one transaction, so that however the import
    is interrupted no run lacks its create and no server id comes without its
    create settled (either would leave sync with a create it can never send);
    then steps before events, so a step's newest state is known before its
    events are queued. An interrupted merge is finished by importing the bundle
    again: the import is recorded only at the end, and every row merges by id.
    """

    def __init__(self, journal: Journal, reader: _Reader, bundle_id: str):
        self.journal = journal
        self.reader = reader
        self.out = _merge_summary(bundle_id)
        #: bundle run id -> local run id
        self.mapping: dict[str, str] = {}
        #: local run id -> the bundle's server id for it is this journal's too
        self.same_server: dict[str, bool] = {}

    def run(self, source: str, batch: int) -> dict[str, Any]:
        journal, out = self.journal, self.out
        runs = [Run.from_doc(doc) for doc in self.reader.rows("runs.jsonl")]
        creates = self._check_creates({run.id: self._match(journal.conn, run)[0] for run in runs})
        self._merge_member("blobs.jsonl", self._blob, batch)
        with journal.write() as conn:
            self._runs(conn, runs, creates)
        self._merge_member("steps.jsonl", self._step, batch)
        self._merge_member("events.jsonl", self._event, batch)
        with journal.write() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO imports (bundle_id, source, imported_at, events) VALUES (?, ?, ?, ?)",
                (out["bundle_id"], source, time.time(), out["events_new"]),
            )
        return out

    def _merge_member(self, member: str, merge: Any, batch: int) -> None:
        chunk: list[dict[str, Any]] = []
        for doc in self.reader.rows(member):
            chunk.append(doc)
            if len(chunk) >= batch:
                self._commit(chunk, merge)
                chunk = []
        if chunk:
            self._commit(chunk, merge)

    def _commit(self, chunk: list[dict[str, Any]], merge: Any) -> None:
        with self.journal.write() as conn:
            for doc in chunk:
                merge(conn, doc)

    @staticmethod
    def _match(conn: sqlite3.Connection, run: Run) -> tuple[str, str | None] | tuple[None, None]:
        """``(local id, its server id)`` of the run here that ``run`` is: same local id, else same server id."""
        row = conn.execute("SELECT id, server_id FROM runs WHERE id = ?", (run.id,)).fetchone()
        if row is None and run.server_id:
            row = conn.execute("SELECT id, server_id FROM runs WHERE server_id = ?", (run.server_id,)).fetchone()
        return (row[0], row[1]) if row is not None else (None, None)

    def _runs(self, conn: sqlite3.Connection, runs: list[Run], creates: dict[str, dict[str, Any]]) -> None:
        for run in runs:
            self._run(conn, run)
            if run.id in creates:
                self._create(conn, creates[run.id])

    def _run(self, conn: sqlite3.Connection, run: Run) -> None:
        out = self.out
        local, local_sid = self._match(conn, run)
        if local is None:
            now = time.time()
            self.journal.insert_run(
                conn, replace(run, created_at=run.created_at or now, updated_at=run.updated_at or now)
            )
            self.mapping[run.id], self.same_server[run.id] = run.id, bool(run.server_id)
            out["runs_new"] += 1
            return
        self.mapping[run.id] = local
        out["runs_known"] += 1
        sid = run.server_id
        if sid and local_sid is None:
            if conn.execute("SELECT 1 FROM runs WHERE server_id = ?", (sid,)).fetchone():
                out["conflicts"].append(f"run {run.id}: server id {sid} already belongs to another run here")
            else:
                conn.execute("UPDATE runs SET server_id = ? WHERE id = ?", (sid, local))
                local_sid = sid
                out["server_ids_adopted"] += 1
        elif sid and local_sid != sid:
            out["conflicts"].append(
                f"run {run.id}: the bundle's box synced it as {sid}, this box as {local_sid}; "
                f"new steps go to {local_sid}"
            )
        self.same_server[local] = bool(sid) and local_sid == sid

    def _check_creates(self, matched: dict[str, str | None]) -> dict[str, dict[str, Any]]:
        """One run id, one create: a bundle's create for a run that has another create here is forged
        or damaged. Checked before anything is written, so a refused bundle leaves no trace.
        Returns each bundle run's create, to merge with its run."""
        creates: dict[str, dict[str, Any]] = {}
        for doc in self.reader.rows("events.jsonl"):
            if doc["kind"] != CREATE:
                continue
            creates[doc["run_id"]] = doc
            local = matched.get(doc["run_id"])
            other = outbox.other_create(self.journal.conn, local, doc["id"]) if local else None
            if other is not None:
                raise self.reader.refuse(
                    f"events.jsonl: run {doc['run_id']} already has another create here ({other}):"
                    " a forged or damaged bundle"
                )
        return creates

    def _blob(self, conn: sqlite3.Connection, doc: dict[str, Any]) -> None:
        self.out["blobs_new"] += self.journal.put_blob(conn, Blob.from_doc(doc))

    def _step(self, conn: sqlite3.Connection, doc: dict[str, Any]) -> None:
        step = Step.from_doc(doc)
        now = time.time()
        step = replace(
            step, run_id=self.mapping[step.run_id], created_at=step.created_at or now, updated_at=step.updated_at or now
        )
        self.out["steps_updated"] += self.journal.upsert_step(conn, step)

    def _create(self, conn: sqlite3.Connection, doc: dict[str, Any]) -> None:
        """A run's create and its step 0, in the transaction that merged the run."""
        event = Event.from_doc(doc)
        run_id = self.mapping[event.run_id]
        event = replace(event, run_id=run_id, created_at=event.created_at or time.time())
        carried = self.same_server.get(run_id, False)
        if carried:
            # The run has the bundle's server id here, so the server has it: its create is
            # settled whatever state the bundle gives it (a box killed while importing an
            # earlier bundle can ship it pending). Left unsent it would never be sent (sync
            # skips the create of a run with a server id), and every later sync would exit 4.
            event = replace(event, state=outbox.DELIVERED)
        state = outbox.import_event(conn, event, carried=carried, newer_step=False)
        if state is None:
            self.out["events_known"] += 1
            return
        # The baseline, also for a bundle that carries the create but not step 0's row.
        self.out["steps_updated"] += self.journal.upsert_step(conn, event.as_step())
        self.out["events_new"] += 1
        self.out["events_pending"] += state == outbox.PENDING

    def _event(self, conn: sqlite3.Connection, doc: dict[str, Any]) -> None:
        if doc["kind"] == CREATE:
            return  # merged with its run
        event = Event.from_doc(doc)
        run_id = self.mapping[event.run_id]
        event = replace(event, run_id=run_id, created_at=event.created_at or time.time())
        newer = self.journal.has_newer_step(conn, run_id, event.step or 0, event.id)
        state = outbox.import_event(conn, event, carried=self.same_server.get(run_id, False), newer_step=newer)
        if state is None:
            self.out["events_known"] += 1
            return
        self.out["events_new"] += 1
        self.out["events_pending"] += state == outbox.PENDING
