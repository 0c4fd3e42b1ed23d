"""An httpx transport on the standard library's ``http.client``: the same requests, a fraction of the CPU.

``WecoClient`` sends through ``httpx.Client`` (its API, its timeouts, the transport
tests inject), but by default not through httpcore. Measured on the 2-core box
(2026-11-26, 13 KB step bodies to the emulator in another process, 50 ms added per
request, 32 threads): httpcore's pool spent 2.1 ms of CPU per request and topped out
near 430 requests/s, worse with more threads (its pool rescans every connection
on each request and response, under one lock); ``http.client`` spent 0.45 ms and
reached 580/s (930/s with 64 threads). That CPU is what capped a relay's forwarding
and a ``sync`` at 50 ms (issue 11): both hold the GIL while they wait on it.

It speaks only what ``WecoClient`` needs: HTTP/1.1 keep-alive to one or a few
origins, whole bodies (requests and answers are small), no proxies. Failures are
raised as the httpx exceptions httpcore raises for them, so ``api.py`` classifies
them the same way: no connection (``ConnectError``/``ConnectTimeout``: nothing was
sent), no answer in time (``ReadTimeout``/``WriteTimeout``), a dropped or broken
answer (``RemoteProtocolError``/``ReadError``/``WriteError``). As httpcore does, an
idle connection the server has closed (its socket reads as ready) is never reused,
nor one idle longer than ``keepalive_expiry``: a request written into a dying
connection would come back ambiguous.
"""

from __future__ import annotations

import http.client
import select
import ssl
import threading
import time
from typing import Any

import httpx

__all__ = ["StdlibTransport"]

_Origin = tuple[str, str, int]
#: the request headers ``http.client`` would otherwise add a second time
_SKIP = {"host": "skip_host", "accept-encoding": "skip_accept_encoding"}


class StdlibTransport(httpx.BaseTransport):
    """Keep-alive connections per origin, at most ``max_connections`` requests at once (more wait).

    ``verify`` is what ``httpx.Client`` takes (True, a CA path, or an ``ssl.SSLContext``);
    the context is built the way httpx builds its own, so https is checked the same way.
    """

    def __init__(
        self, *, verify: Any = True, max_connections: int = 8, keepalive_expiry: float = 5.0, trust_env: bool = False
    ):
        self._verify = verify
        self._trust_env = trust_env
        self._ssl: ssl.SSLContext | None = None
        self._slots = threading.BoundedSemaphore(max(1, max_connections))
        self._lock = threading.Lock()
        self._idle: dict[_Origin, list[tuple[http.client.HTTPConnection, float]]] = {}
        self._closed = False
        self.keepalive_expiry = keepalive_expiry

    # -- connections ----------------------------------------------------------------

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context(verify=self._verify, trust_env=self._trust_env)
        return self._ssl

    def _checkout(self, origin: _Origin, connect_timeout: float | None) -> http.client.HTTPConnection:
        """An idle connection to ``origin`` still fit to send on, else a new one."""
        now = time.monotonic()
        while True:
            with self._lock:
                idle = self._idle.get(origin)
                conn, since = idle.pop() if idle else (None, 0.0)
            if conn is None:
                break
            if now - since <= self.keepalive_expiry and not _readable(conn):
                return conn
            conn.close()  # closed by the server, or about to be
        scheme, host, port = origin
        if scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=connect_timeout, context=self._context())
        else:
            conn = http.client.HTTPConnection(host, port, timeout=connect_timeout)
        try:
            conn.connect()
        except TimeoutError as exc:
            conn.close()
            raise httpx.ConnectTimeout(str(exc) or "connect timed out") from exc
        except (OSError, ssl.CertificateError) as exc:  # refused, no route, DNS, a certificate refused
            conn.close()
            raise httpx.ConnectError(str(exc)) from exc
        return conn

    def _checkin(self, origin: _Origin, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed:
                self._idle.setdefault(origin, []).append((conn, time.monotonic()))
                return
        conn.close()

    # -- httpx.BaseTransport ---------------------------------------------------------------

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"the URL's scheme {scheme!r} is not http or https")
        origin = (scheme, url.host, url.port or (443 if scheme == "https" else 80))
        timeout = request.extensions.get("timeout", {})
        body = request.read()
        if not self._slots.acquire(timeout=timeout.get("pool")):
            raise httpx.PoolTimeout(f"no connection free in {timeout['pool']} s")
        try:
            conn = self._checkout(origin, timeout.get("connect"))
            sock = conn.sock
            assert sock is not None
            keep = False
            try:
                try:
                    sock.settimeout(timeout.get("write"))
                    skips = {flag: True for name, flag in _SKIP.items() if name in request.headers}
                    conn.putrequest(request.method, url.raw_path.decode("ascii"), **skips)
                    for name, value in request.headers.raw:
                        conn.putheader(name, value)
                    conn.endheaders(body)  # with the body, in one write
                except ValueError as exc:  # a header http.client refuses (a newline in a value)
                    raise httpx.LocalProtocolError(str(exc)) from exc
                except TimeoutError as exc:
                    raise httpx.WriteTimeout(str(exc) or "write timed out") from exc
                except OSError as exc:
                    raise httpx.WriteError(str(exc)) from exc
                try:
                    sock.settimeout(timeout.get("read"))
                    answer = conn.getresponse()
                    if answer.msg.defects or answer.msg.get_payload():
                        # a line that is no header (h11 refuses it; http.client would stop reading the
                        # headers there): not quoted, as the line may echo the key
                        raise httpx.RemoteProtocolError("the answer's header lines are malformed")
                    data = answer.read()
                except TimeoutError as exc:
                    raise httpx.ReadTimeout(str(exc) or "read timed out") from exc
                except (http.client.HTTPException, ValueError) as exc:  # closed early, a malformed answer
                    raise httpx.RemoteProtocolError(f"{type(exc).__name__}: {exc}") from exc
                except OSError as exc:
                    raise httpx.ReadError(str(exc)) from exc
                keep = not answer.will_close
            finally:
                if keep:
                    self._checkin(origin, conn)
                else:
                    conn.close()
        finally:
            self._slots.release()
        return httpx.Response(
            answer.status,
            # as bytes: http.client read them as latin-1, and httpx would encode a str as ASCII
            headers=[(k.encode("latin-1"), str(v).encode("latin-1", "replace")) for k, v in answer.getheaders()],
            stream=httpx.ByteStream(data),  # httpx decodes a Content-Encoding, as it does httpcore's
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": answer.reason.encode("latin-1", "replace")},
        )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn, _since in conns:
                conn.close()


def _readable(conn: http.client.HTTPConnection) -> bool:
    """True when an idle connection has something to read: the server closed it (or broke the protocol)."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        poller = select.poll()  # not select.select: it refuses descriptors past 1023, which a busy relay has
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True
