"""The main job: an agent loop that logs offline, then syncs to a Weco API on loopback.

    python examples/agent_loop.py [--dir DIR] [--steps N]

What it shows, on one machine and with no network:

1. Offline. A toy "agent" edits ``train.py`` (learning rate, width, warm-up) and
   "evaluates" each edit with a deterministic score. Every experiment is logged
   with the real CLI, exactly as an agent would (``weco observe init`` once, then
   ``weco observe log`` per experiment, ``--parent-step`` when it reverts). The
   API is unreachable the whole time: nothing is dropped, every call returns in
   milliseconds, and ``weco observe sync`` fails fast with exit 4, events pending.
2. Locally. ``weco observe show`` draws the tree with the best step marked.
3. Online. The Weco API emulator starts on 127.0.0.1; ``weco observe sync``
   delivers every run and step, and the script checks that the server's state
   equals the journal's: every step, status, metric, code file and parent.

The journal lives in a fresh directory (printed at the end, kept so you can
explore it with ``WECO_OBSERVE_DIR=... weco observe ui``); your own journal is
never touched.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN = '''"""Toy training script that the agent optimises."""
LEARNING_RATE = {lr}
WIDTH = {width}
WARMUP_STEPS = {warmup}


def train():
    return {{"lr": LEARNING_RATE, "width": WIDTH, "warmup": WARMUP_STEPS}}
'''


def score(cfg: dict) -> float:
    """A deterministic stand-in for validation loss (lower is better); big widths 'OOM'."""
    if cfg["width"] > 1024:
        raise MemoryError("out of memory")
    lr_term = (cfg["lr"] - 0.003) ** 2 * 4e4
    width_term = 256 / cfg["width"]
    warm_term = abs(cfg["warmup"] - 200) / 400
    return round(2.0 + lr_term + width_term + warm_term, 4)


def weco(*args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "weco_observe", *args], capture_output=True, text=True, env=env, timeout=120
    )
    if check and result.returncode != 0:
        sys.exit(f"`weco {' '.join(args)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="journal dir (default: a fresh temporary dir)")
    parser.add_argument("--steps", type=int, default=12, help="experiments to run (default 12)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    from weco_observe.emulator import DEFAULT_API_KEY, Emulator

    home = args.dir or Path(tempfile.mkdtemp(prefix="weco-observe-demo-"))
    work = home / "project"
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        WECO_OBSERVE_DIR=str(home / "journal"),
        WECO_API_KEY=DEFAULT_API_KEY,
        WECO_BASE_URL=f"http://127.0.0.1:{closed_port()}/v1",  # nothing listens there: offline
        WECO_OBSERVE_AUTO_SYNC="0",
    )
    os.chdir(work)
    rng = random.Random(args.seed)

    print("== 1. Offline: the agent logs every experiment into the local journal")
    cfg = {"lr": 0.01, "width": 128, "warmup": 0}
    Path("train.py").write_text(TRAIN.format(**cfg))
    t0 = time.perf_counter()
    run_id = weco(
        "observe",
        "init",
        "--name",
        "agent-loop demo",
        "--metric",
        "val_loss",
        "--goal",
        "min",
        "--source",
        "train.py",
        env=env,
    ).stdout.strip()
    print(f"   init -> {run_id} in {(time.perf_counter() - t0) * 1000:.0f} ms (API unreachable)")
    baseline = score(cfg)
    weco(
        "observe",
        "log",
        "-q",
        "--run-id",
        run_id,
        "--step",
        "0",
        "--description",
        "baseline",
        "--metrics",
        json.dumps({"val_loss": baseline}),
        "--source",
        "train.py",
        env=env,
    )

    best_step, best_cfg, best = 0, dict(cfg), baseline
    timings = []
    for step in range(1, args.steps + 1):
        knob = rng.choice(["lr", "width", "warmup"])
        trial = dict(best_cfg)
        if knob == "lr":
            trial["lr"] = round(trial["lr"] * rng.choice([0.5, 0.7, 1.4]), 5)
        elif knob == "width":
            trial["width"] = trial["width"] * rng.choice([2, 4]) if rng.random() < 0.8 else 4096
        else:
            trial["warmup"] = trial["warmup"] + rng.choice([50, 100, 200])
        Path("train.py").write_text(TRAIN.format(**trial))
        try:
            value, status = score(trial), "completed"
            description = f"{knob}: {best_cfg[knob]} -> {trial[knob]}"
        except MemoryError:
            value, status = 0.0, "failed"
            description = f"{knob}: {best_cfg[knob]} -> {trial[knob]} (OOM)"
        log = [
            "observe",
            "log",
            "-q",
            "--run-id",
            run_id,
            "--step",
            str(step),
            "--status",
            status,
            "--description",
            description,
            "--metrics",
            json.dumps({"val_loss": value}),
            "--source",
            "train.py",
            "--parent-step",
            str(best_step),
        ]
        t = time.perf_counter()
        weco(*log, env=env)
        timings.append(time.perf_counter() - t)
        if status == "completed" and value < best:
            best_step, best_cfg, best = step, trial, value
            print(f"   step {step:2}: {description:32} val_loss {value:.4f}  kept (new best)")
        else:
            print(
                f"   step {step:2}: {description:32} "
                + (f"val_loss {value:.4f}  reverted to step {best_step}" if status == "completed" else "failed")
            )
            Path("train.py").write_text(TRAIN.format(**best_cfg))
    print(
        f"   {len(timings)} logs, median {statistics.median(timings) * 1000:.0f} ms per `weco observe log` "
        "process (the official client: ~700 ms online, steps dropped offline)"
    )

    t = time.perf_counter()
    offline = weco("observe", "sync", env=env, check=False)
    print(
        f"   sync while offline: exit {offline.returncode} after {time.perf_counter() - t:.1f} s: "
        + ((offline.stderr or offline.stdout).strip().splitlines() or [""])[-1]
    )
    if offline.returncode != 4:
        print("   unexpected: sync should exit 4 (pending, API unreachable) while offline")
        return 1

    print("\n== 2. Locally: the tree, best step marked")
    print(weco("observe", "show", run_id, env=env).stdout.rstrip())

    print("\n== 3. Online: start the Weco API emulator on loopback and sync")
    with Emulator() as emu:
        env.update(emu.env())
        t = time.perf_counter()
        synced = weco("observe", "sync", env=env, check=False)
        print(f"   sync: exit {synced.returncode} in {time.perf_counter() - t:.2f} s")
        summary = (synced.stdout + synced.stderr).strip()
        print("   " + summary.replace("\n", "\n   "))
        if synced.returncode != 0:
            print(synced.stderr)
            return 1
        shown = json.loads(weco("observe", "show", run_id, "--json", env=env).stdout)
        server = emu.state()["runs"][shown["run"]["server_id"]]
        mismatches = []
        for step in shown["steps"]:
            remote = server["steps"].get(str(step["step"])) or server["steps"].get(step["step"])
            if remote is None:
                mismatches.append(f"step {step['step']} missing on the server")
                continue
            for key in ("status", "metrics", "parent_step"):
                if (remote.get(key) or None) != (step.get(key) or None):
                    mismatches.append(f"step {step['step']} {key}: server {remote.get(key)!r} != {step.get(key)!r}")
        if mismatches:
            print("   server state differs from the journal:\n   " + "\n   ".join(mismatches))
            return 1
        print(
            f"   server holds run {shown['run']['server_id']} with all {len(shown['steps'])} steps, "
            "statuses, metrics and parents equal to the journal"
        )
    print(
        f"\nJournal kept in {home / 'journal'}; explore it with:\n"
        f"   WECO_OBSERVE_DIR={home / 'journal'} weco observe show {run_id}\n"
        f"   WECO_OBSERVE_DIR={home / 'journal'} weco observe ui"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
