"""The HTTP client for the Weco external-runs API: one method per endpoint.

The wire contract is ``shared/reference/weco-api.md``: ``POST
{base}/external/runs`` and ``POST {base}/external/runs/{id}/steps`` with
``Authorization: Bearer <key>``. Bodies are sent as given (the journal already
left optional fields out unless they were set). Answers are classified in one
place, :func:`classify`, and every failure is one of three ``errors`` classes:

- :class:`~weco_observe.errors.ApiTransient`: timeouts, dropped connections,
  408, 429, 5xx and a 2xx whose body is not a JSON object. Retry later;
  :func:`is_retryable` says so, for tenacity.
- :class:`~weco_observe.errors.ApiAuthFailed`: 401/403. Stop; nothing changes.
- :class:`~weco_observe.errors.ApiRejected`: any other 4xx, with the server's
  ``detail`` as the reason.

No telemetry: this client talks to the two endpoints and nothing else. The key
goes in one header and never into an exception message.

    >>> with WecoClient(emulator.base_url, emulator.api_key) as api:
    ...     run_id = api.create_run({"source_code": {"a.py": "x=1"}, "metric_name": "loss", "maximize": False})
    ...     api.log_step(run_id, {"step": 1, "status": "completed"})["step"]
    1
"""

from __future__ import annotations

import email.utils
import json
import time
from typing import Any

import httpx

from . import __version__
from .errors import ApiAuthFailed, ApiRejected, ApiTransient

__all__ = [
    "CREATE_PATH",
    "USER_AGENT",
    "WecoClient",
    "classify",
    "create_path",
    "is_retryable",
    "is_unreachable",
    "steps_path",
]

USER_AGENT = f"weco-observe/{__version__}"
#: seconds to open a connection (short: an unreachable API must fail fast) and to wait for an answer
CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 20.0


#: the two endpoints of the wire contract, relative to the base URL
CREATE_PATH = "/external/runs"


def create_path() -> str:
    """``POST`` here creates a run."""
    return CREATE_PATH


def steps_path(run_id: str) -> str:
    """``POST`` here upserts a step of run ``run_id`` (a server id, escaped as one path segment).

    An id that is not one short, safe path segment (``ids.is_server_id``) is refused
    with ApiRejected, before any request: it came from a crafted bundle or a damaged
    journal, and it must never steer an authenticated request elsewhere.

    >>> steps_path("5b7e0c1a-2222-4333-8444-555566667777")
    '/external/runs/5b7e0c1a-2222-4333-8444-555566667777/steps'
    """
    from urllib.parse import quote

    from .ids import is_server_id

    if not is_server_id(run_id):
        reason = f"{str(run_id)[:80]!r} is not a valid server run id (a crafted bundle or a damaged journal?)"
        raise ApiRejected(f"refused to send: {reason}", detail=reason)
    return f"{CREATE_PATH}/{quote(run_id, safe='')}/steps"


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: either a number or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _detail(response: httpx.Response, secret: str | None = None) -> str:
    # -- key redaction (added by the issue-2 tests): a server may quote the Authorization
    # header back in its error, and the detail goes into the journal, `status` and sync's
    # output. Blank the key out of the whole body before cutting it short, so no part survives.
    text = response.text
    if secret:
        text = text.replace(secret, "<api key>")
    try:
        body = json.loads(text)
    except ValueError:
        return text[:300].strip() or response.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        return detail if isinstance(detail, str) else json.dumps(detail)[:1000]
    return json.dumps(body)[:300]


def classify(response: httpx.Response, *, secret: str | None = None) -> dict[str, Any]:
    """The JSON object of a 2xx answer; otherwise raise the matching ``ApiError``.

    ``secret`` (the API key) is blanked out of the server's error detail."""
    status = response.status_code
    if 200 <= status < 300:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            return body
        # The request was probably applied, but we cannot read its answer.
        raise ApiTransient(f"HTTP {status} without a JSON object body", status=status, ambiguous=True)
    detail = _detail(response, secret)
    if status in (408, 429) or status >= 500:
        raise ApiTransient(
            f"HTTP {status}: {detail}",
            status=status,
            detail=detail,
            retry_after=_retry_after(response.headers.get("Retry-After")),
        )
    if status in (401, 403):
        raise ApiAuthFailed(
            f"the Weco API refused the API key (HTTP {status}: {detail}): run `weco login`",
            status=status,
            detail=detail,
        )
    raise ApiRejected(f"HTTP {status}: {detail}", status=status, detail=detail)


def is_retryable(exc: BaseException) -> bool:
    """The one retry predicate: only transient failures are worth another attempt."""
    return isinstance(exc, ApiTransient)


def is_unreachable(exc: BaseException) -> bool:
    """True when no connection could be opened at all (refused, no route, DNS, connect timeout)."""
    return isinstance(exc, ApiTransient) and isinstance(exc.__cause__, (httpx.ConnectError, httpx.ConnectTimeout))


class WecoClient:
    """One keep-alive connection pool to the Weco API. ``transport`` is injectable for tests.

    ``base_url`` and ``api_key`` default to the settings' (``$WECO_BASE_URL``;
    ``$WECO_API_KEY`` or the credentials file).
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
        max_connections: int = 8,
    ):
        from .settings import Settings

        settings = Settings.load()
        self.base_url = (base_url or settings.base_url).rstrip("/")
        key = api_key or settings.api_key
        if not key:
            raise ApiAuthFailed("no API key: run `weco login` or set WECO_API_KEY")
        self._key = key  # only to blank it out of error details (see classify)
        self._client = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {key}", "User-Agent": USER_AGENT, "Accept": "application/json"},
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
            follow_redirects=False,
            trust_env=False,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> WecoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        content = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        try:
            response = self._client.post(path, content=content, headers={"Content-Type": "application/json"})
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise ApiTransient(f"cannot connect to {self.base_url}: {type(exc).__name__}: {exc}") from exc
        except httpx.TimeoutException as exc:
            raise ApiTransient(
                f"no answer from {self.base_url} in time ({type(exc).__name__})", ambiguous=True
            ) from exc
        except httpx.TransportError as exc:
            raise ApiTransient(
                f"connection to {self.base_url} failed: {type(exc).__name__}: {exc}", ambiguous=True
            ) from exc
        return classify(response, secret=self._key)

    def create_run(self, body: dict[str, Any]) -> str:
        """``POST /external/runs``; return the server's ``run_id``."""
        answer = self._post(create_path(), body)
        run_id = answer.get("run_id")
        if not isinstance(run_id, str) or not run_id:
            raise ApiTransient("create answered without a run_id", ambiguous=True)
        return run_id

    def log_step(self, run_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /external/runs/{run_id}/steps`` (an upsert by step number)."""
        return self._post(steps_path(run_id), body)
