"""Sync benchmarks: throughput, latency-bound throughput, memory with 100k events, auto-sync lag.

    python benchmarks/bench_sync.py            # full sizes (a few minutes)
    python benchmarks/bench_sync.py --quick    # small sizes, for a smoke run

Everything runs on this machine against the loopback emulator
(``weco_observe.emulator``), and each figure is printed beside a baseline
measured in the same run:

1. 10 runs x 1,000 steps, each step with 13 KB of code, synced by ``weco observe
   sync`` (a real subprocess): steps/s, against plain httpx keep-alive POSTs of
   the same bodies to the same server (the ceiling for one connection).
2. The same with 50 ms added to every request.
3. Peak RSS of ``weco observe sync`` with 100,000 pending events, against the
   RSS of ``weco observe status`` on the same journal.
4. Lag from ``weco observe log`` returning to the emulator holding the step,
   through the background syncer only (no sync command): p50/p95/max.
5. The caller's cost of ``background.trigger`` (the check after every log).

The official client sends each step from its own process, ~0.7 s each against a
zero-latency loopback server (``shared/reference/weco-api.md``): ~1.4 steps/s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from weco_observe import background, outbox
from weco_observe.emulator import Emulator
from weco_observe.journal import Journal

OFFICIAL_STEPS_PER_S = 1 / 0.7


def code_13k(seed: int) -> str:
    return "".join(f"value_{i} = compute({i}, alpha=0.{(i + seed) % 10}, name='{'n' * 6}')\n" for i in range(255))


def build(journal_path: Path, runs: int, steps: int, with_code: bool = True) -> int:
    """Journal ``runs`` x ``steps`` steps (each with its 13 KB file changed a little); return the events."""
    with Journal(journal_path) as journal:
        for r in range(runs):
            src = code_13k(r)
            run = journal.create_run(source_code={"train.py": src}, metric="loss", name=f"bench {r}")
            for n in range(1, steps + 1):
                if with_code:
                    src = src.replace(f"value_{n % 255} =", f"value_{n % 255}_{n} =", 1)
                journal.log_step(
                    run,
                    n,
                    metrics={"loss": 1 / n},
                    description=f"step {n}",
                    code={"train.py": src} if with_code else None,
                )
        return outbox.count_unsent(journal)


def env_for(emu: Emulator, data: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, **emu.env(), "WECO_OBSERVE_DIR": str(data), "WECO_OBSERVE_AUTO_SYNC": "0", **extra}


def run_sync(emu: Emulator, data: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "weco_observe", "observe", "sync", "--json"],
        env=env_for(emu, data),
        capture_output=True,
        text=True,
        timeout=3600,
    )
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"sync failed ({out.returncode}): {out.stderr}")
    return elapsed, json.loads(out.stdout)


def plain_httpx(emu: Emulator, n: int, workers: int) -> float:
    """POSTs/s of plain httpx keep-alive clients sending 13 KB bodies (no journal)."""
    run_id = emu.create_run({"train.py": code_13k(0)})
    body = {"step": 1, "status": "completed", "metrics": {"loss": 1.0}, "code": {"train.py": code_13k(1)}}
    per = n // workers

    def worker(k: int) -> None:
        with httpx.Client(base_url=emu.base_url, headers={"Authorization": f"Bearer {emu.api_key}"}) as c:
            for i in range(per):
                c.post(f"/external/runs/{run_id}/steps", json={**body, "step": k * per + i + 1}).raise_for_status()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return per * workers / (time.perf_counter() - start)


def throughput(runs: int, steps: int, latency: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp, Emulator(latency=latency) as emu:
        data = Path(tmp)
        events = build(data / "journal.db", runs, steps)
        elapsed, summary = run_sync(emu, data)
        assert summary["pending"] == 0 and summary["delivered"] == events, summary
        steps_sent = summary["delivered"] - runs
        base = plain_httpx(emu, min(2000, runs * steps) if latency == 0 else 400, 1 if latency == 0 else 8)
    return {"steps": steps_sent, "seconds": elapsed, "steps_per_s": steps_sent / elapsed, "baseline": base}


def peak_rss(events: int) -> dict:
    runs = 100
    steps = events // runs
    with tempfile.TemporaryDirectory() as tmp, Emulator() as emu:
        data = Path(tmp)
        build(data / "journal.db", runs, steps, with_code=False)
        rss = {}
        for name, args in (("status", ["status"]), ("sync", ["sync", "--json"])):
            probe = (
                "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True);"
                " print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)"
            )
            out = subprocess.run(
                [sys.executable, "-c", probe, sys.executable, "-m", "weco_observe", "observe", *args],
                env=env_for(emu, data),
                capture_output=True,
                text=True,
                timeout=3600,
            )
            kb, code = out.stdout.split()
            if name == "sync":
                assert code == "0", out
            rss[name] = int(kb) / 1024
    return {"events": runs * (steps + 1), **rss}


def lag(n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp, Emulator() as emu:
        data = Path(tmp)
        env = env_for(emu, data, WECO_OBSERVE_AUTO_SYNC="1")
        (data / "train.py").write_text(code_13k(0))
        run_id = subprocess.run(
            [
                sys.executable,
                "-m",
                "weco_observe",
                "observe",
                "init",
                "--metric",
                "loss",
                "--source",
                str(data / "train.py"),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        seen: dict[int, float] = {}
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                for run in emu.runs().values():
                    for step in run["steps"]:
                        seen.setdefault(step, time.perf_counter())
                time.sleep(0.002)

        watcher = threading.Thread(target=watch)
        watcher.start()
        returned: dict[int, float] = {}
        for step in range(1, n + 1):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "weco_observe",
                    "observe",
                    "log",
                    "--run-id",
                    run_id,
                    "--step",
                    str(step),
                    "--metrics",
                    '{"loss": 1}',
                    "-q",
                ],
                env=env,
                check=True,
            )
            returned[step] = time.perf_counter()
            time.sleep(0.2)  # an agent loop does some work between steps
        deadline = time.perf_counter() + 30
        while len([s for s in returned if s in seen]) < n and time.perf_counter() < deadline:
            time.sleep(0.01)
        done.set()
        watcher.join()
        lags = sorted(seen[s] - returned[s] for s in returned if s in seen)
    return {
        "n": len(lags),
        "p50": statistics.median(lags),
        "p95": lags[int(0.95 * (len(lags) - 1))],
        "max": lags[-1],
        "missing": n - len(lags),
    }


def trigger_cost(n: int = 2000, spawns: int = 5, logs: int = 15) -> dict:
    """The caller's cost: ``trigger`` with a syncer running (the usual case), a spawn, and the
    wall time of ``weco observe log`` with auto-sync on vs off."""
    from weco_observe.synclock import SyncLock

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        journal_path = data / "journal.db"
        Journal(journal_path).close()
        saved = dict(os.environ)
        os.environ.update(
            WECO_OBSERVE_AUTO_SYNC="1",
            WECO_API_KEY="bench",
            WECO_OBSERVE_DIR=str(data),
            WECO_BASE_URL="http://127.0.0.1:9/v1",
            WECO_OBSERVE_SYNC_LINGER="0",
        )
        try:
            lock = SyncLock(journal_path)
            lock.try_acquire("background")  # a syncer is already running
            start = time.perf_counter()
            for _ in range(n):
                background.trigger(journal_path)
            held = (time.perf_counter() - start) / n
            spawn, starting = [], []
            for _ in range(spawns):  # children find the lock held and exit at once
                start = time.perf_counter()
                background.spawn(journal_path)
                spawn.append(time.perf_counter() - start)
                time.sleep(0.5)
                background._reap()
            lock.release()
            for _ in range(spawns):  # the caller's side when the trigger does start a syncer
                start = time.perf_counter()
                background.trigger(journal_path)
                starting.append(time.perf_counter() - start)
                time.sleep(1.0)  # the syncer finds nothing pending and exits (linger 0)
                background._reap()
            lock.try_acquire("background")
            run_id = Journal(journal_path).create_run(source_code={"a.py": "x"}, metric="m")
            wall = {}
            for mode in ("0", "1"):
                times = []
                for k in range(logs):
                    start = time.perf_counter()
                    subprocess.run(
                        [
                            sys.executable,
                            "-m",
                            "weco_observe",
                            "observe",
                            "log",
                            "--run-id",
                            run_id,
                            "--step",
                            str(k + 1 + 100 * int(mode)),
                            "-q",
                        ],
                        check=True,
                        env={**os.environ, "WECO_OBSERVE_AUTO_SYNC": mode},
                    )
                    times.append(time.perf_counter() - start)
                wall[mode] = statistics.median(times)
            lock.release()
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return {
        "held_ms": held * 1000,
        "spawn_ms": statistics.median(spawn) * 1000,
        "starting_ms": statistics.median(starting) * 1000,
        "log_off_ms": wall["0"] * 1000,
        "log_on_ms": wall["1"] * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    args = parser.parse_args()
    runs, steps = (2, 100) if args.quick else (10, 1000)
    events = 2_000 if args.quick else 100_000
    rows = []
    t0 = throughput(runs, steps, 0.0)
    rows.append(
        (
            f"sync {runs}x{steps} steps, 13 KB code each, no latency",
            f"{t0['steps_per_s']:,.0f} steps/s",
            f"plain httpx, 1 keep-alive conn: {t0['baseline']:,.0f} POSTs/s",
            f"{t0['steps_per_s'] / t0['baseline']:.2f}x",
        )
    )
    t50 = throughput(runs, steps // 5 if not args.quick else steps, 0.05)
    rows.append(
        (
            f"sync {runs}x{steps // 5 if not args.quick else steps} steps, +50 ms per request",
            f"{t50['steps_per_s']:,.0f} steps/s",
            f"plain httpx, 8 conns: {t50['baseline']:,.0f} POSTs/s",
            f"{t50['steps_per_s'] / t50['baseline']:.2f}x",
        )
    )
    rss = peak_rss(events)
    rows.append(
        (
            f"peak RSS of sync, {rss['events']:,} pending events",
            f"{rss['sync']:.0f} MB",
            f"`status` on the same journal: {rss['status']:.0f} MB",
            f"{rss['sync'] / rss['status']:.2f}x",
        )
    )
    lg = lag(10 if args.quick else 40)
    rows.append(
        (
            f"lag log -> server via background syncer ({lg['n']} steps)",
            f"p50 {lg['p50']:.2f} s, p95 {lg['p95']:.2f} s, max {lg['max']:.2f} s",
            "target p95 <= 2 s",
            f"missing {lg['missing']}",
        )
    )
    tc = trigger_cost()
    rows.append(
        (
            "background.trigger cost to the caller",
            f"{tc['held_ms']:.3f} ms (syncer running)",
            f"{tc['starting_ms']:.2f} ms when it starts one (the posix_spawn: {tc['spawn_ms']:.2f} ms)",
            "target <= 2 ms",
        )
    )
    rows.append(
        (
            "`weco observe log` wall time, auto-sync on (syncer running)",
            f"{tc['log_on_ms']:.0f} ms",
            f"auto-sync off: {tc['log_off_ms']:.0f} ms",
            f"{tc['log_on_ms'] / tc['log_off_ms']:.2f}x",
        )
    )
    rows.append(
        (
            "official client (one process per step)",
            f"{OFFICIAL_STEPS_PER_S:.1f} steps/s",
            "~0.7 s per `weco observe log`, from weco-api.md",
            f"ours {t0['steps_per_s'] / OFFICIAL_STEPS_PER_S:,.0f}x faster",
        )
    )
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    header = ("benchmark", "result", "baseline (same run)", "ratio")
    widths = [max(w, len(h)) for w, h in zip(widths, header, strict=True)]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    print(
        f"\n{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"peak RSS of this script {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )


if __name__ == "__main__":
    main()
