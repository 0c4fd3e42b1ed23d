"""``weco observe ui``: a read-only local web UI of every run, updating live.

A standard-library ``ThreadingHTTPServer`` bound to 127.0.0.1 by default. It
serves the report's page in ``ui`` mode (``report.page``) and a small JSON API
that the page polls; all data comes from ``views`` (and ``diffs``), exactly as
``show`` and the report see it:

- ``GET /api/state``: ``{"version": n}``; ``n`` changes whenever another process
  commits to the journal (SQLite's ``PRAGMA data_version``; in cluster mode the
  owner's commit counter, after merging what writers appended if no other owner
  is busy), which is when the page refetches. Polling one cheap value keeps the
  server stateless.
- ``GET /api/runs``: the run summaries (``runs --json``).
- ``GET /api/runs/<run>``: one run (``show --json`` plus lane count).
- ``GET /api/runs/<run>/diff?step=N[&against=M]``: one step's diff.

Read-only: only GET and HEAD are answered; the journal is opened without
replaying spill files, and nothing is written. A server on a loopback address
(any of 127.0.0.0/8, ``::1``, ``localhost``) answers only requests whose ``Host``
header is ``localhost`` or a loopback address, so a web page cannot read the runs
through DNS rebinding (its own host name, made to resolve to 127.0.0.x, is
refused). A server bound elsewhere was exposed on purpose and takes any ``Host``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from . import diffs, report, views
from . import store
from .errors import InvalidInput, JournalUnavailable, SyncBusy, UnknownRun
from .files import JournalFiles
from .journal import Journal, SharedReader, read_seq
from .settings import Settings

DEFAULT_PORT = 8421


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ``::1``), bracketed or not.

    >>> [is_loopback(h) for h in ("127.0.0.2", "[::1]", "localhost", "10.0.0.1", "evil.example")]
    [True, True, True, False, False]
    """
    name = host.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class _Handler(BaseHTTPRequestHandler):
    server: UIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing: the terminal shows only the URL."""

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, status: int = 200) -> None:
        self._send(status, json.dumps(data, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8")

    def _host_allowed(self) -> bool:
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return self.server.any_host or is_loopback(name)

    def do_GET(self) -> None:
        if not self._host_allowed():
            self._json({"detail": "unexpected Host header"}, 403)
            return
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/") if p]
        query = parse_qs(url.query)
        try:
            if not parts:
                self._send(200, self.server.page, "text/html; charset=utf-8")
            elif parts == ["api", "state"]:
                self._json({"version": self.server.version()})
            elif parts == ["api", "runs"]:
                self._json([_public(r) for r in views.list_runs(self.server.journal)])
            elif len(parts) == 3 and parts[:2] == ["api", "runs"]:
                self._json(report.page_data(views.run_view(self.server.journal, parts[2])))
            elif len(parts) == 4 and parts[:2] == ["api", "runs"] and parts[3] == "diff":
                step = _int(query, "step")
                if step is None:
                    raise InvalidInput("give ?step=N")
                self._json(diffs.step_diff(self.server.journal, parts[2], step, _int(query, "against")))
            else:
                self._json({"detail": "not found"}, 404)
        except UnknownRun as exc:
            self._json({"detail": str(exc)}, 404)
        except InvalidInput as exc:
            self._json({"detail": str(exc)}, 400)

    do_HEAD = do_GET

    def _read_only(self) -> None:
        self._json({"detail": "read-only: only GET is served"}, 405)

    do_POST = do_PUT = do_PATCH = do_DELETE = _read_only


def _int(query: dict[str, list[str]], name: str) -> int | None:
    values = query.get(name)
    if not values:
        return None
    try:
        return int(values[0])
    except ValueError:
        raise InvalidInput(f"?{name} must be a whole number") from None


def _public(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k != "last_activity_ts"}


class UIServer(ThreadingHTTPServer):
    """The UI's HTTP server over one journal; ``url`` is where it listens."""

    daemon_threads = True

    def __init__(self, journal: Journal, host: str = "127.0.0.1", port: int = DEFAULT_PORT):
        self.journal = journal
        self.page = report.page("ui", "weco-observe").encode("utf-8")
        self._version_lock = threading.Lock()
        if ":" in host:  # an IPv6 address such as ::1
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)
        # Every loopback server keeps the DNS-rebinding guard (127.0.0.2 as much as 127.0.0.1): only a
        # Host header naming localhost or a loopback address is answered. One bound elsewhere was
        # exposed on purpose (serve() warns) and answers any Host.
        self.any_host = not is_loopback(host)

    def version(self) -> int:
        with self._version_lock:
            if isinstance(self.journal, SharedReader):
                return _merged_seq(self.journal)
            return self.journal.query("PRAGMA data_version")[0][0]

    @property
    def url(self) -> str:
        host, port = str(self.server_address[0]), self.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"


def make_server(host: str = "127.0.0.1", port: int = DEFAULT_PORT, journal_path: str | Path | None = None) -> UIServer:
    """Open the journal (read-only use, no spill replay) and bind the server; call ``serve_forever()``.

    In cluster mode the journal is read through the seqlock from any host (``SharedReader``)."""
    settings = Settings.load()
    path = Path(journal_path) if journal_path is not None else settings.journal_path
    if store.is_shared(settings, path):
        _merged_seq(None, settings, path)  # merge what waits, so the first page shows it
        journal: Journal = SharedReader(path, settings=settings)
    else:
        journal = Journal(path, settings=settings)
    try:
        server = UIServer(journal, host, port)
    except OSError as exc:
        journal.close()
        raise InvalidInput(f"cannot listen on {host}:{port}: {exc.strerror or exc}; try --port 0") from None
    return server


def _merged_seq(journal: SharedReader | None, settings: Settings | None = None, path: Path | None = None) -> int:
    """Cluster mode: merge what writers appended when no other owner is busy, then the commit counter."""
    settings = settings or Settings.load()
    path = path or journal.path  # type: ignore[union-attr]
    with contextlib.suppress(SyncBusy, JournalUnavailable):  # busy: its owner merges, and commits move the counter
        store.merge_if_free(settings, "view", path)
    return read_seq(JournalFiles(path).commit_seq)


def serve(host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
    """Serve until Ctrl-C, printing the URL on stderr."""
    server = make_server(host, port)
    if not is_loopback(host):
        print(
            f"weco-observe: WARNING serving on {host}: anyone who can reach it can read your runs and code (read-only)",
            file=sys.stderr,
        )
    print(f"weco-observe: UI at {server.url} (read-only; Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.journal.close()
