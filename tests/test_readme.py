"""The README's CLI reference is generated from the commands (see tests/cli_reference.py) and must be current."""

from __future__ import annotations

import subprocess
import sys

import cli_reference


def test_cli_reference_is_current():
    text = cli_reference.README.read_text(encoding="utf-8")
    assert cli_reference.current_block(text) == cli_reference.render(), (
        "README CLI reference is stale: run `python tests/cli_reference.py --write`"
    )


def test_every_command_is_documented():
    text = cli_reference.README.read_text(encoding="utf-8")
    paths = [" ".join(path) for path, _ in cli_reference.commands() if len(path) > 1]
    assert len(paths) >= 6
    missing = [p for p in paths if f"### `{p}`" not in text]
    assert not missing, f"commands missing from README: {missing}"


def test_help_runs_for_every_command():
    for path, _command in cli_reference.commands():
        args = [*path[1:], "--help"]
        result = subprocess.run(
            [sys.executable, "-m", "weco_observe", *args], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, (args, result.stderr)
        assert "Usage" in result.stdout
