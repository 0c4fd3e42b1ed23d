"""`kill -9` at random moments during `log` leaves a journal that opens, passes
`PRAGMA integrity_check` and holds every step whose `log` returned.

Two kinds of victims, both real processes killed with SIGKILL:
- `weco observe log` processes, killed at a random moment around the time one
  takes to finish (calibrated first), so kills land in imports, in the write
  and after the commit;
- an SDK loop that logs steps (with code edits) as fast as it can and prints
  each step number after `log_step` returns, killed after a random delay: most
  kills land inside a transaction.
Loops are bounded in count and in time.
"""

from __future__ import annotations

import pytest

import os
import random
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from weco_observe.journal import Journal

#: end to end: every CLI call here is a real process (kills, signals, start-up, entry points)
pytestmark = pytest.mark.subprocess_cli

SEED = int(os.environ.get("WECO_CRASH_SEED", "0")) or random.randrange(1 << 30)


def check(journal_path: Path, run_id: str, must_have: set[int]) -> set[int]:
    with Journal(journal_path) as j:
        assert j.query("PRAGMA integrity_check")[0][0] == "ok"
        assert j.query("PRAGMA foreign_key_check") == []
        have = {s["step"] for s in j.steps(run_id)}
        # every step row has its event, and every event its step: a transaction is all or nothing
        orphans = j.query(
            "SELECT count(*) AS n FROM steps s LEFT JOIN events e ON e.id = s.event_id WHERE e.id IS NULL"
        )
        assert orphans[0]["n"] == 0
        for s in j.steps(run_id):
            if s["code"]:
                j.read_code(s["code"])  # every referenced blob is there and decodes
    missing = must_have - have
    assert not missing, f"steps whose log returned are missing: {sorted(missing)} (seed {SEED})"
    return have


def test_kill_9_during_cli_log(cli, tmp_path, journal_path):
    rng = random.Random(SEED)
    src = tmp_path / "train.py"
    src.write_text("w = 0\n" * 2000)
    run_id = cli.ok("observe", "init", "--metric", "loss", "-s", "train.py").stdout.strip()

    def start(step: int) -> subprocess.Popen:
        lines = src.read_text().splitlines(keepends=True)
        lines[rng.randrange(len(lines))] = f"w = {step}\n"
        src.write_text("".join(lines))
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "weco_observe",
                "observe",
                "log",
                "--run-id",
                run_id,
                "--step",
                str(step),
                "-s",
                "train.py",
                "--metrics",
                f'{{"loss": {step}}}',
                "-q",
            ],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    # calibrate: how long does one log take here?
    durations = []
    for step in range(1, 4):
        t = time.monotonic()
        proc = start(step)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        durations.append(time.monotonic() - t)
    typical = statistics.median(durations)
    must_have = {0, 1, 2, 3}
    killed = returned = 0
    deadline = time.monotonic() + 8
    step = 4
    while step < 4 + 80 and time.monotonic() < deadline:
        proc = start(step)
        time.sleep(rng.uniform(0.5, 1.1) * typical)
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
        rc = proc.returncode
        if rc == 0:
            must_have.add(step)
            returned += 1
        else:
            assert rc == -signal.SIGKILL, stderr
            killed += 1
        if step % 8 == 0:
            check(journal_path, run_id, must_have)
        step += 1
    have = check(journal_path, run_id, must_have)
    assert killed >= 5, f"only {killed} kills landed (seed {SEED})"
    # the journal keeps working after all that
    cli.ok("observe", "log", "--run-id", run_id, "--step", str(step), "-s", "train.py")
    assert step in check(journal_path, run_id, must_have)
    assert len(have) >= len(must_have)


SDK_LOOP = textwrap.dedent(
    """
    import sys
    from weco_observe import WecoObserver
    run = WecoObserver(strict=True).run(sys.argv[1])
    lines = ["v = 0\\n"] * 3000
    step = int(sys.argv[2])
    print("ready", flush=True)
    while True:
        lines[step % len(lines)] = f"v = {step}\\n"
        run.log_step(step, metrics={"loss": 1.0 / step}, code={"m.py": "".join(lines)})
        print(step, flush=True)
        step += 1
    """
)


def test_kill_9_during_sdk_log_loop(tmp_path, journal_path):
    rng = random.Random(SEED + 1)
    with Journal(journal_path) as j:
        run_id = j.create_run(source_code={"m.py": "v = 0\n" * 3000}, metric="loss")
    must_have = {0}
    next_step = 1
    deadline = time.monotonic() + 8
    rounds = 0
    while rounds < 20 and time.monotonic() < deadline:
        proc = subprocess.Popen(
            [sys.executable, "-c", SDK_LOOP, run_id, str(next_step)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(rng.uniform(0.01, 0.3))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
        returned = [int(line) for line in out.split()]
        assert err == "", err
        must_have.update(returned)
        have = check(journal_path, run_id, must_have)
        next_step = max(have) + 1
        rounds += 1
    assert rounds >= 5
    assert len(must_have) > rounds  # the loops did log between kills
