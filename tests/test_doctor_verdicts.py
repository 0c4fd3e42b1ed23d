"""``doctor`` tells a locked or read-only journal from a damaged one, and ``--repair`` never moves
a journal that is not damaged (issue 10, item 9).

Every case is real: another process holds SQLite's lock on the journal file; a second Unix
user (``second_user``, made with ``useradd`` for the test) owns a journal whose folder or file
they cannot write or read (root could: permissions do not stop it); in cluster mode a writer
is killed with SIGKILL in the middle of a commit, leaving a hot rollback journal.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_fixtures import OtherUser, second_user  # noqa: F401
from test_doctor import damage
from test_folder import victim, world  # noqa: F401

#: the README's exit codes (public: scripts test them), written out so this file runs against any release
EXIT_DAMAGED, EXIT_LOCKED, EXIT_READ_ONLY = 7, 9, 10


def snapshot(folder: Path) -> tuple[bytes, list[str]]:
    """The journal's bytes, and any damaged copy or repair scratch beside it: the journal must not
    move or change. (Lock files and SQLite's -wal/-shm come and go with every open.)"""
    moved = sorted(p.name for p in folder.iterdir() if "damaged" in p.name or "repair" in p.name)
    return (folder / "journal.db").read_bytes(), moved


HOLD = r"""
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
for statement in sys.argv[2:]:
    conn.execute(statement).fetchall()
print("held", flush=True)
sys.stdin.read()  # until the test closes stdin
"""


class Holder:
    """Another process with the journal open, having run ``statements``; it holds on until stopped."""

    def __init__(self, path: Path, *statements: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(path), *statements],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline().strip() == "held"

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


@pytest.fixture
def journal(cli, tmp_path: Path, journal_path: Path) -> Path:
    """A journal made by the real CLI: a run whose steps fill several pages each (3 KB descriptions)."""
    (tmp_path / "train.py").write_text("lr = 0.1\n")
    run = cli.ok("observe", "init", "--metric", "loss", "--source", "train.py").stdout.strip()
    for step in range(1, STEPS):
        cli.ok("observe", "log", "--run-id", run, "--step", str(step), "--description", f"{step} " + "d" * 3000)
    return journal_path


STEPS = 8


def test_a_journal_another_process_holds_locked_is_locked_not_damaged(cli, journal):
    before = snapshot(journal.parent)
    holder = Holder(journal, "PRAGMA locking_mode=EXCLUSIVE", "SELECT count(*) FROM steps")
    try:
        checked = cli("observe", "doctor")
        assert checked.returncode == EXIT_LOCKED, checked.stdout + checked.stderr
        assert "locked by another process" in checked.stdout and "damaged" not in checked.stdout
        report = json.loads(cli("observe", "doctor", "--json").stdout)
        assert report["verdict"] == "locked" and report["damaged"] is False

        repaired = cli("observe", "doctor", "--repair")
        assert repaired.returncode == EXIT_LOCKED, repaired.stdout + repaired.stderr
        assert "repaired:" not in repaired.stdout
    finally:
        holder.stop()
    assert snapshot(journal.parent) == before, "a locked journal was moved or changed"
    assert cli("observe", "doctor").returncode == 0


@pytest.mark.parametrize(
    "statements",
    [("BEGIN EXCLUSIVE",), ("BEGIN IMMEDIATE", "UPDATE runs SET name = 'x'")],
    ids=["BEGIN EXCLUSIVE", "an uncommitted write (the WAL write lock)"],
)
def test_a_journal_with_a_writer_at_work_is_healthy_and_repair_moves_nothing(cli, journal, statements):
    holder = Holder(journal, *statements)
    try:
        checked = cli("observe", "doctor")
        assert checked.returncode == 0, checked.stdout + checked.stderr
        repaired = cli("observe", "doctor", "--repair")
        assert repaired.returncode == 0 and "repaired:" not in repaired.stdout, repaired.stdout + repaired.stderr
    finally:
        holder.stop()
    assert not [p for p in journal.parent.iterdir() if "damaged" in p.name or "repair" in p.name]


def test_repair_checks_again_under_the_lock_and_stops_when_the_journal_is_locked(journal):
    """The check said damaged, then another process locks the file: repair stops, changing nothing."""
    from weco_observe import doctor, errors

    assert (errors.EXIT_DAMAGED, errors.EXIT_LOCKED, errors.EXIT_READ_ONLY) == (7, 9, 10)
    damage(journal, "events", 1)
    assert doctor.check(journal)["verdict"] == "damaged"
    before = snapshot(journal.parent)
    holder = Holder(journal, "PRAGMA locking_mode=EXCLUSIVE", "SELECT count(*) FROM runs")
    try:
        with pytest.raises(errors.JournalLocked):
            doctor.repair(journal)
    finally:
        holder.stop()
    assert snapshot(journal.parent) == before
    assert doctor.repair(journal)["tables"]["steps"] == STEPS


# -- read-only and unreadable, as a user root is not ------------------------------------------


@pytest.fixture
def theirs(victim: OtherUser, world: Path) -> tuple[OtherUser, Path]:  # noqa: F811
    """The second user's own journal, with a few runs, in a folder of theirs."""
    folder = world / "journal-dir"
    folder.mkdir(mode=0o700)
    os.chown(folder, victim.uid, victim.gid)
    env = {"WECO_OBSERVE_DIR": str(folder)}
    made = victim.cli("observe", "init", "--metric", "loss", "--source", "train.py", env=env)
    assert made.returncode == 0, made.stderr
    for step in range(1, 6):
        args = ("--run-id", made.stdout.strip(), "--step", str(step), "--metrics", json.dumps({"loss": 1 / step}))
        assert victim.cli("observe", "log", *args, env=env).returncode == 0
    return victim, folder


def doctor_as(user: OtherUser, folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return user.cli("observe", "doctor", *args, env={"WECO_OBSERVE_DIR": str(folder)})


def test_a_read_only_folder_is_read_only_not_damaged(theirs):
    user, folder = theirs
    before = snapshot(folder)
    folder.chmod(0o500)
    try:
        checked = doctor_as(user, folder)
        assert checked.returncode == EXIT_READ_ONLY, checked.stdout + checked.stderr
        assert "ok    integrity" in checked.stdout, "a read-only folder should still be checked"
        assert "read-only for you" in checked.stdout and "damaged" not in checked.stdout
        repaired = doctor_as(user, folder, "--repair")
        assert repaired.returncode == EXIT_READ_ONLY, repaired.stdout + repaired.stderr
        assert "repaired:" not in repaired.stdout
    finally:
        folder.chmod(0o700)
    assert snapshot(folder) == before


def test_an_unreadable_journal_file_is_read_only_not_damaged(theirs):
    user, folder = theirs
    journal = folder / "journal.db"
    before = snapshot(folder)
    journal.chmod(0o000)
    try:
        checked = doctor_as(user, folder)
        assert checked.returncode == EXIT_READ_ONLY, checked.stdout + checked.stderr
        assert "cannot read" in checked.stdout and "mode 0000" in checked.stdout
        repaired = doctor_as(user, folder, "--repair")
        assert repaired.returncode == EXIT_READ_ONLY, repaired.stdout + repaired.stderr
    finally:
        journal.chmod(0o600)
    assert snapshot(folder) == before


def test_a_read_only_folder_whose_write_ahead_log_cannot_be_read_is_read_only(theirs):
    user, folder = theirs
    env = {"WECO_OBSERVE_DIR": str(folder)}
    # A writer killed before it folds its log back into the file: the commits live in journal.db-wal.
    kill = (
        "import os, signal, sqlite3, sys; c = sqlite3.connect(sys.argv[1]);"
        " c.execute('PRAGMA wal_autocheckpoint=0');"
        " c.execute('UPDATE runs SET updated_at = updated_at + 1'); c.commit();"
        " os.kill(os.getpid(), signal.SIGKILL)"
    )
    user.run([user.python, "-c", kill, str(folder / "journal.db")], env=env)
    assert (folder / "journal.db-wal").stat().st_size > 0
    (folder / "journal.db-shm").unlink()  # a cache SQLite rebuilds, gone after a reboot
    folder.chmod(0o500)
    try:
        checked = doctor_as(user, folder)
        assert checked.returncode == EXIT_READ_ONLY, checked.stdout + checked.stderr
        assert "cannot check" in checked.stdout and "write-ahead log" in checked.stdout
    finally:
        folder.chmod(0o700)
    assert doctor_as(user, folder).returncode == 0


def test_damage_in_a_read_only_folder_is_damage_but_repair_says_it_cannot_write(theirs):
    user, folder = theirs
    journal = folder / "journal.db"
    conn = sqlite3.connect(journal)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    damage(journal, "events", 0)
    before = snapshot(folder)
    folder.chmod(0o500)
    try:
        checked = doctor_as(user, folder)
        assert checked.returncode == EXIT_DAMAGED, checked.stdout + checked.stderr
        repaired = doctor_as(user, folder, "--repair")
        assert repaired.returncode == EXIT_READ_ONLY, repaired.stdout + repaired.stderr
        assert "cannot repair" in repaired.stderr and "nothing was changed" in repaired.stderr
    finally:
        folder.chmod(0o700)
    assert snapshot(folder) == before
    assert doctor_as(user, folder, "--repair").returncode == 0


# -- cluster mode ----------------------------------------------------------------------------


@pytest.fixture
def cluster(cli, tmp_path, monkeypatch) -> Iterator[Path]:
    """A cluster-mode journal (forced on this local disk) with one merged run."""
    monkeypatch.setenv("WECO_OBSERVE_SHARED_FS", "1")
    (tmp_path / "train.py").write_text("x = 1\n")
    run = cli.ok("observe", "init", "--metric", "loss", "--source", "train.py").stdout.strip()
    for step in range(1, 9):  # enough pages that an update spills some into the file before its commit
        cli.ok("observe", "log", "--run-id", run, "--step", str(step), "--description", "d" * 3000)
    cli.ok("observe", "merge")
    yield Path(os.environ["WECO_OBSERVE_DIR"]) / "journal.db"


DIE_MID_COMMIT = r"""
import os, signal, sqlite3, sys
from weco_observe.journal import read_seq, write_seq
path, seq = sys.argv[1], sys.argv[1] + ".seq"
write_seq(seq, read_seq(seq) | 1)  # the owner's counter is odd while it writes
conn = sqlite3.connect(f"file:{path}?vfs=unix-none", uri=True, isolation_level=None)
conn.execute("PRAGMA journal_mode=DELETE")
conn.execute("PRAGMA cache_size=1")  # pages spill into the file before the commit
conn.execute("BEGIN")
conn.execute("UPDATE steps SET description = 'half-written ' || description")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_cluster_mode_a_dead_owners_hot_journal_needs_an_owner_not_a_repair(cli, cluster):
    doctor = cli("observe", "doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "cluster mode" in doctor.stdout

    died = subprocess.run([sys.executable, "-c", DIE_MID_COMMIT, str(cluster)], capture_output=True, text=True)
    assert died.returncode == -signal.SIGKILL, died.stderr
    hot = cluster.with_name("journal.db-journal")
    assert hot.exists() and hot.stat().st_size > 0
    before = snapshot(cluster.parent)

    checked = cli("observe", "doctor")
    assert checked.returncode == EXIT_LOCKED, checked.stdout + checked.stderr
    assert "needs an owner" in checked.stdout and "weco observe merge" in checked.stdout
    assert "damaged" not in checked.stdout
    repaired = cli("observe", "doctor", "--repair")
    assert repaired.returncode == EXIT_LOCKED, repaired.stdout + repaired.stderr
    assert snapshot(cluster.parent) == before

    cli.ok("observe", "merge")  # an owner: rolls the half-written commit back
    assert not hot.exists() or hot.stat().st_size == 0
    after = cli("observe", "doctor")
    assert after.returncode == 0, after.stdout + after.stderr
    conn = sqlite3.connect(cluster)
    try:
        assert conn.execute("SELECT count(*) FROM steps WHERE description LIKE 'half-written%'").fetchone()[0] == 0
    finally:
        conn.close()
