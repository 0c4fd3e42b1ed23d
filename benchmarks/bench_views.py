"""Benchmark the local views on a big journal: ``runs``, ``show`` and ``report``.

Targets (issue 4): ``runs`` and ``show`` <= 300 ms on a journal of 100 runs x
1,000 steps; ``report`` of a 1,000-step run <= 2 s and <= 5 MB.

The journal is built in-process through ``Journal.create_run``/``log_step``
(with ``synchronous=OFF`` on the build connection only, so building 100k steps
takes seconds, not fsyncs). Each step edits one line of a 300-line file and
every tenth step fails, with branches after failures, like a real agent loop.
Each view is timed in-process (the library call plus formatting) and end to end
(the real CLI as a subprocess, Python start-up included); the baseline row is
``weco observe status`` end to end, measured in the same run, so the ratios show
what the view itself adds to a CLI call.

    python benchmarks/bench_views.py            # 100 runs x 1,000 steps
    python benchmarks/bench_views.py --runs 10  # quicker
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from weco_observe import export, formats, report, views
from weco_observe.journal import Journal


def build(path: Path, runs: int, steps: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    journal = Journal(path)
    journal.conn.execute("PRAGMA synchronous=OFF")
    ids = []
    base_lines = [f"x{i} = {i}  # line {i} of the training script" for i in range(300)]
    for r in range(runs):
        lines = list(base_lines)
        run_id = journal.create_run(
            source_code={"train.py": "\n".join(lines) + "\n"},
            metric="val_bpb",
            maximize=False,
            name=f"bench run {r}",
        )
        ids.append(run_id)
        value = 2.5
        journal.log_step(run_id, 0, description="baseline", metrics={"val_bpb": value, "memory_gb": 10.0})
        last_ok = 0
        for step in range(1, steps):
            lines[rng.randrange(len(lines))] = f"y = {rng.random()}  # tweak at step {step}"
            failed = step % 10 == 0
            value = value * (1 - rng.uniform(-0.01, 0.012)) if not failed else value
            journal.log_step(
                run_id,
                step,
                status="failed" if failed else "completed",
                description=f"experiment {step}: try a different learning-rate schedule",
                metrics={"val_bpb": 0.0 if failed else round(value, 5), "memory_gb": rng.uniform(8, 16)},
                code={"train.py": "\n".join(lines) + "\n"},
                parent_step=last_ok if (step % 10 == 1 and step > 1) else None,
            )
            if not failed:
                last_ok = step
    journal.close()
    return ids


def timed(fn, repeat: int) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def cli(env: dict[str, str], *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "weco_observe", "observe", *args],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        path = data / "journal.db"
        start = time.perf_counter()
        ids = build(path, args.runs, args.steps)
        build_s = time.perf_counter() - start
        size_mb = path.stat().st_size / 1e6
        print(f"journal: {args.runs} runs x {args.steps} steps, built in {build_s:.1f} s, {size_mb:.1f} MB")

        env = dict(os.environ, WECO_OBSERVE_DIR=str(data), WECO_OBSERVE_AUTO_SYNC="0")
        target = ids[len(ids) // 2]
        journal = Journal(path)
        rows: list[tuple[str, float, float | None, str]] = []

        baseline = timed(lambda: cli(env, "status"), args.repeat)
        rows.append(("status (CLI baseline)", baseline, None, "-"))
        cache = path.with_name(path.name + ".views-cache.json")
        rows.append(
            (
                "runs (in-process, no cache)",
                timed(lambda: formats.format_runs(views.list_runs(journal, cache=False)), args.repeat),
                300,
                "<= 300 ms",
            )
        )
        rows.append(
            (
                "runs (CLI, cold: no cache)",
                timed(lambda: (cache.unlink(missing_ok=True), cli(env, "runs")), args.repeat),
                300,
                "<= 300 ms",
            )
        )
        rows.append(("runs (CLI, warm cache)", timed(lambda: cli(env, "runs"), args.repeat), 300, "<= 300 ms"))
        step = [args.steps]

        def log_then_runs() -> float:
            journal.log_step(ids[step[0] % len(ids)], step[0], metrics={"val_bpb": 1.0})  # one run changed
            step[0] += 1
            return timed(lambda: cli(env, "runs"), 1)

        rows.append(
            (
                "runs (CLI, 1 run changed)",
                statistics.median(log_then_runs() for _ in range(args.repeat)),
                300,
                "<= 300 ms",
            )
        )
        rows.append(
            (
                "show (in-process)",
                timed(lambda: formats.format_show(views.run_view(journal, target)), args.repeat),
                300,
                "<= 300 ms",
            )
        )
        rows.append(("show (CLI, end to end)", timed(lambda: cli(env, "show", target), args.repeat), 300, "<= 300 ms"))
        rows.append(
            ("show --json (CLI)", timed(lambda: cli(env, "show", target, "--json"), args.repeat), 300, "<= 300 ms")
        )
        rows.append(("diff step 500 (CLI)", timed(lambda: cli(env, "diff", target, "500"), args.repeat), None, "-"))
        rows.append(
            (
                "export csv (in-process)",
                timed(lambda: export.export_run(journal, target, "csv", io.StringIO()), args.repeat),
                None,
                "-",
            )
        )
        fresh = Journal(path)  # a cold blob cache, as the CLI would have
        html_bytes = len(report.report_html(fresh, target).encode())
        fresh.close()
        rows.append(
            (
                "report (in-process)",
                timed(lambda: report.report_html(Journal(path), target), args.repeat),
                2000,
                "<= 2000 ms",
            )
        )
        out = Path(tmp) / "report.html"
        rows.append(
            (
                "report (CLI, end to end)",
                timed(lambda: cli(env, "report", target, "-o", str(out)), args.repeat),
                2000,
                "<= 2000 ms",
            )
        )
        journal.close()

        print()
        load = os.getloadavg()[0]
        print(f"{os.cpu_count()} cores, load average {load:.1f} at the end (timings scale with other load)")
        print(f"{'operation':30} {'median ms':>10} {'x status':>9}  {'target':>11}  verdict")
        print("-" * 74)
        for name, ms, limit, label in rows:
            verdict = "-" if limit is None else ("ok" if ms <= limit else "OVER")
            print(f"{name:30} {ms:10.1f} {ms / baseline:9.2f}  {label:>11}  {verdict}")
        verdict = "ok" if html_bytes <= 5e6 else "OVER"
        print(f"{'report size':30} {html_bytes / 1e6:9.2f}M {'':9}  {'<= 5 MB':>11}  {verdict}")


if __name__ == "__main__":
    main()
