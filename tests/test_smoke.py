"""End to end through the real CLI, one process per call: every command of a day's work.

Most other tests run the CLI in-process (the ``cli`` fixture); these are the ones that start
``python -m weco_observe`` for each call, as users and agents do.
"""

from __future__ import annotations

import json
import zipfile

import pytest

from emulator_fixtures import emulator  # noqa: F401

pytestmark = pytest.mark.subprocess_cli


def test_init_log_status(cli, tmp_path):
    (tmp_path / "train.py").write_text("x = 1\n")
    run_id = cli.ok("observe", "init", "--metric", "loss", "--source", "train.py").stdout.strip()
    assert run_id.startswith("local-")
    cli.ok("observe", "log", "--run-id", run_id, "--step", "1", "--metrics", '{"loss": 0.5}')
    status = json.loads(cli.ok("observe", "status", "--json").stdout)
    assert status["runs"] == 1
    assert status["steps"] == 2
    assert status["events"]["pending"] == 2


def test_every_command_in_its_own_process(cli, tmp_path, emulator):  # noqa: F811
    assert not cli.in_process
    (tmp_path / "train.py").write_text("lr = 0.1\n")
    run = cli.ok("observe", "init", "--name", "e2e", "--metric", "loss", "--source", "train.py").stdout.strip()
    (tmp_path / "train.py").write_text("lr = 0.2\n")
    cli.ok("observe", "log", "--run-id", run, "--step", "1", "--metrics", '{"loss": 0.5}', "--source", "train.py")
    cli.ok("observe", "log", "--run-id", run, "--step", "2", "--status", "failed", "--description", "oom")
    assert run in cli.ok("observe", "runs").stdout
    shown = cli.ok("observe", "show", run).stdout
    assert "oom" in shown and "0.5" in shown
    assert "+lr = 0.2" in cli.ok("observe", "diff", run, "1", "--color", "never").stdout
    exported = json.loads(cli.ok("observe", "export", run).stdout)
    assert [s["step"] for s in exported["steps"]] == [0, 1, 2]
    cli.ok("observe", "report", run, "-o", str(tmp_path / "r.html"))
    assert "e2e" in (tmp_path / "r.html").read_text()
    assert cli.ok("observe", "doctor").returncode == 0
    cli.ok("observe", "bundle", "-o", str(tmp_path / "b.weco"))
    assert zipfile.is_zipfile(tmp_path / "b.weco")
    other = {"WECO_OBSERVE_DIR": str(tmp_path / "other")}
    cli.ok("observe", "import", str(tmp_path / "b.weco"), env=other)
    assert run in cli.ok("observe", "runs", env=other).stdout
    cli.ok("observe", "sync", env=emulator.env())
    (server_run,) = emulator.runs()
    assert sorted(emulator.runs()[server_run]["steps"]) == [0, 1, 2]
    cli.ok("observe", "discard", "--rejected")  # nothing rejected: says so, exits 0
    status = json.loads(cli.ok("observe", "status", "--json").stdout)
    assert status["events"]["pending"] == 0 and status["events"]["delivered"] == 3
