"""Flipped bytes in a real journal file, where SQLite's integrity check cannot see them (issue 10, item 8).

A workload is journaled once; each trial copies the file and flips a few bits inside the bytes
of code blobs (their zlib data) and of event payloads (their JSON text), found in the file by
searching for each row's bytes as SQLite stored them. Which rows were hit, and whether each
blob still decodes to its hash, is worked out here independently of weco_observe (raw bytes and
zlib), and each trial checks, with the real CLI and the loopback emulator:

- ``doctor`` exits 7 whenever ``sync`` would not deliver everything, and whenever a blob no
  longer decodes;
- ``sync`` rejects what the flips touched ("damaged locally: run `weco observe doctor --repair`"),
  delivers the rest, and never sends altered data: every step the emulator holds is exactly the
  step as logged;
- ``show``, ``export``, ``report`` and ``bundle`` show what they can and end with one
  ``error: ...`` line naming ``doctor --repair`` (no traceback, no hang);
- ``doctor --repair`` gives a journal that syncs completely, in which every step keeps its
  metrics, description, status and parent, and every file its text, unless that text itself
  was destroyed (then a note says so).

A faster in-process property runs many more trials of ``doctor.check`` alone.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sqlite3
import zlib
from pathlib import Path
from typing import Any

import pytest
from emulator_fixtures import LOCAL_ID_KEY, assert_server_matches_journal, emulator, make_workload  # noqa: F401

DAMAGED = "damaged locally: run `weco observe doctor --repair`"
#: what the end-to-end trials saw, so the last test can check that they covered every outcome
SEEN: dict[str, int] = {}
E2E_SEEDS = range(8)
PROPERTY_SEEDS = range(120)


def _rows(path: Path, sql: str) -> list[sqlite3.Row]:
    conn = sqlite3.connect(path)
    conn.text_factory = bytes  # the bytes as stored, whatever they are
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


class Original:
    """The journal as written, and where each blob's data and each payload's text sit in the file."""

    def __init__(self, path: Path):
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every row in the main file
        conn.close()
        self.path = path
        self.blobs = {r["hash"].decode(): dict(r) for r in _rows(path, "SELECT * FROM blobs")}
        self.events = {r["id"].decode(): dict(r) for r in _rows(path, "SELECT * FROM events")}
        self.steps = {(r["run_id"].decode(), r["step"]): dict(r) for r in _rows(path, "SELECT * FROM steps")}
        data = path.read_bytes()
        self.spans: list[tuple[int, int]] = []
        for value in [b["data"] for b in self.blobs.values()] + [e["payload"] for e in self.events.values()]:
            at = data.find(value)
            if at >= 0 and data.find(value, at + 1) < 0:  # stored once, in one piece
                self.spans.append((at, len(value)))
        assert len(self.spans) > 0.9 * (len(self.blobs) + len(self.events))

    def code_of(self, event_id: str) -> set[str]:
        payload = json.loads(self.events[event_id]["payload"])
        manifest = payload.get("source_code" if self.events[event_id]["kind"] == b"create_run" else "code") or {}
        return set(manifest.values())

    def text(self, digest: str, rows: dict[str, dict[str, Any]] | None = None) -> bytes | None:
        """A blob's text decoded from ``rows`` (default: as written); None if it no longer decodes."""
        rows = self.blobs if rows is None else rows
        row = rows.get(digest)
        if row is None:
            return None
        base = None
        if row["base"] is not None:
            base = self.text(row["base"].decode(), rows)
            if base is None:
                return None
        try:
            middle = zlib.decompress(row["data"])
        except zlib.error:
            return None
        text = middle if base is None else base[: row["prefix"]] + middle + base[len(base) - row["suffix"] :]
        return text if hashlib.sha256(text).hexdigest() == digest else None


class Trial:
    """A copy of the original journal with ``flips`` random bits flipped inside blob data and payloads."""

    def __init__(self, original: Original, target: Path, seed: int):
        rng = random.Random(seed)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(original.path, target)
        with open(target, "r+b") as f:
            for at, length in rng.sample(original.spans, rng.randint(1, 4)):
                offset = at + rng.randrange(length)
                f.seek(offset)
                byte = f.read(1)[0]
                f.seek(offset)
                f.write(bytes([byte ^ (1 << rng.randrange(8))]))
        self.original = original
        self.path = target
        blobs = {r["hash"].decode(): dict(r) for r in _rows(target, "SELECT * FROM blobs")}
        events = {r["id"].decode(): dict(r) for r in _rows(target, "SELECT * FROM events")}
        self.unreadable = {h for h in original.blobs if original.text(h, blobs) is None}
        self.changed = {i for i, e in events.items() if e["payload"] != original.events[i]["payload"]}
        #: events that cannot be sent as logged: their payload changed, or code they name is lost
        self.touched = self.changed | {i for i in original.events if original.code_of(i) & self.unreadable}
        #: the event holding each step's current state (the one sync sends)
        self.current = {key: row["event_id"].decode() for key, row in original.steps.items()}

    def creates_touched(self) -> set[str]:
        return {
            e["run_id"].decode()
            for i, e in self.original.events.items()
            if e["kind"] == b"create_run" and i in self.touched
        }


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Original:
    path = tmp_path_factory.mktemp("original") / "journal.db"
    make_workload(path, runs=3, steps=14, seed=7)
    return Original(path)


def _one_line_error(result) -> bool:
    lines = result.stderr.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("error: ") and "doctor --repair" in lines[0]


def _states(path: Path) -> dict[str, tuple[str, str | None]]:
    return {
        r["id"].decode(): (r["state"].decode(), (r["last_error"] or b"").decode())
        for r in _rows(path, "SELECT * FROM events")
    }


def _server_steps(emulator) -> dict[tuple[str, int], dict[str, Any]]:
    out = {}
    for run in emulator.runs().values():
        local = (run.get("metadata") or {}).get(LOCAL_ID_KEY)
        for n, step in run["steps"].items():
            out[(local, int(n))] = step
    return out


def _as_logged(original: Original, key: tuple[str, int]) -> dict[str, Any]:
    row = original.steps[key]
    manifest = json.loads(row["code"]) if row["code"] else None
    return {
        "status": row["status"].decode(),
        "description": row["description"].decode() if row["description"] is not None else None,
        "metrics": json.loads(row["metrics"]) if row["metrics"] else None,
        "code": {p: original.text(h).decode() for p, h in manifest.items()} if manifest else None,
    }


@pytest.mark.parametrize("seed", E2E_SEEDS)
def test_flipped_bytes_are_found_refused_shown_around_and_repaired(
    original, emulator, cli, tmp_path, journal_path, seed
):
    trial = Trial(original, journal_path, seed)
    env = emulator.env()
    seen = SEEN.setdefault

    # doctor, then sync against the emulator
    doctor = cli("observe", "doctor", timeout=120)
    assert "Traceback" not in doctor.stdout + doctor.stderr
    synced = cli("observe", "sync", env=env, timeout=300)
    assert "Traceback" not in synced.stderr, synced.stderr[-3000:]
    assert synced.returncode in (0, 4, 6), synced.stderr[-3000:]
    states = _states(journal_path)
    if synced.returncode != 0 or any(state != "delivered" and state != "superseded" for state, _ in states.values()):
        assert doctor.returncode == 7, f"sync did not deliver everything, doctor said:\n{doctor.stdout}"
    if trial.unreadable:
        assert doctor.returncode == 7, f"blobs {sorted(trial.unreadable)} no longer decode:\n{doctor.stdout}"

    SEEN["doctor 7"] = seen("doctor 7", 0) + (doctor.returncode == 7)
    SEEN["rejected"] = seen("rejected", 0) + any(state == "rejected" for state, _ in states.values())
    blocked = trial.creates_touched()
    for event_id, (state, error) in states.items():
        if state == "rejected":
            assert error.startswith(DAMAGED), (event_id, error)
            assert event_id in trial.touched, f"event {event_id} was rejected but no flip touched it"
    for key, event_id in trial.current.items():
        state = states[event_id][0]
        if event_id in trial.touched:
            assert state in ("rejected", "pending"), f"step {key}: altered state {event_id} was {state}"
        elif key[0] not in blocked:
            assert state == "delivered", f"step {key}: intact state {event_id} is {state}"
    for key, held in _server_steps(emulator).items():  # nothing altered ever reached the server
        if states[trial.current[key]][0] == "delivered":
            want = _as_logged(original, key)
            assert {k: held[k] or None if k == "metrics" else held[k] for k in want} == want, key

    # the views show what they can, and say what they could not
    runs = sorted({key[0] for key in original.steps})
    damaged_runs = sorted(({original.events[i]["run_id"].decode() for i in trial.touched} & set(runs)) or runs[:1])
    for run in damaged_runs[:1]:
        show = cli("observe", "show", run, timeout=60)
        export = cli("observe", "export", run, "--code", "-o", str(tmp_path / f"{run}.json"), timeout=60)
        report = cli("observe", "report", run, "-o", str(tmp_path / f"{run}.html"), timeout=60)
        for what, result in (("show", show), ("export", export), ("report", report)):
            assert result.returncode in (0, 7) and "Traceback" not in result.stderr, (what, result.stderr[-3000:])
            assert result.returncode == 0 or _one_line_error(result), (what, result.stderr)
            SEEN[f"{what} 7"] = seen(f"{what} 7", 0) + (result.returncode == 7)
        assert show.returncode == 0 and show.stdout.count("\n") > 5  # the steps' rows were not hit: all shown
        exported = json.loads((tmp_path / f"{run}.json").read_text())
        assert [s["step"] for s in exported["steps"]] == sorted(k[1] for k in original.steps if k[0] == run)
        assert (tmp_path / f"{run}.html").stat().st_size > 10_000
    bundle = cli("observe", "bundle", "--all", "-o", str(tmp_path / "all.weco"), timeout=120)
    assert bundle.returncode in (0, 7) and "Traceback" not in bundle.stderr, bundle.stderr[-3000:]
    if trial.unreadable or trial.changed & set(trial.current.values()):
        assert bundle.returncode == 7 and _one_line_error(bundle), bundle.stderr
        assert not (tmp_path / "all.weco").exists()
    SEEN["bundle 7"] = seen("bundle 7", 0) + (bundle.returncode == 7)

    # doctor --repair, then everything syncs
    repaired = cli("observe", "doctor", "--repair", timeout=120)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert cli("observe", "doctor").returncode == 0
    resynced = cli("observe", "sync", env=env, timeout=300)
    assert resynced.returncode == 0, resynced.stdout + resynced.stderr
    assert {state for state, _ in _states(journal_path).values()} <= {"delivered", "superseded"}
    assert_server_matches_journal(emulator, journal_path)
    after = {(r["run_id"].decode(), r["step"]): dict(r) for r in _rows(journal_path, "SELECT * FROM steps")}
    assert set(after) == set(original.steps), "repair lost or invented steps"
    blobs = {r["hash"].decode(): dict(r) for r in _rows(journal_path, "SELECT * FROM blobs")}
    for key, row in original.steps.items():
        for column in ("status", "description", "metrics", "parent_step", "metadata"):
            assert after[key][column] == row[column], (key, column)
        code = json.loads(row["code"]) if row["code"] else {}
        code_after = json.loads(after[key]["code"]) if after[key]["code"] else {}
        assert set(code_after) == set(code), key
        for path, digest in code.items():
            text = original.text(code_after[path], blobs)
            if digest in trial.unreadable:
                assert text is not None and b"lost to damage" in text and digest.encode() in text
                SEEN["lost file"] = 1
            else:
                assert code_after[path] == digest


@pytest.mark.parametrize("seed", PROPERTY_SEEDS)
def test_doctor_finds_every_flip_that_would_change_what_is_sent(original, journal_path, seed):
    from weco_observe import doctor

    trial = Trial(original, journal_path, 1000 + seed)
    must_find = bool(trial.unreadable or trial.changed & set(trial.current.values()))
    for event_id in trial.changed:  # a payload that no longer parses is damage wherever it is
        try:
            json.loads(_rows(journal_path, f"SELECT payload FROM events WHERE id = '{event_id}'")[0][0].decode())
        except ValueError:
            must_find = True
    report = doctor.check(journal_path)
    if must_find:
        assert report["damaged"], json.dumps(report["checks"], indent=1)


def test_the_trials_met_every_kind_of_damage():
    """Guards the seeds above: a test of damage that no trial ever produced would prove nothing."""
    if len(SEEN) == 0:
        pytest.skip("the end-to-end trials did not run in this session")
    for outcome in ("doctor 7", "rejected", "export 7", "report 7", "bundle 7", "lost file"):
        assert SEEN.get(outcome), f"no trial saw {outcome!r}: {SEEN}"


def test_a_damaged_step_row_is_shown_around_and_rebuilt_from_its_event(cli, tmp_path, journal_path):
    """Flipped bytes in a step's own row (its metrics' JSON, its description's UTF-8)."""
    (tmp_path / "train.py").write_text("lr = 0.1\n")
    run = cli.ok("observe", "init", "--metric", "loss", "--source", "train.py").stdout.strip()
    for step in (1, 2, 3):
        metrics = json.dumps({"loss": 1 / step})
        log = ("--run-id", run, "--step", str(step), "--metrics", metrics, "--description", f"try {step}")
        cli.ok("observe", "log", *log)
    conn = sqlite3.connect(journal_path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(journal_path.read_bytes())

    def in_row(value: bytes, key: bytes) -> int:
        """Where ``value`` sits in the step's own row, not inside its event's payload (after ``"key":``)."""
        found = [i for i in range(len(data)) if data.startswith(value, i) and not data[:i].endswith(key)]
        assert len(found) == 1, found
        return found[0]

    data[in_row(b'{"loss":0.5}', b'"metrics":')] ^= 0x04  # step 2's metrics: "{" becomes "\x7f", not JSON
    data[in_row(b"try 3", b'"description":"') + 1] = 0xFF  # step 3's description: not UTF-8
    journal_path.write_bytes(bytes(data))

    show = cli("observe", "show", run)
    assert show.returncode == 7 and _one_line_error(show), show.stderr
    assert "step 2's metrics" in show.stderr and "try 1" in show.stdout and "t\ufffdy 3" in show.stdout
    for args in (("export", run, "-o", str(tmp_path / "x.json")), ("report", run, "-o", str(tmp_path / "r.html"))):
        result = cli("observe", *args)
        assert result.returncode == 7 and _one_line_error(result), result.stderr
    assert [s["step"] for s in json.loads((tmp_path / "x.json").read_text())["steps"]] == [0, 1, 2, 3]
    assert cli("observe", "runs").returncode == 0

    checked = cli("observe", "doctor")
    assert checked.returncode == 7 and "step or run rows" in checked.stdout, checked.stdout
    cli.ok("observe", "doctor", "--repair")
    shown = json.loads(cli.ok("observe", "show", run, "--json").stdout)
    assert [(s["step"], s["metrics"].get("loss"), s["description"]) for s in shown["steps"]] == [
        (0, None, None),
        (1, 1.0, "try 1"),
        (2, 0.5, "try 2"),
        (3, 1 / 3, "try 3"),
    ]


def test_a_page_sqlite_cannot_read_ends_each_view_in_one_line(cli, journal_path):
    """Damage SQLite itself reports (a page of garbage): one line naming doctor --repair, never a traceback."""
    from test_doctor import damage

    runs = make_workload(journal_path, runs=2, steps=150, seed=3)
    damage(journal_path, "steps", 3)
    damage(journal_path, "events", 2)
    failed = []
    for args in (
        ("runs",),
        *(("show", run) for run in runs),
        *(("export", run) for run in runs),
        ("status",),
        ("bundle", "--all", "-o", "b.weco"),
    ):
        result = cli("observe", *args)
        assert "Traceback" not in result.stderr, (args, result.stderr[-2000:])
        assert result.returncode == 0 or _one_line_error(result), (args, result.returncode, result.stderr)
        if result.returncode:
            failed.append(args[0])
    assert {"runs", "show", "export", "status", "bundle"} <= set(failed)  # each met the damaged pages
