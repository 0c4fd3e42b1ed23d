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
from .redact import redact

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

    >>> steps_path("5b7e0c1a-2222-4333-8444-555566667777")
    '/external/runs/5b7e0c1a-2222-4333-8444-555566667777/steps'
    """
    from urllib.parse import quote

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


#: how much of an error body is read: the detail shown is cut far shorter, after redaction
_MAX_BODY = 65536


def _clean(text: str, secret: str | None, limit: int) -> str:
    """Text from outside (a server's answer, an httpx exception) made fit to store and print:
    the key blanked out *before* it is cut short (so no piece of it survives), control
    characters (a newline, a terminal escape) made spaces, on one line."""
    text = redact(text, secret)
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _detail(response: httpx.Response, secret: str | None = None) -> str:
    """The server's reason for an error: its ``detail``, else its body, else its reason phrase."""
    text = response.text[:_MAX_BODY]
    try:
        body = json.loads(text)
    except ValueError:
        return _clean(text, secret, 300) or _clean(response.reason_phrase, secret, 300)
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        return _clean(detail if isinstance(detail, str) else json.dumps(detail), secret, 1000)
    return _clean(json.dumps(body), secret, 300)


def classify(response: httpx.Response, *, secret: str | None = None) -> dict[str, Any]:
    """The JSON object of a 2xx answer; otherwise raise the matching ``ApiError``.

    ``secret`` (the API key) is blanked out of every text taken from the answer
    (keys registered with :mod:`~weco_observe.redact` are too)."""
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
    return isinstance(exc, ApiTransient) and exc.unreachable


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
        from .redact import register
        from .settings import Settings, check_api_key

        settings = Settings.load()
        self.base_url = (base_url or settings.base_url).rstrip("/")
        # A key given here (the SDK's ``api_key=``) is checked as one from the environment is:
        # a trailing newline would make an invalid header whose error quotes the key.
        key = check_api_key(api_key, "the api_key argument") or settings.api_key
        if not key:
            raise ApiAuthFailed("no API key: run `weco login` or set WECO_API_KEY")
        register(key)
        self._key = key  # only to blank it out of error texts (see classify and _post)
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
            error = ApiTransient(f"cannot connect to {self.base_url}: {self._why(exc)}", unreachable=True)
        except httpx.TimeoutException as exc:
            error = ApiTransient(f"no answer from {self.base_url} in time ({type(exc).__name__})", ambiguous=True)
        except httpx.RequestError as exc:  # a dropped connection, a broken answer (h11 quotes its lines)
            error = ApiTransient(f"connection to {self.base_url} failed: {self._why(exc)}", ambiguous=True)
        else:
            return classify(response, secret=self._key)
        # Raised without the httpx exception as its cause: a printed traceback would show that
        # exception's text, key and all.
        raise error from None

    def _why(self, exc: BaseException) -> str:
        """An httpx exception as text fit to store: httpx quotes header lines and the request in its
        messages, so the key can be in there."""
        return _clean(f"{type(exc).__name__}: {exc}", self._key, 500)

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
