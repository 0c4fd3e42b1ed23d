"""Fixtures and checks for tests that talk to the Weco API emulator on loopback.

Use from any test module (``tests/`` is on ``sys.path`` under pytest)::

    from emulator_fixtures import assert_server_matches_journal, emulator  # noqa: F401

    def test_something(emulator, cli):
        cli.ok("observe", "sync", env=emulator.env())
        assert_server_matches_journal(emulator, journal_path)

``emulator`` is a started :class:`weco_observe.emulator.Emulator` on 127.0.0.1
and a free port, stopped after the test; ``emulator.base_url``,
``emulator.api_key``, ``emulator.env()`` (WECO_BASE_URL/WECO_API_KEY/
WECO_DASHBOARD_URL) and ``emulator.state()`` / ``set_faults(...)`` are there.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from weco_observe.emulator import Emulator
from weco_observe.journal import Journal

LOCAL_ID_KEY = "weco_observe_local_id"


@pytest.fixture
def emulator():
    emu = Emulator().start()
    try:
        yield emu
    finally:
        emu.stop()


def expected_server_state(journal_path: Path) -> dict[str, dict[str, Any]]:
    """What the server should hold once the journal is fully synced: ``{server_id: run}``.

    Each run has ``name``, ``metric_name``, ``maximize``, ``additional_instructions``,
    ``metadata`` (with the local id) and ``steps`` ``{n: {status, description,
    metrics, code (text), parent_step, metadata}}``. Remote-only runs list only
    the steps this journal logged.
    """
    out: dict[str, dict[str, Any]] = {}
    with Journal(journal_path) as journal:
        for run in journal.query("SELECT * FROM runs ORDER BY created_at"):
            server_id = run["server_id"]
            assert server_id, f"run {run['id']} has no server id: its create was never delivered"
            meta = json.loads(run["metadata"]) if run["metadata"] else {}
            expected: dict[str, Any] = {"remote_only": bool(run["remote_only"]), "steps": {}}
            if not run["remote_only"]:
                expected.update(
                    name=run["name"],
                    metric_name=run["metric"],
                    maximize=bool(run["maximize"]),
                    additional_instructions=run["additional_instructions"],
                    metadata={**meta, LOCAL_ID_KEY: run["id"]},
                )
            for step in journal.steps(run["id"]):
                expected["steps"][step["step"]] = {
                    "status": step["status"],
                    "description": step["description"],
                    "metrics": step["metrics"] or None,
                    "code": journal.read_code(step["code"]) if step["code"] else None,
                    "parent_step": step["parent_step"],
                    "metadata": step["metadata"] or None,
                }
            out[server_id] = expected
    return out


def server_runs_by_local_id(emulator: Emulator) -> Counter[str]:
    """How many server runs carry each local id (more than one = a duplicated create)."""
    return Counter(
        (run.get("metadata") or {}).get(LOCAL_ID_KEY)
        for run in emulator.runs().values()
        if (run.get("metadata") or {}).get(LOCAL_ID_KEY)
    )


def assert_server_matches_journal(
    emulator: Emulator, journal_path: Path, *, allow_duplicate_runs: bool = False
) -> None:
    """The emulator holds exactly the journal's runs and steps (every field and the tree)."""
    expected = expected_server_state(journal_path)
    runs = emulator.runs()
    for server_id, want in expected.items():
        assert server_id in runs, f"server has no run {server_id}"
        got = runs[server_id]
        if not want["remote_only"]:
            for key in ("name", "metric_name", "maximize", "additional_instructions", "metadata"):
                assert got[key] == want[key], f"run {server_id} {key}: server {got[key]!r} != journal {want[key]!r}"
        server_steps = got["steps"]
        for n, step in want["steps"].items():
            assert n in server_steps, f"run {server_id}: server lacks step {n}"
            have = {k: server_steps[n][k] or None if k in ("metrics", "metadata") else server_steps[n][k] for k in step}
            if step["parent_step"] is None and n != 0:
                # The journal resolved no parent (a remote-only run, or every earlier step
                # failed): no parent_step is sent and the server's auto-chaining decides.
                have["parent_step"] = None
            assert have == step, f"run {server_id} step {n}: server {have!r} != journal {step!r}"
        if not want["remote_only"]:
            extra = set(server_steps) - set(want["steps"])
            assert not extra, f"run {server_id}: server has steps the journal lacks: {sorted(extra)}"
    synced = set(expected)
    duplicates = {local: n for local, n in server_runs_by_local_id(emulator).items() if n > 1}
    if not allow_duplicate_runs:
        assert not duplicates, f"duplicated creates on the server: {duplicates}"
        unknown = [
            rid for rid, run in runs.items() if rid not in synced and (run.get("metadata") or {}).get(LOCAL_ID_KEY)
        ]
        assert not unknown, f"server runs that the journal does not know: {unknown}"


def pending_events(journal_path: Path) -> int:
    conn = sqlite3.connect(journal_path)
    try:
        return conn.execute("SELECT count(*) FROM events WHERE state = 'pending'").fetchone()[0]
    finally:
        conn.close()


def make_workload(
    journal_path: Path, *, runs: int = 3, steps: int = 12, seed: int = 0, relog: bool = True
) -> list[str]:
    """Journal a realistic workload: several runs, code that changes, failed steps, explicit
    branches, steps logged again (so several events per step), metadata. Returns the local run ids."""
    import random

    rng = random.Random(seed)
    out = []
    with Journal(journal_path) as journal:
        for r in range(runs):
            src = "".join(f"line_{i} = {i * r}\n" for i in range(40))
            run_id = journal.create_run(
                source_code={"train.py": src, "util.py": f"R = {r}\n"},
                metric="loss",
                maximize=bool(r % 2),
                name=f"run {r}" if r % 3 else None,
                additional_instructions="be brief" if r == 1 else None,
                metadata={"host": "box", "r": r} if r % 2 else None,
            )
            out.append(run_id)
            for n in range(1, steps + 1):
                src = src.replace(f"line_{rng.randrange(40)} =", f"line_{rng.randrange(40)}_v{n} =", 1)
                failed = rng.random() < 0.25
                parent = rng.randrange(0, n) if rng.random() < 0.2 else None
                journal.log_step(
                    run_id,
                    n,
                    status="failed" if failed else "completed",
                    description=f"try {n}" if rng.random() < 0.8 else None,
                    metrics={"loss": round(rng.random(), 4), "mem": n} if rng.random() < 0.9 else None,
                    code={"train.py": src} if rng.random() < 0.7 else None,
                    parent_step=parent,
                    metadata={"k": n} if rng.random() < 0.2 else None,
                )
                if relog and rng.random() < 0.2:
                    journal.log_step(
                        run_id,
                        rng.randrange(0, n + 1),
                        description=f"re-logged at {n}",
                        metrics={"loss": round(rng.random(), 4)},
                    )
    return out
