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
import tempfile
from pathlib import Path
from typing import Any

from . import ids, paths


def spill_dirs() -> list[Path]:
    """Candidate directories, most preferred first."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return [
        paths.journal_dir() / "spill",
        Path(tempfile.gettempdir()) / f"weco-observe-spill-{uid}",
    ]


def write(op: str, kwargs: dict[str, Any]) -> Path | None:
    """Write one operation (``create_run`` or ``log_step``) to a spill file; None if nowhere works."""
    record = json.dumps({"op": op, "kwargs": kwargs}, ensure_ascii=False)
    name = f"{ids.ulid()}.json"
    for directory in spill_dirs():
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


def pending() -> list[Path]:
    """Spill files waiting to be replayed, oldest first."""
    files: list[Path] = []
    for directory in spill_dirs():
        try:
            files.extend(directory / n for n in os.listdir(directory) if n.endswith(".json"))
        except OSError:
            continue
    return sorted(files, key=lambda p: p.name)


def replay(journal) -> int:
    """Import every spill file into ``journal``; return how many were imported."""
    files = pending()
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
        except (OSError, ValueError, KeyError, TypeError, InvalidInput) as exc:
            print(f"weco-observe: could not import spill file {path}: {exc}; kept as {path.name}.bad",
                  file=sys.stderr)
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
