"""``weco observe doctor``: checks on real journal files, and ``--repair`` of really damaged ones.

Corruption is planted by overwriting whole pages of a table's b-tree in the
file (found with SQLite's ``dbstat``), which is what a torn write or a bad disk
block does.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from weco_observe import doctor, ids, outbox
from weco_observe.journal import SCHEMA_VERSION, Journal

SERVER_ID = "0d9f3c1e-1111-4222-8333-444455556666"


def make_journal(path: Path, steps: int = 300) -> list[str]:
    """Two runs with many steps (code every 10th), the first one already synced; returns run ids."""
    with Journal(path) as j:
        runs = []
        for r in range(2):
            run = j.create_run(
                source_code={"train.py": "lr = 0.1\n" * 50}, metric="loss", name=f"run{r}", metadata={"box": "a"}
            )
            for i in range(1, steps // 2):
                j.log_step(
                    run,
                    i,
                    metrics={"loss": 1 / i},
                    description=f"step {i} " + "d" * 150,
                    code={"train.py": f"lr = {i}\n" * 50} if i % 10 == 0 else None,
                    status="failed" if i % 7 == 0 else "completed",
                )
            runs.append(run)
        create = j.query("SELECT id FROM events WHERE run_id = ? AND kind = 'create_run'", (runs[0],))[0][0]
        outbox.create_delivered(j, create, runs[0], SERVER_ID)
        j.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return runs


def table(path: Path, name: str, order: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT * FROM {name} ORDER BY {order}").fetchall()
    finally:
        conn.close()


def damage(path: Path, name: str, which: int = 1) -> int:
    """Overwrite the ``which``-th leaf page of table ``name`` with garbage; return its cell count."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        leaves = conn.execute(
            "SELECT pageno, ncell FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY pageno", (name,)
        ).fetchall()
    finally:
        conn.close()
    pageno, ncell = leaves[which]
    with open(path, "r+b") as f:
        f.seek((pageno - 1) * page_size)
        f.write(b"\xde\xad\xbe\xef" * (page_size // 4))
    return ncell


def test_a_healthy_journal_passes(cli, journal_path):
    make_journal(journal_path, steps=20)
    result = cli.ok("observe", "doctor")
    lines = result.stdout.splitlines()
    names = [line.split()[1] for line in lines]
    assert names == ["integrity", "schema", "code", "wal", "permissions", "filesystem"]
    assert all(line.startswith("ok") for line in lines), result.stdout
    report = json.loads(cli.ok("observe", "doctor", "--json").stdout)
    assert report["damaged"] is False and report["schema_version"] == SCHEMA_VERSION
    assert report["orphaned_blobs"] == 0 and report["missing_blobs"] == 0


def test_no_journal_yet_is_fine(cli, journal_path):
    result = cli.ok("observe", "doctor")
    assert "no journal yet" in result.stdout
    assert not journal_path.exists()


def test_repair_recovers_every_intact_step_and_event(cli, journal_path):
    runs = make_journal(journal_path)
    steps_before = table(journal_path, "steps", "run_id, step")
    events_before = table(journal_path, "events", "seq")
    lost_steps = damage(journal_path, "steps", 2)
    lost_events = damage(journal_path, "events", 5)
    assert lost_steps and lost_events

    found = cli("observe", "doctor")
    assert found.returncode == 7, found.stdout + found.stderr
    assert "error integrity" in found.stdout and "doctor --repair" in found.stdout

    repaired = cli.ok("observe", "doctor", "--repair")
    assert "repaired:" in repaired.stdout and "damaged file is kept as" in repaired.stdout
    kept = [
        p
        for p in journal_path.parent.iterdir()
        if p.name.startswith("journal.db.damaged-") and not p.name.endswith("-wal")
    ]
    assert len(kept) == 1 and kept[0].stat().st_size > 0

    # Every step comes back exactly: those on the damaged page from their newest event.
    assert table(journal_path, "steps", "run_id, step") == steps_before
    # Every event outside the damaged page comes back exactly; the page's events are gone.
    events_after = table(journal_path, "events", "seq")
    assert len(events_after) == len(events_before) - lost_events
    assert set(events_after) <= set(events_before)
    assert cli.ok("observe", "doctor").returncode == 0

    # The repaired journal is a working journal: the synced run keeps its server id.
    with Journal(journal_path) as j:
        assert j.require_run(runs[0])["server_id"] == SERVER_ID
        step_140 = next(s for s in j.steps(runs[1]) if s["step"] == 140)
        assert j.read_code(step_140["code"])["train.py"] == "lr = 140\n" * 50
    cli.ok("observe", "log", "--run-id", runs[1], "--step", "500", "--metrics", '{"loss": 0.01}')


def test_repair_rebuilds_a_lost_runs_page_from_events_and_indexes(cli, journal_path):
    runs = make_journal(journal_path, steps=40)
    runs_before = table(journal_path, "runs", "id")
    damage(journal_path, "runs", 0)
    assert cli("observe", "doctor").returncode == 7
    result = cli.ok("observe", "doctor", "--repair", "--json")
    assert json.loads(result.stdout)["repair"]["rebuilt"]["runs"] == 2
    with Journal(journal_path) as j:
        for before in runs_before:
            run = j.require_run(before[0])
            for key in ("id", "server_id", "remote_only", "name", "metric", "maximize", "metadata"):
                assert run[key] == before[list(_run_columns(journal_path)).index(key)], key
        assert {r["id"] for r in j.query("SELECT id FROM runs")} == set(runs)


def _run_columns(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [r[1] for r in conn.execute("PRAGMA table_info(runs)")]
    finally:
        conn.close()


def test_repair_of_a_healthy_journal_only_fixes_permissions(cli, journal_path):
    make_journal(journal_path, steps=10)
    os.chmod(journal_path, 0o644)
    os.chmod(journal_path.parent, 0o755)
    warned = cli.ok("observe", "doctor")
    assert "warn  permissions" in warned.stdout and "0644 (want 0600)" in warned.stdout
    fixed = cli.ok("observe", "doctor", "--repair")
    assert "fixed permissions" in fixed.stdout and "repaired:" not in fixed.stdout
    assert stat.S_IMODE(journal_path.stat().st_mode) == 0o600
    # WECO_OBSERVE_DIR names the folder: its mode is the user's to choose, and repair says how.
    assert stat.S_IMODE(journal_path.parent.stat().st_mode) == 0o755
    assert f"chmod 700 {journal_path.parent}" in fixed.stdout
    assert not [p for p in journal_path.parent.iterdir() if "damaged" in p.name]


def test_orphaned_blobs_and_schema_versions_are_reported(cli, journal_path):
    make_journal(journal_path, steps=10)
    conn = sqlite3.connect(journal_path)
    conn.execute("INSERT INTO blobs (hash, size, data) VALUES (?, 3, x'00')", ("ab" * 32,))
    conn.commit()
    conn.close()
    out = json.loads(cli.ok("observe", "doctor", "--json").stdout)
    assert out["orphaned_blobs"] == 1
    assert any(c["name"] == "code" and c["level"] == "warn" and "1 orphaned" in c["message"] for c in out["checks"])

    conn = sqlite3.connect(journal_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    newer = cli.ok("observe", "doctor")
    assert "error schema" in newer.stdout and "upgrade weco-observe" in newer.stdout


MOUNTS = """\
sysfs /sys sysfs rw,nosuid 0 0
/dev/nvme0n1p2 / ext4 rw,relatime 0 0
tmpfs /tmp tmpfs rw 0 0
fs01:/export/home /home nfs4 rw,vers=4.2 0 0
192.168.1.5@o2ib:/lustre /lustre lustre rw 0 0
//nas/share /mnt/my\\040share cifs rw 0 0
/dev/sdb1 /home/me/local ext4 rw 0 0
"""


def test_mount_lookup_picks_the_deepest_mount():
    assert doctor.mount_of("/home/me/.local/share/weco-observe/journal.db", MOUNTS) == ("/home", "nfs4")
    assert doctor.mount_of("/home/me/local/j.db", MOUNTS) == ("/home/me/local", "ext4")
    assert doctor.mount_of("/homework/j.db", MOUNTS) == ("/", "ext4")
    assert doctor.mount_of("/mnt/my share/j.db", MOUNTS) == ("/mnt/my share", "cifs")


def test_network_filesystems_get_a_warning_that_says_what_to_do(tmp_path):
    for point, fstype in (("/lustre", "lustre"), ("/home", "nfs4"), ("/mnt/my share", "cifs")):
        check = doctor.filesystem_check(Path(point) / "x" / "journal.db", MOUNTS)
        assert check["level"] == "warn" and fstype in check["message"]
        assert "WECO_OBSERVE_DIR" in check["message"] and "local disk" in check["message"]
    assert doctor.filesystem_check(Path("/tmp/x/journal.db"), MOUNTS)["level"] == "ok"
    # And the real /proc/mounts for this test's journal directory (a local disk here).
    real = doctor.filesystem_check(tmp_path / "journal.db")
    assert real["name"] == "filesystem" and real["message"]


def test_a_file_that_is_not_a_journal_is_reported_and_left_alone(cli, journal_path):
    journal_path.parent.mkdir(mode=0o700)
    journal_path.write_bytes(b"this is not SQLite at all\n" * 400)
    os.chmod(journal_path, 0o600)
    found = cli("observe", "doctor")
    assert found.returncode == 7 and "error integrity" in found.stdout
    refused = cli("observe", "doctor", "--repair")
    assert refused.returncode == 7
    assert refused.stderr.startswith("error: cannot repair") and "nothing was changed" in refused.stderr
    assert journal_path.read_bytes().startswith(b"this is not SQLite")
    assert not [p for p in journal_path.parent.iterdir() if "damaged" in p.name or "repair" in p.name]


def test_spill_files_waiting_for_this_journal_are_reported(cli, journal_path):
    from weco_observe import spill

    make_journal(journal_path, steps=4)
    call = {"run": ids.new_run_id(), "step": 1, "event_id": ids.ulid()}
    assert spill.write("log_step", call, journal_path) is not None
    out = json.loads(cli.ok("observe", "doctor", "--json").stdout)
    assert any(
        c["name"] == "spill" and c["level"] == "warn" and c["message"].startswith("1 spill") for c in out["checks"]
    )


def test_repair_waits_for_a_running_syncer_and_changes_nothing_if_it_stays(journal_path):
    from weco_observe.errors import SyncBusy
    from weco_observe.synclock import SyncLock

    make_journal(journal_path, steps=10)
    damage(journal_path, "steps", 0)
    before = journal_path.read_bytes()
    holder = SyncLock(journal_path)
    assert holder.try_acquire("sync")
    try:
        with pytest.raises(SyncBusy, match="still holds the journal"):
            doctor.repair(journal_path, lock_timeout=0.2)
    finally:
        holder.release()
    assert journal_path.read_bytes() == before
    assert sorted(p.name for p in journal_path.parent.iterdir() if "damaged" in p.name or "repair" in p.name) == []
    assert doctor.repair(journal_path)["tables"]["steps"] == 10


def test_a_big_write_ahead_log_and_missing_code_are_reported(journal_path, monkeypatch):
    make_journal(journal_path, steps=20)
    with Journal(journal_path) as j:  # held open: the WAL is not folded back while we look
        j.log_step(j.query("SELECT id FROM runs LIMIT 1")[0][0], 99, metrics={"loss": 0.1})
        monkeypatch.setattr(doctor, "WAL_WARN_BYTES", 1)
        report = doctor.check(journal_path)
        wal = next(c for c in report["checks"] if c["name"] == "wal")
        assert report["wal_bytes"] > 1 and wal["level"] == "warn" and "long-lived reader" in wal["message"]
        with j.write() as conn:
            conn.execute(
                "DELETE FROM blobs WHERE hash IN (SELECT value FROM steps, json_each(steps.code)"
                " WHERE step = 0 LIMIT 1)"
            )
    report = doctor.check(journal_path)
    # sync cannot send those steps' code: as much damage as a blob that no longer decodes
    assert report["missing_blobs"] == 1 and report["damaged"]
    code = next(c for c in report["checks"] if c["name"] == "code")
    assert code["level"] == "error" and "named but missing" in code["message"]
    assert doctor.repair(journal_path)["rebuilt"]["lost_files"] == 1
    assert not doctor.check(journal_path)["damaged"]
