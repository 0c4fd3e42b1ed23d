"""The API client: requests exactly as the contract says, answers classified in one place.

Unit level, with ``httpx.MockTransport`` standing in for the network (as httpx's
own tests do); the real-server behaviour is in test_sync.py against the emulator.
"""

from __future__ import annotations

import email.utils
import json
import time

import httpx
import pytest

from weco_observe import __version__, api, errors
from weco_observe.api import WecoClient
from weco_observe.errors import ApiAuthFailed, ApiRejected, ApiTransient
from weco_observe.journal import Journal
from weco_observe.replay import Replayer as Syncer

KEY = "sk-test-secret-key"


def _client(handler, key: str = KEY) -> WecoClient:
    return WecoClient("https://api.test/v1", key, transport=httpx.MockTransport(handler))


def test_create_and_log_step_requests_match_the_contract():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/v1/external/runs":
            return httpx.Response(200, json={"run_id": "11111111-2222-4333-8444-555555555555"})
        return httpx.Response(200, json={"ok": True})

    with _client(handler) as client:
        run_id = client.create_run({"source_code": {"a.py": "x"}, "metric_name": "m", "maximize": False})
        client.log_step(run_id, {"step": 1, "status": "completed"})
    create, step = seen
    assert create.method == "POST" and str(create.url) == "https://api.test/v1/external/runs"
    assert step.url.path == f"/v1/external/runs/{run_id}/steps"
    for request in seen:
        assert request.headers["Authorization"] == f"Bearer {KEY}"
        assert request.headers["User-Agent"] == f"weco-observe/{__version__}"
        assert request.headers["Content-Type"] == "application/json"
    # optional fields are sent only when the caller gave them
    assert json.loads(create.content) == {"source_code": {"a.py": "x"}, "metric_name": "m", "maximize": False}
    assert json.loads(step.content) == {"step": 1, "status": "completed"}


def test_base_url_and_key_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("WECO_BASE_URL", "https://env.test/v1/")
    monkeypatch.setenv("WECO_API_KEY", "from-env")
    seen = []
    with WecoClient(transport=httpx.MockTransport(lambda r: seen.append(r) or httpx.Response(200, json={}))) as c:
        c.log_step("r", {"step": 1, "status": "completed"})
    assert str(seen[0].url) == "https://env.test/v1/external/runs/r/steps"
    assert seen[0].headers["Authorization"] == "Bearer from-env"


def test_no_key_is_an_auth_failure(monkeypatch):
    with pytest.raises(ApiAuthFailed, match="weco login"):
        WecoClient("https://api.test/v1")


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, {"run_id": "x"}, None),
        (201, {"a": 1}, None),
        (200, [1, 2], ApiTransient),
        (200, "<html>ok</html>", ApiTransient),
        (204, None, ApiTransient),
        (408, {"detail": "slow"}, ApiTransient),
        (429, {"detail": "slow down"}, ApiTransient),
        (500, {"detail": "boom"}, ApiTransient),
        (502, "bad gateway", ApiTransient),
        (503, {"detail": "later"}, ApiTransient),
        (401, {"detail": "bad key"}, ApiAuthFailed),
        (403, {"detail": "forbidden"}, ApiAuthFailed),
        (400, {"detail": "bad"}, ApiRejected),
        (404, {"detail": "no such run"}, ApiRejected),
        (413, {"detail": "too big"}, ApiRejected),
        (422, {"detail": [{"loc": ["body", "step"], "msg": "field required"}]}, ApiRejected),
    ],
)
def test_classification(status, body, expected):
    if isinstance(body, str):
        response = httpx.Response(status, text=body)
    elif body is None:
        response = httpx.Response(status)
    else:
        response = httpx.Response(status, json=body)
    if expected is None:
        assert api.classify(response) == body
        return
    with pytest.raises(expected) as info:
        api.classify(response)
    assert info.value.status == status
    assert api.is_retryable(info.value) is (expected is ApiTransient)
    if expected is ApiRejected:
        assert info.value.detail and (
            "bad" in info.value.detail
            or "run" in info.value.detail
            or "big" in info.value.detail
            or "field required" in info.value.detail
        )
    if expected is ApiAuthFailed:
        assert "weco login" in str(info.value)


def test_retry_after_seconds_and_http_date():
    r = httpx.Response(429, headers={"Retry-After": "7"}, json={"detail": "x"})
    with pytest.raises(ApiTransient) as info:
        api.classify(r)
    assert info.value.retry_after == 7
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    with pytest.raises(ApiTransient) as info:
        api.classify(httpx.Response(503, headers={"Retry-After": when}))
    assert 25 < info.value.retry_after <= 31


@pytest.mark.parametrize(
    ("exc", "ambiguous", "unreachable"),
    [
        (httpx.ConnectError("refused"), False, True),
        (httpx.ConnectTimeout("slow"), False, True),
        (httpx.ReadTimeout("slow"), True, False),
        (httpx.RemoteProtocolError("dropped"), True, False),
        (httpx.ReadError("reset"), True, False),
    ],
)
def test_transport_failures_are_transient(exc, ambiguous, unreachable):
    def handler(request):
        raise exc

    with _client(handler) as client, pytest.raises(ApiTransient) as info:
        client.log_step("r", {"step": 1, "status": "completed"})
    assert info.value.ambiguous is ambiguous
    assert api.is_unreachable(info.value) is unreachable
    assert api.is_retryable(info.value)


def test_the_key_never_appears_in_errors():
    for status in (401, 403, 404, 500):
        with _client(lambda r, s=status: httpx.Response(s, json={"detail": "nope"})) as client:
            with pytest.raises(errors.ApiError) as info:
                client.create_run({"source_code": {}, "metric_name": "m", "maximize": True})
            assert KEY not in str(info.value) and KEY not in repr(info.value.args)


def test_retry_policy_waits_exponentially_and_honours_retry_after(journal_path):
    answers = iter(
        [
            httpx.Response(500, json={"detail": "a"}),
            httpx.Response(503, json={"detail": "b"}),
            httpx.Response(429, headers={"Retry-After": "7"}, json={"detail": "c"}),
            httpx.Response(200, json={"ok": 1}),
        ]
    )
    waits: list[float] = []
    with Journal(journal_path) as journal, _client(lambda r: next(answers)) as client:
        syncer = Syncer(
            journal, client, attempts=5, initial_wait=0.5, max_wait=4.0, max_retry_after=10.0, sleep=waits.append
        )
        answer, attempts = syncer.call(lambda: client.log_step("r", {"step": 1, "status": "completed"}))
    assert answer == {"ok": 1} and attempts == 4
    assert 0.5 <= waits[0] <= 1.0 and 1.0 <= waits[1] <= 1.5  # 0.5 * 2^(n-1) + jitter
    assert waits[2] == 7.0  # Retry-After 7: waited as asked, never less
    assert len(waits) == 3


def test_a_retry_after_beyond_the_cap_stops_at_once_and_says_when(journal_path):
    """Retrying before the server's Retry-After only earns another refusal: a wait longer than
    max_retry_after ends the pass, and the time the server gave is kept for the summary."""
    calls = []

    def handler(request):
        calls.append(request)
        return httpx.Response(429, headers={"Retry-After": "100"}, json={"detail": "c"})

    waits: list[float] = []
    with Journal(journal_path) as journal, _client(handler) as client:
        syncer = Syncer(journal, client, attempts=5, max_retry_after=10.0, sleep=waits.append)
        start = time.time()
        with pytest.raises(ApiTransient):
            syncer.call(lambda: client.log_step("r", {"step": 1, "status": "completed"}))
    assert waits == [] and len(calls) == 1
    assert start + 99 <= syncer._result.retry_at <= time.time() + 100


def test_retry_policy_gives_up_after_the_attempt_bound_and_never_retries_rejections(journal_path):
    calls = []

    def handler(request):
        calls.append(request)
        return httpx.Response(500 if len(calls) < 100 else 200, json={"detail": "down"})

    with Journal(journal_path) as journal, _client(handler) as client:
        syncer = Syncer(journal, client, attempts=3, sleep=lambda s: None)
        with pytest.raises(ApiTransient) as info:
            syncer.call(lambda: client.log_step("r", {"step": 1, "status": "completed"}))
        assert info.value.attempts == 3 and len(calls) == 3
        calls.clear()
        with _client(lambda r: calls.append(r) or httpx.Response(422, json={"detail": "no"})) as bad:
            with pytest.raises(ApiRejected):
                syncer.call(lambda: bad.log_step("r", {"step": 1, "status": "completed"}))
        assert len(calls) == 1


def test_an_unreachable_api_stops_after_fewer_attempts(journal_path):
    calls = []

    def handler(request):
        calls.append(request)
        raise httpx.ConnectError("refused")

    with Journal(journal_path) as journal, _client(handler) as client:
        syncer = Syncer(journal, client, attempts=8, unreachable_attempts=3, sleep=lambda s: None)
        with pytest.raises(ApiTransient):
            syncer.call(lambda: client.log_step("r", {"step": 1, "status": "completed"}))
    assert len(calls) == 3


def test_errors_all_is_sorted():
    assert errors.__all__ == sorted(errors.__all__)
    for name in ("ApiAuthFailed", "ApiRejected", "ApiTransient", "SyncBusy"):
        assert getattr(errors, name).__doc__
