"""Storage: 1,000 steps of a 50 KB file that changes one line a step.

Target (issue 2): the journal stays <= 3 MB for 50 MB of raw code. Baselines
in the same run: the raw text, and each version zlib-compressed on its own
(what a store without deltas would keep). Steps are logged through the SDK,
durably, exactly as a user's loop would; the journal is measured after a WAL
checkpoint (main file + WAL + shared memory).

    python benchmarks/bench_storage.py [--steps 1000] [--kb 50]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import table, verdict  # noqa: E402

from weco_observe import WecoObserver  # noqa: E402
from weco_observe.journal import Journal  # noqa: E402


def journal_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


def run(kind: str, steps: int, kb: int, work: Path, seed: int = 1) -> dict:
    rng = random.Random(seed)
    lines = [f"weight_{i:05d} = {rng.random():.12f}  # layer {i % 48}, tuned\n" for i in range(kb * 1024 // 48)]
    path = work / kind / "journal.db"
    raw = zipped = 0
    elapsed = 0.0
    with WecoObserver(journal_path=path) as obs:
        text = "".join(lines)
        observed = obs.create_run(source_code={"model.py": text}, primary_metric="loss")
        raw, zipped = len(text), len(zlib.compress(text.encode()))
        for step in range(1, steps + 1):
            if kind == "edit one line":
                lines[rng.randrange(len(lines))] = f"weight_x = {rng.random():.12f}  # edited at step {step}\n"
            elif kind == "append one line":
                lines.append(f"extra_{step} = {rng.random():.12f}\n")
            text = "".join(lines)
            start = time.perf_counter()
            observed.log_step(
                step,
                status="failed" if step % 7 == 0 else "completed",
                metrics={"loss": rng.random()},
                code={"model.py": text},
            )
            elapsed += time.perf_counter() - start
            raw += len(text)
            zipped += len(zlib.compress(text.encode()))
    with Journal(path) as j:
        j.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        blobs = j.query("SELECT count(*) AS n, sum(length(data)) AS b FROM blobs")[0]
        last = j.steps(observed.run_id)[-1]
        assert j.read_code(last["code"]) == {"model.py": text}  # the newest version reads back exactly
    return {
        "kind": kind,
        "raw": raw,
        "zipped": zipped,
        "journal": journal_bytes(path),
        "blobs": blobs["n"],
        "blob_bytes": blobs["b"],
        "seconds": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--kb", type=int, default=50)
    parser.add_argument("--keep", action="store_true", help="keep the journals (default: removed at the end)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="weco-observe-bench-storage-"))
    os.environ["WECO_OBSERVE_AUTO_SYNC"] = "0"
    os.environ["WECO_OBSERVE_DIR"] = str(work / "default")
    results = [run(kind, args.steps, args.kb, work) for kind in ("edit one line", "append one line", "unchanged")]
    rows = []
    for r in results:
        mb = r["journal"] / 1e6
        rows.append(
            [
                r["kind"],
                f"{r['raw'] / 1e6:.1f} MB",
                f"{r['zipped'] / 1e6:.1f} MB",
                f"**{mb:.2f} MB**" + (f" (<= 3 MB: {verdict(mb <= 3)})" if r["kind"] == "edit one line" else ""),
                f"{r['raw'] / r['journal']:.0f}x",
                f"{r['blobs']:,} / {r['blob_bytes'] / 1e6:.2f} MB",
                f"{r['seconds'] / args.steps * 1000:.2f} ms",
            ]
        )
    table(
        f"storage: {args.steps:,} steps of a {args.kb} KB file",
        [
            "change per step",
            "raw code",
            "zlib per version (baseline)",
            "journal on disk",
            "raw / journal",
            "blobs / their bytes",
            "`log_step` mean (durable)",
        ],
        rows,
    )
    if args.keep:
        print(f"\nwork dir: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
