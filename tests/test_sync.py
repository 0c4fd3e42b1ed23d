"""`weco observe sync` against the emulator as a real HTTP server on loopback.

Each fault alone and mixed must end with the server holding exactly the
journal (every run, step, field, code file and parent) and no duplicates.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from emulator_fixtures import (  # noqa: F401
    assert_server_matches_journal,
    emulator,
    make_workload,
    pending_events,
    server_runs_by_local_id,
)
from weco_observe import outbox, replay, synclock
from weco_observe.api import WecoClient
from weco_observe.errors import EXIT_AUTH, EXIT_BUSY, EXIT_PENDING, EXIT_REJECTED
from weco_observe.journal import Journal


def _sync(
    journal_path: Path, emu, *, attempts: int = 8, passes: int = 10, read_timeout: float = 5.0, **kw
) -> replay.PassResult:
    """In-process sync with fast retries (real HTTP, real journal)."""
    with Journal(journal_path) as journal, WecoClient(emu.base_url, emu.api_key, read_timeout=read_timeout) as client:
        return replay.sync(
            journal,
            client=client,
            attempts=attempts,
            passes=passes,
            initial_wait=0.01,
            max_wait=0.05,
            max_retry_after=0.05,
            **kw,
        )


def test_cli_sync_end_to_end(cli, emulator, journal_path, tmp_path):
    (tmp_path / "train.py").write_text("x = 1\n")
    run_id = cli.ok("observe", "init", "--metric", "loss", "--source", "train.py", "--name", "e2e").stdout.strip()
    for n in (1, 2, 3):
        (tmp_path / "train.py").write_text(f"x = {n}\n")
        cli.ok(
            "observe",
            "log",
            "--run-id",
            run_id,
            "--step",
            str(n),
            "--metrics",
            f'{{"loss": {n}}}',
            "--source",
            "train.py",
            "--status",
            "failed" if n == 2 else "completed",
        )
    cli.ok("observe", "log", "--run-id", run_id, "--step", "4", "--parent-step", "1")
    result = cli("observe", "sync", "--json", env=emulator.env())
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["delivered"] == 5 and summary["pending"] == 0 and summary["exit_code"] == 0
    server_id = summary["runs"][0]["server_id"]
    assert summary["runs"][0]["dashboard"].endswith(f"/runs/{server_id}")
    assert_server_matches_journal(emulator, journal_path)
    tree = {n: s["parent_step"] for n, s in emulator.runs()[server_id]["steps"].items()}
    assert tree == {0: None, 1: 0, 2: 1, 3: 1, 4: 1}
    # human summary, and a second sync has nothing to do
    again = cli("observe", "sync", env=emulator.env())
    assert again.returncode == 0 and "0 delivered" in again.stderr
    assert emulator.stats()["created_runs"] == 1


@pytest.mark.parametrize(
    "faults",
    [
        {},
        {"error_rate": 0.3},
        {"rate_limit_rate": 0.3, "retry_after": 0.01},
        {"latency": 0.005},
        {"drop_rate": 0.2},
        {"commit_then_timeout_rate": 0.2, "hang": 0.3},
        {"non_json_rate": 0.2},
        {
            "error_rate": 0.15,
            "rate_limit_rate": 0.1,
            "retry_after": 0.01,
            "drop_rate": 0.1,
            "commit_then_timeout_rate": 0.1,
            "hang": 0.3,
            "non_json_rate": 0.1,
            "latency": 0.002,
        },
    ],
    ids=["clean", "5xx", "429", "latency", "drop", "commit-then-timeout", "non-json", "mixed"],
)
def test_faults_end_with_server_equal_to_journal(emulator, journal_path, faults):
    make_workload(journal_path, runs=4, steps=15, seed=len(json.dumps(faults)))
    emulator.set_faults(seed=7, **faults)
    result = _sync(journal_path, emulator, read_timeout=0.15)
    # creates are answered with no JSON/timeouts too: a create retried after an
    # ambiguous failure may duplicate its run; those are counted and reported
    ambiguous = faults.get("commit_then_timeout_rate", 0) or faults.get("non_json_rate", 0)
    if result.pending:  # a pass can run out of attempts under heavy faults; the next sync finishes
        emulator.set_faults(error_rate=0, rate_limit_rate=0, drop_rate=0, commit_then_timeout_rate=0, non_json_rate=0)
        result = _sync(journal_path, emulator)
    assert result.pending == 0 and result.exit_code == 0
    assert pending_events(journal_path) == 0
    duplicated = {k for k, n in server_runs_by_local_id(emulator).items() if n > 1}
    flagged = {r.run_id for r in result.runs if r.possible_duplicate}
    assert duplicated <= flagged, "every duplicated create must be reported"
    if not ambiguous:
        assert not duplicated
    _assert_matches_modulo_duplicates(emulator, journal_path, duplicated)


def _assert_matches_modulo_duplicates(emulator, journal_path, duplicated):
    """The server equals the journal; a duplicated create leaves an extra, orphan run, which is set aside."""
    if not duplicated:
        assert_server_matches_journal(emulator, journal_path)
        return
    with Journal(journal_path) as journal:
        server_ids = {r["server_id"] for r in journal.query("SELECT server_id FROM runs")}
    for rid in list(emulator.runs()):
        if rid not in server_ids:
            del emulator._runs[rid]  # the orphan twin: only its baseline, never any steps
    assert_server_matches_journal(emulator, journal_path)


def test_only_the_latest_state_of_a_step_is_sent(emulator, journal_path):
    with Journal(journal_path) as j:
        run = j.create_run(source_code={"a.py": "1"}, metric="m")
        for k in range(5):
            j.log_step(run, 1, description=f"v{k}", metrics={"m": k})
    result = _sync(journal_path, emulator)
    assert result.delivered == 2 and result.superseded == 4
    server_id = next(iter(emulator.runs()))
    assert emulator.runs()[server_id]["steps"][1]["posts"] == 1
    assert emulator.runs()[server_id]["steps"][1]["description"] == "v4"
    assert_server_matches_journal(emulator, journal_path)


def test_parents_survive_server_side_auto_chaining_in_any_order(emulator, journal_path):
    """Steps logged out of order: the server's own chaining would differ; the explicit parent wins."""
    with Journal(journal_path) as j:
        run = j.create_run(source_code={"a.py": "1"}, metric="m")
        j.log_step(run, 3)  # parent 0
        j.log_step(run, 1, status="failed")  # parent 0
        j.log_step(run, 2)  # parent 0 (1 failed)
        j.log_step(run, 5, parent_step=2)
        j.log_step(run, 4, status="failed")  # parent 3
    _sync(journal_path, emulator)
    steps = next(iter(emulator.runs().values()))["steps"]
    assert {n: s["parent_step"] for n, s in steps.items()} == {0: None, 3: 0, 1: 0, 2: 0, 5: 2, 4: 3}
    assert_server_matches_journal(emulator, journal_path)


def test_auth_failure_keeps_everything_pending(cli, emulator, journal_path):
    make_workload(journal_path, runs=2, steps=3)
    before = pending_events(journal_path)
    result = cli("observe", "sync", env={**emulator.env(), "WECO_API_KEY": "wrong-key"})
    assert result.returncode == EXIT_AUTH
    assert "weco login" in result.stderr and "wrong-key" not in result.stderr + result.stdout
    assert pending_events(journal_path) == before
    assert emulator.runs() == {}
    no_key = cli("observe", "sync", env={"WECO_BASE_URL": emulator.base_url})
    assert no_key.returncode == EXIT_AUTH and f"{before} events wait" in no_key.stderr


def test_rejected_step_does_not_block_the_rest_and_retry_rejected_resends(cli, emulator, journal_path):
    make_workload(journal_path, runs=2, steps=6, relog=False)
    emulator.set_faults(reject_steps=[3])
    result = cli("observe", "sync", "--json", env=emulator.env())
    assert result.returncode == EXIT_REJECTED, result.stderr
    summary = json.loads(result.stdout)
    assert summary["rejected"] == 2 and summary["pending"] == 0
    for run in emulator.runs().values():
        assert 3 not in run["steps"] and {4, 5, 6} <= set(run["steps"])
    status = json.loads(cli.ok("observe", "status", "--json").stdout)
    assert status["events"]["rejected"] == 2
    assert all("reject_steps" in r["last_error"] for r in status["rejected"])
    # a plain sync does not resend rejections; --retry-rejected does, once the cause is fixed
    assert cli("observe", "sync", env=emulator.env()).returncode == EXIT_REJECTED
    emulator.set_faults(reject_steps=[])
    cli.ok("observe", "sync", "--retry-rejected", env=emulator.env())
    assert_server_matches_journal(emulator, journal_path)


def test_rejected_create_blocks_only_its_own_run(emulator, journal_path):
    runs = make_workload(journal_path, runs=3, steps=4)
    emulator.reject = lambda path, body: "bad run" if body.get("name") == "run 1" else None
    result = _sync(journal_path, emulator)
    # its steps wait for the user (fix and retry, or discard), not for the network: 6, not 4
    assert result.exit_code == EXIT_REJECTED and result.rejected_total == 1
    with Journal(journal_path) as j:
        steps = j.query("SELECT count(*) FROM events WHERE run_id = ? AND kind = 'log_step'", (runs[1],))[0][0]
    assert result.pending == 0 and result.blocked == steps >= 4
    blocked = [r for r in result.runs if r.blocked]
    assert [r.run_id for r in blocked] == [runs[1]] and "bad run" in blocked[0].blocked
    assert len(emulator.runs()) == 2
    emulator.reject = None
    with Journal(journal_path) as j:
        outbox.requeue_rejected(j)
    assert _sync(journal_path, emulator).exit_code == 0
    assert_server_matches_journal(emulator, journal_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_sync_fails_fast_with_events_pending(cli, journal_path):
    make_workload(journal_path, runs=3, steps=5)
    before = pending_events(journal_path)
    env = {"WECO_BASE_URL": f"http://127.0.0.1:{_free_port()}/v1", "WECO_API_KEY": "k"}
    start = time.monotonic()
    result = cli("observe", "sync", env=env, timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == EXIT_PENDING
    assert f"{before} events wait" in result.stderr and "cannot reach" in result.stderr
    assert elapsed < 15, f"offline sync took {elapsed:.1f}s"
    assert pending_events(journal_path) == before


def test_dry_run_sends_nothing(cli, emulator, journal_path):
    make_workload(journal_path, runs=2, steps=3, relog=False)
    out = cli.ok("observe", "sync", "--dry-run", "--json", env=emulator.env()).stdout
    requests = json.loads(out)["requests"]
    assert sum(r["path"] == "/external/runs" for r in requests) == 2
    assert sum("step" in r for r in requests) == 6
    assert emulator.runs() == {} and emulator.stats().get("requests", 0) == 0


def test_run_id_syncs_one_run(cli, emulator, journal_path):
    runs = make_workload(journal_path, runs=2, steps=3)
    cli.ok("observe", "sync", "--run-id", runs[1], env=emulator.env())
    assert [r["metadata"]["weco_observe_local_id"] for r in emulator.runs().values()] == [runs[1]]
    with Journal(journal_path) as j:
        assert outbox.count_unsent(j, runs[0]) > 0 and outbox.count_unsent(j, runs[1]) == 0


def test_second_sync_waits_or_exits_with_no_wait(cli, emulator, journal_path):
    make_workload(journal_path, runs=1, steps=2)
    with Journal(journal_path) as j:
        lock = synclock.SyncLock(j.path)
        assert lock.try_acquire("sync")
        try:
            busy = cli("observe", "sync", "--no-wait", env=emulator.env())
            assert busy.returncode == EXIT_BUSY and "another syncer" in busy.stderr
            waiting = subprocess.Popen(
                [sys.executable, "-m", "weco_observe", "observe", "sync"],
                env={**os.environ, **emulator.env()},
                stderr=subprocess.PIPE,
                text=True,
            )
            # its first line: that it waits (not a fixed sleep, which a loaded box can outlast)
            first: list[str] = []
            reader = threading.Thread(target=lambda: first.append(waiting.stderr.readline()), daemon=True)
            reader.start()
            reader.join(60)
            assert first and "waiting for it" in first[0], first
            assert waiting.poll() is None and emulator.runs() == {}
        finally:
            lock.release()
        try:
            assert waiting.wait(timeout=30) == 0
        finally:
            waiting.stderr.close()
    assert_server_matches_journal(emulator, journal_path)


def test_loggers_keep_writing_while_a_sync_runs(emulator, journal_path, tmp_path):
    runs = make_workload(journal_path, runs=2, steps=5)
    emulator.set_faults(latency=0.01)
    script = (
        "import sys\nfrom weco_observe.journal import Journal\n"
        "j = Journal(sys.argv[1])\n"
        "for n in range(100, 160):\n"
        "    j.log_step(sys.argv[2], n, metrics={'loss': n}, code={'train.py': f'x = {n}'})\n"
    )
    logger = subprocess.Popen([sys.executable, "-c", script, str(journal_path), runs[0]])
    result = _sync(journal_path, emulator, passes=1)
    assert logger.wait(timeout=60) == 0
    assert result.delivered > 0
    emulator.set_faults(latency=0)
    assert _sync(journal_path, emulator).exit_code == 0
    assert_server_matches_journal(emulator, journal_path)


def test_watch_sends_new_events_and_exits_cleanly_on_sigterm(cli, emulator, journal_path, tmp_path):
    runs = make_workload(journal_path, runs=1, steps=2)
    watcher = subprocess.Popen(
        [sys.executable, "-m", "weco_observe", "observe", "sync", "--watch", "--json"],
        env={**os.environ, **emulator.env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not emulator.runs() and time.monotonic() < deadline:
            time.sleep(0.05)
        cli.ok("observe", "log", "--run-id", runs[0], "--step", "50", "--description", "late")
        while time.monotonic() < deadline:
            run = next(iter(emulator.runs().values()), None)
            if run and 50 in run["steps"]:
                break
            time.sleep(0.05)
        watcher.send_signal(signal.SIGTERM)
        out, err = watcher.communicate(timeout=20)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
    assert watcher.returncode == 0, err
    assert json.loads(out)["pending"] == 0
    assert_server_matches_journal(emulator, journal_path)


def test_sdk_flush_delivers(emulator, journal_path, monkeypatch):
    from weco_observe import WecoObserver

    monkeypatch.setenv("WECO_BASE_URL", emulator.base_url)
    with WecoObserver(api_key=emulator.api_key) as obs:
        run = obs.create_run(source_code={"a.py": "1"}, primary_metric="m")
        run.log_step(1, metrics={"m": 0.5})
        assert run.server_id is None
        assert obs.flush(timeout=20) is True
        assert run.server_id in emulator.runs()
    assert_server_matches_journal(emulator, journal_path)


def test_sdk_flush_times_out_when_offline(journal_path, monkeypatch):
    from weco_observe import WecoObserver

    monkeypatch.setenv("WECO_BASE_URL", f"http://127.0.0.1:{_free_port()}/v1")
    with WecoObserver(api_key="k") as obs:
        obs.create_run(source_code={"a.py": "1"}, primary_metric="m")
        start = time.monotonic()
        assert obs.flush(timeout=2) is False
        assert time.monotonic() - start < 10


def test_retry_after_is_honoured_up_to_the_cap_and_beyond_it_ends_the_pass(emulator, journal_path):
    make_workload(journal_path, runs=1, steps=1, relog=False)
    emulator.set_faults(rate_limit_rate=1.0, retry_after=2)
    waits: list[float] = []
    with Journal(journal_path) as journal, WecoClient(emulator.base_url, emulator.api_key) as client:
        result = replay.sync(journal, client=client, attempts=3, passes=1, sleep=waits.append, max_retry_after=2.0)
    assert waits == [2.0, 2.0]  # Retry-After 2 s, within the cap: waited as asked, between 3 attempts
    assert result.pending == 2 and result.exit_code == EXIT_PENDING and result.retry_at is None
    with Journal(journal_path) as journal:
        row = journal.query("SELECT attempts, last_error FROM events WHERE kind = 'create_run'")[0]
    assert row["attempts"] == 3 and "429" in row["last_error"]
    # Retry-After 3 s, past the 2 s cap: one attempt, no wait, and the time it asked for
    waits.clear()
    emulator.set_faults(retry_after=3)
    with Journal(journal_path) as journal, WecoClient(emulator.base_url, emulator.api_key) as client:
        result = replay.sync(journal, client=client, attempts=3, passes=3, sleep=waits.append, max_retry_after=2.0)
    assert waits == [] and result.pending == 2 and result.exit_code == EXIT_PENDING
    assert result.retry_at is not None and 1 < result.retry_at - time.time() <= 3


def test_concurrent_in_process_syncs_never_double_send(emulator, journal_path):
    """Two threads calling flush() on one journal: the lock lets one send at a time."""
    make_workload(journal_path, runs=3, steps=5)
    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(replay.flush(journal_path, timeout=30, api_key=emulator.api_key))
        )
        for _ in range(2)
    ]
    os.environ["WECO_BASE_URL"] = emulator.base_url
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        del os.environ["WECO_BASE_URL"]
    assert results == [True, True]
    assert emulator.stats()["created_runs"] == 3
    assert_server_matches_journal(emulator, journal_path)


def test_sync_bundle_imports_then_sends(cli, emulator, tmp_path):
    """A box with no network writes a bundle; `sync --bundle FILE` on another machine delivers it."""
    box = tmp_path / "box-a"
    (tmp_path / "a.py").write_text("x = 1\n")
    box_env = {"WECO_OBSERVE_DIR": str(box)}
    run_id = cli.ok("observe", "init", "--metric", "m", "--source", "a.py", env=box_env).stdout.strip()
    cli.ok("observe", "log", "--run-id", run_id, "--step", "1", "--metrics", '{"m": 1}', env=box_env)
    bundle = tmp_path / "a.weco"
    cli.ok("observe", "bundle", "-o", str(bundle), env=box_env)
    refused = cli("observe", "sync", "--dry-run", "--bundle", str(bundle), env=emulator.env())
    assert refused.returncode == 2 and "import" in refused.stderr
    result = cli("observe", "sync", "--bundle", str(bundle), "--json", env=emulator.env())
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["imports"][0]["events_new"] == 2 and summary["delivered"] == 2
    run = next(iter(emulator.runs().values()))
    assert run["metadata"]["weco_observe_local_id"] == run_id and run["steps"][1]["metrics"] == {"m": 1}


def test_remote_only_run_steps_go_straight_to_the_server_id(cli, emulator, journal_path):
    """A run made by the official client (known only by its server id) gets its steps, no create."""
    server_id = emulator.create_run({"a.py": "official"}, metric_name="loss")
    cli.ok("observe", "log", "--run-id", server_id, "--step", "1", "--metrics", '{"loss": 2}')
    cli.ok("observe", "log", "--run-id", server_id, "--step", "2", "--parent-step", "0")
    cli.ok("observe", "sync", env=emulator.env())
    assert emulator.stats()["created_runs"] == 1  # only the official client's
    steps = emulator.runs()[server_id]["steps"]
    assert steps[1]["metrics"] == {"loss": 2} and steps[2]["parent_step"] == 0
    assert_server_matches_journal(emulator, journal_path)
    # a server id the server does not know is a rejection, kept with the reason
    cli.ok("observe", "log", "--run-id", "00000000-0000-4000-8000-00000000abcd", "--step", "1")
    result = cli("observe", "sync", env=emulator.env())
    assert result.returncode == EXIT_REJECTED and "not found" in cli.ok("observe", "status").stdout


def test_ctrl_c_stops_a_sync_promptly_and_a_later_sync_finishes(emulator, journal_path):
    make_workload(journal_path, runs=3, steps=30, relog=False)
    emulator.set_faults(latency=0.1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "weco_observe", "observe", "sync"],
        env={**os.environ, **emulator.env()},
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while not emulator.stats().get("steps_posted") and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    proc.communicate(timeout=20)
    assert time.monotonic() - start < 5 and proc.returncode != 0
    assert pending_events(journal_path) > 0
    emulator.set_faults(latency=0)
    assert _sync(journal_path, emulator).exit_code == 0
    assert_server_matches_journal(emulator, journal_path)


def test_status_reports_a_create_that_may_have_made_a_second_server_run(cli, emulator, journal_path, tmp_path):
    """A create whose answer was lost is sent again; `status` names the run whose twin may exist."""
    (tmp_path / "a.py").write_text("a = 1\n")
    run_id = cli.ok("observe", "init", "--metric", "loss", "--source", "a.py").stdout.strip()
    emulator.set_faults(commit_then_timeout_rate=1.0, hang=0.5)
    first = _sync(journal_path, emulator, attempts=1, passes=1, read_timeout=0.1)
    assert first.pending == 1
    emulator.set_faults(commit_then_timeout_rate=0.0)
    second = _sync(journal_path, emulator)
    assert second.pending == 0
    assert server_runs_by_local_id(emulator)[run_id] == 2  # the ambiguous first attempt did create a run
    status = json.loads(cli.ok("observe", "status", "--json").stdout)
    assert [d["run_id"] for d in status["possible_duplicates"]] == [run_id]
    assert run_id in status["possible_duplicates"][0]["note"]
    assert f"duplicate?:     {run_id}" in cli.ok("observe", "status").stdout
