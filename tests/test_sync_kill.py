"""kill -9 the syncer at 50+ random moments, then one clean sync: nothing lost, nothing doubled.

The syncer runs in a forked child (a real process, real SIGKILL, no interpreter
start-up per round) against the emulator with a little latency, so kills land
everywhere: before a create is sent, between the server committing it and the
journal recording it, mid-step, mid-transaction.
"""

from __future__ import annotations

import os
import random
import signal
import time
import warnings

from emulator_fixtures import (  # noqa: F401
    assert_server_matches_journal,
    emulator,
    make_workload,
    pending_events,
    server_runs_by_local_id,
)
from helpers import totals
from weco_observe import replay
from weco_observe.api import WecoClient
from weco_observe.journal import Journal

KILLS = 50


def _child_sync(journal_path, base_url, key) -> None:
    try:
        with Journal(journal_path) as journal, WecoClient(base_url, key) as client:
            replay.sync(journal, client=client, workers=2, passes=1, initial_wait=0.01, max_wait=0.02)
    finally:
        os._exit(0)


def test_kill_9_at_random_moments_loses_and_doubles_nothing(emulator, journal_path):
    make_workload(journal_path, runs=8, steps=40, seed=11)
    emulator.set_faults(latency=0.02)
    rng = random.Random(1234)
    kills = rounds = 0
    deadline = time.monotonic() + 60
    while kills < KILLS and time.monotonic() < deadline and pending_events(journal_path):
        rounds += 1
        with warnings.catch_warnings():
            # Python 3.12+ warns on fork() with threads running (the emulator's); the
            # child touches none of their state: it syncs over HTTP and os._exit()s.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            _child_sync(journal_path, emulator.base_url, emulator.api_key)
        time.sleep(rng.uniform(0.0, 0.08))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            kills += 1
    assert kills >= KILLS, f"only {kills} kills landed in {rounds} rounds (workload too small?)"
    assert pending_events(journal_path) > 0, "the workload should outlast the kills"

    emulator.set_faults(latency=0)
    with Journal(journal_path) as journal, WecoClient(emulator.base_url, emulator.api_key) as client:
        result = replay.sync(journal, client=client)
        states = {r["state"]: r["n"] for r in journal.query("SELECT state, count(*) AS n FROM events GROUP BY state")}
    assert result.exit_code == 0 and result.pending == 0
    assert set(states) <= {"delivered", "possible_duplicate", "superseded"}, states

    duplicated = {k for k, n in server_runs_by_local_id(emulator).items() if n > 1}
    flagged = {r.run_id for r in result.runs if r.possible_duplicate}
    with Journal(journal_path) as journal:
        flagged |= {r["run_id"] for r in journal.query("SELECT run_id FROM events WHERE state = 'possible_duplicate'")}
        server_ids = {r["server_id"] for r in journal.query("SELECT server_id FROM runs")}
    # A create is not idempotent on the server: a kill between its commit and our
    # record can leave a twin. Every such twin must be flagged, and holds no steps.
    assert duplicated <= flagged
    for rid, run in list(emulator.runs().items()):
        if rid not in server_ids:
            assert set(run["steps"]) == {0}, "an orphan twin must never receive steps"
            del emulator._runs[rid]
    assert_server_matches_journal(emulator, journal_path)
    # every journal step reached the server exactly once as a (run, step) row, with its latest state
    with Journal(journal_path) as journal:
        assert sum(len(r["steps"]) for r in emulator.runs().values()) == totals(journal)["steps"]
