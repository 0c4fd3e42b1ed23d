"""A load generator for the relay benchmark: many boxes syncing at once, in one separate process.

    python benchmarks/relay_loadgen.py URL KEY --clients 200 --steps 50 [--rate 500] [--hello]

Each client is a "box": it creates a run (metadata carries a local id, as weco-observe
boxes send), then posts ``--steps`` steps with 13 KB of code in which one line changes
per step, one request at a time, on its own keep-alive connection (aiohttp). With
``--rate`` the steps are paced (open loop: a request is due at its time whether the last
answered or not) to measure latency at a steady load. Prints one JSON object: steps
acknowledged, wall time, steps/s, latency percentiles, errors by status, and the ids of
the acknowledged steps for the durability check.

aiohttp is used because httpx's async pool tops out near 300-500 requests/s on this
2-core machine, below what is being measured. The generator shares the two cores with
the server it measures, so it spends as little as it can: each step's body is encoded
once (step n is the same for every box) and it runs on uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

import aiohttp
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


JSON = {"Content-Type": "application/json"}


async def box(
    session: aiohttp.ClientSession,
    url: str,
    bodies: dict[int, bytes],
    hello: bool,
    interval: float | None,
    start_at: float,
    out: dict,
) -> None:
    local = "local-" + uuid.uuid4().hex[:26]
    body = {
        "source_code": code(0),
        "metric_name": "loss",
        "maximize": False,
        "metadata": {"weco_observe_local_id": local},
    }
    async with session.post(f"{url}/external/runs", json=body) as r:
        if r.status != 200:
            out["errors"][str(r.status)] = out["errors"].get(str(r.status), 0) + 1
            return
        run_id = (await r.json())["run_id"] if not hello else uuid.uuid4().hex
    for n in range(1, len(bodies) + 1):
        if interval is not None:
            due = start_at + n * interval
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        sent = time.monotonic()
        try:
            async with session.post(f"{url}/external/runs/{run_id}/steps", data=bodies[n], headers=JSON) as r:
                await r.read()
                status = r.status
        except aiohttp.ClientError as exc:
            out["errors"][type(exc).__name__] = out["errors"].get(type(exc).__name__, 0) + 1
            continue
        if status == 200:
            out["latencies"].append(time.monotonic() - sent)
            out["acked"].append([run_id, n])
        else:
            out["errors"][str(status)] = out["errors"].get(str(status), 0) + 1


async def main(args: argparse.Namespace) -> dict:
    out: dict = {"latencies": [], "acked": [], "errors": {}}
    headers = {"Authorization": f"Bearer {args.key}"}
    connector = aiohttp.TCPConnector(limit=0, ssl=False)
    interval = args.clients / args.rate if args.rate else None
    bodies = step_bodies(args.steps)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
        start = time.monotonic()
        await asyncio.gather(
            *(
                box(session, args.url, bodies, args.hello, interval, start + i * (interval or 0) / args.clients, out)
                for i in range(args.clients)
            )
        )
        wall = time.monotonic() - start
    lat = sorted(out["latencies"])

    def pct(p: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2) if lat else None

    return {
        "clients": args.clients,
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
    parser.add_argument("url", help="the API base URL, .../v1")
    parser.add_argument("key")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--rate", type=float, default=None, help="steps/s in total, paced (default: as fast as answered)"
    )
    parser.add_argument("--hello", action="store_true", help="the server is the hello-world ceiling, not a relay")
    parser.add_argument("--ids", action="store_true", help="print the acknowledged (run, step) pairs")
    # uvloop (uvicorn[standard] installs it): the generator's event loop costs less CPU than asyncio's
    print(json.dumps(uvloop.run(main(parser.parse_args()))))
