"""Property: whatever is logged (order, branches, failures, re-logs) and whatever the network
does, sync until nothing is pending leaves the server equal to the journal."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulator_fixtures import assert_server_matches_journal, server_runs_by_local_id
from weco_observe import replay
from weco_observe.api import WecoClient
from weco_observe.emulator import Emulator
from weco_observe.journal import Journal

# one logged call: (step, failed?, explicit parent as a fraction of step or None, description?, code version)
calls = st.lists(
    st.tuples(
        st.integers(0, 12),
        st.booleans(),
        st.one_of(st.none(), st.floats(0, 0.99)),
        st.booleans(),
        st.one_of(st.none(), st.integers(0, 3)),
    ),
    min_size=1,
    max_size=25,
)
faults = st.fixed_dictionaries(
    {
        "error_rate": st.sampled_from([0.0, 0.3]),
        "rate_limit_rate": st.sampled_from([0.0, 0.2]),
        "drop_rate": st.sampled_from([0.0, 0.2]),
        "non_json_rate": st.sampled_from([0.0, 0.2]),
        "seed": st.integers(0, 1000),
    }
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(runs=st.lists(calls, min_size=1, max_size=3), network=faults)
def test_any_log_sequence_and_faults_converge_to_the_journal(tmp_path_factory, runs, network):
    journal_path = Path(tmp_path_factory.mktemp("prop")) / "journal.db"
    with Journal(journal_path) as journal:
        for r, run_calls in enumerate(runs):
            run_id = journal.create_run(source_code={"a.py": "v0"}, metric="m", name=f"r{r}")
            for step, failed, parent_frac, described, version in run_calls:
                if step == 0:
                    parent = None
                else:
                    known = [row["step"] for row in journal.steps(run_id) if row["step"] < step]
                    parent = known[int(parent_frac * len(known))] if parent_frac is not None and known else None
                journal.log_step(
                    run_id,
                    step,
                    status="failed" if failed else "completed",
                    description=f"s{step}" if described else None,
                    metrics={"m": float(step)},
                    code={"a.py": f"v{version}"} if version is not None else None,
                    parent_step=parent,
                )
    with (
        Emulator(**network) as emu,
        Journal(journal_path) as journal,
        WecoClient(emu.base_url, emu.api_key, read_timeout=2) as client,
    ):
        result = replay.sync(
            journal, client=client, attempts=10, passes=20, initial_wait=0.001, max_wait=0.005, max_retry_after=0.005
        )
        flagged = {r.run_id for r in result.runs if r.possible_duplicate}
        if result.pending:
            emu.set_faults(error_rate=0, rate_limit_rate=0, drop_rate=0, non_json_rate=0)
            result = replay.sync(journal, client=client, initial_wait=0.001, max_wait=0.005)
            # the second sync reports only the runs it still had to send: a run flagged by the first stays flagged
            flagged |= {r.run_id for r in result.runs if r.possible_duplicate}
        assert result.pending == 0
        # a 2xx without a JSON body on a create may duplicate it: only flagged runs may have twins
        twins = {k for k, n in server_runs_by_local_id(emu).items() if n > 1}
        assert twins <= flagged
        in_journal = journal.query(
            "SELECT run_id FROM events WHERE kind = 'create_run' AND state = 'possible_duplicate'"
        )
        assert twins <= {row["run_id"] for row in in_journal}  # and `status` says so
        known = {row["server_id"] for row in journal.query("SELECT server_id FROM runs")}
        for rid in [rid for rid in emu.runs() if rid not in known]:
            del emu._runs[rid]
        assert_server_matches_journal(emu, journal_path)
