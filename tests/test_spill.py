"""A journal that cannot be written must not end the user's experiment (issue item 5).

Each case makes the journal really unwritable — a lock held past the busy
timeout, a read-only mount, a full tmpfs, a path that cannot be a directory —
and checks that `log`/`init` say so loudly on stderr and exit 0 (3 with
`--strict`), that the call is spilled to a file, and that the next successful
open imports it exactly once. The mount cases need root and skip cleanly
without it.
"""

from __future__ import annotations

import os
import random
import sqlite3
import string
import subprocess
import sys
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path

from helpers import totals
import pytest

from weco_observe import WecoObserver, WecoObserveWarning, ids, spill
from weco_observe.errors import EXIT_JOURNAL, InvalidInput, JournalUnavailable
from weco_observe.journal import Journal


@pytest.fixture(autouse=True)
def private_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fallback spill dir lives under $TMPDIR: keep it inside the test."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    return tmp


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "train.py"
    path.write_text("x = 1\n")
    return path


def spill_files(tmp_path: Path) -> list[Path]:
    return sorted(p for p in tmp_path.rglob("*.json") if "spill" in p.parent.name)


@contextmanager
def writer(journal_path: Path):
    """The journal opened as every writer opens it: spilled calls are replayed first."""
    with Journal(journal_path) as j:
        spill.replay(j)
        yield j


def step_numbers(journal_path: Path, run: str) -> list[int]:
    with writer(journal_path) as j:
        return [s["step"] for s in j.steps(j.require_run(run)["id"])]


@contextmanager
def locked(journal_path: Path):
    """Hold the journal's write lock from another connection."""
    conn = sqlite3.connect(journal_path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def assert_loud_warning(result: subprocess.CompletedProcess[str]) -> None:
    assert "WARNING" in result.stderr and "journal" in result.stderr
    assert "saved to" in result.stderr


# -- a lock held past the busy timeout ----------------------------------------


def test_lock_held_past_timeout_log_exits_0_and_spill_is_imported(cli, src, tmp_path, journal_path):
    run = cli.ok("observe", "init", "--metric", "loss", "-s", "train.py").stdout.strip()
    fast = {"WECO_OBSERVE_BUSY_TIMEOUT": "0.2"}
    with locked(journal_path):
        result = cli(
            "observe", "log", "--run-id", run, "--step", "1", "--metrics", '{"loss": 0.5}', "-s", "train.py", env=fast
        )
        assert result.returncode == 0
        assert_loud_warning(result)
        assert "locked" in result.stderr
        strict = cli("observe", "log", "--run-id", run, "--step", "2", "--strict", env=fast)
        assert strict.returncode == EXIT_JOURNAL
        assert_loud_warning(strict)
    assert len(spill_files(tmp_path)) == 2
    # the next successful open imports both, with the parent resolved then
    cli.ok("observe", "log", "--run-id", run, "--step", "3")
    assert step_numbers(journal_path, run) == [0, 1, 2, 3]
    assert spill_files(tmp_path) == []
    with Journal(journal_path) as j:
        step1 = j.steps(run)[1]
        assert step1["metrics"] == {"loss": 0.5}
        assert j.read_code(step1["code"]) == {"train.py": "x = 1\n"}
        assert totals(j)["pending"] == 4


def test_lock_held_past_timeout_init_still_prints_a_run_id(cli, src, tmp_path, journal_path):
    cli.ok("observe", "init", "--metric", "loss", "-s", "train.py")  # create the journal
    with locked(journal_path):
        result = cli(
            "observe",
            "init",
            "--metric",
            "acc",
            "-g",
            "max",
            "-s",
            "train.py",
            env={"WECO_OBSERVE_BUSY_TIMEOUT": "0.2"},
        )
    assert result.returncode == 0
    assert_loud_warning(result)
    run = result.stdout.strip()
    assert run.startswith("local-")
    # logging to the spilled run works once the lock is gone: open imports the create first
    cli.ok("observe", "log", "--run-id", run, "--step", "1")
    with Journal(journal_path) as j:
        row = j.require_run(run)
        assert (row["metric"], row["maximize"]) == ("acc", 1)
        assert [s["step"] for s in j.steps(run)] == [0, 1]


def test_cli_bad_input_is_refused_not_spilled_when_the_journal_cannot_open(cli, src, tmp_path):
    """The journal's own checks still run when it cannot even be opened: exit 2, no spill file."""
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    env = {"WECO_OBSERVE_DIR": str(blocker / "data")}
    blank_metric = cli("observe", "init", "--metric", " ", "-s", "train.py", env=env)
    strict_blank = cli("observe", "init", "--metric", " ", "-s", "train.py", "--strict", env=env)
    parent_above = cli("observe", "log", "--run-id", str(uuid.uuid4()), "--step", "2", "--parent-step", "5", env=env)
    for result in (blank_metric, strict_blank, parent_above):
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
        assert result.stdout == ""
    assert spill_files(tmp_path) == []


def test_spill_replay_is_idempotent(src, journal_path, tmp_path):
    j = Journal(journal_path)
    run = j.create_run(source_code={"a.py": "a"}, metric="loss")
    j.close()
    kwargs = {"run": run, "step": 1, "metrics": {"loss": 1.0}, "event_id": ids.ulid()}
    first = spill.write("log_step", kwargs)
    second = spill.write("log_step", kwargs)  # the same event spilled twice
    assert first and second
    with writer(journal_path) as j:
        assert j.query("SELECT count(*) AS n FROM events WHERE kind = 'log_step'")[0]["n"] == 1
    assert spill_files(tmp_path) == []


def test_bad_spill_file_is_kept_aside(journal_path, tmp_path, capfd):
    Journal(journal_path).close()
    spill_dir = journal_path.parent / "spill"
    spill_dir.mkdir()
    (spill_dir / "01jaaaaaaaaaaaaaaaaaaaaaaa.json").write_text("{not json")
    Journal(journal_path).close()
    assert (spill_dir / "01jaaaaaaaaaaaaaaaaaaaaaaa.json").exists()  # opening a journal replays nothing
    with writer(journal_path):
        pass
    assert (spill_dir / "01jaaaaaaaaaaaaaaaaaaaaaaa.json.bad").exists()
    assert "could not import spill file" in capfd.readouterr().err


# -- a journal path that cannot exist (no root needed) -------------------------


def test_journal_dir_is_a_file(cli, src, tmp_path, isolated_env):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    env = {"WECO_OBSERVE_DIR": str(blocker / "data")}
    result = cli("observe", "log", "--run-id", str(uuid.uuid4()), "--step", "1", env=env)
    assert result.returncode == 0
    assert_loud_warning(result)
    assert (
        cli("observe", "log", "--run-id", str(uuid.uuid4()), "--step", "1", "--strict", env=env).returncode
        == EXIT_JOURNAL
    )
    (spilled, _) = spill_files(tmp_path)
    assert spilled.is_relative_to(tmp_path / "tmpdir")  # the fallback spill dir
    blocker.unlink()
    with writer(blocker / "data" / "journal.db") as j:
        assert totals(j)["steps"] == 2
    assert spill_files(tmp_path) == []


# -- the SDK spills and warns too ---------------------------------------------


def test_sdk_spills_and_warns_when_locked(journal_path, monkeypatch):
    obs = WecoObserver()
    run = obs.create_run(source_code={"a.py": "a"}, primary_metric="loss")
    obs.close()
    monkeypatch.setenv("WECO_OBSERVE_BUSY_TIMEOUT", "0.1")
    obs = WecoObserver()
    run = obs.run(run.run_id)
    with locked(journal_path):
        with pytest.warns(WecoObserveWarning, match="saved to"):
            run.log_step(1, metrics={"loss": 0.4})
        strict = WecoObserver(strict=True)
        with pytest.raises(JournalUnavailable, match="locked"):
            strict.run(run.run_id).log_step(2)
        strict.close()
    obs.close()
    monkeypatch.delenv("WECO_OBSERVE_BUSY_TIMEOUT")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        obs = WecoObserver()  # the next writer replays what was spilled
        obs.run(run.run_id).log_step(3)
        obs.close()
        with Journal(journal_path) as j:
            assert [s["step"] for s in j.steps(run.run_id)] == [0, 1, 2, 3]


# -- read-only directory and full disk (need mount, i.e. root) ----------------


def _mount(*args: str) -> None:
    try:
        subprocess.run(["mount", *args], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount here ({exc})")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True, timeout=10)


@pytest.fixture
def readonly_journal(cli, src, tmp_path):
    """A journal with one run, whose directory is then bind-mounted read-only."""
    data = tmp_path / "ro-data"
    env = {"WECO_OBSERVE_DIR": str(data)}
    run = cli.ok("observe", "init", "--metric", "loss", "-s", "train.py", env=env).stdout.strip()
    with Journal(data / "journal.db") as j:
        j.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    _mount("--bind", str(data), str(data))
    try:
        _mount("-o", "remount,ro,bind", str(data))
        yield data, env, run
    finally:
        _umount(data)


def test_readonly_directory(cli, tmp_path, readonly_journal):
    data, env, run = readonly_journal
    with pytest.raises(OSError):
        (data / "probe").write_text("")
    result = cli("observe", "log", "--run-id", run, "--step", "1", "--metrics", '{"loss": 2.0}', env=env)
    assert result.returncode == 0, result.stderr
    assert_loud_warning(result)
    strict = cli("observe", "log", "--run-id", run, "--step", "2", "--strict", env=env)
    assert strict.returncode == EXIT_JOURNAL
    assert len(spill_files(tmp_path)) == 2
    _umount(data)
    cli.ok("observe", "status", env=env)
    assert step_numbers(data / "journal.db", run) == [0, 1, 2]
    with Journal(data / "journal.db") as j:
        assert j.query("PRAGMA integrity_check")[0][0] == "ok"


def test_disk_full(cli, src, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk))
    try:
        env = {"WECO_OBSERVE_DIR": str(disk / "data")}
        run = cli.ok("observe", "init", "--metric", "loss", "-s", "train.py", env=env).stdout.strip()
        # an incompressible 300 KB source, so the journal must grow to take it
        rng = random.Random(7)
        (tmp_path / "big.py").write_text("".join(rng.choices(string.ascii_letters, k=300_000)))
        with open(disk / "filler", "wb", buffering=0) as filler:
            try:
                while True:
                    filler.write(b"\0" * 65536)
            except OSError:
                pass
        result = cli("observe", "log", "--run-id", run, "--step", "1", "-s", "big.py", env=env)
        assert result.returncode == 0, result.stderr
        assert_loud_warning(result)
        assert "full" in result.stderr
        assert (
            cli("observe", "log", "--run-id", run, "--step", "2", "-s", "big.py", "--strict", env=env).returncode
            == EXIT_JOURNAL
        )
        (spilled, _) = spill_files(tmp_path)
        assert spilled.is_relative_to(tmp_path / "tmpdir")
        os.unlink(disk / "filler")
        with writer(disk / "data" / "journal.db") as j:
            assert j.query("PRAGMA integrity_check")[0][0] == "ok"
            steps = {s["step"]: s for s in j.steps(run)}
            assert sorted(steps) == [0, 1, 2]
            assert len(j.read_code(steps[1]["code"])["big.py"]) == 300_000
        assert spill_files(tmp_path) == []
    finally:
        _umount(disk)


def test_spill_goes_back_to_its_own_journal(cli, tmp_path, journal_path):
    """The fallback spill dir is shared: a spill must not be imported into another journal."""
    cli.ok("observe", "log", "--run-id", str(uuid.uuid4()), "--step", "0")  # journal B exists
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    env_a = {"WECO_OBSERVE_DIR": str(blocker / "data")}
    server = str(uuid.uuid4())
    result = cli("observe", "log", "--run-id", server, "--step", "1", env=env_a)
    assert result.returncode == 0 and "saved to" in result.stderr
    with writer(journal_path) as j:  # a writer of journal B must leave A's spill alone
        assert j.find_run(server) is None
    assert len(spill_files(tmp_path)) == 1
    blocker.unlink()
    with writer(blocker / "data" / "journal.db") as j:
        assert [s["step"] for s in j.steps(j.require_run(server)["id"])] == [1]
    assert spill_files(tmp_path) == []


def test_sdk_spill_for_a_custom_journal_path(tmp_path, monkeypatch):
    custom = tmp_path / "elsewhere" / "my.db"
    obs = WecoObserver(journal_path=custom)
    run = obs.create_run(source_code={"a.py": "a"}, primary_metric="loss")
    monkeypatch.setenv("WECO_OBSERVE_BUSY_TIMEOUT", "0.1")
    obs.close()
    obs = WecoObserver(journal_path=custom)
    with locked(custom):
        with pytest.warns(WecoObserveWarning, match=str(custom.parent / "spill")):
            obs.run(run.run_id).log_step(1)
    obs.close()
    with writer(custom) as j:
        assert [s["step"] for s in j.steps(run.run_id)] == [0, 1]


@pytest.mark.parametrize(
    "bad",
    [
        dict(step=1, metadata={"f": object()}),
        dict(step=1, code={"a.py": b"x"}),
        dict(step=-1),
        dict(step=1, metrics={"loss": float("nan")}),
        dict(step=2, parent_step=5),
    ],
)
def test_sdk_bad_input_is_refused_even_when_the_journal_cannot_open(tmp_path, bad):
    """Bad input is reported at once (and never spilled) whatever state the journal is in."""
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    obs = WecoObserver(journal_path=blocker / "data" / "journal.db")
    run = obs.run(str(uuid.uuid4()))
    with pytest.warns(WecoObserveWarning, match="nothing recorded"):
        assert run.log_step(**bad) is None
    assert spill_files(tmp_path) == []
    with pytest.raises(InvalidInput):
        WecoObserver(journal_path=blocker / "data" / "journal.db", strict=True).run(run.run_id).log_step(**bad)
    with pytest.warns(WecoObserveWarning, match="nothing recorded"):
        assert not obs.create_run(source_code={"a.py": 3}, primary_metric="loss")
    assert spill_files(tmp_path) == []
    with pytest.warns(WecoObserveWarning, match="saved to"):  # a good call is still spilled
        run.log_step(1)
    assert len(spill_files(tmp_path)) == 1


def test_strict_init_records_nothing_when_the_journal_is_locked(cli, src, tmp_path, journal_path):
    """A create is not idempotent: a strict init that fails must not leave a run the caller has no id for
    (a retry would make a second one). A strict log may still spill: re-logging a step is an upsert."""
    cli.ok("observe", "init", "--metric", "loss", "-s", "train.py")
    with locked(journal_path):
        result = cli(
            "observe", "init", "--metric", "acc", "-s", "train.py", "--strict", env={"WECO_OBSERVE_BUSY_TIMEOUT": "0.2"}
        )
    assert result.returncode == EXIT_JOURNAL
    assert result.stdout == ""
    assert "not recorded" in result.stderr
    assert spill_files(tmp_path) == []
    with Journal(journal_path) as j:
        assert totals(j)["runs"] == 1


def test_sdk_strict_create_records_nothing_when_the_journal_is_locked(journal_path, monkeypatch):
    WecoObserver().create_run(source_code={"a.py": "a"}, primary_metric="loss")
    monkeypatch.setenv("WECO_OBSERVE_BUSY_TIMEOUT", "0.1")
    with WecoObserver(strict=True) as strict, locked(journal_path):
        with pytest.raises(JournalUnavailable, match="not recorded"):
            strict.create_run(source_code={"a.py": "a"}, primary_metric="loss")
    with Journal(journal_path) as j:
        assert totals(j)["runs"] == 1


def test_concurrent_opens_import_each_spill_once_quietly(cli, journal_path, tmp_path):
    """Several processes open the journal at once while spill files wait: each call is imported
    exactly once, and no process complains about a file another one already imported."""
    with Journal(journal_path) as j:
        run = j.create_run(source_code={"a.py": "a"}, metric="loss")
    for step in range(1, 41):
        assert spill.write(
            "log_step",
            {
                "run": run,
                "step": step,
                "metrics": {"loss": 1.0 / step},
                "event_id": ids.ulid(),
            },
        )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", "from weco_observe import journal, spill; spill.replay(journal.Journal())"],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6
    assert errs == [""] * 6, errs
    with Journal(journal_path) as j:
        assert [s["step"] for s in j.steps(run)] == list(range(41))
        assert j.query("SELECT count(*) AS n FROM events WHERE kind = 'log_step'")[0]["n"] == 40
    assert spill_files(tmp_path) == []
    assert not list(tmp_path.rglob("*.json.bad"))
