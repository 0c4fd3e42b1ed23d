"""Knowing whether the journal's folder is on a filesystem other hosts share (issue 8, item 1).

Most tests feed sample ``/proc/self/mountinfo`` texts, as clusters write them, to
``filesystem_of``; the ``shared_mode`` tests point ``fsdetect.MOUNTINFO`` at such
a file and the node-local cache at the test's own folder; the last test reads
this machine's real mountinfo while an sshfs mount is up.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cluster_fixtures import two_hosts  # noqa: F401
from hypothesis import given, settings
from hypothesis import strategies as st

from weco_observe import doctor, fsdetect
from weco_observe.settings import Settings

ROOT = "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro\n"
SAMPLES = {
    # name: (mountinfo lines after the root, path, (mount point, type), shared)
    "nfs home": (
        "95 22 0:52 / /home rw,nosuid,relatime shared:40 - nfs4 fs01.hpc:/export/home rw,vers=4.2,hard,proto=tcp\n",
        "/home/alice/.local/share/weco-observe",
        ("/home", "nfs4"),
        True,
    ),
    "nfs v3 project space": (
        "96 22 0:53 / /proj rw,relatime - nfs nas:/vol/proj rw,vers=3,nolock,proto=tcp\n",
        "/proj/ml/runs",
        ("/proj", "nfs"),
        True,
    ),
    "lustre scratch": (
        "97 22 0:54 / /lustre/scratch rw,relatime - lustre 10.1.0.5@o2ib:10.1.0.6@o2ib:/scratch rw,flock,lazystatfs\n",
        "/lustre/scratch/alice/j",
        ("/lustre/scratch", "lustre"),
        True,
    ),
    "gpfs": ("98 22 0:55 / /gpfs/fs1 rw,relatime - gpfs fs1 rw\n", "/gpfs/fs1/home/alice", ("/gpfs/fs1", "gpfs"), True),
    "beegfs": (
        "99 22 0:56 / /mnt/beegfs rw,relatime - beegfs beegfs_nodev rw,cfgFile=/etc/beegfs/beegfs-client.conf\n",
        "/mnt/beegfs/alice",
        ("/mnt/beegfs", "beegfs"),
        True,
    ),
    "cephfs kernel": (
        "100 22 0:57 / /mnt/cephfs rw,relatime - ceph 10.0.0.1:6789,10.0.0.2:6789:/ rw,name=admin,acl\n",
        "/mnt/cephfs/alice",
        ("/mnt/cephfs", "ceph"),
        True,
    ),
    "cephfs fuse": (
        "101 22 0:58 / /mnt/cephfuse rw,nosuid,nodev,relatime - fuse.ceph-fuse ceph-fuse rw,user_id=0,allow_other\n",
        "/mnt/cephfuse/alice",
        ("/mnt/cephfuse", "fuse.ceph-fuse"),
        True,
    ),
    "cifs": (
        "102 22 0:59 / /mnt/share rw,relatime - cifs //nas/share rw,vers=3.1.1,cache=strict,nobrl\n",
        "/mnt/share/alice",
        ("/mnt/share", "cifs"),
        True,
    ),
    "smb3": ("103 22 0:60 / /mnt/smb rw - smb3 //nas/s rw\n", "/mnt/smb/x", ("/mnt/smb", "smb3"), True),
    "sshfs": (
        "104 22 0:61 / /mnt/remote rw,nosuid,nodev,relatime - fuse.sshfs alice@login1:/home/alice rw,user_id=1000\n",
        "/mnt/remote/project",
        ("/mnt/remote", "fuse.sshfs"),
        True,
    ),
    "9p (wsl2 drive)": (
        "105 22 0:62 / /mnt/c rw,noatime - 9p drvfs rw,dirsync,aname=drvfs;path=C:\\134;uid=1000,trans=fd\n",
        "/mnt/c/Users/alice",
        ("/mnt/c", "9p"),
        True,
    ),
    "juicefs": (
        "106 22 0:63 / /jfs rw,relatime - fuse.juicefs JuiceFS:myjfs rw,user_id=0\n",
        "/jfs/a",
        ("/jfs", "fuse.juicefs"),
        True,
    ),
    "overlay root in a container": (
        "300 22 0:70 / /work rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w\n",
        "/work/runs",
        ("/work", "overlay"),
        False,
    ),
    "ext4": ("", "/var/lib/weco", ("/", "ext4"), False),
    "xfs data disk": ("301 22 8:17 / /data rw,noatime - xfs /dev/sdb1 rw,attr2\n", "/data/x", ("/data", "xfs"), False),
    "tmpfs": ("302 22 0:71 / /tmp rw,nosuid,nodev - tmpfs tmpfs rw,size=8g\n", "/tmp/j", ("/tmp", "tmpfs"), False),
    "local fuse (lxcfs)": (
        "303 22 0:72 / /var/lib/lxcfs rw,nosuid,nodev,relatime - fuse.lxcfs lxcfs rw,user_id=0\n",
        "/var/lib/lxcfs/x",
        ("/var/lib/lxcfs", "fuse.lxcfs"),
        False,
    ),
    "a space in the mount point": (
        "110 22 0:64 / /mnt/my\\040share rw - cifs //nas/my\\040share rw\n",
        "/mnt/my share/run",
        ("/mnt/my share", "cifs"),
        True,
    ),
    "tab, newline and backslash in the mount point": (
        "111 22 0:65 / /mnt/a\\011b\\012c\\134d rw - nfs4 s:/x rw\n",
        "/mnt/a\tb\nc\\d/j",
        ("/mnt/a\tb\nc\\d", "nfs4"),
        True,
    ),
    "the escaped name is not taken literally": (
        "112 22 0:66 / /mnt/x\\040y rw - nfs4 s:/x rw\n",
        "/mnt/x\\040y/j",
        ("/", "ext4"),
        False,
    ),
    "nested: a local disk inside the nfs home": (
        "95 22 0:52 / /home rw - nfs4 fs01:/home rw\n120 95 259:3 / /home/alice/fast rw - ext4 /dev/nvme1n1 rw\n",
        "/home/alice/fast/j",
        ("/home/alice/fast", "ext4"),
        False,
    ),
    "nested: beside the local disk is still nfs": (
        "95 22 0:52 / /home rw - nfs4 fs01:/home rw\n120 95 259:3 / /home/alice/fast rw - ext4 /dev/nvme1n1 rw\n",
        "/home/alice/fastest/j",
        ("/home", "nfs4"),
        True,
    ),
    "a prefix that is not a parent": (
        "95 22 0:52 / /home rw - nfs4 fs01:/home rw\n",
        "/homework/j",
        ("/", "ext4"),
        False,
    ),
    "a later mount over the same point wins": (
        "130 22 0:80 / /scratch rw - tmpfs tmpfs rw\n131 22 0:81 / /scratch rw - lustre mgs@tcp:/s rw\n",
        "/scratch/j",
        ("/scratch", "lustre"),
        True,
    ),
    "a bind mount of an nfs subfolder": (
        "95 22 0:52 / /home rw - nfs4 fs01:/home rw\n140 22 0:52 /alice/data /data rw - nfs4 fs01:/home rw\n",
        "/data/runs",
        ("/data", "nfs4"),
        True,
    ),
    "a bind mount's root field is not its mount point": (
        "150 22 0:82 /home/alice /mnt/alice rw - nfs4 fs01:/home rw\n",
        "/home/alice/j",
        ("/", "ext4"),
        False,
    ),
    "optional fields before the separator": (
        "160 22 0:83 / /mnt/o rw,relatime shared:12 master:3 propagate_from:2 unbindable - nfs4 s:/o rw\n",
        "/mnt/o/j",
        ("/mnt/o", "nfs4"),
        True,
    ),
    "a read-only mount": ("170 22 0:84 / /ro ro,relatime - nfs s:/ro ro\n", "/ro/x", ("/ro", "nfs"), True),
}


@pytest.mark.parametrize("name", list(SAMPLES))
def test_samples(name):
    lines, path, expected, shared = SAMPLES[name]
    assert fsdetect.filesystem_of(path, ROOT + lines) == expected
    assert fsdetect.is_shared(expected[1]) is shared


def test_the_path_itself_can_be_the_mount_point_and_the_last_line_needs_no_newline():
    text = (ROOT + "95 22 0:52 / /home rw - nfs4 fs01:/home rw").rstrip("\n")
    assert fsdetect.filesystem_of("/home", text) == ("/home", "nfs4")
    assert fsdetect.filesystem_of("/", text) == ("/", "ext4")


def test_no_mount_holds_the_path_is_none():
    assert fsdetect.filesystem_of("/x", "95 22 0:52 / /home rw - nfs4 fs01:/home rw\n") is None
    assert fsdetect.filesystem_of("/x", "") is None


def test_proc_mounts_text_is_understood_too_and_doctor_uses_it():
    mounts = "/dev/vda / ext4 rw 0 0\nfs01:/home /home nfs4 rw 0 0\n//nas/s /mnt/my\\040s cifs rw 0 0\n"
    assert fsdetect.filesystem_of("/home/a/j", mounts) == ("/home", "nfs4")
    assert fsdetect.filesystem_of("/mnt/my s/j", mounts) == ("/mnt/my s", "cifs")
    assert doctor.mount_of is fsdetect.filesystem_of and doctor.NETWORK_FILESYSTEMS is fsdetect.NETWORK_FILESYSTEMS
    assert doctor.filesystem_check(Path("/home/a/journal.db"), mounts)["level"] == "warn"


def test_symlinks_are_resolved_first(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    text = ROOT + f"95 22 0:52 / {tmp_path / 'real'} rw - nfs4 fs01:/x rw\n"
    assert fsdetect.filesystem_of(tmp_path / "link" / "journal", text) == (str(tmp_path / "real"), "nfs4")
    # a path that does not exist yet, reached through a symlink: resolved as far as it exists
    assert fsdetect.filesystem_of(tmp_path / "link" / "not" / "yet", text) == (str(tmp_path / "real"), "nfs4")
    assert fsdetect.filesystem_of(tmp_path / "real-not-yet", text) == ("/", "ext4")


@pytest.mark.parametrize(
    "fstype",
    ["nfs", "nfs4", "lustre", "gpfs", "beegfs", "ceph", "fuse.ceph-fuse", "cifs", "smb3", "smbfs", "fuse.sshfs", "9p"]
    + ["afs", "panfs", "wekafs", "orangefs", "glusterfs", "fuse.glusterfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone"]
    + ["fuse.juicefs", "davfs", "virtiofs", "gfs2"],
)
def test_shared_filesystem_types(fstype):
    assert fsdetect.is_shared(fstype)


@pytest.mark.parametrize(
    "fstype", ["ext4", "xfs", "btrfs", "zfs", "tmpfs", "overlay", "fuse.lxcfs", "fuse.gocryptfs", "fuseblk", "nfsd"]
)
def test_local_filesystem_types(fstype):
    assert not fsdetect.is_shared(fstype)


def _reference(path: str, text: str) -> tuple[str, str] | None:
    """The rule as issue 8 states it, line by line, for comparison with the fast scan."""

    def unescape(field: str) -> str:
        for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
            field = field.replace(code, char)
        return field

    best = None
    for line in text.splitlines():
        head, _, tail = line.partition(" - ")
        point, fstype = unescape(head.split(" ")[4]), tail.split(" ")[0]
        if path == point or path.startswith(point.rstrip("/") + "/"):
            if best is None or len(point) >= len(best[0]):
                best = (point, fstype)
    return best


NAMES = st.sampled_from(["a", "b", "ab", "x y", "t\tu", "n\nl", "b\\s", "r", "rw"])
BASE = "/wo-fsdetect-nonexistent"


def _escape(path: str) -> str:
    return path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011").replace("\n", "\\012")


@st.composite
def mount_tables(draw):
    lines = [ROOT.rstrip("\n")]
    for i in range(draw(st.integers(0, 12))):
        point = "/".join([BASE, *draw(st.lists(NAMES, max_size=3))])
        root = "/" + "/".join(draw(st.lists(NAMES, max_size=2)))
        options = draw(st.sampled_from(["rw", "ro", "rw,relatime"]))
        optional = draw(st.sampled_from(["", " shared:7", " master:1 propagate_from:2"]))
        fstype = draw(st.sampled_from(["nfs4", "ext4", "fuse.sshfs", "tmpfs", "lustre"]))
        lines.append(f"{i + 40} 22 0:{i + 90} {_escape(root)} {_escape(point)} {options}{optional} - {fstype} src rw")
    path = "/".join([BASE, *draw(st.lists(NAMES, max_size=4))])
    return "\n".join(lines) + "\n", path


@settings(max_examples=300, deadline=None)
@given(mount_tables())
def test_the_fast_scan_agrees_with_the_rule_read_line_by_line(table):
    text, path = table
    assert fsdetect.filesystem_of(path, text) == _reference(path, text)


# --- shared_mode: the override, the caches, a real sshfs mount ---------------------------------------


@pytest.fixture
def detect(tmp_path, monkeypatch):
    """``shared_mode`` reading mountinfo from a file the test writes, with its own node-local cache."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.delenv(fsdetect.ENV_VAR, raising=False)
    mountinfo = tmp_path / "mountinfo"
    monkeypatch.setattr(fsdetect, "MOUNTINFO", str(mountinfo))
    fsdetect.clear_cache()
    yield mountinfo
    fsdetect.clear_cache()


def _nfs_at(path: Path) -> str:
    return ROOT + f"95 22 0:52 / {_escape(str(path))} rw - nfs4 fs01:/home rw\n"


def test_detection_and_the_override_in_both_directions(detect, tmp_path, monkeypatch):
    nfs, local = tmp_path / "nfs", tmp_path / "local"
    nfs.mkdir()
    local.mkdir()
    detect.write_text(_nfs_at(nfs))
    assert fsdetect.shared_mode(nfs) == fsdetect.Mode(True, "mountinfo", "nfs4", str(nfs))
    assert fsdetect.shared_mode(local) == fsdetect.Mode(False, "mountinfo", "ext4", "/")
    for value in ("0", "false", "No", " off "):
        monkeypatch.setenv("WECO_OBSERVE_SHARED_FS", value)
        assert fsdetect.shared_mode(nfs) == fsdetect.Mode(False, "WECO_OBSERVE_SHARED_FS", "nfs4", str(nfs))
    for value in ("1", "TRUE", "yes", "on"):
        monkeypatch.setenv("WECO_OBSERVE_SHARED_FS", value)
        assert fsdetect.shared_mode(local) == fsdetect.Mode(True, "WECO_OBSERVE_SHARED_FS", "ext4", "/")


def test_a_bad_override_warns_once_then_detects(detect, tmp_path, monkeypatch, capsys):
    detect.write_text(_nfs_at(tmp_path))
    monkeypatch.setenv("WECO_OBSERVE_SHARED_FS", "maybe")
    assert fsdetect.shared_mode(tmp_path) == fsdetect.Mode(True, "mountinfo", "nfs4", str(tmp_path))
    assert fsdetect.shared_mode(tmp_path).shared
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "WECO_OBSERVE_SHARED_FS='maybe'" in err
    monkeypatch.setenv("WECO_OBSERVE_SHARED_FS", "")  # empty: unset, no warning
    assert fsdetect.shared_mode(tmp_path).source == "mountinfo" and capsys.readouterr().err == ""


def test_without_mountinfo_the_mode_is_unknown_and_local(detect, tmp_path):
    assert fsdetect.shared_mode(tmp_path) == fsdetect.Mode(False, "unknown", None, None)


def test_a_folder_not_made_yet_is_judged_by_its_nearest_existing_ancestor(detect, tmp_path):
    home = tmp_path / "nfs-home"
    home.mkdir()
    detect.write_text(_nfs_at(home))
    mode = fsdetect.shared_mode(home / "alice" / ".local" / "share" / "weco-observe")
    assert (mode.shared, mode.mount_point) == (True, str(home))
    assert list(fsdetect._read_cache(fsdetect._cache_file(Settings.load()))) == [
        str(home)
    ]  # the cache is keyed by the ancestor


def test_a_new_process_reads_the_node_local_cache_not_mountinfo(detect, tmp_path):
    detect.write_text(_nfs_at(tmp_path))
    first = fsdetect.shared_mode(tmp_path)
    cache = Path(fsdetect._cache_file(Settings.load()))
    assert cache.parent == tmp_path / "run" and (cache.stat().st_mode & 0o777) == 0o600
    detect.unlink()  # a process that read mountinfo now would find nothing
    assert fsdetect.shared_mode(tmp_path) == first  # this process: its own dict
    fsdetect.clear_cache()
    assert fsdetect.shared_mode(tmp_path) == first  # "another process": the cache file
    # The file is checked against the folder's st_dev and its expiry, and thrown out if either differs.
    dev = os.stat(tmp_path).st_dev
    for expires, st_dev in ((10**10, dev + 1), (1, dev)):
        cache.write_text(f"{expires}\t{st_dev}\t{tmp_path}\t{tmp_path}\tnfs4\n")
        fsdetect.clear_cache()
        assert fsdetect.shared_mode(tmp_path).source == "unknown"


def test_only_answers_that_cannot_turn_unsafe_are_cached():
    anonymous, disk = os.makedev(0, 52), os.makedev(259, 3)
    assert fsdetect._cacheable(anonymous, "nfs4") and fsdetect._cacheable(disk, "gfs2")
    assert fsdetect._cacheable(disk, "ext4")
    # tmpfs, overlay, btrfs...: their st_dev may be handed to an NFS mount at the same place next
    assert not fsdetect._cacheable(anonymous, "tmpfs")


def test_a_cache_folder_others_can_write_is_never_trusted(detect, tmp_path, monkeypatch):
    open_folder = tmp_path / "open"
    open_folder.mkdir()
    open_folder.chmod(0o777)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(open_folder))
    namespace = os.readlink("/proc/self/ns/mnt").strip("mnt:[]")
    # Planted by another user: "this NFS folder is a local disk" (so the journal would use WAL).
    (open_folder / f"weco-observe-fs-{namespace}.tsv").write_text(
        f"{10**10}\t{os.stat(tmp_path).st_dev}\t{tmp_path}\t/\text4\n"
    )
    detect.write_text(_nfs_at(tmp_path))
    assert fsdetect.shared_mode(tmp_path).shared
    assert Path(fsdetect._cache_file(Settings.load())).parent == tmp_path / "tmp" / f"weco-observe-{os.getuid()}"


def test_a_real_sshfs_mount_is_shared_and_its_backing_folder_is_not(two_hosts, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv(fsdetect.ENV_VAR, raising=False)
    fsdetect.clear_cache()
    try:
        journal_dir = two_hosts.mount_a / "weco-data"  # not made yet, as on a first `init`
        assert fsdetect.shared_mode(journal_dir) == fsdetect.Mode(
            True, "mountinfo", "fuse.sshfs", str(two_hosts.mount_a)
        )
        assert not fsdetect.shared_mode(two_hosts.backing).shared
    finally:
        fsdetect.clear_cache()
