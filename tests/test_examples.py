"""The examples run as tests, on a journal in tmp_path, and do what they say."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import totals
import pytest

from weco_observe.journal import Journal

#: end to end: every CLI call here is a real process (kills, signals, start-up, entry points)
pytestmark = pytest.mark.subprocess_cli

EXAMPLES = Path(__file__).parents[1] / "examples"


def tree(journal_path: Path) -> dict[int, int | None]:
    with Journal(journal_path) as j:
        (run,) = j.query("SELECT id FROM runs")
        return {s["step"]: s["parent_step"] for s in j.steps(run["id"])}


@pytest.mark.parametrize("weco", ["script", "module"])
def test_quickstart_sh(tmp_path, journal_path, weco):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    env = dict(os.environ)
    if weco == "script":
        bindir = Path(sys.executable).parent
        if not (bindir / "weco").exists():
            pytest.skip("the weco console script is not installed next to this interpreter")
        env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
        env.pop("WECO", None)
    else:
        env["WECO"] = f"{sys.executable} -m weco_observe"
    out = subprocess.run(
        ["bash", str(EXAMPLES / "quickstart.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("run: local-")
    assert "steps:          5" in out.stdout
    # the guide's tree: 0 <- 1 <- 2 <- 3 (failed), 4 branched from 2
    assert tree(journal_path) == {0: None, 1: 0, 2: 1, 3: 2, 4: 2}
    with Journal(journal_path) as j:
        (run,) = j.query("SELECT id, name, metric, maximize FROM runs")
        assert (run["name"], run["metric"], run["maximize"]) == ("my-experiment", "val_bpb", 0)
        steps = j.steps(run["id"])
        assert steps[3]["status"] == "failed"
        assert steps[0]["metrics"] == {"val_bpb": 2.366, "memory_gb": 0.0}
        assert "BATCH_SIZE = 32_768" in j.read_code(steps[1]["code"])["train.py"]
        assert totals(j)["pending"] == 6  # 1 create + 5 logs, waiting for sync


def test_sdk_sweep(tmp_path, journal_path):
    out = subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLES / "sdk_sweep.py"), "--steps", "15"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("run local-") and "best step" in out.stdout
    shape = tree(journal_path)
    assert sorted(shape) == list(range(16))
    with Journal(journal_path) as j:
        (run,) = j.query("SELECT id FROM runs")
        steps = j.steps(run["id"])
        statuses = {s["status"] for s in steps}
        best = int(out.stdout.split("best step ")[1].split(",")[0])
        # every trial branches from the best step so far, which is never a failed step
        assert all(steps[s["parent_step"]]["status"] == "completed" for s in steps[1:])
        assert steps[best]["status"] == "completed"
        assert all(j.read_code(s["code"])["train.py"].startswith("LEARNING_RATE") for s in steps)
    assert statuses == {"completed", "failed"}  # seed 0 runs out of memory at least once
