"""Every file that lives beside a journal, named in one place: ``JournalFiles(path)``.

A journal is more than ``journal.db``. SQLite adds its ``-wal``/``-shm`` (local
mode) or ``-journal`` (cluster mode); the sync lock, its yield and cooldown
markers, the background syncer's log, the views cache, spill files, cluster-mode
segments and the owner lock, private copies of bundles being imported, and the
damaged copies ``doctor --repair`` keeps. Every module that touches one of them
asks ``JournalFiles`` for its name, and ``doctor`` checks the permissions of all
of them (:meth:`JournalFiles.private_paths`).

They all hold code or metrics, so they are created private: directories 0700,
files 0600. The journal's directory is created 0700 when the tool creates it;
a directory that already exists keeps its mode (it may be a shared folder the
user pointed us at, with a sticky bit that matters to others).

Only the standard library is imported: this runs on the ``weco observe log`` hot path.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["JournalFiles", "private_file", "private_dir"]


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) 0700 if missing; an existing directory keeps its mode."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    return path


def private_file(path: Path) -> None:
    """Create ``path`` 0600 if missing (before SQLite or a logger creates it with the umask's mode)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return
    os.close(fd)


@dataclass(frozen=True)
class JournalFiles:
    """The names of a journal's files. Pure naming: nothing is created or read here.

    >>> f = JournalFiles(Path("/data/journal.db"))
    >>> f.sync_lock, f.autosync_log
    (PosixPath('/data/journal.db.sync-lock'), PosixPath('/data/autosync.log'))
    """

    db: Path

    def __init__(self, db: str | os.PathLike[str]):
        object.__setattr__(self, "db", Path(db))

    def _beside(self, suffix: str) -> Path:
        return self.db.with_name(self.db.name + suffix)

    @property
    def dir(self) -> Path:
        return self.db.parent

    # SQLite's own files
    @property
    def wal(self) -> Path:
        return self._beside("-wal")

    @property
    def shm(self) -> Path:
        return self._beside("-shm")

    @property
    def rollback(self) -> Path:
        """The rollback journal SQLite writes in cluster mode (no WAL there); kept, empty, between transactions."""
        return self._beside("-journal")

    # locks and markers
    @property
    def migrate_lock(self) -> Path:
        """Serialises the first open (switch to WAL, migrations) in local mode."""
        return self._beside(".migrate-lock")

    @property
    def sync_lock(self) -> Path:
        """One syncer per journal (an flock in local mode); the file names the holder."""
        return self._beside(".sync-lock")

    @property
    def sync_yield(self) -> Path:
        """Touched by a foreground sync that wants a background syncer to give way."""
        return self._beside(".sync-yield")

    @property
    def sync_cooldown(self) -> Path:
        """Its mtime is the moment before which no background syncer should start."""
        return self._beside(".sync-cooldown")

    @property
    def commit_seq(self) -> Path:
        """Cluster mode: the owner's commit counter, a seqlock for readers on other hosts."""
        return self._beside(".seq")

    @property
    def owner_lock(self) -> Path:
        """Cluster mode: the lock *directory* of the one process that may write ``db``."""
        return self._beside(".owner")

    # data beside the journal
    @property
    def autosync_log(self) -> Path:
        return self.dir / "autosync.log"

    @property
    def views_cache(self) -> Path:
        """Derived per-run scores for ``runs`` (safe to delete)."""
        return self._beside(".views-cache.json")

    @property
    def spill_dir(self) -> Path:
        """Where a call goes when the journal cannot be written (the temp-dir fallback is in ``spill``)."""
        return self.dir / "spill"

    @property
    def segments_dir(self) -> Path:
        """Cluster mode: each writer's append-only segment files, merged into ``db`` by the owner."""
        return self.dir / "segments"

    def import_copy(self, token: str) -> Path:
        """A private copy of a bundle being imported (so it cannot change between check and merge)."""
        return self.dir / f".import-{os.getpid()}-{token}.weco"

    def import_copies(self) -> Iterator[Path]:
        return self.dir.glob(".import-*-*.weco")

    def damaged_copy(self, stamp: str) -> Path:
        """Where ``doctor --repair`` keeps the damaged journal."""
        return self._beside(f".damaged-{stamp}")

    def repair_scratch(self, stamp: str) -> Path:
        """The fresh journal ``doctor --repair`` fills before it takes the journal's place."""
        return self.db.with_name(f".{self.db.name}.repair-{stamp}")

    def sqlite_companions(self, db: Path | None = None) -> list[Path]:
        """``-wal``, ``-shm`` and ``-journal`` of ``db`` (default: the journal)."""
        base = db or self.db
        return [Path(f"{base}{s}") for s in ("-wal", "-shm", "-journal")]

    # -- for doctor ----------------------------------------------------------------

    def private_paths(self) -> list[tuple[Path, int]]:
        """Every existing file and directory of this journal with the mode it should have.

        Directories 0700, files 0600, each at most that permissive. Spill and
        segment files are listed one by one; so are import copies and damaged copies.
        """
        out: list[tuple[Path, int]] = [(self.dir, 0o700)]
        singles = [
            self.db,
            self.wal,
            self.shm,
            self.rollback,
            self.migrate_lock,
            self.sync_lock,
            self.sync_yield,
            self.sync_cooldown,
            self.commit_seq,
            self.autosync_log,
            self.views_cache,
        ]
        out += [(p, 0o600) for p in singles if _exists(p)]
        out += [(p, 0o600) for p in self.import_copies()]
        out += [(p, 0o600) for p in self.dir.glob(self.db.name + ".damaged-*")]
        for directory in (self.spill_dir, self.segments_dir, self.owner_lock):
            if not _is_dir(directory):
                continue
            out.append((directory, 0o700))
            for root, dirs, names in os.walk(directory):
                out += [(Path(root, d), 0o700) for d in dirs]
                out += [(Path(root, n), 0o600) for n in names]
        return out


def _exists(path: Path) -> bool:
    try:
        os.lstat(path)
        return True
    except OSError:
        return False


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False
