"""A server that says "come back later" (``Retry-After``) is believed, and sync does not sit and wait.

A ``Retry-After`` within the per-wait cap (30 s) is honoured exactly. One beyond it
stops the pass at once: every event stays pending, ``sync`` exits 4 and says when
the server asked to be retried, and the background syncer cools down until then
(bounded). Retry waits in one ``sync`` also have a total budget. Real servers on
loopback (``hostile.py``), real journals, the real CLI.
"""

from __future__ import annotations

import email.utils
import json
import sqlite3
import time
from datetime import datetime
from pathlib import Path

import pytest

from emulator_fixtures import make_workload
from hostile import HostileServer, Request, response
from weco_observe import background, replay, synclock
from weco_observe.api import WecoClient
from weco_observe.errors import EXIT_PENDING
from weco_observe.journal import Journal

KEY = "wk-retry-after-test-key"


def _rate_limited(retry_after: str, status: int = 429):
    def answer(req: Request) -> bytes:
        return response(status, {"detail": "slow down"}, headers=[("Retry-After", retry_after)])

    return answer


def _states(journal_path: Path) -> dict[str, int]:
    conn = sqlite3.connect(journal_path)
    try:
        return dict(conn.execute("SELECT state, count(*) FROM events GROUP BY state").fetchall())
    finally:
        conn.close()


def _clock(epoch: float) -> str:
    return time.strftime("%H:%M", time.localtime(epoch))


def test_retry_after_an_hour_on_every_request_exits_4_promptly_saying_when(cli, journal_path):
    make_workload(journal_path, runs=3, steps=4, relog=False)
    with HostileServer(_rate_limited("3600")) as server:
        env = {"WECO_BASE_URL": server.base_url, "WECO_API_KEY": KEY}
        start = time.time()
        result = cli("observe", "sync", env=env)
        elapsed = time.time() - start
        as_json = cli("observe", "sync", "--json", env=env)
    assert result.returncode == EXIT_PENDING, result.stderr
    assert elapsed < 15, f"sync took {elapsed:.1f}s against Retry-After: 3600"
    clocks = {_clock(start + 3600), _clock(start + elapsed + 3600)}
    line = next((x for x in result.stderr.splitlines() if "asked to retry after" in x), "")
    assert any(f"the server asked to retry after {c}" in line for c in clocks), result.stderr
    assert line.startswith("error: ") and "15 events wait" in line
    # one request per run at most: nothing was retried before the hour is up
    assert len(server.requests) <= 2 * 3, [r.path for r in server.requests]
    assert _states(journal_path) == {"pending": 15}  # nothing rejected, no create ambiguous
    summary = json.loads(as_json.stdout)
    assert as_json.returncode == EXIT_PENDING and summary["pending"] == 15
    retry_at = datetime.fromisoformat(summary["retry_at"]).timestamp()  # ISO 8601, UTC
    assert start + 3590 < retry_at < time.time() + 3610


def test_retry_after_as_an_http_date_on_a_503(cli, journal_path):
    make_workload(journal_path, runs=1, steps=1, relog=False)
    when = time.time() + 7200
    with HostileServer(_rate_limited(email.utils.formatdate(when, usegmt=True), status=503)) as server:
        start = time.monotonic()
        result = cli("observe", "sync", env={"WECO_BASE_URL": server.base_url, "WECO_API_KEY": KEY})
    assert result.returncode == EXIT_PENDING and time.monotonic() - start < 15, result.stderr
    assert f"asked to retry after {_clock(when)}" in result.stderr, result.stderr
    assert len(server.requests) == 1


def test_a_short_retry_after_is_honoured_exactly(journal_path):
    """Within the cap: waited for as asked (not less), then sent again."""
    make_workload(journal_path, runs=1, steps=1, relog=False)
    answers = iter([_rate_limited("2")] * 2)

    def answer(req: Request) -> bytes:
        step = next(answers, None)
        if step is not None:
            return step(req)
        if req.path.endswith("/external/runs"):
            return response(200, {"run_id": "5b7e0c1a-2222-4333-8444-555566667777"})
        return response(200, {"ok": True})

    waits: list[float] = []
    with HostileServer(answer) as server:
        with Journal(journal_path) as journal, WecoClient(server.base_url, KEY) as client:
            result = replay.sync(journal, client, sleep=waits.append, initial_wait=0.01)
    assert waits == [2.0, 2.0] and result.pending == 0 and result.retry_at is None


def test_the_total_wait_of_a_sync_is_capped(journal_path):
    """Retry-After: 20 (under the 30 s cap) on every request: the budget for waits ends the sync."""
    make_workload(journal_path, runs=3, steps=2, relog=False)
    with HostileServer(_rate_limited("20")) as server:
        with Journal(journal_path) as journal, WecoClient(server.base_url, KEY) as client:
            start = time.monotonic()
            result = replay.sync(journal, client, retry_budget=1.0)
            elapsed = time.monotonic() - start
    assert elapsed < 5, f"took {elapsed:.1f}s"
    assert result.pending == 9 and result.exit_code == EXIT_PENDING
    assert result.retry_at is not None and time.time() + 15 < result.retry_at < time.time() + 21


def test_the_sdk_flush_returns_promptly_when_the_server_asks_for_an_hour(journal_path, monkeypatch):
    from weco_observe import WecoObserver

    with HostileServer(_rate_limited("3600")) as server:
        monkeypatch.setenv("WECO_BASE_URL", server.base_url)
        with WecoObserver(api_key=KEY) as obs:
            obs.create_run(source_code={"a.py": "1"}, primary_metric="m")
            start = time.monotonic()
            assert obs.flush(timeout=30) is False
            assert time.monotonic() - start < 5
    assert len(server.requests) == 1


def test_the_background_syncer_cools_down_for_as_long_as_the_server_asked(cli, journal_path, tmp_path):
    with HostileServer(_rate_limited("600")) as server:
        env = {
            "WECO_BASE_URL": server.base_url,
            "WECO_API_KEY": KEY,
            "WECO_OBSERVE_AUTO_SYNC": "1",
            "WECO_OBSERVE_SYNC_LINGER": "0.2",
        }
        (tmp_path / "a.py").write_text("x = 1\n")
        start = time.time()
        cli.ok("observe", "init", "--metric", "m", "--source", "a.py", env=env)
        deadline = time.monotonic() + 20
        while not synclock.in_cooldown(journal_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        while synclock.running(journal_path) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert synclock.in_cooldown(journal_path), "no cooldown"
    assert not synclock.running(journal_path), "the syncer waited instead of giving up"
    until = (journal_path.parent / "journal.db.sync-cooldown").stat().st_mtime
    assert start + 590 < until < time.time() + 601  # the server's 600 s, not the usual 30 s
    assert len(server.requests) == 1
    log = (journal_path.parent / "autosync.log").read_text()
    assert f"asked to retry after {_clock(start + 600)}" in log or f"after {_clock(until)}" in log, log


def test_the_background_cooldown_from_retry_after_is_bounded(journal_path):
    now = time.time()
    assert background.cooldown_for(now + 10) == background.COOLDOWN_UNREACHABLE
    assert background.cooldown_for(now + 600) > 590
    assert background.cooldown_for(now + 86400) == background.COOLDOWN_RETRY_AFTER_MAX
    assert background.cooldown_for(None) == background.COOLDOWN_UNREACHABLE


def test_sync_watch_waits_until_the_time_the_server_gave_and_stops_on_sigterm(journal_path):
    """``--watch`` keeps running: it says when it will try again, sends nothing before then, and
    a SIGTERM during that wait ends it at once (exit 4: events pending)."""
    import os
    import signal
    import subprocess
    import sys

    make_workload(journal_path, runs=1, steps=1, relog=False)
    with HostileServer(_rate_limited("3600")) as server:
        watcher = subprocess.Popen(
            [sys.executable, "-m", "weco_observe", "observe", "sync", "--watch"],
            env={**os.environ, "WECO_BASE_URL": server.base_url, "WECO_API_KEY": KEY},
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert watcher.stderr is not None
            line = watcher.stderr.readline()  # the first pass's line
            time.sleep(1.0)  # well past the usual 1 s backoff of a failing watch
            requests = len(server.requests)
            watcher.send_signal(signal.SIGTERM)
            start = time.monotonic()
            _, err = watcher.communicate(timeout=20)
            stopped_in = time.monotonic() - start
        finally:
            if watcher.poll() is None:
                watcher.kill()
                watcher.communicate()
    assert "the server asked to retry after" in line and "waiting until then" in line, line + err
    assert requests == 1, [r.path for r in server.requests]
    assert watcher.returncode == EXIT_PENDING and stopped_in < 5, err
    assert "asked to retry after" in err


@pytest.mark.parametrize("value", ["1e300", "inf", "Fri, 31 Dec 9999 23:59:59 GMT"])
def test_an_absurd_retry_after_is_bounded_to_a_day(cli, journal_path, value):
    """A server's number is not trusted to be sane: no overflow, no traceback, at most a day."""
    make_workload(journal_path, runs=1, steps=1, relog=False)
    with HostileServer(_rate_limited(value)) as server:
        env = {"WECO_BASE_URL": server.base_url, "WECO_API_KEY": KEY}
        result = cli("observe", "sync", env=env)
        as_json = cli("observe", "sync", "--json", env=env)
    assert result.returncode == EXIT_PENDING and "Traceback" not in result.stderr, result.stderr
    assert "asked to retry after" in result.stderr
    retry_at = datetime.fromisoformat(json.loads(as_json.stdout)["retry_at"]).timestamp()
    assert time.time() + 3600 < retry_at <= time.time() + 86400 + 5
