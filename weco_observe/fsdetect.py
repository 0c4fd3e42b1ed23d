"""Where the journal stands: on a disk of this host, or on a filesystem other hosts share.

SQLite's WAL needs shared memory that one host cannot share with another, and its
fcntl locks are unreliable (often local to each client) on NFS, Lustre, CIFS,
sshfs and the like. So before the journal is opened, the writer asks
:func:`shared_mode` which mode to use.

The answer comes from ``/proc/self/mountinfo`` (not ``/proc/mounts``: mountinfo
is per mount namespace and its format separates the optional fields from the
filesystem type with `` - ``, so containers and bind mounts read right).
``os.statvfs`` does not tell the type, and ``statfs(2)``'s magic numbers would
need ctypes, which costs more to import than reading mountinfo.

``WECO_OBSERVE_SHARED_FS=1`` (or ``0``) overrides the detection, for filesystems
that hide what they are (a FUSE client under an unknown name, a local-looking
block device that several hosts mount). It is read at every call.

This module is on the hot path of ``weco observe log``, so it imports only ``os``,
``stat``, ``sys`` and ``time``, and remembers its answers. The kernel writes
mountinfo at about 3 us a mount: ~100 us on a laptop, 6.5 ms on a node with
2,000 mounts, for every ``log`` process. So besides a per-process dict, answers
go to a small node-local cache file (one per user and mount namespace), checked
against the directory's ``st_dev`` and trusted for ten minutes; only answers that
cannot turn unsafe when stale are written there (see ``_cacheable``). A lookup
through it costs ~50 us whatever the number of mounts.

>>> info = "27 1 254:0 / / rw - ext4 /dev/vda rw\\n90 27 0:50 / /home rw - nfs4 fs01:/home rw\\n"
>>> filesystem_of("/home/me/.local/share/weco-observe", info)
('/home', 'nfs4')
>>> is_shared("nfs4"), is_shared("ext4")
(True, False)
"""

from __future__ import annotations

import os
import stat
import sys
import time

from .settings import Settings

__all__ = ["ENV_VAR", "NETWORK_FILESYSTEMS", "Mode", "clear_cache", "filesystem_of", "is_shared", "shared_mode"]

ENV_VAR = "WECO_OBSERVE_SHARED_FS"
MOUNTINFO = "/proc/self/mountinfo"

#: Filesystem types (as mountinfo names them) that several hosts mount at once, or that
#: reach storage over a network: SQLite's WAL and its fcntl locks are not safe there.
NETWORK_FILESYSTEMS = frozenset(
    {
        # NFS, and the other classic network filesystems
        "nfs",
        "nfs4",
        "cifs",
        "smb",
        "smb3",
        "smbfs",
        "ncpfs",
        "afs",
        "coda",
        "9p",  # QEMU/WSL2 host folders
        "virtiofs",
        "vboxsf",
        "davfs",
        # cluster and parallel filesystems
        "lustre",
        "gpfs",
        "beegfs",
        "fhgfs",  # BeeGFS's old name
        "ceph",
        "cephfs",
        "glusterfs",
        "panfs",
        "wekafs",
        "orangefs",
        "pvfs2",
        "quobyte",
        "gfs2",  # several hosts on one block device, coordinated by a DLM
        "ocfs2",
        # FUSE clients of network storage: FUSE reports "fuse.<program>"
        "sshfs",
        "fuse.sshfs",
        "fuse.ceph",
        "fuse.ceph-fuse",
        "fuse.glusterfs",
        "fuse.s3fs",
        "fuse.gcsfuse",
        "fuse.goofys",
        "fuse.mountpoint-s3",
        "fuse.blobfuse",
        "fuse.blobfuse2",
        "fuse.juicefs",
        "fuse.rclone",
        "fuse.davfs2",
        "fuse.curlftpfs",
        "fuse.mfs",  # MooseFS
        "fuse.lizardfs",
        "fuse.seaweedfs",
        "fuse.quobyte",
        "fuse.xtreemfs",
        "fuse.alluxio-fuse",
        "fuse.vmhgfs-fuse",  # VMware host folders
    }
)
#: Families whose members multiply (nfs3, smb2, fuse.ceph-fuse-v2, ...). Not "nfsd": that
#: is the NFS *server*'s control filesystem, never where a journal lives.
_SHARED_PREFIXES = ("nfs", "smb", "fuse.ceph", "fuse.gluster", "fuse.sshfs", "fuse.rclone", "fuse.juicefs")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class Mode:
    """Which journal mode a directory needs, and what decided it.

    ``source`` is ``"mountinfo"`` (detected), ``"WECO_OBSERVE_SHARED_FS"`` (the
    override decided; ``fstype`` and ``mount_point`` still say what detection saw)
    or ``"unknown"`` (no mountinfo to read, as on macOS: treated as local, as before).
    A plain class: a NamedTuple costs 0.2 ms to define, on every ``weco observe log``.
    """

    __slots__ = ("shared", "source", "fstype", "mount_point")

    def __init__(self, shared: bool, source: str, fstype: str | None, mount_point: str | None) -> None:
        self.shared = shared
        self.source = source
        self.fstype = fstype
        self.mount_point = mount_point

    def __repr__(self) -> str:
        fields = f"shared={self.shared!r}, source={self.source!r}, fstype={self.fstype!r}"
        return f"Mode({fields}, mount_point={self.mount_point!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mode):
            return NotImplemented
        return (self.shared, self.source, self.fstype, self.mount_point) == (
            other.shared,
            other.source,
            other.fstype,
            other.mount_point,
        )

    __hash__ = None  # type: ignore[assignment]


def is_shared(fstype: str) -> bool:
    """Whether a filesystem type (as in mountinfo) is shared between hosts or network-backed.

    An unknown ``fuse.*`` type counts as local: most FUSE filesystems (lxcfs,
    bindfs, gocryptfs, squashfuse, ...) are; ``WECO_OBSERVE_SHARED_FS=1`` is there
    for the network ones this list misses.

    >>> [is_shared(t) for t in ("lustre", "fuse.sshfs", "fuse.lxcfs", "nfsd", "tmpfs")]
    [True, True, False, False, False]
    """
    if fstype in NETWORK_FILESYSTEMS:
        return True
    return fstype.startswith(_SHARED_PREFIXES) and fstype != "nfsd"


def _escape(path: str) -> str:
    # The kernel writes mount points with space, tab, newline and backslash as octal
    # escapes. Escaping the path the same way lets every line be compared as it stands
    # (the escapes form a prefix code, so "is a prefix of" survives it) and leaves
    # only the winning line to unescape.
    if "\\" in path:
        path = path.replace("\\", "\\134")
    return path.replace(" ", "\\040").replace("\t", "\\011").replace("\n", "\\012")


def _unescape(field: str) -> str:
    if "\\" not in field:
        return field
    out = []
    i = 0
    while i < len(field):
        octal = field[i + 1 : i + 4]
        if field[i] == "\\" and len(octal) == 3 and all(c in "01234567" for c in octal):
            out.append(chr(int(octal, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _read_mountinfo() -> str | None:
    try:
        with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError:
        return None


def filesystem_of(path: str | os.PathLike[str], mountinfo_text: str | None = None) -> tuple[str, str] | None:
    """The ``(mount point, filesystem type)`` that holds ``path``; None if that cannot be told.

    ``mountinfo_text`` defaults to this process's ``/proc/self/mountinfo``. Lines in
    ``/proc/mounts`` format are understood too, so older callers can pass that.
    Symlinks are resolved first. A path that does not exist yet is resolved as far
    as it exists: mount points are existing directories, so the mount that holds
    its nearest existing ancestor is the one that will hold it.

    >>> info = "27 1 254:0 / / rw - ext4 /dev/vda rw\\n60 27 0:44 / /mnt/my\\\\040share rw - cifs //nas/s rw\\n"
    >>> filesystem_of("/mnt/my share/run/j.db", info)
    ('/mnt/my share', 'cifs')
    """
    # realpath (non-strict) resolves symlinks in the part that exists and keeps the rest;
    # it also stats each component, which triggers an automount before mountinfo is read.
    target = _escape(os.path.realpath(path))
    text = _read_mountinfo() if mountinfo_text is None else mountinfo_text
    if text is None:
        return None
    first_line = text[: text.find("\n")]
    found = _scan_mountinfo(target, text) if " - " in first_line else _scan_mounts(target, text)
    if found is None:
        return None
    return _unescape(found[0]), _unescape(found[1])


def _scan_mountinfo(target: str, text: str) -> tuple[str, str] | None:
    """The deepest mount point that is ``target`` or one of its ancestors, with its type (both escaped).

    Splitting 2,000 lines costs over 2 ms, so instead each ancestor, deepest first,
    is searched for as a whole field followed by the mount options, which always
    start with "rw" or "ro" (for "/", most lines would match without the "r": it is
    also the usual root field). Only the few hits are parsed, and the parse decides:
    ``id parent major:minor root MOUNT_POINT options [optional...] - TYPE source super``.
    """
    point = target
    while True:
        needle = f" {point} r"
        fstype = None
        hit = text.find(needle)
        while hit != -1:
            start = text.rfind("\n", 0, hit) + 1
            end = text.find("\n", hit)
            if end == -1:
                end = len(text)
            head, sep, tail = text[start:end].partition(" - ")
            fields = head.split(" ", 5)
            if sep and len(fields) >= 5 and fields[4] == point:
                fstype = tail.split(" ", 1)[0]  # and keep looking: a later mount over the same point wins
            hit = text.find(needle, end)
        if fstype is not None:
            return point, fstype
        if point == "/":
            return None
        point = point.rsplit("/", 1)[0] or "/"


def _scan_mounts(target: str, text: str) -> tuple[str, str] | None:
    """The same, over ``/proc/mounts`` text: ``source MOUNT_POINT TYPE options dump pass`` (doctor passes it)."""
    best: tuple[str, str] | None = None
    for line in text.splitlines():
        fields = line.split(None, 3)
        if len(fields) < 3:
            continue
        point = fields[1]
        inside = target == point or target.startswith(point if point.endswith("/") else point + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fields[2])  # ">=": a later mount over the same point wins
    return best


def _override(raw: str | None) -> bool | None:
    if raw is None or not raw.strip():
        return None
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    if value not in _warned:
        _warned.add(value)
        print(f"weco-observe: ignoring {ENV_VAR}={raw!r} (use 1 or 0); detecting the filesystem", file=sys.stderr)
    return None


_detected: dict[str, tuple[str, str] | None] = {}
_warned: set[str] = set()

#: How long a node-local cache entry is trusted (``_cacheable`` says which answers are cached at all).
CACHE_SECONDS = 600


def shared_mode(journal_dir: str | os.PathLike[str], settings: Settings | None = None) -> Mode:
    """The mode ``journal_dir`` needs: shared when it sits on a filesystem other hosts mount.

    The override (``$WECO_OBSERVE_SHARED_FS``, through ``settings``, loaded now when
    not given) is read at every call, so a test or a user can change it at any time.
    Detection is remembered per directory for the life of the process, and in a
    small node-local cache file for the next processes.

    >>> mode = shared_mode(".")
    >>> mode.source in ("mountinfo", ENV_VAR, "unknown") and isinstance(mode.shared, bool)
    True
    """
    settings = settings or Settings.load()
    key = os.fspath(journal_dir)
    try:
        found = _detected[key]
    except KeyError:
        found = _detected[key] = _detect(key, settings)
    point, fstype = found if found is not None else (None, None)
    forced = _override(settings.shared_fs_raw)
    if forced is not None:
        return Mode(forced, ENV_VAR, fstype, point)
    if fstype is None:
        return Mode(False, "unknown", None, None)
    return Mode(is_shared(fstype), "mountinfo", fstype, point)


def clear_cache() -> None:
    """Forget, in this process, what was detected and which bad override values were warned about."""
    _detected.clear()
    _warned.clear()


def _detect(journal_dir: str, settings: Settings) -> tuple[str, str] | None:
    # The kernel writes mountinfo at ~3 us a mount: 6.5 ms for a node with 2,000 mounts,
    # paid by every `weco observe log` process. Hence the cache file, checked against
    # the st_dev of the directory's nearest existing ancestor.
    anchor = os.path.realpath(journal_dir)
    while True:
        try:
            dev = os.stat(anchor).st_dev
            break
        except OSError:
            parent = os.path.dirname(anchor)
            if parent == anchor:
                return filesystem_of(anchor)
            anchor = parent
    cache = _cache_file(settings)
    entries = _read_cache(cache) if cache else {}
    now = int(time.time())
    hit = entries.get(_escape(anchor))
    if hit is not None and hit[0] > now and hit[1] == dev:
        return _unescape(hit[2]), _unescape(hit[3])
    found = filesystem_of(anchor)
    if cache and found is not None and _cacheable(dev, found[1]):
        entries[_escape(anchor)] = (now + CACHE_SECONDS, dev, _escape(found[0]), _escape(found[1]))
        _write_cache(cache, {k: v for k, v in entries.items() if v[0] > now})
    return found


def _cacheable(dev: int, fstype: str) -> bool:
    """Whether an answer may be cached. A shared answer may: if it goes stale, the journal
    is only slower than it need be. A local answer may only on a block device, whose
    st_dev names one disk partition. Anonymous devices (major 0: tmpfs, overlay, btrfs,
    FUSE, NFS...) get their numbers from a pool the kernel reuses at once, so after a
    per-job tmpfs scratch is swapped for an NFS mount at the same place, the same
    st_dev could wrongly keep saying "local"."""
    return is_shared(fstype) or os.major(dev) != 0


def _cache_file(settings: Settings) -> str | None:
    """This user's node-local cache, one per mount namespace (containers see other mounts), or None.

    Under ``$XDG_RUNTIME_DIR`` or else ``$TMPDIR``, in a folder only this user can
    write: another user who could plant entries could make a journal on NFS use WAL.
    """
    try:
        namespace = os.readlink("/proc/self/ns/mnt").strip("mnt:[]")
    except OSError:
        return None
    uid = os.getuid()
    folders = [str(settings.runtime_dir)] if settings.runtime_dir else []
    folders.append(os.path.join(settings.temp_dir, f"weco-observe-{uid}"))
    for folder in folders:
        try:
            st = os.lstat(folder)
        except FileNotFoundError:
            try:
                os.mkdir(folder, 0o700)
                st = os.lstat(folder)
            except OSError:
                continue
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not st.st_mode & 0o022:
            return os.path.join(folder, f"weco-observe-fs-{namespace}.tsv")
    return None


def _read_cache(cache: str) -> dict[str, tuple[int, int, str, str]]:
    """``{escaped dir: (expires, st_dev, escaped mount point, escaped type)}``; empty when unreadable."""
    entries: dict[str, tuple[int, int, str, str]] = {}
    try:
        fd = os.open(cache, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return entries
    try:  # os.read, not open(): a text file object costs more than the rest of the lookup
        if os.fstat(fd).st_uid != os.getuid():
            return entries
        text = os.read(fd, 65536).decode("utf-8", "surrogateescape")
    except OSError:
        return entries
    finally:
        os.close(fd)
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) == 5 and fields[0].isdigit() and fields[1].isdigit():
            entries[fields[2]] = (int(fields[0]), int(fields[1]), fields[3], fields[4])
    return entries


def _write_cache(cache: str, entries: dict[str, tuple[int, int, str, str]]) -> None:
    # Escaped fields hold no tab or newline. Written whole and renamed into place, so a
    # reader sees the old file or the new one; when writers race, one of them wins.
    text = "".join(f"{e}\t{d}\t{k}\t{p}\t{t}\n" for k, (e, d, p, t) in entries.items())
    tmp = f"{cache}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, text.encode("utf-8", "surrogateescape"))
        finally:
            os.close(fd)
        os.replace(tmp, cache)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
