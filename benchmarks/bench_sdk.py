"""The SDK: `import weco_observe`, `create_run`, and durable `log_step` with a 13 KB code dict.

Targets (issue 2): `import weco_observe` <= 60 ms; `create_run` <= 20 ms;
`log_step` with a 13 KB code dict, durably committed before it returns,
p50 <= 0.5 ms and p99 <= 3 ms.

Imports are timed in fresh interpreters of a venv with a regular install
(`import weco_observe` is lazy, PEP 562, so `from weco_observe import
WecoObserver` is timed too: that is what a user's script pays). The baseline
for `log_step` is the floor of any durable write here: one bare SQLite
`INSERT` + `COMMIT` of a 200-byte row, in WAL mode with `synchronous=FULL`
(one fsync), interleaved with the `log_step` calls in the same process.

    python benchmarks/bench_sdk.py [--venv DIR] [--steps 2000]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import clean_up, ensure_venv, in_venv, isolated_env, median, ms, pct, source_13k, table, verdict

IMPORT = """
import json, sys, time
t = time.perf_counter()
exec(sys.argv[1])
print(json.dumps({"s": time.perf_counter() - t}))
"""

SDK = """
import json, os, sqlite3, sys, time
from weco_observe import WecoObserver
lines = [l + "\\n" for l in open(sys.argv[1]).read().splitlines()]
steps, work = int(sys.argv[2]), sys.argv[3]
out = {"new_journal": [], "first_create": [], "create": [], "changed": [], "unchanged": [], "floor": []}
for i in range(10):  # the very first call on a machine: creates the journal, runs the migrations
    obs = WecoObserver(journal_path=os.path.join(work, f"fresh{i}", "journal.db"))
    t = time.perf_counter()
    obs.create_run(source_code={"train.py": "".join(lines)}, primary_metric="loss")
    out["new_journal"].append(time.perf_counter() - t)
    obs.close()
for i in range(10):  # a script's first call: opens the existing journal, then creates
    obs = WecoObserver()
    lines[0] = f"first = {i}\\n"
    t = time.perf_counter()
    obs.create_run(source_code={"train.py": "".join(lines)}, primary_metric="loss")
    out["first_create"].append(time.perf_counter() - t)
    obs.close()
obs = WecoObserver()
for i in range(50):
    lines[0] = f"run = {i}\\n"
    t = time.perf_counter()
    run = obs.create_run(source_code={"train.py": "".join(lines)}, primary_metric="loss")
    out["create"].append(time.perf_counter() - t)
floor = sqlite3.connect(os.path.join(work, "floor.db"), isolation_level=None)
floor.execute("PRAGMA journal_mode=WAL"); floor.execute("PRAGMA synchronous=FULL")
floor.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload TEXT)")
row = "x" * 200
for step in range(1, steps + 1):
    lines[step % len(lines)] = f"param = {step}\\n"
    code = {"train.py": "".join(lines)}
    t = time.perf_counter()
    run.log_step(step, metrics={"loss": 1 / step, "memory_gb": 0.0}, code=code)
    out["changed"].append(time.perf_counter() - t)
    t = time.perf_counter()
    floor.execute("BEGIN IMMEDIATE")
    floor.execute("INSERT INTO t (payload) VALUES (?)", (row,))
    floor.execute("COMMIT")
    out["floor"].append(time.perf_counter() - t)
for step in range(steps + 1, 2 * steps + 1):
    t = time.perf_counter()
    run.log_step(step, metrics={"loss": 1 / step}, code=code)
    out["unchanged"].append(time.perf_counter() - t)
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", help="reuse (or create) a venv here with a non-editable install")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--imports", type=int, default=20, help="fresh interpreters per import measurement")
    parser.add_argument("--keep", action="store_true", help="keep the journals (default: removed at the end)")
    args = parser.parse_args()
    venv = ensure_venv(args.venv)
    work = Path(tempfile.mkdtemp(prefix="weco-observe-bench-sdk-"))
    env = isolated_env(work / "journal")
    src = work / "train.py"
    src.write_text("".join(source_13k()))

    imports = {}
    for label, stmt in [
        ("`import typer` (for scale)", "import typer"),
        ("`import weco_observe`", "import weco_observe"),
        ("`from weco_observe import WecoObserver`", "from weco_observe import WecoObserver"),
    ]:
        imports[label] = [in_venv(venv, IMPORT, env, stmt)["s"] for _ in range(args.imports)]
    rows = []
    for label, times in imports.items():
        target = "" if "typer" in label else f"<= 60 ms: {verdict(median(times) <= 0.060)}"
        rows.append([label, ms(median(times)), ms(pct(times, 90)), target])
    table(f"imports, fresh interpreter, {args.imports} runs each", ["import", "median", "p90", "target"], rows)

    r = in_venv(venv, SDK, env, str(src), str(args.steps), str(work))
    floor = median(r["floor"])
    table(
        f"SDK calls, {src.stat().st_size / 1024:.1f} KB code dict, durable (WAL, synchronous=FULL)",
        ["call", "p50", "p99", "p50 vs bare commit", "target"],
        [
            ["bare SQLite INSERT+COMMIT (baseline: one fsync)", ms(floor), ms(pct(r["floor"], 99)), "1.00x", ""],
            [
                f"`log_step`, one line changed per step ({args.steps})",
                ms(median(r["changed"])),
                ms(pct(r["changed"], 99)),
                f"{median(r['changed']) / floor:.2f}x",
                f"p50 <= 0.5 ms: {verdict(median(r['changed']) <= 0.0005)}, "
                f"p99 <= 3 ms: {verdict(pct(r['changed'], 99) <= 0.003)}",
            ],
            [
                f"`log_step`, code unchanged ({args.steps})",
                ms(median(r["unchanged"])),
                ms(pct(r["unchanged"], 99)),
                f"{median(r['unchanged']) / floor:.2f}x",
                f"p50 <= 0.5 ms: {verdict(median(r['unchanged']) <= 0.0005)}, "
                f"p99 <= 3 ms: {verdict(pct(r['unchanged'], 99) <= 0.003)}",
            ],
            [
                "`create_run` on an open journal (50)",
                ms(median(r["create"])),
                ms(pct(r["create"], 99)),
                f"{median(r['create']) / floor:.2f}x",
                f"<= 20 ms: {verdict(median(r['create']) <= 0.020)}",
            ],
            [
                "`create_run` as a script's first call: opens the journal too (10)",
                ms(median(r["first_create"])),
                ms(max(r["first_create"])),
                f"{median(r['first_create']) / floor:.2f}x",
                f"<= 20 ms: {verdict(median(r['first_create']) <= 0.020)}",
            ],
            [
                "`create_run` on a new machine: creates the journal, runs migrations (10, once ever)",
                ms(median(r["new_journal"])),
                ms(max(r["new_journal"])),
                f"{median(r['new_journal']) / floor:.2f}x",
                "(one-time; not a target)",
            ],
        ],
    )
    clean_up(venv, work, keep=args.keep, venv_given=bool(args.venv))


if __name__ == "__main__":
    main()
