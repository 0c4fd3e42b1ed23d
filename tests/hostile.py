"""A tiny HTTP server on loopback that answers whatever a test tells it to, byte for byte.

The emulator plays a well-behaved Weco API; this plays everything else: a server
that echoes the ``Authorization`` header back (verbatim, JSON-escaped, in the
reason phrase, in a header line that is not even valid HTTP), a web server that
is not the API, a rate limiter that says "come back in an hour". Each test gives
an ``answer(request) -> bytes`` function and gets the raw bytes written back::

    with HostileServer(lambda req: response(404, b"<html>nope</html>", content_type="text/html")) as srv:
        env = {"WECO_BASE_URL": srv.base_url, "WECO_API_KEY": KEY}
        ...
    srv.requests  # every request seen: method, path, headers, body
"""

from __future__ import annotations

import http.server
import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def auth(self) -> str:
        return self.headers.get("authorization", "")

    @property
    def key(self) -> str:
        """The key the client sent (the Bearer token)."""
        return self.auth.removeprefix("Bearer ")


def response(
    status: int,
    body: bytes | str | dict[str, Any] | None = None,
    *,
    reason: str | bytes = "",
    content_type: str = "application/json",
    headers: list[tuple[str, str]] | None = None,
    raw_headers: list[bytes] | None = None,
) -> bytes:
    """The bytes of one HTTP/1.1 response. ``raw_headers`` are written as they are, valid or not."""
    if isinstance(body, dict):
        data = json.dumps(body).encode()
    elif isinstance(body, str):
        data = body.encode()
    else:
        data = body or b""
    reason_bytes = reason.encode("latin-1") if isinstance(reason, str) else reason
    lines = [
        b"HTTP/1.1 %d %s" % (status, reason_bytes or http.HTTPStatus(status).phrase.encode()),
        b"Content-Type: " + content_type.encode(),
        b"Content-Length: %d" % len(data),
        b"Connection: close",
    ]
    lines += [f"{k}: {v}".encode("latin-1") for k, v in headers or []]
    lines += raw_headers or []
    return b"\r\n".join(lines) + b"\r\n\r\n" + data


def json_escaped(text: str) -> str:
    """``text`` with every character written as a JSON ``\\uXXXX`` escape."""
    return "".join(f"\\u{ord(c):04x}" for c in text)


def created(req: Request) -> bytes:
    """A well-formed answer to a create (the Weco API's shape)."""
    return response(200, {"run_id": str(uuid.uuid4())})


@dataclass
class HostileServer:
    answer: Callable[[Request], bytes]
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                req = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                outer.requests.append(req)
                self.wfile.write(outer.answer(req))
                self.wfile.flush()
                self.close_connection = True

            do_POST = do_GET = _handle  # noqa: N815 - http.server's naming

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> HostileServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def __enter__(self) -> HostileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
