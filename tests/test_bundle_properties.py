"""Properties of bundles.

- However logging is cut into bundles, and in whatever order (and however often) they are
  imported, the receiving journal ends with exactly the sender's runs, steps and events.
- Whatever is done to a real bundle (below, "hostile bundles"), importing it never gives a
  traceback and never imports part of it.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import random
import re
import shutil
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

from bundle_helpers import journal_rows
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from weco_observe import bundle, doctor, ids, replay
from weco_observe.errors import InvalidInput
from weco_observe.journal import Journal

log_op = st.tuples(st.just("log"), st.integers(0, 2), st.integers(0, 6), st.booleans(), st.booleans())
bundle_op = st.sampled_from([("bundle",), ("bundle_all",), ("bundle_run",)])
ops = st.lists(st.one_of(log_op, log_op, log_op, bundle_op), min_size=1, max_size=25)


def snapshot(journal: Journal) -> dict:
    steps = {
        (r["run_id"], r["step"]): (
            r["status"],
            r["metrics"],
            r["parent_step"],
            r["event_id"],
            json.dumps(journal.read_code(json.loads(r["code"]) if r["code"] else None)),
        )
        for r in journal.query("SELECT * FROM steps")
    }
    events = {r["id"]: (r["run_id"], r["kind"], r["step"], r["payload"]) for r in journal.query("SELECT * FROM events")}
    runs = {r["id"]: (r["name"], r["metric"]) for r in journal.query("SELECT * FROM runs")}
    return {"runs": runs, "steps": steps, "events": events}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, seed=st.integers(0, 2**32 - 1))
def test_any_cut_and_any_import_order_converges(ops, seed):
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files: list[Path] = []
        with Journal(root / "a" / "journal.db") as a:
            a.conn.execute("PRAGMA synchronous=OFF")
            runs = [a.create_run(source_code={"t.py": f"run = {i}\n"}, metric="loss", name=f"r{i}") for i in range(3)]

            def write(**kw) -> None:
                path = root / f"{len(files)}.weco"
                if bundle.write_bundle(a, path, **kw)["events"]:
                    files.append(path)

            for op in ops:
                if op[0] == "log":
                    _, r, step, failed, code = op
                    a.log_step(
                        runs[r],
                        step,
                        status="failed" if failed else "completed",
                        metrics={"loss": rng.random()},
                        code={"t.py": f"step = {step} {rng.random()}\n" * 20} if code else None,
                    )
                elif op[0] == "bundle":
                    write()
                elif op[0] == "bundle_all":
                    write(everything=True)
                else:
                    write(run_ref=runs[rng.randrange(3)])
            write()  # whatever is left
            want = snapshot(a)

        order = files + rng.sample(files, k=min(len(files), rng.randrange(3)))  # some twice
        rng.shuffle(order)
        with Journal(root / "b" / "journal.db") as b:
            for path in order:
                bundle.import_bundle(b, path, batch=rng.choice([1, 3, 2000]))
            assert snapshot(b) == want
            # The newest event of every step is still to be sent; nothing is sent twice per step state.
            newest = {}
            for row in b.query("SELECT id, run_id, step, state FROM events WHERE kind = 'log_step' ORDER BY id"):
                newest[(row["run_id"], row["step"])] = row["state"]
            assert set(newest.values()) <= {"pending"}


# -- hostile bundles ---------------------------------------------------------------------------
# Real bundles, mutated by hypothesis: bytes flipped, inserted or deleted in the file or in any
# member; rows changed, dropped, duplicated, swapped or moved between members; fields given the
# wrong type, huge numbers, NaN, lone surrogates (escaped or as raw bytes) or deep nesting;
# checksums recomputed or not. Whatever the mutation, an import either is refused with a one-line
# BundleInvalid / InvalidInput and leaves every table as it was, or is accepted and leaves a
# journal that doctor calls healthy, that sync can plan, in which every run has its create (and a
# run with a server id a settled one), and into which the same file imports as a no-op.


REMOTE = "5b7e0c1a-2222-4333-8444-555566667777"


@lru_cache(maxsize=1)
def hostile_base() -> dict:
    """Box A's bundle 2 (two runs, a remote-only run, code deltas, a re-logged step), its key, and
    box B's journal after bundle 1 (the template each example copies)."""
    root = Path(tempfile.mkdtemp(prefix="weco-hostile-bundles-"))
    atexit.register(shutil.rmtree, root, True)
    key = root / "site.key"
    key.write_text(hashlib.sha256(b"test key").hexdigest() * 2 + "\n")
    key.chmod(0o600)
    with Journal(root / "a" / "journal.db") as a:
        run = a.create_run(source_code={"train.py": "lr = 0.1\n" * 40}, metric="loss", name="exp")
        other = a.create_run(source_code={"eval.py": "k = 5\n"}, metric="acc", maximize=True, name="other")
        a.log_step(run, 1, metrics={"loss": 1.5}, description="first")
        a.log_step(REMOTE, 1, metrics={"loss": 0.9})
        bundle.write_bundle(a, root / "1.weco")
        a.log_step(run, 2, metrics={"loss": 1.2}, code={"train.py": "lr = 0.2\n" * 40}, metadata={"gpu": "a100"})
        a.log_step(run, 1, metrics={"loss": 1.4}, description="again")
        a.log_step(other, 1, metrics={"acc": 0.5}, code={"eval.py": "k = 6\n"})
        a.log_step(REMOTE, 2, metrics={"loss": 0.8}, parent_step=1)
        bundle.write_bundle(a, root / "2.weco", sign=key)
    with Journal(root / "b" / "journal.db") as b:
        bundle.import_bundle(b, root / "1.weco")
    with zipfile.ZipFile(root / "2.weco") as zf:
        raw = {n: zf.read(n) for n in (*bundle.MEMBERS, bundle.MANIFEST)}
        comment = zf.comment
    return {"root": root, "key": key, "raw": raw, "comment": comment, "file": (root / "2.weco").read_bytes()}


def _deep(depth: int) -> str:
    return f"<deep:{depth}>"


_DEEP = re.compile(r'"<deep:(\d+)>"')


def _encode(row: object, raw_surrogates: bool) -> bytes:
    """A row as a forger writes it: NaN/Infinity as JSON's extensions spell them; lone surrogates
    escaped or as their raw bytes; deep nesting spliced in as text (json.dumps would recurse)."""
    text = json.dumps(row, separators=(",", ":"), ensure_ascii=not raw_surrogates)
    text = _DEEP.sub(lambda m: "[" * int(m.group(1)) + "]" * int(m.group(1)), text)
    return text.encode("utf-8", "surrogatepass") + b"\n"


nasty = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**63 - 1, 2**63, 2**64, -1, 10**400, 0]),
    st.floats(),  # NaN and infinities included
    st.text(max_size=12),
    st.sampled_from(["\ud800", "x\udfff", "\udbff\udfff", "\x00", "\x1b]0;pwned\x07", "../../admin", "local-", ""]),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.one_of(st.integers(), st.text(max_size=4)), max_size=3),
    st.integers(1, 5000).map(_deep),
)
#: the fields of every member, and a few no member has
FIELDS = sorted(
    {"id", "run_id", "kind", "step", "state", "payload", "created_at", "updated_at", "server_id", "remote_only"}
    | {"name", "metric", "maximize", "metadata", "status", "metrics", "description", "parent_step", "code"}
    | {"event_id", "hash", "size", "base", "depth", "prefix", "suffix", "data", "source_code", "metric_name"}
    | {"additional_instructions", "admin", ""}
)
MANIFEST_FIELDS = FIELDS + ["format", "version", "bundle_id", "sha256", "bytes", "lines", "runs", "events"]


def _objects(value: object, depth: int = 0) -> list[dict]:
    """``value`` and the objects inside it (a row, its payload, the payload's metrics ...)."""
    if not isinstance(value, dict) or depth > 3:
        return []
    return [value] + [o for v in value.values() for o in _objects(v, depth + 1)]


def _scalars(members: dict[str, list]) -> list:
    """Every id, hash, number and string in the bundle: plausible values in the wrong place
    (another run's server id, an event id as a run id, a step number as a size ...)."""
    out: set = set()
    for rows in members.values():
        for row in rows:
            for obj in _objects(row):
                out.update(v for v in obj.values() if isinstance(v, (str, int, float)) and not isinstance(v, bool))
    return sorted(out, key=repr)


def _mutate_rows(data, members: dict[str, list], manifest: dict) -> None:
    names = list(bundle.MEMBERS)
    pool = _scalars(members)
    values = st.one_of(nasty, st.sampled_from(pool))
    ops = ["set"] * 6 + ["rename"] * 2 + ["clone"] * 2 + ["delete", "dup", "drop", "swap", "move"]
    for _ in range(data.draw(st.integers(1, 2), label="edits")):
        op = data.draw(st.sampled_from([*ops, "swap_members", "manifest"]), label="op")
        name = data.draw(st.sampled_from(names), label="member")
        rows = members[name]
        if op == "swap_members":
            other = data.draw(st.sampled_from(names), label="with")
            members[name], members[other] = members[other], members[name]
            continue
        if op == "manifest":
            where = data.draw(st.sampled_from(["top", "members", "counts"]), label="where")
            target = manifest if where == "top" else manifest.setdefault(where, {})
            if where == "members":
                target = target.setdefault(name, {})
            key = data.draw(st.sampled_from(MANIFEST_FIELDS), label="manifest key")
            target[key] = data.draw(values, label="manifest value")
            continue
        if not rows:
            continue
        i = data.draw(st.integers(0, len(rows) - 1), label="line")
        if op == "dup":
            rows.insert(i, json.loads(json.dumps(rows[i])))
        elif op == "clone":  # a copy with a new id: a second create, a second run ...
            copy = json.loads(json.dumps(rows[i]))
            copy[data.draw(st.sampled_from(["id", "hash", "event_id"]), label="id field")] = data.draw(
                st.sampled_from([ids.ulid(), ids.new_run_id(), hashlib.sha256(str(i).encode()).hexdigest()]),
                label="new id",
            )
            rows.append(copy)
        elif op == "drop":
            rows.pop(i)
        elif op == "swap":
            j = data.draw(st.integers(0, len(rows) - 1), label="other line")
            rows[i], rows[j] = rows[j], rows[i]
        elif op == "move":
            members[data.draw(st.sampled_from(names), label="to")].append(rows.pop(i))
        else:
            target = data.draw(st.sampled_from(_objects(rows[i])), label="object")
            key = data.draw(st.sampled_from(sorted(target) + FIELDS), label="key")
            if op == "delete":
                target.pop(key, None)
            elif op == "rename":  # a metric name, a metadata key, a code path ... becomes anything
                target[data.draw(st.one_of(st.text(max_size=6), st.sampled_from(["\ud800", "", "é"])))] = target.pop(
                    key, None
                )
            else:
                target[key] = data.draw(values, label="value")


def _write(
    path: Path, members: dict[str, list], manifest: dict, recompute: str, raw_surrogates: bool, comment: bytes = b""
) -> None:
    """The mutant as a zip. A manifest that came out as it was is written as its original bytes
    (so a mutation that changed nothing keeps a valid signature)."""
    original = hostile_base()["raw"][bundle.MANIFEST]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, rows in members.items():
            data = b"".join(_encode(row, raw_surrogates) for row in rows)
            if recompute != "none":
                manifest.setdefault("members", {})[name] = {
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "bytes": len(data),
                    "lines": len(rows),
                }
            zf.writestr(name, data)
        if recompute == "all":
            manifest["counts"] = {k: len(members[f"{k}.jsonl"]) for k in ("runs", "steps", "events", "blobs")}
            manifest["checksum"] = bundle._manifest_checksum(manifest)
        same = manifest == json.loads(original)
        zf.writestr(bundle.MANIFEST, original if same else _encode(manifest, raw_surrogates))
        zf.comment = comment


def _invariants(journal: Journal) -> list[str]:
    rows = journal.query(
        "SELECT r.id, r.server_id, r.remote_only, count(e.id) AS creates, max(e.state) AS state FROM runs r"
        " LEFT JOIN events e ON e.run_id = r.id AND e.kind = 'create_run' GROUP BY r.id"
    )
    bad = [f"{r['id']}: {r['creates']} creates" for r in rows if r["creates"] != (0 if r["remote_only"] else 1)]
    bad += [f"{r['id']}: server id, create {r['state']}" for r in rows if r["server_id"] and r["state"] == "pending"]
    return bad


def _import_mutant(path: Path, *, verify: bool = False) -> tuple[str | None, dict]:
    """Import ``path`` into a copy of box B; check the property; return (refusal or None, journals)."""
    base = hostile_base()
    work = path.parent / "b"
    shutil.copytree(base["root"] / "b", work)
    journal_path = work / "journal.db"
    before = journal_rows(journal_path)
    with Journal(journal_path) as b:
        try:
            bundle.import_bundle(b, path, batch=3, verify_key=base["key"] if verify else None)
        except InvalidInput as exc:  # BundleInvalid is one; anything else is a traceback
            message = str(exc)
            event(f"refused: {message.partition(': ')[2].partition(' ')[0]}")
            assert "\n" not in message and "\r" not in message and len(message) < 1200, message
            assert journal_rows(journal_path) == before
            return message, before
        event("accepted")
        assert _invariants(b) == []
        replay.plan(b)
        assert bundle.import_bundle(b, path)["already_imported"]
    assert not doctor.check(journal_path)["damaged"]
    return None, journal_rows(journal_path)


@lru_cache(maxsize=1)
def _genuine_rows() -> dict:
    base = hostile_base()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "genuine.weco"
        path.write_bytes(base["file"])
        refusal, rows = _import_mutant(path, verify=True)
        assert refusal is None
        return rows


def _content(rows: dict) -> dict:
    """A journal's content without the times an import stamps (imports.imported_at, migrations)."""
    return {t: v for t, v in rows.items() if t not in ("imports", "_migrations")}


#: each property takes 3-10 s on the shared 2-core box
HOSTILE = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@HOSTILE
@given(data=st.data())
def test_a_bundle_with_bytes_flipped_inserted_or_deleted_is_refused_or_harmless(data):
    base = hostile_base()
    target = data.draw(st.sampled_from(["file", *bundle.MEMBERS, bundle.MANIFEST]), label="target")
    blob = bytearray(base["file"] if target == "file" else base["raw"][target])
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        at = data.draw(st.integers(0, max(len(blob) - 1, 0)), label="at")
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]), label="op")
        if op == "flip" and blob:
            blob[at] ^= data.draw(st.integers(1, 255), label="mask")
        elif op == "insert":
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=8), label="bytes")
        else:
            del blob[at : at + data.draw(st.integers(1, 8), label="n")]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mutant.weco"
        if target == "file":
            path.write_bytes(bytes(blob))
        else:
            raw = {**base["raw"], target: bytes(blob)}
            recompute = data.draw(st.booleans(), label="recompute")
            manifest_bytes = raw[bundle.MANIFEST]
            if recompute and target != bundle.MANIFEST:
                manifest = json.loads(manifest_bytes)
                manifest["members"][target] = {
                    "sha256": hashlib.sha256(raw[target]).hexdigest(),
                    "bytes": len(raw[target]),
                    "lines": raw[target].count(b"\n"),
                }
                manifest["checksum"] = bundle._manifest_checksum(manifest)
                manifest_bytes = json.dumps(manifest).encode()
            with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
                for name in (*bundle.MEMBERS, bundle.MANIFEST):
                    zf.writestr(name, manifest_bytes if name == bundle.MANIFEST else raw[name])
        _import_mutant(path)


@HOSTILE
@given(data=st.data(), recompute=st.sampled_from(["none", "members", *["all"] * 18]), raw_surrogates=st.booleans())
def test_a_bundle_with_rows_or_fields_forged_is_refused_or_leaves_a_sound_journal(data, recompute, raw_surrogates):
    base = hostile_base()
    members = {n: [json.loads(line) for line in base["raw"][n].splitlines()] for n in bundle.MEMBERS}
    manifest = json.loads(base["raw"][bundle.MANIFEST])
    _mutate_rows(data, members, manifest)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mutant.weco"
        _write(path, members, manifest, recompute, raw_surrogates)
        _import_mutant(path)


@HOSTILE
@given(data=st.data(), raw_surrogates=st.booleans())
def test_a_signed_bundle_changed_in_any_way_is_refused_by_its_key(data, raw_surrogates):
    """With --verify-key, a forgery that gets past every other check (checksums recomputed) is
    refused by the signature; whatever is accepted imports exactly what the genuine bundle does."""
    base = hostile_base()
    members = {n: [json.loads(line) for line in base["raw"][n].splitlines()] for n in bundle.MEMBERS}
    manifest = json.loads(base["raw"][bundle.MANIFEST])
    _mutate_rows(data, members, manifest)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mutant.weco"
        _write(path, members, manifest, "all", raw_surrogates, comment=base["comment"])
        refusal, rows = _import_mutant(path, verify=True)
    if refusal is None:
        event("accepted: the genuine content")
        assert _content(rows) == _content(_genuine_rows())
