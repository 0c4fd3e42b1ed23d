"""The loopback cluster and the second user behave as the cluster-mode tests will rely on.

What these establish about two sshfs mounts of one folder (two "hosts"):
- data written and closed on one is read by a fresh open on the other (close-to-open);
- ``flock`` and POSIX (``fcntl``) locks taken through one are invisible through the
  other, while they do exclude within one mount: two lock domains, as two NFS
  clients mounted ``nolock``. The cluster mode must not count on such locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from cluster_fixtures import REQUIRE_ENV, second_user, two_hosts, unavailable  # noqa: F401
from sshfs_hosts import SSHFS_DEFAULTS, Hosts, _is_mounted

from weco_observe import fsdetect


def test_each_host_is_its_own_sshfs_mount_of_the_backing_folder(two_hosts):
    reader = two_hosts.extra_mount()
    points = [two_hosts.mount_a, two_hosts.mount_b, reader]
    assert [fsdetect.filesystem_of(p) for p in points] == [(str(p), "fuse.sshfs") for p in points]
    assert len({os.stat(p).st_dev for p in points} | {os.stat(two_hosts.backing).st_dev}) == 4


def test_a_file_closed_on_one_host_is_read_by_an_open_on_the_others(two_hosts):
    (two_hosts.mount_a / "from-a.txt").write_text("written on A\n")
    assert (two_hosts.mount_b / "from-a.txt").read_text() == "written on A\n"
    assert (two_hosts.backing / "from-a.txt").read_text() == "written on A\n"

    with open(two_hosts.mount_b / "from-b.bin", "wb") as f:
        f.write(b"x" * 100_000)
        f.flush()
        os.fsync(f.fileno())
    reader = two_hosts.extra_mount()
    assert (reader / "from-b.bin").read_bytes() == b"x" * 100_000
    assert sorted(os.listdir(reader)) == ["from-a.txt", "from-b.bin"]


def test_a_reader_sees_new_names_and_new_data_at_its_next_look(two_hosts):
    a, b = two_hosts.mount_a, two_hosts.mount_b
    (a / "g").write_bytes(b"a" * 4096)
    assert (b / "g").read_bytes() == b"a" * 4096 and os.listdir(b) == ["g"]  # B has it cached now
    with open(a / "g", "r+b") as f:  # same size, same mtime second: only a fresh read can tell
        f.write(b"b" * 4096)
    (a / "h").write_bytes(b"new")
    assert (b / "g").read_bytes() == b"b" * 4096  # B's page cache was dropped at open
    assert sorted(os.listdir(b)) == ["g", "h"]  # no sshfs listing cache with NO_DIR_CACHE


def test_with_sshfs_defaults_a_listing_lags_as_on_nfs(two_hosts):
    hosts = Hosts(two_hosts.server, Path(tempfile.mkdtemp(prefix="weco-observe-hosts-")), SSHFS_DEFAULTS)
    try:
        assert os.listdir(hosts.mount_b) == []
        (hosts.mount_a / "segment").write_text("x")
        assert os.listdir(hosts.mount_b) == []  # the cached listing, for ~20 s
        assert (hosts.mount_b / "segment").read_text() == "x"  # opening it by name works at once
    finally:
        hosts.close()


LOCK_PROBE = textwrap.dedent(
    """
    import fcntl, sys
    kind, path = sys.argv[1], sys.argv[2]
    with open(path, "a") as f:
        try:
            if kind == "flock":
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("blocked")
        else:
            print("acquired")
    """
)


def _probe(kind: str, path: Path) -> str:
    # Another process: POSIX locks never conflict within one process.
    argv = [sys.executable, "-c", LOCK_PROBE, kind, str(path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("kind", ["flock", "fcntl"])
def test_a_lock_held_on_one_host_does_not_exclude_the_other_host(two_hosts, kind):
    (two_hosts.mount_a / "lock").touch()
    with open(two_hosts.mount_a / "lock", "a") as held:
        if kind == "flock":
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            fcntl.lockf(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Within host A the lock works, so it is not a no-op ...
        assert _probe(kind, two_hosts.mount_a / "lock") == "blocked"
        # ... but host B and the server's own disk never hear of it.
        assert _probe(kind, two_hosts.mount_b / "lock") == "acquired"
        assert _probe(kind, two_hosts.backing / "lock") == "acquired"


def test_closing_the_hosts_unmounts_even_a_busy_mount_and_stops_sshfs(two_hosts):
    hosts = Hosts(two_hosts.server, Path(tempfile.mkdtemp(prefix="weco-observe-hosts-")))
    try:
        busy = open(hosts.mount_a / "held-open", "wb", buffering=0)  # a plain `fusermount -u` fails: EBUSY
        processes = [m.process for m in hosts.mounts]
        hosts.close()
        assert not _is_mounted(hosts.mount_a) and not _is_mounted(hosts.mount_b)
        assert [p.poll() is not None for p in processes] == [True, True]
        assert not hosts.root.exists()
        with pytest.raises(OSError):  # a dead mount's files fail, as on a crashed NFS client
            busy.write(b"x")
        with contextlib.suppress(OSError):  # close(2) frees the descriptor even as it reports the dead mount
            busy.close()
    finally:
        hosts.close()


def test_a_missing_prerequisite_skips_here_and_fails_where_required(monkeypatch):
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no sshfs"):
        unavailable("no sshfs")
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="no sshfs"):
        unavailable("no sshfs")


def test_the_second_user_cannot_read_roots_private_file(second_user):
    folder = Path(tempfile.mkdtemp(prefix="weco-observe-private-"))
    try:
        folder.chmod(0o755)
        secret = folder / "secret"
        secret.write_text("root only\n")
        secret.chmod(0o600)
        (folder / "public").write_text("anyone\n")
        assert second_user.run(["cat", str(folder / "public")]).stdout == "anyone\n"
        denied = second_user.run(["cat", str(secret)])
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and secret.read_text() == "root only\n"
    finally:
        shutil.rmtree(folder)


def test_the_second_user_runs_weco_observe_as_itself_in_a_clean_env(second_user, monkeypatch):
    monkeypatch.setenv("WECO_API_KEY", "root-secret-key")  # must not leak into the user's commands
    probe = "import os, weco_observe; print(os.getuid(), weco_observe.__file__, os.environ.get('WECO_API_KEY'))"
    done = second_user.run([second_user.python, "-c", probe])
    assert done.returncode == 0, done.stderr
    uid, path, key = done.stdout.split()
    assert (int(uid), key) == (second_user.uid, "None")
    assert path.startswith(str(second_user.libs))
    status = second_user.cli("observe", "status", "--json")
    assert status.returncode == 0, status.stderr
    assert str(second_user.home / "weco-data") in status.stdout
