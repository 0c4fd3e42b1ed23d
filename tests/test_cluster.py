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
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
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
        #: processes started by ours and detached from them (background syncers): stopped by pid
        self.pids: set[int] = set()
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
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
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


def test_in_the_listing_window_a_step_chains_to_what_its_host_sees_and_an_explicit_parent_is_trusted(
    lagging_hosts,
):
    a, b, c = lagging_hosts["a"], lagging_hosts["b"], lagging_hosts["c"]
    run = _new_run(a, "the window")
    _log(b, run, 1, "b")
    b.ok("status")  # lists the run's folder: B's listing is cached (20 s, as NFS's acdirmin)
    _log(a, run, 2, "a")
    assert "step 3 journaled (parent 1)" in _log(b, run, 3, "b, cannot see step 2 yet")  # the documented window
    b.ok("status")
    _log(a, run, 4, "a")
    # docs/cluster.md: pass --parent-step when another host's step must be the parent
    assert "step 5 journaled (parent 4)" in _log(b, run, 5, "b, on a's step 4", "--parent-step", "4")
    c.ok("merge")
    assert {s["step"]: s["parent_step"] for s in _export(c, run)} == {0: None, 1: 0, 2: 1, 3: 1, 4: 3, 5: 4}


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


SDK_WRITER = r"""
import sys, time
from weco_observe import WecoObserver
ref, first, count, tag, deadline = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
lines = [f"param_{i} = {i}\n" for i in range(300)]
obs = WecoObserver(strict=True)  # strict: a step that is not journaled raises, and the test sees the traceback
if ref == "new":
    run = obs.create_run(source_code={"train.py": "".join(lines)}, primary_metric="loss", name=tag)
else:
    run = obs.run(ref)
print("run", run.run_id, flush=True)
for step in range(first, first + count):
    if time.time() > deadline:
        break
    lines[step % len(lines)] = f"param = {step}\n"
    code = {"train.py": "".join(lines)} if step % 3 == 0 else None
    run.log_step(step, description=f"{tag} step {step}", metrics={"loss": 1 / step}, code=code)
    print(step, flush=True)  # acknowledged: log_step returned
    time.sleep(0.01)
obs.close()
"""

MERGER = r"""
import sys, time
from weco_observe import store
from weco_observe.settings import Settings
for _ in range(100000):
    with store.exclusive(Settings.load(), "merge", timeout=60) as held:
        pass
    time.sleep(0.02)
"""


# -- many writers on both hosts, kill -9 everywhere, then a reader on a third ------------------------

WRITE_SECONDS = 15.0


@dataclass
class Logged:
    """One log attempt: where it went and how it ended (returncode None: still unknown)."""

    run: str
    step: int
    description: str
    acknowledged: bool


@dataclass
class Workload:
    procs: Procs
    stop_at: float
    rng: random.Random
    logged: list[Logged] = field(default_factory=list)
    #: every process that ended, with its host and role: (role, returncode, pid, stderr)
    ended: list[tuple[str, int | None, int, str]] = field(default_factory=list)
    live: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    kills: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def running(self) -> bool:
        return not self.stop.is_set() and time.monotonic() < self.stop_at

    def finished(self, role: str, process: subprocess.Popen[str], stderr: str) -> None:
        with self.lock:
            self.ended.append((role, process.returncode, process.pid, stderr))
            if self.live.get(role) is process:
                del self.live[role]

    def started(self, role: str, process: subprocess.Popen[str]) -> None:
        with self.lock:
            self.live[role] = process


def _cli_writer(w: Workload, host: Host, run: str, tag: str, first: int) -> None:
    step = first
    while w.running():
        description = f"{tag} step {step}"
        process = host.cli_start(
            "log", "--run-id", run, "--step", str(step), "--description", description,
            "--metrics", json.dumps({"loss": 1 / step}), "--quiet",
        )  # fmt: skip
        w.started(tag, process)
        _, err = process.communicate(timeout=TIMEOUT)
        w.finished(tag, process, err)
        with w.lock:
            w.logged.append(Logged(run, step, description, process.returncode == 0))
        step += 1


def _sdk_writer(w: Workload, host: Host, run: str, tag: str, first: int, wall_deadline: float) -> None:
    """Incarnations of an SDK script; each killed one is followed by a new one, on a fresh block of steps."""
    for incarnation in range(1000):
        if not w.running():
            return
        block = first + 1000 * incarnation
        out = host.local / "out" / f"{tag}-{incarnation}.txt"
        with open(out, "w") as sink:
            process = host.start(
                sys.executable, "-c", SDK_WRITER, run, str(block), "1000", tag, str(wall_deadline), stdout=sink
            )
            w.started(tag, process)
            _, err = process.communicate(timeout=TIMEOUT)
        w.finished(tag, process, err)
        lines = out.read_text().splitlines()
        if lines and lines[0].startswith("run "):
            made = lines[0].split()[1]
            run = made  # a new run is acknowledged: later incarnations log to it
            acknowledged = {int(line) for line in lines[1:] if line.isdigit()}
            with w.lock:
                if incarnation == 0 or made not in {entry.run for entry in w.logged}:
                    w.logged.append(Logged(made, 0, "", True))  # the run itself (its baseline)
                for step in range(block, block + 1000):
                    if step in acknowledged:
                        w.logged.append(Logged(made, step, f"{tag} step {step}", True))


def _merger(w: Workload, host: Host) -> None:
    """A process merging in a loop (the in-process ``store.exclusive``), restarted whenever it is killed."""
    while w.running():
        process = host.start(sys.executable, "-c", MERGER)
        w.started("merger", process)
        _, err = process.communicate(timeout=TIMEOUT)
        w.finished("merger", process, err)


def _merge_loop(w: Workload, host: Host) -> None:
    """`weco observe merge` over and over, giving up after a short wait when the other host holds it."""
    while w.running():
        process = host.cli_start("merge", env={"WECO_OBSERVE_BUSY_TIMEOUT": "5"})
        _, err = process.communicate(timeout=TIMEOUT)
        w.finished("merge_cli", process, err)
        time.sleep(0.2)


def _killer(w: Workload) -> None:
    """Every 0.3-0.8 s, SIGKILL a merger, a CLI `log` or an SDK writer.

    Half the rounds go to a kind killed fewer than 3 times yet: left to chance alone, one CI run
    killed an SDK writer only twice in the 15 s (one is often still starting), and the test
    demands 3 of each."""
    while w.running():
        time.sleep(w.rng.uniform(0.3, 0.8))
        short = [k for k in ("merger", "cli", "sdk") if w.kills[k] < 3]
        if short and w.rng.random() < 0.5:
            kind = w.rng.choice(short)
        else:
            kind = w.rng.choice(["merger", "merger", "cli", "cli", "sdk"])  # an SDK script takes a while to start
        with w.lock:
            candidates = [p for role, p in sorted(w.live.items()) if role.split("-")[-1].rstrip("0123456789") == kind]
        if candidates and w.procs.kill(w.rng.choice(candidates)):
            w.kills[kind] += 1


def test_two_hosts_writing_at_once_through_kill_9_lose_nothing(hosts, procs):
    a, b, c = hosts["a"], hosts["b"], hosts["c"]
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    shared = _new_run(a, "shared by both hosts")
    own_a, own_b = _new_run(a, "a's own"), _new_run(b, "b's own")
    w = Workload(procs, time.monotonic() + WRITE_SECONDS, random.Random(seed))
    w.logged += [Logged(run, 0, "", True) for run in (shared, own_a, own_b)]
    wall_deadline = time.time() + WRITE_SECONDS
    merger_thread = threading.Thread(target=_merger, args=(w, a))
    threads = [
        threading.Thread(target=_cli_writer, args=(w, a, shared, "a-cli0", 1000)),
        threading.Thread(target=_cli_writer, args=(w, a, shared, "a-cli1", 2000)),
        threading.Thread(target=_cli_writer, args=(w, a, own_a, "a-cli2", 1000)),
        threading.Thread(target=_cli_writer, args=(w, b, shared, "b-cli0", 3000)),
        threading.Thread(target=_cli_writer, args=(w, b, shared, "b-cli1", 4000)),
        threading.Thread(target=_cli_writer, args=(w, b, own_b, "b-cli2", 1000)),
        threading.Thread(target=_sdk_writer, args=(w, a, shared, "a-sdk0", 10000, wall_deadline)),
        threading.Thread(target=_sdk_writer, args=(w, a, "new", "a-sdk1", 10000, wall_deadline)),
        threading.Thread(target=_sdk_writer, args=(w, b, shared, "b-sdk0", 50000, wall_deadline)),
        threading.Thread(target=_sdk_writer, args=(w, b, "new", "b-sdk1", 10000, wall_deadline)),
        merger_thread,
        threading.Thread(target=_merge_loop, args=(w, b)),
        threading.Thread(target=_killer, args=(w,)),
    ]
    for t in threads:
        t.start()
    time.sleep(WRITE_SECONDS)
    w.stop.set()  # nothing new starts; the merger, which would loop forever, is killed like the others
    for _ in range(int(TIMEOUT / 0.2)):
        with w.lock:
            merger = w.live.get("merger")
        if merger is not None and procs.kill(merger):
            w.kills["merger"] += 1
        merger_thread.join(0.2)
        if not merger_thread.is_alive():
            break
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads)

    # Nothing crashed: every process exited 0, or was killed by us (the CLI merge may give up: 8)
    crashed = [
        (role, code, err[-800:])
        for role, code, pid, err in w.ended
        if not (code == 0 or (code == -signal.SIGKILL and pid in procs.killed) or (role == "merge_cli" and code == 8))
    ]
    assert crashed == [], "\n\n".join(map(str, crashed))
    warned = [err for _, _, _, err in w.ended if "Traceback" in err or "WARNING" in err]
    assert warned == [], "\n".join(warned)
    acknowledged = [entry for entry in w.logged if entry.acknowledged]
    print(f"kills {dict(w.kills)}, logs {len(w.logged)}, acknowledged {len(acknowledged)}")
    assert min(w.kills.values(), default=0) >= 3 and len(w.kills) == 3, w.kills
    done = Counter(e.description[:5] for e in acknowledged if e.step)  # "a-cli", "b-sdk", ...
    assert min(done[k] for k in ("a-cli", "b-cli", "a-sdk", "b-sdk")) >= 3, done  # both hosts wrote both ways

    # The owner on host A died last: a merge on its own host takes over at once; then host C reads
    a.ok("merge")
    merged = json.loads(c.ok("merge", "--json").stdout)
    assert all("torn last record" in p for p in merged["problems"]), merged["problems"]
    status = json.loads(c.ok("status", "--json").stdout)  # through the seqlock, no lock taken
    assert status["mode"] == "cluster" and status["spill_files"] == 0
    assert _integrity(c) == ["ok"]

    runs = sorted({e.run for e in w.logged})
    steps = {run: _export(c, run) for run in runs}
    descriptions = Counter(s["description"] for found in steps.values() for s in found if s["description"])
    for entry in acknowledged:
        by_step = {s["step"]: s for s in steps[entry.run]}
        assert entry.step in by_step, f"acknowledged {entry} is missing"
        if entry.step:
            assert by_step[entry.step]["description"] == entry.description
            assert descriptions[entry.description] == 1, f"{entry} found {descriptions[entry.description]} times"
    assert max(descriptions.values()) == 1
    for run, found in steps.items():
        numbers = {s["step"] for s in found}
        bad = [s for s in found if s["step"] and not (s["parent_step"] in numbers and s["parent_step"] < s["step"])]
        assert bad == [], f"run {run}: steps whose parent is missing or not lower"
    shown = json.loads(c.ok("show", shared, "--json").stdout)
    assert sorted(s["step"] for s in shown["steps"]) == sorted(s["step"] for s in steps[shared])
    spilled = [p for host in (a, b) for p in (host.local / "tmp").rglob("*.json")]
    assert spilled == [] and not (a.data / "spill").exists()


# -- the cluster workflow: compute nodes with no route out, a login node that syncs -------------------


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed: connections are refused


def _autosync_pids(host: Host) -> set[int]:
    log = host.data / "autosync.log"
    text = log.read_text() if log.exists() else ""
    return {int(line.split(" pid ")[1].split()[0]) for line in text.splitlines() if " pid " in line}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_node_with_no_network_gives_up_at_once_and_the_login_node_delivers_everything(hosts, procs, emulator):
    from weco_observe import synclock

    a, b = hosts["a"], hosts["b"]
    offline = {
        "WECO_API_KEY": "key-of-the-compute-node",
        "WECO_BASE_URL": f"http://127.0.0.1:{_closed_port()}/v1",
        "WECO_OBSERVE_AUTO_SYNC": "1",
    }
    compute = Host("host-a", a.mount, a.local_root, procs, offline, a.pycache)
    run = _new_run(compute, "logged on a compute node")  # a key is set: this starts a background syncer
    started = time.monotonic()
    pids: set[int] = set()
    while time.monotonic() - started < 60 and not (pids and not any(_alive(p) for p in pids)):
        time.sleep(0.2)
        pids = _autosync_pids(compute)
    procs.pids |= pids  # stopped in teardown whatever happens
    assert len(pids) == 1, (compute.data / "autosync.log").read_text()
    assert time.monotonic() - started < 30  # it tried once and gave up: no 60 s of retries holding the journal
    assert "giving up" in (compute.data / "autosync.log").read_text()
    assert synclock.in_cooldown(b.journal)  # every node sees the cooldown: it is in the shared folder
    assert not (b.data / "journal.db.owner").exists()  # and no one holds the journal

    for step in range(1, 4):
        _log(compute, run, step, f"compute node step {step}")
    _log(Host("host-b", b.mount, b.local_root, procs, offline, b.pycache), run, 4, "another node, same cooldown")
    time.sleep(2)
    assert _autosync_pids(compute) == pids  # no node started another syncer during the cooldown

    login = b.ok("sync", "--no-wait", "--json", env=emulator.env())  # not a moment's wait for the compute node
    assert json.loads(login.stdout)["pending"] == 0
    copy = b.local / "journal-copy.db"  # the journal as synced, opened as a local one
    shutil.copyfile(b.journal, copy)
    assert_server_matches_journal(emulator, copy)
    (server_run,) = emulator.runs().values()
    assert sorted(server_run["steps"]) == [0, 1, 2, 3, 4]
    assert emulator.stats()["created_runs"] == 1
    assert not synclock.in_cooldown(b.journal)  # a sync that leaves nothing pending clears it
