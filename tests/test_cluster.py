"""Two hosts on one shared folder lose nothing: cluster mode through real sshfs mounts (issue 8).

Each "host" is an sshfs mount of one backing folder (its own page cache,
attribute cache and lock domain, as an NFS client; see ``sshfs_hosts.py``), and
its processes run in a UTS namespace of their own (``unshare --uts``) under its
own host name. So segment files carry the writer's host, and the same-host
shortcuts of the code (a dead pid means a dead owner, a dead writer's ``.open``
file is finished) apply only where they would on a cluster: a process on
``host-b`` cannot ask about a pid of ``host-a``. Each host also has its own HOME
and TMPDIR on the local disk (the node-local mode cache lives there).

The journal folder is ``<mount>/weco-data``; no test sets
``WECO_OBSERVE_SHARED_FS`` unless it tests the override: the mode comes from
mountinfo. Every process is started here and stopped in teardown by its pid;
every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cluster_fixtures import two_hosts, unavailable  # noqa: F401
from emulator_fixtures import assert_server_matches_journal, emulator  # noqa: F401
from sshfs_hosts import SSHFS_DEFAULTS, Hosts

from weco_observe.ownerlock import OwnerLock

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 120.0  # seconds for any one process; a test fails rather than hang


# -- hosts -----------------------------------------------------------------------------------


_uts: list[str | None] = []


def _uts_problem() -> str | None:
    """Why processes cannot get a host name of their own here (None: they can)."""
    if not _uts:
        try:
            done = subprocess.run(
                ["unshare", "--uts", "sh", "-c", "hostname weco-probe && hostname"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            ok = done.returncode == 0 and done.stdout.strip() == "weco-probe"
            _uts.append(None if ok else f"unshare --uts failed: {done.stderr.strip()}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            _uts.append(f"unshare --uts failed: {exc}")
    return _uts[0]


class Procs:
    """Every process a test starts, so teardown can stop the ones still running (by pid)."""

    def __init__(self) -> None:
        self.all: list[subprocess.Popen[str]] = []
        self.killed: set[int] = set()
        self._lock = threading.Lock()

    def add(self, process: subprocess.Popen[str]) -> subprocess.Popen[str]:
        with self._lock:
            self.all.append(process)
        return process

    def kill(self, process: subprocess.Popen[str]) -> bool:
        """SIGKILL ``process`` if it still runs; True if the signal was sent (its exit is ours, not a crash)."""
        with self._lock:
            if process.poll() is not None:
                return False
            self.killed.add(process.pid)
            process.send_signal(signal.SIGKILL)
            return True

    def stop_all(self) -> None:
        for process in self.all:
            if process.poll() is None:
                process.kill()
        for process in self.all:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                pass
            for pipe in (process.stdin, process.stdout, process.stderr):
                try:
                    if pipe is not None:
                        pipe.close()
                except OSError:
                    pass


@pytest.fixture
def procs(two_hosts) -> Iterator[Procs]:  # noqa: F811 - after the mounts, so it is torn down before them
    started = Procs()
    try:
        yield started
    finally:
        started.stop_all()


@dataclass
class Host:
    """One host: a mount of the shared folder, a host name, and a HOME and TMPDIR on its own disk."""

    name: str
    mount: Path
    local_root: Path
    procs: Procs
    extra_env: dict[str, str] = field(default_factory=dict)
    #: where subprocesses keep compiled modules (PYTHONDONTWRITEBYTECODE would recompile ours every time)
    pycache: Path | None = None

    def __post_init__(self) -> None:
        self.data = self.mount / "weco-data"
        self.local = self.local_root / self.name
        for sub in ("home", "tmp", "out"):
            (self.local / sub).mkdir(parents=True, exist_ok=True)

    @property
    def journal(self) -> Path:
        return self.data / "journal.db"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WECO_") and k != "XDG_RUNTIME_DIR"}
        env.update(
            WECO_OBSERVE_DIR=str(self.data),
            WECO_OBSERVE_AUTO_SYNC="0",
            HOME=str(self.local / "home"),
            TMPDIR=str(self.local / "tmp"),
            PYTHONPATH=str(REPO),  # this checkout, whatever is installed
        )
        if self.pycache is not None:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(self.pycache)
        env.update(self.extra_env)
        env.update(extra)
        return env

    def argv(self, *argv: str) -> list[str]:
        """``argv`` run under this host's name (exec'd: the pid is the program's own)."""
        return ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', self.name, *argv]

    def start(self, *argv: str, env: dict[str, str] | None = None, stdout: Any = subprocess.PIPE, **kw: Any):
        process = subprocess.Popen(
            self.argv(*argv),
            env=self.env(**(env or {})),
            cwd=self.local,
            stdout=stdout,
            stderr=subprocess.PIPE,
            stdin=kw.pop("stdin", subprocess.DEVNULL),
            text=True,
            **kw,
        )
        return self.procs.add(process)

    def cli_start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return self.start(sys.executable, "-m", "weco_observe", "observe", *args, env=env)

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = TIMEOUT):
        process = self.cli_start(*args, env=env)
        out, err = process.communicate(timeout=timeout)
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    def ok(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        done = self.cli(*args, env=env)
        assert done.returncode == 0, f"{self.name}: {args} exited {done.returncode}: {done.stderr}"
        assert "Traceback" not in done.stderr, done.stderr
        return done


@pytest.fixture(scope="module")
def pycache() -> Iterator[Path]:
    """Compiled modules for the subprocesses of this module, kept out of the checkout."""
    folder = Path(tempfile.mkdtemp(prefix="weco-observe-pyc-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def hosts(two_hosts, procs, pycache) -> Iterator[dict[str, Host]]:  # noqa: F811
    problem = _uts_problem()
    if problem:
        unavailable(problem)
    local = Path(tempfile.mkdtemp(prefix="weco-observe-nodes-"))
    try:
        yield {
            "a": Host("host-a", two_hosts.mount_a, local, procs, pycache=pycache),
            "b": Host("host-b", two_hosts.mount_b, local, procs, pycache=pycache),
            "c": Host("host-c", two_hosts.extra_mount("c"), local, procs, pycache=pycache),
        }
    finally:
        procs.stop_all()
        shutil.rmtree(local, ignore_errors=True)


def _new_run(host: Host, name: str) -> str:
    source = host.local / "train.py"
    source.write_text("".join(f"line_{i} = {i}\n" for i in range(200)))
    return host.ok("init", "--metric", "loss", "--source", str(source), "--name", name).stdout.strip()


def _export(host: Host, run: str) -> list[dict[str, Any]]:
    """A run's steps as ``export --format jsonl`` prints them."""
    lines = [json.loads(line) for line in host.ok("export", run, "--format", "jsonl").stdout.splitlines()]
    assert lines[0]["type"] == "run" and lines[0]["id"] == run
    return [line for line in lines[1:] if line["type"] == "step"]


def _integrity(host: Host) -> list[str]:
    conn = sqlite3.connect(f"file:{host.journal}?mode=ro", uri=True, timeout=30)
    try:
        return [row[0] for row in conn.execute("PRAGMA integrity_check")]
    finally:
        conn.close()


# -- mode detection ------------------------------------------------------------------------------


def test_sshfs_is_detected_as_cluster_mode_and_the_override_forces_local(hosts):
    a = hosts["a"]
    status = json.loads(a.ok("status", "--json").stdout)
    assert status["mode"] == "cluster" and status["mode_source"] == "mountinfo"
    assert status["filesystem"] == {"type": "fuse.sshfs", "mount_point": str(a.mount)}
    # what the mode does, not only what status says: a cluster writer leaves a segment, not a journal
    run = _new_run(a, "detected")
    assert list((a.data / "segments" / run).glob("*.seg")) and not a.journal.exists()

    local = Host("host-a", a.mount / "elsewhere", a.local_root, a.procs, {"WECO_OBSERVE_SHARED_FS": "0"}, a.pycache)
    forced = json.loads(local.ok("status", "--json").stdout)
    assert forced["mode"] == "local" and forced["mode_source"] == "WECO_OBSERVE_SHARED_FS"
    assert forced["filesystem"]["type"] == "fuse.sshfs"  # detection still says what it saw
    _new_run(local, "forced local")
    assert local.journal.exists() and not (local.data / "segments").exists()


# -- the same meaning on every host ------------------------------------------------------------------


@pytest.fixture
def lagging_hosts(two_hosts, procs, pycache) -> Iterator[dict[str, Host]]:  # noqa: F811
    """Hosts on mounts with sshfs's own 20 s cache of names and attributes: a listing lags as on NFS."""
    problem = _uts_problem()
    if problem:
        unavailable(problem)
    root = Path(tempfile.mkdtemp(prefix="weco-observe-hosts-"))
    local = Path(tempfile.mkdtemp(prefix="weco-observe-nodes-"))
    mounts = Hosts(two_hosts.server, root, SSHFS_DEFAULTS)
    try:
        yield {
            "a": Host("host-a", mounts.mount_a, local, procs, pycache=pycache),
            "b": Host("host-b", mounts.mount_b, local, procs, pycache=pycache),
            "c": Host("host-c", mounts.extra_mount("c"), local, procs, pycache=pycache),
        }
    finally:
        procs.stop_all()
        mounts.close()
        shutil.rmtree(local, ignore_errors=True)


def _log(host: Host, run: str, step: int, description: str, *extra: str) -> str:
    """One ``log``; returns what it said on stderr ("step N journaled (parent P)")."""
    return host.ok("log", "--run-id", run, "--step", str(step), "--description", description, *extra).stderr


def test_a_run_made_on_one_host_is_logged_from_another_at_once_and_the_latest_relog_wins(lagging_hosts):
    a, b, c = lagging_hosts["a"], lagging_hosts["b"], lagging_hosts["c"]
    own = _new_run(b, "b's own run")
    _log(b, own, 1, "b's own step")
    assert json.loads(b.ok("status", "--json").stdout)["segments_waiting"]["files"] == 2  # B lists the folder
    run = _new_run(a, "made on a")
    assert os.listdir(b.data / "segments") == [own]  # the new run's folder is not in B's cached listing ...
    assert "step 1 journaled (parent 0)" in _log(b, run, 1, "b, right after init on a")  # ... found by name

    # one step re-logged from both hosts, each order: the later event wins, wherever it was logged
    _log(a, run, 2, "a, first", "--metrics", '{"loss": 2.0}')
    _log(b, run, 2, "b, later", "--metrics", '{"loss": 2.5}')
    _log(b, run, 3, "b, first", "--metrics", '{"loss": 3.0}')
    _log(a, run, 3, "a, later", "--metrics", '{"loss": 3.5}')

    c.ok("merge")
    steps = {s["step"]: s for s in _export(c, run)}
    assert {n: (s["description"], s["metrics"]) for n, s in steps.items() if n in (2, 3)} == {
        2: ("b, later", {"loss": 2.5}),
        3: ("a, later", {"loss": 3.5}),
    }
    assert steps[1]["parent_step"] == 0 and steps[1]["description"] == "b, right after init on a"
    shown = json.loads(c.ok("show", run, "--json").stdout)
    assert {s["step"]: s["description"] for s in shown["steps"]} == {n: s["description"] for n, s in steps.items()}
    assert [s["description"] for s in _export(c, own)] == [None, "b's own step"]


# -- the owner lock across hosts ---------------------------------------------------------------------

HOLDER = r"""
import sys
from weco_observe.ownerlock import OwnerLock
lock = OwnerLock(sys.argv[1], heartbeat=float(sys.argv[2]))
lock.acquire("sync", timeout=60)
print("held", flush=True)
sys.stdin.readline()  # until the test says so (or kills us)
lock.release()
"""


def _holding(host: Host, heartbeat: float = 2.0) -> subprocess.Popen[str]:
    """A process on ``host`` that holds the journal's owner lock until a line arrives on its stdin."""
    holder = host.start(sys.executable, "-c", HOLDER, str(host.journal), str(heartbeat), stdin=subprocess.PIPE)
    assert holder.stdout is not None
    line = holder.stdout.readline()  # bounded: the holder waits at most 60 s for the lock, then fails
    assert line == "held\n", holder.stderr.read() if holder.stderr else line
    return holder


def test_an_owner_on_one_host_makes_a_merge_on_the_other_wait_then_proceed(hosts):
    a, b = hosts["a"], hosts["b"]
    run = _new_run(a, "owner lock")
    a.ok("merge")
    holder = _holding(a)
    _log(b, run, 1, "logged on b while a holds the journal")  # writers take no lock
    merging = b.cli_start("merge", "--json")
    time.sleep(3)
    assert merging.poll() is None, merging.communicate()  # waiting for host A ...
    assert OwnerLock(b.journal).holder()["host"] == "host-a"  # ... without taking it
    holder.communicate("release\n", timeout=30)
    assert holder.returncode == 0
    out, err = merging.communicate(timeout=30)
    assert merging.returncode == 0, err
    assert json.loads(out)["applied"] == 1  # B merged what it logged meanwhile
    assert [s["description"] for s in _export(b, run)] == [None, "logged on b while a holds the journal"]


def test_an_owner_killed_on_one_host_is_taken_over_from_the_other_once_stale(lagging_hosts, procs):
    a, b = lagging_hosts["a"], lagging_hosts["b"]
    _new_run(a, "takeover")
    a.ok("merge")
    holder = _holding(a, heartbeat=0.2)
    # this process plays host B (its host name is not host-a): it can only watch the heartbeat
    waiter = OwnerLock(b.journal, stale=1.5)
    started = time.monotonic()
    with pytest.raises(Exception, match="host-a"):  # beating through B's attribute cache: never stale
        waiter.acquire("sync", timeout=4, poll=0.05)
    assert time.monotonic() - started >= 4
    procs.kill(holder)
    holder.wait(30)
    started = time.monotonic()
    waiter.acquire("sync", timeout=waiter.stale, poll=0.05)  # a timeout of the staleness period suffices
    waited = time.monotonic() - started
    try:
        assert 1.5 <= waited < 10
        assert waiter.holder()["host"] not in ("host-a", None) and waiter.holder()["token"] == waiter.token
    finally:
        waiter.release()
    assert b.ok("merge").returncode == 0
    leftovers = [p.name for p in b.data.iterdir() if p.name.startswith("journal.db.owner")]
    assert leftovers == []  # no lock, break marker or stale folder left behind


MERGE_ON_CUE = r"""
import sys
from weco_observe import store
from weco_observe.settings import Settings
print("ready", flush=True)
for line in sys.stdin:
    with store.exclusive(Settings.load(), "merge", timeout=30) as held:
        print(held.merged.applied, flush=True)
"""


def test_ownership_passes_between_hosts_within_their_name_caches(hosts):
    """The kernel keeps a name it looked up through a FUSE mount for a second (NFS, until it revalidates):
    an owner must not depend on a file another host's owner just removed."""
    from weco_observe import store
    from weco_observe.segments import SegmentWriter
    from weco_observe.settings import Settings

    a, b = hosts["a"], hosts["b"]
    run = _new_run(a, "ownership moves")
    a.ok("merge")
    merger_b = b.start(sys.executable, "-c", MERGE_ON_CUE, stdin=subprocess.PIPE)
    assert merger_b.stdin is not None and merger_b.stdout is not None
    assert merger_b.stdout.readline() == "ready\n"
    settings = Settings.load()
    writer = SegmentWriter(a.journal, settings=settings)  # this process: another host, through mount A
    for step in range(1, 4):
        writer.log_step(run, step)
        # host B's owner is about to write: its rollback journal is there (as it is, empty, when SQLite
        # has just made it), and a reader on host A looks for a hot journal: A knows the name now
        (b.data / "journal.db-journal").touch()
        assert (a.data / "journal.db-journal").exists()
        merger_b.stdin.write("merge\n")
        merger_b.stdin.flush()
        assert merger_b.stdout.readline() == "1\n"  # host B's owner merged the step
        writer.log_step(run, 10 + step)
        with store.exclusive(settings, "merge", journal_path=a.journal, timeout=30) as held:  # at once, on A
            assert held.merged.applied == 1
    merger_b.communicate("", timeout=30)
    assert merger_b.returncode == 0
    assert sorted(s["step"] for s in _export(b, run)) == [0, 1, 2, 3, 11, 12, 13]
