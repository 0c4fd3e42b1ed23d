"""`weco observe log` imports and builds only itself (issue 9, item 8).

Agents run `log` once per experiment, so its start-up is the cost users feel.
These tests run the real CLI in a subprocess and look at what it imported:
the other command modules and the heavy libraries must stay unloaded. Typer
0.29 imports pydantic while parsing (``log`` goes from 0.09 s to 0.18 s), which
is why pyproject pins ``typer<0.29``; a test here fails if that ever returns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

#: end to end: every CLI call here is a real process (start-up and imports are what is tested)
pytestmark = pytest.mark.subprocess_cli

OTHER_COMMAND_MODULES = ("weco_observe.cli_sync", "weco_observe.cli_views", "weco_observe.cli_bundle")
# Libraries only other commands need (pydantic: typer 0.29 parses through it).
LIBRARIES = ("httpx", "pydantic", "sqlite_utils", "tenacity")
# Plus rich, typer's help and error panels. Some typers (0.16) import it themselves at start-up,
# so it is checked among what was imported after `import typer` ("added").
HEAVY = (*LIBRARIES, "rich")

# Runs the CLI as `weco` does, then reports on stdout what the process imported and built.
WRAPPER = """
import json, sys
import typer.main
before = set(sys.modules)
from weco_observe import cli

built = []
build = typer.main.get_command_from_info

def counting(command_info, **kw):
    built.append(command_info.name)
    return build(command_info, **kw)

typer.main.get_command_from_info = counting
code = cli.run(cli.app, sys.argv[1:], prog_name="weco")
print(json.dumps({"code": code, "modules": sorted(sys.modules), "added": sorted(set(sys.modules) - before),
                  "built": built}))
"""


@pytest.fixture
def run_id(cli, tmp_path: Path) -> str:
    (tmp_path / "train.py").write_text("lr = 0.1\n")
    return cli.ok("observe", "init", "--metric", "loss", "-s", "train.py").stdout.strip()


def wrapped(tmp_path: Path, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def log_args(run_id: str, step: int) -> list[str]:
    return ["observe", "log", "--run-id", run_id, "--step", str(step), "-s", "train.py", "--metrics", '{"loss": 0.5}']


def test_log_imports_no_other_command_module(run_id, tmp_path):
    """The real entry point, timed by Python itself: every module it imported is listed by -X importtime."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "weco_observe", *log_args(run_id, 1)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "weco_observe.journal" in imported  # the listing is real: `log` did write the journal
    assert not imported & set(OTHER_COMMAND_MODULES)
    assert not {m for m in imported if m.split(".")[0] in LIBRARIES}
    assert "step 1 journaled" in done.stderr


def test_log_builds_only_the_log_command(run_id, tmp_path):
    report = wrapped(tmp_path, *log_args(run_id, 2))
    assert report["code"] == 0
    assert report["built"] == ["log"]
    assert not set(report["modules"]) & set(OTHER_COMMAND_MODULES)
    assert not {m for m in report["added"] if m.split(".")[0] in HEAVY}


def test_log_does_not_import_pydantic(run_id, tmp_path):
    """typer 0.29 imports pydantic while parsing and doubles the cost of `log`: pyproject pins typer<0.29."""
    report = wrapped(tmp_path, *log_args(run_id, 3))
    assert report["code"] == 0
    assert "weco_observe.journal" in report["modules"]
    assert "pydantic" not in report["modules"]
    assert not [m for m in report["modules"] if m.startswith("pydantic")]


def test_help_still_lists_every_command_in_table_order(cli):
    from weco_observe.cli import OBSERVE_COMMANDS

    out = cli.ok("observe", "--help").stdout
    # a row of the command list starts with the name; its continuation lines start with spaces
    rows = [line[2:].split()[0] for line in out.splitlines() if line.startswith("│ ") and line[2] != " "]
    listed = [name for name in rows if not name.startswith("-")]
    assert listed == list(OBSERVE_COMMANDS)


def test_a_mistyped_command_still_gets_a_suggestion(capsys):
    """Suggestions are chosen among the built commands, so an unknown name must build them all first."""
    from weco_observe import cli

    assert cli.run(cli.app, ["observe", "stat"], prog_name="weco") == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == ["error: No such command 'stat'. Did you mean 'status'? (see `weco observe --help`)"]


def test_shell_completion_still_offers_every_command(tmp_path):
    from weco_observe.cli import ACCOUNT_COMMANDS, OBSERVE_COMMANDS

    env = {**os.environ, "_WECO_OBSERVE_COMPLETE": "complete_bash", "COMP_WORDS": "weco-observe ", "COMP_CWORD": "1"}
    done = subprocess.run(
        [sys.executable, "-c", "from weco_observe.cli import main_observe; main_observe()"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [*OBSERVE_COMMANDS, *ACCOUNT_COMMANDS]  # the weco-observe script has both


def test_every_listed_command_builds():
    """A typo in a "module:function" entry would only show when that command runs."""
    import typer

    from weco_observe import cli

    for table, group in ((cli.OBSERVE_COMMANDS, cli.observe), (cli.TOP_COMMANDS, cli.app)):
        command = typer.main.get_command(group)
        ctx = typer.Context(command)
        for name in table:
            built = command.get_command(ctx, name)
            assert built is not None and built.name == name and built.help, name


# `init` and `log` end with os._exit when nothing needs the interpreter's teardown (cli._exit).
EXIT_PROBE = """
import atexit, os, sys

class Probe:
    def __del__(self, write=os.write):
        write(2, b"teardown ran\\n")

probe = Probe()  # collected by the interpreter's teardown, if it runs
atexit._clear()  # whatever the environment's .pth files registered at start-up (any one keeps the teardown)
if sys.argv[1] == "with-atexit":
    atexit.register(lambda: os.write(2, b"atexit ran\\n"))
from weco_observe.cli import main_weco
sys.argv = ["weco", *sys.argv[2:]]
main_weco()
"""


def probe(tmp_path: Path, mode: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", EXIT_PROBE, mode, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )


def test_init_and_log_skip_the_teardown_and_lose_no_output(tmp_path):
    (tmp_path / "train.py").write_text("lr = 0.1\n")
    init = probe(tmp_path, "plain", "observe", "init", "--metric", "loss", "-s", "train.py")
    assert init.returncode == 0, init.stderr
    assert "teardown ran" not in init.stderr
    run = init.stdout.strip()  # printed to a pipe (block-buffered), so flushed before os._exit
    assert run.startswith("local-") and init.stdout == run + "\n"
    log = probe(tmp_path, "plain", "observe", "log", "--run-id", run, "--step", "1", "-s", "train.py")
    assert log.returncode == 0, log.stderr
    assert log.stderr == "weco-observe: step 1 journaled (parent 0)\n"
    from weco_observe.journal import Journal

    with Journal() as journal:
        assert [s["step"] for s in journal.steps(journal.require_run(run)["id"])] == [0, 1]


def test_other_commands_and_failures_keep_the_teardown(tmp_path):
    status = probe(tmp_path, "plain", "observe", "status", "--json")
    assert status.returncode == 0 and "teardown ran" in status.stderr
    bad = probe(tmp_path, "plain", "observe", "log", "--run-id", "local-x", "--step", "-1")
    assert bad.returncode == 2
    error, teardown = bad.stderr.splitlines()
    assert error.startswith("error: --step ") and teardown == "teardown ran"


def test_an_atexit_callback_keeps_the_teardown(tmp_path):
    (tmp_path / "train.py").write_text("lr = 0.1\n")
    init = probe(tmp_path, "with-atexit", "observe", "init", "--metric", "loss", "-s", "train.py")
    assert init.returncode == 0, init.stderr
    assert "atexit ran" in init.stderr and "teardown ran" in init.stderr
