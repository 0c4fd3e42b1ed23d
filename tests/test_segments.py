"""Cluster mode on one disk: segment records, the writers' tree rule, the owner's merge.

``WECO_OBSERVE_SHARED_FS=1`` puts a journal on a local disk in cluster mode, and
two ``SegmentWriter`` objects with their own caches play two hosts. What only a
real network filesystem can show (two page caches, two lock domains, kill -9
across mounts) is in test_cluster.py.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from helpers import dump

from weco_observe import outbox, segments, store
from weco_observe.errors import InvalidInput, JournalUnavailable, UnknownRun
from weco_observe.journal import Journal, SharedReader, read_seq, write_seq
from weco_observe.records import Event
from weco_observe.segments import SegmentWriter, decode, encode
from weco_observe.settings import Settings


@pytest.fixture(autouse=True)
def cluster_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WECO_OBSERVE_SHARED_FS", "1")


@pytest.fixture
def settings(journal_path: Path) -> Settings:
    return Settings.load()


def merged(settings: Settings) -> segments.MergeResult:
    with store.exclusive(settings, "merge") as held:
        return held.merged


def steps_of(settings: Settings, run_id: str) -> dict[int, dict]:
    with store.reader(settings) as journal:
        return {s["step"]: s for s in journal.steps(journal.require_run(run_id)["id"])}


CODE = {"train.py": "".join(f"line {i}\n" for i in range(300))}


# -- the record format -----------------------------------------------------------------------


def test_records_are_checksummed_lines_and_a_torn_tail_is_not_read():
    a, b = encode({"v": 1, "op": "step", "n": 1}), encode({"v": 1, "op": "run", "n": 2})
    parsed = decode(a + b + b[:10])
    assert [d["n"] for d in parsed.records] == [1, 2]
    assert parsed.end == len(a) + len(b) and parsed.tail == 10 and parsed.torn == []


def test_a_damaged_record_is_skipped_and_reported_and_the_rest_is_read():
    good, bad, last = (encode({"v": 1, "op": "step", "n": n}) for n in (1, 2, 3))
    flipped = bad[:20] + bytes([bad[20] ^ 0x01]) + bad[21:]
    parsed = decode(good + flipped + b"\x00" * 40 + b"\n" + last)
    assert [d["n"] for d in parsed.records] == [1, 3]
    assert len(parsed.torn) == 2 and "checksum" in parsed.torn[0]


# -- writers ------------------------------------------------------------------------------------


def test_each_cli_call_publishes_one_private_sealed_file(settings, journal_path):
    writer = SegmentWriter(settings=settings)
    run = writer.create_run(source_code=CODE, metric="loss")
    writer.log_step(run, 1, metrics={"loss": 0.5})
    folder = journal_path.parent / "segments" / run
    files = sorted(folder.iterdir())
    assert [p.suffix for p in files] == [".seg", ".seg"]
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in files)
    assert not journal_path.exists()  # writers never write the journal


def test_two_hosts_see_each_others_unmerged_steps_for_the_tree_rule(settings):
    a, b = SegmentWriter(settings=settings), SegmentWriter(settings=settings, append=True)
    run = a.create_run(source_code=CODE, metric="loss")
    assert b.log_step(run, 1, metrics={"loss": 0.9})["parent_step"] == 0
    assert a.log_step(run, 2, status="failed", metrics={"loss": 9.0})["parent_step"] == 1
    assert b.log_step(run, 3, metrics={"loss": 0.5})["parent_step"] == 1  # step 2 failed, on the other host
    # an explicit parent neither host can see yet is trusted: another host's listing may lag (test_cluster.py)
    assert a.log_step(run, 8, parent_step=7)["parent_step"] == 7
    with pytest.raises(InvalidInput, match="lower than --step"):  # what needs no listing is still checked
        a.log_step(run, 9, parent_step=9)
    b.close()
    result = merged(settings)
    assert result.applied == 5 and result.problems == []
    assert {n: s["parent_step"] for n, s in steps_of(settings, run).items()} == {0: None, 1: 0, 2: 1, 3: 1, 8: 7}
    # once merged, the writers find the steps in the journal instead
    assert a.log_step(run, 4)["parent_step"] == 3


def test_merging_is_idempotent_and_files_go_only_after_their_commit(settings, journal_path):
    w = SegmentWriter(settings=settings)
    run = w.create_run(source_code=CODE, metric="loss")
    for n in range(1, 6):
        w.log_step(run, n, metrics={"loss": 1 / n}, code={"train.py": CODE["train.py"] + f"x = {n}\n"})
    folder = journal_path.parent / "segments" / run
    kept = {p.name: p.read_bytes() for p in folder.iterdir()}
    first = merged(settings)
    assert first.applied == 6 and first.files_removed == 6 and not folder.exists()
    merged(settings)  # forgets how far it read the removed files
    for name, data in kept.items():  # as if the owner died after its commit, before removing them
        folder.mkdir(exist_ok=True)
        (folder / name).write_bytes(data)
        os.chmod(folder / name, 0o600)
    again = merged(settings)
    assert again.applied == 0 and again.known == 6 and again.files_removed == 6
    with store.reader(settings) as j:
        assert outbox.counts(j)["pending"] == 6
        assert j.read_code(j.steps(run)[5]["code"])["train.py"].endswith("x = 5\n")


def test_a_relog_from_two_hosts_keeps_the_latest_event(settings):
    a, b = SegmentWriter(settings=settings), SegmentWriter(settings=settings)
    run = a.create_run(source_code=CODE, metric="loss")
    a.log_step(run, 1, description="first, host a", metrics={"loss": 1.0})
    b.log_step(run, 1, description="then host b")
    a.log_step(run, 2)
    merged(settings)
    steps = steps_of(settings, run)
    assert steps[1]["description"] == "then host b" and steps[1]["metrics"] == {"loss": 1.0}  # a re-log keeps fields


def test_a_server_run_first_seen_on_two_hosts_is_one_remote_only_run(settings):
    server = "5b7e0c1a-2222-4333-8444-555566667777"
    a, b = SegmentWriter(settings=settings), SegmentWriter(settings=settings)
    a.log_step(server, 3)
    b.log_step(server, 4)
    merged(settings)
    with store.reader(settings) as j:
        runs = j.query("SELECT id, server_id, remote_only FROM runs")
        assert [(r["server_id"], r["remote_only"]) for r in runs] == [(server, 1)]
        assert [s["step"] for s in j.steps(runs[0]["id"])] == [3, 4]
    a.log_step(server, 5)  # now found in the journal by its server id
    merged(settings)
    assert sorted(steps_of(settings, server)) == [3, 4, 5]


def test_an_unknown_local_run_is_refused_and_nothing_is_written(settings, journal_path):
    with pytest.raises(UnknownRun):
        SegmentWriter(settings=settings).log_step("local-01m8aaaaaaaaaaaaaaaaaaaaaa", 1)
    assert not any((journal_path.parent / "segments").iterdir())


def test_a_live_open_segment_is_merged_as_it_grows_and_removed_once_sealed(settings, journal_path):
    sdk = SegmentWriter(settings=settings, append=True)
    run = sdk.create_run(source_code=CODE, metric="loss")
    sdk.log_step(run, 1)
    assert merged(settings).applied == 2
    (live,) = (journal_path.parent / "segments" / run).iterdir()
    assert live.suffix == ".open"  # its writer is alive: kept, read from where the merge stopped
    sdk.log_step(run, 2)
    second = merged(settings)
    assert (second.applied, second.known) == (1, 0)
    sdk.close()
    third = merged(settings)
    assert third.applied == 0 and third.files_removed == 1
    assert sorted(steps_of(settings, run)) == [0, 1, 2]


def test_an_abandoned_open_segment_with_a_torn_tail_loses_only_the_unacknowledged_record(settings, journal_path):
    sdk = SegmentWriter(settings=settings, append=True)
    run = sdk.create_run(source_code=CODE, metric="loss")
    sdk.log_step(run, 1)
    fd, path = sdk._open[run]
    os.write(fd, encode({"v": 1, "op": "step"})[:25])  # a write cut short by kill -9: never acknowledged
    os.close(fd)
    sdk._open.clear()
    dead = path.with_name(path.name.rsplit("-", 1)[0] + "-999999999.open")  # a pid that is not running
    path.rename(dead)
    result = merged(settings)
    assert result.applied == 2 and result.files_removed == 1
    assert any("torn last record" in p for p in result.problems)
    assert sorted(steps_of(settings, run)) == [0, 1]


def test_a_step_whose_run_is_not_merged_keeps_its_file(settings, journal_path):
    w = SegmentWriter(settings=settings)
    run = w.create_run(source_code=CODE, metric="loss")
    w.log_step(run, 1)
    folder = journal_path.parent / "segments" / run
    create = min(folder.iterdir())  # the create's ULID sorts first
    create.rename(journal_path.parent / "lost.seg")
    result = merged(settings)
    assert result.applied == 0 and len(result.kept) == 1 and len(list(folder.iterdir())) == 1
    (journal_path.parent / "lost.seg").rename(create)
    assert merged(settings).applied == 2 and not folder.exists()


def test_a_0_1_0_journal_on_a_shared_folder_becomes_a_cluster_journal(settings, journal_path):
    journal_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(__file__).parent / "fixtures" / "journal-v0.1.0.db", journal_path)
    conn = sqlite3.connect(journal_path)
    before = conn.execute("SELECT count(*) FROM steps").fetchone()[0]
    conn.close()
    merged(settings)
    conn = sqlite3.connect(journal_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert conn.execute("SELECT count(*) FROM steps").fetchone()[0] == before
    conn.close()
    assert not journal_path.with_name("journal.db-wal").exists()


def test_a_reader_waits_while_the_owner_writes(settings, journal_path):
    w = SegmentWriter(settings=settings)
    run = w.create_run(source_code=CODE, metric="loss")
    merged(settings)
    seq = journal_path.with_name("journal.db.seq")
    value = read_seq(seq)
    assert value > 0 and value % 2 == 0
    write_seq(seq, value + 1)  # an owner mid-commit on another host
    reader = SharedReader(journal_path, settings=settings)
    found: list[object] = []
    worker = threading.Thread(target=lambda: found.append(reader.find_run(run)))
    worker.start()
    time.sleep(0.3)
    assert found == []  # still waiting: the counter is odd
    write_seq(seq, value + 2)
    worker.join(10)
    assert found and found[0]["id"] == run  # type: ignore[index]


def test_a_cluster_journal_is_never_opened_for_writing_without_the_owner_lock(settings):
    w = SegmentWriter(settings=settings)
    w.create_run(source_code=CODE, metric="loss")
    merged(settings)
    reader = SharedReader(settings.journal_path, settings=settings)
    with pytest.raises(JournalUnavailable, match="owner lock"), reader.write():
        pass
    with pytest.raises(JournalUnavailable, match="cluster mode"):  # opened as a local journal, it would turn WAL
        Journal(settings.journal_path)
    conn = sqlite3.connect(settings.journal_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.close()


def _failing_fstat(monkeypatch: pytest.MonkeyPatch, paths: set[str], error: int) -> None:
    """Make ``fstat`` of a descriptor opened on one of ``paths`` fail with ``error`` (``os`` is patched
    for the whole process: segments.os is the module)."""
    opened: dict[int, str] = {}
    real_open, real_fstat = os.open, os.fstat

    def open_(path, flags, *args):
        fd = real_open(path, flags, *args)
        opened[fd] = os.fspath(path)
        return fd

    def fstat(fd):
        if opened.get(fd) in paths:
            raise OSError(error, os.strerror(error))
        return real_fstat(fd)

    monkeypatch.setattr(segments.os, "open", open_)
    monkeypatch.setattr(segments.os, "fstat", fstat)


def test_a_segment_removed_by_another_hosts_merge_while_a_writer_reads_it_is_found_in_the_journal(
    settings, journal_path, monkeypatch
):
    import errno

    a, b = SegmentWriter(settings=settings), SegmentWriter(settings=settings)
    run = a.create_run(source_code=CODE, metric="loss")
    a.log_step(run, 1)
    a.log_step(run, 2)
    folder = journal_path.parent / "segments" / run
    listed = {p.name: p.read_bytes() for p in folder.iterdir()}
    merged(settings)  # committed and removed ...
    folder.mkdir()
    for name, data in listed.items():  # ... while B's listing still shows them (NFS and sshfs cache listings)
        (folder / name).write_bytes(data)
        os.chmod(folder / name, 0o600)
    # B opened each file just before the owner removed it: sshfs then fails fstat with ENOENT
    _failing_fstat(monkeypatch, {str(folder / name) for name in listed}, errno.ENOENT)
    assert b.log_step(run, 3)["parent_step"] == 2  # steps 1 and 2 are found in the journal instead
    monkeypatch.undo()
    assert sorted(steps_of(settings, run)) == [0, 1, 2, 3]


def test_a_segment_the_owner_cannot_read_now_is_kept_for_the_next_merge(settings, journal_path, monkeypatch):
    import errno

    w = SegmentWriter(settings=settings)
    run = w.create_run(source_code=CODE, metric="loss")
    w.log_step(run, 1)
    folder = journal_path.parent / "segments" / run
    _failing_fstat(monkeypatch, {str(p) for p in folder.iterdir()}, errno.ESTALE)  # NFS: the handle went stale
    first = merged(settings)
    assert first.applied == 0 and first.files_removed == 0 and len(list(folder.iterdir())) == 2
    monkeypatch.undo()
    second = merged(settings)
    assert second.applied == 2 and second.files_removed == 2


MID_COMMIT = r"""
import sys, time
from weco_observe import store
from weco_observe.settings import Settings
with store.exclusive(Settings.load(), "merge") as held:
    with held.journal.write() as conn:
        conn.execute("UPDATE runs SET name = 'torn' WHERE 1")
        conn.execute("INSERT INTO segment_progress (name, offset, updated_at) VALUES ('x', 1, 0)")
        print("mid-commit", flush=True)
        time.sleep(120)
"""


def owner_killed_mid_commit(settings) -> str:
    """A journal with one run, whose owner was then `kill -9`ed inside a write (MID_COMMIT); the run's id."""
    import signal
    import subprocess
    import sys

    run = SegmentWriter(settings=settings).create_run(source_code=CODE, metric="loss", name="kept")
    merged(settings)
    owner = subprocess.Popen([sys.executable, "-c", MID_COMMIT], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None and owner.stdout.readline() == "mid-commit\n"
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(30)
        owner.stdout.close()
    return run


def test_an_owner_killed_mid_commit_is_repaired_by_the_next_owner_even_with_nothing_to_merge(
    settings, journal_path, monkeypatch
):
    run = owner_killed_mid_commit(settings)
    assert read_seq(journal_path.with_name("journal.db.seq")) % 2 == 1  # it died with the counter odd
    assert merged(settings).applied == 0  # nothing to merge, but the journal is the owner's now
    assert read_seq(journal_path.with_name("journal.db.seq")) % 2 == 0
    monkeypatch.setenv("WECO_OBSERVE_BUSY_TIMEOUT", "2")
    reader = SharedReader(journal_path, settings=Settings.load())
    assert reader.find_run(run)["name"] == "kept"  # the half-written transaction was rolled back
    assert SegmentWriter(settings=Settings.load()).log_step(run, 1)["parent_step"] == 0


def test_a_merge_commits_once_and_an_idle_merge_commits_nothing(settings, journal_path):
    # every commit moves the counter that readers on all hosts retry on (two per commit)
    seq = journal_path.with_name("journal.db.seq")
    cli, sdk = SegmentWriter(settings=settings), SegmentWriter(settings=settings, append=True)
    run = cli.create_run(source_code=CODE, metric="loss")
    sdk.log_step(run, 100)  # a live .open file, read again by every merge
    merged(settings)
    for n in range(1, 7):
        cli.log_step(run, n)
    sdk.log_step(run, 101)
    before = read_seq(seq)
    result = merged(settings)
    assert (result.applied, result.files_removed) == (7, 6)
    assert read_seq(seq) == before + 2
    merged(settings)  # forgets how far it had read the six files it removed: one commit
    settled = read_seq(seq)
    for _ in range(3):
        assert merged(settings).applied == 0
    assert read_seq(seq) == settled
    sdk.close()
    assert merged(settings).files_removed == 1
    with store.reader(settings) as j:  # a view merges first: the sealed file's progress goes too
        assert j.query("SELECT count(*) FROM segment_progress")[0][0] == 0
    assert sorted(steps_of(settings, run)) == [0, 1, 2, 3, 4, 5, 6, 100, 101]


def test_writers_do_not_wait_for_an_owner_that_died_mid_commit_when_no_new_owner_comes(
    settings, journal_path, monkeypatch
):
    run = owner_killed_mid_commit(settings)
    monkeypatch.setenv("WECO_OBSERVE_BUSY_TIMEOUT", "10")
    started = time.monotonic()
    # no sync, view or merge runs: the writers themselves see that the owner is dead (same host: its pid)
    assert SegmentWriter(settings=Settings.load()).log_step(run, 1)["parent_step"] == 0
    assert time.monotonic() - started < 5
    assert read_seq(journal_path.with_name("journal.db.seq")) % 2 == 0
    assert not journal_path.with_name("journal.db.owner").exists()
    assert SharedReader(journal_path, settings=Settings.load()).find_run(run)["name"] == "kept"


@pytest.mark.parametrize("append", [False, True], ids=["cli", "sdk"])
def test_a_writer_whose_run_folder_the_owner_just_removed_makes_it_again(settings, journal_path, monkeypatch, append):
    w = SegmentWriter(settings=settings, append=append)
    run = SegmentWriter(settings=settings).create_run(source_code=CODE, metric="loss")
    merged(settings)
    folder = journal_path.parent / "segments" / run
    assert not folder.exists()  # merged: the owner removed the empty folder
    real = segments.private_dir
    removed: list[Path] = []

    def made_then_removed(path: Path) -> Path:  # the owner's tidy-up runs between our mkdir and our create
        real(path)
        if path == folder and not removed:
            path.rmdir()
            removed.append(path)
        return path

    monkeypatch.setattr(segments, "private_dir", made_then_removed)
    assert w.log_step(run, 1)["parent_step"] == 0
    assert removed and folder.is_dir()
    w.close()
    assert merged(settings).applied == 1


def test_an_sdk_append_that_fails_halfway_never_costs_a_later_record(settings, journal_path, monkeypatch):
    import errno

    sdk = SegmentWriter(settings=settings, append=True)
    run = sdk.create_run(source_code=CODE, metric="loss")
    sdk.log_step(run, 1)
    real_write = os.write

    def half_then_full_disk(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(segments.os, "write", half_then_full_disk)
    with pytest.raises(JournalUnavailable, match="No space"):
        sdk.log_step(run, 2)  # not acknowledged (the SDK spills it)
    monkeypatch.setattr(segments.os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))  # short writes
    sdk.log_step(run, 3)  # acknowledged: it must survive the torn record before it
    monkeypatch.undo()
    sdk.log_step(run, 4)
    sdk.close()
    result = merged(settings)
    assert sorted(steps_of(settings, run)) == [0, 1, 3, 4]
    assert [p for p in result.problems if "torn" in p]  # the half record, reported and skipped


def test_a_merge_pauses_the_cycle_collector_and_leaves_it_as_it_found_it(settings, monkeypatch):
    import gc

    writer = SegmentWriter(settings=settings)
    run = writer.create_run(source_code=CODE, metric="loss")
    seen = []
    real = segments._Applying.apply

    def apply(self, docs):
        seen.append(gc.isenabled())
        return real(self, docs)

    monkeypatch.setattr(segments._Applying, "apply", apply)
    writer.log_step(run, 1)
    assert gc.isenabled() and merged(settings).applied == 2
    gc.disable()
    try:
        writer.log_step(run, 2)
        assert merged(settings).applied == 1
        assert not gc.isenabled()  # an embedding program's choice is kept
    finally:
        gc.enable()
    writer.log_step(run, 3)
    monkeypatch.setattr(segments, "_merge", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        segments.merge(None)
    assert gc.isenabled()
    assert seen == [False, False]


def test_a_long_lived_writer_sees_what_other_hosts_merged_since_its_last_step(settings):
    sdk, other = SegmentWriter(settings=settings, append=True), SegmentWriter(settings=settings)
    run = other.create_run(source_code=CODE, metric="loss")
    for n in range(1, 4):
        sdk.log_step(run, n, metrics={"loss": 1 / n})
    merged(settings)
    assert sdk.log_step(run, 4)["parent_step"] == 3  # the journal read once ...
    other.log_step(run, 4, status="failed")  # ... then another host re-logs step 4 as failed and logs 5
    other.log_step(run, 5, status="failed")
    merged(settings)
    assert sdk.log_step(run, 6)["parent_step"] == 3  # what changed is read again: 4 and 5 failed
    other.log_step(run, 3, description="from the other host")
    merged(settings)
    relog = sdk.log_step(run, 3, status="completed", metadata={"k": 1})  # its previous state is in the journal
    assert relog["updated"] and relog["parent_step"] == 2
    assert sdk._unmerged[run].steps.keys() <= {3, 6}  # merged steps are not kept twice
    sdk.close()
    merged(settings)
    steps = steps_of(settings, run)
    assert (steps[3]["description"], steps[3]["metrics"], steps[3]["metadata"]) == (
        "from the other host",
        {"loss": 1 / 3},
        {"k": 1},
    )
    assert {n: s["status"] for n, s in steps.items()} == {
        0: "completed",
        1: "completed",
        2: "completed",
        3: "completed",
        4: "failed",
        5: "failed",
        6: "completed",
    }


# -- record formats, and records the merge refuses -------------------------------------------


def rewrite(folder: Path, change) -> None:
    """Re-encode every record of every segment file under ``folder`` through ``change(doc) -> doc``."""
    for path in sorted(folder.rglob("*.seg")):
        path.write_bytes(b"".join(encode(change(doc)) for doc in decode(path.read_bytes()).records))


def as_version_2(doc: dict) -> dict:
    """A record as format 2 carries it: format 1 without the outbox event."""
    return {k: v for k, v in doc.items() if k != "event"} | {"v": 2}


def test_the_written_format_is_1_which_every_earlier_owner_merges(settings, journal_path):
    writer = SegmentWriter(settings=settings)
    run = writer.create_run(source_code=CODE, metric="loss")
    writer.log_step(run, 1, metrics={"loss": 0.5})
    docs = [
        d for p in sorted((journal_path.parent / "segments").rglob("*.seg")) for d in decode(p.read_bytes()).records
    ]
    assert [(d["v"], d["op"], d["event"]["kind"]) for d in docs] == [(1, "run", "create_run"), (1, "step", "log_step")]
    assert docs[1]["event"]["id"] == docs[1]["step"]["event_id"]


def test_records_of_format_2_merge_as_format_1_does(settings, journal_path, tmp_path):
    writer = SegmentWriter(settings=settings)
    run = writer.create_run(source_code=CODE, metric="loss")
    writer.log_step(run, 1, metrics={"loss": 0.5}, code={"train.py": CODE["train.py"] + "x = 1\n"})
    writer.log_step(run, 2, status="failed", description="nan", metadata={"gpu": "a100"})
    newer = tmp_path / "newer" / "journal.db"
    shutil.copytree(journal_path.parent / "segments", newer.parent / "segments")
    rewrite(newer.parent / "segments", as_version_2)
    assert all(
        d["v"] == 2 and "event" not in d for p in newer.parent.rglob("*.seg") for d in decode(p.read_bytes()).records
    )
    results = []
    for path in (journal_path, newer):
        with store.exclusive(settings, "merge", journal_path=path) as held:
            results.append(held.merged)
    assert [(r.applied, r.problems) for r in results] == [(3, []), (3, [])]
    now, then = dump(journal_path), dump(newer)
    assert [now[t] for t in ("runs", "steps", "events", "blobs")] == [
        then[t] for t in ("runs", "steps", "events", "blobs")
    ]


def test_the_owner_tries_again_when_the_journal_name_looks_stale_for_a_moment(settings, journal_path, monkeypatch):
    from weco_observe import journal as journal_module

    merged(settings)  # the journal exists
    real = Journal._open_shared_once
    tries = []

    def flaky(self, s):
        tries.append(1)
        if len(tries) <= 2:  # as sshfs answers for a name another host just replaced
            raise sqlite3.OperationalError("unable to open database file")
        return real(self, s)

    monkeypatch.setattr(Journal, "_open_shared_once", flaky)
    assert merged(settings).applied == 0 and len(tries) == 3
    tries.clear()
    monkeypatch.setattr(journal_module, "_OPEN_TRIES", 3)
    for error, expected_tries in (("unable to open database file", 3), ("disk I/O error", 1)):
        tries.clear()

        def failing(self, s, error=error):
            tries.append(1)
            raise sqlite3.OperationalError(error)

        monkeypatch.setattr(Journal, "_open_shared_once", failing)
        with pytest.raises(JournalUnavailable, match=f"cannot open journal .*{error}"):
            merged(settings)
        assert len(tries) == expected_tries  # a stale name: bounded tries; another error: none again


#: the first release that shipped cluster mode: an owner on a login node may still run it
FIRST_CLUSTER_RELEASE = "035fd01d900a3e5eb38f917fe4b95ea6a7a6807e"


def test_what_writers_write_now_is_merged_whole_by_the_first_release_with_cluster_mode(
    settings, journal_path, tmp_path
):
    # On a cluster every host runs the release its own venv has: the nodes may be newer than the
    # login node's owner. That owner's own code, from git, merges what this release's SDK and CLI
    # writers wrote (a format it did not read would be dropped as torn, file and all).
    repo = Path(__file__).resolve().parent.parent
    old = tmp_path / "first-cluster-release"
    old.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", FIRST_CLUSTER_RELEASE, "weco_observe"], capture_output=True
    )
    if archive.returncode != 0:
        pytest.skip(f"no git history here to take that release from: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    sdk, cli = SegmentWriter(settings=settings, append=True), SegmentWriter(settings=settings)
    run = cli.create_run(source_code=CODE, metric="loss")
    for n in range(1, 6):
        code = {"train.py": CODE["train.py"] + f"lr = {n}\n"}
        (sdk if n % 2 else cli).log_step(run, n, metrics={"loss": 1 / n}, code=code, description=f"try {n}")
    sdk.close()
    merge = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, weco_observe; print(weco_observe.__file__); sys.argv[1:] = ['merge'];"
            " from weco_observe.cli import main_observe; main_observe()",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not this checkout, which python -c would put first on the path
        env={**os.environ, "PYTHONPATH": str(old), "WECO_OBSERVE_SHARED_FS": "1"},
        timeout=120,
    )
    assert merge.returncode == 0, merge.stderr
    assert merge.stdout.startswith(str(old)), merge.stdout  # that release's code, not this one's
    assert "torn" not in merge.stdout + merge.stderr and "not a record" not in merge.stdout + merge.stderr
    conn = sqlite3.connect(journal_path)
    steps = dict(conn.execute("SELECT step, description FROM steps WHERE run_id = ?", (run,)).fetchall())
    conn.close()
    assert steps == {0: None, **{n: f"try {n}" for n in range(1, 6)}}
    assert not list((journal_path.parent / "segments").rglob("*.seg"))  # all merged, then removed


def test_a_record_of_a_newer_format_keeps_its_file_for_a_newer_owner(settings, journal_path):
    writer = SegmentWriter(settings=settings)
    run = writer.create_run(source_code=CODE, metric="loss")
    writer.log_step(run, 1, metrics={"loss": 0.5})
    folder = journal_path.parent / "segments" / run
    newest = sorted(folder.iterdir())[-1]
    newest.write_bytes(newest.read_bytes() + encode({"v": max(segments._READ) + 1, "op": "step", "what": "?"}))
    result = merged(settings)
    assert result.applied == 2 and result.kept == [f"{run}/{newest.name}"]
    assert any("newer format" in p for p in result.problems)
    assert newest.exists() and sorted(steps_of(settings, run)) == [0, 1]
    assert merged(settings).known == 1  # read again, and again kept: nothing lost, nothing doubled
    assert newest.exists()


HOSTILE = {
    "a metric that is not finite": lambda d: d["step"]["metrics"].update(loss=float("nan")),
    "a metric that is not a number": lambda d: d["step"]["metrics"].update(loss="low"),
    "metrics that are not an object": lambda d: d["step"].update(metrics=[]),
    "an unknown status": lambda d: d["step"].update(status="bogus"),
    "a step that is text": lambda d: d["step"].update(step="1"),
    "a step past SQLite's integers": lambda d: d["step"].update(step=2**64),
    "a parent after its child": lambda d: d["step"].update(parent_step=5),
    "a lone surrogate": lambda d: d["step"].update(description="\ud800"),
    "metadata nested too deeply": lambda d: d["step"].update(metadata=deep(150)),
    "a time that is text": lambda d: d["step"].update(updated_at="soon"),
    "a time that is infinite": lambda d: d["step"].update(created_at=float("inf")),
    "a malformed event id": lambda d: d["step"].update(event_id="../x"),
    "a code hash that is not a sha256": lambda d: d["step"].update(code={"train.py": "abc"}),
    "code whose text is not its hash": lambda d: d["blobs"].update(
        {d["step"]["code"]["train.py"]: segments._blob_doc("print('forged')\n")}
    ),
    "a run folder that is not an id": lambda d: d.update(ref="../../etc"),
    "a step that is not an object": lambda d: d.update(step=["not", "a", "step"]),
}


def test_a_carried_blob_that_inflates_past_its_bound_is_refused_before_it_is_inflated(monkeypatch):
    monkeypatch.setattr(segments, "_INFLATE_FLOOR", 1 << 20)
    real = "".join(f"x_{i} = {i * 7919 % 1000}\n" for i in range(120_000))  # 1.6 MiB that compresses ~5x
    assert segments._blob_text(segments._blob_doc(real)) == real
    bomb = base64.b64encode(zlib.compress(b"a" * (8 << 20), 9)).decode()  # 8 KiB -> 8 MiB
    with pytest.raises(ValueError, match="inflates past 1 MiB"):
        segments._blob_text(bomb)
    cut = base64.b64encode(zlib.compress(real.encode())[:-10]).decode()
    with pytest.raises(ValueError, match="cut short"):
        segments._blob_text(cut)


def deep(levels: int) -> dict:
    value: dict = {}
    for _ in range(levels):
        value = {"a": value}
    return value


def forge(doc: dict, how) -> dict:
    how(doc)
    return doc


def forged(doc: dict) -> bytes:
    """A record line with a valid CRC around any JSON (NaN, escaped lone surrogates: what ``encode`` refuses)."""
    body = json.dumps(doc).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


@pytest.mark.parametrize("how", sorted(HOSTILE))
def test_a_record_log_would_refuse_is_skipped_and_reported_and_never_stored(settings, journal_path, how):
    writer = SegmentWriter(settings=settings)
    run = writer.create_run(source_code=CODE, metric="loss")
    merged(settings)
    before = dump(journal_path)
    writer.log_step(run, 1, metrics={"loss": 0.5}, code={"train.py": CODE["train.py"] + "y = 2\n"})
    writer.log_step(run, 2, metrics={"loss": 0.4})
    first = sorted((journal_path.parent / "segments" / run).iterdir())[0]
    doc = decode(first.read_bytes()).records[0]
    first.write_bytes(forged(forge(doc, HOSTILE[how])))
    result = merged(settings)
    assert result.applied == 1 and len(result.problems) == 1 and "skipped" in result.problems[0], result.problems
    after = dump(journal_path)
    assert [r for r in after["steps"] if r not in before["steps"]] == [
        r for r in after["steps"] if r[1] == 2
    ]  # step 2 only
    assert len(after["events"]) == len(before["events"]) + 1
    with store.reader(settings) as journal:
        for row in journal.query("SELECT * FROM events"):
            Event.from_row(row).checked()  # every body the journal holds passes the CLI's rules
