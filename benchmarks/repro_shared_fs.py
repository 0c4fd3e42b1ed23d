"""Many hosts logging into one journal on a shared filesystem: is anything lost? (issue 8)

Two sshfs mounts of one folder, served by an sshd on 127.0.0.1, play two hosts
(each mount has its own page cache and lock domain, like two NFS clients with
``nolock``; see ``tests/sshfs_hosts.py``). ``--writers`` processes per host each
run ``weco observe log`` ``--logs`` times, all into one run, with the journal in
the shared folder (``WECO_OBSERVE_DIR`` on the mount, ``WECO_OBSERVE_AUTO_SYNC=0``).
Each host has its own HOME and TMPDIR on the local disk, as cluster nodes do, so a
spill into the temp dir stays on its host. Then a reader on a third mount runs
``weco observe export`` and ``doctor``, and counts:

- acknowledged logs (exit 0) missing from the export, and of those how many wait
  in a spill file (delayed, not lost) and how many are nowhere;
- logs killed by a signal, logs that exited non-zero, steps present but never
  acknowledged;
- whether ``export`` worked and ``PRAGMA integrity_check`` says ok.

Only the CLI is used, so the same script measures any future journal mode. Exits
1 when an acknowledged log is missing, a log died of a signal, or the journal is
damaged, so it can gate a change.

    python benchmarks/repro_shared_fs.py                      # 2 hosts x 4 writers x 40 logs
    python benchmarks/repro_shared_fs.py --writers 8 --logs 20 --save /tmp/evidence

Needs root, FUSE, sshfs and openssh-server (apt-get install sshfs openssh-server).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import REPO, pct, table

sys.path.insert(0, str(REPO / "tests"))
from sshfs_hosts import NO_DIR_CACHE, SSHFS_DEFAULTS, Hosts, TwoHosts, Unavailable, missing  # noqa: E402

LOG_TIMEOUT = 120.0


class Host:
    """One "host": a mount of the shared folder, and a HOME and TMPDIR of its own on the local disk."""

    def __init__(self, name: str, mount: Path, local: Path, python: str):
        self.name = name
        self.journal_dir = mount / "weco-data"
        self.local = local / name
        (self.local / "home").mkdir(parents=True)
        (self.local / "tmp").mkdir()
        self.python = python

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WECO_")}
        env.update(
            WECO_OBSERVE_DIR=str(self.journal_dir),
            WECO_OBSERVE_AUTO_SYNC="0",
            HOME=str(self.local / "home"),
            TMPDIR=str(self.local / "tmp"),
            PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        )
        return env

    def cli(self, *args: str, timeout: float = LOG_TIMEOUT) -> Done:
        argv = [self.python, "-m", "weco_observe", "observe", *args]
        process = subprocess.Popen(
            argv, env=self.env(), cwd=self.local, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            return Done(None, out, err + "\n(timed out)")
        return Done(process.returncode, out, err)


@dataclasses.dataclass
class Done:
    returncode: int | None  # None: timed out; negative: killed by that signal
    stdout: str
    stderr: str


@dataclasses.dataclass
class Outcome:
    host: str
    step: int
    returncode: int | None
    seconds: float
    stderr: str


def writer(host: Host, run_id: str, steps: list[int], start: threading.Barrier, out: list[Outcome]) -> None:
    start.wait()
    for step in steps:
        began = time.perf_counter()
        done = host.cli(
            "log",
            "--run-id",
            run_id,
            "--step",
            str(step),
            "--metrics",
            json.dumps({"loss": 1 / step}),
            "--description",
            f"{host.name} step {step}",
            "--quiet",
        )
        out.append(Outcome(host.name, step, done.returncode, time.perf_counter() - began, done.stderr))


def spilled_steps(folders: list[Path]) -> set[int]:
    """Steps waiting in spill files (today's format: JSON with ``kwargs.step``; other formats count none)."""
    steps = set()
    for folder in folders:
        for path in folder.rglob("*.json") if folder.exists() else []:
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                steps.add(int(record["kwargs"]["step"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return steps


def export(host: Host, run_id: str) -> tuple[set[int] | None, str]:
    """The steps ``export`` finds from ``host`` (None if it fails), and how it went."""
    done = host.cli("export", run_id, "--format", "json")
    if done.returncode != 0:
        return None, f"exit {done.returncode}: {last_line(done.stderr)}"
    try:
        return {s["step"] for s in json.loads(done.stdout)["steps"]} - {0}, "ok"
    except (ValueError, KeyError, TypeError) as exc:
        return None, f"unreadable output: {exc}"


def integrity_by_doctor(host: Host) -> str:
    done = host.cli("doctor", "--json")
    try:
        checks = {c["name"]: c["message"] for c in json.loads(done.stdout)["checks"]}
    except (ValueError, KeyError, TypeError):
        return f"exit {done.returncode}: {last_line(done.stderr)}"
    return checks.get("integrity", "no integrity check")


def integrity(journal: Path) -> str:
    if not journal.exists():
        return f"no {journal.name}"
    try:
        conn = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=10)
        try:
            rows = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return f"cannot check: {exc}"
    return "ok" if rows == ["ok"] else f"{len(rows)} problem(s): {rows[0]}"


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:160] if lines else ""


def run(hosts: Hosts, writers: int, logs: int, python: str, save: Path | None) -> int:
    local = hosts.root / "local"  # the hosts' own disks: under the test folder, beside (not in) the backing folder
    a = Host("host-a", hosts.mount_a, local, python)
    b = Host("host-b", hosts.mount_b, local, python)
    (a.local / "train.py").write_text("lr = 0.01\n")
    made = a.cli("init", "--metric", "loss", "--source", "train.py", "--name", "shared-fs repro")
    if made.returncode != 0:
        raise SystemExit(f"init failed ({made.returncode}): {made.stderr}")
    run_id = made.stdout.strip()

    outcomes: list[Outcome] = []
    start = threading.Barrier(2 * writers)
    threads = []
    for h, host in enumerate((a, b)):
        for w in range(writers):
            first = 1 + (h * writers + w) * logs
            steps = list(range(first, first + logs))
            threads.append(threading.Thread(target=writer, args=(host, run_id, steps, start, outcomes)))
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began

    reader = Host("host-c", hosts.extra_mount("c"), local, python)
    present, export_state = export(reader, run_id)
    doctor_state = integrity_by_doctor(reader)
    check = integrity(reader.journal_dir / "journal.db")
    # What a later reader finds (the login node's sync, say) once the first one has closed the journal.
    later = Host("host-d", hosts.extra_mount("d"), local, python)
    present_later, export_later = export(later, run_id)
    source = "the export"
    if present is None:
        # The journal is damaged: count what `doctor --repair` salvages, in a copy on the local disk.
        copy = local / "copy-of-shared-folder"
        shutil.copytree(hosts.backing, copy)
        repairer = Host("salvage", copy, local, python)
        repaired = repairer.cli("doctor", "--repair")
        present, state = export(repairer, run_id)
        source = f"`doctor --repair` of a copy (exit {repaired.returncode}, export {state})"

    acknowledged = {o.step for o in outcomes if o.returncode == 0}
    signals = collections.Counter(
        signal.Signals(-o.returncode).name for o in outcomes if o.returncode is not None and o.returncode < 0
    )
    failed = [o for o in outcomes if o.returncode is None or o.returncode > 0]
    spill = spilled_steps([hosts.backing / "weco-data" / "spill", a.local / "tmp", b.local / "tmp"])
    seconds = [o.seconds for o in outcomes]
    rows: list[tuple[str, object]] = [
        ("logs run", len(outcomes)),
        ("exited 0 (acknowledged)", len(acknowledged)),
        ("exited non-zero or timed out", len(failed)),
        ("killed by a signal", sum(signals.values())),
        *((f"  {name}", count) for name, count in sorted(signals.items())),
        ("export from a third mount", export_state),
        ("doctor's integrity check (third mount)", doctor_state),
        ("PRAGMA integrity_check (third mount)", check),
        ("acknowledged, waiting in a spill file", len(acknowledged & spill)),
        ("steps counted from", source),
    ]
    if present is None:
        rows.append(("acknowledged, missing", "unknown: the journal is unreadable"))
    else:
        lost = acknowledged - present
        by_host = {h: sum(o.step in lost for o in outcomes if o.host == h) for h in (a.name, b.name)}
        rows += [
            ("acknowledged, present", len(acknowledged & present)),
            ("acknowledged, missing", len(lost)),
            ("  of which waiting in a spill file", len(lost & spill)),
            ("  of which nowhere", len(lost - spill)),
            ("  by host", ", ".join(f"{h} {n}" for h, n in by_host.items())),
            ("present, never acknowledged", len(present - acknowledged)),
        ]
    later_missing = export_later if present_later is None else len(acknowledged - present_later)
    rows += [
        ("acknowledged, missing when read again from a 4th mount", later_missing),
        ("log wall time p50 / p99", f"{pct(seconds, 50) * 1000:.0f} / {pct(seconds, 99) * 1000:.0f} ms"),
        ("wall time, all writers", f"{elapsed:.1f} s"),
    ]
    title = f"2 hosts (sshfs, {','.join(hosts.options) or 'sshfs defaults'}) x {writers} writers x {logs} logs"
    table(title, ["", "count"], rows)
    for label, group in (("failed", failed), ("acknowledged", [o for o in outcomes if o.returncode == 0])):
        said = collections.Counter(last_line(o.stderr) for o in group if o.stderr.strip())
        for message, count in said.most_common(5):
            print(f"- {label}, {count} x: {message}")
    if save is not None:
        shutil.copytree(hosts.backing, save, dirs_exist_ok=True)
        print(f"\nthe shared folder is copied to {save}")
    lost_any = present is None or bool(acknowledged - present)
    return 1 if lost_any or signals or failed or check != "ok" else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", type=int, default=4, help="writers per host (default 4)")
    parser.add_argument("--logs", type=int, default=40, help="`log` calls per writer (default 40)")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs weco_observe")
    parser.add_argument(
        "--sshfs-defaults", action="store_true", help="keep sshfs's 20 s cache of names and attributes (lags as NFS)"
    )
    parser.add_argument("--save", type=Path, help="copy the shared folder here afterwards, for a post-mortem")
    args = parser.parse_args()
    if missing():
        raise SystemExit("cannot build the loopback cluster, missing: " + "; ".join(missing()))
    try:
        with TwoHosts(SSHFS_DEFAULTS if args.sshfs_defaults else NO_DIR_CACHE) as hosts:
            return run(hosts, args.writers, args.logs, args.python, args.save)
    except Unavailable as exc:
        raise SystemExit(str(exc)) from None


if __name__ == "__main__":
    sys.exit(main())
