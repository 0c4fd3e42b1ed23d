"""Read-only queries of the journal: run summaries, the best step, and one run's full view.

Everything that shows a run (``runs``, ``show``, ``diff``, ``export``, the HTML
report and the local web UI) reads the journal through this module, so a run
looks the same everywhere and each query exists once. Nothing here writes the
journal (the only file written is a disposable cache of per-run scores next to
it, see :func:`_scores`). What is done with the data lives beside it, each in
a module named for it:

=============  ===============================================================
``views``      the queries: :func:`list_runs`, :func:`run_view`, ``show --json``
``tree``       the step tree (pure): effective code, branches, lane layout
``diffs``      code diffs between steps, and ``diff``'s text
``formats``    the ``runs`` table and the ``show`` tree as text (pure)
``export``     ``export`` as JSON, JSON Lines or CSV
``report``     the self-contained HTML report; ``ui`` serves the same page live
=============  ===============================================================

Definitions, used by every view:

- The **primary metric** is the run's ``metric``; a step's *value* is that
  metric in its ``metrics`` when it is a number, else none.
- The **best step** is the step with the best value by the run's goal (lowest
  for minimize, highest for maximize) among steps that are not ``failed``; a
  tie goes to the earliest step. A failed step is never best, and a run whose
  goal is unknown (``maximize`` NULL) has no best. It is computed by one SQL
  aggregate (:func:`run_summaries`) so ``runs`` never decodes a step.
- The **improvement** is the best value against the baseline's (step 0), as a
  difference and a percentage of the baseline, positive when better by the goal.
- A step's **code** is its own manifest, or, when it was logged without code,
  its nearest ancestor's (``tree.effective_code``); ``code_step`` names the
  step the code came from. Diffs compare these effective snapshots.
- The **tree** is drawn as the guide draws it, and laid out in lanes like a git
  graph for the report (``tree.tree_layout``).
- A step's **sync state** is the state of the outbox event that last set it, in
  one word (``outbox.sync_word``: ``pending``, ``delivered``, ``rejected``,
  ``superseded``, ``discarded``, or ``local`` with no event); a run's is its
  server id plus its pending and rejected counts.

The examples run as tests (``tests/test_view_doctests.py``) against a journal
``journal`` holding the guide's example run ``run_id``.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import outbox, tree
from .errors import JournalDamaged
from .journal import Journal
from .records import DamagedText, loads

__all__ = [
    "damage_error",
    "iso_time",
    "list_runs",
    "public_step",
    "run_summaries",
    "run_view",
    "show_json",
]

# One pass over a run's steps gives its step count, its failed count and its
# best non-failed step: ``min(value)`` (``max`` for a maximize run) is the only
# min/max aggregate, so SQLite takes the bare ``step`` from the row holding it;
# rows are visited in primary-key order (run, step) and a later equal value does
# not replace an earlier one, so ties go to the earliest step. Non-numeric
# values are ignored. Runs are scored in groups that share a metric and a goal,
# so the JSON path is a bound constant: SQLite then parses it once per query
# instead of once per step, which takes 40% off a large journal. The metric is
# looked up by a quoted path, so names with dots or spaces work (a name holding
# a double quote cannot be expressed in a SQLite JSON path and gets no best).
_SCORES_SQL = """
SELECT s.run_id AS id, count(*) AS steps, sum(s.status = 'failed') AS failed,
       {agg}(CASE WHEN s.status != 'failed' THEN (
           SELECT CASE WHEN typeof(v) IN ('integer', 'real') THEN v END
           FROM (SELECT json_extract(s.metrics, ?) AS v)
       ) END) AS value,
       s.step AS best_step
FROM steps s
WHERE s.run_id IN ({ids})
GROUP BY s.run_id
"""

_RUNS_SQL = """
SELECT r.id, r.server_id, r.remote_only, r.name, r.metric, r.maximize, r.created_at, r.updated_at,
       (SELECT json_extract(b.metrics, '$."' || replace(r.metric, '"', '') || '"') FROM steps b
        WHERE b.run_id = r.id AND b.step = 0 AND b.status != 'failed') AS baseline_value
FROM runs r {where}
"""


def iso_time(ts: float | None) -> str | None:
    """Seconds since the epoch as ISO 8601 UTC.

    >>> iso_time(1700000000.0)
    '2023-11-14T22:13:20Z'
    """
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _improvement(best: float | None, baseline: float | None, maximize: bool) -> dict[str, Any] | None:
    if best is None or baseline is None:
        return None
    delta = best - baseline
    better = delta if maximize else -delta
    pct = (better / abs(baseline) * 100.0) if baseline else None
    return {"baseline": baseline, "best": best, "delta": delta, "better_by": better, "percent": pct}


def _run_sync(row: Mapping[str, Any]) -> str:
    """One word for a run's sync state: remote-only, local (never created), pending, rejected, synced."""
    if row["rejected"]:
        return "rejected"
    if row["pending"]:
        return "pending"
    if row["remote_only"] or row["server_id"]:
        return "synced"
    return "local"


def _summary(row: Mapping[str, Any]) -> dict[str, Any]:
    maximize = bool(row["maximize"]) if row["maximize"] is not None else None
    best_value = row["value"]
    baseline = row["baseline_value"]
    if isinstance(baseline, bool) or not isinstance(baseline, (int, float)):
        baseline = None
    return {
        "id": row["id"],
        "server_id": row["server_id"],
        "remote_only": bool(row["remote_only"]),
        "name": row["name"],
        "metric": row["metric"],
        "maximize": maximize,
        "goal": None if row["maximize"] is None else "maximize" if maximize else "minimize",
        "steps": row["steps"],
        "failed": row["failed"],
        "best_step": row["best_step"] if best_value is not None else None,
        "best_value": best_value,
        "baseline_value": baseline,
        "improvement": _improvement(best_value, baseline, bool(maximize)),
        "pending": row["pending"],
        "rejected": row["rejected"],
        "sync": _run_sync(row),
        "created_at": iso_time(row["created_at"]),
        "last_activity": iso_time(row["updated_at"]),
        "last_activity_ts": row["updated_at"],
    }


def _query(journal: Journal, sql: str, params: Any = ()) -> list[dict[str, Any]]:
    try:
        return [dict(row) for row in journal.query(sql, params)]
    except sqlite3.OperationalError as exc:
        if "JSON" not in str(exc):
            raise
    # A step's metrics that no longer parse (flipped bytes) fail json_extract for the whole query: read
    # again, skipping them (run_view reports them). The guard costs a second parse, so only now.
    return [dict(row) for row in journal.query(_JSON_GUARD.sub(_GUARDED, sql), params)]


_JSON_GUARD = re.compile(r"json_extract\((\w+)\.metrics,")
_GUARDED = r"json_extract(CASE WHEN json_valid(\1.metrics) THEN \1.metrics END,"


def _parsed(value: Any, what: str, damage: list[str], kind: type | None = None) -> Any:
    """A JSON column of a step, or None with the damage noted (flipped bytes: the view shows the rest)."""
    try:
        parsed = loads(value, what)
    except JournalDamaged as exc:
        damage.append(str(exc))
        return None
    if kind is not None and parsed is not None and not isinstance(parsed, kind):
        damage.append(f"{what} is damaged in the journal: run `weco observe doctor --repair`")
        return None
    return parsed


#: Bumped when the cached fields or their meaning change; an old cache is then ignored.
#: 3: a run without a goal has no best step (version 2 scored it as if minimizing).
_CACHE_VERSION = 3


def _cache_path(journal: Journal) -> Path:
    return journal.path.with_name(journal.path.name + ".views-cache.json")


def _load_cache(journal: Journal) -> dict[str, Any]:
    try:
        data = json.loads(_cache_path(journal).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION or not isinstance(data.get("runs"), dict):
        return {}
    return data["runs"]


def _save_cache(journal: Journal, runs: dict[str, Any]) -> None:
    path = _cache_path(journal)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": _CACHE_VERSION, "runs": runs}, f, separators=(",", ":"))
        os.replace(tmp, path)
    except OSError:  # a read-only journal directory: views still work, just without the cache
        try:
            tmp.unlink()
        except OSError:
            pass


def _compute_scores(journal: Journal, runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Score ``runs`` (rows with ``id``, ``metric``, ``maximize``), one query per metric and goal."""
    groups: dict[tuple[str | None, bool], list[str]] = {}
    for run in runs:
        # Without a goal no value is better than another: such a run is scored for its counts only.
        metric = run["metric"] if run["maximize"] is not None else None
        groups.setdefault((metric, bool(run["maximize"])), []).append(run["id"])
    out: dict[str, dict[str, Any]] = {}
    for (metric, maximize), ids in groups.items():
        path = f'$."{metric.replace(chr(34), "")}"' if metric else None  # no metric: counts only
        for start in range(0, len(ids), 500):  # well under SQLite's bound-parameter limit
            chunk = ids[start : start + 500]
            sql = _SCORES_SQL.format(agg="max" if maximize else "min", ids=",".join("?" * len(chunk)))
            for row in _query(journal, sql, (path, *chunk)):
                out[row["id"]] = row
    for run in runs:
        out.setdefault(run["id"], {"id": run["id"], "steps": 0, "failed": 0, "value": None, "best_step": None})
    return out


def _scores(journal: Journal, runs: Sequence[Mapping[str, Any]], use_cache: bool) -> dict[str, dict[str, Any]]:
    """Step count, failed count and best step of each run, recomputed only for runs that changed.

    Every write to a run's steps (``log_step``, a bundle import) adds an outbox
    event, events are never deleted, and event ids are unique ULIDs; so the
    run's newest event (``seq`` and ``id``) fingerprints its steps. The scores
    of unchanged runs come from a small cache file next to the journal (0600),
    which turns ``runs`` on a large journal from a scan of every step's metrics
    into one index lookup per run. A fingerprint read before the scores can only
    make a later call recompute, never serve stale data.
    """
    if not use_cache:
        return _compute_scores(journal, runs)
    prints = outbox.fingerprints(journal)
    cache = _load_cache(journal)
    out = {}
    stale = []
    for run in runs:
        hit = cache.get(run["id"])
        if isinstance(hit, dict) and hit.get("fp") is not None and hit.get("fp") == prints.get(run["id"]):
            out[run["id"]] = hit
        else:
            stale.append(run)
    if stale:
        for run_id, row in _compute_scores(journal, stale).items():
            out[run_id] = {**row, "fp": prints.get(run_id)}
        _save_cache(journal, {k: v for k, v in out.items() if k in prints})
    return out


def run_summaries(journal: Journal, run_id: str | None = None, *, cache: bool = True) -> list[dict[str, Any]]:
    """One summary per run (most recent activity first), or just ``run_id``'s. SQL aggregates only.

    ``cache`` keeps the per-run scores of :func:`list_runs` in a sidecar file
    (see :func:`_scores`); a single run is always computed afresh.

    >>> run = run_summaries(journal)[0]
    >>> (run["metric"], run["goal"], run["steps"], run["best_step"], run["best_value"])
    ('val_bpb', 'minimize', 5, 4, 2.1)
    """
    if run_id is None:
        runs = _query(journal, _RUNS_SQL.format(where=""))
        scores = _scores(journal, runs, cache)
    else:
        runs = _query(journal, _RUNS_SQL.format(where="WHERE r.id = ?"), (run_id,))
        scores = _scores(journal, runs, use_cache=False)
    counts = outbox.unsent_and_rejected_by_run(journal, run_id)
    out = []
    for run in runs:
        score = scores[run["id"]]
        run.update(
            steps=score["steps"],
            failed=score["failed"],
            value=score["value"],
            best_step=score["best_step"],
            pending=counts.get((run["id"], "pending"), 0),
            rejected=counts.get((run["id"], "rejected"), 0),
        )
        out.append(_summary(run))
    out.sort(key=lambda r: (r["last_activity_ts"], r["id"]), reverse=True)
    return out


def list_runs(journal: Journal, *, cache: bool = True) -> list[dict[str, Any]]:
    """Every run in the journal with its summary (see :func:`run_summaries`)."""
    return run_summaries(journal, cache=cache)


# -- one run ------------------------------------------------------------------


def _value(metrics: Mapping[str, Any] | None, metric: str | None) -> float | None:
    if not metrics or metric is None:
        return None
    value = metrics.get(metric)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def run_view(journal: Journal, ref: str) -> dict[str, Any]:
    """Everything ``show`` and the report need about one run: summary, steps with tree and sync state.

    ``ref`` is a local id, a server id, or a unique prefix of either. Each step
    has ``parent_step``, ``status``, ``metrics``, ``value`` (primary metric),
    ``best_so_far``, ``is_best``, ``sync``, ``branched_from``, ``lane``,
    ``code_step`` and ``changed`` (files that differ from its parent's code).

    >>> view = run_view(journal, run_id[:12])  # a unique prefix is enough
    >>> view["best"]["step"], [(s["step"], s["parent_step"], s["branched_from"]) for s in view["steps"]][-2:]
    (4, [(3, 2, None), (4, 2, 2)])
    """
    run = journal.require_run(ref)
    summary = run_summaries(journal, run["id"])[0]
    rows = journal.query(
        "SELECT s.step, s.status, s.description, s.metrics, s.code, s.parent_step, s.metadata,"
        " s.created_at, s.updated_at, e.state AS sync, e.last_error AS sync_error"
        " FROM steps s LEFT JOIN events e ON e.id = s.event_id"
        " WHERE s.run_id = ? ORDER BY s.step",
        (run["id"],),
    )
    steps: list[dict[str, Any]] = []
    metric_names: dict[str, None] = {}
    damage: list[str] = []
    for r in rows:
        what = f"step {r['step']}'s"
        metrics = _parsed(r["metrics"], f"{what} metrics", damage, dict) or {}
        metric_names.update(dict.fromkeys(metrics))
        if isinstance(r["description"], DamagedText):
            damage.append(f"{what} description is damaged in the journal: run `weco observe doctor --repair`")
        steps.append(
            {
                "step": r["step"],
                "parent_step": r["parent_step"],
                "status": r["status"],
                "description": r["description"],
                "metrics": metrics,
                "code": _parsed(r["code"], f"{what} code manifest", damage, dict) or None,
                "metadata": _parsed(r["metadata"], f"{what} metadata", damage, dict) or None,
                "sync": outbox.sync_word(r["sync"]),
                "sync_error": r["sync_error"] if r["sync"] == outbox.REJECTED else None,
                "created_at": iso_time(r["created_at"]),
                "updated_at": iso_time(r["updated_at"]),
            }
        )
    tree.effective_code(steps)
    metric = summary["metric"]
    maximize = summary["maximize"]
    best_so_far: float | None = None
    for s in steps:
        s["value"] = _value(s["metrics"], metric)
        value = s["value"]
        if (
            s["status"] != "failed"
            and value is not None
            and maximize is not None  # no goal, no "best so far"
            and (best_so_far is None or (value > best_so_far if maximize else value < best_so_far))
        ):
            best_so_far = value
        s["best_so_far"] = best_so_far
        s["is_best"] = s["step"] == summary["best_step"]
    lane_count = tree.link_tree(steps)
    if metric:
        metric_names = {metric: None, **metric_names}
    summary["last_step"] = steps[-1]["step"] if steps else None
    best = None
    if summary["best_step"] is not None:
        best = {"step": summary["best_step"], "value": summary["best_value"], "improvement": summary["improvement"]}
    return {
        "run": summary,
        "metrics": list(metric_names),
        "best": best,
        "lanes": lane_count,
        "steps": steps,
        "damage": damage,
    }


def damage_error(damage: Sequence[str], shown: str) -> JournalDamaged | None:
    """The one-line error for a view that showed what it could: ``shown`` says what was written.

    >>> str(damage_error(["step 3's metrics is damaged in the journal: run ..."], "the run is shown"))
    "the run is shown without what is damaged: step 3's metrics is damaged in the journal: run ..."
    """
    if not damage:
        return None
    more = f" (and {len(damage) - 1} more)" if len(damage) > 1 else ""
    return JournalDamaged(f"{shown} without what is damaged: {damage[0]}{more}")


def public_step(step: Mapping[str, Any]) -> dict[str, Any]:
    """A step as the JSON outputs show it (no internal code manifests)."""
    out = {k: v for k, v in step.items() if k not in ("code", "manifest")}
    out["has_code"] = bool(step.get("code"))
    return out


def show_json(view: Mapping[str, Any]) -> dict[str, Any]:
    """The ``show --json`` document: the run, the best step and every step (see :func:`run_view`);
    ``damage`` lists what could not be read, when something could not."""
    doc = {
        "run": {k: v for k, v in view["run"].items() if k != "last_activity_ts"},
        "best": view["best"],
        "metrics": view["metrics"],
        "steps": [public_step(s) for s in view["steps"]],
    }
    if view.get("damage"):
        doc["damage"] = list(view["damage"])
    return doc
