"""Spill files: where an ``init`` or ``log`` goes when the journal cannot be written.

A read-only data dir, a full disk or a lock held past the busy timeout must not
end the user's experiment, and must not lose the step either. The operation
(with its pre-generated run and event ids, and the code text inline) is written
as one JSON file to the first writable spill directory; the next time a journal
opens successfully it replays every spill file through the normal write path,
idempotently by event id, and deletes it. Spill files never contain the API key.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from . import ids, paths


def _target(journal_path: str | os.PathLike[str] | None) -> str:
    return os.path.realpath(journal_path if journal_path is not None else paths.journal_path())


def spill_dirs(journal_path: str | os.PathLike[str] | None = None) -> list[Path]:
    """Candidate directories, most preferred first (the fallbacks are shared by every journal)."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    dirs = [Path(_target(journal_path)).parent / "spill"]
    for root in (_temp_root(), Path("/tmp")):
        if root / f"weco-observe-spill-{uid}" not in dirs:
            dirs.append(root / f"weco-observe-spill-{uid}")
    return dirs


def _temp_root() -> Path:
    """Where ``tempfile.gettempdir()`` would look first, without importing tempfile: it pulls
    in shutil and random, ~4 ms on every ``weco observe log`` (the journal lists spills on open)."""
    for name in ("TMPDIR", "TEMP", "TMP"):
        value = os.environ.get(name)
        if value:
            return Path(value)
    return Path("/tmp")


def check(op: str, kwargs: dict[str, Any]) -> None:
    """The journal-free checks of a ``create_run`` or ``log_step`` call; raises InvalidInput."""
    from . import validate

    get = kwargs.get
    if op == "create_run":
        validate.check_run_args(
            get("source_code"), get("metric"), get("name"), get("additional_instructions"), get("metadata")
        )
    else:
        validate.check_step_args(
            get("step"),
            get("status", "completed"),
            get("description"),
            get("metrics"),
            get("code"),
            get("parent_step"),
            get("metadata"),
        )


def write(op: str, kwargs: dict[str, Any], journal_path: str | os.PathLike[str] | None = None) -> Path | None:
    """Write one operation (``create_run`` or ``log_step``) meant for ``journal_path`` (default: the
    user's journal) to a spill file; None if nowhere works.

    Bad input raises InvalidInput and writes nothing, whatever state the journal is in,
    so a spill file only ever holds a call that will import cleanly.
    """
    check(op, kwargs)
    # The journal's path is recorded so a spill in the shared fallback dir goes back to its own journal.
    record = json.dumps({"op": op, "journal": _target(journal_path), "kwargs": kwargs}, ensure_ascii=False)
    name = f"{ids.ulid()}.json"
    for directory in spill_dirs(journal_path):
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            if directory.stat().st_uid != os.getuid():
                continue
            tmp = directory / f".{name}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, record.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, directory / name)
            return directory / name
        except OSError:
            continue
    return None


def _meant_for(path: Path, target: str) -> bool:
    try:
        journal = json.loads(path.read_text(encoding="utf-8")).get("journal")
    except (OSError, ValueError, AttributeError):
        return True  # unreadable: let replay report it
    return journal is None or journal == target


def pending(journal_path: str | os.PathLike[str] | None = None) -> list[Path]:
    """Spill files waiting to be replayed into ``journal_path`` (default: the user's journal), oldest first."""
    target = _target(journal_path)
    files: list[Path] = []
    for directory in spill_dirs(journal_path):
        try:
            names = [n for n in os.listdir(directory) if n.endswith(".json")]
        except OSError:
            continue
        files.extend(directory / n for n in names if _meant_for(directory / n, target))
    return sorted(files, key=lambda p: p.name)


def replay(journal) -> int:
    """Import every spill file into ``journal``; return how many were imported."""
    files = pending(journal.path)
    if not files:
        return 0
    from .errors import InvalidInput, JournalUnavailable

    done = 0
    for path in files:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            getattr(journal, record["op"])(**record["kwargs"])
        except JournalUnavailable:
            return done
        except FileNotFoundError:  # another process opening the journal imported it first
            continue
        except (OSError, ValueError, KeyError, TypeError, InvalidInput) as exc:
            print(f"weco-observe: could not import spill file {path}: {exc}; kept as {path.name}.bad", file=sys.stderr)
            try:
                path.rename(path.with_name(path.name + ".bad"))
            except OSError:
                pass
            continue
        try:
            path.unlink()
        except OSError:
            pass
        done += 1
    return done
