"""`weco observe init/log/status` through the real CLI, as subprocesses, on a journal in tmp_path.

Covers the issue's items 3, 4, 5 and 8: the guide's flags, run ids on stdout,
remote-only runs, re-logging, the tree rule (with the guide's branching
example), every bad input (one-line error, non-zero exit, journal unchanged)
and `status`.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from helpers import dump

from weco_observe import outbox
from weco_observe.journal import SCHEMA_VERSION, Journal


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "train.py"
    path.write_text("lr = 0.1\nbatch = 32\n")
    return path


@pytest.fixture
def run_id(cli, src) -> str:
    return cli.ok("observe", "init", "--metric", "val_bpb", "--source", "train.py").stdout.strip()


def steps(journal_path: Path, run: str) -> dict[int, dict]:
    with Journal(journal_path) as j:
        return {s["step"]: s for s in j.steps(j.require_run(run)["id"])}


def events(journal_path: Path, run: str) -> list[dict]:
    with Journal(journal_path) as j:
        local = j.require_run(run)["id"]
        return [
            {**dict(r), "payload": json.loads(r["payload"])}
            for r in j.query("SELECT * FROM events WHERE run_id = ? ORDER BY seq", (local,))
        ]


# -- init ---------------------------------------------------------------------


def test_init_prints_only_the_run_id_and_records_baseline(cli, src, journal_path):
    result = cli.ok(
        "observe",
        "init",
        "--name",
        "my-experiment",
        "--metric",
        "val_bpb",
        "--goal",
        "min",
        "--source",
        "train.py",
        "-i",
        "be careful",
        "--metadata",
        '{"gpu": "a100"}',
    )
    assert result.stdout.count("\n") == 1
    run = result.stdout.strip()
    assert run.startswith("local-") and len(run) == len("local-") + 26
    baseline = steps(journal_path, run)[0]
    assert baseline["parent_step"] is None and baseline["status"] == "completed"
    with Journal(journal_path) as j:
        assert j.read_code(baseline["code"]) == {"train.py": src.read_text()}
    (create,) = events(journal_path, run)
    assert create["kind"] == "create_run" and create["state"] == "pending"
    payload = create["payload"]
    assert payload["metric_name"] == "val_bpb" and payload["maximize"] is False
    assert payload["name"] == "my-experiment" and payload["additional_instructions"] == "be careful"
    assert payload["metadata"] == {"gpu": "a100"}
    assert set(payload["source_code"]) == {"train.py"}


@pytest.mark.parametrize(
    "goal,maximize", [("max", True), ("maximize", True), ("min", False), ("minimize", False), (None, False)]
)
def test_init_goal(cli, src, journal_path, goal, maximize):
    args = ["observe", "init", "--metric", "acc", "-s", "train.py"] + (["-g", goal] if goal else [])
    run = cli.ok(*args).stdout.strip()
    assert events(journal_path, run)[0]["payload"]["maximize"] is maximize


def test_init_optional_fields_are_left_out_of_the_payload(cli, src, journal_path):
    run = cli.ok("observe", "init", "--metric", "loss", "-s", "train.py").stdout.strip()
    assert set(events(journal_path, run)[0]["payload"]) == {"source_code", "metric_name", "maximize"}


@pytest.mark.parametrize("style", ["space-separated", "repeated", "source-and-sources"])
def test_init_sources(cli, tmp_path, journal_path, style):
    (tmp_path / "a.py").write_text("a = 1\n")
    (tmp_path / "b.py").write_text("b = 2\n")
    flags = {
        "space-separated": ["--sources", "a.py", "b.py"],
        "repeated": ["--sources", "a.py", "--sources", "b.py"],
        "source-and-sources": ["-s", "a.py", "--sources", "b.py"],
    }[style]
    run = cli.ok("observe", "init", *flags, "--metric", "loss").stdout.strip()
    with Journal(journal_path) as j:
        assert j.read_code(steps(journal_path, run)[0]["code"]) == {"a.py": "a = 1\n", "b.py": "b = 2\n"}


def test_weco_observe_script_and_module_agree(cli, src, journal_path):
    import shutil
    import subprocess
    import sys

    script = Path(sys.executable).with_name("weco-observe")
    if not script.exists():
        script = Path(shutil.which("weco-observe") or "")
    if not script.is_file():
        pytest.skip("weco-observe console script not installed next to this interpreter")
    result = subprocess.run(
        [str(script), "init", "--metric", "loss", "-s", "train.py"],
        cwd=src.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert Journal(journal_path).find_run(result.stdout.strip()) is not None


# -- log ----------------------------------------------------------------------


def test_log_step_with_all_flags(cli, run_id, src, journal_path):
    src.write_text("lr = 0.2\nbatch = 32\n")
    result = cli.ok(
        "observe",
        "log",
        "--run-id",
        run_id,
        "--step",
        "1",
        "--status",
        "completed",
        "--description",
        "raise lr",
        "--metrics",
        '{"val_bpb": 2.261, "memory_gb": 0.0}',
        "--source",
        "train.py",
        "--metadata",
        '{"seed": 3}',
    )
    assert result.stdout == ""
    assert "step 1 journaled" in result.stderr
    step = steps(journal_path, run_id)[1]
    assert step["metrics"] == {"val_bpb": 2.261, "memory_gb": 0.0}
    assert step["description"] == "raise lr" and step["metadata"] == {"seed": 3}
    assert step["parent_step"] == 0
    with Journal(journal_path) as j:
        assert j.read_code(step["code"]) == {"train.py": "lr = 0.2\nbatch = 32\n"}
    payload = events(journal_path, run_id)[-1]["payload"]
    assert payload == {
        "step": 1,
        "status": "completed",
        "description": "raise lr",
        "metrics": {"val_bpb": 2.261, "memory_gb": 0.0},
        "code": step["code"],
        "parent_step": 0,
        "metadata": {"seed": 3},
    }


def test_log_quiet_prints_nothing(cli, run_id):
    result = cli.ok("observe", "log", "--run-id", run_id, "--step", "1", "-q")
    assert result.stdout == "" and result.stderr == ""


def test_log_sources_space_separated(cli, run_id, tmp_path, journal_path):
    (tmp_path / "a.py").write_text("a\n")
    (tmp_path / "b.py").write_text("b\n")
    cli.ok(
        "observe", "log", "--run-id", run_id, "--step", "1", "--sources", "a.py", "b.py", "--description", "two files"
    )
    step = steps(journal_path, run_id)[1]
    assert set(step["code"]) == {"a.py", "b.py"} and step["description"] == "two files"


def test_unchanged_source_reuses_the_blob(cli, run_id, journal_path):
    for step in range(1, 4):
        cli.ok("observe", "log", "--run-id", run_id, "--step", str(step), "-s", "train.py")
    with Journal(journal_path) as j:
        assert j.query("SELECT count(*) AS n FROM blobs")[0]["n"] == 1
        manifests = {json.dumps(s["code"]) for s in j.steps(run_id)}
    assert len(manifests) == 1


def test_relog_updates_the_step_and_is_its_own_event(cli, run_id, journal_path):
    cli.ok(
        "observe",
        "log",
        "--run-id",
        run_id,
        "--step",
        "1",
        "--description",
        "first try",
        "--metrics",
        '{"val_bpb": 2.5}',
    )
    cli.ok("observe", "log", "--run-id", run_id, "--step", "1", "--status", "failed", "--metrics", '{"val_bpb": 2.4}')
    all_steps = steps(journal_path, run_id)
    assert sorted(all_steps) == [0, 1]
    step = all_steps[1]
    assert step["status"] == "failed" and step["metrics"] == {"val_bpb": 2.4}
    assert step["description"] == "first try"  # kept: the API upserts, so unset fields keep their value
    step_events = [e for e in events(journal_path, run_id) if e["kind"] == "log_step"]
    assert len(step_events) == 2 and step_events[0]["id"] != step_events[1]["id"]
    assert step_events[0]["id"] < step_events[1]["id"]  # ULIDs sort by time
    assert step_events[1]["payload"] == {
        "step": 1,
        "status": "failed",
        "description": "first try",
        "metrics": {"val_bpb": 2.4},
        "parent_step": 0,
    }
    assert step["event_id"] == step_events[1]["id"]


def test_guide_branching_example(cli, run_id, journal_path):
    """The guide's tree: 0 <- 1 <- 2 <- 3 (failed), and 4 branched from 2."""
    log = lambda *a: cli.ok("observe", "log", "--run-id", run_id, *a)  # noqa: E731
    log("--step", "0", "--description", "baseline", "--metrics", '{"val_bpb": 2.366}', "-s", "train.py")
    log("--step", "1", "--metrics", '{"val_bpb": 2.261}')
    log("--step", "2", "--metrics", '{"val_bpb": 2.2}')
    log("--step", "3", "--status", "failed", "--description", "tried X, didn't work", "--metrics", '{"val_bpb": 2.5}')
    log(
        "--step",
        "4",
        "--parent-step",
        "2",
        "--status",
        "completed",
        "--description",
        "tried Y instead",
        "--metrics",
        '{"val_bpb": 2.1}',
    )
    tree = {n: s["parent_step"] for n, s in steps(journal_path, run_id).items()}
    assert tree == {0: None, 1: 0, 2: 1, 3: 2, 4: 2}
    assert steps(journal_path, run_id)[0]["metrics"] == {"val_bpb": 2.366}
    payloads = {e["payload"]["step"]: e["payload"] for e in events(journal_path, run_id) if e["kind"] == "log_step"}
    assert "parent_step" not in payloads[0]
    assert [payloads[n]["parent_step"] for n in (1, 2, 3, 4)] == [0, 1, 2, 2]


def test_auto_chain_skips_failed_steps(cli, run_id, journal_path):
    log = lambda *a: cli.ok("observe", "log", "--run-id", run_id, *a)  # noqa: E731
    log("--step", "1")
    log("--step", "2", "--status", "failed")
    log("--step", "3", "--status", "failed")
    log("--step", "4")
    log("--step", "7")  # gaps are fine: the highest non-failed step below
    tree = {n: s["parent_step"] for n, s in steps(journal_path, run_id).items()}
    assert tree == {0: None, 1: 0, 2: 1, 3: 1, 4: 1, 7: 4}


def test_parent_is_resolved_at_log_time_and_kept(cli, run_id, journal_path):
    """Logging step 5 before step 4 chains 5 to 1; step 4 arriving later does not rewrite it."""
    cli.ok("observe", "log", "--run-id", run_id, "--step", "1")
    cli.ok("observe", "log", "--run-id", run_id, "--step", "5")
    cli.ok("observe", "log", "--run-id", run_id, "--step", "4")
    tree = {n: s["parent_step"] for n, s in steps(journal_path, run_id).items()}
    assert tree == {0: None, 1: 0, 4: 1, 5: 1}


def test_remote_only_run(cli, journal_path):
    server = str(uuid.uuid4())
    cli.ok("observe", "log", "--run-id", server, "--step", "3", "--metrics", '{"loss": 1.0}')
    # a parent step this journal has never seen is fine: the server may have it
    cli.ok("observe", "log", "--run-id", server, "--step", "5", "--parent-step", "2")
    with Journal(journal_path) as j:
        (run,) = j.query("SELECT * FROM runs")
        assert run["server_id"] == server and run["remote_only"] == 1
        assert run["id"].startswith("local-")
        kinds = [r["kind"] for r in j.query("SELECT kind FROM events ORDER BY seq")]
    assert kinds == ["log_step", "log_step"]  # no create: the run exists on the server
    tree = {n: s["parent_step"] for n, s in steps(journal_path, server).items()}
    assert tree == {3: None, 5: 2}


def test_local_id_keeps_working_after_sync_maps_it(cli, run_id, journal_path):
    server = str(uuid.uuid4())
    with Journal(journal_path) as j:
        (create,) = j.query("SELECT id FROM events WHERE kind = 'create_run'")
        outbox.create_delivered(j, create["id"], run_id, server)
    cli.ok("observe", "log", "--run-id", run_id, "--step", "1")
    cli.ok("observe", "log", "--run-id", server, "--step", "2")
    with Journal(journal_path) as j:
        assert j.query("SELECT count(*) AS n FROM runs")[0]["n"] == 1
    assert sorted(steps(journal_path, run_id)) == [0, 1, 2]


# -- bad input: one-line error, non-zero exit, journal unchanged ---------------

BAD_LOG = {
    "metrics-not-json": (["--metrics", "{val_bpb: 1}"], "--metrics"),
    "metrics-nan": (["--metrics", '{"val_bpb": NaN}'], "--metrics"),
    "metrics-infinity": (["--metrics", '{"val_bpb": -Infinity}'], "--metrics"),
    "metrics-overflow": (["--metrics", '{"val_bpb": 1e999}'], "finite"),
    "metrics-huge-int": (["--metrics", '{"val_bpb": 1' + "0" * 400 + "}"], "too large"),
    "metrics-list": (["--metrics", "[1, 2]"], "object"),
    "metrics-string-value": (["--metrics", '{"val_bpb": "1.0"}'], "number"),
    "metrics-bool": (["--metrics", '{"val_bpb": true}'], "number"),
    "metrics-null": (["--metrics", '{"val_bpb": null}'], "number"),
    "metrics-nested": (["--metrics", '{"val_bpb": {"x": 1}}'], "number"),
    "metadata-not-object": (["--metadata", "3"], "--metadata"),
    "negative-step": (["--step", "-1"], "--step"),
    "negative-step-eq": (["--step=-3"], "--step"),
    "fractional-step": (["--step", "1.5"], "--step"),
    "word-step": (["--step", "two"], "--step"),
    "huge-step": (["--step", "9" * 30], "--step"),
    "unicode-digit-step": (["--step", "²"], "--step"),
    "unknown-status": (["--status", "kept"], "--status"),
    "parent-not-in-run": (["--parent-step", "7"], "parent step 7: run "),  # worded for the CLI and the SDK alike
    "parent-not-below": (["--parent-step", "9"], "--parent-step"),
    "negative-parent": (["--parent-step", "-2"], "--parent-step"),
    "missing-source": (["--source", "nope.py"], "nope.py"),
    "directory-source": (["--source", "."], "directory"),
    "unreadable-source": (["--source", "train.py/x"], "cannot read source file"),  # ENOTDIR: root reads 0000 files
    "binary-source": (["--source", "binary.bin"], "binary"),
    "latin1-source": (["--source", "latin1.py"], "UTF-8"),
    "one-bad-of-sources": (["--sources", "train.py", "latin1.py"], "latin1.py"),
    "unknown-run": (["--run-id", "local-nosuchrun"], "nosuchrun"),
    "unknown-flag": (["--colour", "red"], "--colour"),
}


def _bad_files(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text("lr = 0.1\n")
    (tmp_path / "binary.bin").write_bytes(b"\x7fELF\x00\x01\x02")
    (tmp_path / "latin1.py").write_bytes("caf\u00e9 = 1\n".encode("latin-1"))


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory) -> tuple[dict[str, str], Path, str]:
    """One journal with a run (steps 0 and 3) that every bad-input test tries to change.

    Shared to keep the suite fast; a bad input that did write would still fail its own
    test, since each compares a dump of the journal from just before its call.
    """
    import os
    import subprocess
    import sys

    base = tmp_path_factory.mktemp("bad-input")
    _bad_files(base)
    env = {"WECO_OBSERVE_DIR": str(base / "data")}
    full = {**os.environ, **env, "HOME": str(base), "WECO_OBSERVE_AUTO_SYNC": "0"}
    full.pop("WECO_API_KEY", None)

    def run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "weco_observe", "observe", *args],
            cwd=base,
            env=full,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    run_id = run("init", "--metric", "loss", "--source", "train.py")
    run("log", "--run-id", run_id, "--step", "3")
    return env, base / "data" / "journal.db", run_id


@pytest.mark.parametrize("case", sorted(BAD_LOG))
def test_bad_log_input(cli, shared_run, tmp_path, case):
    env, journal_path, run_id = shared_run
    _bad_files(tmp_path)
    args, needle = BAD_LOG[case]
    base = {"--run-id": run_id, "--step": "9"}
    for flag in list(base):
        if any(a == flag or a.startswith(flag + "=") for a in args):
            del base[flag]
    before = dump(journal_path)
    result = cli("observe", "log", *[x for kv in base.items() for x in kv], *args, env=env)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0]
    assert dump(journal_path) == before
    assert not (journal_path.parent / "spill").exists()


BAD_INIT = {
    "no-source": (["--metric", "loss"], "--source"),
    "no-metric": (["--source", "train.py"], "--metric"),
    "blank-metric": (["--source", "train.py", "--metric", " "], "--metric"),
    "unknown-goal": (["--source", "train.py", "--metric", "loss", "--goal", "up"], "--goal"),
    "missing-source": (["--source", "nope.py", "--metric", "loss"], "nope.py"),
    "binary-source": (["--sources", "train.py", "binary.bin", "--metric", "loss"], "binary"),
    "latin1-source": (["--source", "latin1.py", "--metric", "loss"], "UTF-8"),
    "metadata-not-json": (["--source", "train.py", "--metric", "loss", "--metadata", "{x"], "--metadata"),
}


@pytest.mark.parametrize("case", sorted(BAD_INIT))
def test_bad_init_input(cli, shared_run, tmp_path, case):
    env, journal_path, _ = shared_run
    _bad_files(tmp_path)
    args, needle = BAD_INIT[case]
    before = dump(journal_path)
    result = cli("observe", "init", *args, env=env)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0]
    assert dump(journal_path) == before


def test_bad_input_before_any_journal_creates_nothing(cli, isolated_env):
    result = cli("observe", "log", "--run-id", str(uuid.uuid4()), "--step", "1", "--metrics", "nope")
    assert result.returncode == 2
    assert not (isolated_env / "journal.db").exists()


# -- status -------------------------------------------------------------------


def test_status_json(cli, run_id, journal_path):
    cli.ok("observe", "log", "--run-id", run_id, "--step", "1")
    cli.ok("observe", "log", "--run-id", run_id, "--step", "1")
    info = json.loads(cli.ok("observe", "status", "--json", env={"WECO_BASE_URL": "http://127.0.0.1:9/v1"}).stdout)
    assert info["journal"] == str(journal_path)
    assert info["size_bytes"] >= journal_path.stat().st_size > 0
    assert info["schema_version"] == SCHEMA_VERSION
    assert (info["runs"], info["steps"]) == (1, 2)
    assert info["events"] == {**dict.fromkeys(outbox.STATES, 0), "pending": 3}
    assert info["api_key_configured"] is False
    assert info["base_url"] == "http://127.0.0.1:9/v1"


def test_status_text_and_default_base_url(cli, run_id, journal_path):
    with Journal(journal_path) as j:
        (create,) = j.query("SELECT id FROM events WHERE kind = 'create_run'")
        outbox.create_delivered(j, create["id"], run_id, str(uuid.uuid4()))
        j.log_step(run_id, 1)
        (step,) = j.query("SELECT id FROM events WHERE kind = 'log_step'")
        outbox.rejected(j, step["id"], "422: metrics must be numbers")
    out = cli.ok("observe", "status").stdout
    assert str(journal_path) in out
    assert f"schema version: {SCHEMA_VERSION}" in out
    assert "0 pending, 1 delivered, 1 rejected" in out
    assert "https://api.weco.ai/v1" in out
    assert "not configured" in out
    assert "422: metrics must be numbers" in out


def test_journal_files_are_private(cli, run_id, journal_path):
    assert journal_path.parent.stat().st_mode & 0o777 == 0o700
    for path in journal_path.parent.glob("journal.db*"):
        assert path.stat().st_mode & 0o777 == 0o600, path


def test_journal_pragmas(run_id, journal_path):
    with Journal(journal_path) as j:
        assert j.query("PRAGMA journal_mode")[0][0] == "wal"
        assert j.query("PRAGMA synchronous")[0][0] == 2  # FULL
        assert j.query("PRAGMA busy_timeout")[0][0] >= 10_000


def _kill_syncers_of(journal_path: Path) -> None:
    """SIGKILL the detached background syncers started for this test's journal (found by its unique path)."""
    import os
    import signal
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"weco_observe.background" in cmdline and str(journal_path).encode() in cmdline:
                pids.append(int(entry))
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def test_log_never_waits_on_a_black_holed_api(cli, src, journal_path):
    """With a key configured and auto-sync on, `init`/`log` hand the network to a detached syncer
    and return at once, even when the API accepts connections and never answers."""
    import socket
    import time

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)  # connections complete in the backlog; nothing is ever read or answered
    env = {
        "WECO_API_KEY": "wk-black-hole",
        "WECO_OBSERVE_AUTO_SYNC": "1",
        "WECO_BASE_URL": f"http://127.0.0.1:{hole.getsockname()[1]}/v1",
    }
    try:
        start = time.monotonic()
        run = cli.ok("observe", "init", "--metric", "loss", "-s", "train.py", env=env).stdout.strip()
        times = [time.monotonic() - start]
        for step in range(1, 6):
            start = time.monotonic()
            cli.ok("observe", "log", "--run-id", run, "--step", str(step), "-s", "train.py", env=env)
            times.append(time.monotonic() - start)
    finally:
        _kill_syncers_of(journal_path)
        hole.close()
    # the API's connect timeout is 3 s and its read timeout 20 s: none of that was waited for
    assert max(times) < 2.5, times
    assert (journal_path.parent / "autosync.log").exists()  # a background syncer was started
    assert sorted(steps(journal_path, run)) == [0, 1, 2, 3, 4, 5]
