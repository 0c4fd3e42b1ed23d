"""Shared fixtures: every test gets its own journal dir and HOME, and no network.

``WECO_OBSERVE_DIR`` and ``HOME`` point into ``tmp_path`` (so the credentials file
is private to the test), any API key or base URL from the outer environment is
removed, and background auto-sync is off unless a test turns it on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data = tmp_path / "weco-data"
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("WECO_OBSERVE_DIR", str(data))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WECO_OBSERVE_AUTO_SYNC", "0")
    for name in ("WECO_API_KEY", "WECO_BASE_URL", "WECO_DASHBOARD_URL", "WECO_OBSERVE_BUSY_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    return data


@pytest.fixture
def journal_path(isolated_env: Path) -> Path:
    return isolated_env / "journal.db"


class CLI:
    """Runs the real CLI as a subprocess (``python -m weco_observe ...``) in the test's env."""

    def __init__(self, cwd: Path):
        self.cwd = cwd

    def __call__(
        self, *args: str, input: str | None = None, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        full_env = dict(os.environ)
        full_env.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "weco_observe", *args],
            cwd=self.cwd,
            input=input,
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
        )

    def ok(self, *args: str, **kw) -> subprocess.CompletedProcess[str]:
        result = self(*args, **kw)
        assert result.returncode == 0, f"{args} exited {result.returncode}: {result.stderr}"
        return result


@pytest.fixture
def cli(tmp_path: Path) -> CLI:
    return CLI(tmp_path)
