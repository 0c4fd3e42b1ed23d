"""Read-only views of the journal: run summaries, the step tree, the best step, code diffs, exports.

Everything that shows a run (``runs``, ``show``, ``diff``, ``export``, the HTML
report and the local web UI) reads through this module, so a run looks the same
everywhere and each query exists once. Nothing here writes the journal (the
only file written is a disposable cache of per-run scores next to it, see
:func:`_scores`).

Definitions, used by every view:

- The **primary metric** is the run's ``metric``; a step's *value* is that
  metric in its ``metrics`` when it is a number, else none.
- The **best step** is the step with the best value by the run's goal (lowest
  for minimize, highest for maximize) among steps that are not ``failed``; a
  tie goes to the earliest step. A failed step is never best. It is computed by
  one SQL aggregate (:func:`run_summaries`) so ``runs`` never decodes a step.
- The **improvement** is the best value against the baseline's (step 0), as a
  difference and a percentage of the baseline, positive when better by the goal.
- A step's **code** is its own manifest, or, when it was logged without code,
  its nearest ancestor's (following ``parent_step``); ``code_step`` names the
  step the code came from. Diffs compare these effective snapshots.
- The **tree** is drawn as the guide draws it: one line per step in step order,
  ``kept``/``failed``, and ``branched from N`` when a step's parent is not the
  step just above it. The report lays the same tree out in lanes, like a git
  graph (:func:`tree_layout`), so a 1,000-step run stays readable.
- A step's **sync state** is the state of the outbox event that last set it
  (``pending``, ``delivered``, ``rejected``); a run's is its server id plus its
  pending and rejected counts.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import InvalidInput
from .journal import Journal

__all__ = [
    "export_run",
    "file_diffs",
    "format_diff",
    "format_runs",
    "format_show",
    "iso_time",
    "list_runs",
    "run_summaries",
    "run_view",
    "show_json",
    "step_diff",
    "tree_layout",
    "unified_diff",
]

EXPORT_FORMATS = ("json", "jsonl", "csv")

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

_OUTBOX_SQL = """
SELECT state, run_id, count(*) AS n FROM events
WHERE state IN ('pending', 'rejected') {where}
GROUP BY state, run_id
"""


def iso_time(ts: float | None) -> str | None:
    """Seconds since the epoch as ISO 8601 UTC: ``1700000000.0`` -> ``"2023-11-14T22:13:20Z"``."""
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _ago(ts: float | None, now: float | None = None) -> str:
    if ts is None:
        return "-"
    secs = max(0.0, (now or time.time()) - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{int(secs // size)}{unit} ago"
    return f"{int(secs)}s ago"


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
    maximize = bool(row["maximize"]) if row["maximize"] is not None else False
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
        "improvement": _improvement(best_value, baseline, maximize),
        "pending": row["pending"],
        "rejected": row["rejected"],
        "sync": _run_sync(row),
        "created_at": iso_time(row["created_at"]),
        "last_activity": iso_time(row["updated_at"]),
        "last_activity_ts": row["updated_at"],
    }


def _query(journal: Journal, sql: str, params: Any = ()) -> list[dict[str, Any]]:
    return [dict(row) for row in journal.query(sql, params)]


#: Bumped when the cached fields or their meaning change; an old cache is then ignored.
_CACHE_VERSION = 2


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
        groups.setdefault((run["metric"], bool(run["maximize"])), []).append(run["id"])
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
    prints = {
        r["id"]: r["fp"]
        for r in journal.query(
            "SELECT r.id, (SELECT e.seq || ':' || e.id FROM events e WHERE e.run_id = r.id"
            " ORDER BY e.seq DESC LIMIT 1) AS fp FROM runs r"
        )
    }
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

    >>> run_summaries(journal)[0]["best_step"]  # doctest: +SKIP
    4
    """
    if run_id is None:
        runs = _query(journal, _RUNS_SQL.format(where=""))
        outbox = _query(journal, _OUTBOX_SQL.format(where=""))
        scores = _scores(journal, runs, cache)
    else:
        runs = _query(journal, _RUNS_SQL.format(where="WHERE r.id = ?"), (run_id,))
        outbox = _query(journal, _OUTBOX_SQL.format(where="AND run_id = ?"), (run_id,))
        scores = _scores(journal, runs, use_cache=False)
    counts: dict[tuple[str, str], int] = {(o["run_id"], o["state"]): o["n"] for o in outbox}
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


# -- the tree -------------------------------------------------------------------


def tree_layout(steps: Sequence[Mapping[str, Any]]) -> tuple[dict[int, int], int]:
    """Assign each step a lane (column) for a git-graph drawing; return ``({step: lane}, lanes)``.

    Rows are the steps in step order. Each node's *heir* (the child that
    continues its lane) is its child with the largest subtree, preferring a kept
    child, then the earliest; the other children start new chains. A chain
    occupies its lane from its parent's row to its last node's row, and chains
    are packed into the fewest lanes greedily (interval colouring), so lanes are
    reused once a branch ends. Steps whose parent is unknown start their own chain.

    >>> tree_layout([{"step": 0, "parent_step": None, "status": "completed"},
    ...              {"step": 1, "parent_step": 0, "status": "failed"},
    ...              {"step": 2, "parent_step": 0, "status": "completed"}])
    ({0: 0, 2: 0, 1: 1}, 2)
    """
    row = {s["step"]: i for i, s in enumerate(steps)}
    children: dict[int, list[Mapping[str, Any]]] = {}
    heads: list[Mapping[str, Any]] = []
    for s in steps:
        parent = s["parent_step"]
        if parent is None or parent not in row or row[parent] >= row[s["step"]]:
            heads.append(s)
        else:
            children.setdefault(parent, []).append(s)
    size: dict[int, int] = {}
    for s in reversed(steps):
        size[s["step"]] = 1 + sum(size[c["step"]] for c in children.get(s["step"], ()))
    heir: dict[int, int] = {}
    for parent, kids in children.items():
        best = max(kids, key=lambda c: (size[c["step"]], c["status"] != "failed", -c["step"]))
        heir[parent] = best["step"]
        heads.extend(c for c in kids if c is not best)
    chains = []
    for head in heads:
        nodes = [head["step"]]
        while nodes[-1] in heir:
            nodes.append(heir[nodes[-1]])
        parent = head["parent_step"]
        start = row[parent] if parent in row and row[parent] < row[head["step"]] else row[head["step"]]
        chains.append((start, row[head["step"]], nodes))
    chains.sort(key=lambda c: (c[0], c[1]))
    lane_end: list[int] = []
    lanes: dict[int, int] = {}
    for start, _, nodes in chains:
        end = row[nodes[-1]]
        for lane, busy_until in enumerate(lane_end):
            if busy_until < start:
                lane_end[lane] = end
                break
        else:
            lane = len(lane_end)
            lane_end.append(end)
        for n in nodes:
            lanes[n] = lane
    return lanes, len(lane_end)


def _effective_code(steps: Sequence[dict[str, Any]]) -> None:
    """Fill ``code_step``/``manifest`` of each step: its own code, else its nearest ancestor's."""
    by_step = {s["step"]: s for s in steps}
    for s in steps:  # parents come before children (parent_step < step), so one pass suffices
        if s["code"]:
            s["code_step"], s["manifest"] = s["step"], s["code"]
            continue
        parent = by_step.get(s["parent_step"]) if s["parent_step"] is not None else None
        if parent is not None and parent["step"] < s["step"]:
            s["code_step"], s["manifest"] = parent["code_step"], parent["manifest"]
        else:
            s["code_step"], s["manifest"] = None, {}


def _changed(manifest: Mapping[str, str], base: Mapping[str, str]) -> list[str]:
    return sorted(p for p in set(manifest) | set(base) if manifest.get(p) != base.get(p))


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

    >>> run_view(journal, "local-01j")["best"]["step"]  # doctest: +SKIP
    4
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
    for r in rows:
        metrics = json.loads(r["metrics"]) if r["metrics"] else {}
        metric_names.update(dict.fromkeys(metrics))
        steps.append(
            {
                "step": r["step"],
                "parent_step": r["parent_step"],
                "status": r["status"],
                "description": r["description"],
                "metrics": metrics,
                "code": json.loads(r["code"]) if r["code"] else None,
                "metadata": json.loads(r["metadata"]) if r["metadata"] else None,
                "sync": r["sync"] or "local",
                "sync_error": r["sync_error"] if r["sync"] == "rejected" else None,
                "created_at": iso_time(r["created_at"]),
                "updated_at": iso_time(r["updated_at"]),
            }
        )
    _effective_code(steps)
    lanes, lane_count = tree_layout(steps)
    metric = summary["metric"]
    maximize = summary["maximize"]
    best_so_far: float | None = None
    previous: int | None = None
    by_step = {s["step"]: s for s in steps}
    for s in steps:
        s["value"] = _value(s["metrics"], metric)
        value = s["value"]
        if (
            s["status"] != "failed"
            and value is not None
            and (best_so_far is None or (value > best_so_far if maximize else value < best_so_far))
        ):
            best_so_far = value
        s["best_so_far"] = best_so_far
        s["is_best"] = s["step"] == summary["best_step"]
        parent = s["parent_step"]
        s["branched_from"] = parent if parent is not None and parent != previous else None
        s["lane"] = lanes[s["step"]]
        base = by_step[parent]["manifest"] if parent in by_step else {}
        s["changed"] = _changed(s["manifest"], base) if parent is not None else sorted(s["manifest"])
        s["files"] = sorted(s["manifest"])
        previous = s["step"]
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
    }


def public_step(step: Mapping[str, Any]) -> dict[str, Any]:
    """A step as the JSON outputs show it (no internal code manifests)."""
    out = {k: v for k, v in step.items() if k not in ("code", "manifest")}
    out["has_code"] = bool(step.get("code"))
    return out


def show_json(view: Mapping[str, Any]) -> dict[str, Any]:
    """The ``show --json`` document: the run, the best step and every step (see :func:`run_view`)."""
    return {
        "run": {k: v for k, v in view["run"].items() if k != "last_activity_ts"},
        "best": view["best"],
        "metrics": view["metrics"],
        "steps": [public_step(s) for s in view["steps"]],
    }


# -- diffs ----------------------------------------------------------------------


def unified_diff(a: str, b: str, path_a: str, path_b: str, context: int = 3) -> list[str]:
    """Unified diff lines (``---``, ``+++``, ``@@``, then `` ``/``-``/``+`` lines), without newlines.

    The common head and tail are trimmed before difflib runs, so a small edit
    to a large file costs little (the report diffs every step of a long run).

    >>> unified_diff("a\\nb\\n", "a\\nc\\n", "x", "x")[2:]
    ['@@ -1,2 +1,2 @@', ' a', '-b', '+c']
    """
    if a == b:
        return []
    la, lb = a.splitlines(), b.splitlines()
    head = 0
    limit = min(len(la), len(lb))
    while head < limit and la[head] == lb[head]:
        head += 1
    tail = 0
    while tail < limit - head and la[len(la) - 1 - tail] == lb[len(lb) - 1 - tail]:
        tail += 1
    lo = max(0, head - context)
    ta, tb = la[lo : len(la) - max(0, tail - context)], lb[lo : len(lb) - max(0, tail - context)]
    out = [f"--- {path_a}", f"+++ {path_b}"]
    matcher = difflib.SequenceMatcher(None, ta, tb, autojunk=False)
    for group in matcher.get_grouped_opcodes(context):
        i1, i2, j1, j2 = group[0][1], group[-1][2], group[0][3], group[-1][4]
        out.append(f"@@ -{_range(lo + i1, i2 - i1)} +{_range(lo + j1, j2 - j1)} @@")
        for tag, a1, a2, b1, b2 in group:
            if tag == "equal":
                out.extend(" " + line for line in ta[a1:a2])
                continue
            if tag in ("replace", "delete"):
                out.extend("-" + line for line in ta[a1:a2])
            if tag in ("replace", "insert"):
                out.extend("+" + line for line in tb[b1:b2])
    if a and b and a[-1:] != b[-1:] and len(out) > 2:
        out.append("\\ No newline at end of file")
    return out if len(out) > 2 else []


def _range(start: int, length: int) -> str:
    # Same convention as difflib/GNU diff: an empty range names the line before it.
    first = start + 1 if length else start
    return f"{first}" if length == 1 else f"{first},{length}"


def file_diffs(
    journal: Journal, old: Mapping[str, str], new: Mapping[str, str], old_label: str, new_label: str, context: int = 3
) -> list[dict[str, Any]]:
    """Diff two code manifests file by file: ``[{"path", "status", "lines"}]`` for each changed file."""
    out = []
    for path in sorted(set(old) | set(new)):
        if old.get(path) == new.get(path):
            continue
        a = journal.read_blob(old[path]) if path in old else ""
        b = journal.read_blob(new[path]) if path in new else ""
        status = "added" if path not in old else "removed" if path not in new else "modified"
        lines = unified_diff(
            a,
            b,
            f"{old_label}/{path}" if path in old else "/dev/null",
            f"{new_label}/{path}" if path in new else "/dev/null",
            context,
        )
        out.append({"path": path, "status": status, "lines": lines})
    return out


def step_diff(
    journal: Journal,
    ref: str,
    step: int,
    against: int | None = None,
    view: Mapping[str, Any] | None = None,
    context: int = 3,
) -> dict[str, Any]:
    """The code diff of ``step`` against its parent (default) or step ``against``.

    Returns ``{"run_id", "step", "against", "code_step", "against_code_step", "files": [...]}``.
    Raises InvalidInput for an unknown step, or for step 0 without ``against``
    (the baseline has no parent).
    """
    if view is None:
        view = run_view(journal, ref)
    by_step = {s["step"]: s for s in view["steps"]}
    run_id = view["run"]["id"]
    if step not in by_step:
        raise InvalidInput(f"run {run_id} has no step {step}: `weco observe show {run_id}` lists its steps")
    target = by_step[step]
    if against is None:
        against = target["parent_step"]
        if against is None:
            raise InvalidInput(
                f"step {step} has no parent (it is {'the baseline' if step == 0 else 'a root'}): "
                "pass --against STEP to compare it with another step"
            )
    if against not in by_step:
        raise InvalidInput(f"run {run_id} has no step {against} to compare against")
    other = by_step[against]
    files = file_diffs(journal, other["manifest"], target["manifest"], f"step{against}", f"step{step}", context)
    return {
        "run_id": run_id,
        "step": step,
        "against": against,
        "code_step": target["code_step"],
        "against_code_step": other["code_step"],
        "files": files,
    }


_COLOURS = {"+": "\x1b[32m", "-": "\x1b[31m", "@": "\x1b[36m", "h": "\x1b[1m"}
_RESET = "\x1b[0m"


def format_diff(diff: Mapping[str, Any], colour: bool = False) -> str:
    """The text of ``weco observe diff``: one unified diff per changed file, coloured on request."""
    out: list[str] = []
    if not diff["files"]:
        note = f"no code changes between step {diff['against']} and step {diff['step']}"
        if diff["code_step"] is None and diff["against_code_step"] is None:
            note += " (neither has code in this journal)"
        return note + "\n"
    for f in diff["files"]:
        for line in f["lines"]:
            if not colour:
                out.append(line)
            elif line.startswith(("---", "+++")):
                out.append(_COLOURS["h"] + line + _RESET)
            elif line[:1] in _COLOURS:
                out.append(_COLOURS[line[0]] + line + _RESET)
            else:
                out.append(line)
    return "\n".join(out) + "\n"


# -- text formats ---------------------------------------------------------------


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.6g}"


def _improvement_text(imp: Mapping[str, Any] | None) -> str:
    if not imp:
        return ""
    word = "better" if imp["better_by"] > 0 else "worse" if imp["better_by"] < 0 else "same"
    if word == "same":
        return f"same as baseline {_num(imp['baseline'])}"
    amount = f"{abs(imp['percent']):.1f}%" if imp["percent"] is not None else _num(abs(imp["delta"]))
    return f"{amount} {word} than baseline {_num(imp['baseline'])}, {imp['delta']:+.4g}"


def _sync_text(run: Mapping[str, Any]) -> str:
    if run["pending"] or run["rejected"]:
        return f"{run['pending']} pending" + (f", {run['rejected']} rejected" if run["rejected"] else "")
    return {"synced": "synced", "local": "not synced"}.get(run["sync"], run["sync"])


def format_runs(runs: Sequence[Mapping[str, Any]], now: float | None = None) -> str:
    """The ``weco observe runs`` table."""
    if not runs:
        return "no runs yet: start one with `weco observe init --metric NAME --source FILE`\n"
    header = ["RUN", "SERVER", "NAME", "METRIC", "STEPS", "BEST", "SYNC", "ACTIVE"]
    table = [header]
    for r in runs:
        goal = {"maximize": "max", "minimize": "min"}.get(r["goal"], "?")
        best = "-" if r["best_step"] is None else f"{_num(r['best_value'])} @{r['best_step']}"
        sync = _sync_text(r)
        table.append(
            [
                r["id"],
                (r["server_id"] or "-")[:8],
                (r["name"] or "-")[:28],
                f"{r['metric'] or '?'} ({goal})",
                str(r["steps"]),
                best,
                sync,
                _ago(r["last_activity_ts"], now),
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    return "\n".join(lines) + "\n"


def format_show(view: Mapping[str, Any], colour: bool = False) -> str:
    """The ``weco observe show`` text: a header, the tree as the guide draws it, the best step."""
    run = view["run"]
    metric = run["metric"] or "?"

    def paint(text: str, code: str) -> str:
        return f"\x1b[{code}m{text}{_RESET}" if colour else text

    title = run["name"] or "(unnamed run)"
    server = run["server_id"] or "not synced yet"
    lines = [
        paint(title, "1"),
        f"run {run['id']}  server {server}  sync: " + _sync_text(run),
        (
            f"metric {metric} ({run['goal'] or 'goal unknown: a run first seen by its server id'})"
            f"  steps {run['steps']} ({run['failed']} failed)"
        ),
        "",
    ]
    for s in view["steps"]:
        if s["step"] == 0:
            label = "[Baseline (step 0)]"
        else:
            tags = ["failed" if s["status"] == "failed" else "kept"]
            if s["branched_from"] is not None:
                tags.append(f"branched from {s['branched_from']}")
            elif s["parent_step"] is None:
                tags.append("no parent")
            label = f"+-- Step {s['step']} ({', '.join(tags)})"
        parts = [label]
        if s["value"] is not None:
            parts.append(f"{metric} {_num(s['value'])}")
        if s["description"]:
            desc = " ".join(s["description"].split())
            parts.append(desc if len(desc) <= 72 else desc[:71] + "…")
        if s["sync"] in ("pending", "rejected"):
            parts.append(f"[{s['sync']}]")
        text = "  ".join(parts)
        if s["is_best"]:
            text = paint(text + "  <- best", "1;32")
        elif s["status"] == "failed":
            text = paint(text, "2")
        lines.append(text)
    lines.append("")
    best = view["best"]
    if best is None:
        lines.append(f"best: none yet (no kept step reports {metric})")
    else:
        imp = _improvement_text(best["improvement"])
        lines.append(f"best: step {best['step']}, {metric} {_num(best['value'])}" + (f" ({imp})" if imp else ""))
    return "\n".join(lines) + "\n"


# -- export ---------------------------------------------------------------------


def _export_steps(journal: Journal, view: Mapping[str, Any], code: bool) -> Iterator[dict[str, Any]]:
    for s in view["steps"]:
        row = {
            "step": s["step"],
            "parent_step": s["parent_step"],
            "status": s["status"],
            "description": s["description"],
            "metrics": s["metrics"],
            "value": s["value"],
            "is_best": s["is_best"],
            "sync": s["sync"],
            "created_at": s["created_at"],
            "updated_at": s["updated_at"],
            "metadata": s["metadata"],
            "changed_files": s["changed"],
        }
        if code:
            row["code_step"] = s["code_step"]
            row["code"] = journal.read_code(s["manifest"])
        yield row


def export_run(journal: Journal, ref: str, fmt: str, out: io.TextIOBase | Any, code: bool = False) -> int:
    """Write a run's steps to ``out`` as ``json`` (one document), ``jsonl`` (a run line, then one
    line per step) or ``csv`` (one row per step, one column per metric). Returns the step count.

    With ``code``, each step carries its effective code ``{path: text}`` and
    ``code_step`` (in CSV, as a JSON column).
    """
    if fmt not in EXPORT_FORMATS:
        raise InvalidInput(f"unknown --format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
    view = run_view(journal, ref)
    run = {k: v for k, v in view["run"].items() if k != "last_activity_ts"}
    steps = _export_steps(journal, view, code)
    n = 0
    if fmt == "json":
        out.write("{\n")
        out.write(f'"run": {json.dumps(run, ensure_ascii=False)},\n"steps": [')
        for n, row in enumerate(steps, 1):
            out.write(("\n" if n == 1 else ",\n") + json.dumps(row, ensure_ascii=False))
        out.write("\n]}\n")
    elif fmt == "jsonl":
        out.write(json.dumps({"type": "run", **run}, ensure_ascii=False) + "\n")
        for n, row in enumerate(steps, 1):  # noqa: B007 - n is the count returned
            out.write(json.dumps({"type": "step", "run_id": run["id"], **row}, ensure_ascii=False) + "\n")
    else:
        columns = [
            "run_id",
            "step",
            "parent_step",
            "status",
            "description",
            "is_best",
            "sync",
            "created_at",
            "updated_at",
            "changed_files",
        ]
        columns += [f"metric:{m}" for m in view["metrics"]]
        if code:
            columns += ["code_step", "code"]
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for n, row in enumerate(steps, 1):  # noqa: B007 - n is the count returned
            flat = {k: row[k] for k in columns if k in row}
            flat["run_id"] = run["id"]
            flat["changed_files"] = " ".join(row["changed_files"])
            for m in view["metrics"]:
                flat[f"metric:{m}"] = row["metrics"].get(m, "")
            if code:
                flat["code"] = json.dumps(row["code"], ensure_ascii=False)
            writer.writerow(flat)
    return n
