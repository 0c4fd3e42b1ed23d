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
a directory that already exists keeps its mode: the tool never changes the mode
of a folder it did not create.

**The journal's folder** (:func:`journal_dir`). The folder the user names
(``WECO_OBSERVE_DIR``, else the platform's data folder) holds the journal when it
is missing (it is then created 0700) or is a folder of the user's own that nobody
else can write to. A folder that belongs to someone else or that others can write
to (``/tmp``, a team's project folder, mode 1777 or 2775) gets a private subfolder
``weco-observe-<user>`` instead, created 0700. Anyone who can write the shared
folder could have made that name first, as a folder of their own or a symlink to
one, to read what the victim logs; so every time it is made or found it is checked
(:func:`private_dir`): a real directory, not a symlink, owned by the user and
writable by nobody else, or :class:`~weco_observe.errors.JournalUnavailable` says
why and nothing is written there (``log`` then spills the step, as for any
journal it cannot write).

Only the standard library is imported: this runs on the ``weco observe log`` hot path.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import IO, Any

__all__ = [
    "JournalFiles",
    "check_private_subfolder",
    "is_private_subfolder",
    "output_file",
    "journal_dir",
    "private_dir",
    "private_file",
    "private_subfolder_name",
]

#: the private subfolder's name starts so; checking the prefix first keeps the user lookup off the hot path
_SUBFOLDER_PREFIX = "weco-observe-"
_names: dict[int, str] = {}


def private_subfolder_name(uid: int | None = None) -> str:
    """``weco-observe-<user name>`` (the uid when the name is unknown): one per user in a shared folder."""
    uid = os.getuid() if uid is None else uid
    name = _names.get(uid)
    if name is None:
        import pwd

        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = ""
        ok = user and user not in (".", "..") and "/" not in user and "\x00" not in user
        name = _names[uid] = _SUBFOLDER_PREFIX + (user if ok else str(uid))
    return name


def journal_dir(base: Path) -> Path:
    """The folder the journal lives in when the user names ``base``: ``base`` itself when it is
    missing or is theirs alone, else the private subfolder ``base/weco-observe-<user>``.

    One ``stat``: cheap enough for every command. Nothing is created or checked here; the
    folder is made and verified by :func:`private_dir` when the journal is opened.

    >>> journal_dir(Path("/tmp")).name.startswith("weco-observe-")  # /tmp is 1777: shared
    True
    """
    try:
        st = os.stat(base)
    except OSError:
        return base  # missing: created 0700 on first use (or the open says why it cannot be)
    if not stat.S_ISDIR(st.st_mode):
        return base  # not a folder: opening the journal says so
    if st.st_uid == os.getuid() and not st.st_mode & 0o022:
        return base
    return base / private_subfolder_name()


def is_private_subfolder(path: Path) -> bool:
    """True for the folder :func:`journal_dir` makes inside a shared folder (by its name)."""
    return path.name.startswith(_SUBFOLDER_PREFIX) and path.name == private_subfolder_name()


def check_private_subfolder(path: Path) -> None:
    """The private subfolder in a shared folder is a real directory of ours that nobody else can write."""
    from .errors import JournalUnavailable

    try:
        st = os.lstat(path)
    except OSError as exc:
        raise JournalUnavailable(f"cannot use {path}: {exc.strerror or exc}") from None
    why = None
    if stat.S_ISLNK(st.st_mode):
        why = "it is a symlink"
    elif not stat.S_ISDIR(st.st_mode):
        why = "it is not a folder"
    elif st.st_uid != os.getuid():
        why = f"it belongs to another user (uid {st.st_uid})"
    elif st.st_mode & 0o022:
        why = f"others can write to it (mode {stat.S_IMODE(st.st_mode):04o}; chmod 700 it if you made it)"
    if why:
        raise JournalUnavailable(
            f"refusing to keep the journal in {path}: {why}. Its folder {path.parent} is shared, so someone"
            " else may have made it to read your runs; remove it, or set WECO_OBSERVE_DIR to a folder of your own"
        )


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) 0700 if missing; an existing directory keeps its mode.

    The journal's private subfolder in a shared folder (see :func:`journal_dir`) is
    verified whether it was just made or found: raises JournalUnavailable if it is
    not a real directory of ours that only we can write.
    """
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
    if is_private_subfolder(path):
        check_private_subfolder(path)
    return path


def output_mode(path: Path) -> int:
    """The mode a file the user asked for (``report``, ``export -o``) is written with: 0600, since it
    holds code and metrics, or the mode of the file it replaces when that file is the user's own
    (``chmod 644 report.html`` once, and every later report keeps it)."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0o600
    if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid():
        return stat.S_IMODE(st.st_mode) & 0o777
    return 0o600


@contextmanager
def output_file(path: str | os.PathLike[str], *, text: bool = True) -> Iterator[IO[Any]]:
    """Write ``path`` atomically with :func:`output_mode`: a fresh temporary file beside it (never
    following a symlink planted at its name), renamed over ``path`` when the block ends; nothing
    is left behind if it raises. A symlink at ``path`` is replaced, not followed."""
    path = Path(path)
    mode = output_mode(path)
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")  # not `secrets`: `log` imports this module
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, mode)  # exactly this mode, whatever the umask
        with os.fdopen(fd, "w", encoding="utf-8", newline="") if text else os.fdopen(fd, "wb") as out:
            fd = -1
            yield out
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


def private_file(path: Path) -> None:
    """Create ``path`` 0600 if missing (before SQLite or a logger creates it with the umask's mode).

    An existing file is not opened: closing any descriptor of a file drops every POSIX lock the
    process holds on it, and SQLite's connections in this process may hold some (the journal's)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        if stat.S_ISLNK(os.lstat(path).st_mode):  # refused as opening it with O_NOFOLLOW would be
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path)) from None
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

    @cached_property
    def dir(self) -> Path:
        return self.db.parent

    # SQLite's own files
    @cached_property
    def wal(self) -> Path:
        return self._beside("-wal")

    @cached_property
    def shm(self) -> Path:
        return self._beside("-shm")

    @cached_property
    def rollback(self) -> Path:
        """The rollback journal SQLite writes in cluster mode (no WAL there); kept, empty, between transactions."""
        return self._beside("-journal")

    # locks and markers
    @cached_property
    def migrate_lock(self) -> Path:
        """Serialises the first open (switch to WAL, migrations) in local mode."""
        return self._beside(".migrate-lock")

    @cached_property
    def write_lock(self) -> Path:
        """Local mode, a relay's journal: its writer processes queue on this flock for each
        transaction, woken at once, instead of on SQLite's busy handler, which sleeps."""
        return self._beside(".write-lock")

    @cached_property
    def dashboard_version(self) -> Path:
        """A relay's dashboard: a counter its worker processes move when they see the journal change."""
        return self._beside(".dashboard-version")

    @cached_property
    def keys_changed(self) -> Path:
        """A relay's journal: replaced (a new inode) whenever its keys change, so a serving process
        knows when the keys it remembers must be looked up again."""
        return self._beside(".keys-changed")

    @cached_property
    def sync_lock(self) -> Path:
        """One syncer per journal (an flock in local mode); the file names the holder."""
        return self._beside(".sync-lock")

    @cached_property
    def sync_yield(self) -> Path:
        """Touched by a foreground sync that wants a background syncer to give way."""
        return self._beside(".sync-yield")

    @cached_property
    def sync_cooldown(self) -> Path:
        """Its mtime is the moment before which no background syncer should start."""
        return self._beside(".sync-cooldown")

    @cached_property
    def commit_seq(self) -> Path:
        """Cluster mode: the owner's commit counter, a seqlock for readers on other hosts."""
        return self._beside(".seq")

    @cached_property
    def owner_lock(self) -> Path:
        """Cluster mode: the lock *directory* of the one process that may write ``db``."""
        return self._beside(".owner")

    # data beside the journal
    @cached_property
    def autosync_log(self) -> Path:
        return self.dir / "autosync.log"

    @cached_property
    def views_cache(self) -> Path:
        """Derived per-run scores for ``runs`` (safe to delete)."""
        return self._beside(".views-cache.json")

    @cached_property
    def spill_dir(self) -> Path:
        """Where a call goes when the journal cannot be written (the temp-dir fallback is in ``spill``)."""
        return self.dir / "spill"

    @cached_property
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
            self.write_lock,
            self.dashboard_version,
            self.keys_changed,
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
