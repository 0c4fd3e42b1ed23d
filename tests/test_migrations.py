"""The schema is created and upgraded only by named migrations, with its version recorded."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from sqlite_utils import Database

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


def test_from_previous_schema_keeps_data(journal_path, monkeypatch):
    """A journal written at the previous version (only m001 applied) upgrades in place on open."""
    journal_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(journal_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    db = Database(conn)
    migrations.migrations.apply(db, stop_before=NAMES[-1])
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION - 1}")
    assert "bundles" not in tables(journal_path)
    conn.close()
    # write data the way the previous version did: its journal code, believing m001 is current
    import weco_observe.journal as journal_module

    monkeypatch.setattr(journal_module, "SCHEMA_VERSION", SCHEMA_VERSION - 1)
    with Journal(journal_path) as old:
        run = old.create_run(source_code={"a.py": "a = 1\n"}, metric="loss")
        old.log_step(run, 1, metrics={"loss": 0.5}, code={"a.py": "a = 2\n"})
    monkeypatch.setattr(journal_module, "SCHEMA_VERSION", SCHEMA_VERSION)
    assert "bundles" not in tables(journal_path)
    with Journal(journal_path) as j:
        assert j.schema_version() == SCHEMA_VERSION
        steps = j.steps(run)
        assert [s["step"] for s in steps] == [0, 1]
        assert j.read_code(steps[1]["code"]) == {"a.py": "a = 2\n"}
        assert j.counts()["pending"] == 2
        j.log_step(run, 2)
    assert {"bundles", "imports"} <= tables(journal_path)


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
        assert j.counts()["runs"] == 6


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
