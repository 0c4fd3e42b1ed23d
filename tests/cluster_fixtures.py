"""Fixtures for tests that need a real shared filesystem or a real second Unix user.

Use from any test module (``tests/`` is on ``sys.path`` under pytest)::

    from cluster_fixtures import second_user, two_hosts  # noqa: F401

    def test_something(two_hosts, second_user):
        (two_hosts.mount_a / "f").write_text("x")          # "host A"
        assert (two_hosts.mount_b / "f").read_text() == "x"  # "host B"
        reader = two_hosts.extra_mount()                    # a third host
        done = second_user.cli("observe", "status")          # as another user, clean env

``two_hosts`` is a :class:`sshfs_hosts.Hosts`: ``.backing`` (the real folder),
``.mount_a``, ``.mount_b`` and ``.extra_mount()``, fresh for each test (about
0.3 s a mount). One sshd serves the whole session; it is stopped when pytest
ends. See ``sshfs_hosts.py`` for what the mounts model and their cache options.

``second_user`` is an :class:`OtherUser`, created for the test and deleted after it.

Without FUSE, sshfs, sshd, root or useradd these skip with the reason, unless
``WECO_OBSERVE_REQUIRE_CLUSTER=1`` (CI) makes that a failure, as
``WECO_OBSERVE_REQUIRE_BROWSER=1`` does for the browser tests.
"""

from __future__ import annotations

import importlib.metadata
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import pytest
from sshfs_hosts import Hosts, SshServer, Unavailable

REPO = Path(__file__).resolve().parents[1]
REQUIRE_ENV = "WECO_OBSERVE_REQUIRE_CLUSTER"

_server_key = pytest.StashKey["SshServer | Unavailable"]()
_libs_key = pytest.StashKey[Path]()
_python_key = pytest.StashKey[str]()


def unavailable(reason: str) -> NoReturn:
    """Skip the test because the machine lacks something; fail instead when CI requires it."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1 requires it)")
    pytest.skip(reason)


def _session_server(config: pytest.Config) -> SshServer:
    """One sshd for the whole session, stopped when pytest ends; a failure to start is remembered, not retried."""
    found = config.stash.get(_server_key, None)
    if found is None:
        workdir = Path(tempfile.mkdtemp(prefix="weco-observe-sshd-"))
        server = SshServer(workdir)
        config.add_cleanup(lambda: shutil.rmtree(workdir, ignore_errors=True))
        config.add_cleanup(server.stop)  # cleanups run last-in first-out: sshd stops, then its folder goes
        try:
            found = server.start()
        except Unavailable as exc:
            found = exc
        config.stash[_server_key] = found
    if isinstance(found, Unavailable):
        raise found
    return found


@pytest.fixture
def two_hosts(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Hosts]:
    try:
        server = _session_server(request.config)
    except Unavailable as exc:
        unavailable(str(exc))
    # Not under tmp_path: that is 0700 root, and a test may hand a mount to another user.
    root = Path(tempfile.mkdtemp(prefix="weco-observe-hosts-"))
    try:
        hosts = Hosts(server, root)
    except Unavailable as exc:
        shutil.rmtree(root, ignore_errors=True)
        unavailable(str(exc))
    try:
        yield hosts
    finally:
        hosts.close()


class OtherUser:
    """A second Unix user that exists for one test.

    How it runs our code: root's interpreter usually lives under ``/root`` (mode
    0700, e.g. pyenv) and the editable install points at a checkout the user may
    not reach, so neither is used. Once per session, ``weco_observe`` (from this
    checkout) and the pure-Python distributions it needs (read from
    ``importlib.metadata``) are copied to a world-readable temp dir that becomes
    the user's ``PYTHONPATH``; the interpreter is the first of ours, the system's
    ``python3.X`` (same X) or ``python3`` that the user can run and that imports
    ``weco_observe.cli`` from there. Each command gets a clean environment made here,
    never the test's: HOME, PATH, PYTHONPATH, TMPDIR (``~/tmp``), WECO_OBSERVE_DIR
    (``~/weco-data``), LANG, and what the caller adds.
    """

    def __init__(self, name: str, libs: Path):
        entry = pwd.getpwnam(name)
        self.name = name
        self.uid = entry.pw_uid
        self.gid = entry.pw_gid
        self.home = Path(entry.pw_dir)
        self.libs = libs
        self.tmp = self.home / "tmp"
        self.tmp.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.tmp, self.uid, self.gid)
        self.python = ""

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "PYTHONPATH": str(self.libs),
            "PYTHONDONTWRITEBYTECODE": "1",
            "TMPDIR": str(self.tmp),
            "WECO_OBSERVE_DIR": str(self.home / "weco-data"),
            "WECO_OBSERVE_AUTO_SYNC": "0",
            "LANG": "C.UTF-8",
        }
        env.update(extra)
        return env

    def run(
        self,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        input: str | None = None,
        timeout: float = 60,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as this user with ``self.env(**env)``; a timeout kills its whole process group."""
        full = [f"{k}={v}" for k, v in self.env(**(env or {})).items()]
        command = ["runuser", "-u", self.name, "--", "/usr/bin/env", "-i", *full, *argv]
        process = subprocess.Popen(
            command,
            cwd=cwd or self.home,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, so nothing it started outlives a timeout
        )
        try:
            out, err = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            raise AssertionError(f"{argv} as {self.name} timed out after {timeout} s: {err}") from None
        return subprocess.CompletedProcess(command, process.returncode, out, err)

    def cli(self, *args: str, **kw) -> subprocess.CompletedProcess[str]:
        """``python -m weco_observe ARGS`` as this user."""
        return self.run([self.python, "-m", "weco_observe", *args], **kw)


def _distributions(root: str) -> list[importlib.metadata.Distribution]:
    """``root`` and every distribution it needs here (markers evaluated for this interpreter)."""
    from packaging.requirements import Requirement  # pytest depends on packaging

    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = [root]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        dist = importlib.metadata.distribution(name)
        seen[name] = dist
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return list(seen.values())


def _readable_libs(config: pytest.Config) -> Path:
    """A world-readable copy of weco_observe and its dependencies, made once per session."""
    libs = config.stash.get(_libs_key, None)
    if libs is not None:
        return libs
    libs = Path(tempfile.mkdtemp(prefix="weco-observe-pylibs-"))
    config.add_cleanup(lambda: shutil.rmtree(libs, ignore_errors=True))
    libs.chmod(0o755)
    ignore = shutil.ignore_patterns("__pycache__")
    for dist in _distributions("weco-observe"):
        if re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower() == "weco-observe":
            continue  # taken from this checkout below, whatever kind of install points where
        tops = {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".." and not f.name.endswith(".pth")}
        for top in tops:
            source = Path(str(dist.locate_file(top)))
            if source.is_dir():
                shutil.copytree(source, libs / top, ignore=ignore, dirs_exist_ok=True)
            elif source.is_file():
                shutil.copy2(source, libs / top)
    shutil.copytree(REPO / "weco_observe", libs / "weco_observe", ignore=ignore)
    config.stash[_libs_key] = libs
    return libs


def _python_for(user: OtherUser, config: pytest.Config) -> str | None:
    """An interpreter ``user`` can run that imports ``weco_observe.cli`` from the copy (found once a session)."""
    if _python_key in config.stash:
        return config.stash[_python_key]
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [os.path.realpath(sys.executable), f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"]
    for python in dict.fromkeys([*candidates, "/usr/bin/python3"]):
        if os.path.exists(python) and user.run([python, "-c", "import weco_observe.cli"]).returncode == 0:
            config.stash[_python_key] = python
            return python
    return None


@pytest.fixture
def second_user(request: pytest.FixtureRequest) -> Iterator[OtherUser]:
    if os.geteuid() != 0:
        unavailable("a second Unix user needs root (useradd)")
    for tool in ("useradd", "userdel", "runuser"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is not installed (apt-get install passwd util-linux)")
    libs = _readable_libs(request.config)
    name = f"wo-test-{secrets.token_hex(4)}"
    made = subprocess.run(
        ["useradd", "--create-home", "--user-group", "--shell", "/bin/sh", name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if made.returncode != 0:
        unavailable(f"useradd {name} failed: {made.stderr.strip()}")
    try:
        user = OtherUser(name, libs)
        python = _python_for(user, request.config)
        if python is None:
            unavailable(f"no Python that {name} can run imports weco_observe from {libs}")
        user.python = python
        yield user
    finally:
        gone = subprocess.run(["userdel", "-r", name], capture_output=True, text=True, timeout=60)
        # Exit 12: the home dir could not be removed; with no mail spool userdel only warns.
        assert gone.returncode == 0, f"userdel -r {name} exited {gone.returncode}: {gone.stderr}"
