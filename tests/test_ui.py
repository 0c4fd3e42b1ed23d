"""``weco observe ui``: the real server as a subprocess on loopback, queried over HTTP."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


class UI:
    """A running ``weco observe ui --port 0``; ``url`` is where it listens."""

    def __init__(self, cwd: Path, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "weco_observe", "observe", "ui", "--port", "0", *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )
        self.banner = self.proc.stderr.readline()  # the server prints its URL once it is listening
        match = re.search(r"http://(\[[0-9a-f:]+\]|[\d.]+):(\d+)/", self.banner)
        assert match, f"no URL in {self.banner!r}"
        self.host, self.port = match.group(1).strip("[]"), int(match.group(2))
        self.url = match.group(0)

    def request(self, path: str, method: str = "GET", headers: dict | None = None) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request(method, path, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def json(self, path: str) -> object:
        status, _, body = self.request(path)
        assert status == 200, (path, status, body)
        return json.loads(body)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def ui(tmp_path: Path) -> Iterator[UI]:
    server = UI(tmp_path)
    yield server
    server.stop()


def _run(cli, tmp_path: Path, name: str = "ui demo") -> str:
    (tmp_path / "train.py").write_text("a = 1\n")
    run_id = cli.ok("observe", "init", "--name", name, "--metric", "loss", "--source", "train.py").stdout.strip()
    (tmp_path / "train.py").write_text("a = 2\n")
    cli.ok("observe", "log", "--run-id", run_id, "--step", "1", "--metrics", '{"loss": 0.5}', "--source", "train.py")
    return run_id


def test_ui_serves_runs_steps_and_diffs(cli, tmp_path, ui):
    run_id = _run(cli, tmp_path)
    status, headers, body = ui.request("/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'data-mode="ui"' in body and b"connect-src 'self'" in body

    runs = ui.json("/api/runs")
    assert [(r["id"], r["name"], r["steps"], r["best_step"]) for r in runs] == [(run_id, "ui demo", 2, 1)]
    view = ui.json(f"/api/runs/{run_id[:12]}")
    assert [s["step"] for s in view["steps"]] == [0, 1] and view["lanes"] == 1 and view["best"]["step"] == 1
    diff = ui.json(f"/api/runs/{run_id}/diff?step=1")
    assert diff["files"][0]["lines"][-2:] == ["-a = 1", "+a = 2"]

    status, _, body = ui.request("/api/runs/local-nope")
    assert status == 404 and "no run" in json.loads(body)["detail"]
    status, _, body = ui.request(f"/api/runs/{run_id}/diff?step=x")
    assert status == 400
    status, _, _ = ui.request("/nothing/here")
    assert status == 404


def test_ui_is_read_only_and_refuses_foreign_hosts(cli, tmp_path, ui, journal_path):
    _run(cli, tmp_path)
    before = journal_path.read_bytes()
    for method in ("POST", "PUT", "DELETE"):
        status, _, _ = ui.request("/api/runs", method=method)
        assert status == 405
    # A page on another origin that rebinds its DNS name to 127.0.0.1 sends its own Host: refused.
    status, _, _ = ui.request("/api/runs", headers={"Host": "evil.example:80"})
    assert status == 403
    status, _, _ = ui.request("/api/runs", headers={"Host": f"localhost:{ui.port}"})
    assert status == 200
    assert journal_path.read_bytes() == before


def test_ui_state_changes_when_a_step_is_logged(cli, tmp_path, ui):
    run_id = _run(cli, tmp_path)
    version = ui.json("/api/state")["version"]
    assert ui.json("/api/state")["version"] == version  # reading changes nothing
    cli.ok("observe", "log", "--run-id", run_id, "--step", "2", "--metrics", '{"loss": 0.25}')
    deadline = time.monotonic() + 5
    while ui.json("/api/state")["version"] == version:
        assert time.monotonic() < deadline, "the state version never changed"
        time.sleep(0.05)
    assert ui.json("/api/runs")[0]["best_step"] == 2


def test_ui_on_a_busy_port_is_a_one_line_error(cli, tmp_path, ui):
    result = cli("observe", "ui", "--port", str(ui.port))
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot listen on 127.0.0.1:") and "--port 0" in result.stderr
