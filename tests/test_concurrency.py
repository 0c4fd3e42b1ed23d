"""8 processes logging 250 steps each into one journal at once: zero errors, zero lost steps.

Two writers drive the real CLI: 25 steps each as real `python -m weco_observe
observe log` processes, the rest through `weco_observe.cli.run`, which opens the
journal afresh for every `log` exactly as such a process does, in a loop inside
one process so the test stays within seconds. Six writers use the SDK.
All eight write to the same run, so tree resolution races too. Every writer
runs with warnings as errors and the default busy timeout; any "database is
locked", spill or warning fails the test.
"""

from __future__ import annotations

import pytest

import json
import os
import subprocess
import sys
import textwrap
import time

from helpers import totals
from weco_observe.journal import Journal

#: end to end: every CLI call here is a real process (kills, signals, start-up, entry points)
pytestmark = pytest.mark.subprocess_cli

WRITERS = 8
STEPS = 250
CLI_WRITERS = 2

WORKER = textwrap.dedent(
    """
    import subprocess, sys, time
    REAL = 25
    kind, run_id, first, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    code = "x = 0\\n" * 200
    start = time.monotonic()
    if kind == "cli":
        from weco_observe.cli import observe, run
        with open("src.py", "w") as f:
            f.write(code)
        for step in range(first, first + count):
            args = ["log", "--run-id", run_id, "--step", str(step), "-q",
                    "--metrics", '{"loss": %d}' % step]
            if step % 10 == 0:
                args += ["-s", "src.py"]
            if step < first + REAL:  # the first few as real `weco observe log` processes
                rc = subprocess.run([sys.executable, "-m", "weco_observe", "observe", *args]).returncode
            else:
                rc = run(observe, args)
            if rc != 0:
                sys.exit(f"log {step} exited {rc}")
    else:
        from weco_observe import WecoObserver
        observed = WecoObserver(strict=True).run(run_id)
        for step in range(first, first + count):
            observed.log_step(step, metrics={"loss": step},
                              code={"src.py": code + str(step)} if step % 10 == 0 else None)
    print(time.monotonic() - start)
    """
)


def test_eight_writers_one_journal(cli, tmp_path, journal_path):
    (tmp_path / "train.py").write_text("x = 0\n")
    run_id = cli.ok("observe", "init", "--metric", "loss", "-s", "train.py").stdout.strip()
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    procs = []
    for i in range(WRITERS):
        workdir = tmp_path / f"w{i}"
        workdir.mkdir()
        kind = "cli" if i < CLI_WRITERS else "sdk"
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, kind, run_id, str(1 + i * STEPS), str(STEPS)],
                cwd=workdir,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + 240
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=max(1, deadline - time.monotonic()))
        results.append((proc.returncode, out, err))
    for rc, _out, err in results:
        assert rc == 0, err
        assert err == "", err  # no warnings, no "journal unavailable", no spill
    assert not (journal_path.parent / "spill").exists()
    with Journal(journal_path) as j:
        assert j.query("PRAGMA integrity_check")[0][0] == "ok"
        steps = j.steps(run_id)
        assert [s["step"] for s in steps] == list(range(WRITERS * STEPS + 1))
        assert all(s["metrics"] == {"loss": s["step"]} for s in steps[1:])
        assert totals(j)["pending"] == WRITERS * STEPS + 1
        events = j.query("SELECT step, payload FROM events WHERE kind = 'log_step'")
        assert len({r["step"] for r in events}) == WRITERS * STEPS
        # every stored parent is a step below, resolved at log time
        assert all(s["parent_step"] is not None and s["parent_step"] < s["step"] for s in steps[1:])
        for r in events:
            assert json.loads(r["payload"])["parent_step"] < r["step"]


def test_concurrent_first_use_creates_one_journal(tmp_path, journal_path):
    """Six `weco observe init` processes race on a machine with no journal yet."""
    (tmp_path / "train.py").write_text("x = 0\n")
    assert not journal_path.exists()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "weco_observe", "observe", "init", "--metric", "loss", "-s", "train.py"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, [err for _, err in outs]
    assert all(err == "" for _, err in outs), outs
    run_ids = {out.strip() for out, _ in outs}
    assert len(run_ids) == 6
    with Journal(journal_path) as j:
        assert {r["id"] for r in j.query("SELECT id FROM runs")} == run_ids
        assert len(j.query("SELECT name FROM _sqlite_migrations")) == j.schema_version()
    assert not (journal_path.parent / "spill").exists()


def test_a_second_journal_opened_in_a_process_keeps_the_first_ones_locks(tmp_path):
    """Opening a Journal must not open and close journal.db itself: closing any descriptor of a file
    drops every POSIX lock the process holds on it, SQLite's included. Another process closing its
    connection then believed it was the last one and deleted the WAL from under the open ones, so
    later commits went to an unlinked file (seen with a relay, which holds three connections, and a
    `serve keys add` run beside it)."""
    from weco_observe.records import Run

    path = tmp_path / "journal.db"
    first = Journal(path)
    first.query("SELECT count(*) FROM runs")  # a reader's shared lock, as a long-lived server holds
    second = Journal(path)  # the relay's store, reader and key check, or ui's journal and views
    try:
        other = subprocess.run(
            [sys.executable, "-c", f"from weco_observe.journal import Journal; Journal({str(path)!r}).close()"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert other.returncode == 0, other.stderr
        assert (tmp_path / "journal.db-wal").exists()  # still there: the open connections use it
        with first.write() as conn:
            now = time.time()
            run = Run(id="r1", name="n", metric="m", maximize=False, created_at=now, updated_at=now)
            first.create_run_in(conn, run, {"train.py": "x = 1\n"}, "01ARZ3NDEKTSV4RRFFQ69G5FAV")
    finally:
        second.close()
        first.close()
    fresh = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from weco_observe.journal import Journal;"
            " print(Journal(sys.argv[1]).query('SELECT id FROM runs')[0][0])",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert fresh.stdout.strip() == "r1", fresh.stderr
