"""The schema is created and upgraded only by named migrations, with its version recorded."""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from emulator_fixtures import emulator  # noqa: F401

from helpers import totals
from weco_observe import migrations
from weco_observe.journal import SCHEMA_VERSION, Journal

NAMES = [m.name for m in migrations.migrations._migrations]


def tables(db: Path) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        conn.close()


def test_from_blank(journal_path):
    assert not journal_path.exists()
    with Journal(journal_path) as j:
        assert j.schema_version() == SCHEMA_VERSION == len(NAMES)
        applied = [r["name"] for r in j.query("SELECT name FROM _sqlite_migrations ORDER BY rowid")]
    assert applied == NAMES
    assert {"runs", "steps", "blobs", "events", "bundles", "imports"} <= tables(journal_path)


def test_names_are_ordered_and_documented():
    assert NAMES == sorted(NAMES)
    assert all(name[:4] == f"m{i:03d}" for i, name in enumerate(NAMES, 1))
    assert all(m.fn.__doc__ for m in migrations.migrations._migrations)


FIXTURE = Path(__file__).parent / "fixtures" / "journal-v0.1.0.db"


def _raw(path: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.fixture
def old_journal(journal_path: Path) -> Path:
    """A copy of a real journal written by 0.1.0 (see tests/fixtures/make_v010_journal.py)."""
    journal_path.parent.mkdir(parents=True)
    shutil.copyfile(FIXTURE, journal_path)
    os.chmod(journal_path, 0o600)
    assert _raw(journal_path, "PRAGMA user_version") == [(2,)]
    return journal_path


def test_a_real_0_1_0_journal_upgrades_in_place_with_nothing_lost(old_journal):
    before = {
        t: _raw(old_journal, f"SELECT * FROM {t} ORDER BY 1") for t in ("runs", "steps", "blobs", "bundles", "imports")
    }
    events = _raw(
        old_journal, "SELECT seq, id, run_id, kind, step, payload, attempts, created_at FROM events ORDER BY seq"
    )
    old_states = dict(_raw(old_journal, "SELECT id, state || ':' || coalesce(last_error, '') FROM events"))
    with Journal(old_journal) as j:
        assert j.schema_version() == SCHEMA_VERSION
    for table, rows in before.items():
        assert _raw(old_journal, f"SELECT * FROM {table} ORDER BY 1") == rows, table
    columns = "seq, id, run_id, kind, step, payload, attempts, created_at"
    assert _raw(old_journal, f"SELECT {columns} FROM events ORDER BY seq") == events
    new = {r[0]: r[1:] for r in _raw(old_journal, "SELECT id, state, unanswered, last_error FROM events")}
    for event_id, old in old_states.items():
        state, error = old.split(":", 1)
        got_state, unanswered, got_error = new[event_id]
        if error == "in flight: sent, no answer yet":  # killed mid-create
            assert (got_state, unanswered, got_error) == ("in_flight", 0, None)
        elif error.startswith("ambiguous: "):
            assert (got_state, unanswered, got_error) == ("ambiguous", 1, error.removeprefix("ambiguous: "))
        elif error.startswith("possible duplicate: "):
            assert (got_state, unanswered, got_error) == ("possible_duplicate", 1, None)
        else:
            assert (got_state, unanswered, got_error) == (state, 0, error or None), event_id
    assert _raw(old_journal, "PRAGMA integrity_check") == [("ok",)]
    assert {r[0] for r in _raw(old_journal, "SELECT state FROM events")} >= {
        "in_flight",
        "ambiguous",
        "possible_duplicate",
        "pending",
        "delivered",
        "superseded",
        "rejected",
    }


def test_a_real_0_1_0_journal_syncs_after_the_upgrade(old_journal, emulator):
    """Everything 0.1.0 left unsent is delivered once; creates whose earlier attempt got no answer are flagged."""
    from weco_observe import outbox, replay
    from weco_observe.api import WecoClient

    with Journal(old_journal) as j, WecoClient(emulator.base_url, emulator.api_key) as client:
        for (server_id,) in j.query("SELECT server_id FROM runs WHERE server_id IS NOT NULL"):
            emulator.create_run({"a.py": "x\n"}, "loss", run_id=server_id)  # runs 0.1.0 created elsewhere
        unsent = {
            r[0]: r[1]
            for r in j.query("SELECT id, run_id FROM events WHERE state IN ('pending', 'in_flight', 'ambiguous')")
        }
        result = replay.sync(j, client, initial_wait=0.01, max_wait=0.02)
        assert result.pending == 0 and result.rejected_total == 1  # the one step the 0.1.0 server refused
        states = {r[0]: r[1] for r in j.query("SELECT id, state FROM events")}
        assert {states[e] for e in unsent} <= {"delivered", "possible_duplicate", "superseded"}
        assert outbox.counts(j)["possible_duplicate"] == 3  # the old one, the in-flight and the ambiguous create
        created = [r for r in emulator.runs().values() if (r.get("metadata") or {}).get("weco_observe_local_id")]
        assert len(created) == 4  # the four runs 0.1.0 never created: each exactly once
        for run in created:
            local = run["metadata"]["weco_observe_local_id"]
            assert j.find_run(local)["server_id"] == run["id"]
            assert sorted(run["steps"]) == sorted(s["step"] for s in j.steps(local))


def test_newer_schema_is_refused(journal_path):
    Journal(journal_path).close()
    conn = sqlite3.connect(journal_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    import pytest

    from weco_observe.errors import JournalUnavailable

    with pytest.raises(JournalUnavailable, match="newer"):
        Journal(journal_path)


def test_concurrent_first_opens_migrate_once(journal_path):
    errors: list[BaseException] = []

    def open_and_log(i: int) -> None:
        try:
            with Journal(journal_path) as j:
                run = j.create_run(source_code={"a.py": str(i)}, metric="loss")
                j.log_step(run, 1)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_and_log, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with Journal(journal_path) as j:
        assert [r["name"] for r in j.query("SELECT name FROM _sqlite_migrations")] == NAMES
        assert totals(j)["runs"] == 6


def test_hot_path_does_not_import_sqlite_utils(cli, tmp_path, journal_path):
    """Once the schema is current, `log` checks it with a PRAGMA and never loads the migrations."""
    Journal(journal_path).close()
    code = (
        "import sys, runpy\n"
        "sys.argv = ['weco', 'observe', 'log', '--run-id', '00000000-0000-4000-8000-000000000000',"
        " '--step', '1', '-q']\n"
        "try:\n    runpy.run_module('weco_observe', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('sqlite_utils', 'httpx', 'tenacity', 'platformdirs') or m == 'weco_observe.migrations')\n"
        "print(','.join(heavy))\n"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
