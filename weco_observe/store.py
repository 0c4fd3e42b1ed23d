"""Which journal to open, and how: the one place that knows the local mode from the cluster mode.

A journal on a disk of this host (**local mode**) is one SQLite file in WAL mode
that every process writes in its own transaction; the sync lock is an ``flock``.
A journal on a filesystem several hosts share (**cluster mode**, see
docs/cluster.md) is written by writers as segment files, and only the holder of
the owner lock writes ``journal.db``, after merging the segments. Every command
asks here for what it needs:

- :func:`writer`: ``init``, ``log`` and the SDK. Local: the journal. Cluster: a
  :class:`~weco_observe.segments.SegmentWriter`. Either way, calls spilled while
  the journal could not be written are replayed first.
- :func:`exclusive`: ``sync``, ``flush()``, the background syncer, ``doctor
  --repair``. Local: the sync lock and the journal. Cluster: the owner lock, the
  journal, the segments merged.
- :func:`reader`: the views and ``bundle``/``import``. Local: the journal.
  Cluster: the owner lock for the time of the command (after merging), or, when
  another owner keeps it busy, the merged journal read through the seqlock.

``mode`` tells which applies; it costs well under a millisecond (see ``fsdetect``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import fsdetect
from .errors import JournalUnavailable, SyncBusy
from .files import private_dir
from .settings import Settings

__all__ = ["Exclusive", "exclusive", "is_shared", "merge_if_free", "mode", "reader", "sync_lock", "writer"]


def mode(settings: Settings, journal_path: Path | None = None) -> fsdetect.Mode:
    """The mode of the journal at ``journal_path`` (default: the settings' journal)."""
    path = journal_path or settings.journal_path
    return fsdetect.shared_mode(path.parent, settings)


def is_shared(settings: Settings, journal_path: Path | None = None) -> bool:
    return mode(settings, journal_path).shared


def writer(settings: Settings, journal_path: Path | None = None, *, append: bool = False) -> Any:
    """The object ``init``/``log``/the SDK write through (``create_run``, ``log_step``, ``find_run``,
    ``close``), with spilled calls replayed into it first. ``append``: a long-lived writer (the SDK)."""
    from . import spill

    path = journal_path or settings.journal_path
    if is_shared(settings, path):
        from .segments import SegmentWriter

        target: Any = SegmentWriter(path, settings=settings, append=append)
    else:
        from .journal import Journal

        target = Journal(path, settings=settings)
    try:
        spill.replay(target)
    except BaseException:
        target.close()
        raise
    return target


def sync_lock(settings: Settings, journal_path: Path | None = None) -> Any:
    """The lock that makes a process the journal's one syncer (not acquired): the ``flock`` of
    ``synclock.SyncLock`` in local mode, the owner folder of ``ownerlock.OwnerLock`` in cluster mode."""
    path = journal_path or settings.journal_path
    if is_shared(settings, path):
        from .ownerlock import OwnerLock

        return OwnerLock(path)
    from .synclock import SyncLock

    return SyncLock(path)


@dataclass
class Exclusive:
    """An open journal with the lock that makes this process its only syncer (and, in cluster
    mode, its only writer); ``merged`` is what merging the segments did, None in local mode."""

    journal: Any
    lock: Any
    shared: bool
    merged: Any = None

    def merge(self) -> Any:
        """Cluster mode: merge what writers appended since (a no-op in local mode)."""
        if not self.shared:
            return None
        from . import segments

        self.merged = segments.merge(self.journal)
        return self.merged


@contextmanager
def exclusive(
    settings: Settings,
    purpose: str,
    *,
    journal_path: Path | None = None,
    wait: bool = True,
    timeout: float | None = None,
    on_wait: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[Exclusive]:
    """Hold the journal for ``purpose`` (sync, flush, background, repair): raises SyncBusy like
    ``SyncLock.acquire`` when it is held elsewhere and ``wait`` is False or ``timeout`` passes."""
    from .journal import Journal

    path = journal_path or settings.journal_path
    try:
        private_dir(path.parent)
    except OSError as exc:
        raise JournalUnavailable(f"cannot open journal {path}: {exc}") from None
    shared = is_shared(settings, path)
    lock = sync_lock(settings, path)
    lock.acquire(purpose, wait=wait, timeout=timeout, on_wait=on_wait, should_stop=should_stop)
    try:
        journal = Journal(path, settings=settings, owner=lock if shared else None)
        try:
            held = Exclusive(journal, lock, shared)
            held.merge()
            yield held
        finally:
            journal.close()
    finally:
        lock.release()


def merge_if_free(settings: Settings, purpose: str, journal_path: Path | None = None) -> Any:
    """Cluster mode: merge what writers appended, unless another process holds the journal
    (SyncBusy: it merges itself). Returns what the merge did; None in local mode."""
    with exclusive(settings, purpose, journal_path=journal_path, wait=False) as held:
        return held.merged


@contextmanager
def reader(settings: Settings, journal_path: Path | None = None, *, wait: float | None = None) -> Iterator[Any]:
    """The journal to read (and, for ``import``/``bundle``, to record into) for one command.

    Cluster mode: merge first under the owner lock, waiting at most ``wait``
    seconds (default: the busy timeout); when it stays busy, read the merged
    journal through the seqlock and say on stderr how much waits in segments.
    """
    from .journal import Journal, SharedReader

    path = journal_path or settings.journal_path
    if not is_shared(settings, path):
        with Journal(path, settings=settings) as journal:
            yield journal
        return
    stack = ExitStack()
    try:
        held = stack.enter_context(
            exclusive(settings, "view", journal_path=path, timeout=settings.busy_timeout if wait is None else wait)
        )
    except SyncBusy as busy:
        from . import segments
        from .files import JournalFiles

        waiting = segments.backlog(JournalFiles(path))
        print(
            f"weco-observe: WARNING {busy}; showing the merged journal only:"
            f" {waiting['files']} segment files from writers are not merged yet",
            file=sys.stderr,
        )
        yield SharedReader(path, settings=settings)
        return
    with stack:
        yield held.journal
