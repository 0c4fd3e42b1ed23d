"""Background auto-sync: `init`/`log`/the SDK start a detached syncer that delivers and exits when idle."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from emulator_fixtures import assert_server_matches_journal, emulator, pending_events  # noqa: F401
from weco_observe import background, synclock
from weco_observe.journal import Journal


def _wait_for(predicate, timeout: float = 20.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@pytest.fixture
def auto_env(emulator, monkeypatch):
    """Auto-sync on, pointed at the emulator, lingering briefly so tests end fast."""
    env = {**emulator.env(), "WECO_OBSERVE_AUTO_SYNC": "1", "WECO_OBSERVE_SYNC_LINGER": "0.3"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def _idle(journal_path: Path) -> bool:
    return not synclock.running(journal_path)


def test_background_syncer_delivers_without_a_sync_command_and_exits(cli, emulator, auto_env, journal_path, tmp_path):
    (tmp_path / "train.py").write_text("x = 0\n")
    init = cli.ok("observe", "init", "--metric", "loss", "--source", "train.py")
    run_id = init.stdout.strip()
    assert init.stdout == run_id + "\n"  # the syncer never writes to the user's terminal
    for n in range(1, 6):
        (tmp_path / "train.py").write_text(f"x = {n}\n")
        out = cli.ok("observe", "log", "--run-id", run_id, "--step", str(n), "--source", "train.py", "-q")
        assert out.stdout == "" and out.stderr == ""
    assert _wait_for(lambda: pending_events(journal_path) == 0), "background syncer did not deliver"
    assert _wait_for(lambda: _idle(journal_path), timeout=15), "background syncer did not exit when idle"
    assert_server_matches_journal(emulator, journal_path)
    log = (journal_path.parent / "autosync.log").read_text()
    assert "delivered" in log and emulator.api_key not in log


def test_sdk_triggers_with_its_own_key_passed_only_through_the_environment(emulator, journal_path, monkeypatch):
    from weco_observe import WecoObserver

    for k, v in {
        "WECO_BASE_URL": emulator.base_url,
        "WECO_OBSERVE_AUTO_SYNC": "1",
        "WECO_OBSERVE_SYNC_LINGER": "0.3",
    }.items():
        monkeypatch.setenv(k, v)
    with WecoObserver(api_key=emulator.api_key) as obs:
        run = obs.create_run(source_code={"a.py": "1"}, primary_metric="m")
        for n in range(1, 4):
            run.log_step(n, metrics={"m": n})
        assert _wait_for(lambda: pending_events(journal_path) == 0)
    assert _wait_for(lambda: _idle(journal_path), timeout=15)
    assert_server_matches_journal(emulator, journal_path)
    for path in journal_path.parent.iterdir():
        if path.is_file():
            assert emulator.api_key.encode() not in path.read_bytes(), f"key written to {path}"


def test_no_key_or_auto_sync_off_starts_nothing(journal_path, monkeypatch):
    Journal(journal_path).close()
    before = set(background._children)
    monkeypatch.setenv("WECO_OBSERVE_AUTO_SYNC", "1")
    background.trigger(journal_path)  # no key anywhere
    monkeypatch.setenv("WECO_API_KEY", "k")
    monkeypatch.setenv("WECO_OBSERVE_AUTO_SYNC", "0")
    background.trigger(journal_path)
    assert set(background._children) <= before
    assert not (journal_path.parent / "autosync.log").exists()


def test_a_running_syncer_or_a_cooldown_means_no_new_process(journal_path, monkeypatch):
    Journal(journal_path).close()
    monkeypatch.setenv("WECO_OBSERVE_AUTO_SYNC", "1")
    monkeypatch.setenv("WECO_API_KEY", "k")
    before = set(background._children)
    lock = synclock.SyncLock(journal_path)
    assert lock.try_acquire("background")
    try:
        assert synclock.running(journal_path)
        background.trigger(journal_path)
        assert set(background._children) <= before
    finally:
        lock.release()
    synclock.set_cooldown(journal_path, 60)
    assert synclock.in_cooldown(journal_path)
    background.trigger(journal_path)
    assert set(background._children) <= before
    synclock.set_cooldown(journal_path, 0)
    assert not synclock.in_cooldown(journal_path)


def test_offline_background_syncer_gives_up_keeps_events_and_cools_down(cli, journal_path, monkeypatch, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "WECO_BASE_URL": f"http://127.0.0.1:{port}/v1",
        "WECO_API_KEY": "k",
        "WECO_OBSERVE_AUTO_SYNC": "1",
        "WECO_OBSERVE_SYNC_GIVE_UP": "1",
        "WECO_OBSERVE_SYNC_LINGER": "0.2",
    }
    (tmp_path / "a.py").write_text("x = 1\n")
    run_id = cli.ok("observe", "init", "--metric", "m", "--source", "a.py", env=env).stdout.strip()
    assert _wait_for(lambda: synclock.in_cooldown(journal_path), timeout=30), "syncer never gave up"
    assert _wait_for(lambda: _idle(journal_path), timeout=10)
    assert pending_events(journal_path) == 1
    # during the cooldown a log does not start another syncer
    cli.ok("observe", "log", "--run-id", run_id, "--step", "1", env=env)
    time.sleep(0.3)
    assert _idle(journal_path)
    assert "giving up" in (journal_path.parent / "autosync.log").read_text()
    # a successful foreground sync clears it
    from weco_observe.emulator import Emulator

    with Emulator(port) as emu:
        cli.ok("observe", "sync", env={**env, "WECO_API_KEY": emu.api_key})
    assert not synclock.in_cooldown(journal_path)
    assert pending_events(journal_path) == 0


def test_foreground_sync_takes_over_from_a_lingering_background_syncer(
    cli, emulator, auto_env, journal_path, tmp_path, monkeypatch
):
    monkeypatch.setenv("WECO_OBSERVE_SYNC_LINGER", "30")
    (tmp_path / "a.py").write_text("x = 1\n")
    cli.ok("observe", "init", "--metric", "m", "--source", "a.py", env={"WECO_OBSERVE_SYNC_LINGER": "30"})
    assert _wait_for(lambda: pending_events(journal_path) == 0)
    assert synclock.running(journal_path)  # lingering for 30 s
    start = time.monotonic()
    cli.ok("observe", "sync", env={"WECO_OBSERVE_AUTO_SYNC": "0"})
    assert time.monotonic() - start < 15, "the background syncer should give way at once"
    assert _wait_for(lambda: _idle(journal_path), timeout=10)
    assert "gave way" in (journal_path.parent / "autosync.log").read_text()
