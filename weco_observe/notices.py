"""Notes on calls that were recorded but may not be what the caller meant.

Logging never refuses these (the journal keeps everything, and the call may be
right): the CLI prints the note on stderr and the SDK gives a
``WecoObserveWarning``, from the same text.

- A ``--run-id`` that is a server run id this journal has never seen becomes a
  *remote-only* run, checked only when ``sync`` sends it. When it is one
  character off a server id the journal knows (a typo), the note says which.
- A step whose metrics lack the run's primary metric (logged for the first
  time or again: a re-log's metrics replace the old ones): the dashboard ranks
  steps and draws its chart by that metric, so the step drops out of both. Only
  when metrics are given and not empty, and the run's metric is known (not for
  a remote-only run). A failed step is exempt: a crash or an out-of-memory
  error often leaves nothing to measure, and a failed step is never ranked.

Only the standard library: ``weco observe log`` imports this only when it has
something to say.

    >>> one_edit_apart("5b7e0c1a-2222-4333-8444-555566667777", "5b7e0c1a-2222-4333-8444-555566667778")
    True
    >>> missing_primary_metric("val_bpb", {"memory_gb": 11.0}, "completed", 3, "--metrics")
    "step 3: --metrics lack the run's primary metric 'val_bpb' (the dashboard ranks steps by it); given: memory_gb"
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["first_seen_server_id", "missing_primary_metric", "near_server_ids", "one_edit_apart"]


def _canonical(run_id: str) -> str:
    """A server id as the server compares it: a UUID in any spelling (case, hyphens) as 32 hex digits."""
    import uuid

    try:
        return uuid.UUID(run_id).hex
    except ValueError:
        return run_id.lower()


def one_edit_apart(a: str, b: str) -> bool:
    """True when two different ids are the same UUID spelt differently, or one typo apart: one character
    changed, added or dropped, or two neighbours swapped."""
    if a == b:
        return False
    x, y = _canonical(a), _canonical(b)
    if x == y:
        return True
    if abs(len(x) - len(y)) > 1:
        return False
    if len(x) > len(y):
        x, y = y, x
    i = 0
    while i < len(x) and x[i] == y[i]:
        i += 1
    if len(x) < len(y):  # one character added
        return x[i:] == y[i + 1 :]
    return x[i + 1 :] == y[i + 1 :] or (x[i : i + 2] == y[i : i + 2][::-1] and x[i + 2 :] == y[i + 2 :])


def _known_runs(writer: Any, exclude: str | None) -> list[tuple[str, str, str | None]]:
    """``(server id, local id, name)`` of every run with a server id that the writer's journal knows."""
    sql = "SELECT server_id, id, name FROM runs WHERE server_id IS NOT NULL AND id != ?"
    if hasattr(writer, "query"):  # local mode: the journal itself
        return [(r[0], r[1], r[2]) for r in writer.query(sql, (exclude or "",))]
    # cluster mode: the merged journal, plus runs first seen by their server id that are not merged yet
    from . import ids
    from .errors import JournalUnavailable
    from .journal import SharedReader

    out: list[tuple[str, str, str | None]] = []
    try:
        rows = SharedReader(writer.path, settings=writer.settings).query(sql, (exclude or "",))
        out = [(r[0], r[1], r[2]) for r in rows]
    except JournalUnavailable:
        pass
    try:
        folders = [p.name for p in writer.files.segments_dir.iterdir()]
    except OSError:
        folders = []
    held = {server for server, _, _ in out}
    out += [(name, name, None) for name in folders if ids.looks_like_server_id(name) and name not in held]
    return out


def near_server_ids(writer: Any, ref: str, exclude: str | None = None) -> list[tuple[str, str, str | None]]:
    """Runs whose server id is one typo away from ``ref``: ``(server id, local id, name)``, at most three."""
    return [run for run in _known_runs(writer, exclude) if run[0] != ref and one_edit_apart(ref, run[0])][:3]


def first_seen_server_id(writer: Any, ref: str, run_id: str | None = None) -> str:
    """The note for a log to ``ref``, a server run id this journal had never seen (now the remote-only run
    ``run_id``): one line, naming a known run it is one typo away from, if any."""
    text = (
        f"{ref} is a server run id this journal has never seen: its steps are journaled for that id"
        " (a remote-only run) and the server checks it only at sync"
    )
    near = near_server_ids(writer, ref, run_id)
    if near:
        shown = [
            f"{server} (run {local}{f' {name!r}' if name else ''})" if local != server else server
            for server, local, name in near
        ]
        text += f"; did you mean {' or '.join(shown)}?"
    return text


def missing_primary_metric(
    metric: str | None, metrics: Mapping[str, Any] | None, status: str, step: int, name: str
) -> str | None:
    """The note for a step whose ``metrics`` (a non-empty object, given as argument ``name``) lack the run's
    primary ``metric``; None when there is nothing to say (no metrics given, the run's metric is not known,
    or the step failed)."""
    if not metrics or metric is None or metric in metrics or status == "failed":
        return None
    given = ", ".join(sorted(metrics))
    hint = next((f" (did you mean {metric!r} for {m!r}?)" for m in metrics if m.lower() == metric.lower()), "")
    return (
        f"step {step}: {name} lack the run's primary metric {metric!r} (the dashboard ranks steps by it);"
        f" given: {given}{hint}"
    )
