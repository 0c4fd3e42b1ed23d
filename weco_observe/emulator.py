"""A loopback emulator of the Weco external-runs API, with fault injection.

It implements the wire contract (``shared/reference/weco-api.md``) closely
enough to test sync against a real HTTP server and to show a whole
offline-then-online cycle on one machine:

- ``POST /v1/external/runs`` makes a run with a UUID ``run_id``; its
  ``source_code`` becomes step 0.
- ``POST /v1/external/runs/{id}/steps`` upserts by (run, step). Optional fields
  left out keep their stored value (the journal applies the same rule). With no
  ``parent_step`` a *new* step is chained to the last non-failed step to arrive,
  as the real service does, which is why the order of arrival matters there.
- ``Authorization: Bearer <key>`` is checked (401), an unknown run is 404, an
  invalid body 422 with ``{"detail": ...}``.
- ``GET /v1/_emulator/state`` returns everything it holds (no auth: it is a test
  aid); ``POST /v1/_emulator/faults`` changes the faults of a running emulator.

Faults, each settable alone or mixed (:class:`Faults`): a fraction of 500/503,
a fraction of 429 with ``Retry-After``, added latency, connections dropped with
no response, requests that commit and then never answer (the ambiguous case a
client sees as a timeout), and 2xx with a non-JSON body.

The stdlib server writes headers and body separately; with Nagle's algorithm
and delayed ACKs that costs ~40 ms per keep-alive request, so every accepted
socket gets ``TCP_NODELAY`` and each response is written in one ``sendall``.

    from weco_observe.emulator import Emulator

    with Emulator() as emu:                 # 127.0.0.1, a free port
        print(emu.base_url, emu.api_key)    # http://127.0.0.1:PORT/v1 weco-emulator-key
        ...
        emu.state()["runs"]
"""

from __future__ import annotations

import copy
import json
import random
import re
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from collections.abc import Callable

__all__ = ["DEFAULT_API_KEY", "Emulator", "Faults"]

#: The key the emulator accepts unless told otherwise (``WECO_API_KEY=weco-emulator-key``).
DEFAULT_API_KEY = "weco-emulator-key"

_STEPS_PATH = re.compile(r"^/v1/external/runs/([^/]+)/steps/?$")
_RUN_PATH = re.compile(r"^/v1/external/runs/([^/]+)/?$")
#: the dashboard link ``sync`` prints for a run (``WECO_DASHBOARD_URL`` from :meth:`Emulator.env`)
_PAGE_PATH = re.compile(r"^/dashboard/runs/([^/]+)/?$")


@dataclass
class Faults:
    """What goes wrong, per request (fractions are probabilities in [0, 1])."""

    #: fraction answered 500 or 503 (before anything is stored)
    error_rate: float = 0.0
    #: fraction answered 429 with ``Retry-After: retry_after`` (before anything is stored)
    rate_limit_rate: float = 0.0
    retry_after: float = 1.0
    #: seconds added to every API request
    latency: float = 0.0
    #: fraction whose connection is closed with no response (nothing stored)
    drop_rate: float = 0.0
    #: fraction that is stored, then never answered: the connection is held for
    #: ``hang`` seconds and closed (a client with a shorter read timeout times out)
    commit_then_timeout_rate: float = 0.0
    hang: float = 2.0
    #: fraction answered 200 with a non-JSON body (after storing)
    non_json_rate: float = 0.0
    #: step numbers always refused with 422 (to test rejections)
    reject_steps: list[int] = field(default_factory=list)
    #: seed for reproducible fault sequences (None: random)
    seed: int | None = None

    def update(self, **changes: Any) -> None:
        names = {f.name for f in fields(self)}
        for key, value in changes.items():
            if key not in names:
                raise ValueError(f"unknown fault {key!r}: use one of {', '.join(sorted(names))}")
            setattr(self, key, value)


class _Invalid(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_code(value: Any, name: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise _Invalid(422, f"{name} must be an object of path -> file text")
    return value


def _check_object(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid(422, f"{name} must be an object")
    return value


class Emulator:
    """The Weco API on 127.0.0.1. ``start()``/``stop()`` or use as a context manager.

    ``api_key`` is the one Bearer key accepted; ``None`` accepts any non-empty key.
    """

    def __init__(
        self,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        api_key: str | None = DEFAULT_API_KEY,
        faults: Faults | None = None,
        **fault_settings: Any,
    ):
        self.host = host
        self.port = port
        self.api_key = api_key
        self.faults = faults or Faults()
        self.faults.update(**fault_settings)
        self._lock = threading.Lock()
        self._rng = random.Random(self.faults.seed)
        self._runs: dict[str, dict[str, Any]] = {}
        self._stats: dict[str, int] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        #: optional hook ``(path, body) -> detail or None``: a detail rejects the request with 422
        self.reject: Callable[[str, dict[str, Any]], str | None] | None = None

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> Emulator:
        handler = type("_BoundHandler", (_Handler,), {"emulator": self})
        self._server = _Server((self.host, self.port), handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"weco-emulator:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.close_all()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def serve_forever(self) -> None:
        """Block until interrupted (Ctrl-C), then stop; ``start()`` first (``weco observe emulator``)."""
        assert self._thread is not None, "call start() first"
        try:
            while self._thread.is_alive():
                self._thread.join(timeout=0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """What ``WECO_BASE_URL`` should be: ``http://127.0.0.1:PORT/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    def env(self) -> dict[str, str]:
        """Environment variables that point a client at this emulator."""
        return {
            "WECO_BASE_URL": self.base_url,
            "WECO_API_KEY": self.api_key or "any-key",
            "WECO_DASHBOARD_URL": f"http://{self.host}:{self.port}/dashboard",
        }

    # -- state ----------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """A deep copy of everything held: ``{"runs": {id: {..., "steps": {n: {...}}}}, "stats": {...}}``."""
        with self._lock:
            return {"runs": copy.deepcopy(self._runs), "stats": dict(self._stats), "faults": asdict(self.faults)}

    def runs(self) -> dict[str, dict[str, Any]]:
        return self.state()["runs"]

    def stats(self) -> dict[str, int]:
        """Request counters: ``requests``, ``created_runs``, ``steps_posted``, and one per fault fired."""
        with self._lock:
            return dict(self._stats)

    def set_faults(self, **changes: Any) -> None:
        with self._lock:
            self.faults.update(**changes)
            if "seed" in changes:
                self._rng = random.Random(changes["seed"])

    def create_run(
        self,
        source_code: dict[str, str],
        metric_name: str = "score",
        maximize: bool = False,
        *,
        run_id: str | None = None,
        **extra: Any,
    ) -> str:
        """Make a run directly (as the official client would have, or with a given ``run_id``, as a
        server that already holds it); return its id."""
        body = {"source_code": source_code, "metric_name": metric_name, "maximize": maximize, **extra}
        with self._lock:
            return self._create(body, run_id)

    def _count(self, key: str) -> None:
        self._stats[key] = self._stats.get(key, 0) + 1

    # -- the API (called with the lock held) -------------------------------------

    def _create(self, body: dict[str, Any], run_id: str | None = None) -> str:
        _check_code(body.get("source_code"), "source_code")
        if not isinstance(body.get("metric_name"), str) or not body["metric_name"]:
            raise _Invalid(422, "metric_name is required and must be a non-empty string")
        if not isinstance(body.get("maximize"), bool):
            raise _Invalid(422, "maximize is required and must be a boolean")
        for key in ("name", "additional_instructions"):
            if key in body and not isinstance(body[key], str):
                raise _Invalid(422, f"{key} must be a string")
        if "metadata" in body:
            _check_object(body["metadata"], "metadata")
        run_id = run_id or str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        now = time.time()
        self._runs[run_id] = {
            "id": run_id,
            "name": body.get("name"),
            "metric_name": body["metric_name"],
            "maximize": body["maximize"],
            "additional_instructions": body.get("additional_instructions"),
            "metadata": body.get("metadata"),
            "created_at": now,
            "last_ok_step": 0,
            "steps": {
                0: {
                    "step": 0,
                    "status": "completed",
                    "description": None,
                    "metrics": None,
                    "code": dict(body["source_code"]),
                    "parent_step": None,
                    "metadata": None,
                    "posts": 0,
                    "updated_at": now,
                }
            },
        }
        self._count("created_runs")
        return run_id

    def _log_step(self, run_id: str, body: dict[str, Any]) -> dict[str, Any]:
        run = self._runs.get(run_id)
        if run is None:
            raise _Invalid(404, f"run {run_id} not found")
        step = body.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise _Invalid(422, "step is required and must be an integer >= 0")
        if body.get("status") not in ("completed", "failed"):
            raise _Invalid(422, "status must be 'completed' or 'failed'")
        if "description" in body and not isinstance(body["description"], str):
            raise _Invalid(422, "description must be a string")
        if "metrics" in body:
            metrics = _check_object(body["metrics"], "metrics")
            if not all(_is_number(v) for v in metrics.values()):
                raise _Invalid(422, "metrics must be an object of name -> number")
        if "code" in body:
            _check_code(body["code"], "code")
        if "metadata" in body:
            _check_object(body["metadata"], "metadata")
        parent = body.get("parent_step")
        if "parent_step" in body and (
            not isinstance(parent, int) or isinstance(parent, bool) or parent < 0 or parent >= step
        ):
            raise _Invalid(422, "parent_step must be an integer below step")
        if step in self.faults.reject_steps:
            raise _Invalid(422, f"step {step} refused by the emulator's reject_steps fault")
        stored = run["steps"].get(step)
        if stored is None:
            if "parent_step" not in body:
                parent = None if step == 0 else run["last_ok_step"]
            stored = run["steps"][step] = {
                "step": step,
                "status": body["status"],
                "description": None,
                "metrics": None,
                "code": None,
                "parent_step": parent,
                "metadata": None,
                "posts": 0,
            }
        elif "parent_step" in body:
            stored["parent_step"] = parent
        stored["status"] = body["status"]
        for key in ("description", "metrics", "code", "metadata"):
            if key in body:
                stored[key] = body[key]
        stored["posts"] += 1
        stored["updated_at"] = time.time()
        if body["status"] != "failed":
            run["last_ok_step"] = step
        self._count("steps_posted")
        return {"run_id": run_id, "step": step, "parent_step": stored["parent_step"]}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    #: socketserver's default backlog is 5: 200 clients connecting at once had connections refused
    request_queue_size = 256

    def __init__(self, *args: Any, **kwargs: Any):
        self._sockets: set[socket.socket] = set()
        self._sockets_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._sockets_lock:
            self._sockets.add(sock)
        return sock, addr

    def shutdown_request(self, request: Any) -> None:
        with self._sockets_lock:
            self._sockets.discard(request)
        super().shutdown_request(request)

    def close_all(self) -> None:
        """Close kept-alive client connections so ``stop()`` does not leave handler threads waiting."""
        with self._sockets_lock:
            socks = list(self._sockets)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    emulator: Emulator
    protocol_version = "HTTP/1.1"
    server_version = "weco-emulator/1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests and benchmarks
        return None

    # -- plumbing -------------------------------------------------------------

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        payload: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        body = raw if raw is not None else json.dumps(payload).encode()
        lines = [
            f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            f"Server: {self.server_version}",
        ]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- routes ---------------------------------------------------------------

    def do_GET(self) -> None:
        emu = self.emulator
        path = self.path.split("?", 1)[0]
        if path.rstrip("/") == "/v1/_emulator/state":
            state = emu.state()
            state["runs"] = {
                rid: {**run, "steps": {str(k): v for k, v in run["steps"].items()}}
                for rid, run in state["runs"].items()
            }
            self._send(200, state)
            return
        page = _PAGE_PATH.match(path)
        if page:  # the link sync prints: a minimal page, so it is never a 404 (no key: it is on loopback)
            run = emu.runs().get(page.group(1))
            status = 200 if run is not None else 404
            self._send(status, raw=run_page(page.group(1), run).encode(), content_type="text/html; charset=utf-8")
            return
        match = _RUN_PATH.match(path)
        if match and self._authorized():
            run = emu.runs().get(match.group(1))
            if run is None:
                self._send(404, {"detail": f"run {match.group(1)} not found"})
            else:
                self._send(200, {**run, "steps": {str(k): v for k, v in run["steps"].items()}})
            return
        if not match:
            self._send(404, {"detail": "not found"})

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization") or ""
        key = header[7:].strip() if header.startswith("Bearer ") else ""
        expected = self.emulator.api_key
        if not key or (expected is not None and key != expected):
            self._send(401, {"detail": "Invalid or missing API key"})
            return False
        return True

    def do_POST(self) -> None:
        emu = self.emulator
        raw = self._body()
        path = self.path.split("?", 1)[0]
        if path.rstrip("/") == "/v1/_emulator/faults":
            try:
                emu.set_faults(**json.loads(raw or b"{}"))
            except (ValueError, TypeError) as exc:
                self._send(422, {"detail": str(exc)})
                return
            self._send(200, asdict(emu.faults))
            return
        steps = _STEPS_PATH.match(path)
        if not steps and path.rstrip("/") != "/v1/external/runs":
            self._send(404, {"detail": "not found"})
            return
        with emu._lock:
            emu._count("requests")
            f = emu.faults
            rng = emu._rng
            latency = f.latency
            roll = {name: rng.random() for name in ("error", "rate", "drop", "ambiguous", "nonjson")}
            error_code = 503 if rng.random() < 0.5 else 500
        if latency:
            time.sleep(latency)
        if roll["drop"] < f.drop_rate:
            with emu._lock:
                emu._count("dropped")
            self._drop()
            return
        if roll["error"] < f.error_rate:
            with emu._lock:
                emu._count(f"status_{error_code}")
            self._send(error_code, {"detail": "injected server error"})
            return
        if roll["rate"] < f.rate_limit_rate:
            with emu._lock:
                emu._count("status_429")
            self._send(429, {"detail": "rate limited"}, headers={"Retry-After": f"{f.retry_after:g}"})
            return
        if not self._authorized():
            with emu._lock:
                emu._count("status_401")
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self._send(422, {"detail": "body is not valid JSON"})
            return
        try:
            if not isinstance(body, dict):
                raise _Invalid(422, "body must be a JSON object")
            if emu.reject is not None:
                detail = emu.reject(path, body)
                if detail:
                    raise _Invalid(422, detail)
            with emu._lock:
                result = emu._create(body) if steps is None else emu._log_step(steps.group(1), body)
        except _Invalid as exc:
            with emu._lock:
                emu._count(f"status_{exc.status}")
            self._send(exc.status, {"detail": exc.detail})
            return
        if roll["ambiguous"] < f.commit_then_timeout_rate:
            with emu._lock:
                emu._count("committed_then_timed_out")
            time.sleep(f.hang)
            self._drop()
            return
        if roll["nonjson"] < f.non_json_rate:
            with emu._lock:
                emu._count("non_json")
            self._send(200, raw=b"<html>OK</html>", content_type="text/html")
            return
        self._send(200, {"run_id": result} if steps is None else result)


def run_page(run_id: str, run: dict[str, Any] | None) -> str:
    """A minimal HTML page for one emulated run: its steps as the server holds them.

    >>> "not found" in run_page("x", None)
    True
    >>> page = run_page("r1", {"name": "<b>", "metric_name": "loss", "maximize": False, "steps": {
    ...     0: {"step": 0, "status": "completed", "parent_step": None, "metrics": None, "description": None}}})
    >>> "&lt;b&gt;" in page and "<td>0</td>" in page
    True
    """
    from html import escape

    if run is None:
        body = f"<p>run {escape(run_id)} not found on this emulator</p>"
        return f"<!doctype html><meta charset=utf-8><title>not found</title>{body}"
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{escape('' if value is None else str(value))}</td>"
            for value in (
                step["step"],
                step.get("parent_step"),
                step["status"],
                json.dumps(step.get("metrics")) if step.get("metrics") else None,
                step.get("description"),
            )
        )
        + "</tr>"
        for _, step in sorted(run["steps"].items(), key=lambda item: int(item[0]))
    )
    goal = "maximize" if run.get("maximize") else "minimize"
    return (
        f"<!doctype html><meta charset=utf-8><title>{escape(str(run.get('name') or run_id))}</title>"
        f"<h1>{escape(str(run.get('name') or run_id))}</h1>"
        f"<p>Weco API emulator: run {escape(run_id)}, {escape(goal)} {escape(str(run.get('metric_name')))}</p>"
        "<table><tr><th>step</th><th>parent</th><th>status</th><th>metrics</th><th>description</th></tr>"
        f"{rows}</table>"
    )
