"""A load generator for the relay benchmark: many boxes syncing at once, in one separate process.

    python benchmarks/relay_loadgen.py URL KEY --clients 200 --steps 50 [--rate 500] [--hello] [--aiohttp]

Each client is a "box": it creates a run (metadata carries a local id, as weco-observe
boxes send), then posts ``--steps`` steps with 13 KB of code in which one line changes
per step, one request at a time, on its own keep-alive connection. With ``--rate`` the
steps are paced (open loop: a request is due at its time whether the last answered or
not) to measure latency at a steady load. Prints one JSON object: steps acknowledged,
wall time, steps/s, latency percentiles, errors by status, and the ids of the
acknowledged steps for the durability check.

The generator shares the two cores with the server it measures, so it spends as little
as it can: each step's body is encoded once (step n is the same for every box), it runs
on uvloop, and by default each box is a bare HTTP/1.1 keep-alive connection (an asyncio
protocol writing whole requests and parsing ``Content-Length`` answers). Against the
hello-world ceiling that costs about a fifth of the CPU per request of aiohttp's
client, which took more CPU than the server it measured (0.47 ms a request vs 0.14 ms
for uvicorn). ``--aiohttp`` uses aiohttp's client instead, as the issue's figures were
measured (httpx's async pool is slower still: 300-500 requests/s here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import uvloop

BASE = "".join(f"x_{i} = {i}  # a line of the training script, padded to make 13 KB of code\n" for i in range(170))


def code(step: int) -> dict[str, str]:
    return {"train.py": BASE + f"lr = {step / 1000}\n"}


def step_bodies(steps: int) -> dict[int, bytes]:
    """Every step's request body, encoded once: step ``n`` is the same for every box, and the
    generator's CPU (two processes share two cores) is then spent on requests, not on json.dumps."""
    return {
        n: json.dumps(
            {"step": n, "status": "completed", "metrics": {"loss": 1.0 / n}, "code": code(n), "parent_step": n - 1}
        ).encode()
        for n in range(1, steps + 1)
    }


# -- the bare client -----------------------------------------------------------------------


def content_length(head: bytes) -> int:
    """The Content-Length of a lowercased header block (0 when there is none).

    >>> content_length(b"http/1.1 200 ok\\r\\ncontent-length: 42\\r\\nx: y"), content_length(b"http/1.1 204 ok")
    (42, 0)
    """
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    stop = head.find(b"\r\n", at + 2)
    return int(head[at + 17 : stop if stop >= 0 else len(head)])


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time; answers carry Content-Length
    (the relay and uvicorn always send it)."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport  # uvloop's TCPTransport, which is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        head = bytes(self.buffer[:end]).lower()
        length = content_length(head)
        if len(self.buffer) < end + 4 + length:
            return
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        waiter, self.waiter = self.waiter, None
        if not waiter.done():
            waiter.set_result((int(head[9:12]), body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(str(exc) if exc else "connection closed"))

    async def request(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        return await self.waiter


class BareBox:
    """A box's session on a bare connection: ``post(path, body) -> (status, body)``."""

    def __init__(self, url: str, key: str):
        parts = urlsplit(url)
        self.host, self.port, self.prefix = parts.hostname or "127.0.0.1", parts.port or 80, parts.path.rstrip("/")
        self.headers = (
            f"Host: {self.host}:{self.port}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        ).encode()
        self.conn: Connection | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.conn is None or self.conn.transport is None or self.conn.transport.is_closing():
            _, self.conn = await asyncio.get_running_loop().create_connection(Connection, self.host, self.port)
        return await self.conn.request(f"POST {self.prefix}{path} HTTP/1.1\r\n".encode() + self.headers, body)

    async def close(self) -> None:
        if self.conn is not None and self.conn.transport is not None:
            self.conn.transport.close()


class AiohttpBox:
    """The same over one shared aiohttp session (``--aiohttp``)."""

    def __init__(self, session: Any, url: str):
        self.session, self.url = session, url

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        async with self.session.post(self.url + path, data=body, headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.read()

    async def close(self) -> None:
        return None


# -- the load ------------------------------------------------------------------------------


async def box(
    client: BareBox | AiohttpBox,
    bodies: dict[int, bytes],
    hello: bool,
    interval: float | None,
    start_at: float,
    out: dict,
) -> None:
    local = "local-" + uuid.uuid4().hex[:26]
    create = {
        "source_code": code(0),
        "metric_name": "loss",
        "maximize": False,
        "metadata": {"weco_observe_local_id": local},
    }
    try:
        try:
            status, answer = await client.post("/external/runs", json.dumps(create).encode())
        except (OSError, ConnectionError) as exc:
            out["errors"][type(exc).__name__] = out["errors"].get(type(exc).__name__, 0) + 1
            return
        if status != 200:
            out["errors"][str(status)] = out["errors"].get(str(status), 0) + 1
            return
        run_id = json.loads(answer)["run_id"] if not hello else uuid.uuid4().hex
        for n in range(1, len(bodies) + 1):
            if interval is not None:
                due = start_at + n * interval
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            sent = time.monotonic()
            try:
                status, _ = await client.post(f"/external/runs/{run_id}/steps", bodies[n])
            except (OSError, ConnectionError) as exc:
                out["errors"][type(exc).__name__] = out["errors"].get(type(exc).__name__, 0) + 1
                continue
            if status == 200:
                out["latencies"].append(time.monotonic() - sent)
                out["acked"].append([run_id, n])
            else:
                out["errors"][str(status)] = out["errors"].get(str(status), 0) + 1
    finally:
        await client.close()


async def main(args: argparse.Namespace) -> dict:
    out: dict = {"latencies": [], "acked": [], "errors": {}}
    interval = args.clients / args.rate if args.rate else None
    bodies = step_bodies(args.steps)
    session = None
    if args.aiohttp:
        import aiohttp

        session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {args.key}"}, connector=aiohttp.TCPConnector(limit=0, ssl=False)
        )
    clients = [
        AiohttpBox(session, args.url) if session is not None else BareBox(args.url, args.key)
        for _ in range(args.clients)
    ]
    start = time.monotonic()
    try:
        await asyncio.gather(
            *(
                box(client, bodies, args.hello, interval, start + i * (interval or 0) / args.clients, out)
                for i, client in enumerate(clients)
            )
        )
    finally:
        if session is not None:
            await session.close()
    wall = time.monotonic() - start
    lat = sorted(out["latencies"])

    def pct(p: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2) if lat else None

    return {
        "clients": args.clients,
        "client": "aiohttp" if args.aiohttp else "bare",
        "steps_acked": len(out["acked"]),
        "wall_s": round(wall, 3),
        "steps_per_s": round(len(out["acked"]) / wall, 1) if wall else None,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": round(lat[-1] * 1000, 2) if lat else None,
        "errors": out["errors"],
        "acked": out["acked"] if args.ids else None,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="the API base URL, .../v1 (http only)")
    parser.add_argument("key")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--rate", type=float, default=None, help="steps/s in total, paced (default: as fast as answered)"
    )
    parser.add_argument("--hello", action="store_true", help="the server is the hello-world ceiling, not a relay")
    parser.add_argument("--aiohttp", action="store_true", help="aiohttp's client instead of bare connections")
    parser.add_argument("--ids", action="store_true", help="print the acknowledged (run, step) pairs")
    # uvloop (uvicorn[standard] installs it): the generator's event loop costs less CPU than asyncio's
    print(json.dumps(uvloop.run(main(parser.parse_args()))))
