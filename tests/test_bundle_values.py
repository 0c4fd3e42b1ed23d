"""Forged values and inconsistent runs in bundles with valid checksums (issue 10 item 7).

Every row is checked by the CLI's rules before anything is written, so a refused
bundle leaves every row of every table of the receiving journal as it was; and
no bundle, forged or interrupted, leaves sync a create it can never send.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from bundle_helpers import journal_rows, read_members, reforge, write_members
from emulator_fixtures import emulator  # noqa: F401
from test_bundle import Box, boxes  # noqa: F401

from weco_observe import bundle, ids
from weco_observe.journal import Journal

REMOTE = "5b7e0c1a-2222-4333-8444-555566667777"


@pytest.fixture(scope="module")
def box_a(tmp_path_factory) -> dict:
    """Box A: a run and a second run, and steps logged to server run REMOTE; bundle 1, then more
    steps (one re-logged, new code) in bundle 2, which the tests forge."""
    root = tmp_path_factory.mktemp("a")
    with Journal(root / "a" / "journal.db") as a:
        run = a.create_run(source_code={"train.py": "lr = 0.1\n" * 40}, metric="loss", name="exp")
        other = a.create_run(source_code={"eval.py": "k = 5\n"}, metric="acc", maximize=True, name="other")
        a.log_step(run, 1, metrics={"loss": 1.5}, description="first")
        a.log_step(REMOTE, 1, metrics={"loss": 0.9})
        bundle.write_bundle(a, root / "1.weco")
        a.log_step(run, 2, metrics={"loss": 1.2}, code={"train.py": "lr = 0.2\n" * 40}, metadata={"gpu": "a100"})
        a.log_step(run, 1, metrics={"loss": 1.4}, description="again")
        a.log_step(other, 1, metrics={"acc": 0.5})
        a.log_step(REMOTE, 2, metrics={"loss": 0.8})
        bundle.write_bundle(a, root / "2.weco")
    return {"root": root, "run": run, "other": other, "1": root / "1.weco", "2": root / "2.weco"}


@pytest.fixture(scope="module")
def box_b_template(box_a, tmp_path_factory) -> Path:
    """Box B after importing bundle 1: the tests' receiving journal, copied for each."""
    root = tmp_path_factory.mktemp("b")
    with Journal(root / "journal.db") as b:
        bundle.import_bundle(b, box_a["1"])
    return root


@pytest.fixture
def box_b(box_b_template, tmp_path) -> Path:
    shutil.copytree(box_b_template, tmp_path / "b")
    return tmp_path / "b" / "journal.db"


def step_event(m: dict, run: str, step: int) -> dict:
    return next(e for e in m["events.jsonl"] if e["run_id"] == run and e["kind"] == "log_step" and e["step"] == step)


def step_row(m: dict, run: str, step: int) -> dict:
    return next(s for s in m["steps.jsonl"] if s["run_id"] == run and s["step"] == step)


def both(m: dict, run: str, step: int, **changes) -> None:
    """The same change to a step's event payload and to its row, as a consistent forger makes it."""
    step_event(m, run, step)["payload"].update(changes)
    step_row(m, run, step).update(changes)


def renumber(m: dict, run: str, step: int, to: int) -> None:
    event, row = step_event(m, run, step), step_row(m, run, step)
    event.update(step=to)
    event["payload"].update(step=to)
    row.update(step=to)


def create(m: dict, run: str) -> dict:
    return next(e for e in m["events.jsonl"] if e["run_id"] == run and e["kind"] == "create_run")


def run_row(m: dict, run: str) -> dict:
    return next(r for r in m["runs.jsonl"] if r["id"] == run)


#: name -> edit(members, run, other); every one is refused
FORGERIES = {
    "a NaN metric": lambda m, r, o: both(m, r, 2, metrics={"loss": float("nan")}),
    "an infinite metric": lambda m, r, o: both(m, r, 2, metrics={"loss": float("inf")}),
    "a metric of 1e999": lambda m, r, o: both(m, r, 2, metrics={"loss": "<1e999>"}),
    "a metric of 10**400": lambda m, r, o: both(m, r, 2, metrics={"loss": 10**400}),
    "a boolean metric": lambda m, r, o: both(m, r, 2, metrics={"loss": True}),
    "a metric name with a lone surrogate": lambda m, r, o: both(m, r, 2, metrics={"lo\ud800ss": 1.0}),
    "metadata with a lone surrogate": lambda m, r, o: both(m, r, 2, metadata={"gpu": "a\udc00"}),
    "a metadata key with a lone surrogate": lambda m, r, o: both(m, r, 2, metadata={"\ud83d": 1}),
    "a description that is a number": lambda m, r, o: both(m, r, 2, description=7),
    "a description with a lone surrogate": lambda m, r, o: both(m, r, 2, description="x\ud800"),
    "an unknown status": lambda m, r, o: both(m, r, 2, status="won"),
    "a step of 2**64": lambda m, r, o: renumber(m, r, 2, 2**64),
    "a step of -1": lambda m, r, o: renumber(m, r, 2, -1),
    "a step of 2.0": lambda m, r, o: renumber(m, r, 2, 2.0),
    "a parent step of 2**64": lambda m, r, o: both(m, r, 2, parent_step=2**64),
    "a parent step after its step": lambda m, r, o: both(m, r, 2, parent_step=5),
    "an extra payload key": lambda m, r, o: step_event(m, r, 2)["payload"].update(admin=True),
    "a created_at of 1e300": lambda m, r, o: step_event(m, r, 2).update(created_at=1e300),
    "a run name with a lone surrogate": lambda m, r, o: run_row(m, r).update(name="e\udfffxp"),
    "a create without a metric": lambda m, r, o: create(m, o)["payload"].update(metric_name=""),
    "a create whose maximize is a string": lambda m, r, o: create(m, o)["payload"].update(maximize="yes"),
    "a blob size of 2**64": lambda m, r, o: m["blobs.jsonl"][0].update(size=2**64),
    "a blob depth of 2**64": lambda m, r, o: m["blobs.jsonl"][0].update(depth=2**64),
    "a blob delta wider than its text": lambda m, r, o: m["blobs.jsonl"][0].update(prefix=2**40),
    # Runs that sync could never finish: a create it cannot send, or none to send first.
    "a second create for a run this box knows": lambda m, r, o: create(m, r).update(id=ids.ulid()),
    "a run with two creates": lambda m, r, o: m["events.jsonl"].append({**create(m, o), "id": ids.ulid()}),
    "a run without its create": lambda m, r, o: m["events.jsonl"].remove(create(m, o)),
    "two runs with one server id": lambda m, r, o: [
        run_row(m, x).update(server_id="6c8f1d2b-3333-4444-9555-666677778888") for x in (r, o)
    ],
    "a remote-only run with a create": lambda m, r, o: run_row(m, o).update(remote_only=1, server_id=REMOTE[::-1]),
    "a remote-only run without a server id": lambda m, r, o: next(
        x for x in m["runs.jsonl"] if x["remote_only"]
    ).update(server_id=None),
}


def _encode(row) -> bytes:
    """Bundle lines as a forger writes them: NaN and Infinity as JSON's extensions spell them, 1e999 raw."""
    return json.dumps(row, separators=(",", ":")).replace('"<1e999>"', "1e999").encode() + b"\n"


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_a_forged_value_is_refused_and_no_table_changes(box_a, box_b, tmp_path, forgery):
    members, manifest = read_members(box_a["2"])
    FORGERIES[forgery](members, box_a["run"], box_a["other"])
    forged = tmp_path / "forged.weco"
    write_members(forged, members, manifest, encode=_encode)
    before = journal_rows(box_b)
    with Journal(box_b) as b:
        with pytest.raises(bundle.BundleInvalid) as refused:
            bundle.import_bundle(b, forged)
    message = str(refused.value)
    assert "refused, nothing imported" in message and "\n" not in message and len(message) < 600
    assert journal_rows(box_b) == before


def test_the_genuine_bundle_the_forgeries_are_made_from_imports(box_a, box_b, tmp_path):
    members, manifest = read_members(box_a["2"])
    write_members(tmp_path / "same.weco", members, manifest, encode=_encode)
    with Journal(box_b) as b:
        assert bundle.import_bundle(b, tmp_path / "same.weco")["events_new"] == 4  # steps; the creates are known


def test_the_cli_refuses_a_forged_value_in_one_line(box_a, boxes, tmp_path):  # noqa: F811
    b = boxes("b")
    b.ok("observe", "import", str(box_a["1"]))
    before = journal_rows(b.journal)
    reforge(box_a["2"], tmp_path / "nan.weco", lambda m: both(m, box_a["run"], 2, metrics={"loss": float("nan")}))
    result = b("observe", "import", str(tmp_path / "nan.weco"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: bundle ") and "refused, nothing imported" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert journal_rows(b.journal) == before


def test_a_second_create_for_a_known_run_is_refused_and_sync_is_not_stuck(box_a, boxes, tmp_path, emulator):  # noqa: F811
    """The issue's case: box B synced bundle 1; a bundle carrying another create for that run left
    every later sync exiting 4 ("last error: None"). Refused now; sync finishes, and the genuine
    bundle 2 goes through."""
    emulator.create_run({"shared.py": "x = 1\n"}, "loss", run_id=REMOTE)
    b = boxes("b")
    env = {**b.env, **emulator.env()}
    b.cli.ok("observe", "sync", "--bundle", str(box_a["1"]), env=env)
    forged = tmp_path / "second-create.weco"
    reforge(box_a["2"], forged, lambda m: create(m, box_a["run"]).update(id=ids.ulid()))
    refused = b("observe", "import", str(forged))
    again = b.cli("observe", "sync", env=env)
    genuine = b.cli("observe", "sync", "--bundle", str(box_a["2"]), env=env)
    assert again.returncode == 0, again.stderr
    assert refused.returncode == 2 and "already has another create here" in refused.stderr, refused.stderr
    assert genuine.returncode == 0, genuine.stderr
    assert emulator.stats()["created_runs"] == 3  # REMOTE, then box A's two runs, once each


def test_a_run_with_a_server_id_arrives_with_its_create_settled(box_a, boxes, tmp_path, emulator):  # noqa: F811
    """A bundle from a box whose run has a server id but an unsent create (a box killed while it
    imported, or written by 0.1.0): the server has the run, so the create is delivered here, and
    sync sends the steps and finishes instead of exiting 4 on a create it never sends."""
    server_run = emulator.create_run({"train.py": "lr = 0.1\n" * 40}, "loss")
    emulator.create_run({"shared.py": "x = 1\n"}, "loss", run_id=REMOTE)
    b = boxes("b")
    odd = tmp_path / "odd.weco"

    def edit(m: dict) -> None:
        run_row(m, box_a["run"])["server_id"] = server_run  # its create stays "pending"

    reforge(box_a["1"], odd, edit)
    result = b.cli("observe", "sync", "--bundle", str(odd), env={**b.env, **emulator.env()})
    assert result.returncode == 0, result.stderr
    assert emulator.stats()["created_runs"] == 3  # the two made here, and box A's other run: not this one again
    assert sorted(emulator.runs()[server_run]["steps"]) == [0, 1]
    with Journal(b.journal) as j:
        assert j.query("SELECT state FROM events WHERE run_id = ? AND kind = 'create_run'", (box_a["run"],))[0][0] == (
            "delivered"
        )


def invariants(path: Path) -> list[str]:
    """What would leave sync with a create it can never send: a run (not remote-only) without its
    create, or a run with a server id whose create is still unsent."""
    with Journal(path) as j:
        rows = j.query(
            "SELECT r.id, r.server_id, r.remote_only, e.state FROM runs r"
            " LEFT JOIN events e ON e.run_id = r.id AND e.kind = 'create_run'"
        )
    return [
        f"{r['id']}: {'no create' if r['state'] is None else 'server id with an unsent create'}"
        for r in rows
        if (r["state"] is None and not r["remote_only"]) or (r["server_id"] and r["state"] == "pending")
    ]


@pytest.mark.parametrize("member", ["steps.jsonl", "events.jsonl"])
def test_an_interrupted_import_never_leaves_a_run_sync_cannot_finish(box_a, box_b, tmp_path, monkeypatch, member):
    """Killed after the runs were merged (here: an exception in the first later batch), the journal
    has every run with its create, settled when the run has a server id; importing again completes it."""
    synced = tmp_path / "synced.weco"
    reforge(box_a["2"], synced, lambda m: [run_row(m, box_a["run"]).update(server_id=REMOTE[::-1])])
    method = {"steps.jsonl": "_step", "events.jsonl": "_event"}[member]
    real = getattr(bundle._Merge, method)
    calls = []

    def killed(self, conn, doc):
        calls.append(doc)
        if len(calls) > 1:
            raise KeyboardInterrupt("killed")
        return real(self, conn, doc)

    monkeypatch.setattr(bundle._Merge, method, killed)
    with Journal(box_b) as b, pytest.raises(KeyboardInterrupt):
        bundle.import_bundle(b, synced, batch=1)
    assert invariants(box_b) == []
    monkeypatch.setattr(bundle._Merge, method, real)
    with Journal(box_b) as b:
        assert bundle.import_bundle(b, synced)["events_new"] > 0
    assert invariants(box_b) == []


def test_sync_settles_a_run_whose_create_is_unsent_but_whose_server_id_is_known(tmp_path, cli, emulator):  # noqa: F811
    server_run = emulator.create_run({"a.py": "x = 1\n"}, "loss")
    path = tmp_path / "box" / "journal.db"
    with Journal(path) as j:
        run = j.create_run(source_code={"a.py": "x = 1\n"}, metric="loss")
        j.log_step(run, 1, metrics={"loss": 1.0})
        with j.write() as conn:  # what an import killed between adopting the id and settling the create left
            conn.execute("UPDATE runs SET server_id = ? WHERE id = ?", (server_run, run))
    env = {"WECO_OBSERVE_DIR": str(path.parent), **emulator.env()}
    first = cli("observe", "sync", env=env)
    assert sorted(emulator.runs()[server_run]["steps"]) == [0, 1]  # the step went (this part works)
    assert first.returncode == 0, first.stderr
