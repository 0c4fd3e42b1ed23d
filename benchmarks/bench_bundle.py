"""Benchmark bundles and doctor on a big journal.

Builds a journal of RUNS x STEPS steps in-process (each step edits one line of
a 300-line file, so code is stored as deltas, like a real agent loop), then
times, in the same run:

- baselines: a byte-for-byte copy of the journal with SQLite's backup API (what
  carrying the whole journal file would cost), and journaling the same steps
  again through ``Journal.log_step`` (``synchronous=OFF``, i.e. CPU only);
- ``bundle --all``, an incremental bundle after 1% more steps, ``verify``,
  ``import`` into an empty journal, the same import again (a no-op) and an
  overlapping ``--all`` bundle into a journal that has it all;
- how long a logger on the receiving journal waits for a ``log_step`` while an
  import runs (against its slowest ``log_step`` when nothing else runs), and
  the same were the merge one transaction (``events`` is then the number of
  ``log_step`` calls, ``seconds`` the slowest);
- ``doctor`` on the healthy journal and ``doctor --repair`` after one damaged page.

Ratios are against the backup copy (time and bytes) and, for import, against
re-journaling the steps. Library calls, in-process: CLI start-up is not included.

    python benchmarks/bench_bundle.py                   # 20 runs x 500 steps
    python benchmarks/bench_bundle.py --runs 100 --steps 1000
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from weco_observe import bundle, doctor, outbox
from weco_observe.journal import Journal


def build(
    journal: Journal, runs: int, steps: int, first: int = 1, ids: list[str] | None = None, seed: int = 1
) -> list[str]:
    rng = random.Random(seed + first)
    journal.conn.execute("PRAGMA synchronous=OFF")
    ids = list(ids or [])
    base = [f"x{i} = {i}  # line {i} of the training script" for i in range(300)]
    for r in range(runs):
        if len(ids) <= r:
            ids.append(
                journal.create_run(
                    source_code={"train.py": "\n".join(base) + "\n"}, metric="val_bpb", name=f"bench run {r}"
                )
            )
        lines = list(base)
        for step in range(first, first + steps):
            lines[rng.randrange(len(lines))] = f"y = {rng.random()}  # tweak at step {step}"
            journal.log_step(
                ids[r],
                step,
                status="failed" if step % 10 == 0 else "completed",
                description=f"experiment {step}: a different schedule",
                metrics={"val_bpb": rng.uniform(1, 3), "memory_gb": rng.uniform(8, 16)},
                code={"train.py": "\n".join(lines) + "\n"},
            )
    journal.conn.execute("PRAGMA synchronous=FULL")
    return ids


_LOGGER = """
import json, sys, time
from pathlib import Path
from weco_observe.journal import Journal
j = Journal(sys.argv[1])
run = j.create_run(source_code={"probe.py": "p = 1\\n"}, metric="loss", name="logger")
print("ready", flush=True)
waits, step = [], 0
while not Path(sys.argv[2]).exists():
    step += 1
    start = time.perf_counter()
    j.log_step(run, step, metrics={"loss": 1.0})
    waits.append(time.perf_counter() - start)
    time.sleep(0.01)
print(json.dumps(waits))
"""


def logger_waits(path: Path, work, waits: list[float] | None = None):
    """Run ``work()`` while another process logs a step every 10 ms; return its result, or the
    logger's waits (seconds per log_step) when ``waits`` is not given."""
    import json
    import subprocess

    waits = [] if waits is None else waits
    stop = path.with_name("stop-logger")
    stop.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", _LOGGER, str(path), str(stop)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        result = work()
    finally:
        stop.touch()
        out, _ = proc.communicate(timeout=120)
    waits.extend(json.loads(out))
    return waits if result is None else result


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()
    rows: list[tuple[str, int, float, int | None, str]] = []

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        a = Journal(root / "a" / "journal.db")
        ids = build(a, args.runs, args.steps)
        events = outbox.count_unsent(a)

        def backup() -> int:
            dest = sqlite3.connect(root / "copy.db")
            a.conn.backup(dest)
            dest.close()
            return (root / "copy.db").stat().st_size

        t_copy, copy_bytes = timed(backup)
        rows.append(("baseline: copy journal (backup API)", events, t_copy, copy_bytes, "1.00x"))

        with Journal(root / "rej" / "journal.db") as rej:
            t_rej, _ = timed(lambda: build(rej, args.runs, args.steps))
        rows.append(("baseline: re-journal via log_step", events, t_rej, None, ""))

        t_all, full = timed(lambda: bundle.write_bundle(a, root / "all.weco", everything=True))
        rows.append(
            (
                "bundle --all",
                full["events"],
                t_all,
                full["bytes"],
                f"{t_all / t_copy:.2f}x time, {full['bytes'] / copy_bytes:.2f}x bytes of the copy",
            )
        )

        bundle.write_bundle(a, root / "first.weco")
        more = max(1, args.steps // 100)
        build(a, args.runs, more, first=args.steps, ids=ids)
        t_inc, inc = timed(lambda: bundle.write_bundle(a, root / "inc.weco"))
        rows.append(
            (
                f"bundle (incremental, +{more} steps/run)",
                inc["events"],
                t_inc,
                inc["bytes"],
                f"{inc['bytes'] / full['bytes']:.3f}x bytes of --all",
            )
        )

        t_ver, _ = timed(lambda: bundle.verify(root / "all.weco"))
        rows.append(("verify (no import)", full["events"], t_ver, None, f"{t_ver / t_all:.2f}x bundle --all"))

        with Journal(root / "b" / "journal.db") as b:
            idle = logger_waits(b.path, lambda: time.sleep(1.0))
            waits: list[float] = []
            t_imp, imp = timed(lambda: logger_waits(b.path, lambda: bundle.import_bundle(b, root / "all.weco"), waits))
            assert imp["events_new"] == full["events"]
            rows.append(
                ("import into an empty journal", full["events"], t_imp, None, f"{t_imp / t_rej:.2f}x re-journal")
            )
            rows.append(
                (
                    "  a logger's slowest log_step meanwhile",
                    len(waits),
                    max(waits),
                    None,
                    f"{max(waits) / max(idle):.0f}x its slowest when idle ({max(idle) * 1000:.1f} ms)",
                )
            )
        with Journal(root / "c" / "journal.db") as c:
            one: list[float] = []
            logger_waits(c.path, lambda: bundle.import_bundle(c, root / "all.weco", batch=10**9), one)
            rows.append(
                ("  the same if the merge were 1 transaction", len(one), max(one), None, f"{max(one) / max(idle):.0f}x")
            )
        with Journal(root / "b" / "journal.db") as b:
            t_again, again = timed(lambda: bundle.import_bundle(b, root / "all.weco"))
            assert again["already_imported"]
            rows.append(("import the same bundle again", full["events"], t_again, None, "no-op"))
            bundle.import_bundle(b, root / "inc.weco")
        bundle.write_bundle(a, root / "all2.weco", everything=True)
        with Journal(root / "b" / "journal.db") as b:
            t_over, over = timed(lambda: bundle.import_bundle(b, root / "all2.weco"))
            assert over["events_new"] == 0
            rows.append(("import an overlapping --all bundle", over["events_known"], t_over, None, "0 new"))

        a.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        a.close()
        path = root / "a" / "journal.db"
        t_doc, report = timed(lambda: doctor.check(path))
        assert not report["damaged"]
        rows.append(("doctor (healthy)", events, t_doc, path.stat().st_size, ""))
        conn = sqlite3.connect(path)
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pageno = conn.execute(
            "SELECT pageno FROM dbstat WHERE name = 'steps' AND pagetype = 'leaf' ORDER BY pageno LIMIT 1 OFFSET 3"
        ).fetchone()[0]
        conn.close()
        with open(path, "r+b") as f:
            f.seek((pageno - 1) * page_size)
            f.write(b"\0" * page_size)
        t_rep, rep = timed(lambda: doctor.repair(path))
        rows.append(
            (
                "doctor --repair (one damaged page)",
                rep["tables"]["steps"],
                t_rep,
                None,
                f"{rep['rebuilt']['steps']} steps rebuilt",
            )
        )

    print(
        f"# bench_bundle: {args.runs} runs x {args.steps} steps, Python {sys.version.split()[0]}, "
        f"SQLite {sqlite3.sqlite_version}\n"
    )
    print(f"| {'operation':<42} | {'events':>7} | {'seconds':>8} | {'events/s':>9} | {'bytes':>11} | ratio |")
    print(f"|{'-' * 44}|{'-' * 9}|{'-' * 10}|{'-' * 11}|{'-' * 13}|-------|")
    for name, n, t, size, ratio in rows:
        rate = f"{n / t:,.0f}" if t > 0 and not name.startswith(" ") else "-"
        print(f"| {name:<42} | {n:>7,} | {t:>8.3f} | {rate:>9} | {'' if size is None else f'{size:,}':>11} | {ratio} |")


if __name__ == "__main__":
    main()
