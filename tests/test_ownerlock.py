"""The cluster-mode owner lock: a directory, a heartbeat, takeover of a dead owner, fencing.

Other hosts are played by rewriting ``owner.json`` as another host would have
written it (a host name that is not this one); the real two-host behaviour over
sshfs is in test_cluster.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from weco_observe.errors import SyncBusy
from weco_observe.ownerlock import LockLost, OwnerLock


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "journal.db"


def test_one_owner_at_a_time_and_release_frees_it(db):
    a, b = OwnerLock(db), OwnerLock(db)
    assert a.try_acquire("sync")
    assert not b.try_acquire("view")
    assert b.holder()["mode"] == "sync" and b.holder()["pid"] == os.getpid()
    with pytest.raises(SyncBusy, match="sync on"):
        b.acquire("view", wait=False)
    a.release()
    assert not a.path.exists()
    assert b.try_acquire("view")
    b.release()


def test_owner_json_is_private_and_beats(db):
    lock = OwnerLock(db, heartbeat=0.05)
    lock.acquire("merge")
    try:
        assert (os.stat(lock.path).st_mode & 0o777) == 0o700
        assert (os.stat(lock.path / "owner.json").st_mode & 0o777) == 0o600
        first = lock.holder()["beat"]
        deadline = time.monotonic() + 5
        while lock.holder()["beat"] == first and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lock.holder()["beat"] > first
    finally:
        lock.release()


def test_a_dead_owner_on_this_host_is_replaced_at_once(db):
    child = subprocess.run(
        [sys.executable, "-c", f"from weco_observe.ownerlock import OwnerLock; OwnerLock({str(db)!r}).try_acquire()"],
        timeout=60,
    )
    assert child.returncode == 0
    assert (db.with_name("journal.db.owner") / "owner.json").exists()  # the process died holding it
    lock = OwnerLock(db)
    started = time.monotonic()
    assert lock.try_acquire("sync")
    assert time.monotonic() - started < 1
    lock.release()


def _as_other_host(lock_dir: Path, token: str = "abc123", beat: int = 0) -> None:
    info = {"host": "another-node", "pid": 1, "token": token, "mode": "background", "since": 0, "beat": beat}
    (lock_dir / "owner.json").write_text(json.dumps(info))


def test_an_owner_on_another_host_that_stops_beating_is_taken_over(db):
    lock_dir = db.with_name("journal.db.owner")
    lock_dir.mkdir()
    _as_other_host(lock_dir)
    lock = OwnerLock(db, stale=0.6)
    assert not lock.try_acquire("sync")  # pid 1 is alive here, and it is not our host anyway
    started = time.monotonic()
    lock.acquire("sync", timeout=10, poll=0.05)
    waited = time.monotonic() - started
    assert 0.6 <= waited < 5
    assert lock.holder()["host"] != "another-node"
    lock.release()
    assert not list(db.parent.glob("journal.db.owner*"))  # no stale or break folders left behind


def test_waiting_as_long_as_the_staleness_period_is_enough_to_take_over(db):
    # `merge` and the views wait WECO_OBSERVE_BUSY_TIMEOUT, 30 s by default: the same as STALE
    lock_dir = db.with_name("journal.db.owner")
    lock_dir.mkdir()
    _as_other_host(lock_dir)
    lock = OwnerLock(db, stale=0.5)
    lock.acquire("merge", timeout=lock.stale, poll=0.05)
    assert lock.holder()["host"] != "another-node" and lock.holder()["token"] == lock.token
    lock.release()


def test_an_owner_that_keeps_beating_is_never_taken_over(db):
    lock_dir = db.with_name("journal.db.owner")
    lock_dir.mkdir()
    _as_other_host(lock_dir)
    stop = threading.Event()

    def beat() -> None:
        n = 0
        while not stop.wait(0.1):
            n += 1
            _as_other_host(lock_dir, beat=n)

    beater = threading.Thread(target=beat)
    beater.start()
    try:
        with pytest.raises(SyncBusy, match="another-node"):
            OwnerLock(db, stale=0.5).acquire("sync", timeout=1.5, poll=0.05)
    finally:
        stop.set()
        beater.join()
    assert json.loads((lock_dir / "owner.json").read_text())["host"] == "another-node"


def test_fencing_an_owner_that_was_taken_over_stops(db):
    slow = OwnerLock(db, heartbeat=3600)  # paused: it will not beat
    slow.acquire("merge")
    slow.check()
    assert slow._thread is not None
    other = OwnerLock(db, stale=0.3)
    # the slow owner looks like another host's, so only its silence can make it stale
    info = json.loads((slow.path / "owner.json").read_text())
    info["host"] = "another-node"
    (slow.path / "owner.json").write_text(json.dumps(info))
    other.acquire("sync", timeout=10, poll=0.05)
    with pytest.raises(LockLost):
        slow.check()
    other.release()
    slow.release()  # releasing a lost lock removes nothing of the new owner's


def test_waiting_asks_a_background_owner_to_yield(db):
    bg = OwnerLock(db)
    bg.acquire("background")
    seen = threading.Event()

    def background_work() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if bg.yield_requested():
                seen.set()
                bg.release()
                return
            time.sleep(0.02)

    worker = threading.Thread(target=background_work)
    worker.start()
    fg = OwnerLock(db)
    fg.acquire("sync", timeout=10, poll=0.02)
    worker.join()
    assert seen.is_set()
    assert not (fg.path / "yield").exists()
    fg.release()


def test_concurrent_contenders_for_a_stale_lock_end_with_one_owner(db):
    lock_dir = db.with_name("journal.db.owner")
    lock_dir.mkdir()
    _as_other_host(lock_dir)
    winners: list[OwnerLock] = []
    guard = threading.Lock()
    held_at_once = []

    def contend() -> None:
        lock = OwnerLock(db, stale=0.3)
        lock.acquire("sync", timeout=30, poll=0.02)
        with guard:
            winners.append(lock)
            held_at_once.append(sum(1 for w in winners if w.held))
        time.sleep(0.05)
        lock.check()
        with guard:
            lock.release()

    threads = [threading.Thread(target=contend) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(winners) == 6
    assert max(held_at_once) == 1


PAUSED_WHILE_TAKING = r"""
import sys, time
from weco_observe import ownerlock

def paused(self, *args, **kwargs):  # the owner is stopped just before it has said who it is
    print("taking", flush=True)
    time.sleep(120)

ownerlock.OwnerLock._write_info = paused
ownerlock.OwnerLock(sys.argv[1]).try_acquire("sync")
"""


def _killed_at(script: str, db: Path, cue: str) -> None:
    """Run ``script`` on ``db`` until it prints ``cue`` (it then pauses), and kill -9 it there."""
    import signal

    child = subprocess.Popen([sys.executable, "-c", script, str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == cue + "\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        child.stdout.close()


def test_an_owner_killed_while_taking_the_lock_leaves_nothing_anyone_must_wait_for(db):
    _killed_at(PAUSED_WHILE_TAKING, db, "taking")
    lock = OwnerLock(db, stale=30)
    started = time.monotonic()
    lock.acquire("sync", timeout=5, poll=0.05)  # a lock whose owner.json never came cannot be judged for 30 s
    assert time.monotonic() - started < 2
    (left,) = db.parent.glob("journal.db.owner.new-*")  # what the killed process was making
    os.utime(left, (time.time() - 3600, time.time() - 3600))
    lock.release()
    assert list(db.parent.glob("journal.db.owner*")) == []  # tidied once clearly abandoned


def test_a_rename_refused_the_way_sftp_refuses_it_means_another_took_the_lock(db, monkeypatch):
    # sshfs answers a rename onto an existing folder with EPERM (SFTP's generic "failure"), not
    # EEXIST or ENOTEMPTY: seen in test_cluster when two merges raced for the lock.
    import errno

    from weco_observe import ownerlock

    rename = os.rename

    def another_owner_first(src, dst):
        if str(dst).endswith("journal.db.owner"):
            os.mkdir(dst)
            _as_other_host(Path(dst))
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return rename(src, dst)

    monkeypatch.setattr(ownerlock.os, "rename", another_owner_first)
    lock = OwnerLock(db)
    assert not lock.try_acquire("merge") and not lock.held
    assert lock.holder()["host"] == "another-node"
    assert [p.name for p in db.parent.iterdir() if ".new-" in p.name] == []  # its staging folder is gone


PAUSED_WHILE_BREAKING = r"""
import os, sys, time
from weco_observe import ownerlock

rename = os.rename

def paused(src, dst):  # the breaker has made its marker and is about to move the dead owner aside
    if ".stale-" in str(dst):
        print("breaking", flush=True)
        time.sleep(120)
    return rename(src, dst)

ownerlock.os.rename = paused
ownerlock.OwnerLock(sys.argv[1]).try_acquire("merge")
"""


def _next_owner_after_a_breaker_killed_at(db: Path, script: str, cue: str, *, leaves_marker: bool) -> OwnerLock:
    """An owner that died on this host, a breaker of it killed -9 at ``cue``: the next owner must
    take the lock within 2 s (not after the 150 s an unjudgeable marker would cost). Returned held."""
    dead_owner = subprocess.run(
        [sys.executable, "-c", f"from weco_observe.ownerlock import OwnerLock; OwnerLock({str(db)!r}).try_acquire()"],
        timeout=60,
    )
    assert dead_owner.returncode == 0
    _killed_at(script, db, cue)
    assert bool(list(db.parent.glob("journal.db.owner.break-*"))) == leaves_marker  # what the breaker left
    lock = OwnerLock(db)
    started = time.monotonic()
    lock.acquire("merge", timeout=5, poll=0.05)
    assert time.monotonic() - started < 2
    return lock


def test_a_breaker_killed_mid_break_on_this_host_does_not_block_the_next_owner(db):
    # seen in test_cluster's kill -9 workload: a merger killed between making the break marker and
    # moving the dead owner aside left a marker that made every later owner wait 150 s
    lock = _next_owner_after_a_breaker_killed_at(db, PAUSED_WHILE_BREAKING, "breaking", leaves_marker=True)
    lock.release()
    assert list(db.parent.glob("journal.db.owner.break-*")) == []


PAUSED_WHILE_SIGNING = r"""
import sys, time
from weco_observe import ownerlock

def paused(self, marker):  # the breaker has made its marker's folder and not yet said who it is
    print("signing", flush=True)
    time.sleep(120)

ownerlock.OwnerLock._sign = paused
ownerlock.OwnerLock(sys.argv[1]).try_acquire("merge")
"""


def test_a_breaker_killed_before_signing_its_marker_does_not_block_the_next_owner(db):
    # seen in test_cluster's kill -9 workload on CI: a marker made by mkdir and never signed could
    # not be judged, and the final merge gave up after 30 s on an owner dead long before
    lock = _next_owner_after_a_breaker_killed_at(db, PAUSED_WHILE_SIGNING, "signing", leaves_marker=False)
    lock.release()
    assert list(db.parent.glob("journal.db.owner.break-*")) == []
    (left,) = db.parent.glob("journal.db.owner.new-*")  # the killed breaker's unsigned folder...
    os.utime(left, (time.time() - 3600, time.time() - 3600))
    lock.acquire("merge", timeout=5)
    lock.release()
    assert list(db.parent.glob("journal.db.owner*")) == []  # ...tidied once clearly abandoned


def test_a_live_breaker_s_marker_is_respected(db):
    lock_dir = db.with_name("journal.db.owner")
    lock_dir.mkdir()
    _as_other_host(lock_dir)
    marker = db.with_name("journal.db.owner.break-abc123")
    marker.mkdir()  # this process is the breaker: alive, on this host
    (marker / "owner.json").write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid(), "token": "x"}))
    lock = OwnerLock(db, stale=0.2)
    with pytest.raises(SyncBusy, match="another-node"):
        lock.acquire("sync", timeout=1, poll=0.05)  # the owner is stale, but someone is breaking it
    assert lock_dir.exists() and marker.exists()
