"""`weco observe log` latency, and its flat cost on a big journal.

(a) `weco observe log` with a 13 KB source (one line changed per step), median
    wall time, against `python -c "import typer"` in the same venv, the two
    commands interleaved. Target: <= 1.1x (issue 9; it was 1.5x). Also the
    median CPU time (user + sys) of each process, which other jobs on a shared
    machine disturb less than wall time.
(d) Flat cost: the same `log` into a journal that already holds 100,000 steps
    (in the run being logged to, the worst case for tree and delta lookups),
    interleaved with `log` into an empty journal. Target: <= 1.2x. Also measured
    in-process (`Journal.log_step`, durable), where the journal's own cost is
    not hidden behind Python start-up.

Measured in a venv with a regular (non-editable) install of this repo:

    python benchmarks/bench_log.py                   # builds a temp venv
    python benchmarks/bench_log.py --venv /tmp/wo-venv --reps 60 --big 100000
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
from pathlib import Path

from common import (
    clean_up,
    ensure_venv,
    in_venv,
    init_run,
    isolated_env,
    median,
    ms,
    pct,
    source_13k,
    table,
    verdict,
    wall,
)

BUILD = """
import json, sys, time
from weco_observe.journal import Journal
from weco_observe.ids import new_run_id
lines = [l + "\\n" for l in open(sys.argv[1]).read().splitlines()]
j = Journal(sys.argv[2])
j.conn.execute("PRAGMA synchronous=OFF")  # building only; every measured log is durable
run = j.create_run(source_code={"train.py": "".join(lines)}, metric="loss")
t = time.perf_counter()
for step in range(1, int(sys.argv[3]) + 1):
    lines[step % len(lines)] = f"param = {step}\\n"
    j.log_step(run, step, status="failed" if step % 10 == 0 else "completed",
               metrics={"loss": 1 / step}, code={"train.py": "".join(lines)})
j.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
print(json.dumps({"run": run, "seconds": time.perf_counter() - t}))
"""

INPROCESS = """
import json, sys, time
from weco_observe.journal import Journal
lines = [l + "\\n" for l in open(sys.argv[1]).read().splitlines()]
journals = {"empty": Journal(sys.argv[2]), "big": Journal(sys.argv[4])}
runs = {"empty": sys.argv[3], "big": sys.argv[5]}
start = {k: max(s["step"] for s in j.steps(runs[k])) + 1 if k == "empty" else int(sys.argv[7])
         for k, j in journals.items()}
times = {"empty": [], "big": [], "empty_cpu": [], "big_cpu": []}
n = int(sys.argv[6])
for i in range(2 * n):
    suffix = "" if i < n else "_cpu"
    if i == n:  # the same again without the fsync: the journal's own cost, free of disk noise
        for j in journals.values():
            j.conn.execute("PRAGMA synchronous=OFF")
    for name in ("empty", "big"):
        step = start[name] + i
        lines[step % len(lines)] = f"param = {step}\\n"
        code = {"train.py": "".join(lines)}
        t = time.perf_counter()
        journals[name].log_step(runs[name], step, metrics={"loss": 1 / step}, code=code)
        times[name + suffix].append(time.perf_counter() - t)
print(json.dumps(times))
"""


def timed(argv: list[str], env: dict[str, str], cpu: list[float], cwd: Path | None = None) -> float:
    """``wall()``, also appending the process's CPU time (user + sys) to ``cpu``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    elapsed = wall(argv, env, cwd=cwd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu.append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", help="reuse (or create) a venv here with a non-editable install")
    parser.add_argument("--reps", type=int, default=40, help="interleaved repetitions per command")
    parser.add_argument("--big", type=int, default=100_000, help="steps already in the big journal")
    parser.add_argument("--keep", action="store_true", help="keep the journals (default: removed at the end)")
    args = parser.parse_args()
    venv = ensure_venv(args.venv)
    python, weco = str(venv / "bin" / "python"), str(venv / "bin" / "weco")
    work = Path(tempfile.mkdtemp(prefix="weco-observe-bench-log-"))
    lines = source_13k()
    src = work / "train.py"
    src.write_text("".join(lines))
    size = src.stat().st_size
    empty_env = isolated_env(work / "empty")
    big_env = isolated_env(work / "big")

    run_empty = init_run(weco, empty_env, work, "train.py")
    built = in_venv(venv, BUILD, big_env, str(src), str(work / "big" / "journal.db"), str(args.big))
    run_big = built["run"]

    step = {"empty": 1, "big": args.big + 1}

    cpu: dict[str, list[float]] = {"typer": [], "pass": [], "empty": [], "big": [], "init": []}

    def log(name: str, env: dict[str, str], run: str) -> float:
        n = step[name]
        step[name] += 1
        lines[n % len(lines)] = f"param = {n}\n"
        src.write_text("".join(lines))
        return timed(
            [
                weco,
                "observe",
                "log",
                "--run-id",
                run,
                "--step",
                str(n),
                "-s",
                "train.py",
                "--metrics",
                f'{{"loss": {1 / n}}}',
                "-q",
            ],
            env,
            cpu[name],
            cwd=work,
        )

    baseline = [python, "-c", "import typer"]
    for _ in range(3):  # warm the page cache
        wall(baseline, empty_env)
        log("empty", empty_env, run_empty)
        log("big", big_env, run_big)
    for times in cpu.values():
        times.clear()
    t = {"typer": [], "pass": [], "empty": [], "big": [], "init": []}
    init_argv = [weco, "observe", "init", "--metric", "loss", "-s", "train.py", "--name", "bench"]
    for _ in range(args.reps):
        t["typer"].append(timed(baseline, empty_env, cpu["typer"]))
        t["empty"].append(log("empty", empty_env, run_empty))
        t["pass"].append(timed([python, "-c", "pass"], empty_env, cpu["pass"]))
        t["big"].append(log("big", big_env, run_big))
        t["init"].append(timed(init_argv, empty_env, cpu["init"], cwd=work))

    typer_med = median(t["typer"])
    ratio = median(t["empty"]) / typer_med
    typer_cpu = median(cpu["typer"])

    def cpu_cell(name: str) -> str:
        return f"{ms(median(cpu[name]))} ({median(cpu[name]) / typer_cpu:.2f}x)"

    table(
        f"(a) `weco observe log`, {size / 1024:.1f} KB source, {args.reps} interleaved runs each",
        ["command", "median", "p90", "min", "median vs `import typer`", "min vs min", "CPU median (vs typer)"],
        [
            [
                "`python -c pass`",
                ms(median(t["pass"])),
                ms(pct(t["pass"], 90)),
                ms(min(t["pass"])),
                f"{median(t['pass']) / typer_med:.2f}x",
                f"{min(t['pass']) / min(t['typer']):.2f}x",
                cpu_cell("pass"),
            ],
            [
                '`python -c "import typer"` (baseline)',
                ms(typer_med),
                ms(pct(t["typer"], 90)),
                ms(min(t["typer"])),
                "1.00x",
                "1.00x",
                cpu_cell("typer"),
            ],
            [
                "`weco observe log` (empty journal)",
                ms(median(t["empty"])),
                ms(pct(t["empty"], 90)),
                ms(min(t["empty"])),
                f"**{ratio:.2f}x** (target <= 1.1x: {verdict(ratio <= 1.1)})",
                f"{min(t['empty']) / min(t['typer']):.2f}x",
                cpu_cell("empty"),
            ],
            [
                "`weco observe init` (for the README)",
                ms(median(t["init"])),
                ms(pct(t["init"], 90)),
                ms(min(t["init"])),
                f"{median(t['init']) / typer_med:.2f}x",
                f"{min(t['init']) / min(t['typer']):.2f}x",
                cpu_cell("init"),
            ],
        ],
    )
    print(
        f"\nload average during the run: {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} cores; "
        "the min column is the least disturbed run of each"
    )

    inproc = in_venv(
        venv,
        INPROCESS,
        empty_env,
        str(src),
        str(work / "empty" / "journal.db"),
        run_empty,
        str(work / "big" / "journal.db"),
        run_big,
        str(max(200, args.reps * 5)),
        str(step["big"]),
    )
    cli_ratio = median(t["big"]) / median(t["empty"])
    lib_ratio = median(inproc["big"]) / median(inproc["empty"])
    big_size = sum(p.stat().st_size for p in (work / "big").glob("journal.db*"))
    table(
        f"(d) flat cost: {args.big:,} steps already in the journal ({big_size / 1e6:.1f} MB, built in "
        f"{built['seconds']:.0f} s)",
        ["measure", "empty journal", f"{args.big:,} steps", "ratio"],
        [
            [
                "`weco observe log` wall, median",
                ms(median(t["empty"])),
                ms(median(t["big"])),
                f"**{cli_ratio:.2f}x** (target <= 1.2x: {verdict(cli_ratio <= 1.2)})",
            ],
            [
                f"`Journal.log_step` in-process, median of {len(inproc['big'])}",
                ms(median(inproc["empty"])),
                ms(median(inproc["big"])),
                f"{lib_ratio:.2f}x",
            ],
            [
                "`Journal.log_step` in-process, p99",
                ms(pct(inproc["empty"], 99)),
                ms(pct(inproc["big"], 99)),
                f"{pct(inproc['big'], 99) / pct(inproc['empty'], 99):.2f}x",
            ],
            [
                "`Journal.log_step` in-process without fsync (CPU only), median",
                ms(median(inproc["empty_cpu"])),
                ms(median(inproc["big_cpu"])),
                f"{median(inproc['big_cpu']) / median(inproc['empty_cpu']):.2f}x",
            ],
        ],
    )
    clean_up(venv, work, keep=args.keep, venv_given=bool(args.venv))


if __name__ == "__main__":
    main()
