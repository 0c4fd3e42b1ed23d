"""Box A (never online) -> bundle -> box B -> sync, against the Weco API emulator on loopback.

The yardstick is a direct sync: a twin of box A's journal (a file copy) synced
straight to a second emulator must leave the same server state.
"""

from __future__ import annotations

import json
import shutil

from emulator_fixtures import LOCAL_ID_KEY, assert_server_matches_journal, emulator  # noqa: F401
from test_bundle import Box, boxes, offline_work  # noqa: F401

from weco_observe.emulator import Emulator


def server_state(emu: Emulator) -> dict:
    """The emulator's runs keyed by local id, without server ids, timestamps or post counts."""
    out = {}
    for run in emu.runs().values():
        local = (run.get("metadata") or {}).get(LOCAL_ID_KEY)
        steps = {n: {k: v for k, v in s.items() if k not in ("posts", "updated_at")} for n, s in run["steps"].items()}
        out[local] = {
            **{k: run[k] for k in ("name", "metric_name", "maximize", "additional_instructions", "metadata")},
            "steps": steps,
        }
    return out


def sync(box: Box, emu: Emulator) -> dict:
    result = box.cli("observe", "sync", "--json", env={**box.env, **emu.env()})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_offline_box_via_bundle_gives_the_same_server_state_as_a_direct_sync(boxes, tmp_path, emulator):
    a, b = boxes("a"), boxes("b")
    offline_work(a)
    second = a.init("second run")
    a.log(second, 1, "--metrics", '{"loss": 0.9}', "--source", a.code("second = True\n"))
    twin = boxes("twin")
    shutil.copytree(a.dir, twin.dir)

    a.ok("observe", "bundle", "-o", str(tmp_path / "a.weco"))
    b.ok("observe", "import", str(tmp_path / "a.weco"))
    sync(b, emulator)
    assert_server_matches_journal(emulator, b.journal)

    with Emulator() as direct:
        sync(twin, direct)
        assert server_state(emulator) == server_state(direct)
    assert len(server_state(emulator)) == 2


def test_a_later_bundle_sends_only_its_new_steps_to_the_same_server_run(boxes, tmp_path, emulator):
    a, b = boxes("a"), boxes("b")
    run = a.init()
    a.log(run, 1, "--metrics", '{"loss": 1.0}')
    a.log(run, 2, "--metrics", '{"loss": 0.8}')
    a.ok("observe", "bundle", "-o", str(tmp_path / "1.weco"))
    b.ok("observe", "import", str(tmp_path / "1.weco"))
    sync(b, emulator)
    (server_id,) = emulator.runs()
    posted = emulator.stats()["steps_posted"]

    a.log(run, 3, "--metrics", '{"loss": 0.5}', "--source", a.code("lr = 0.5\n"))
    a.log(run, 4, "--status", "failed", "--metrics", '{"loss": 7.0}')
    a.ok("observe", "bundle", "-o", str(tmp_path / "2.weco"))
    b.ok("observe", "import", str(tmp_path / "2.weco"))
    sync(b, emulator)
    assert list(emulator.runs()) == [server_id]  # no second create
    assert emulator.stats()["created_runs"] == 1
    assert emulator.stats()["steps_posted"] - posted == 2  # steps 3 and 4, nothing again
    assert sorted(emulator.runs()[server_id]["steps"]) == [0, 1, 2, 3, 4]
    assert_server_matches_journal(emulator, b.journal)

    # The same bundles again, or an --all bundle overlapping both, send nothing.
    requests = emulator.stats()["requests"]
    a.ok("observe", "bundle", "--all", "-o", str(tmp_path / "all.weco"))
    for name in ("1.weco", "2.weco", "all.weco"):
        b.ok("observe", "import", str(tmp_path / name))
    sync(b, emulator)
    assert emulator.stats()["requests"] == requests


def test_a_box_that_synced_before_going_offline_keeps_its_server_run(boxes, tmp_path, emulator):
    a, b = boxes("a"), boxes("b")
    run = a.init()
    a.log(run, 1, "--metrics", '{"loss": 1.0}')
    sync(a, emulator)  # box A had network once
    (server_id,) = emulator.runs()
    posted = emulator.stats()["steps_posted"]

    a.log(run, 2, "--metrics", '{"loss": 0.7}')  # ... then lost it
    a.ok("observe", "bundle", "--all", "-o", str(tmp_path / "a.weco"))
    summary = json.loads(b.ok("observe", "import", str(tmp_path / "a.weco"), "--json").stdout)
    assert summary["events_pending"] == 1  # the create and step 1 are already on the server
    sync(b, emulator)
    assert list(emulator.runs()) == [server_id]
    assert emulator.stats()["steps_posted"] - posted == 1
    assert sorted(emulator.runs()[server_id]["steps"]) == [0, 1, 2]
    assert_server_matches_journal(emulator, b.journal)


def test_two_offline_boxes_merge_on_one_syncing_box(boxes, tmp_path, emulator):
    a, c, b = boxes("a"), boxes("c"), boxes("b")
    runs = []
    for box in (a, c):
        run = box.init(f"from {box.dir.name}")
        box.log(run, 1, "--metrics", '{"loss": 1.0}')
        box.ok("observe", "bundle", "-o", str(tmp_path / f"{box.dir.name}.weco"))
        runs.append(run)
    for name in ("a.weco", "c.weco"):
        b.ok("observe", "import", str(tmp_path / name))
    sync(b, emulator)
    assert set(server_state(emulator)) == set(runs)
    assert_server_matches_journal(emulator, b.journal)


def test_a_box_that_imported_but_never_synced_adopts_the_senders_server_run(boxes, tmp_path, emulator):
    a, b = boxes("a"), boxes("b")
    run = a.init()
    a.log(run, 1, "--metrics", '{"loss": 1.0}')
    a.ok("observe", "bundle", "-o", str(tmp_path / "1.weco"))
    b.ok("observe", "import", str(tmp_path / "1.weco"))  # B holds it, pending, but does not sync yet
    sync(a, emulator)  # meanwhile A reached the network and synced the run itself
    (server_id,) = emulator.runs()
    requests = emulator.stats()["requests"]

    a.log(run, 2, "--metrics", '{"loss": 0.5}')
    a.ok("observe", "bundle", "--all", "-o", str(tmp_path / "all.weco"))
    summary = json.loads(b.ok("observe", "import", str(tmp_path / "all.weco"), "--json").stdout)
    assert summary["server_ids_adopted"] == 1 and summary["events_pending"] == 1
    assert b.event_states() == {"delivered": 2, "pending": 1}  # create and step 1 were settled by A
    sync(b, emulator)
    assert list(emulator.runs()) == [server_id]
    assert emulator.stats()["requests"] - requests == 1  # step 2 only
    assert_server_matches_journal(emulator, b.journal)


def test_a_run_synced_from_both_sides_is_reported_not_merged(boxes, tmp_path, emulator):
    a, b = boxes("a"), boxes("b")
    run = a.init()
    a.ok("observe", "bundle", "-o", str(tmp_path / "1.weco"))
    b.ok("observe", "import", str(tmp_path / "1.weco"))
    sync(b, emulator)
    sync(a, emulator)  # the same run created twice: what "sync each run from one place" warns about
    b_server = next(r["server_id"] for r in b_runs(b) if r["id"] == run)
    a.log(run, 1, "--metrics", '{"loss": 0.4}')
    a.ok("observe", "bundle", "-o", str(tmp_path / "2.weco"))
    out = b.ok("observe", "import", str(tmp_path / "2.weco")).stdout
    assert "warning: run" in out and f"new steps go to {b_server}" in out
    sync(b, emulator)
    assert 1 in emulator.runs()[b_server]["steps"]


def b_runs(box: Box) -> list[dict]:
    from weco_observe.journal import Journal

    with Journal(box.journal) as j:
        return [dict(r) for r in j.query("SELECT id, server_id FROM runs")]


def test_sync_bundle_imports_then_sends_and_refuses_a_damaged_file(boxes, tmp_path, emulator):
    a, b = boxes("a"), boxes("b")
    run = offline_work(a)
    a.ok("observe", "bundle", "-o", str(tmp_path / "1.weco"))
    data = (tmp_path / "1.weco").read_bytes()
    (tmp_path / "cut.weco").write_bytes(data[: len(data) // 2])

    refused = b.cli("observe", "sync", "--bundle", str(tmp_path / "cut.weco"), env={**b.env, **emulator.env()})
    assert refused.returncode == 2 and "refused, nothing imported" in refused.stderr
    assert emulator.stats().get("requests", 0) == 0 and b.state()["events"] == {}

    b.cli.ok("observe", "sync", "--bundle", str(tmp_path / "1.weco"), env={**b.env, **emulator.env()})
    assert_server_matches_journal(emulator, b.journal)
    (server_id,) = emulator.runs()

    a.log(run, 4, "--metrics", '{"loss": 1.1}')
    a.ok("observe", "bundle", "-o", str(tmp_path / "2.weco"))
    posted = emulator.stats()["steps_posted"]
    b.cli.ok(
        "observe",
        "sync",
        "--bundle",
        str(tmp_path / "1.weco"),
        "--bundle",
        str(tmp_path / "2.weco"),
        env={**b.env, **emulator.env()},
    )
    assert list(emulator.runs()) == [server_id] and emulator.stats()["steps_posted"] - posted == 1
    assert_server_matches_journal(emulator, b.journal)
