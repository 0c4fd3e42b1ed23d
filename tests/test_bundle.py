"""Bundles end to end through the real CLI: box A writes files, box B imports them.

A "box" is a journal directory (``WECO_OBSERVE_DIR``); each test has two or three.
Nothing here talks to a server: test_bundle_sync.py does that.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

from helpers import run_with_steps, totals
import pytest

from weco_observe import bundle
from weco_observe.journal import Journal

UUID = "123e4567-e89b-42d3-a456-426614174000"


class Box:
    """One machine: its own journal dir, driven through the real CLI."""

    def __init__(self, cli, root: Path, name: str):
        self.cli = cli
        self.dir = root / name
        self.env = {"WECO_OBSERVE_DIR": str(self.dir)}
        self.work = root / f"{name}-src"
        self.work.mkdir()

    def __call__(self, *args: str):
        return self.cli(*args, env=self.env)

    def ok(self, *args: str):
        return self.cli.ok(*args, env=self.env)

    def code(self, text: str) -> str:
        path = self.work / "train.py"
        path.write_text(text)
        return str(path)

    def init(self, name: str = "exp") -> str:
        src = self.code("lr = 0.1\n" * 40)
        return self.ok(
            "observe", "init", "--metric", "loss", "--name", name, "--source", src, "--metadata", '{"gpu": "a100"}'
        ).stdout.strip()

    def log(self, run: str, step: int, *extra: str) -> None:
        self.ok("observe", "log", "--run-id", run, "--step", str(step), "-q", *extra)

    @property
    def journal(self) -> Path:
        return self.dir / "journal.db"

    def state(self) -> dict:
        return journal_state(self.journal)

    def event_states(self) -> dict[str, int]:
        with Journal(self.journal) as j:
            return {r[0]: r[1] for r in j.query("SELECT state, count(*) FROM events GROUP BY state")}


def journal_state(path: Path) -> dict:
    """Runs, steps (code as text) and events, minus per-box delivery state."""
    if not path.exists():
        return {"runs": {}, "steps": {}, "events": {}}
    with Journal(path) as j:
        runs = {
            r["id"]: {k: r[k] for k in ("name", "metric", "maximize", "metadata", "remote_only")}
            for r in j.query("SELECT * FROM runs")
        }
        steps = {}
        for run in runs:
            for s in j.steps(run):
                steps[(run, s["step"])] = {
                    **{k: s[k] for k in ("status", "description", "metrics", "parent_step", "metadata", "event_id")},
                    "code": j.read_code(s["code"]),
                }
        events = {
            e["id"]: (e["run_id"], e["kind"], e["step"], json.loads(e["payload"]))
            for e in j.query("SELECT * FROM events")
        }
    return {"runs": runs, "steps": steps, "events": events}


@pytest.fixture
def boxes(cli, tmp_path):
    return lambda name: Box(cli, tmp_path, name)


def offline_work(box: Box) -> str:
    """A run with code changes, a failed step, a branch and a re-logged step."""
    run = box.init()
    box.log(run, 0, "--metrics", '{"loss": 2.0}', "--description", "baseline")
    box.log(run, 1, "--metrics", '{"loss": 1.5}', "--source", box.code("lr = 0.2\n" * 40))
    box.log(run, 2, "--status", "failed", "--metrics", '{"loss": 9.0}', "--source", box.code("lr = 9\n" * 40))
    box.log(run, 3, "--parent-step", "1", "--metrics", '{"loss": 1.2}', "--metadata", '{"note": "branch"}')
    box.log(run, 1, "--description", "re-logged with a description")
    return run


def test_bundle_then_import_reproduces_everything(boxes, tmp_path):
    a, b = boxes("a"), boxes("b")
    offline_work(a)
    out = a.ok("observe", "bundle", "-o", str(tmp_path / "a.weco")).stdout
    assert "1 runs" in out and "6 events" in out  # create + 5 logs
    summary = json.loads(b.ok("observe", "import", str(tmp_path / "a.weco"), "--json").stdout)
    assert summary["runs_new"] == 1 and summary["events_new"] == 6
    assert b.state() == a.state()
    # Step 1 was logged twice: only its newest state is to be sent (as A's own sync would).
    assert summary["events_pending"] == 5
    assert b.event_states() == {"pending": 5, "superseded": 1}
    assert stat.S_IMODE((tmp_path / "a.weco").stat().st_mode) == 0o600


def test_bundles_are_incremental_and_self_contained(boxes, tmp_path):
    a, b, c = boxes("a"), boxes("b"), boxes("c")
    run = a.init()
    a.log(run, 1, "--metrics", '{"loss": 1}')
    a.ok("observe", "bundle", "-o", str(tmp_path / "1.weco"))
    nothing = a("observe", "bundle", "-o", str(tmp_path / "empty.weco"))
    assert nothing.returncode == 0 and "nothing new" in nothing.stderr
    assert not (tmp_path / "empty.weco").exists()
    a.log(run, 2, "--metrics", '{"loss": 0.5}', "--source", a.code("lr = 0.3\n" * 40))
    second = json.loads(a.ok("observe", "bundle", "-o", str(tmp_path / "2.weco"), "--json").stdout)
    events = [json.loads(line) for line in zipfile.ZipFile(tmp_path / "2.weco").read("events.jsonl").splitlines()]
    # Only step 2 is new; the run's create is repeated so the bundle imports on its own.
    assert [(e["kind"], e["step"]) for e in events] == [("log_step", 2), ("create_run", None)]
    assert second["events"] == 2
    full = json.loads(a.ok("observe", "bundle", "--all", "-o", str(tmp_path / "all.weco"), "--json").stdout)
    assert full["events"] == 3

    b.ok("observe", "import", str(tmp_path / "1.weco"))
    b.ok("observe", "import", str(tmp_path / "2.weco"))
    assert b.state() == a.state()
    # A box that only ever gets the second bundle still has the run, its baseline and step 2.
    c.ok("observe", "import", str(tmp_path / "2.weco"))
    got = c.state()
    assert set(got["steps"]) == {(run, 0), (run, 2)}
    assert got["steps"][(run, 2)] == a.state()["steps"][(run, 2)]


def test_same_or_overlapping_bundle_twice_changes_nothing(boxes, tmp_path):
    a, b = boxes("a"), boxes("b")
    run = a.init()
    a.log(run, 1, "--metrics", '{"loss": 1}')
    a.ok("observe", "bundle", "-o", str(tmp_path / "1.weco"))
    a.log(run, 2, "--metrics", '{"loss": 0.5}')
    a.ok("observe", "bundle", "-o", str(tmp_path / "2.weco"))
    a.ok("observe", "bundle", "--all", "-o", str(tmp_path / "all.weco"))
    for name in ("1.weco", "2.weco"):
        b.ok("observe", "import", str(tmp_path / name))
    before = b.state(), b.event_states()
    again = b.ok("observe", "import", str(tmp_path / "1.weco"))
    assert "already imported" in again.stdout
    overlap = json.loads(b.ok("observe", "import", str(tmp_path / "all.weco"), "--json").stdout)
    assert overlap["events_new"] == 0 and overlap["events_known"] == 3 and overlap["steps_updated"] == 0
    assert (b.state(), b.event_states()) == before
    # A box importing its own bundle changes nothing either.
    mine = a.state(), a.event_states()
    own = json.loads(a.ok("observe", "import", str(tmp_path / "all.weco"), "--json").stdout)
    assert own["events_new"] == 0 and (a.state(), a.event_states()) == mine


def test_bundles_imported_out_of_order_keep_the_newest_state(boxes, tmp_path):
    a, b = boxes("a"), boxes("b")
    run = a.init()
    a.log(run, 1, "--metrics", '{"loss": 1}', "--description", "first try")
    a.ok("observe", "bundle", "-o", str(tmp_path / "1.weco"))
    a.log(run, 1, "--metrics", '{"loss": 0.7}', "--description", "second try")
    a.ok("observe", "bundle", "-o", str(tmp_path / "2.weco"))
    b.ok("observe", "import", str(tmp_path / "2.weco"))
    b.ok("observe", "import", str(tmp_path / "1.weco"))
    assert b.state() == a.state()
    assert b.state()["steps"][(run, 1)]["description"] == "second try"
    # The older state of step 1 arrived last: it is superseded, never sent over the newer one.
    assert b.event_states() == {"pending": 2, "superseded": 1}


@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory) -> tuple[Path, dict]:
    """One bundle of a small offline run, written once through the library for the damage tests."""
    root = tmp_path_factory.mktemp("good")
    with Journal(root / "a" / "journal.db") as j:
        run = j.create_run(source_code={"train.py": "lr = 0.1\n" * 40}, metric="loss", name="exp")
        j.log_step(run, 1, metrics={"loss": 1.5}, code={"train.py": "lr = 0.2\n" * 40})
        j.log_step(run, 2, status="failed", metrics={"loss": 9.0})
        j.log_step(run, 3, parent_step=1, metrics={"loss": 1.2}, metadata={"note": "branch"})
        bundle.write_bundle(j, root / "a.weco")
    return root / "a.weco", journal_state(root / "a" / "journal.db")


@pytest.mark.parametrize(
    "damage",
    [
        "truncated",
        "corrupted",
        "edited member",
        "edited manifest",
        "edited code",
        "extra member",
        "foreign zip",
        "not a zip",
        "empty",
    ],
)
def test_damaged_or_foreign_bundles_are_refused_and_import_nothing(boxes, tmp_path, damage, good_bundle):
    b = boxes("b")
    good, a_state = good_bundle
    bad = tmp_path / "bad.weco"
    data = good.read_bytes()
    members = {n: zipfile.ZipFile(good).read(n) for n in zipfile.ZipFile(good).namelist()}

    def rezip(changed: dict[str, bytes]) -> None:
        with zipfile.ZipFile(bad, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, content in {**members, **changed}.items():
                zf.writestr(name, content)

    if damage == "truncated":
        bad.write_bytes(data[: len(data) * 2 // 3])
    elif damage == "corrupted":
        info = zipfile.ZipFile(good).getinfo("events.jsonl")
        pos = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
        bad.write_bytes(data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1 :])
    elif damage == "edited member":
        rezip({"events.jsonl": members["events.jsonl"].replace(b'"loss":1.2', b'"loss":0.1')})
    elif damage == "edited manifest":
        manifest = json.loads(members["manifest.json"])
        manifest["counts"]["events"] += 1
        rezip({"manifest.json": json.dumps(manifest).encode()})
    elif damage == "edited code":
        # Even with the member checksums and the manifest's own checksum recomputed, a blob
        # whose text no longer hashes to its name is caught.
        lines = members["blobs.jsonl"].splitlines()
        blob = json.loads(lines[0])
        import base64
        import zlib

        text = zlib.decompress(base64.b64decode(blob["data"]))
        blob["data"] = base64.b64encode(zlib.compress(text.replace(b"lr", b"LR"))).decode()
        new = b"\n".join([json.dumps(blob, separators=(",", ":")).encode(), *lines[1:]]) + b"\n"
        manifest = json.loads(members["manifest.json"])
        import hashlib

        manifest["members"]["blobs.jsonl"] = {
            "sha256": hashlib.sha256(new).hexdigest(),
            "bytes": len(new),
            "lines": len(lines),
        }
        manifest["checksum"] = bundle._manifest_checksum(manifest)
        rezip({"blobs.jsonl": new, "manifest.json": json.dumps(manifest).encode()})
    elif damage == "extra member":
        rezip({"evil.sh": b"rm -rf /\n"})
    elif damage == "foreign zip":
        with zipfile.ZipFile(bad, "w") as zf:
            zf.writestr("manifest.json", json.dumps({"format": "something-else", "version": 1}))
    elif damage == "not a zip":
        bad.write_bytes(b"SQLite format 3\x00" + os.urandom(3000))
    else:
        bad.write_bytes(b"")

    for command in (("observe", "import", str(bad)),):
        result = b(*command)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: bundle") and "refused, nothing imported" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert b.state() == {"runs": {}, "steps": {}, "events": {}}
    # The good file still imports, after that refusal.
    with Journal(b.journal) as journal:
        bundle.import_bundle(journal, good)
    assert b.state() == a_state


def test_two_boxes_merge_without_collisions(boxes, tmp_path):
    a, c, b = boxes("a"), boxes("c"), boxes("b")
    runs_a = [a.init("a1"), a.init("a2")]
    runs_c = [c.init("c1")]
    for box, runs in ((a, runs_a), (c, runs_c)):
        for run in runs:
            box.log(run, 1, "--metrics", '{"loss": 1}')
        # Both boxes also logged to the same server run (made by the official client, say).
        box.log(UUID, 5 if box is a else 6, "--metrics", '{"loss": 0.3}')
        box.ok("observe", "bundle", "-o", str(tmp_path / f"{box.dir.name}.weco"))
    b.ok("observe", "import", str(tmp_path / "a.weco"))
    b.ok("observe", "import", str(tmp_path / "c.weco"))
    state = b.state()
    assert set(runs_a + runs_c) < set(state["runs"])
    assert len(state["runs"]) == 4  # three local runs and ONE remote-only run for the server id
    assert set(state["events"]) == set(a.state()["events"]) | set(c.state()["events"])
    with Journal(b.journal) as j:
        remote = j.require_run(UUID)
        assert remote["remote_only"] == 1
        assert [s["step"] for s in j.steps(remote["id"])] == [5, 6]


def test_run_filter_bundles_one_run(boxes, tmp_path):
    a, b = boxes("a"), boxes("b")
    one, two = a.init("one"), a.init("two")
    a.log(one, 1)
    a.log(two, 1)
    only = json.loads(
        a.ok("observe", "bundle", "--run-id", one[:-6], "-o", str(tmp_path / "one.weco"), "--json").stdout
    )
    assert only["runs"] == 1 and only["events"] == 2
    rest = json.loads(a.ok("observe", "bundle", "-o", str(tmp_path / "rest.weco"), "--json").stdout)
    assert rest["runs"] == 1 and rest["events"] == 2  # run two only: run one is already bundled
    b.ok("observe", "import", str(tmp_path / "one.weco"))
    b.ok("observe", "import", str(tmp_path / "rest.weco"))
    assert b.state() == a.state()
    unknown = a("observe", "bundle", "--run-id", "local-nope", "-o", str(tmp_path / "x.weco"))
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: no run")


def test_bundle_is_consistent_while_loggers_keep_writing(boxes, tmp_path):
    a, b = boxes("a"), boxes("b")
    run = a.init()
    script = (
        "import sys\nfrom weco_observe.journal import Journal\n"
        "j = Journal(sys.argv[1])\n"
        "for i in range(1, 301):\n"
        "    j.log_step(sys.argv[2], i, metrics={'loss': 1 / i}, code={'train.py': f'x = {i}\\n' * 30})\n"
    )
    logger = subprocess.Popen([sys.executable, "-c", script, str(a.journal), run])
    files, during = [], 0
    try:
        with Journal(a.journal) as journal:
            while len(files) < 200:
                running = logger.poll() is None
                path = tmp_path / f"{len(files)}.weco"
                if bundle.write_bundle(journal, path)["events"]:
                    files.append(path)
                    during += running
                if not running:
                    break
    finally:
        assert logger.wait(timeout=60) == 0
    final = tmp_path / "final.weco"
    if json.loads(a.ok("observe", "bundle", "-o", str(final), "--json").stdout)["events"]:
        files.append(final)
    assert during >= 2, "no bundle was written while the logger ran"
    for path in files:
        b.ok("observe", "import", str(path))
    assert b.state() == a.state()
    assert len(b.state()["events"]) == 301


def test_the_api_key_never_enters_a_bundle(boxes, tmp_path):
    a = boxes("a")
    secret = "sk-weco-SECRET-never-in-a-bundle"
    a.env["WECO_API_KEY"] = secret
    offline_work(a)
    a.ok("observe", "bundle", "-o", str(tmp_path / "a.weco"))
    raw = (tmp_path / "a.weco").read_bytes()
    assert secret.encode() not in raw
    with zipfile.ZipFile(tmp_path / "a.weco") as zf:
        for name in zf.namelist():
            assert secret.encode() not in zf.read(name)


def test_bundle_output_errors(boxes, tmp_path):
    a = boxes("a")
    a.init()
    missing_dir = a("observe", "bundle", "-o", str(tmp_path / "no" / "such" / "x.weco"))
    assert missing_dir.returncode == 2 and "does not exist" in missing_dir.stderr
    is_dir = a("observe", "bundle", "-o", str(tmp_path))
    assert is_dir.returncode == 2 and "is a directory" in is_dir.stderr
    missing = a("observe", "import", str(tmp_path / "nope.weco"))
    assert missing.returncode == 2 and "no bundle file" in missing.stderr


def test_verify_accepts_a_library_written_bundle(tmp_path):
    """The library API: write_bundle / verify / import_bundle, without the CLI."""
    with Journal(tmp_path / "a" / "journal.db") as a:
        run = run_with_steps(
            a, 39, metric="acc", maximize=True, source={"m.py": "y = 1\n"},
            metrics=lambda i: {"acc": i / 40}, code=lambda i: {"m.py": f"y = {i}\n" + "pad\n" * 100},
        )  # fmt: skip
        written = bundle.write_bundle(a, tmp_path / "a.weco")
    assert written["events"] == 40 and written["blobs"] == 40
    manifest = bundle.verify(tmp_path / "a.weco")
    assert manifest["counts"] == {"runs": 1, "steps": 40, "events": 40, "blobs": 40}
    with Journal(tmp_path / "b" / "journal.db") as b:
        summary = bundle.import_bundle(b, tmp_path / "a.weco")
        assert summary["events_pending"] == 40
        assert b.read_code(b.steps(run)[-1]["code"]) == {"m.py": "y = 39\n" + "pad\n" * 100}
    shutil.rmtree(tmp_path / "a")


def test_a_journal_missing_code_refuses_to_bundle_before_the_air_gap(boxes, tmp_path):
    a = boxes("a")
    run = a.init()
    a.log(run, 1, "--source", a.code("changed = 1\n"))
    import sqlite3

    conn = sqlite3.connect(a.journal)
    conn.execute("DELETE FROM blobs WHERE hash IN (SELECT value FROM steps, json_each(steps.code) WHERE step = 1)")
    conn.commit()
    conn.close()
    result = a("observe", "bundle", "-o", str(tmp_path / "a.weco"))
    assert result.returncode == 7 and "missing from the journal" in result.stderr
    assert not list(tmp_path.glob("*.weco")) and not list(tmp_path.glob(".a.weco*"))


def reforge(good: Path, out: Path, edit) -> None:
    """Rewrite a bundle with ``edit(members)`` applied, recomputing every checksum (a careful forger)."""
    import hashlib

    with zipfile.ZipFile(good) as zf:
        members = {n: [json.loads(line) for line in zf.read(n).splitlines()] for n in bundle.MEMBERS}
        manifest = json.loads(zf.read(bundle.MANIFEST))
    edit(members)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, rows in members.items():
            data = b"".join(bundle._line(row) for row in rows)
            manifest["members"][name] = {
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data),
                "lines": len(rows),
            }
            zf.writestr(name, data)
        manifest["counts"] = {k: len(members[f"{k}.jsonl"]) for k in ("runs", "steps", "events", "blobs")}
        manifest["checksum"] = bundle._manifest_checksum(manifest)
        zf.writestr(bundle.MANIFEST, json.dumps(manifest))


def _loop_blobs(m):
    first, second = m["blobs.jsonl"][0], m["blobs.jsonl"][1]
    first["base"], second["base"] = second["hash"], first["hash"]


FORGERIES = {
    "a run twice": lambda m: m["runs.jsonl"].append(dict(m["runs.jsonl"][0])),
    "a run name that is a list": lambda m: m["runs.jsonl"][0].update(name=["x"]),
    "an event of an unknown run": lambda m: m["events.jsonl"][0].update(run_id="local-elsewhere"),
    "an event twice": lambda m: m["events.jsonl"].append(dict(m["events.jsonl"][0])),
    "a step naming a missing blob": lambda m: m["steps.jsonl"][0].update(code={"train.py": "ab" * 32}),
    "a delta base outside the bundle": lambda m: m["blobs.jsonl"][0].update(base="cd" * 32),
    "a delta chain that loops": _loop_blobs,
    "a step event whose payload names another step": lambda m: next(
        e for e in m["events.jsonl"] if e["kind"] == "log_step"
    )["payload"].update(step=99),
    "a bad event state": lambda m: m["events.jsonl"][0].update(state="lost"),
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_consistently_forged_bundles_are_still_refused(good_bundle, tmp_path, forgery):
    good, _ = good_bundle
    bad = tmp_path / "forged.weco"
    reforge(good, bad, FORGERIES[forgery])
    with pytest.raises(bundle.BundleInvalid, match="refused, nothing imported"):
        bundle.verify(bad)
    with Journal(tmp_path / "b" / "journal.db") as b:
        with pytest.raises(bundle.BundleInvalid):
            bundle.import_bundle(b, bad)
        assert totals(b)["runs"] == 0 and b.query("SELECT count(*) FROM blobs")[0][0] == 0


def test_an_untouched_reforge_is_accepted(good_bundle, tmp_path):
    good, _ = good_bundle
    reforge(good, tmp_path / "same.weco", lambda m: None)
    assert bundle.verify(tmp_path / "same.weco")["counts"]["events"] == 4


def test_an_import_killed_midway_is_completed_by_importing_again(boxes, tmp_path):
    """kill -9 the real `import` while it merges; the journal stays sound and a second import finishes it."""
    import signal
    import time

    with Journal(tmp_path / "big" / "journal.db") as big:
        big.conn.execute("PRAGMA synchronous=OFF")
        run_with_steps(big, 7999, code=lambda i: {"train.py": f"x = {i}\n"} if i % 50 == 0 else None)
        bundle.write_bundle(big, tmp_path / "big.weco")
    want = journal_state(tmp_path / "big" / "journal.db")
    b = boxes("b")
    killed_midway = False
    for _attempt in range(5):  # bounded: the kill must land after some batches and before the end
        shutil.rmtree(b.dir, ignore_errors=True)
        b.ok("observe", "status")  # create the journal first, so only the merge is timed
        proc = subprocess.Popen(
            [sys.executable, "-m", "weco_observe", "observe", "import", str(tmp_path / "big.weco")],
            env={**os.environ, **b.env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        seen = 0
        while proc.poll() is None and time.monotonic() < deadline:
            conn = sqlite3_connect_ro(b.journal)
            try:
                seen = conn.execute("SELECT count(*) FROM events").fetchone()[0]
            finally:
                conn.close()
            if seen:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(timeout=30)
        if proc.returncode == -signal.SIGKILL and 0 < seen:
            done = b.state()
            if len(done["events"]) < len(want["events"]):
                killed_midway = True
                break
    assert killed_midway, "could not kill the import midway in 5 tries"
    assert list(b.dir.glob(".import-*.weco")), "the killed import's private copy is left behind"
    with Journal(b.journal) as j:
        assert j.query("PRAGMA integrity_check")[0][0] == "ok"
    again = json.loads(b.ok("observe", "import", str(tmp_path / "big.weco"), "--json").stdout)
    assert again["events_new"] > 0 and not again["already_imported"]
    assert b.state() == want
    assert not list(b.dir.glob(".import-*.weco")), "a stale private copy was not cleaned up"
    assert "already imported" in b.ok("observe", "import", str(tmp_path / "big.weco")).stdout


def sqlite3_connect_ro(path: Path):
    import sqlite3

    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)


def test_bundles_relay_through_a_middle_box(boxes, tmp_path):
    """A -> B -> C (a data diode, then a jump host): C ends with A's runs, steps and event ids."""
    a, b, c = boxes("a"), boxes("b"), boxes("c")
    offline_work(a)
    a.ok("observe", "bundle", "-o", str(tmp_path / "a.weco"))
    b.ok("observe", "import", str(tmp_path / "a.weco"))
    b.ok("observe", "bundle", "-o", str(tmp_path / "b.weco"))
    c.ok("observe", "import", str(tmp_path / "b.weco"))
    assert c.state() == a.state()


def test_import_moves_a_known_runs_last_activity_to_its_newest_step(tmp_path, monkeypatch):
    """A run both boxes know shows the imported steps' time as its last activity on the receiver."""
    import time as _time

    from weco_observe import bundle as bundle_mod
    from weco_observe.journal import Journal

    box_a, box_b = tmp_path / "a" / "journal.db", tmp_path / "b" / "journal.db"
    with Journal(box_a) as a:
        run = a.create_run(source_code={"t.py": "x = 1\n"}, metric="loss")
        first = tmp_path / "first.bundle"
        bundle_mod.write_bundle(a, first)
    with Journal(box_b) as b:
        bundle_mod.import_bundle(b, first)
        before = b.query("SELECT updated_at FROM runs WHERE id = ?", (run,))[0]["updated_at"]
    _time.sleep(0.05)
    with Journal(box_a) as a:
        a.log_step(run, 1, metrics={"loss": 0.5})
        logged_at = a.query("SELECT updated_at FROM steps WHERE run_id = ? AND step = 1", (run,))[0]["updated_at"]
        second = tmp_path / "second.bundle"
        bundle_mod.write_bundle(a, second)
    with Journal(box_b) as b:
        bundle_mod.import_bundle(b, second)
        after = b.query("SELECT updated_at FROM runs WHERE id = ?", (run,))[0]["updated_at"]
    assert after == logged_at > before
