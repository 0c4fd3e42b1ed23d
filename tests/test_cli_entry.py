"""What a new user meets in the first hour (issue 10, item 13, the CLI parts), one section per loose end.

End-to-end cases run the real CLI as a subprocess (the `cli` fixture runs
`python -m weco_observe`; the console scripts are run through their entry
points); the rest call `weco_observe.cli.run` in-process on the test's own
journal, or the formatting functions with real library results.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import weco_observe
from weco_observe import cli as cli_module
from weco_observe import outbox
from weco_observe.journal import Journal

#: end to end: every CLI call here is a real process (kills, signals, start-up, entry points)
pytestmark = pytest.mark.subprocess_cli

ROOT = Path(__file__).resolve().parents[1]


def weco_observe_script(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The `weco-observe` console script, run from source the way its entry point does."""
    return subprocess.run(
        [sys.executable, "-c", "from weco_observe.cli import main_observe; main_observe()", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def weco_script(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The `weco` console script (entry point `main_weco`)."""
    return subprocess.run(
        [sys.executable, "-c", "from weco_observe.cli import main_weco; main_weco()", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def run_id(cli, tmp_path: Path) -> str:
    (tmp_path / "train.py").write_text("lr = 0.1\n")
    return cli.ok("observe", "init", "--metric", "loss", "-s", "train.py").stdout.strip()


# -- 1. `weco setup`, as the official guide spells it -------------------------


def test_weco_setup_installs_the_skill_like_weco_observe_setup(cli, tmp_path):
    skill = tmp_path / "home" / ".claude" / "skills" / "weco" / "SKILL.md"
    result = cli.ok("setup", "claude-code")
    assert result.stderr.strip() == f"installed {skill}"
    assert skill.read_text().startswith("---\nname: weco\n")
    assert cli.ok("observe", "setup", "claude-code").stderr.strip() == f"unchanged {skill}"
    # the same flags: --print, --project
    assert cli.ok("setup", "cursor", "--print").stdout == cli.ok("observe", "setup", "cursor", "--print").stdout
    cli.ok("setup", "codex", "--project")
    assert (tmp_path / ".agents" / "skills" / "weco" / "SKILL.md").is_file()


# -- 2. a bare group prints its help and succeeds -------------------------------


@pytest.mark.parametrize("group", [[], ["observe"]])
def test_bare_weco_and_weco_observe_print_help_and_exit_0(cli, group):
    bare = cli(*group)
    assert bare.returncode == 0, bare.stderr
    assert bare.stderr == ""  # no "error:  (see ...)" with an empty message
    assert "Usage:" in bare.stdout and "Commands" in bare.stdout
    assert bare.stdout == cli.ok(*group, "--help").stdout


def test_bare_weco_observe_script_prints_help_and_exits_0(tmp_path):
    bare = weco_observe_script(cwd=tmp_path)
    assert bare.returncode == 0, bare.stderr
    assert bare.stderr == ""
    assert bare.stdout.lstrip().startswith("Usage: weco-observe ")
    assert bare.stdout == weco_observe_script("--help", cwd=tmp_path).stdout


def test_bare_group_in_process(capsys):
    assert cli_module.run(cli_module.app, ["observe"], prog_name="weco") == 0
    out, err = capsys.readouterr()
    assert "Usage: weco observe" in out and "log" in out and err == ""


# -- 3. --version ---------------------------------------------------------------


def test_version_matches_the_package_metadata():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert weco_observe.__version__ == project["version"]


@pytest.mark.parametrize("args", [["--version"], ["observe", "--version"]])
def test_weco_version(cli, args):
    result = cli.ok(*args)
    assert result.stdout == f"weco-observe {weco_observe.__version__}\n"
    assert result.stderr == ""


def test_weco_observe_script_version(tmp_path):
    result = weco_observe_script("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"weco-observe {weco_observe.__version__}\n"


def test_version_builds_no_command_and_opens_no_journal(tmp_path):
    code = (
        "import sys\n"
        "from weco_observe import cli\n"
        "rc = cli.run(cli.app, ['observe', '--version'], prog_name='weco')\n"
        "print(rc, sorted(m for m in sys.modules if m.startswith('weco_observe.') and m != 'weco_observe.cli'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    version, report = done.stdout.splitlines()
    assert version == f"weco-observe {weco_observe.__version__}"
    assert report == "0 ['weco_observe.errors', 'weco_observe.settings', 'weco_observe.validate']"


# -- 4. weco-observe login / logout ----------------------------------------------


def test_weco_observe_login_and_logout(tmp_path):
    credentials = tmp_path / "home" / ".config" / "weco" / "credentials.json"
    login = weco_observe_script("login", "--api-key", "wk-test-123", cwd=tmp_path)
    assert login.returncode == 0, login.stderr
    assert json.loads(credentials.read_text()) == {"api_key": "wk-test-123"}
    assert credentials.stat().st_mode & 0o777 == 0o600
    logout = weco_observe_script("logout", cwd=tmp_path)
    assert logout.returncode == 0, logout.stderr
    assert logout.stderr.strip() == f"Removed {credentials}."
    assert not credentials.exists()


def test_weco_observe_login_reads_the_key_from_stdin(tmp_path):
    credentials = tmp_path / "home" / ".config" / "weco" / "credentials.json"
    done = subprocess.run(
        [sys.executable, "-c", "from weco_observe.cli import main_observe; main_observe()", "login"],
        cwd=tmp_path,
        input="wk-from-stdin\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(credentials.read_text()) == {"api_key": "wk-from-stdin"}


# -- 5. `python -m weco_observe` names itself ------------------------------------


def test_python_m_names_what_the_user_typed(cli, tmp_path):
    assert cli.ok("--help").stdout.lstrip().startswith("Usage: python -m weco_observe [OPTIONS] COMMAND")
    typo = cli("observe", "stat")
    assert typo.returncode == 2
    assert typo.stderr.strip().endswith("(see `python -m weco_observe observe --help`)")
    # the `weco` script still calls itself weco
    assert weco_script("--help", cwd=tmp_path).stdout.lstrip().startswith("Usage: weco [OPTIONS] COMMAND")


# -- 6. step options look like integers, and still parse as text -----------------


def test_step_options_show_an_integer_metavar():
    from typer.testing import CliRunner

    result = CliRunner().invoke(cli_module.app, ["observe", "log", "--help"], prog_name="weco")
    assert result.exit_code == 0, result.output
    for flag in ("--step ", "--parent-step "):
        (line,) = [row for row in result.output.splitlines() if flag in row]
        assert "<int>" in line and "<str>" not in line and "TEXT" not in line, line


def test_step_is_still_checked_by_weco_observe_with_a_one_line_error(capsys):
    rc = cli_module.run(cli_module.app, ["observe", "log", "--run-id", "local-x", "--step", "two"], prog_name="weco")
    assert rc == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "error: --step must be a whole number, got 'two'\n"


# -- 7. plurals ------------------------------------------------------------------


def test_export_of_one_step_says_step(cli, run_id, tmp_path):
    assert cli.ok("observe", "export", run_id, "-o", "out.json").stderr.strip() == "wrote 1 step to out.json"
    assert len(json.loads((tmp_path / "out.json").read_text())["steps"]) == 1


def test_dry_run_of_one_request_says_request(cli, run_id):
    assert cli.ok("observe", "sync", "--dry-run").stderr.strip().splitlines()[-1] == "1 request would be sent"


def test_offline_sync_of_one_event_says_event_waits(cli, run_id):
    env = {"WECO_API_KEY": "k", "WECO_BASE_URL": "http://127.0.0.1:9/v1"}
    result = cli("observe", "sync", env=env)
    assert result.returncode == 4
    assert "http://127.0.0.1:9/v1: 1 event waits in the journal" in result.stderr


def test_status_with_one_failed_attempt_says_event_has(run_id, journal_path, capsys):
    with Journal(journal_path) as j:
        (event,) = j.query("SELECT id FROM events")
        outbox.failed(j, event["id"], "HTTP 503")
    assert cli_module.run(cli_module.app, ["observe", "status"], prog_name="weco") == 0
    out = capsys.readouterr().out
    assert "retrying:       1 pending event has failed before; last error: HTTP 503" in out


def test_sync_summary_and_import_lines_count_one_in_the_singular():
    from weco_observe import cli_bundle, cli_sync
    from weco_observe.replay import PassResult

    lines = cli_sync._summary_lines(PassResult(pending=1, possible_duplicates=1, last_error="HTTP 500"))
    assert "warning: 1 event still pending after retries; last error: HTTP 500" in lines
    assert any(line.startswith("warning: 1 run may have a duplicate on the server") for line in lines)
    summary = {
        "already_imported": False,
        "path": "b.weco",
        "bundle_id": "B",
        "source": "box",
        "runs_new": 1,
        "runs_known": 0,
        "events_new": 1,
        "events_pending": 1,
        "events_known": 0,
        "steps_updated": 1,
        "blobs_new": 1,
        "server_ids_adopted": 1,
        "conflicts": [],
    }
    first, adopted = cli_bundle.import_lines(summary)
    assert first.endswith(
        ": 1 new run, 0 already known, 1 new event (1 to sync), 0 already here, 1 step updated, 1 new code blob"
    )
    assert adopted == "1 run was already synced from the other box: its new steps go to the same server run"
    many = cli_bundle.import_lines({**summary, "runs_new": 2, "server_ids_adopted": 2})
    assert "2 new runs" in many[0] and many[1].startswith("2 runs were already synced")


def test_progress_bar_counts_one_event(monkeypatch):
    from weco_observe import cli_sync

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    update = cli_sync._progress_bar(1)
    assert update is not None
    update(1)
    assert screen.getvalue().endswith("] 1/1 event\n")


# -- 8. a re-log says "updated" ----------------------------------------------------


def test_relog_says_updated(cli, run_id):
    first = cli.ok("observe", "log", "--run-id", run_id, "--step", "1", "--metrics", '{"loss": 0.5}')
    assert first.stderr.strip() == "weco-observe: step 1 journaled (parent 0)"
    again = cli.ok("observe", "log", "--run-id", run_id, "--step", "1", "--metrics", '{"loss": 0.4}')
    assert again.stderr.strip() == "weco-observe: step 1 updated (parent 0)"
    # init journaled step 0, so logging the baseline's metrics updates it
    baseline = cli.ok("observe", "log", "--run-id", run_id, "--step", "0", "--metrics", '{"loss": 0.9}')
    assert baseline.stderr.strip() == "weco-observe: step 0 updated (baseline)"


def test_log_step_reports_whether_the_step_existed(journal_path):
    with Journal(journal_path) as j:
        run = j.create_run(source_code={"train.py": "x = 1\n"}, metric="loss")
        assert j.log_step(run, 1)["updated"] is False
        assert j.log_step(run, 1, status="failed")["updated"] is True
        assert j.log_step(run, 0)["updated"] is True
