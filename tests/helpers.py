"""Small helpers shared by the tests (import them: ``from helpers import totals``)."""

from __future__ import annotations


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
