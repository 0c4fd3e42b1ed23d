"""`weco login` / `weco logout` (issue item 7) and the rule that the key never leaks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from helpers import totals
import pytest

from weco_observe.journal import Journal

#: end to end: every CLI call here is a real process (kills, signals, start-up, entry points)
pytestmark = pytest.mark.subprocess_cli

KEY = "wk-test-" + uuid.uuid4().hex
ENV_KEY = "wk-env-" + uuid.uuid4().hex


@pytest.fixture
def creds(isolated_env, tmp_path) -> Path:
    return tmp_path / "home" / ".config" / "weco" / "credentials.json"


def test_login_with_api_key_flag(cli, creds):
    result = cli.ok("login", "--api-key", KEY)
    assert json.loads(creds.read_text()) == {"api_key": KEY}
    assert creds.stat().st_mode & 0o777 == 0o600
    assert creds.parent.stat().st_mode & 0o077 == 0
    assert KEY not in result.stdout + result.stderr


def test_login_from_stdin(cli, creds):
    result = cli.ok("login", input=KEY + "\n")
    assert json.loads(creds.read_text()) == {"api_key": KEY}
    assert creds.stat().st_mode & 0o777 == 0o600
    assert KEY not in result.stdout + result.stderr


def test_login_with_hidden_prompt(tmp_path, creds):
    """A real terminal: the key is typed at a getpass prompt and not echoed."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # child: the CLI on a pseudo-terminal
        os.execv(sys.executable, [sys.executable, "-m", "weco_observe", "login"])
    import select
    import time

    def read(until: bytes | None) -> bytes:
        """Read the terminal until ``until`` shows up (or EOF), for at most 30 s."""
        out, deadline = b"", time.monotonic() + 30
        while time.monotonic() < deadline and (until is None or until not in out):
            if not select.select([fd], [], [], 0.5)[0]:
                continue
            try:
                chunk = os.read(fd, 1024)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        return out

    try:
        output = read(b"API key")
        assert b"API key" in output
        os.write(fd, KEY.encode() + b"\n")
        output += read(None)
    finally:
        deadline = time.monotonic() + 10
        while not (reaped := os.waitpid(pid, os.WNOHANG))[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        if not reaped[0]:
            os.kill(pid, 9)
            reaped = os.waitpid(pid, 0)
        status = reaped[1]
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, output
    assert KEY.encode() not in output  # hidden
    assert json.loads(creds.read_text()) == {"api_key": KEY}


def test_login_overwrites_and_logout_removes(cli, creds):
    cli.ok("login", "--api-key", "first-key")
    cli.ok("login", "--api-key", KEY)
    assert json.loads(creds.read_text()) == {"api_key": KEY}
    assert creds.stat().st_mode & 0o777 == 0o600
    assert "Removed" in cli.ok("logout").stderr
    assert not creds.exists()
    assert "No saved API key" in cli.ok("logout").stderr


@pytest.mark.parametrize("given", ["", "   \n", "two words"])
def test_login_refuses_empty_or_spaced_key(cli, creds, given):
    result = cli("login", "--api-key", given) if given != "   \n" else cli("login", input=given)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert not creds.exists()
    if given.strip():
        assert given not in result.stderr


def test_env_key_wins_over_file(cli, creds):
    cli.ok("login", "--api-key", KEY)
    info = json.loads(cli.ok("observe", "status", "--json", env={"WECO_API_KEY": ENV_KEY}).stdout)
    assert info["api_key_configured"] is True
    assert "WECO_API_KEY" in info["api_key_source"]
    from weco_observe.settings import Settings

    assert Settings.load({**os.environ, "WECO_API_KEY": ENV_KEY}).api_key == ENV_KEY
    assert Settings.load().api_key == KEY
    result = cli.ok("login", "--api-key", KEY, env={"WECO_API_KEY": ENV_KEY})
    assert "WECO_API_KEY" in result.stderr and ENV_KEY not in result.stderr


def test_status_reports_the_key_without_showing_it(cli, creds):
    assert "not configured" in cli.ok("observe", "status").stdout
    cli.ok("login", "--api-key", KEY)
    text = cli.ok("observe", "status").stdout
    as_json = cli.ok("observe", "status", "--json").stdout
    assert json.loads(as_json)["api_key_configured"] is True
    assert str(creds) in text
    assert KEY not in text and KEY not in as_json


def test_official_client_credentials_file_is_read(cli, creds):
    """A key saved by the official `weco login` (same file, same shape) is picked up."""
    creds.parent.mkdir(parents=True)
    creds.write_text(json.dumps({"api_key": KEY}))
    info = json.loads(cli.ok("observe", "status", "--json").stdout)
    assert info["api_key_configured"] is True


@pytest.mark.parametrize("content", ["not json", "[1]", '{"api_key": 3}', '{"api_key": ""}'])
def test_broken_credentials_file_means_no_key(cli, creds, content):
    creds.parent.mkdir(parents=True)
    creds.write_text(content)
    assert json.loads(cli.ok("observe", "status", "--json").stdout)["api_key_configured"] is False


def test_key_never_reaches_journal_spill_or_output(cli, creds, tmp_path, journal_path):
    """Log with a key in the file, in the env and in the SDK; grep every byte written."""
    cli.ok("login", "--api-key", KEY)
    (tmp_path / "train.py").write_text("x = 1\n")
    env = {"WECO_API_KEY": ENV_KEY, "TMPDIR": str(tmp_path)}
    outputs = []
    init = cli.ok("observe", "init", "--metric", "loss", "-s", "train.py", env=env)
    run = init.stdout.strip()
    outputs.append(init)
    outputs.append(cli.ok("observe", "log", "--run-id", run, "--step", "1", "-s", "train.py", env=env))
    outputs.append(cli("observe", "log", "--run-id", run, "--step", "1", "--metrics", "bad", env=env))
    outputs.append(cli("observe", "log", "--run-id", "local-unknown", "--step", "1", env=env))
    outputs.append(cli.ok("observe", "status", env=env))
    outputs.append(cli.ok("observe", "status", "--json", env=env))
    # a spill (lock held) must not carry the key either
    import sqlite3

    conn = sqlite3.connect(journal_path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    spilled = cli("observe", "log", "--run-id", run, "--step", "2", env={**env, "WECO_OBSERVE_BUSY_TIMEOUT": "0.1"})
    outputs.append(spilled)
    spill_bytes = b"".join(p.read_bytes() for p in journal_path.parent.glob("spill/*.json"))
    assert spill_bytes  # there is a spill file to check
    conn.execute("ROLLBACK")
    conn.close()
    sdk = subprocess.run(
        [
            sys.executable,
            "-c",
            "from weco_observe import WecoObserver\n"
            f"obs = WecoObserver(api_key={KEY!r})\n"
            f"run = obs.run({run!r})\n"
            "run.log_step(3, metrics={'loss': 0.1})\n"
            "run.log_step(-3)\n",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    outputs.append(sdk)
    with Journal(journal_path) as j:
        assert totals(j)["steps"] == 4
        j.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for result in outputs:
        for key in (KEY, ENV_KEY):
            assert key not in result.stdout and key not in result.stderr
    written = b"".join(p.read_bytes() for p in journal_path.parent.rglob("*") if p.is_file()) + spill_bytes
    assert written
    for key in (KEY, ENV_KEY):
        assert key.encode() not in written


def _echo_server(mode: str):
    """A hostile API on loopback that quotes the request's Authorization header in every error."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            auth = self.headers.get("Authorization", "")
            if mode == "create-ok" and self.path.endswith("/external/runs"):
                body, code = {"run_id": str(uuid.uuid4())}, 200
            else:
                code = {"reject": 422, "auth": 401, "create-ok": 422}[mode]
                body = {"detail": f"bad request with header {auth!r}"}
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


@pytest.mark.parametrize("mode", ["reject", "auth", "create-ok"])
def test_key_echoed_by_the_server_is_not_stored_or_printed(cli, creds, tmp_path, journal_path, mode):
    """Even an API that quotes the key back in its error `detail` must not get it into the
    journal (last_error), sync's output or `status`."""
    cli.ok("login", "--api-key", KEY)
    (tmp_path / "train.py").write_text("x = 1\n")
    run = cli.ok("observe", "init", "--metric", "loss", "-s", "train.py").stdout.strip()
    cli.ok("observe", "log", "--run-id", run, "--step", "1")
    server, thread = _echo_server(mode)
    try:
        env = {"WECO_BASE_URL": f"http://127.0.0.1:{server.server_address[1]}/v1"}
        synced = cli("observe", "sync", "--json", env=env, timeout=120)
        status = cli.ok("observe", "status", env=env)
        status_json = cli.ok("observe", "status", "--json", env=env)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert synced.returncode != 0  # nothing was accepted
    for result in (synced, status, status_json):
        assert KEY not in result.stdout and KEY not in result.stderr, (mode, result.stdout, result.stderr)
    with Journal(journal_path) as j:
        errors = [r["last_error"] for r in j.query("SELECT last_error FROM events WHERE last_error IS NOT NULL")]
        j.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert all(KEY not in e for e in errors), errors
    written = b"".join(p.read_bytes() for p in journal_path.parent.rglob("*") if p.is_file())
    assert KEY.encode() not in written


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422, 429, 500, 503])
@pytest.mark.parametrize("body", ["json-detail", "json-other", "text"])
def test_classify_blanks_the_key_out_of_every_error(status, body):
    """Every error class (rejected, auth, transient) and body shape; the retry path of a 5xx is
    too slow to drive end to end here, so this checks what it would store."""
    import httpx

    from weco_observe import api
    from weco_observe.errors import WecoObserveError

    echoed = f"token Bearer {KEY} is not valid"
    response = {
        "json-detail": lambda: httpx.Response(status, json={"detail": echoed}),
        "json-other": lambda: httpx.Response(status, json={"error": echoed}),
        "text": lambda: httpx.Response(status, text=echoed),
    }[body]()
    with pytest.raises(WecoObserveError) as caught:
        api.classify(response, secret=KEY)
    assert KEY not in str(caught.value)
    assert KEY not in (getattr(caught.value, "detail", None) or "")
