"""Two "hosts" sharing one folder, on one machine: an sshd on 127.0.0.1 and sshfs mounts of one folder.

Each sshfs mount is its own FUSE filesystem: its own page cache, its own attribute
cache and its own lock domain (``flock``/``fcntl`` locks taken through one mount
are invisible through another, because sshfs does not forward locks: the kernel
keeps them per mount). That is what two NFS clients mounted with ``nolock`` look
like, the common case on HPC clusters, and the model issue 8's cluster mode must
be safe under. Used by the pytest fixtures in ``cluster_fixtures.py`` and by
``benchmarks/repro_shared_fs.py``; plain Python, no pytest.

Caching. Each mount has its own page cache, dropped at every ``open`` (sshfs
sets neither ``kernel_cache`` nor ``auto_cache``), with writes sent to the server
by ``close``/``fsync``: close-to-open consistency, as NFS. Metadata is where
the options differ. Measured here (sshfs 3.7.3, FUSE 7.31): what a reader on
mount B sees after a writer on mount A closed the file, B having looked before:

======================================  ===============  ==============  =======================
                                        NO_DIR_CACHE     SSHFS_DEFAULTS  NFS, default mount
======================================  ===============  ==============  =======================
open + read                             new data         new data        new data (close-to-open)
``stat`` size of a file that grew       <= 1 s old       ~20 s old       acregmin-max, 3-60 s
a new file in a listing                 at once          ~20 s late      acdirmin-max, 30-60 s
a deleted file still found              <= 1 s           ~20 s           until revalidated
======================================  ===============  ==============  =======================

The mounts use :data:`NO_DIR_CACHE` unless told otherwise: tests that check
"everything is visible now" stay fast and exact, and the data semantics (page
cache, close-to-open, locks) are NFS's. Its metadata is fresher than NFS's, so
a design must not count on that: test listing lag with :data:`SSHFS_DEFAULTS`,
whose ~20 s is of the order of NFS's ``acdirmin``.

Usage::

    with SshServer(workdir).start() as server, Hosts(server, workdir / "cluster") as hosts:
        (hosts.mount_a / "f").write_text("x")
        reader = hosts.extra_mount()

Every wait is bounded. Every process is started here and stopped here by its PID.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

SSHD = "/usr/sbin/sshd"  # sshd re-executes itself, so it must be started by its absolute path
#: No sshfs cache of names and attributes: only the kernel's 1 s (see the module docstring).
NO_DIR_CACHE: tuple[str, ...] = ("dir_cache=no",)
#: sshfs as it comes: names and attributes cached 20 s, a listing lags like an NFS client's.
SSHFS_DEFAULTS: tuple[str, ...] = ()
START_TIMEOUT = 15.0  # seconds for sshd to answer, or a mount to appear
STOP_TIMEOUT = 10.0


class Unavailable(RuntimeError):
    """Something this set-up needs is missing; the message says what and how to get it."""


def missing() -> list[str]:
    """What this machine lacks for the set-up (empty when everything is there)."""
    out = []
    if not os.path.exists("/dev/fuse"):
        out.append("/dev/fuse (FUSE is not available here)")
    tools = [tool for tool in ("sshfs", "fusermount", "ssh-keygen", "ssh") if shutil.which(tool) is None]
    if tools:
        out.append(f"{', '.join(tools)} (apt-get install sshfs openssh-client)")
    if not os.access(SSHD, os.X_OK):
        out.append(f"{SSHD} (apt-get install openssh-server)")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        out.append("root (sshd serves the backing folder as root)")
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_mounted(path: Path) -> bool:
    # os.path.ismount compares st_dev with the parent's, which stats through a mount that
    # may be hung; mountinfo does not touch it.
    escaped = str(path).replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011").replace("\n", "\\012")
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return any(line.split(" ", 5)[4] == escaped for line in f if line.count(" ") >= 5)


class SshServer:
    """An sshd on 127.0.0.1 and a free port, with its own host key and one authorised client key for root."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.key = self.workdir / "client_key"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> SshServer:
        lacking = missing()
        if lacking:
            raise Unavailable("missing: " + "; ".join(lacking))
        self.workdir.mkdir(parents=True, exist_ok=True)
        for name in ("host_key", "client_key"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.workdir / name)],
                check=True,
                timeout=30,
                stdin=subprocess.DEVNULL,
            )
        shutil.copy(self.workdir / "client_key.pub", self.workdir / "authorized_keys")
        # sshd refuses to start without its privilege-separation directory, which the
        # package's service unit creates at boot. It is left in place: another sshd
        # (a concurrent test run) may be using it.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        log = open(self.workdir / "sshd.log", "ab")
        try:
            for _attempt in range(5):  # the free port can be taken between probing and binding it
                self.port = _free_port()
                config = self._write_config()
                self.process = subprocess.Popen(
                    [SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log, stdin=subprocess.DEVNULL
                )
                if self._wait_ready():
                    return self
                self._stop_process()
        finally:
            log.close()
        raise Unavailable(f"sshd did not start; its log:\n{(self.workdir / 'sshd.log').read_text(errors='replace')}")

    def _write_config(self) -> Path:
        config = self.workdir / "sshd_config"
        w = self.workdir
        config.write_text(
            f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {w / 'host_key'}\n"
            f"PidFile {w / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {w / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            # The key files live in a temp dir whose parents sshd would judge too open.
            "StrictModes no\n"
            "Subsystem sftp internal-sftp\n"
            "MaxStartups 100:30:200\n"  # a test opens many connections at once
            "LogLevel ERROR\n"
        )
        return config

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        for _ in range(300):
            if self.process is None or self.process.poll() is not None or time.monotonic() > deadline:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def _stop_process(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        self.process = None

    def stop(self) -> None:
        """Stop sshd (its sessions end with their sshfs clients, which the Hosts unmount first)."""
        self._stop_process()

    def __enter__(self) -> SshServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def mount(self, remote: Path, mount_point: Path, options: Sequence[str] = NO_DIR_CACHE) -> Mount:
        """sshfs ``remote`` (a folder on this machine) at ``mount_point``, as one more host would."""
        mount_point.mkdir(parents=True, exist_ok=True)
        opts = [
            f"port={self.port}",
            f"IdentityFile={self.key}",
            "IdentitiesOnly=yes",
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
            "BatchMode=yes",
            "ConnectTimeout=10",
            "LogLevel=ERROR",
            *options,
        ]
        log = open(mount_point.parent / f"sshfs-{mount_point.name}.log", "ab")
        try:
            # -f: sshfs stays our child, so it is stopped by its PID if unmounting fails.
            process = subprocess.Popen(
                ["sshfs", "-f", "-F", "/dev/null", "-o", ",".join(opts), f"root@127.0.0.1:{remote}", str(mount_point)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        mount = Mount(mount_point, process)
        deadline = time.monotonic() + START_TIMEOUT
        for _ in range(600):
            if _is_mounted(mount_point):
                return mount
            if process.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.025)
        mount.unmount()
        text = (mount_point.parent / f"sshfs-{mount_point.name}.log").read_text(errors="replace")
        raise Unavailable(f"sshfs did not mount {mount_point} within {START_TIMEOUT:.0f} s: {text.strip()}")


class Mount:
    """One sshfs mount and the sshfs process serving it."""

    def __init__(self, path: Path, process: subprocess.Popen[bytes]):
        self.path = path
        self.process = process

    def unmount(self) -> None:
        """Unmount, lazily if a file is still open through it, and make sure sshfs has exited."""
        lazy = False
        for flags in ("-u", "-uz"):
            if not _is_mounted(self.path):
                break
            lazy = flags == "-uz"
            subprocess.run(["fusermount", flags, str(self.path)], capture_output=True, timeout=STOP_TIMEOUT)
        if lazy and self.process.poll() is None:
            # Detached but still serving the open files, which it would do until they are closed:
            # stop it, and those files fail with ENOTCONN, as on a crashed client.
            self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)
        if _is_mounted(self.path):
            subprocess.run(["fusermount", "-uz", str(self.path)], capture_output=True, timeout=STOP_TIMEOUT)


class Hosts:
    """A backing folder (``backing``) and two mounts of it (``mount_a``, ``mount_b``), one per "host".

    ``extra_mount()`` adds another (a reader on a third host). ``close()`` unmounts
    them all and removes the folders; it is safe to call twice.
    """

    def __init__(self, server: SshServer, root: Path, options: Sequence[str] = NO_DIR_CACHE):
        self.server = server
        self.root = Path(root)
        self.options = tuple(options)
        self.mounts: list[Mount] = []
        self.root.mkdir(parents=True, exist_ok=True)
        self.backing = self.root / "backing"
        self.backing.mkdir(exist_ok=True)
        try:
            self.mount_a = self.extra_mount("a")
            self.mount_b = self.extra_mount("b")
        except BaseException:
            self.close()
            raise

    def extra_mount(self, name: str | None = None) -> Path:
        """One more mount of the backing folder, with its own caches and locks; returns its path."""
        point = self.root / "mounts" / (name or f"m{len(self.mounts)}")
        self.mounts.append(self.server.mount(self.backing, point, self.options))
        return point

    def close(self) -> None:
        for mount in reversed(self.mounts):
            mount.unmount()
        mounted = [m.path for m in self.mounts if _is_mounted(m.path)]
        self.mounts.clear()
        # rmtree through a live mount would walk into the backing folder over ssh; never do it.
        if not mounted:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TwoHosts:
    """An sshd and a :class:`Hosts` of its own, in a temp dir: for scripts (``with TwoHosts() as hosts``)."""

    def __init__(self, options: Sequence[str] = NO_DIR_CACHE, parent: str | None = None):
        self.options = options
        self.parent = parent

    def __enter__(self) -> Hosts:
        self.workdir = Path(tempfile.mkdtemp(prefix="weco-observe-hosts-", dir=self.parent))
        self.server = SshServer(self.workdir / "sshd")
        try:
            self.server.start()
            self.hosts = Hosts(self.server, self.workdir / "cluster", self.options)
        except BaseException:
            self.server.stop()
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        return self.hosts

    def __exit__(self, *exc: object) -> None:
        try:
            self.hosts.close()
        finally:
            self.server.stop()
            if not self.hosts.root.exists():  # Hosts.close keeps its folder only while a mount is stuck in it
                shutil.rmtree(self.workdir, ignore_errors=True)
