"""The HTTP client for the Weco external-runs API: one method per endpoint.

The wire contract is ``shared/reference/weco-api.md``: ``POST
{base}/external/runs`` and ``POST {base}/external/runs/{id}/steps`` with
``Authorization: Bearer <key>``. Bodies are sent as given (the journal already
left optional fields out unless they were set). Answers are classified in one
place, :func:`classify`, and every failure is one of four ``errors`` classes:

- :class:`~weco_observe.errors.ApiTransient`: timeouts, dropped connections,
  408, 429, 5xx and a 2xx whose body is not a JSON object. Retry later;
  :func:`is_retryable` says so, for tenacity.
- :class:`~weco_observe.errors.ApiAuthFailed`: 401/403. Stop; nothing changes.
- :class:`~weco_observe.errors.ApiMisconfigured`: ``WECO_BASE_URL`` is malformed
  (refused before anything is sent), or what answers there is not the Weco API:
  a redirect, a 404/405 on the create endpoint, an error without the API's JSON
  ``detail``, a 404 under a base URL without ``/v1``, a run id that is not one.
  Stop; nothing changes, and the message says what to fix.
- :class:`~weco_observe.errors.ApiRejected`: any other 4xx, with the server's
  ``detail`` as the reason.

No telemetry: this client talks to the two endpoints and nothing else. The key
goes in one header and never into an exception message: every text taken from
an answer or from httpx goes through :func:`~weco_observe.redact.redact`.

    >>> with WecoClient(emulator.base_url, emulator.api_key) as api:
    ...     run_id = api.create_run({"source_code": {"a.py": "x=1"}, "metric_name": "loss", "maximize": False})
    ...     api.log_step(run_id, {"step": 1, "status": "completed"})["step"]
    1
"""

from __future__ import annotations

import email.utils
import functools
import json
import math
import sys
import time
from typing import Any

import httpx

from . import __version__
from .errors import ApiAuthFailed, ApiError, ApiMisconfigured, ApiRejected, ApiTransient
from .redact import redact
from .ids import is_server_id
from .settings import DEFAULT_BASE_URL

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


@functools.lru_cache(maxsize=4096)  # a sync sends every step of a run to one path
def steps_path(run_id: str) -> str:
    """``POST`` here upserts a step of run ``run_id`` (a server id, escaped as one path segment).

    An id that is not one short, safe path segment (``ids.is_server_id``) is refused
    with ApiRejected, before any request: it came from a crafted bundle or a damaged
    journal, and it must never steer an authenticated request elsewhere.

    >>> steps_path("5b7e0c1a-2222-4333-8444-555566667777")
    '/external/runs/5b7e0c1a-2222-4333-8444-555566667777/steps'
    """
    from urllib.parse import quote

    if not is_server_id(run_id):
        reason = f"{str(run_id)[:80]!r} is not a valid server run id (a crafted bundle or a damaged journal?)"
        raise ApiRejected(f"refused to send: {reason}", detail=reason)
    return f"{CREATE_PATH}/{quote(run_id, safe='')}/steps"


#: the longest ``Retry-After`` believed: a server's number is not trusted to be sane (1e300, inf)
MAX_RETRY_AFTER = 86400.0


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: either a number or an HTTP date, bounded to a day.

    >>> _retry_after("7"), _retry_after("1e300"), _retry_after("nan"), _retry_after("soon")
    (7.0, 86400.0, None, None)
    """
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    if math.isnan(seconds):
        return None
    return min(MAX_RETRY_AFTER, max(0.0, seconds))


#: how much of an error body is read: the detail shown is cut far shorter, after redaction
_MAX_BODY = 65536


def _clean(text: str, secret: str | None, limit: int) -> str:
    """Text from outside (a server's answer, an httpx exception) made fit to store and print:
    the key blanked out *before* it is cut short (so no piece of it survives), control
    characters (a newline, a terminal escape) made spaces, on one line."""
    text = redact(text, secret)
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _detail(response: httpx.Response, secret: str | None = None) -> tuple[str, bool]:
    """The server's reason for an error, and whether it came in the Weco API's shape (a JSON
    object with a ``detail``): its ``detail``, else its body, else its reason phrase."""
    text = response.text[:_MAX_BODY]
    try:
        body = json.loads(text)
    except ValueError:
        return _clean(text, secret, 300) or _clean(response.reason_phrase, secret, 300), False
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        return _clean(detail if isinstance(detail, str) else json.dumps(detail), secret, 1000), True
    return _clean(json.dumps(body), secret, 300), False


def _versioned(base_url: str) -> bool:
    """True when the base URL's path ends in an API version (``/v1``), as the Weco API's does."""
    import re
    from urllib.parse import urlsplit

    return re.search(r"/v\d+$", urlsplit(base_url).path.rstrip("/")) is not None


def _hint(base_url: str | None) -> str:
    if base_url and not _versioned(base_url):
        return f"did you mean {base_url.rstrip('/')}/v1?"
    return f"the Weco API's is {DEFAULT_BASE_URL}"


def _not_the_api(status: int, shaped: bool, create: bool, base_url: str | None) -> str | None:
    """Why this error answer cannot be the Weco API's own, or None when it may be.

    The Weco API answers every error with a JSON ``detail``; its create endpoint
    always exists and both endpoints take POST; it does not redirect. Any other
    answer comes from something else at ``WECO_BASE_URL`` (a web site, a proxy, the
    API's root without ``/v1``): resending cannot help and rejecting would blame
    the event, so the sync stops with everything pending."""
    if 300 <= status < 400:
        return "redirects"
    if status == 405 or (status == 404 and create):
        return f"has no {'create ' if create else ''}endpoint there"
    if status == 404 and base_url and not _versioned(base_url):
        return "has no such endpoint (its path does not end in /v1)"
    if status == 413:  # too big: a proxy in front of the API may say so in HTML; it is about this event
        return None
    if not shaped:
        return "gave an answer without the API's JSON detail"
    return None


def _redirect_hint(response: httpx.Response, secret: str | None) -> str:
    """Where a redirect points, as a base URL to set (the endpoint's own path taken off)."""
    import re
    from urllib.parse import urljoin

    location = response.headers.get("Location") or ""
    try:
        location = urljoin(str(response.request.url), location)
    except RuntimeError:  # a response made without a request (tests)
        pass
    base = re.sub(r"/external/runs(/[^/?#]*/steps)?/?$", "", location.split("?", 1)[0])
    return f"it points to {_clean(base, secret, 200)}: set WECO_BASE_URL to the API's address"


def classify(
    response: httpx.Response, *, secret: str | None = None, create: bool = False, base_url: str | None = None
) -> dict[str, Any]:
    """The JSON object of a 2xx answer; otherwise raise the matching ``ApiError``.

    ``secret`` (the API key) is blanked out of every text taken from the answer
    (keys registered with :mod:`~weco_observe.redact` are too). ``create`` says the
    request went to the create endpoint, and ``base_url`` where the API was looked
    for: both help tell an answer that cannot be the Weco API's (``ApiMisconfigured``)."""
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
    detail, shaped = _detail(response, secret)
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
    why = _not_the_api(status, shaped, create, base_url)
    if why is not None:
        where = base_url or "the server"
        hint = _redirect_hint(response, secret) if why == "redirects" else f"check WECO_BASE_URL: {_hint(base_url)}"
        excerpt = f": {detail[:120]}" if detail and why != "redirects" else ""
        raise ApiMisconfigured(
            f"{where} does not answer as the Weco API: it {why} (HTTP {status}{excerpt}); {hint}",
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
        from .settings import Settings, check_api_key, check_base_url, insecure_warning

        settings = Settings.load()
        # checked before anything is sent: httpx would call a malformed URL a network fault, and
        # plain http:// to another host would carry the key in clear
        self.base_url = check_base_url(
            (base_url or settings.base_url).strip().rstrip("/"), allow_http=settings.allow_http
        )
        # A key given here (the SDK's ``api_key=``) is checked as one from the environment is:
        # a trailing newline would make an invalid header whose error quotes the key.
        key = check_api_key(api_key, "the api_key argument") or settings.api_key
        if not key:
            raise ApiAuthFailed("no API key: run `weco login` or set WECO_API_KEY")
        register(key)
        self._key = key  # only to blank it out of error texts (see classify and _post)
        warning = insecure_warning(self.base_url)
        if warning:  # allowed, but never silently: once per client, so once per sync
            print(warning, file=sys.stderr, flush=True)
        verify: Any = True
        if settings.ca_bundle is not None and self.base_url.startswith("https:"):
            import ssl

            try:  # a site's CA (a relay's): trusted instead of the system's certificates
                verify = ssl.create_default_context(cafile=str(settings.ca_bundle))
            except (OSError, ssl.SSLError) as exc:
                raise ApiMisconfigured(
                    f"WECO_OBSERVE_CA_BUNDLE {settings.ca_bundle}: not a readable PEM file of CA certificates ({exc})"
                ) from None
        if transport is None:  # the standard library's http.client: a quarter of httpcore's CPU (transport.py)
            from .transport import StdlibTransport

            transport = StdlibTransport(verify=verify, max_connections=max_connections)
        # Requests go straight to the transport, not through an httpx.Client: its layer (merging
        # URLs, default headers, cookies, redirect and auth flows, none of which is used here) cost
        # 0.3 ms of CPU per request against 0.09 ms for building the request, which at 50 ms round trips
        # and 32 in flight is GIL time the relay's forwarding and sync are short of (issue 11).
        self._transport = transport
        self._headers = httpx.Headers(
            {
                "Authorization": f"Bearer {key}",
                "User-Agent": USER_AGENT,
                "Accept": "application/json",
                "Content-Type": "application/json",
            }
        )
        self._extensions = {"timeout": httpx.Timeout(read_timeout, connect=connect_timeout).as_dict()}
        self._urls: dict[str, httpx.URL] = {}

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> WecoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        content = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        error: ApiError
        try:
            request = httpx.Request(
                "POST", self._url(path), headers=self._headers, content=content, extensions=self._extensions
            )
            response = self._transport.handle_request(request)
            response.request = request
            try:
                response.read()
            finally:
                response.close()
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            error = ApiTransient(f"cannot connect to {self.base_url}: {self._why(exc)}", unreachable=True)
        except httpx.TimeoutException as exc:
            error = ApiTransient(f"no answer from {self.base_url} in time ({type(exc).__name__})", ambiguous=True)
        except (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.InvalidURL) as exc:
            # the request could not even be made (check_base_url and check_api_key should have
            # caught why): nothing was sent, and sending again cannot help
            error = ApiMisconfigured(f"cannot make a request to {self.base_url}: {self._why(exc)}")
        except httpx.RequestError as exc:  # a dropped connection, a broken answer (h11 quotes its lines)
            error = ApiTransient(f"connection to {self.base_url} failed: {self._why(exc)}", ambiguous=True)
        else:
            return classify(response, secret=self._key, create=path == CREATE_PATH, base_url=self.base_url)
        # Raised without the httpx exception as its cause: a printed traceback would show that
        # exception's text, key and all.
        raise error from None

    def _url(self, path: str) -> httpx.URL:
        """The URL of an endpoint, parsed once per path (a sync's requests go to one path per run)."""
        url = self._urls.get(path)
        if url is None:
            if len(self._urls) > 4096:
                self._urls.clear()
            url = self._urls[path] = httpx.URL(self.base_url + path)
        return url

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
        if not is_server_id(run_id):
            # it would be stored, then put in every step's path: not from the Weco API (its ids
            # are UUIDs), so nothing is kept from this answer
            shown = _clean(repr(run_id), self._key, 60)
            raise ApiMisconfigured(
                f"{self.base_url} answered a create with a run id that is not one ({shown}): is it the"
                f" Weco API? check WECO_BASE_URL: {_hint(self.base_url)}"
            )
        return run_id

    def log_step(self, run_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /external/runs/{run_id}/steps`` (an upsert by step number).

        A ``run_id`` that is not safe as one path segment is refused before anything
        is sent (``ApiRejected``, from :func:`steps_path`): it came from somewhere other than the Weco API."""
        return self._post(steps_path(run_id), body)
