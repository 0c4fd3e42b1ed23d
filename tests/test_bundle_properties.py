"""Property: however logging is cut into bundles, and in whatever order (and however often)
they are imported, the receiving journal ends with exactly the sender's runs, steps and events."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weco_observe import bundle
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
