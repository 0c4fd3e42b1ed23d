"""The README's main job (examples/agent_loop.py) runs end to end: offline logging, local tree, sync to the emulator."""

from __future__ import annotations

import pytest

import subprocess
import sys
from pathlib import Path

#: end to end: every CLI call here is a real process (kills, signals, start-up, entry points)
pytestmark = pytest.mark.subprocess_cli

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "agent_loop.py"


def test_agent_loop_offline_then_synced(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--dir", str(tmp_path / "demo"), "--steps", "6"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "sync while offline: exit 4" in out
    assert "[Baseline (step 0)]" in out
    assert "with all 7 steps, statuses, metrics and parents equal to the journal" in out
    assert (tmp_path / "demo" / "journal" / "journal.db").exists()
