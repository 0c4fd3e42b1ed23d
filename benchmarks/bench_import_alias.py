"""What the ``weco.observe`` import alias costs every interpreter start-up in its environment.

``weco_observe_alias.pth`` runs at every start-up of the venv it is installed in
(see ``_weco_observe_alias.py``). Measured in a fresh venv holding only
weco-observe (``--no-deps``: the alias needs none of them):

(a) ``python -X importtime -c pass``: the modules of ours imported at start-up,
    and their import time. Target: one, ``_weco_observe_alias``.
(b) ``python -c pass`` in three set-ups, interleaved: no ``.pth`` file, a ``.pth``
    holding only a comment (the control: what ``site`` pays to open any ``.pth``),
    and ours. Wall and CPU time (user + sys; other jobs on a shared machine
    disturb it less), and the median of the paired differences to "none".
    Target: ours within 1 ms of "none".

    python benchmarks/bench_import_alias.py            # --reps 300
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, median, table, verdict

PTH = "weco_observe_alias.pth"


def _venv(root: Path) -> tuple[Path, Path]:
    """A venv with only weco-observe (non-editable, no dependencies): its python and its .pth file."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    project = root.parent / "project"
    project.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "_weco_observe_alias.py"):
        shutil.copy2(REPO / name, project / name)
    shutil.copytree(REPO / "weco_observe", project / "weco_observe", ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps"]
        + ["--disable-pip-version-check", str(project)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(done.stdout + done.stderr)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return python, Path(site) / PTH


def _start(python: Path) -> tuple[float, float]:
    """Wall and CPU (user + sys) seconds of one ``python -c pass``."""
    start = time.perf_counter()
    proc = subprocess.Popen([str(python), "-c", "pass"], env={"PATH": "/usr/bin:/bin"})
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{python} -c pass failed")
    return elapsed, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=300, help="python -c pass runs in each set-up")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="weco-observe-bench-alias-"))
    try:
        python, pth = _venv(work / "venv")
        line = pth.read_text()
        check = subprocess.run(
            [str(python), "-c", "from weco.observe import WecoObserver; print(WecoObserver.__module__)"],
            capture_output=True,
            text=True,
        )
        print(f"# from weco.observe import WecoObserver: {check.stdout.strip() or check.stderr.strip()}")
        ours: set[str] = set()
        micros: list[int] = []
        for _ in range(min(args.reps, 100)):
            err = subprocess.run([str(python), "-X", "importtime", "-c", "pass"], capture_output=True, text=True).stderr
            for row in err.splitlines():
                if "weco" in row:
                    ours.add(row.split("|")[-1].strip())
                    micros.append(int(row.split("|")[1]))
        print(
            f"\n(a) modules of ours imported at start-up: {sorted(ours)}, {median(micros):.0f} us median"
            f" (python -X importtime, cumulative): {verdict(ours == {'_weco_observe_alias'})}"
        )

        setups = {"none": None, "a comment-only .pth": "# nothing\n", "ours": line}
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in setups}
        try:
            for _ in range(args.reps):
                for name, text in setups.items():
                    if text is None:
                        pth.unlink(missing_ok=True)
                    else:
                        pth.write_text(text)
                    samples[name].append(_start(python))
        finally:
            pth.write_text(line)
        rows = []
        for name, runs in samples.items():
            base = samples["none"]
            d_wall = [a[0] - b[0] for a, b in zip(runs, base, strict=True)]
            d_cpu = [a[1] - b[1] for a, b in zip(runs, base, strict=True)]
            rows.append(
                [
                    name,
                    f"{median([w for w, _ in runs]) * 1000:.2f}",
                    f"{median([c for _, c in runs]) * 1000:.2f}",
                    "" if name == "none" else f"{statistics.median(d_wall) * 1000:+.2f}",
                    "" if name == "none" else f"{statistics.median(d_cpu) * 1000:+.2f}",
                ]
            )
        table(
            f"(b) python -c pass, {args.reps} runs of each set-up, interleaved (ms)",
            ["set-up", "wall median", "CPU median", "wall vs none", "CPU vs none"],
            rows,
        )
        d_cpu = statistics.median(a[1] - b[1] for a, b in zip(samples["ours"], samples["none"], strict=True))
        print(f"\nours vs none, CPU: {d_cpu * 1000:+.2f} ms: {verdict(d_cpu < 0.001)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
