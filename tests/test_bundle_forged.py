"""Forged bundles (valid checksums, hostile content) against the real CLI, a real journal and,
for server ids, the API emulator on loopback that records every path it is sent.

A careful forger recomputes every checksum (``bundle_helpers.reforge``), so these bundles
pass the integrity checks and must be stopped by the checks of their content.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from bundle_helpers import RecordingEmulator, journal_rows, reforge
from test_bundle import Box, boxes  # noqa: F401

from weco_observe import api, bundle
from weco_observe.errors import ApiRejected
from weco_observe.journal import Journal

UUID_PATH = re.compile(r"^/v1/external/runs/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})/steps$")


@pytest.fixture
def recording():
    emu = RecordingEmulator().start()
    try:
        yield emu
    finally:
        emu.stop()


def offline_box_bundle(root: Path, remote: str) -> tuple[Path, str]:
    """Box A: a local run (create + one step) and steps logged to server run ``remote``; one bundle."""
    with Journal(root / "a" / "journal.db") as a:
        run = a.create_run(source_code={"train.py": "lr = 0.1\n" * 20}, metric="loss", name="exp")
        a.log_step(run, 1, metrics={"loss": 0.5})
        a.log_step(remote, 1, metrics={"loss": 0.4})
        bundle.write_bundle(a, root / "a.weco")
    return root / "a.weco", run


def illegitimate(emu: RecordingEmulator, victim: str) -> list[tuple[str, str]]:
    """The requests that are not the wire contract's two endpoints on a run other than ``victim``."""
    bad = []
    for method, path in emu.requests:
        match = UUID_PATH.match(path)
        if method != "POST" or not (path == "/v1/external/runs" or (match and match.group(1) != victim)):
            bad.append((method, path))
    return bad


FORGED_SERVER_IDS = {
    "traversal to an admin endpoint": "../../admin/danger?x=",
    "another run's steps through a query": "{victim}/steps?x=",
    "dot segments into another run": "x/../{victim}",
    "encoded traversal": "..%2F..%2Fadmin%2Fdanger",
    "a dot-dot segment": "..",
    "a header injection": "abc\r\nX-Evil: 1",
    "a fragment": "abc#frag",
    "over-long": "a" * 5000,
}


def forge_server_id(good: Path, out: Path, run: str, target: str, server_id: str) -> Path:
    """``good`` with the server id of its synced run or of its remote-only run set to ``server_id``."""

    def edit(m: dict) -> None:
        row = next(r for r in m["runs.jsonl"] if (r["id"] == run) == (target == "synced run"))
        row["server_id"] = server_id
        if target == "synced run":  # the sender "already delivered" the create: go straight to the steps
            next(e for e in m["events.jsonl"] if e["kind"] == "create_run")["state"] = "delivered"

    reforge(good, out, edit)
    return out


REMOTE, VICTIM = "5b7e0c1a-2222-4333-8444-555566667777", "6c8f1d2b-3333-4444-9555-666677778888"


@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory) -> tuple[Path, str]:
    return offline_box_bundle(tmp_path_factory.mktemp("good"), REMOTE)


@pytest.mark.parametrize("target", ["synced run", "remote-only run"])
@pytest.mark.parametrize("forged", sorted(FORGED_SERVER_IDS))
def test_a_forged_server_id_is_refused_and_imports_nothing(tmp_path, good_bundle, forged, target):
    good, run = good_bundle
    bad = forge_server_id(good, tmp_path / "forged.weco", run, target, FORGED_SERVER_IDS[forged].format(victim=VICTIM))
    with Journal(tmp_path / "b" / "journal.db") as b:
        before = journal_rows(b.path)
        with pytest.raises(bundle.BundleInvalid, match="refused, nothing imported: .* a malformed server id"):
            bundle.import_bundle(b, bad)
        assert journal_rows(b.path) == before


def test_forged_server_ids_never_reach_a_request_path(boxes, tmp_path, recording):  # noqa: F811
    """Issue 10 item 5, end to end: crafted bundles through the real `import` and `sync --bundle`
    against the emulator on loopback; the only requests it ever sees are the wire contract's."""
    emu = recording
    victim = emu.create_run({"victim.py": "secret = 1\n"}, "loss")
    remote = emu.create_run({"shared.py": "x = 1\n"}, "loss")
    good, run = offline_box_bundle(tmp_path, remote)
    b = boxes("b")
    b.ok("observe", "status")  # the journal exists, so "unchanged" compares every table
    before = journal_rows(b.journal)
    env = {**b.env, **emu.env()}
    refusals = []
    for i, (target, forged) in enumerate(
        [
            ("synced run", "../../admin/danger?x="),
            ("remote-only run", "{victim}/steps?x="),
            ("synced run", "x/../{victim}"),
        ]
    ):
        bad = forge_server_id(good, tmp_path / f"forged-{i}.weco", run, target, forged.format(victim=victim))
        refusals.append(b("observe", "import", str(bad)))
        refusals.append(b.cli("observe", "sync", "--bundle", str(bad), env=env))
    after_refusals = journal_rows(b.journal)
    genuine = b.cli("observe", "sync", "--bundle", str(good), env=env)  # for contrast

    assert illegitimate(emu, victim) == []
    assert list(emu.runs()[victim]["steps"]) == [0]
    for result in refusals:
        assert result.returncode == 2, result.stderr
        assert "refused, nothing imported" in result.stderr and "malformed server id" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert after_refusals == before
    assert genuine.returncode == 0, genuine.stderr
    posted = {path for _, path in emu.requests}
    assert "/v1/external/runs" in posted and f"/v1/external/runs/{remote}/steps" in posted


def test_a_bad_server_id_already_in_a_journal_is_never_requested(tmp_path, cli, recording):
    """Defence in depth: a journal that took a crafted server id before this release (0.1.0 let
    one in) still never sends it. Every step of that run is rejected locally; the rest is sent."""
    emu = recording
    path = tmp_path / "box" / "journal.db"
    with Journal(path) as j:
        bad = j.create_run(source_code={"a.py": "x = 1\n"}, metric="loss", name="crafted")
        j.log_step(bad, 1, metrics={"loss": 1.0})
        fine = j.create_run(source_code={"b.py": "y = 2\n"}, metric="loss", name="fine")
        j.log_step(fine, 1, metrics={"loss": 0.5})
        with j.write() as conn:  # what importing a crafted bundle under 0.1.0 left behind
            conn.execute("UPDATE runs SET server_id = '../../admin/danger?x=' WHERE id = ?", (bad,))
            conn.execute("UPDATE events SET state = 'delivered' WHERE run_id = ? AND kind = 'create_run'", (bad,))
    env = {"WECO_OBSERVE_DIR": str(path.parent), **emu.env()}
    result = cli("observe", "sync", env=env)
    assert [p for _, p in emu.requests if not (p == "/v1/external/runs" or UUID_PATH.match(p))] == []
    assert "Traceback" not in result.stderr
    assert result.returncode == 6, result.stderr  # rejected, and kept: see `status`
    with Journal(path) as j:
        states = {r["state"]: r["last_error"] for r in j.query("SELECT * FROM events WHERE run_id = ?", (bad,))}
        fine_states = {r["state"] for r in j.query("SELECT state FROM events WHERE run_id = ?", (fine,))}
    assert "not a valid server run id" in states["rejected"]
    assert fine_states == {"delivered"}


@pytest.mark.parametrize(
    "run_id", ["../x", "a/b", "", "a?b", "a#b", "a b", "..", ".", "é", "a" * 129, "x\r\nHost: evil", None, 7]
)
def test_steps_path_refuses_an_id_that_is_not_one_safe_segment(run_id):
    with pytest.raises(ApiRejected, match="not a valid server run id"):
        api.steps_path(run_id)


def test_steps_path_accepts_the_ids_servers_give():
    uuid = "5b7e0c1a-2222-4333-8444-555566667777"
    assert api.steps_path(uuid) == f"/external/runs/{uuid}/steps"
    assert api.steps_path("run_01.x-Y") == "/external/runs/run_01.x-Y/steps"
