"""The relay's team dashboard over HTTP: keys, sessions, CSRF, attribution and the live version.

A real relay (``weco observe serve --port 0``) runs as a subprocess on loopback; boxes are
real journals in folders of their own that ``weco observe sync`` to it, and keys are made
and revoked with the real CLI from other processes. The browser side is in
``test_relay_browser.py``, which uses the ``RelayProcess`` and ``Box`` defined here.
Session expiry is tested in-process, on the ASGI app with its clock moved.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import sqlite3
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest

pytest.importorskip("uvicorn", reason="the relay needs the 'server' extra (uvicorn)")


class RelayProcess:
    """A running ``weco observe serve --port 0 --data DATA``; ``url`` is its dashboard, ``api`` its /v1."""

    def __init__(self, data: Path, cwd: Path):
        self.data = data
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "weco_observe", "observe", "serve", "--port", "0", "--data", str(data)],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )
        line = self.proc.stdout.readline()  # printed once it is listening
        match = re.fullmatch(r"(http://127\.0\.0\.1:(\d+))/v1\n", line)
        if not match:
            self.stop()
            raise AssertionError(f"the relay printed no URL: {line!r}")
        self.port = int(match.group(2))
        self.url = match.group(1) + "/"
        self.api = match.group(1) + "/v1"

    def request(
        self, path: str, method: str = "GET", headers: dict | None = None, body: bytes | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def login(self, key: str, headers: dict | None = None) -> tuple[int, dict[str, str], bytes]:
        form = urlencode({"key": key}).encode()
        return self.request(
            "/login", "POST", {"content-type": "application/x-www-form-urlencoded", **(headers or {})}, form
        )

    def stop(self) -> str:
        """Stop it (SIGTERM, as systemd does) and return what it logged."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        log = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return log


def keys_add(cli, data: Path, name: str, read_only: bool = False) -> str:
    out = cli.ok("observe", "serve", "keys", "add", name, "--data", str(data), *(["--read-only"] if read_only else []))
    return out.stdout.strip()


class Box:
    """A training box: a journal of its own (``WECO_OBSERVE_DIR``) and a working folder, driven by the CLI."""

    def __init__(self, cli, root: Path, name: str):
        self.name = name
        self.work = root / name
        self.work.mkdir(parents=True)
        self.cli = type(cli)(self.work)  # run in the box's folder, so its code is tracked as train.py
        self.env = {"WECO_OBSERVE_DIR": str(root / name / "journal")}

    def _ok(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
        result = self.cli(*args, env={**self.env, **(env or {})})
        assert result.returncode == 0, f"{self.name}: {args} exited {result.returncode}: {result.stderr}"
        return result

    def init(self, name: str, metric: str, *extra: str, code: str = "lr = 0.1\n") -> str:
        (self.work / "train.py").write_text(code)
        return self._ok(
            "observe", "init", "--name", name, "--metric", metric, "--source", "train.py", *extra
        ).stdout.strip()

    def log(self, run_id: str, step: int, metrics: dict, *extra: str, code: str | None = None) -> None:
        args = ["observe", "log", "--run-id", run_id, "--step", str(step), "--metrics", json.dumps(metrics), *extra]
        if code is not None:
            (self.work / "train.py").write_text(code)
            args += ["--source", "train.py"]
        self._ok(*args)

    def sync(self, relay: RelayProcess, key: str) -> str:
        result = self._ok("observe", "sync", env={"WECO_BASE_URL": relay.api, "WECO_API_KEY": key})
        assert "0 pending, 0 rejected in total" in result.stderr, result.stderr
        return result.stderr


@pytest.fixture
def relay_data(tmp_path: Path) -> Path:
    return tmp_path / "relay"


@pytest.fixture
def relay(relay_data: Path, tmp_path: Path) -> Iterator[RelayProcess]:
    server = RelayProcess(relay_data, tmp_path)
    yield server
    server.stop()


def _session(headers: dict[str, str]) -> str:
    cookie = headers["set-cookie"]
    assert cookie.startswith("weco_relay=")
    return cookie.split(";")[0]


def _json(relay: RelayProcess, path: str, cookie: str) -> object:
    status, _, body = relay.request(path, headers={"cookie": cookie})
    assert status == 200, (path, status, body)
    return json.loads(body)


def test_the_dashboard_needs_a_key_and_a_revoked_one_ends_its_session(cli, tmp_path, relay_data):
    box_key = keys_add(cli, relay_data, "box-a")
    viewer_key = keys_add(cli, relay_data, "viewer", read_only=True)
    relay = RelayProcess(relay_data, tmp_path)
    try:
        box = Box(cli, tmp_path, "box-a")
        run = box.init("attributed", "loss")
        box.log(run, 0, {"loss": 1.0})
        box.sync(relay, box_key)

        # No key: the login page for a page, 401 JSON for the API.
        status, headers, body = relay.request("/")
        assert status == 200 and b'<form method="post" action="/login">' in body and b"data-mode" not in body
        status, headers, body = relay.request("/api/runs")
        assert status == 401 and headers["content-type"] == "application/json"
        assert json.loads(body) == {"detail": "open the dashboard with a key first"}
        assert headers["www-authenticate"].startswith("Bearer")

        # A wrong key: the login page again, with the error, as a 401 and without a cookie.
        status, headers, body = relay.login("wor_" + "x" * 43)
        assert status == 401 and b"That key is not valid here." in body and "set-cookie" not in headers

        # The read-only key opens a session: a cookie scripts cannot read nor other sites send.
        status, headers, _ = relay.login(viewer_key)
        assert status == 303 and headers["location"] == "/"
        flags = [p.strip() for p in headers["set-cookie"].split(";")[1:]]
        assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(flags) and "Max-Age=604800" in flags
        cookie = _session(headers)
        status, _, page = relay.request("/", headers={"cookie": cookie})
        assert status == 200 and b'data-mode="ui" data-dashboard="1"' in page and b'action="logout"' in page
        runs = _json(relay, "/api/runs", cookie)
        assert [(r["name"], r["key"]) for r in runs] == [("attributed", "box-a")]
        assert _json(relay, "/api/state", cookie)["viewer"] == "viewer"
        view = _json(relay, f"/api/runs/{runs[0]['id']}", cookie)
        assert view["run"]["key"] == "box-a" and view["run"]["relay_id"] == runs[0]["relay_id"]

        # It cannot log: the API refuses a read-only key with 403, and nothing was created.
        auth = {"authorization": f"Bearer {viewer_key}", "content-type": "application/json"}
        body = json.dumps({"source_code": {"a.py": "x"}, "metric_name": "loss", "maximize": False}).encode()
        status, _, answer = relay.request("/v1/external/runs", "POST", auth, body)
        assert status == 403 and b"read-only" in answer
        assert len(_json(relay, "/api/runs", cookie)) == 1
        # The same body with a box's key is a run: the refusal was the key's, not the body's.
        status, _, _ = relay.request("/v1/external/runs", "POST", {**auth, "authorization": f"Bearer {box_key}"}, body)
        assert status == 200
        # A box's own key opens the dashboard too, here as a Bearer header.
        status, _, answer = relay.request("/api/runs", headers={"authorization": f"Bearer {box_key}"})
        assert status == 200 and len(json.loads(answer)) == 2

        # Revoked by another process: the session ends at its next request.
        cli.ok("observe", "serve", "keys", "revoke", "viewer", "--data", str(relay_data))
        status, _, body = relay.request("/api/state", headers={"cookie": cookie})
        assert status == 401
        status, _, body = relay.request("/", headers={"cookie": cookie})
        assert status == 200 and b"Your session has ended" in body and b'action="/login"' in body
        status, _, _ = relay.login(viewer_key)
        assert status == 401
        status, _, _ = relay.request("/api/runs", headers={"authorization": f"Bearer {box_key}"})
        assert status == 200  # only that key went
    finally:
        log = relay.stop()
    assert " GET /api/runs 200 " in log  # the access log names the path, never the key


def test_login_and_logout_refuse_another_sites_request(cli, relay_data, relay):
    key = keys_add(cli, relay_data, "viewer", read_only=True)
    own = f"http://127.0.0.1:{relay.port}"
    for foreign in ({"sec-fetch-site": "cross-site"}, {"sec-fetch-site": "same-site"}, {"origin": "http://evil.test"}):
        status, headers, body = relay.login(key, foreign)
        assert status == 403 and "set-cookie" not in headers and b"own page" in body, foreign
    status, _, _ = relay.login("wor_" + "x" * 5000)  # read before any key is checked: kept small
    assert status == 413
    # What a browser sends from the relay's own login page (Origin is "null" under no-referrer).
    status, headers, _ = relay.login(key, {"sec-fetch-site": "same-origin", "origin": "null"})
    assert status == 303
    cookie = _session(headers)
    status, headers, _ = relay.login(key, {"origin": own, "host": f"127.0.0.1:{relay.port}"})
    assert status == 303
    other = _session(headers)

    status, _, _ = relay.request("/logout", "POST", {"cookie": cookie, "sec-fetch-site": "cross-site"})
    assert status == 403
    assert _json(relay, "/api/state", cookie)["viewer"] == "viewer"  # still logged in
    status, headers, _ = relay.request("/logout", "POST", {"cookie": cookie, "sec-fetch-site": "same-origin"})
    assert status == 303 and headers["location"] == "/" and "Max-Age=0" in headers["set-cookie"]
    status, _, _ = relay.request("/api/state", headers={"cookie": cookie})
    assert status == 401
    assert _json(relay, "/api/state", other)["viewer"] == "viewer"  # logging out ends that session only


def test_runs_carry_their_key_newest_activity_first_and_the_version_moves_on_sync(cli, tmp_path, relay_data):
    keys = {name: keys_add(cli, relay_data, name) for name in ("box-a", "box-b")}
    viewer = keys_add(cli, relay_data, "viewer", read_only=True)
    relay = RelayProcess(relay_data, tmp_path)
    try:
        a, b = Box(cli, tmp_path, "box-a"), Box(cli, tmp_path, "box-b")
        run_a = a.init("sweep a", "loss")
        a.log(run_a, 0, {"loss": 1.0})
        a.sync(relay, keys["box-a"])
        run_b = b.init("sweep b", "accuracy", "--goal", "maximize")
        b.log(run_b, 0, {"accuracy": 0.5})
        b.sync(relay, keys["box-b"])
        auth = "weco_relay=x; other=1"  # an unknown cookie is no session
        status, _, _ = relay.request("/api/runs", headers={"cookie": auth})
        assert status == 401
        cookie = _session(relay.login(viewer)[1])

        runs = _json(relay, "/api/runs", cookie)
        assert [(r["name"], r["key"], r["metric"], r["goal"]) for r in runs] == [
            ("sweep b", "box-b", "accuracy", "maximize"),
            ("sweep a", "box-a", "loss", "minimize"),
        ]
        version = _json(relay, "/api/state", cookie)["version"]
        assert _json(relay, "/api/state", cookie)["version"] == version  # reading moves nothing
        a.log(run_a, 1, {"loss": 0.5})
        assert _json(relay, "/api/state", cookie)["version"] == version  # a box's journal is not the relay's
        a.sync(relay, keys["box-a"])
        # The relay's writer thread commits on a connection of its own: the version must see it at once.
        assert _json(relay, "/api/state", cookie)["version"] != version
        runs = _json(relay, "/api/runs", cookie)
        assert [(r["name"], r["steps"], r["best_step"]) for r in runs] == [("sweep a", 2, 1), ("sweep b", 1, 0)]
    finally:
        relay.stop()


# -- sessions expire: in-process, with the app's clock moved ---------------------------------------


def _call(app, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, dict, bytes]:
    """One request through the ASGI app itself."""
    sent: list[dict] = []
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": b"",
        "scheme": "http",
        "client": ("127.0.0.1", 1),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    asyncio.run(app(scope, receive, send))
    start = sent[0]
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, sent[1]["body"]


_FORM = {"content-type": "application/x-www-form-urlencoded"}


def test_a_session_expires_when_idle_and_at_its_hard_limit(cli, relay_data):
    from weco_observe.relay import Relay

    key = keys_add(cli, relay_data, "viewer", read_only=True)
    app = Relay(relay_data, log=lambda line: None)
    app.startup()
    now = [1_000_000.0]
    app._clock = lambda: now[0]
    try:

        def login() -> str:
            form = urlencode({"key": key}).encode()
            status, headers, _ = _call(app, "POST", "/login", _FORM, form)
            assert status == 303
            return _session(headers)

        def state(cookie: str) -> int:
            return _call(app, "GET", "/api/state", {"cookie": cookie})[0]

        idle = login()
        now[0] += app.session_idle - 1
        assert state(idle) == 200  # used just in time: the idle clock starts again
        now[0] += app.session_idle - 1
        assert state(idle) == 200
        now[0] += app.session_idle + 1
        assert state(idle) == 401

        busy = login()
        started = now[0]
        while now[0] - started < app.session_max - 3600:  # a tab left open polls all week
            now[0] += 3600
            assert state(busy) == 200
        now[0] = started + app.session_max + 1
        assert state(busy) == 401
        assert app._auth.execute("SELECT count(*) FROM relay_sessions").fetchone()[0] == 0  # dropped, not kept
    finally:
        app.shutdown()


def test_the_runs_list_is_computed_once_per_version_and_again_after_a_commit(cli, relay_data):
    """Every open page refetches /api/runs when the version moves; one computation serves them all,
    and a group commit by the writer thread (another connection) makes the next request recompute."""
    from weco_observe.relay import Relay

    app = Relay(relay_data, log=lambda line: None)
    app.startup()
    try:
        first = app._api_data(["runs"], {})
        assert first == [] and app._api_data(["runs"], {}) is first
        body = {"source_code": {"a.py": "x = 1\n"}, "metric_name": "loss", "maximize": False, "name": "fresh"}
        relay_id = app.store.create(body, "box-a").result(timeout=10)
        second = app._api_data(["runs"], {})
        assert [(r["name"], r["key"], r["relay_id"]) for r in second] == [("fresh", "box-a", relay_id)]
        assert app._api_data(["runs"], {}) is second
    finally:
        app.shutdown()


def test_sessions_live_in_the_journal_so_a_restart_keeps_them_and_a_logout_ends_them_everywhere(
    cli, tmp_path, relay_data
):
    key = keys_add(cli, relay_data, "viewer", read_only=True)
    first = RelayProcess(relay_data, tmp_path)
    try:
        status, headers, _ = first.login(key)
        assert status == 303
        cookie = _session(headers)
        assert _json(first, "/api/state", cookie)["viewer"] == "viewer"
    finally:
        first.stop()
    with sqlite3.connect(relay_data / "journal.db") as conn:  # only the cookie's hash is kept
        (stored,) = conn.execute("SELECT id FROM relay_sessions").fetchone()
    assert stored != cookie.split("=", 1)[1] and len(stored) == 64
    second = RelayProcess(relay_data, tmp_path)
    try:
        assert _json(second, "/api/state", cookie)["viewer"] == "viewer"  # the restart kept it
        status, _, _ = second.request("/logout", "POST", {"cookie": cookie, "sec-fetch-site": "same-origin"})
        assert status == 303
        assert second.request("/api/state", headers={"cookie": cookie})[0] == 401
    finally:
        second.stop()


def test_every_worker_answers_the_same_version_and_each_sees_the_others_commits(cli, relay_data):
    """Two apps on one journal, as `serve --workers 2` runs them: the page may be answered by either,
    so the version must be one number, and move for a commit whichever worker made it."""
    from weco_observe.relay import Relay

    apps = [Relay(relay_data, log=lambda line: None) for _ in range(2)]
    for app in apps:
        app.startup()
    try:
        a, b = apps
        start = a._version()
        assert b._version() == a._version() == b._version()  # not one count per process
        steady = a._version()
        body = {"source_code": {"a.py": "x = 1\n"}, "metric_name": "loss", "maximize": False, "name": "on a"}
        a.store.create(body, "box-a").result(timeout=10)
        moved = b._version()
        assert moved > steady and a._version() >= moved  # b saw a's commit; a's own shows too
        settled = a._version()
        assert b._version() == settled == a._version()  # then it stays put
        assert [r["name"] for r in b._api_data(["runs"], {})] == ["on a"]
        assert start <= steady
    finally:
        for app in apps:
            app.shutdown()


def test_a_relay_journal_from_before_sessions_gains_their_table(relay_data):
    from weco_observe.relay import keys_add as add, open_journal

    key = add(relay_data, "viewer")
    with sqlite3.connect(relay_data / "journal.db") as conn:  # as the relay left it before r002
        conn.execute("DROP TABLE relay_sessions")
        conn.execute("DELETE FROM _sqlite_migrations WHERE name = 'r002_sessions'")
        assert {r[0] for r in conn.execute("SELECT name FROM _sqlite_migrations")} >= {"r001_keys_and_runs"}
    with open_journal(relay_data) as journal:
        assert journal.query("SELECT count(*) FROM relay_sessions")[0][0] == 0
        assert journal.query("SELECT name FROM relay_keys")[0][0] == "viewer"
    assert key.startswith("wor_")
