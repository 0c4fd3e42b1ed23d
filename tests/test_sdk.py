"""The SDK (issue item 6): the guide's signatures, offline, never interrupting the user's loop."""

from __future__ import annotations

import inspect
import json
import math
import sqlite3
import subprocess
import sys
import uuid

from helpers import dump, totals
import pytest

from weco_observe import InvalidInput, ObserveRun, UnknownRun, WecoObserver, WecoObserveWarning
from weco_observe.journal import Journal


@pytest.fixture
def obs():
    with WecoObserver() as observer:
        yield observer


@pytest.fixture
def run(obs) -> ObserveRun:
    return obs.create_run(source_code={"train.py": "lr = 0.1\n"}, primary_metric="val_bpb")


def test_signatures_match_the_guide():
    params = inspect.signature(WecoObserver.create_run).parameters
    assert [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY] == [
        "source_code",
        "primary_metric",
        "maximize",
        "name",
        "additional_instructions",
        "metadata",
    ]
    assert params["maximize"].default is False
    log = inspect.signature(ObserveRun.log_step).parameters
    assert list(log)[:2] == ["self", "step"]
    assert {n: p.default for n, p in log.items() if p.kind is p.KEYWORD_ONLY} == {
        "status": "completed",
        "description": None,
        "metrics": None,
        "code": None,
        "parent_step": None,
        "metadata": None,
    }
    assert inspect.signature(WecoObserver).parameters["api_key"].default is None


def test_guide_sweep(obs, journal_path):
    """The guide's SDK example, offline: a run plus a loop of steps, all journaled."""
    run = obs.create_run(name="sweep v3", source_code={"train.py": "v = 0\n"}, primary_metric="val_bpb", maximize=False)
    assert run.run_id.startswith("local-")
    for i in range(5):
        kept = i != 3
        result = run.log_step(
            step=i,
            status="completed" if kept else "failed",
            description=f"exp {i}",
            metrics={"val_bpb": 2.0 - i / 10, "memory_gb": 0.0},
            code={"train.py": f"v = {i}\n"},
        )
        assert result["step"] == i
    with Journal(journal_path) as j:
        steps = {s["step"]: s for s in j.steps(run.run_id)}
        assert {n: s["parent_step"] for n, s in steps.items()} == {0: None, 1: 0, 2: 1, 3: 2, 4: 2}
        assert j.read_code(steps[4]["code"]) == {"train.py": "v = 4\n"}
        assert j.require_run(run.run_id)["name"] == "sweep v3"


def test_log_step_is_durable_when_it_returns(run, journal_path):
    run.log_step(1, metrics={"val_bpb": 1.5})
    # a different connection (another process, in effect) sees it at once
    conn = sqlite3.connect(journal_path)
    assert conn.execute("SELECT metrics FROM steps WHERE step = 1").fetchone() == ('{"val_bpb":1.5}',)
    conn.close()


BAD_STEPS = {
    "nan-metric": dict(step=1, metrics={"val_bpb": math.nan}),
    "inf-metric": dict(step=1, metrics={"val_bpb": math.inf}),
    "str-metric": dict(step=1, metrics={"val_bpb": "1.0"}),
    "bool-metric": dict(step=1, metrics={"val_bpb": True}),
    "list-metrics": dict(step=1, metrics=[1.0]),
    "negative-step": dict(step=-1),
    "float-step": dict(step=1.0),
    "str-step": dict(step="1"),
    "bool-step": dict(step=True),
    "status": dict(step=1, status="kept"),
    "parent-missing": dict(step=5, parent_step=4),
    "parent-not-below": dict(step=2, parent_step=2),
    "code-not-text": dict(step=1, code={"a.py": b"bytes"}),
    "code-binary": dict(step=1, code={"a.py": "a\x00b"}),
    "code-surrogate": dict(step=1, code={"a.py": "\udcff"}),
    "code-empty": dict(step=1, code={}),
    "metadata-unserialisable": dict(step=1, metadata={"f": object()}),
    "description-not-text": dict(step=1, description=3),
}


@pytest.mark.parametrize("case", sorted(BAD_STEPS))
def test_bad_log_step_warns_and_records_nothing(run, journal_path, case):
    before = dump(journal_path)
    with pytest.warns(WecoObserveWarning, match="nothing recorded") as caught:
        assert run.log_step(**BAD_STEPS[case]) is None
    assert len(caught) == 1
    assert caught[0].filename == __file__  # points at the caller's line
    assert dump(journal_path) == before


@pytest.mark.parametrize("case", sorted(BAD_STEPS))
def test_bad_log_step_raises_when_strict(journal_path, case):
    with WecoObserver(strict=True) as strict:
        run = strict.create_run(source_code={"a.py": "a"}, primary_metric="loss")
        before = dump(journal_path)
        with pytest.raises(InvalidInput):
            run.log_step(**BAD_STEPS[case])
    assert dump(journal_path) == before


BAD_RUNS = {
    "no-code": dict(source_code={}, primary_metric="loss"),
    "code-not-dict": dict(source_code="x = 1", primary_metric="loss"),
    "no-metric": dict(source_code={"a.py": "a"}, primary_metric=""),
    "metric-not-str": dict(source_code={"a.py": "a"}, primary_metric=3),
    "name-not-str": dict(source_code={"a.py": "a"}, primary_metric="loss", name=3),
    "metadata-not-dict": dict(source_code={"a.py": "a"}, primary_metric="loss", metadata=[1]),
}


@pytest.mark.parametrize("case", sorted(BAD_RUNS))
def test_bad_create_run_warns_and_records_nothing(obs, journal_path, case):
    obs.create_run(source_code={"a.py": "a"}, primary_metric="loss")  # the journal exists
    before = dump(journal_path)
    with pytest.warns(WecoObserveWarning, match="nothing recorded"):
        run = obs.create_run(**BAD_RUNS[case])
    assert not run and run.run_id is None
    # the guide's loop keeps running: each step warns (at the caller's line) and records nothing
    with pytest.warns(WecoObserveWarning, match="never created") as caught:
        assert run.log_step(1, metrics={"loss": 1.0}) is None
    assert caught[0].filename == __file__
    assert dump(journal_path) == before
    with WecoObserver(strict=True) as strict, pytest.raises(InvalidInput):
        strict.create_run(**BAD_RUNS[case])
    assert dump(journal_path) == before


def test_open_existing_run_by_id_from_another_process(journal_path, tmp_path):
    script = tmp_path / "make_run.py"
    script.write_text(
        "from weco_observe import WecoObserver\n"
        "run = WecoObserver().create_run(source_code={'a.py': 'a'}, primary_metric='acc', maximize=True)\n"
        "run.log_step(1, metrics={'acc': 0.5})\n"
        "print(run.run_id)\n"
    )
    made = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True)
    run_id = made.stdout.strip()
    with WecoObserver() as obs:
        run = obs.run(run_id)
        assert (run.run_id, run.primary_metric, run.maximize) == (run_id, "acc", True)
        assert obs.get_run(run_id[:14]).run_id == run_id  # a unique prefix works too
        run.log_step(2, metrics={"acc": 0.6})
    with Journal(journal_path) as j:
        assert {s["step"]: s["parent_step"] for s in j.steps(run_id)} == {0: None, 1: 0, 2: 1}


def test_open_unknown_server_run_becomes_remote_only(obs, journal_path):
    server = str(uuid.uuid4())
    run = obs.run(server)
    with pytest.warns(WecoObserveWarning, match="never seen"):  # maybe a typo: the first log says so
        run.log_step(4, metrics={"loss": 1.0})
    with Journal(journal_path) as j:
        row = j.require_run(server)
        assert row["remote_only"] == 1
        assert j.query("SELECT kind FROM events")[0]["kind"] == "log_step"


def test_open_unknown_run_that_is_not_an_id(obs):
    obs.create_run(source_code={"a.py": "a"}, primary_metric="loss")
    with pytest.raises(InvalidInput, match="unknown run"):
        obs.run("no-such-run")


def test_context_managers(journal_path):
    with WecoObserver() as obs:
        with obs.create_run(source_code={"a.py": "a"}, primary_metric="loss") as run:
            run.log_step(1, metrics={"loss": 0.3})
    assert obs._journal is None  # closed
    with Journal(journal_path) as j:
        assert totals(j)["steps"] == 2
    # logging after the observer was closed reopens the journal instead of failing
    run.log_step(2)
    with Journal(journal_path) as j:
        assert totals(j)["steps"] == 3
    obs.close()


def test_run_context_manager_does_not_swallow_errors(run):
    with pytest.raises(ZeroDivisionError):
        with run:
            raise ZeroDivisionError


def test_sdk_works_with_no_network_and_no_key(tmp_path):
    """Point the API at a closed port: nothing is attempted, nothing fails."""
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise AssertionError('network used')\n"
        "socket.socket.connect = refuse\n"
        "from weco_observe import WecoObserver\n"
        "run = WecoObserver().create_run(source_code={'a.py': 'a'}, primary_metric='loss')\n"
        "for i in range(1, 20): run.log_step(i, metrics={'loss': 1 / i})\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**__import__("os").environ, "WECO_BASE_URL": "http://127.0.0.1:9/v1"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_relog_via_sdk_merges_fields(run, journal_path):
    run.log_step(1, description="first", metrics={"val_bpb": 3.0}, code={"train.py": "lr = 0.2\n"})
    run.log_step(1, status="failed")
    with Journal(journal_path) as j:
        step = j.steps(run.run_id)[1]
        assert (step["status"], step["description"], step["metrics"]) == ("failed", "first", {"val_bpb": 3.0})
        assert j.read_code(step["code"]) == {"train.py": "lr = 0.2\n"}
        payloads = [
            json.loads(r["payload"]) for r in j.query("SELECT payload FROM events WHERE kind = 'log_step' ORDER BY seq")
        ]
    assert len(payloads) == 2 and payloads[1]["status"] == "failed" and payloads[1]["metrics"] == {"val_bpb": 3.0}


def test_unknown_run_error_class(journal_path):
    with Journal(journal_path) as j, pytest.raises(UnknownRun):
        j.log_step("local-doesnotexist", 1)
