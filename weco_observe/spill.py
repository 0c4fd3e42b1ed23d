"""Spill files: where an ``init`` or ``log`` goes when the journal cannot be written.

A read-only data dir, a full disk or a lock held past the busy timeout must not
end the user's experiment, and must not lose the step either. The call (with
its pre-generated run and event ids, and the code text inline) is written as one
JSON file to the first usable spill directory: ``<journal dir>/spill``, else
``$TMPDIR/weco-observe-spill-<uid>``, else ``/tmp/weco-observe-spill-<uid>``.

Replay is an explicit step that writers take (``init``, ``log``, the SDK's first
write, ``sync``); opening a journal does not replay anything. A spill file is
input this process did not write, so replay trusts nothing in it:

- The folder and the file must belong to the current user, must not be
  symlinks, and must not be writable by anyone else (a shared temp dir lets
  another user pre-create the fallback folder and plant files in it). Anything
  else is refused with a warning and left in place.
- Only two operations exist, ``create_run`` and ``log_step``, each with a fixed
  set of arguments, checked by the same rules as the CLI before anything is
  written. Nothing in a file names a method to call.
- Replay is idempotent by event id; a file that fails its checks is renamed
  ``.bad`` with a one-line message, never half-applied.

Spill files never contain the API key.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import ids
from .errors import InvalidInput, JournalUnavailable
from .files import JournalFiles
from .settings import Settings

if TYPE_CHECKING:
    from .journal import Journal

__all__ = ["OPERATIONS", "check", "pending", "refused", "replay", "spill_dirs", "write"]

#: The only operations a spill file can hold, with the arguments each may carry.
OPERATIONS: dict[str, frozenset[str]] = {
    "create_run": frozenset(
        {"source_code", "metric", "maximize", "name", "additional_instructions", "metadata", "run_id", "event_id"}
    ),
    "log_step": frozenset(
        {"run", "step", "status", "description", "metrics", "code", "parent_step", "metadata", "event_id"}
    ),
}
#: A larger file is not a spill file (a whole call, code included, is far smaller).
_MAX_BYTES = 256 << 20


def _target(journal_path: str | os.PathLike[str] | None) -> str:
    return os.path.realpath(journal_path if journal_path is not None else Settings.load().journal_path)


def spill_dirs(journal_path: str | os.PathLike[str] | None = None, settings: Settings | None = None) -> list[Path]:
    """Candidate directories, most preferred first (the fallbacks are shared by every journal of this user)."""
    settings = settings or Settings.load()
    uid = os.getuid()
    named = Path(journal_path if journal_path is not None else settings.journal_path)
    # checked before the path is resolved: a planted symlink resolves to a folder of another name
    dirs = [] if _planted(named.parent) else [JournalFiles(Path(_target(named))).spill_dir]
    for root in (settings.temp_dir, Path("/tmp")):
        if root / f"weco-observe-spill-{uid}" not in dirs:
            dirs.append(root / f"weco-observe-spill-{uid}")
    return dirs


def check(op: str, kwargs: dict[str, Any]) -> None:
    """The journal-free checks of a ``create_run`` or ``log_step`` call; raises InvalidInput."""
    from . import validate

    allowed = OPERATIONS.get(op)
    if allowed is None:
        raise InvalidInput(f"unknown operation {op!r}: a spill file holds create_run or log_step")
    extra = set(kwargs) - allowed
    if extra:
        raise InvalidInput(f"{op} does not take {', '.join(sorted(extra))}")
    get = kwargs.get
    for key, shape in (("event_id", ids.is_ulid), ("run_id", ids.is_local_run_id)):
        value = get(key)
        if value is not None and not shape(value):
            raise InvalidInput(f"{op}: {key} {value!r} is not an id this tool makes")
    if op == "create_run":
        validate.check_run_args(
            get("source_code"), get("metric"), get("name"), get("additional_instructions"), get("metadata")
        )
        if not isinstance(get("maximize", False), bool):
            raise InvalidInput("create_run: maximize must be true or false")
    else:
        if not isinstance(get("run"), str) or not get("run"):
            raise InvalidInput("log_step: run must be a run id")
        validate.check_step_args(
            get("step"),
            get("status", "completed"),
            get("description"),
            get("metrics"),
            get("code"),
            get("parent_step"),
            get("metadata"),
        )


def _planted(journal_dir: Path) -> bool:
    """The journal's private subfolder in a shared folder fails its checks (another user may have
    made it): no spill file goes inside it either."""
    from .files import check_private_subfolder, is_private_subfolder

    if not is_private_subfolder(journal_dir) or not os.path.lexists(journal_dir):
        return False
    try:
        check_private_subfolder(journal_dir)
    except JournalUnavailable:
        return True
    return False


def _private_dir_ok(directory: Path) -> bool:
    """Ours, a real directory (not a symlink), writable by nobody else."""
    try:
        st = os.lstat(directory)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def write(op: str, kwargs: dict[str, Any], journal_path: str | os.PathLike[str] | None = None) -> Path | None:
    """Write one operation meant for ``journal_path`` (default: the user's journal) to a spill
    file; None if nowhere works.

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
            if not _private_dir_ok(directory):
                continue  # someone else's folder, or one others can write to: never ours to use
            tmp = directory / f".{name}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
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


def _candidates(journal_path: str | os.PathLike[str] | None) -> Iterator[tuple[Path, str | None]]:
    """Every ``*.json`` in the spill dirs with why it must be refused (None: acceptable)."""
    for directory in spill_dirs(journal_path):
        try:
            names = sorted(n for n in os.listdir(directory) if n.endswith(".json"))
        except OSError:
            continue
        dir_ok = _private_dir_ok(directory)
        for name in names:
            path = directory / name
            if not dir_ok:
                yield path, f"its folder {directory} is not yours alone (owner or mode)"
                continue
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                yield path, "it is not a regular file"
            elif st.st_uid != os.getuid():
                yield path, "it belongs to another user"
            elif st.st_mode & 0o022:
                yield path, "others can write to it"
            elif st.st_size > _MAX_BYTES:
                yield path, "it is too large to be a spill file"
            else:
                yield path, None


def _read(path: Path) -> dict[str, Any]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        try:
            record = json.loads(f.read(_MAX_BYTES + 1))
        except RecursionError:  # a ValueError, as for any JSON this tool would not have written
            raise ValueError("it is nested too deeply to be a spill file") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    return record


def _meant_for(record: dict[str, Any], target: str) -> bool:
    journal = record.get("journal")
    return journal is None or journal == target


def pending(journal_path: str | os.PathLike[str] | None = None) -> list[Path]:
    """Acceptable spill files waiting to be replayed into ``journal_path`` (default: the user's journal)."""
    target = _target(journal_path)
    out = []
    for path, why in _candidates(journal_path):
        if why is not None:
            continue
        try:
            meant = _meant_for(_read(path), target)
        except (OSError, ValueError):
            meant = True  # unreadable: kept in the list, so replay reports it
        if meant:
            out.append(path)
    return sorted(out, key=lambda p: p.name)


def refused(journal_path: str | os.PathLike[str] | None = None) -> list[tuple[Path, str]]:
    """Files in the spill dirs that replay will not touch, with why (for ``doctor`` and warnings)."""
    return [(path, why) for path, why in _candidates(journal_path) if why is not None]


def _warn(message: str) -> None:
    print(f"weco-observe: WARNING {message}", file=sys.stderr)


def replay(journal: Journal) -> int:
    """Import every acceptable spill file meant for ``journal``; return how many were imported.

    Refused files are named in a warning and left in place; a file whose call
    fails its checks is renamed ``.bad``. Stops (keeping the rest) when the
    journal itself cannot be written.
    """
    for path, why in refused(journal.path):
        _warn(f"spill file {path} not imported: {why}; left in place")
    files = pending(journal.path)
    done = 0
    for path in files:
        try:
            record = _read(path)
            op, kwargs = record.get("op"), record.get("kwargs")
            if not isinstance(op, str) or not isinstance(kwargs, dict):
                raise InvalidInput("it holds no operation")
            check(op, kwargs)
            if op == "create_run":
                journal.create_run(**kwargs)
            else:
                journal.log_step(**kwargs)
        except JournalUnavailable:
            return done
        except FileNotFoundError:  # another process replaying the same journal took it first
            continue
        except (OSError, ValueError, TypeError, InvalidInput) as exc:
            _warn(f"could not import spill file {path}: {exc}; kept as {path.name}.bad")
            with contextlib.suppress(OSError):
                path.rename(path.with_name(path.name + ".bad"))
            continue
        with contextlib.suppress(OSError):
            path.unlink()
        done += 1
    return done
