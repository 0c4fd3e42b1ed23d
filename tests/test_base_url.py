"""A wrong ``WECO_BASE_URL`` is a configuration error, never a network fault or a rejection.

A malformed URL is refused before anything is sent. A server that answers, but
not as the Weco API does (a 404 on the create endpoint, an HTML page, an error
without a ``detail``, a redirect), stops the sync with a hint, and every event
stays ``pending``: none rejected, none ``ambiguous``, no possible duplicate
afterwards. Real servers on loopback: the emulator, or ``hostile.py``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from emulator_fixtures import assert_server_matches_journal, emulator, make_workload  # noqa: F401
from hostile import HostileServer, Request, created, response
from weco_observe import synclock
from weco_observe.errors import EXIT_CONFIG, EXIT_REJECTED, ApiMisconfigured
from weco_observe.settings import check_base_url

KEY = "wk-base-url-test-key"


def _states(journal_path: Path) -> dict[str, int]:
    conn = sqlite3.connect(journal_path)
    try:
        return dict(conn.execute("SELECT state, count(*) FROM events GROUP BY state").fetchall())
    finally:
        conn.close()


def _server_ids(journal_path: Path) -> list[str | None]:
    conn = sqlite3.connect(journal_path)
    try:
        return [r[0] for r in conn.execute("SELECT server_id FROM runs")]
    finally:
        conn.close()


def _one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


# -- malformed: refused before anything is sent ---------------------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("127.0.0.1:{port}/v1", "did you mean http://127.0.0.1:{port}/v1"),
        ("api.weco.ai/v1", "did you mean https://api.weco.ai/v1"),
        ("localhost:{port}/v1", "did you mean http://localhost:{port}/v1"),
        ("ftp://127.0.0.1:{port}/v1", "ftp"),
        ("http://", "no host"),
        ("http:///v1", "no host"),
        ("http://127.0.0.1:{port}/v 1", "white space"),
        ("http://127.0.0.1:{port}/v1?x=1", "query"),
        ("http://127.0.0.1:{port}/v1#top", "query"),
        ("http://127.0.0.1:99999/v1", "port"),
        ("http://me:hunter2@127.0.0.1:{port}/v1", "password"),
    ],
)
def test_a_malformed_base_url_is_refused_before_anything_is_sent(cli, emulator, journal_path, url, says):
    make_workload(journal_path, runs=2, steps=2, relog=False)
    before = _states(journal_path)
    url = url.format(port=emulator.port)
    start = time.monotonic()
    result = cli("observe", "sync", env={"WECO_BASE_URL": url, "WECO_API_KEY": emulator.api_key})
    elapsed = time.monotonic() - start
    assert result.returncode == EXIT_CONFIG, result.stderr
    line = _one_line_error(result)
    assert "WECO_BASE_URL" in line and says.format(port=emulator.port) in line, line
    assert "hunter2" not in result.stderr
    assert elapsed < 10, f"took {elapsed:.1f}s: it was retried"
    assert emulator.stats().get("requests", 0) == 0  # nothing was sent
    assert _states(journal_path) == before == {"pending": 6}  # nothing marked, nothing ambiguous


@pytest.mark.parametrize(
    "url",
    [
        "https://api.weco.ai/v1",
        "HTTPS://API.WECO.AI/v1",
        "http://127.0.0.1:8765/v1",
        "http://127.3.2.1/v1",
        "http://localhost:8765/v1",
        "http://[::1]:8765/v1",
        "https://proxy.example.com/weco",
    ],
)
def test_well_formed_base_urls_are_accepted(url):
    assert check_base_url(url) == url


def test_a_sdk_flush_with_a_malformed_base_url_warns_and_returns_false(journal_path, monkeypatch):
    from weco_observe import WecoObserver

    monkeypatch.setenv("WECO_BASE_URL", "ftp://127.0.0.1:9/v1")
    with WecoObserver(api_key=KEY) as obs:
        obs.create_run(source_code={"a.py": "1"}, primary_metric="m")
        with pytest.warns(UserWarning, match="WECO_BASE_URL"):
            assert obs.flush(timeout=5) is False
    assert _states(journal_path) == {"pending": 1}


def test_the_background_syncer_logs_a_malformed_base_url_and_cools_down(cli, journal_path, tmp_path):
    env = {"WECO_BASE_URL": "api.weco.ai/v1", "WECO_API_KEY": KEY, "WECO_OBSERVE_AUTO_SYNC": "1"}
    (tmp_path / "a.py").write_text("x = 1\n")
    cli.ok("observe", "init", "--metric", "m", "--source", "a.py", env=env)
    deadline = time.monotonic() + 30
    while not synclock.in_cooldown(journal_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert synclock.in_cooldown(journal_path), "the syncer set no cooldown"
    log = (journal_path.parent / "autosync.log").read_text()
    assert "not syncing" in log and "WECO_BASE_URL" in log and "Traceback" not in log, log
    assert _states(journal_path) == {"pending": 1}


# -- well-formed, but what answers is not the Weco API ----------------------------------------


def test_a_base_url_without_v1_stops_with_a_hint_and_keeps_everything_pending(cli, emulator, journal_path):
    """The emulator answers 404 {"detail": "not found"} off /v1, as a real web framework does."""
    make_workload(journal_path, runs=2, steps=3, relog=False)
    root = emulator.base_url.removesuffix("/v1")
    result = cli("observe", "sync", env={**emulator.env(), "WECO_BASE_URL": root})
    assert result.returncode == EXIT_CONFIG, result.stderr
    line = _one_line_error(result)
    assert f"did you mean {root}/v1?" in line, line
    assert _states(journal_path) == {"pending": 8}
    assert emulator.runs() == {}
    # fixed: everything goes, and no run is flagged as a possible duplicate
    fixed = cli("observe", "sync", "--json", env=emulator.env())
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads(fixed.stdout)["possible_duplicates"] == 0
    assert_server_matches_journal(emulator, journal_path)


def test_steps_of_a_delivered_run_are_kept_pending_too(cli, emulator, journal_path, tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    run = cli.ok("observe", "init", "--metric", "m", "--source", "a.py").stdout.strip()
    cli.ok("observe", "sync", env=emulator.env())
    for n in (1, 2):
        cli.ok("observe", "log", "--run-id", run, "--step", str(n), "--metrics", f'{{"m": {n}}}')
    root = emulator.base_url.removesuffix("/v1")
    result = cli("observe", "sync", env={**emulator.env(), "WECO_BASE_URL": root + "/"})
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert f"did you mean {root}/v1?" in _one_line_error(result)
    assert _states(journal_path) == {"delivered": 1, "pending": 2}
    cli.ok("observe", "sync", env=emulator.env())
    assert_server_matches_journal(emulator, journal_path)


def _html(status: int):
    return lambda req: response(status, "<html><body>Not Found</body></html>", content_type="text/html")


def _steps_then(answer):
    """Creates succeed (the Weco API's shape); every step gets ``answer``."""
    return lambda req: created(req) if req.path.endswith("/external/runs") else answer(req)


@pytest.mark.parametrize(
    ("name", "answer", "says"),
    [
        ("html 404 on create", _html(404), "HTTP 404"),
        ("json 404 without detail", lambda r: response(404, {"error": "no route"}), "HTTP 404"),
        ("405 on create", lambda r: response(405, {"detail": "Method Not Allowed"}), "HTTP 405"),
        ("html 404 on steps", _steps_then(_html(404)), "HTTP 404"),
        ("json 400 without detail on steps", _steps_then(lambda r: response(400, {"message": "bad"})), "HTTP 400"),
        (
            "plain text 400 (http to an https port)",
            lambda r: response(400, "The plain HTTP request was sent to HTTPS port", content_type="text/plain"),
            "plain HTTP request",
        ),
        ("empty 404", lambda r: response(404, b"", content_type="text/plain"), "HTTP 404"),
    ],
)
def test_an_answer_that_is_not_the_weco_apis_stops_the_sync(cli, journal_path, name, answer, says):
    make_workload(journal_path, runs=2, steps=2, relog=False)
    with HostileServer(answer) as server:
        result = cli("observe", "sync", "--workers", "1", env={"WECO_BASE_URL": server.base_url, "WECO_API_KEY": KEY})
    assert result.returncode == EXIT_CONFIG, result.stderr
    line = _one_line_error(result)
    assert "WECO_BASE_URL" in line and says in line, line
    states = _states(journal_path)
    assert set(states) <= {"pending", "delivered"} and states["pending"] >= 4, states
    # it stopped at the first such answer (one run's create and, at most, its first step)
    assert len(server.requests) <= 2, [r.path for r in server.requests]


def test_a_redirect_is_a_configuration_error_naming_where_it_points(cli, journal_path):
    make_workload(journal_path, runs=1, steps=1, relog=False)

    def answer(req: Request) -> bytes:
        return response(301, b"", headers=[("Location", "https://api.example.com/v1/external/runs")])

    with HostileServer(answer) as server:
        result = cli("observe", "sync", env={"WECO_BASE_URL": server.base_url, "WECO_API_KEY": KEY})
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "https://api.example.com/v1" in _one_line_error(result)
    assert _states(journal_path) == {"pending": 2}


def test_a_weco_rejection_with_a_detail_is_still_a_rejection(cli, journal_path):
    """A 404 in the API's own shape on a /v1 steps path is the API's answer (say, an unknown run)."""
    make_workload(journal_path, runs=1, steps=2, relog=False)
    answer = _steps_then(lambda r: response(404, {"detail": "run not found"}))
    with HostileServer(answer) as server:
        result = cli("observe", "sync", env={"WECO_BASE_URL": server.base_url, "WECO_API_KEY": KEY})
    assert result.returncode == EXIT_REJECTED, result.stderr
    assert _states(journal_path) == {"delivered": 1, "rejected": 2}


# -- a server's run id -------------------------------------------------------------------------


@pytest.mark.parametrize("run_id", ["../../admin/danger?x=", "a/b", "..", "x" * 200, "run id", "ü-1"])
def test_an_unsafe_run_id_from_a_server_is_never_stored_or_used(cli, journal_path, run_id):
    make_workload(journal_path, runs=1, steps=2, relog=False)

    def answer(req: Request) -> bytes:
        if req.path.endswith("/external/runs"):
            return response(200, {"run_id": run_id})
        return response(200, {"ok": True})

    with HostileServer(answer) as server:
        result = cli("observe", "sync", env={"WECO_BASE_URL": server.base_url, "WECO_API_KEY": KEY})
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "run id" in _one_line_error(result)
    assert [r.path for r in server.requests] == ["/v1/external/runs"]  # no step went anywhere
    assert _server_ids(journal_path) == [None]
    assert _states(journal_path) == {"pending": 3}


def test_a_stored_unsafe_server_id_is_never_put_in_a_path(cli, journal_path):
    """A journal that holds an unsafe server id (from an older version, or edited): its steps are
    rejected with the reason, and nothing is sent for them."""
    make_workload(journal_path, runs=1, steps=2, relog=False)
    conn = sqlite3.connect(journal_path)
    with conn:
        conn.execute("UPDATE runs SET server_id = '../admin?x='")
        conn.execute("UPDATE events SET state = 'delivered' WHERE kind = 'create_run'")
    conn.close()
    with HostileServer(lambda r: response(200, {"ok": True})) as server:
        result = cli("observe", "sync", env={"WECO_BASE_URL": server.base_url, "WECO_API_KEY": KEY})
    assert server.requests == []
    assert result.returncode == EXIT_REJECTED, result.stderr
    assert _states(journal_path) == {"delivered": 1, "rejected": 2}
    status = json.loads(cli.ok("observe", "status", "--json").stdout)
    assert all("not a valid server run id" in r["last_error"] for r in status["rejected"])


def test_check_base_url_raises_the_configuration_error():
    with pytest.raises(ApiMisconfigured) as info:
        check_base_url("ftp://x/v1")
    assert info.value.exit_code == EXIT_CONFIG
