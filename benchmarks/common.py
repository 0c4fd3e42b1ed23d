"""Shared helpers for the benchmarks: a non-editable install to measure, timing, tables.

The CLI and import benchmarks measure weco-observe as users get it: a regular
(non-editable) ``pip install .`` into a private venv, where pip has compiled
every module to ``.pyc`` at install time. An editable install measured with
``PYTHONDONTWRITEBYTECODE=1`` (set in some environments) would recompile our
modules on every run and measure the compiler instead.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def source_13k(lines: int = 260) -> list[str]:
    """A ~13 KB Python file, as lines, so a step can change one of them."""
    return [f"param_{i:03d} = {i * 7919 % 104729}  # tuned by the agent, see notes\n" for i in range(lines)]


def ensure_venv(path: str | None) -> Path:
    """A venv with a regular install of this repo: ``path`` if given (reused), else a fresh temp one."""
    if path:
        venv = Path(path)
        if (venv / "bin" / "weco").exists():
            return venv
    else:
        venv = Path(tempfile.mkdtemp(prefix="weco-observe-bench-venv-"))
    print(f"# installing {REPO} (non-editable) into {venv} ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    done = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(REPO)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(done.stdout + done.stderr)
    return venv


def isolated_env(journal_dir: Path) -> dict[str, str]:
    """An environment with its own journal and HOME (no key), auto-sync off."""
    home = journal_dir.parent / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WECO_")}
    env.update(WECO_OBSERVE_DIR=str(journal_dir), HOME=str(home), WECO_OBSERVE_AUTO_SYNC="0")
    return env


def wall(argv: Sequence[str], env: dict[str, str], cwd: Path | None = None) -> float:
    """Wall seconds of one process, which must exit 0."""
    start = time.perf_counter()
    done = subprocess.run(list(argv), env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode()}")
    return elapsed


def init_run(weco: str, env: dict[str, str], cwd: Path, source: str) -> str:
    """``weco observe init --metric loss -s SOURCE`` in ``cwd``: the new run's id."""
    return subprocess.run(
        [weco, "observe", "init", "--metric", "loss", "-s", source],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def in_venv(venv: Path, code: str, env: dict[str, str], *args: str) -> dict:
    """Run ``code`` with the venv's interpreter; it prints one JSON object, returned here.

    It runs in the venv's folder: ``python -c`` puts its working directory first on
    ``sys.path``, and from the repository's root that would import the checkout, not the
    install being measured."""
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code, *args],
        env=env,
        cwd=venv,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def pct(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a Markdown table (pastes straight into docs/journal.md)."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


def verdict(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def clean_up(venv: Path, work: Path, *, keep: bool, venv_given: bool) -> None:
    """Remove the work dir, and the venv unless the caller named it (``--venv``) or asked to ``--keep``."""
    if keep:
        print(f"\nvenv: {venv}; work dir: {work}")
        return
    shutil.rmtree(work, ignore_errors=True)
    if venv_given:
        print(f"\nvenv: {venv} (kept; pass it as --venv to reuse)")
    else:  # a temp venv made for this run
        shutil.rmtree(venv, ignore_errors=True)
