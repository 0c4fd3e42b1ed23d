"""Cluster mode (issue 8): what logging to a journal in a shared folder costs, and merging it.

(a) SDK `log_step` with a 13 KB code dict (one line changed per step), durable, in
    cluster mode (`WECO_OBSERVE_SHARED_FS=1`: a segment append and its fsync) and in
    local mode (a SQLite commit in WAL mode), on the same local disk, interleaved in one
    process. The floors are measured in the same loop: one bare fsync'd append of a
    3 KB record (cluster mode's least possible cost) and one bare fsync'd SQLite commit
    (local mode's). Targets (issue 8): cluster mode p50 <= 0.5 ms, p99 <= 3 ms. The same
    again with the fsyncs off (`os.fsync` a no-op, `PRAGMA synchronous=OFF`): the code's
    own cost, free of the disk, which other jobs on a shared machine make noisy.
(b) CLI `weco observe log` with a 13 KB source, cluster vs local mode on the same disk,
    the two interleaved: median wall time. Target: cluster <= 1.2x local.
(c) Merge: STEPS steps across RUNS runs (plus their creates) written as an SDK writes
    them (one `.open` file per run, sealed) and as the CLI does (one `.seg` file per
    step), with and without 13 KB code, merged by one owner: records per second.
    Target: >= 20,000/s.
(d) On sshfs (an sshd on 127.0.0.1, a mount of a local folder, as tests/sshfs_hosts.py
    sets up): CLI and SDK log latency in cluster mode (detected, no override) beside
    local mode forced on the same mount (`WECO_OBSERVE_SHARED_FS=0`: the old, unsafe
    behaviour there, measured with one writer for comparison only). Needs root, FUSE,
    sshfs and openssh-server; skipped with the reason otherwise.

Everything runs from a venv with a regular (non-editable) install of this repo, as
bench_log.py does:

    python benchmarks/bench_cluster.py                          # builds a temp venv
    python benchmarks/bench_cluster.py --venv /tmp/wo-venv --steps 2000 --reps 40
    python benchmarks/bench_cluster.py --only merge --merge-steps 20000 --merge-runs 50
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from common import (
    REPO,
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
)

SDK = """
import json, os, sqlite3, sys, time
steps, work, nofsync = int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
lines = [l + "\\n" for l in open(sys.argv[1]).read().splitlines()]
from weco_observe import WecoObserver
runs = {}
for mode, flag in (("cluster", "1"), ("local", "0")):
    os.environ["WECO_OBSERVE_SHARED_FS"] = flag  # read when each observer opens its writer
    obs = WecoObserver(journal_path=os.path.join(work, mode, "journal.db"))
    runs[mode] = obs.create_run(source_code={"train.py": "".join(lines)}, primary_metric="loss")
    if nofsync and mode == "local":
        obs._journal.conn.execute("PRAGMA synchronous=OFF")
if nofsync:
    os.fsync = lambda fd: None  # the segment writer's fsyncs (SQLite's own are off above)
floor = sqlite3.connect(os.path.join(work, "floor.db"), isolation_level=None)
floor.execute("PRAGMA journal_mode=WAL")
floor.execute("PRAGMA synchronous=" + ("OFF" if nofsync else "FULL"))
floor.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload TEXT)")
append = os.open(os.path.join(work, "floor.seg"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
record, row = b"x" * 3000 + b"\\n", "x" * 200
out = {"cluster": [], "local": [], "append": [], "commit": []}
for step in range(1, steps + 1):
    lines[step % len(lines)] = f"param = {step}\\n"
    code = {"train.py": "".join(lines)}
    order = ("cluster", "local") if step % 2 else ("local", "cluster")
    for mode in order:
        t = time.perf_counter()
        runs[mode].log_step(step, metrics={"loss": 1 / step}, code=code)
        out[mode].append(time.perf_counter() - t)
    t = time.perf_counter()
    os.write(append, record)
    os.fsync(append)
    out["append"].append(time.perf_counter() - t)
    t = time.perf_counter()
    floor.execute("BEGIN IMMEDIATE")
    floor.execute("INSERT INTO t (payload) VALUES (?)", (row,))
    floor.execute("COMMIT")
    out["commit"].append(time.perf_counter() - t)
print(json.dumps(out))
"""

MERGE = """
import json, os, sys, time
from pathlib import Path
os.environ["WECO_OBSERVE_SHARED_FS"] = "1"
from weco_observe import store
from weco_observe.segments import SegmentWriter
from weco_observe.settings import Settings
path, style, n_runs, n_steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with_code = sys.argv[5] == "1"
lines = [l + "\\n" for l in open(sys.argv[6]).read().splitlines()]
settings = Settings.load()
with store.exclusive(settings, "merge", journal_path=path):
    pass  # the journal and its schema exist before the segments are written
real_fsync, os.fsync = os.fsync, lambda fd: None  # writing the segments is not what is measured
writer = SegmentWriter(path, settings=settings, append=style == "sdk")
runs = [writer.create_run(source_code={"train.py": "".join(lines)}, metric="loss") for _ in range(n_runs)]
t = time.perf_counter()
for i in range(n_steps):
    run, step = runs[i % n_runs], i // n_runs + 1
    code = None
    if with_code:
        lines[step % len(lines)] = f"param = {step}\\n"
        code = {"train.py": "".join(lines)}
    writer.log_step(run, step, metrics={"loss": 1 / step}, code=code, description=f"try {step}")
writer.close()
built = time.perf_counter() - t
os.fsync = real_fsync
found = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(os.path.dirname(path), "segments")) for n in names]
files, size = len(found), sum(os.path.getsize(p) for p in found)
t = time.perf_counter()
with store.exclusive(settings, "merge", journal_path=path) as held:
    result = held.merged
total = time.perf_counter() - t
print(json.dumps({"applied": result.applied, "merge": result.elapsed, "total": total, "files": files,
                  "bytes": size, "removed": result.files_removed, "problems": len(result.problems), "built": built}))
"""

SSHFS_SDK = """
import json, sys, time
lines = [l + "\\n" for l in open(sys.argv[1]).read().splitlines()]
from weco_observe import WecoObserver, store
from weco_observe.settings import Settings
obs = WecoObserver()
run = obs.create_run(source_code={"train.py": "".join(lines)}, primary_metric="loss")
times = []
for step in range(1, int(sys.argv[2]) + 1):
    lines[step % len(lines)] = f"param = {step}\\n"
    t = time.perf_counter()
    run.log_step(step, metrics={"loss": 1 / step}, code={"train.py": "".join(lines)})
    times.append(time.perf_counter() - t)
print(json.dumps({"times": times, "mode": store.mode(Settings.load()).shared}))
"""


def timed(argv: list[str], env: dict[str, str], cwd: Path, cpu: list[float]) -> float:
    """Wall seconds of one process that must exit 0; its CPU time (user + sys) goes to ``cpu``."""
    import time

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode()}")
    cpu.append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
    return elapsed


def sdk_section(venv: Path, work: Path, src: Path, steps: int) -> None:
    for nofsync in (False, True):
        folder = work / ("sdk-nofsync" if nofsync else "sdk")
        folder.mkdir()
        r = in_venv(
            venv, SDK, isolated_env(folder / "unused"), str(src), str(steps), str(folder), "1" if nofsync else "0"
        )
        c50, c99 = median(r["cluster"]), pct(r["cluster"], 99)
        rows = [
            [
                "cluster mode (segment append)",
                ms(c50),
                ms(pct(r["cluster"], 90)),
                ms(c99),
                f"{c50 / median(r['append']):.2f}x",
                f"p50 <= 0.5 ms: {verdict(c50 <= 0.0005)}, p99 <= 3 ms: {verdict(c99 <= 0.003)}",
            ],
            [
                "local mode (SQLite commit)",
                ms(median(r["local"])),
                ms(pct(r["local"], 90)),
                ms(pct(r["local"], 99)),
                f"{median(r['local']) / median(r['commit']):.2f}x",
                f"(cluster / local p50: {c50 / median(r['local']):.2f}x)",
            ],
            ["floor: bare append of 3 KB + fsync", *(ms(f(r["append"])) for f in (median, p90, p99)), "1.00x", ""],
            ["floor: bare SQLite INSERT + COMMIT", *(ms(f(r["commit"])) for f in (median, p90, p99)), "1.00x", ""],
        ]
        what = "fsyncs off: the code's own cost" if nofsync else "durable"
        table(
            f"(a) SDK `log_step`, {src.stat().st_size / 1024:.1f} KB code, one line changed a step, {steps} steps "
            f"each, interleaved, local disk, {what}",
            ["", "p50", "p90", "p99", "p50 vs its floor", "target"],
            rows,
        )


def p90(values: list[float]) -> float:
    return pct(values, 90)


def p99(values: list[float]) -> float:
    return pct(values, 99)


def cli_section(venv: Path, work: Path, lines: list[str], reps: int) -> None:
    weco = str(venv / "bin" / "weco")
    folder = work / "cli"
    folder.mkdir()
    src = folder / "train.py"
    src.write_text("".join(lines))
    envs = {}
    for mode, flag in (("cluster", "1"), ("local", "0")):
        envs[mode] = {**isolated_env(folder / mode), "WECO_OBSERVE_SHARED_FS": flag}
    wall, cpu = interleaved_logs(weco, envs, folder, src, lines, reps)
    ratio = median(wall["cluster"]) / median(wall["local"])
    table(
        f"(b) `weco observe log`, 13 KB source, {reps} interleaved runs each, local disk",
        ["mode", "median", "p90", "min", "CPU median", "cluster / local (median)"],
        [
            [
                "cluster",
                ms(median(wall["cluster"])),
                ms(pct(wall["cluster"], 90)),
                ms(min(wall["cluster"])),
                ms(median(cpu["cluster"])),
                f"**{ratio:.2f}x** (target <= 1.2x: {verdict(ratio <= 1.2)})",
            ],
            [
                "local",
                ms(median(wall["local"])),
                ms(pct(wall["local"], 90)),
                ms(min(wall["local"])),
                ms(median(cpu["local"])),
                f"CPU: {median(cpu['cluster']) / median(cpu['local']):.2f}x",
            ],
        ],
    )
    print(f"\n{reps} segment files were left unmerged in the cluster journal (each `log` lists and reads them)")


def merge_section(venv: Path, work: Path, src: Path, runs: int, steps: int) -> None:
    rows = []
    for style in ("sdk", "cli"):
        for with_code in (False, True):
            folder = work / f"merge-{style}-{int(with_code)}"
            folder.mkdir()
            env = isolated_env(folder / "unused")
            r = in_venv(
                venv, MERGE, env, str(folder / "data" / "journal.db"), style, str(runs), str(steps),
                "1" if with_code else "0", str(src),
            )  # fmt: skip
            rate = r["applied"] / r["merge"]
            rows.append(
                [
                    f"{'SDK: one .open file per run' if style == 'sdk' else 'CLI: one .seg file per step'}"
                    f"{', 13 KB code a step' if with_code else ', no code'}",
                    f"{r['applied']:,} ({r['files']:,} files, {r['bytes'] / 1e6:.1f} MB)",
                    f"{r['merge']:.2f} s",
                    f"**{rate:,.0f}/s** (target >= 20,000/s: {verdict(rate >= 20_000)})",
                    f"{r['total']:.2f} s",
                    f"{r['removed']:,}",
                ]
            )
            assert r["problems"] == 0 and r["applied"] == steps + runs, r
    table(
        f"(c) merge: {steps:,} steps across {runs} runs (and their creates), one owner, local disk",
        ["segments", "records", "merge", "records/s", "with lock and open", "files removed"],
        rows,
    )


def sshfs_section(venv: Path, work: Path, lines: list[str], reps: int, steps: int) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from sshfs_hosts import TwoHosts, Unavailable, missing

    if missing():
        print("\n(d) sshfs: skipped, missing: " + "; ".join(missing()))
        return
    weco = str(venv / "bin" / "weco")
    try:
        with TwoHosts(parent=str(work)) as hosts:
            folder = work / "sshfs-node"
            folder.mkdir()
            src = folder / "train.py"
            src.write_text("".join(lines))
            envs = {
                "cluster": isolated_env(hosts.mount_a / "cluster"),
                "local": {**isolated_env(hosts.mount_a / "local"), "WECO_OBSERVE_SHARED_FS": "0"},
            }
            for env in envs.values():  # the host's HOME and TMPDIR on its own disk, as on a node
                env.update(HOME=str(folder), TMPDIR=str(folder))
            wall, cpu = interleaved_logs(weco, envs, folder, src, lines, reps)
            sdk = {}
            for mode, env in envs.items():
                sdk[mode] = in_venv(venv, SSHFS_SDK, {**env, "WECO_OBSERVE_DIR": env["WECO_OBSERVE_DIR"] + "-sdk"},
                                    str(src), str(steps))  # fmt: skip
                assert sdk[mode]["mode"] == (mode == "cluster"), sdk[mode]
    except Unavailable as exc:
        print(f"\n(d) sshfs: skipped: {exc}")
        return
    rows = []
    for mode in ("cluster", "local"):
        t = sdk[mode]["times"]
        label = "cluster (detected: fuse.sshfs)" if mode == "cluster" else "local, forced (unsafe here; 1 writer)"
        rows.append(
            [
                label,
                ms(median(wall[mode])),
                ms(pct(wall[mode], 90)),
                ms(median(t)),
                ms(pct(t, 99)),
            ]
        )
    table(
        f"(d) on sshfs (loopback sshd, sshfs {','.join(hosts.options) or 'defaults'}): `log` x{reps} interleaved, "
        f"SDK `log_step` x{steps}, 13 KB code",
        ["mode", "`log` median", "`log` p90", "`log_step` p50", "`log_step` p99"],
        rows,
    )
    print(
        f"\ncluster / local: `log` {median(wall['cluster']) / median(wall['local']):.2f}x, "
        f"`log_step` p50 {median(sdk['cluster']['times']) / median(sdk['local']['times']):.2f}x"
    )


def interleaved_logs(
    weco: str, envs: dict[str, dict[str, str]], folder: Path, src: Path, lines: list[str], reps: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """`init` once per mode, then `reps` CLI `log`s per mode, the modes interleaved (the order swapped
    every step), each step changing one line of ``src``: (wall times, CPU times) by mode."""
    runs = {mode: init_run(weco, env, folder, src.name) for mode, env in envs.items()}
    wall: dict[str, list[float]] = {mode: [] for mode in envs}
    cpu: dict[str, list[float]] = {mode: [] for mode in envs}
    for step in range(1, reps + 1):
        lines[step % len(lines)] = f"param = {step}\n"
        src.write_text("".join(lines))
        for mode in ("cluster", "local") if step % 2 else ("local", "cluster"):
            argv = [weco, "observe", "log", "--run-id", runs[mode], "--step", str(step), "-s", src.name]
            argv += ["--metrics", f'{{"loss": {1 / step}}}', "-q"]
            wall[mode].append(timed(argv, envs[mode], folder, cpu[mode]))
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", help="reuse (or create) a venv here with a non-editable install")
    parser.add_argument("--steps", type=int, default=2000, help="SDK steps per mode, (a)")
    parser.add_argument("--reps", type=int, default=40, help="interleaved `log` runs per mode, (b)")
    parser.add_argument("--merge-steps", type=int, default=20_000, help="steps to merge, (c)")
    parser.add_argument("--merge-runs", type=int, default=50, help="runs they are spread across, (c)")
    parser.add_argument("--sshfs-reps", type=int, default=20, help="`log` runs per mode on sshfs, (d)")
    parser.add_argument("--sshfs-steps", type=int, default=300, help="SDK steps per mode on sshfs, (d)")
    parser.add_argument("--only", choices=["sdk", "cli", "merge", "sshfs"], action="append", help="run only these")
    parser.add_argument("--keep", action="store_true", help="keep the journals (default: removed at the end)")
    args = parser.parse_args()
    venv = ensure_venv(args.venv)
    work = Path(tempfile.mkdtemp(prefix="weco-observe-bench-cluster-"))
    lines = source_13k()
    src = work / "train.py"
    src.write_text("".join(lines))
    only = set(args.only or ["sdk", "cli", "merge", "sshfs"])
    print(f"load average at the start: {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} cores")
    if "sdk" in only:
        sdk_section(venv, work, src, args.steps)
    if "cli" in only:
        cli_section(venv, work, list(lines), args.reps)
    if "merge" in only:
        merge_section(venv, work, src, args.merge_runs, args.merge_steps)
    if "sshfs" in only:
        sshfs_section(venv, work, list(lines), args.sshfs_reps, args.sshfs_steps)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} (1 min)")
    clean_up(venv, work, keep=args.keep, venv_given=bool(args.venv))


if __name__ == "__main__":
    main()
