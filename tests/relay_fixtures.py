"""A real relay process on loopback, for tests: ``Relay.start(data_dir, *flags)``.

The relay runs as ``python -m weco_observe observe serve --port 0 ...`` and prints
its API URL on stdout once it listens; ``stop()`` sends SIGTERM (a graceful stop)
and ``kill()`` SIGKILL. Keys are made with the real CLI before it starts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest


def relay_cli(data: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "weco_observe", "observe", "serve", *args, "--data", str(data)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def add_key(data: Path, name: str, *flags: str) -> str:
    made = relay_cli(data, "keys", "add", name, *flags)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


class RelayProcess:
    """One relay subprocess; ``base_url`` is its ``.../v1``."""

    def __init__(self, data: Path, *flags: str, env: dict[str, str] | None = None):
        self.data = data
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "weco_observe", "observe", "serve", "--port", "0", "--data", str(data), *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.log: list[str] = []
        line = self._first_line()
        assert line.startswith(("http://", "https://")), f"relay did not start: {line!r} {''.join(self.log)}"
        self.base_url = line.strip()
        self.url = self.base_url.removesuffix("/v1")
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _first_line(self) -> str:
        assert self.proc.stdout is not None
        timer = threading.Timer(30, self.proc.kill)  # bounded: a relay that never listens fails the test
        timer.start()
        try:
            line = self.proc.stdout.readline()
        finally:
            timer.cancel()
        if not line and self.proc.stderr is not None:
            self.log.append(self.proc.stderr.read())
        return line

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def env(self, key: str) -> dict[str, str]:
        return {"WECO_BASE_URL": self.base_url, "WECO_API_KEY": key}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=10)
        self._close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._close()

    def _close(self) -> None:
        self._reader.join(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()


@pytest.fixture
def relay_data(tmp_path: Path) -> Path:
    return tmp_path / "relay"


@pytest.fixture
def relays():
    """Start relays with ``relays(data, *flags)``; all are stopped after the test."""
    started: list[RelayProcess] = []

    def start(data: Path, *flags: str, env: dict[str, str] | None = None) -> RelayProcess:
        relay = RelayProcess(data, *flags, env=env)
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.kill()
