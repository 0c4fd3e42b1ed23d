"""What a new user meets in the first hour (issue 10, item 13, the CLI parts), one section per loose end.

End-to-end cases run the real CLI as a subprocess (the `cli` fixture runs
`python -m weco_observe`; the console scripts are run through their entry
points); the rest call `weco_observe.cli.run` in-process on the test's own
journal, or the formatting functions with real library results.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


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
    skill = tmp_path / "home" / ".claude" / "skills" / "weco-observe" / "SKILL.md"
    result = cli.ok("setup", "claude-code")
    assert result.stderr.strip() == f"installed {skill}"
    assert skill.read_text().startswith("---\nname: weco-observe\n")
    assert cli.ok("observe", "setup", "claude-code").stderr.strip() == f"unchanged {skill}"
    # the same flags: --print, --project
    assert cli.ok("setup", "cursor", "--print").stdout == cli.ok("observe", "setup", "cursor", "--print").stdout
    cli.ok("setup", "codex", "--project")
    assert (tmp_path / ".agents" / "skills" / "weco-observe" / "SKILL.md").is_file()


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
