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
    """Runs the real CLI as a subprocess (``python -m weco_observe ...``) in the test's env.

    With ``in_process=True`` (the ``cli`` fixture, unless the test is marked ``subprocess_cli``) the
    same arguments go through ``weco_observe.cli.run`` in this process instead, with this call's
    environment, working folder, stdin, stdout and stderr swapped in for the call: the same
    command code and the same exit codes, without a Python start-up per call. What needs a
    process of its own (a kill, a signal, the import cost, the exit teardown, a second user)
    calls :meth:`subprocess` or is marked ``subprocess_cli``.
    """

    def __init__(self, cwd: Path, in_process: bool = False):
        self.cwd = cwd
        self.in_process = in_process

    def __call__(
        self, *args: str, input: str | None = None, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        if self.in_process:
            return self.inside(*args, input=input, env=env)
        return self.subprocess(*args, input=input, env=env, timeout=timeout)

    def subprocess(
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

    def inside(
        self, *args: str, input: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        import io
        import traceback

        from weco_observe import cli as cli_module

        def stream() -> io.TextIOWrapper:
            return io.TextIOWrapper(io.BytesIO(), encoding="utf-8", newline="\n", write_through=True)

        out, err = stream(), stream()
        saved_env, saved_cwd = dict(os.environ), os.getcwd()
        saved_streams = sys.stdin, sys.stdout, sys.stderr
        os.environ.update(env or {})
        os.chdir(self.cwd)
        sys.stdin = io.TextIOWrapper(io.BytesIO((input or "").encode()), encoding="utf-8")
        sys.stdout, sys.stderr = out, err
        try:
            code = cli_module.run(cli_module.app, list(args), prog_name="python -m weco_observe")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception:  # what a process would print before exiting 1
            traceback.print_exc()
            code = 1
        finally:
            sys.stdin, sys.stdout, sys.stderr = saved_streams
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)
        texts = []
        for stream_ in (out, err):
            stream_.flush()
            texts.append(stream_.buffer.getvalue().decode("utf-8", "replace"))  # type: ignore[attr-defined]
        return subprocess.CompletedProcess(["weco", *args], code, texts[0], texts[1])

    def ok(self, *args: str, **kw) -> subprocess.CompletedProcess[str]:
        result = self(*args, **kw)
        assert result.returncode == 0, f"{args} exited {result.returncode}: {result.stderr}"
        return result


@pytest.fixture
def cli(tmp_path: Path, request: pytest.FixtureRequest) -> CLI:
    """The CLI, in this process unless the test (or its module) is marked ``subprocess_cli``."""
    return CLI(tmp_path, in_process=request.node.get_closest_marker("subprocess_cli") is None)
