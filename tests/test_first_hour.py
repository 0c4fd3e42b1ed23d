"""A new user's first hour (issue 10, items 12 and 13): what a newcomer typing from the guide runs into.

Each test drives the real parts: real journals, the CLI as a subprocess, the emulator as an HTTP server.
"""

from __future__ import annotations

import json
import warnings

import pytest

from emulator_fixtures import emulator  # noqa: F401
from weco_observe import WecoObserver, WecoObserveWarning
from weco_observe.errors import EXIT_REJECTED
from weco_observe.journal import Journal
from weco_observe.segments import SegmentWriter
from weco_observe.settings import Settings


def _typo(server_id: str) -> str:
    """``server_id`` with its last hex digit changed: one character off. Applied twice, it is off from
    both (0 -> 1 -> 2, anything else -> 0 -> 1), so a second typo never lands back on the real id."""
    return server_id[:-1] + {"0": "1", "1": "2"}.get(server_id[-1], "0")


def _notes(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("weco-observe: note:")]


# -- 12. a mistyped server run id ------------------------------------------------------------


@pytest.fixture
def synced_run(cli, emulator, tmp_path):
    """A run made with `init`, synced: ``(local id, server id)``."""
    (tmp_path / "train.py").write_text("x = 1\n")
    local = cli.ok("observe", "init", "--name", "sweep", "--metric", "loss", "--source", "train.py").stdout.strip()
    cli.ok("observe", "sync", env=emulator.env())
    server = emulator.runs().popitem()[0]
    return local, server


def test_log_to_a_server_id_never_seen_says_so_once_and_names_the_run_it_is_one_typo_from(cli, synced_run):
    local, server = synced_run
    typo = _typo(server)
    result = cli.ok("observe", "log", "--run-id", typo, "--step", "1", "--metrics", '{"loss": 1.0}')
    (note,) = _notes(result.stderr)
    assert typo in note and "never seen" in note and "remote-only" in note and "checks it only at sync" in note
    assert note.endswith(f"did you mean {server} (run {local} 'sweep')?")
    # the step is journaled all the same (logging never refuses), and the next log to it is quiet
    again = cli.ok("observe", "log", "--run-id", typo, "--step", "2", "--metrics", '{"loss": 0.9}')
    assert _notes(again.stderr) == []
    # the real server id and the local id are known: no note
    for ref in (server, local):
        assert _notes(cli.ok("observe", "log", "--run-id", ref, "--step", "3").stderr) == []
    # --quiet silences the progress line, not the note
    other = _typo(typo)
    quiet = cli.ok("observe", "log", "--run-id", other, "--step", "1", "--quiet")
    assert len(_notes(quiet.stderr)) == 1 and quiet.stderr.count("\n") == 1


def test_a_server_id_nothing_resembles_gets_the_note_without_a_guess(cli):
    result = cli.ok("observe", "log", "--run-id", "5b7e0c1a-2222-4333-8444-555566667777", "--step", "1")
    (note,) = _notes(result.stderr)
    assert "never seen" in note and "did you mean" not in note


def test_the_sdk_warns_the_same_way_at_the_callers_line(emulator, monkeypatch):
    for name, value in emulator.env().items():
        monkeypatch.setenv(name, value)
    with WecoObserver() as obs:
        made = obs.create_run(source_code={"a.py": "a"}, primary_metric="loss", name="mine")
        assert obs.flush(timeout=30)
        server = made.server_id
        typo = server[:-2] + server[-1] + server[-2]  # two neighbours swapped
        if typo == server:
            typo = _typo(server)
        run = obs.run(typo)
        with pytest.warns(WecoObserveWarning, match="never seen") as caught:
            first = run.log_step(1, metrics={"loss": 1.0})
        assert len(caught) == 1 and caught[0].filename == __file__
        assert f"did you mean {server} (run {made.run_id} 'mine')?" in str(caught[0].message)
        assert first is not None and first["run_first_seen"] is True
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert run.log_step(2)["run_first_seen"] is False
            assert made.log_step(1)["run_first_seen"] is False


def test_log_step_results_say_whether_the_run_was_first_seen_in_both_modes(journal_path, monkeypatch):
    server = "5b7e0c1a-2222-4333-8444-555566667777"
    with Journal(journal_path) as j:
        local = j.create_run(source_code={"a.py": "a"}, metric="loss")
        assert j.log_step(local, 1)["run_first_seen"] is False
        assert j.log_step(server, 1)["run_first_seen"] is True
        assert j.log_step(server, 2)["run_first_seen"] is False
    monkeypatch.setenv("WECO_OBSERVE_SHARED_FS", "1")  # cluster mode: the segment writer has the same key
    cluster = journal_path.parent / "cluster" / "journal.db"
    writer = SegmentWriter(cluster, settings=Settings.load())
    other = "6c8f1d2b-3333-4444-8555-666677778888"
    assert writer.log_step(other, 1)["run_first_seen"] is True
    assert writer.log_step(other, 2)["run_first_seen"] is False
    local = writer.create_run(source_code={"a.py": "a"}, metric="loss")
    assert writer.log_step(local, 1)["run_first_seen"] is False
    writer.close()


def test_cluster_mode_names_a_near_run_not_merged_yet(cli):
    shared = {"WECO_OBSERVE_SHARED_FS": "1"}
    server = "5b7e0c1a-2222-4333-8444-555566667777"
    assert len(_notes(cli.ok("observe", "log", "--run-id", server, "--step", "1", env=shared).stderr)) == 1
    result = cli.ok("observe", "log", "--run-id", _typo(server), "--step", "1", env=shared)
    (note,) = _notes(result.stderr)
    assert note.endswith(f"did you mean {server}?")  # a segment folder of a remote-only run, not merged yet


def _status(cli) -> dict:
    return json.loads(cli.ok("observe", "status", "--json").stdout)


def test_a_mistyped_run_rejected_at_sync_can_be_discarded_and_sync_exits_0_again(cli, emulator, synced_run):
    local, server = synced_run
    typo = _typo(server)
    for step in (1, 2, 3):
        cli.ok("observe", "log", "--run-id", typo, "--step", str(step), "--metrics", '{"loss": 1.0}')
    cli.ok("observe", "log", "--run-id", local, "--step", "1", "--metrics", '{"loss": 0.5}')
    result = cli("observe", "sync", env=emulator.env())
    assert result.returncode == EXIT_REJECTED, result.stderr
    assert cli("observe", "sync", env=emulator.env()).returncode == EXIT_REJECTED  # and again: no way out before
    text = cli.ok("observe", "status").stdout
    assert "not found" in text and "weco observe discard --rejected" in text

    gave_up = cli.ok("observe", "discard", "--rejected")
    lines = gave_up.stderr.splitlines()
    assert lines[0] == "discarded 3 rejected events (kept in the journal, marked discarded, never sent)"
    assert lines[1].endswith(f"(server id {typo}): 3")
    assert lines[-1] == "left: 0 pending, 0 rejected, 0 blocked"
    assert cli("observe", "sync", env=emulator.env()).returncode == 0
    # nothing deleted: the steps and their events are all still in the journal
    status = _status(cli)
    assert status["events"]["discarded"] == 3 and status["events"]["rejected"] == 0 and status["steps"] == 5
    assert "3 discarded" in cli.ok("observe", "status").stdout
    again = cli.ok("observe", "discard", "--rejected")
    assert again.stderr.splitlines()[0] == "nothing to discard: no rejected events"


def test_discard_takes_one_run_and_leaves_the_others_rejected(cli, emulator, synced_run):
    _, server = synced_run
    first, second = _typo(server), _typo(_typo(server))
    for ref in (first, second):
        cli.ok("observe", "log", "--run-id", ref, "--step", "1")
    assert cli("observe", "sync", env=emulator.env()).returncode == EXIT_REJECTED
    result = json.loads(cli.ok("observe", "discard", "--rejected", "--run-id", first, "--json").stdout)
    assert result["rejected"] == 1 and [r["server_id"] for r in result["runs"]] == [first]
    assert result["left"] == {"pending": 0, "rejected": 1, "blocked": 0}
    assert cli("observe", "sync", env=emulator.env()).returncode == EXIT_REJECTED
    cli.ok("observe", "discard", "--rejected", "--run-id", second)
    assert cli("observe", "sync", env=emulator.env()).returncode == 0


def test_discard_needs_to_be_told_what(cli):
    result = cli("observe", "discard")
    assert result.returncode == 2
    assert result.stderr == "error: say what to discard: `weco observe discard --rejected [--run-id ID]`\n"


def test_steps_behind_a_rejected_create_exit_6_not_4_and_discard_gives_up_the_whole_run(cli, emulator, tmp_path):
    """Steps behind a rejected create wait for the user, not the network: exit 6, never 4."""
    (tmp_path / "train.py").write_text("x = 1\n")
    good = cli.ok("observe", "init", "--name", "good", "--metric", "loss", "--source", "train.py").stdout.strip()
    bad = cli.ok("observe", "init", "--name", "bad", "--metric", "loss", "--source", "train.py").stdout.strip()
    for run in (good, bad):
        for step in (1, 2):
            cli.ok("observe", "log", "--run-id", run, "--step", str(step), "--metrics", '{"loss": 1.0}')
    emulator.reject = lambda path, body: "metric not allowed" if body.get("name") == "bad" else None
    result = cli("observe", "sync", "--json", env=emulator.env())
    summary = json.loads(result.stdout)
    assert result.returncode == EXIT_REJECTED, result.stderr
    assert (summary["pending"], summary["blocked"], summary["rejected_total"]) == (0, 2, 1)
    assert "blocked:        2 pending events of runs whose create was rejected" in cli.ok("observe", "status").stdout
    assert cli("observe", "sync", env=emulator.env()).returncode == EXIT_REJECTED

    gave_up = cli.ok("observe", "discard", "--rejected").stderr.splitlines()
    assert gave_up[0] == (
        "discarded 1 rejected event and 2 events waiting behind a discarded create"
        " (kept in the journal, marked discarded, never sent)"
    )
    assert cli("observe", "sync", env=emulator.env()).returncode == 0
    # a step logged later to the given-up run cannot be sent either: 6 again, and discard takes it too
    cli.ok("observe", "log", "--run-id", bad, "--step", "3")
    result = cli("observe", "sync", "--json", env=emulator.env())
    assert result.returncode == EXIT_REJECTED and json.loads(result.stdout)["blocked"] == 1
    assert "1 event waiting behind" in cli.ok("observe", "discard", "--rejected").stderr
    assert cli("observe", "sync", env=emulator.env()).returncode == 0
    assert [r["name"] for r in emulator.runs().values()] == ["good"]


def test_discard_leaves_pending_events_alone(cli, emulator, synced_run):
    local, server = synced_run
    cli.ok("observe", "log", "--run-id", _typo(server), "--step", "1")
    assert cli("observe", "sync", env=emulator.env()).returncode == EXIT_REJECTED
    cli.ok("observe", "log", "--run-id", local, "--step", "1", "--metrics", '{"loss": 0.5}')
    lines = cli.ok("observe", "discard", "--rejected").stderr.splitlines()
    assert lines[-1] == "left: 1 pending, 0 rejected, 0 blocked (`weco observe sync` sends what is pending)"
    assert cli("observe", "sync", env=emulator.env()).returncode == 0
    assert emulator.runs()[server]["steps"][1]["metrics"] == {"loss": 0.5}


# -- 13. the skill the guide's sentence asks for ------------------------------------------------------

GUIDE_SENTENCE = "Use the weco skill to monitor the experiments."

#: The official Weco skill's front matter as `weco setup claude-code` of the official client installs it
#: (WecoAI/weco-skill, SKILL.md), with a body of its own.
OFFICIAL_SKILL = (
    "---\nname: weco\ndescription: >-\n  Use Weco for ANY code optimization task. When the user wants to make"
    " code faster,\n  improve accuracy, reduce latency, lower cost, minimize memory usage, or optimize\n  any"
    " measurable metric - activate this skill.\n---\n\n# Weco AI Code Optimization\n\nUse `weco run` or"
    " `weco observe`.\n"
)


def _front_matter(path):
    yaml = pytest.importorskip("yaml")  # the parser agents' loaders resemble: the front matter must be YAML
    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_the_guides_sentence_leads_an_agent_to_our_skill(cli, tmp_path):
    result = cli.ok("observe", "setup", "claude-code")
    path = tmp_path / "home" / ".claude" / "skills" / "weco" / "SKILL.md"
    assert result.stderr == f"installed {path}\n"
    meta = _front_matter(path)
    # an agent picks a skill by its name and description: "the weco skill" is the name, and the
    # description says what the sentence asks for, in its words
    assert meta["name"] == "weco" == path.parent.name  # the Agent Skills format: the name is the folder's
    assert "weco skill" in GUIDE_SENTENCE and "monitor the experiments" in GUIDE_SENTENCE
    assert "monitor the experiments" in meta["description"] and "weco observe" in meta["description"]
    assert len(meta["description"]) <= 1024 and len(meta["name"]) <= 64  # the format's limits


def test_an_official_weco_skill_is_never_overwritten_ours_goes_beside_it(cli, tmp_path):
    skills = tmp_path / "home" / ".claude" / "skills"
    official = skills / "weco" / "SKILL.md"
    official.parent.mkdir(parents=True)
    official.write_text(OFFICIAL_SKILL)
    (official.parent / "references").mkdir()
    (official.parent / "references" / "monitor.md").write_text("weco run status\n")
    ours = skills / "weco-observe" / "SKILL.md"
    for args in ((), ("--force",)):  # not even --force replaces it
        result = cli.ok("observe", "setup", "claude-code", *args)
        assert official.read_text() == OFFICIAL_SKILL
        assert (official.parent / "references" / "monitor.md").read_text() == "weco run status\n"
        lines = result.stderr.splitlines()
        assert lines[0] in (f"installed {ours}", f"unchanged {ours}")
        assert lines[1].startswith(f"note: the official Weco skill is installed at {official}: left as it is;")
        meta = _front_matter(ours)
        assert meta["name"] == "weco-observe" == ours.parent.name
        assert "monitor the experiments" in meta["description"].lower()


def test_our_skill_moves_to_the_guides_name_and_leaves_no_second_copy(cli, tmp_path):
    skills = tmp_path / "home" / ".cursor" / "skills"
    old = skills / "weco-observe" / "SKILL.md"
    cli.ok("observe", "setup", "cursor")
    old.parent.mkdir(parents=True, exist_ok=True)  # what an earlier release installed
    old.write_text(
        "---\nname: weco-observe\ndescription: old\n---\n<!-- written by `weco observe setup`;"
        " rerun it to update this file -->\nold\n"
    )
    result = cli.ok("observe", "setup", "cursor")
    assert result.stderr.splitlines() == [
        f"unchanged {skills / 'weco' / 'SKILL.md'}",
        f"note: removed our older copy at {old}",
    ]
    assert not old.parent.exists()


def test_a_skill_of_someone_elses_is_replaced_only_with_force(cli, tmp_path):
    path = tmp_path / "home" / ".agents" / "skills" / "weco" / "SKILL.md"
    path.parent.mkdir(parents=True)
    path.write_text("---\nname: weco\ndescription: my notes on the weather\n---\nmine\n")
    result = cli("observe", "setup", "codex")
    assert result.returncode == 2 and "was not written by weco observe" in result.stderr
    assert path.read_text().endswith("mine\n")
    assert cli.ok("observe", "setup", "codex", "--force").stderr == f"updated {path}\n"
    assert _front_matter(path)["name"] == "weco"


# -- 13. doctor's wording ----------------------------------------------------------------------


def _damaged_journal(journal_path) -> None:
    """A journal of one run (one code blob) whose header miscounts its free pages: integrity_check reports it
    (on two lines, "*** in database main ***" first), while every row still reads."""
    with Journal(journal_path) as j:
        run = j.create_run(source_code={"train.py": "x = 1\n"}, metric="loss")
        j.log_step(run, 1, metrics={"loss": 1.0})
    data = bytearray(journal_path.read_bytes())
    data[36:40] = (7).to_bytes(4, "big")  # the header's count of freelist pages
    journal_path.write_bytes(bytes(data))


def test_doctor_prints_one_line_per_finding_even_quoting_sqlites_report(cli, journal_path):
    _damaged_journal(journal_path)
    result = cli("observe", "doctor")
    assert result.returncode == 7, result.stderr
    lines = result.stdout.splitlines()
    assert any("*** in database main ***;" in line for line in lines)  # SQLite's report, on one line
    for line in lines:
        assert line.split()[0] in ("ok", "warn", "error"), f"a finding spilt over lines: {line!r}"


def test_doctor_says_1_run_and_1_code_blob(cli, journal_path, tmp_path):
    (tmp_path / "train.py").write_text("x = 1\n")
    cli.ok("observe", "init", "--metric", "loss", "--source", "train.py")
    assert "ok    code         1 code blob, all readable" in cli.ok("observe", "doctor").stdout
    journal_path.unlink()
    for extra in ("-wal", "-shm"):
        journal_path.with_name(journal_path.name + extra).unlink(missing_ok=True)
    _damaged_journal(journal_path)
    repaired = cli.ok("observe", "doctor", "--repair").stdout
    assert "now holds 1 run, 2 steps, 2 events, 1 code blob (" in repaired, repaired


def test_every_commands_summary_is_one_line():
    """The summary in `--help`'s command list is the docstring's first paragraph: one line, or the list breaks."""
    import typer

    from weco_observe import cli as cli_module

    def walk(command, path):
        yield path, command
        for name in getattr(command, "list_commands", lambda ctx: [])(None):
            yield from walk(command.get_command(None, name), f"{path} {name}")

    for path, command in walk(typer.main.get_command(cli_module.app), "weco"):
        summary = (command.help or "").strip().split("\n\n")[0]
        assert "\n" not in summary, f"`{path}`: {summary!r}"


# -- 13. the SDK's messages name its keyword arguments, the CLI's its flags -------------------

SDK_BAD_STEPS = {
    "metrics": (dict(step=1, metrics="fast"), "metrics must be a JSON object"),
    "metric value": (dict(step=1, metrics={"loss": "low"}), "metrics: metric 'loss' must be a number"),
    "step": (dict(step=-1), "step must be 0 or more"),
    "status": (dict(step=1, status="kept"), "unknown status 'kept'"),
    "parent below": (dict(step=2, parent_step=2), "parent_step 2 must be lower than step 2"),
    "parent missing": (dict(step=5, parent_step=4), "parent step 4: run "),
    "code": (dict(step=1, code={}), "code must be a non-empty dict"),
    "metadata": (dict(step=1, metadata={"f": object()}), "metadata must be JSON-serialisable"),
    "description": (dict(step=1, description=3), "description must be a string"),
}


@pytest.mark.parametrize("case", sorted(SDK_BAD_STEPS))
def test_the_sdks_warnings_name_its_keyword_arguments(journal_path, case):
    kwargs, expected = SDK_BAD_STEPS[case]
    with WecoObserver() as obs:
        run = obs.create_run(source_code={"a.py": "a"}, primary_metric="loss")
        with pytest.warns(WecoObserveWarning) as caught:
            assert run.log_step(**kwargs) is None
    (message,) = [str(w.message) for w in caught]
    assert expected in message and "--" not in message, message


def test_create_run_names_primary_metric(journal_path):
    with WecoObserver() as obs, pytest.warns(WecoObserveWarning) as caught:
        assert not obs.create_run(source_code={"a.py": "a"}, primary_metric="")
    message = str(caught[0].message)
    assert "primary_metric must name the primary metric, e.g. primary_metric='val_bpb'" in message, message


def test_the_cli_still_names_its_flags(cli, tmp_path):
    (tmp_path / "a.py").write_text("a = 1\n")
    run = cli.ok("observe", "init", "--metric", "loss", "--source", "a.py").stdout.strip()
    result = cli("observe", "log", "--run-id", run, "--step", "1", "--metrics", "[1]")
    assert result.returncode == 2 and result.stderr.startswith("error: --metrics must be a JSON object")
    result = cli("observe", "log", "--run-id", run, "--step", "2", "--parent-step", "2")
    assert result.returncode == 2 and "--parent-step 2 must be lower than --step 2" in result.stderr


# -- 13. a step without the run's primary metric ------------------------------------------------


def test_log_without_the_primary_metric_is_journaled_with_a_note(cli, tmp_path, journal_path):
    (tmp_path / "train.py").write_text("x = 1\n")
    run = cli.ok("observe", "init", "--metric", "val_bpb", "--source", "train.py").stdout.strip()

    def log(*args: str) -> list[str]:
        return _notes(cli.ok("observe", "log", "--run-id", run, *args).stderr)

    assert log("--step", "1", "--metrics", '{"val_bpb": 2.3, "memory_gb": 11}') == []
    assert log("--step", "2", "--metrics", '{"memory_gb": 11}') == [
        "weco-observe: note: step 2: --metrics lack the run's primary metric 'val_bpb'"
        " (the dashboard ranks steps by it); given: memory_gb"
    ]
    # logged again: the new metrics replace the old ones, so the step loses its rank
    (relog,) = log("--step", "1", "--metrics", '{"VAL_BPB": 2.3}')
    assert relog.endswith("given: VAL_BPB (did you mean 'val_bpb' for 'VAL_BPB'?)")
    # a failed step need not have it; no metrics, or none at all, say nothing either
    assert log("--step", "3", "--status", "failed", "--metrics", '{"memory_gb": 80}') == []
    assert log("--step", "4", "--metrics", "{}") == []
    assert log("--step", "5", "--description", "no metrics yet") == []
    with Journal(journal_path) as j:
        steps = {s["step"]: s["metrics"] for s in j.steps(j.require_run(run)["id"])}
    assert steps[1] == {"VAL_BPB": 2.3} and steps[2] == {"memory_gb": 11}  # journaled as given


def test_a_remote_only_runs_metric_is_unknown_so_no_metric_note(cli):
    server = "5b7e0c1a-2222-4333-8444-555566667777"
    cli.ok("observe", "log", "--run-id", server, "--step", "1", "--metrics", '{"x": 1}')
    assert _notes(cli.ok("observe", "log", "--run-id", server, "--step", "2", "--metrics", '{"x": 1}').stderr) == []


def test_the_sdk_warns_about_a_missing_primary_metric(journal_path):
    with WecoObserver() as obs:
        run = obs.create_run(source_code={"a.py": "a"}, primary_metric="val_bpb")
        with pytest.warns(WecoObserveWarning, match="metrics lack the run's primary metric 'val_bpb'") as caught:
            stored = run.log_step(1, metrics={"memory_gb": 1.0})
        assert stored is not None and caught[0].filename == __file__
        assert "--metrics" not in str(caught[0].message)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run.log_step(2, metrics={"val_bpb": 2.0})
            run.log_step(3, status="failed", metrics={"memory_gb": 80.0})
            obs.run(run.run_id).log_step(4, metrics={"val_bpb": 1.9})  # an opened run knows its metric too
        with pytest.warns(WecoObserveWarning, match="primary metric"):
            obs.run(run.run_id).log_step(5, metrics={"memory_gb": 2.0})


# -- 13. the emulator's dashboard links ---------------------------------------------------------


def test_the_dashboard_link_sync_prints_for_the_emulator_opens_a_page_of_the_run(cli, emulator, tmp_path):
    import re

    import httpx

    (tmp_path / "train.py").write_text("x = 1\n")
    run = cli.ok("observe", "init", "--name", "<sweep>", "--metric", "loss", "--source", "train.py").stdout.strip()
    cli.ok("observe", "log", "--run-id", run, "--step", "1", "--metrics", '{"loss": 0.25}', "--description", "a&b")
    synced = cli.ok("observe", "sync", env=emulator.env())
    (link,) = re.findall(r"https?://\S+/runs/\S+", synced.stdout + synced.stderr)
    assert link.startswith(emulator.env()["WECO_DASHBOARD_URL"])
    page = httpx.get(link, timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "&lt;sweep&gt;" in page.text and "<sweep>" not in page.text  # the run's own text is escaped
    assert "<td>1</td><td>0</td><td>completed</td>" in page.text and "a&amp;b" in page.text
    assert httpx.get(link.rsplit("/", 1)[0] + "/no-such-run", timeout=10).status_code == 404
