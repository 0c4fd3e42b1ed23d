"""The local views through the real CLI: runs, show, diff, export (text and JSON).

Journals are built with the CLI itself (``init``/``log``) or the SDK; sync
states are set with the journal's own outbox methods, as the syncer would.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest

from weco_observe import outbox
from weco_observe import WecoObserver, WecoObserveWarning
from weco_observe.journal import Journal


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


@pytest.fixture(scope="module")
def guide_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The guide's example, built once through the CLI: steps 0-2 kept, 3 failed, 4 branched from 2."""
    from conftest import CLI

    root = tmp_path_factory.mktemp("guide")
    env = {"WECO_OBSERVE_DIR": str(root / "data"), "HOME": str(root), "WECO_OBSERVE_AUTO_SYNC": "0"}
    cli = CLI(root)
    src = root / "train.py"
    _write(src, "lr = 0.1\nbatch = 16\ndepth = 4\n")
    run_id = cli.ok(
        "observe",
        "init",
        "--name",
        "my-experiment",
        "--metric",
        "val_bpb",
        "--goal",
        "min",
        "--source",
        "train.py",
        env=env,
    ).stdout.strip()

    def log(step: int, metrics: dict, description: str, *extra: str) -> None:
        cli.ok(
            "observe",
            "log",
            "--run-id",
            run_id,
            "--step",
            str(step),
            "--description",
            description,
            "--metrics",
            json.dumps(metrics),
            *extra,
            env=env,
        )

    log(0, {"val_bpb": 2.366, "memory_gb": 0.0}, "baseline", "--source", "train.py")
    _write(src, "lr = 0.1\nbatch = 32768\ndepth = 4\n")
    log(1, {"val_bpb": 2.261, "memory_gb": 0.0}, "increase batch size to 32K", "--source", "train.py")
    _write(src, "lr = 0.05\nbatch = 32768\ndepth = 4\n")
    log(2, {"val_bpb": 2.2, "memory_gb": 1.5}, "halve the learning rate", "--source", "train.py")
    _write(src, "lr = 0.05\nbatch = 32768\ndepth = 8\n")
    log(3, {"val_bpb": 0.0, "memory_gb": 0.0}, "double model depth (OOM)", "--status", "failed", "--source", "train.py")
    _write(src, "lr = 0.05\nbatch = 32768\ndepth = 4\nwarmup = 100\n")
    log(4, {"val_bpb": 2.1, "memory_gb": 1.5}, "tried warmup instead", "--parent-step", "2", "--source", "train.py")
    return root, run_id


@pytest.fixture
def guide_run(guide_template: tuple[Path, str], isolated_env: Path, tmp_path: Path) -> str:
    """A private copy of the guide's journal for this test (so tests may change it)."""
    root, run_id = guide_template
    shutil.copytree(root / "data", isolated_env)
    shutil.copy(root / "train.py", tmp_path / "train.py")
    return run_id


def test_show_draws_the_guide_tree(cli, guide_run):
    out = cli.ok("observe", "show", guide_run).stdout
    lines = out.splitlines()
    tree = [line for line in lines if line.startswith(("[Baseline", "+--"))]
    assert [t.split("  ")[0] for t in tree] == [
        "[Baseline (step 0)]",
        "+-- Step 1 (kept)",
        "+-- Step 2 (kept)",
        "+-- Step 3 (failed)",
        "+-- Step 4 (kept, branched from 2)",
    ]
    assert tree[4].endswith("<- best")
    assert "val_bpb 2.1" in tree[4] and "tried warmup instead" in tree[4]
    assert "my-experiment" in lines[0]
    assert "best: step 4, val_bpb 2.1 (11.2% better than baseline 2.366, -0.266)" in out
    assert "\x1b[" not in out  # not a terminal: no colour


def test_show_json_for_agents(cli, guide_run):
    doc = json.loads(cli.ok("observe", "show", guide_run, "--json").stdout)
    steps = {s["step"]: s for s in doc["steps"]}
    assert [s["step"] for s in doc["steps"]] == [0, 1, 2, 3, 4]
    assert {n: s["parent_step"] for n, s in steps.items()} == {0: None, 1: 0, 2: 1, 3: 2, 4: 2}
    assert [n for n, s in steps.items() if s["is_best"]] == [4]
    assert steps[3]["status"] == "failed" and steps[3]["value"] == 0.0 and not steps[3]["is_best"]
    assert steps[4]["branched_from"] == 2 and steps[3]["branched_from"] is None
    assert {s["sync"] for s in doc["steps"]} == {"pending"}
    assert steps[1]["metrics"] == {"val_bpb": 2.261, "memory_gb": 0.0}
    assert steps[4]["changed"] == ["train.py"] and steps[4]["has_code"]
    assert doc["best"]["step"] == 4 and doc["best"]["value"] == 2.1
    imp = doc["best"]["improvement"]
    assert imp["baseline"] == 2.366 and imp["percent"] == pytest.approx(11.2426, abs=1e-3)
    assert doc["run"]["metric"] == "val_bpb" and doc["run"]["goal"] == "minimize"
    assert doc["run"]["pending"] == 6 and doc["run"]["sync"] == "pending"
    assert doc["metrics"] == ["val_bpb", "memory_gb"]
    assert [s["best_so_far"] for s in doc["steps"]] == [2.366, 2.261, 2.2, 2.2, 2.1]


def test_runs_lists_every_run(cli, guide_run, tmp_path):
    _write(tmp_path / "model.py", "k = 1\n")
    other = cli.ok("observe", "init", "--metric", "accuracy", "--goal", "max", "--source", "model.py").stdout.strip()
    cli.ok("observe", "log", "--run-id", other, "--step", "1", "--metrics", '{"accuracy": 0.91}')
    cli.ok("observe", "log", "--run-id", other, "--step", "2", "--metrics", '{"accuracy": 0.97}', "--status", "failed")
    cli.ok("observe", "log", "--run-id", other, "--step", "3", "--metrics", '{"accuracy": 0.93}')

    runs = json.loads(cli.ok("observe", "runs", "--json").stdout)
    assert [r["id"] for r in runs] == [other, guide_run]  # most recent activity first
    by_id = {r["id"]: r for r in runs}
    g, o = by_id[guide_run], by_id[other]
    assert (g["name"], g["metric"], g["goal"], g["steps"], g["best_step"], g["best_value"]) == (
        "my-experiment",
        "val_bpb",
        "minimize",
        5,
        4,
        2.1,
    )
    assert (g["pending"], g["rejected"], g["server_id"]) == (6, 0, None)
    # maximize; the failed step's higher value is never best
    assert (o["goal"], o["steps"], o["best_step"], o["best_value"], o["baseline_value"]) == (
        "maximize",
        4,
        3,
        0.93,
        None,
    )
    assert o["last_activity"].endswith("Z")

    table = cli.ok("observe", "runs").stdout.splitlines()
    assert table[0].split()[:5] == ["RUN", "SERVER", "NAME", "METRIC", "STEPS"]
    row = next(line for line in table if line.startswith(guide_run))
    assert "my-experiment" in row and "val_bpb (min)" in row and "2.1 @4" in row and "6 pending" in row
    row = next(line for line in table if line.startswith(other))
    assert "accuracy (max)" in row and "0.93 @3" in row


def test_runs_on_an_empty_journal(cli):
    assert "no runs yet" in cli.ok("observe", "runs").stdout
    assert json.loads(cli.ok("observe", "runs", "--json").stdout) == []


def test_run_found_by_prefix_and_by_server_id(cli, guide_run, journal_path):
    prefix = guide_run[:12]
    assert json.loads(cli.ok("observe", "show", prefix, "--json").stdout)["run"]["id"] == guide_run
    server_id = "3f2a9c1e-0000-4000-8000-00000000abcd"
    with Journal(journal_path) as journal:
        create = journal.query("SELECT id FROM events WHERE run_id = ? AND kind = 'create_run'", (guide_run,))[0]["id"]
        outbox.create_delivered(journal, create, guide_run, server_id)
        step1, seq1 = journal.query(
            "SELECT e.id, e.seq FROM steps s JOIN events e ON e.id = s.event_id WHERE s.run_id = ? AND s.step = 1",
            (guide_run,),
        )[0]
        outbox.steps_delivered(journal, [(step1, guide_run, 1, seq1, 1, 0)])
        step3 = journal.query("SELECT event_id FROM steps WHERE run_id = ? AND step = 3", (guide_run,))[0][0]
        outbox.rejected(journal, step3, "422: metrics rejected")
    doc = json.loads(cli.ok("observe", "show", server_id[:8], "--json").stdout)
    assert doc["run"]["server_id"] == server_id
    steps = {s["step"]: s for s in doc["steps"]}
    assert steps[1]["sync"] == "delivered" and steps[3]["sync"] == "rejected"
    assert steps[3]["sync_error"] == "422: metrics rejected"
    assert doc["run"]["rejected"] == 1 and doc["run"]["sync"] == "rejected"
    text = cli.ok("observe", "show", server_id).stdout
    assert f"server {server_id}" in text and "1 rejected" in text and "[rejected]" in text


def test_unknown_and_ambiguous_runs_are_one_line_errors(cli, guide_run, tmp_path):
    result = cli("observe", "show", "nope")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: no run 'nope'") and result.stderr.count("\n") == 1
    cli.ok("observe", "init", "--metric", "m", "--source", "train.py")
    result = cli("observe", "show", "local-")
    assert result.returncode == 2 and "matches several runs" in result.stderr


def test_diff_against_parent_and_other_steps(cli, guide_run):
    out = cli.ok("observe", "diff", guide_run, "4").stdout
    assert out.splitlines() == [
        "--- step2/train.py",
        "+++ step4/train.py",
        "@@ -1,3 +1,4 @@",
        " lr = 0.05",
        " batch = 32768",
        " depth = 4",
        "+warmup = 100",
    ]
    out = cli.ok("observe", "diff", guide_run, "2", "--against", "0").stdout
    assert "-lr = 0.1" in out and "+lr = 0.05" in out and "-batch = 16" in out and "+batch = 32768" in out
    coloured = cli.ok("observe", "diff", guide_run, "4", "--color", "always").stdout
    assert "\x1b[32m+warmup = 100\x1b[0m" in coloured
    result = cli("observe", "diff", guide_run, "0")
    assert result.returncode == 2 and "pass --against" in result.stderr
    result = cli("observe", "diff", guide_run, "9")
    assert result.returncode == 2 and "has no step 9" in result.stderr


def test_a_step_without_code_uses_its_ancestors(cli, tmp_path):
    _write(tmp_path / "a.py", "x = 1\n")
    run_id = cli.ok("observe", "init", "--metric", "loss", "--source", "a.py").stdout.strip()
    cli.ok("observe", "log", "--run-id", run_id, "--step", "1", "--metrics", '{"loss": 1}')  # no --source
    _write(tmp_path / "a.py", "x = 2\n")
    _write(tmp_path / "b.py", "new file\n")
    cli.ok("observe", "log", "--run-id", run_id, "--step", "2", "--sources", "a.py", "b.py")
    assert "no code changes between step 0 and step 1" in cli.ok("observe", "diff", run_id, "1").stdout
    out = cli.ok("observe", "diff", run_id, "2").stdout
    assert "--- step1/a.py\n+++ step2/a.py\n@@ -1 +1 @@\n-x = 1\n+x = 2\n" in out
    assert "--- /dev/null\n+++ step2/b.py\n@@ -0,0 +1 @@\n+new file\n" in out
    steps = json.loads(cli.ok("observe", "show", run_id, "--json").stdout)["steps"]
    assert [(s["code_step"], s["changed"]) for s in steps] == [(0, ["a.py"]), (0, []), (2, ["a.py", "b.py"])]


def test_export_formats(cli, guide_run, tmp_path):
    doc = json.loads(cli.ok("observe", "export", guide_run, "--format", "json").stdout)
    assert doc["run"]["id"] == guide_run
    assert [(s["step"], s["parent_step"], s["status"]) for s in doc["steps"]] == [
        (0, None, "completed"),
        (1, 0, "completed"),
        (2, 1, "completed"),
        (3, 2, "failed"),
        (4, 2, "completed"),
    ]
    assert "code" not in doc["steps"][0]

    lines = cli.ok("observe", "export", guide_run, "-f", "jsonl", "--code").stdout.splitlines()
    records = [json.loads(line) for line in lines]
    assert records[0]["type"] == "run" and [r["type"] for r in records[1:]] == ["step"] * 5
    assert records[5]["code"] == {"train.py": "lr = 0.05\nbatch = 32768\ndepth = 4\nwarmup = 100\n"}
    assert records[5]["is_best"] is True and records[5]["metrics"]["val_bpb"] == 2.1

    out = tmp_path / "steps.csv"
    result = cli.ok("observe", "export", guide_run, "-f", "csv", "-o", str(out))
    assert "wrote 5 steps" in result.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["step"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert rows[4]["parent_step"] == "2" and rows[4]["metric:val_bpb"] == "2.1" and rows[4]["is_best"] == "True"
    assert rows[0]["metric:memory_gb"] == "0.0" and rows[0]["parent_step"] == ""
    result = cli("observe", "export", guide_run, "-f", "xml")
    assert result.returncode == 2 and "unknown --format 'xml'" in result.stderr


def test_best_step_rules(tmp_path):
    """Ties go to the earliest step; a failed step is never best; steps without the metric are skipped."""
    from weco_observe import views

    with WecoObserver(journal_path=tmp_path / "j.db") as obs:
        run = obs.create_run(source_code={"a.py": "x\n"}, primary_metric="score", maximize=True)
        run.log_step(1, metrics={"score": 5})
        run.log_step(2, metrics={"score": 9}, status="failed")
        with pytest.warns(WecoObserveWarning, match="lack the run's primary metric 'score'"):
            run.log_step(3, metrics={"other": 100})
        run.log_step(4, metrics={"score": 5})
        run.log_step(5, metrics={"score": 4.5})
        dotted = obs.create_run(source_code={"a.py": "x\n"}, primary_metric="val.loss (avg)")
        dotted.log_step(0, metrics={"val.loss (avg)": 3.0})
        dotted.log_step(1, metrics={"val.loss (avg)": 2.0})
        empty = obs.create_run(source_code={"a.py": "x\n"}, primary_metric="loss")
    with Journal(tmp_path / "j.db") as journal:
        summaries = {r["id"]: r for r in views.list_runs(journal)}
        view = views.run_view(journal, run.run_id)
    assert (summaries[run.run_id]["best_step"], summaries[run.run_id]["best_value"]) == (1, 5)
    assert summaries[run.run_id]["baseline_value"] is None and summaries[run.run_id]["improvement"] is None
    d = summaries[dotted.run_id]
    assert (d["best_step"], d["best_value"], d["improvement"]["percent"]) == (1, 2.0, pytest.approx(100 / 3))
    assert summaries[empty.run_id]["best_step"] is None and summaries[empty.run_id]["steps"] == 1
    assert [s["step"] for s in view["steps"] if s["is_best"]] == [1]
    assert view["steps"][3]["value"] is None


def test_runs_cache_is_used_and_invalidated_by_new_steps(cli, tmp_path, journal_path):
    """``runs`` keeps per-run scores in a 0600 sidecar keyed by the run's newest event."""
    (tmp_path / "a.py").write_text("x = 1\n")
    run_id = cli.ok("observe", "init", "--metric", "loss", "--source", "a.py").stdout.strip()
    cli.ok("observe", "log", "--run-id", run_id, "--step", "1", "--metrics", '{"loss": 0.5}')
    assert json.loads(cli.ok("observe", "runs", "--json").stdout)[0]["best_step"] == 1
    cache = journal_path.with_name("journal.db.views-cache.json")
    assert cache.stat().st_mode & 0o777 == 0o600

    # The cache is what answers while the run is unchanged (doctored here to prove it) ...
    data = json.loads(cache.read_text())
    data["runs"][run_id]["best_step"] = 0
    cache.write_text(json.dumps(data))
    assert json.loads(cli.ok("observe", "runs", "--json").stdout)[0]["best_step"] == 0
    # ... and any new write to the run recomputes it, re-logging an existing step included.
    cli.ok("observe", "log", "--run-id", run_id, "--step", "1", "--metrics", '{"loss": 0.9}')
    cli.ok("observe", "log", "--run-id", run_id, "--step", "0", "--metrics", '{"loss": 0.7}')
    run = json.loads(cli.ok("observe", "runs", "--json").stdout)[0]
    assert (run["best_step"], run["best_value"], run["baseline_value"]) == (0, 0.7, 0.7)
    # A corrupt cache is ignored and rewritten.
    cache.write_text("{not json")
    assert json.loads(cli.ok("observe", "runs", "--json").stdout)[0]["best_value"] == 0.7
    assert json.loads(cache.read_text())["version"] == 3


def test_remote_only_run_without_baseline(cli):
    server_id = "8d0c2f4e-1111-4222-8333-444455556666"
    cli.ok("observe", "log", "--run-id", server_id, "--step", "3", "--metrics", '{"loss": 1.5}')
    cli.ok("observe", "log", "--run-id", server_id, "--step", "4", "--metrics", '{"loss": 1.2}')
    doc = json.loads(cli.ok("observe", "show", server_id, "--json").stdout)
    assert doc["run"]["remote_only"] and doc["run"]["metric"] is None
    assert doc["run"]["goal"] is None and doc["run"]["maximize"] is None  # not False: nobody said "minimize"
    assert [(s["step"], s["parent_step"]) for s in doc["steps"]] == [(3, None), (4, 3)]
    assert doc["best"] is None  # no primary metric known locally
    text = cli.ok("observe", "show", server_id).stdout
    assert "+-- Step 3 (kept, no parent)" in text and "best: none (goal unknown)" in text
    assert "no code changes" in cli.ok("observe", "diff", server_id, "4").stdout


def import_run_without_goal(cli, tmp_path: Path) -> str:
    """Import a run whose bundle does not carry its goal (the format allows that); return its id.

    Its steps report loss 2.0, 1.5 and 3.0: which is best depends on a goal nobody gave.
    """
    from test_bundle import reforge

    from weco_observe import bundle

    with Journal(tmp_path / "elsewhere" / "journal.db") as other:
        run = other.create_run(source_code={"a.py": "x\n"}, metric="loss", maximize=False, name="imported")
        for step, loss in enumerate([2.0, 1.5, 3.0]):
            other.log_step(run, step, metrics={"loss": loss})
        bundle.write_bundle(other, tmp_path / "full.weco")
    reforge(tmp_path / "full.weco", tmp_path / "no-goal.weco", lambda m: m["runs.jsonl"][0].pop("maximize"))
    cli.ok("observe", "import", str(tmp_path / "no-goal.weco"))
    return run


def test_a_run_whose_goal_is_unknown_has_no_best_step(cli, tmp_path):
    """Without a goal no value is better than another: no view may pick a best step, a best-so-far
    or an improvement."""
    run = import_run_without_goal(cli, tmp_path)
    [summary] = json.loads(cli.ok("observe", "runs", "--json").stdout)
    assert (summary["id"], summary["metric"], summary["maximize"], summary["goal"]) == (run, "loss", None, None)
    assert (summary["best_step"], summary["best_value"], summary["improvement"]) == (None, None, None)
    assert summary["baseline_value"] == 2.0  # the values are all there; only "better" is unknown
    doc = json.loads(cli.ok("observe", "show", run, "--json").stdout)
    assert [s["value"] for s in doc["steps"]] == [2.0, 1.5, 3.0]
    assert doc["best"] is None
    assert [(s["is_best"], s["best_so_far"]) for s in doc["steps"]] == [(False, None)] * 3
    text = cli.ok("observe", "show", run).stdout
    assert "metric loss (goal unknown)" in text  # not "first seen by its server id": it was imported
    assert "best: none (goal unknown)" in text and "<- best" not in text
    row = next(line for line in cli.ok("observe", "runs").stdout.splitlines() if line.startswith(run))
    assert row.split()[3:7] == ["loss", "(?)", "3", "-"]  # metric (goal), steps, best
