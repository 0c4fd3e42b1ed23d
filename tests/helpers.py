"""Small helpers shared by the tests (import them: ``from helpers import totals``)."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def totals(journal) -> dict[str, int]:
    """Runs, steps and events by state of an open journal (pending counts every unsent state)."""
    from weco_observe import outbox

    counts = outbox.counts(journal)
    runs, steps = journal.query("SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM steps)")[0]
    return {
        "runs": runs,
        "steps": steps,
        "pending": sum(counts[s] for s in outbox.UNSENT),
        "delivered": counts["delivered"] + counts["possible_duplicate"],
        "rejected": counts["rejected"],
        "superseded": counts["superseded"],
        "discarded": counts["discarded"],
    }


def run_with_steps(
    writer,
    steps: int,
    *,
    metric: str = "loss",
    maximize: bool = False,
    name: str | None = None,
    source: dict[str, str] | None = None,
    code=None,
    metrics=None,
) -> str:
    """Create a run with ``writer`` (an open Journal or a SegmentWriter) and log steps 1..``steps``; its id.

    ``source``: step 0's code (default ``{"train.py": "x = 0\\n"}``). ``code(i)``: step i's code dict,
    or None to leave it unchanged (default: unchanged). ``metrics(i)``: step i's metrics (default
    ``{metric: 1 / i}``)."""
    run = writer.create_run(source_code=source or {"train.py": "x = 0\n"}, metric=metric, maximize=maximize, name=name)
    for i in range(1, steps + 1):
        writer.log_step(
            run,
            i,
            metrics=metrics(i) if metrics else {metric: 1 / i},
            code=code(i) if code else None,
        )
    return run


def dump(db: Path) -> dict[str, list[tuple]]:
    """Every row of every table of the SQLite file ``db``, sorted: two dumps are equal iff nothing was
    written (``{}`` when there is no file)."""
    if not db.exists():
        return {}
    conn = sqlite3.connect(db)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: sorted(conn.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr) for t in tables}
    finally:
        conn.close()
