"""The journal library: code snapshots, ids, one transaction per call, idempotent replay, reads."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid

from helpers import run_with_steps, totals
import pytest

from weco_observe import outbox
from weco_observe import codestore, ids
from weco_observe.errors import InvalidInput, JournalUnavailable
from weco_observe.journal import Journal


@pytest.fixture
def j(journal_path):
    with Journal(journal_path) as journal:
        yield journal


def blob_bytes(j: Journal) -> int:
    return j.query("SELECT coalesce(sum(length(data)), 0) AS n FROM blobs")[0]["n"]


def big_file(lines: int = 1500) -> list[str]:
    return [f"line_{i} = {i * 7919 % 104729}  # some padding text to make the file realistic\n" for i in range(lines)]


def test_unchanged_code_costs_nothing(j):
    text = "".join(big_file())
    run = j.create_run(source_code={"a.py": text}, metric="loss")
    before = blob_bytes(j), j.query("SELECT count(*) AS n FROM blobs")[0]["n"]
    for step in range(1, 20):
        j.log_step(run, step, code={"a.py": text})
    assert (blob_bytes(j), j.query("SELECT count(*) AS n FROM blobs")[0]["n"]) == before


def test_the_delta_base_is_looked_up_only_for_a_text_not_stored_yet(j, monkeypatch):
    text = "".join(big_file())
    run = j.create_run(source_code={"a.py": text}, metric="loss")
    asked = []
    real = Journal._code_at_or_below

    def code_at_or_below(conn, run_id, step):
        asked.append(step)
        return real(conn, run_id, step)

    monkeypatch.setattr(Journal, "_code_at_or_below", staticmethod(code_at_or_below))
    j.log_step(run, 1, code={"a.py": text})  # the baseline's text, stored already: no base needed
    assert asked == []
    j.log_step(run, 2, code={"a.py": text + "x = 1\n"})
    assert asked == [1]  # the parent's code is the base
    (base,) = [r["base"] for r in j.query("SELECT base FROM blobs WHERE depth > 0")]
    assert base == codestore.text_hash(text.encode())
    j.log_step(run, 2, code={"a.py": text + "x = 2\n"})  # a re-log: the step's own code is the base
    assert asked == [1]
    assert len(j.query("SELECT 1 FROM blobs WHERE depth > 0 AND base = ?", (base,))) == 1


def test_one_line_edit_costs_little(j):
    lines = big_file()
    run = j.create_run(source_code={"a.py": "".join(lines)}, metric="loss")
    full = blob_bytes(j)
    for step in range(1, 41):
        lines[step * 30] = f"edited_{step} = True\n"
        j.log_step(run, step, code={"a.py": "".join(lines)})
    deltas = [r["n"] for r in j.query("SELECT length(data) AS n FROM blobs WHERE depth > 0")]
    assert len(deltas) >= 32 and max(deltas) < 100, deltas  # a delta per edit...
    # ...and a full copy every MAX_DEPTH edits bounds the read cost: still far below 40 full copies
    assert blob_bytes(j) - full < 40 * full / 8
    # and every version reads back exactly, across the delta-chain cap
    lines = big_file()
    for step in range(1, 41):
        lines[step * 30] = f"edited_{step} = True\n"
        manifest = j.steps(run)[step]["code"]
        assert j.read_code(manifest) == {"a.py": "".join(lines)}
    depths = [r["depth"] for r in j.query("SELECT depth FROM blobs")]
    assert max(depths) <= codestore.MAX_DEPTH


def test_reads_back_from_a_fresh_process_cache(journal_path):
    """The delta chain decodes from disk, not only from the writer's in-memory cache."""
    with Journal(journal_path) as j:
        lines = big_file(300)
        run = j.create_run(source_code={"a.py": "".join(lines)}, metric="loss")
        for step in range(1, 5):
            lines[step] = "changed\n"
            j.log_step(run, step, code={"a.py": "".join(lines)})
    with Journal(journal_path) as fresh:
        assert fresh.read_code(fresh.steps(run)[4]["code"])["a.py"] == "".join(lines)


@pytest.mark.parametrize(
    "old,new",
    [
        ("", "x"),
        ("abc", "abc\n"),
        ("abcdef", "abXdef"),
        ("aaaa", "aa"),
        ("héllo wörld", "héllo world"),
        ("x" * 1000, "y" * 1000),
    ],
)
def test_codestore_round_trip(old, new):
    base = old.encode()
    depth, prefix, suffix, payload = codestore.encode(new.encode(), base, 0)
    assert codestore.decode(payload, prefix, suffix, base if depth else None) == new.encode()


def test_ids_are_unique_time_sortable_and_distinct_from_server_ids():
    made = [ids.ulid() for _ in range(5000)]
    assert made == sorted(made) and len(set(made)) == len(made)
    run = ids.new_run_id()
    assert ids.is_local_run_id(run) and not ids.looks_like_server_id(run)
    assert ids.looks_like_server_id(str(uuid.uuid4()))
    assert abs(ids.ulid_time(run) - __import__("time").time()) < 5


def test_create_run_is_idempotent_by_event_id(j):
    run_id, event_id = ids.new_run_id(), ids.ulid()
    for _ in range(3):
        assert j.create_run(source_code={"a.py": "a"}, metric="m", run_id=run_id, event_id=event_id) == run_id
    assert totals(j) == {
        "runs": 1,
        "steps": 1,
        "pending": 1,
        "delivered": 0,
        "rejected": 0,
        "superseded": 0,
        "discarded": 0,
    }


def test_log_step_is_idempotent_by_event_id(j):
    run = j.create_run(source_code={"a.py": "a"}, metric="m")
    event_id = ids.ulid()
    first = j.log_step(run, 1, metrics={"m": 1.0}, event_id=event_id)
    again = j.log_step(run, 1, metrics={"m": 1.0}, event_id=event_id)
    assert first == again
    assert totals(j)["pending"] == 2


def test_a_failing_log_writes_nothing(j, journal_path):
    """All of a log or none of it: an error inside the transaction rolls every row back."""
    run = j.create_run(source_code={"a.py": "a"}, metric="m")

    def snapshot():
        conn = sqlite3.connect(journal_path)
        out = [conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("runs", "steps", "blobs", "events")]
        conn.close()
        return out

    before = snapshot()
    original = j.store_code

    def store_then_fail(conn, code, base, digests=None):
        original(conn, code, base, digests)  # the blob row is written...
        raise sqlite3.OperationalError("disk I/O error")  # ...then the disk fails

    j.store_code = store_then_fail
    with pytest.raises(JournalUnavailable, match="disk I/O"):
        j.log_step(str(uuid.uuid4()), 1, code={"new.py": "brand new text"})  # would add a remote-only run too
    j._known_blobs.clear()
    j._texts.clear()
    assert snapshot() == before
    del j.store_code
    j.log_step(run, 1, code={"new.py": "brand new text"})  # and the journal is still usable
    assert snapshot()[1:] == [before[1] + 1, before[2] + 1, before[3] + 1]


def test_find_run_by_prefix(j):
    a = j.create_run(source_code={"a.py": "a"}, metric="m")
    time.sleep(0.003)  # ids made in one millisecond differ only in their last characters
    b = j.create_run(source_code={"a.py": "a"}, metric="m")
    assert j.find_run(a[:-3], prefix=True)["id"] == a
    assert j.find_run(a[:-3]) is None  # exact match only without prefix
    with pytest.raises(InvalidInput, match="several"):
        j.find_run("local-", prefix=True)
    assert j.require_run(b)["id"] == b


def test_payload_is_the_request_body_with_code_as_hashes(j):
    run = j.create_run(source_code={"a.py": "a = 1\n"}, metric="loss", maximize=True, name="n", metadata={"k": [1, 2]})
    j.log_step(run, 1, description="d", metrics={"loss": 1}, code={"a.py": "a = 2\n"}, metadata={"s": 1})
    create, step = [json.loads(r["payload"]) for r in j.query("SELECT payload FROM events ORDER BY seq")]
    assert create == {
        "source_code": {"a.py": codestore.text_hash(b"a = 1\n")},
        "metric_name": "loss",
        "maximize": True,
        "name": "n",
        "metadata": {"k": [1, 2]},
    }
    assert step == {
        "step": 1,
        "status": "completed",
        "description": "d",
        "metrics": {"loss": 1},
        "code": {"a.py": codestore.text_hash(b"a = 2\n")},
        "parent_step": 0,
        "metadata": {"s": 1},
    }
    assert j.read_code(step["code"]) == {"a.py": "a = 2\n"}


def test_outbox_state_transitions(j):
    run = j.create_run(source_code={"a.py": "a"}, metric="m")
    (create,) = j.query("SELECT id FROM events")
    assert outbox.begin_create(j, create["id"]) is False  # the attempt is counted before the request
    outbox.create_delivered(j, create["id"], run, "srv-1")
    old = j.log_step(run, 1)["event_id"]
    new = j.log_step(run, 1, metrics={"m": 2})["event_id"]
    outbox.failed(j, new, "timeout")
    (new_seq,) = j.query("SELECT seq FROM events WHERE id = ?", (new,))[0]
    assert outbox.steps_delivered(j, [(new, run, 1, new_seq, 1, 0)]) == 1
    states = {r["id"]: (r["state"], r["attempts"]) for r in j.query("SELECT id, state, attempts FROM events")}
    assert states == {create["id"]: ("delivered", 1), old: ("superseded", 0), new: ("delivered", 2)}
    rejected = j.log_step(run, 2)["event_id"]
    outbox.rejected(j, rejected, "422")
    assert totals(j)["rejected"] == 1
    assert outbox.requeue_rejected(j, run) == 1
    assert totals(j)["pending"] == 1
    assert j.find_run("srv-1")["id"] == run


def test_iter_query_streams_everything(j):
    run_with_steps(j, 1200)
    seen = [r["step"] for r in j.iter_query("SELECT step FROM events WHERE kind = 'log_step' ORDER BY seq", batch=100)]
    assert seen == list(range(1, 1201))
