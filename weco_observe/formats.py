"""The text the CLI prints for ``runs`` and ``show``: aligned tables and the guide's tree drawing.

Pure functions from the dicts that ``views`` returns (``list_runs``,
``run_view``) to text; they read no journal, so the JSON outputs, the report and
these tables are all drawn from the same data. Colour is ANSI escapes, added
only when the caller asks (the CLI asks when stdout is a terminal).

Numbers print with six significant digits, the way people write metrics
(``2.366``, not ``2.3660000000000001``); a missing value is ``-``; a run's goal
prints as ``min``/``max``, or ``?`` when the journal does not know it (a run
first seen by its server id).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["format_runs", "format_show"]

_RESET = "\x1b[0m"


def _ago(ts: float | None, now: float | None = None) -> str:
    if ts is None:
        return "-"
    secs = max(0.0, (now or time.time()) - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{int(secs // size)}{unit} ago"
    return f"{int(secs)}s ago"


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
    """The ``weco observe runs`` table, one row per run (``now`` fixes the clock for "3m ago").

    >>> from weco_observe.views import list_runs
    >>> runs = list_runs(journal)
    >>> print(format_runs(runs, now=runs[0]["last_activity_ts"] + 180), end="")  # doctest: +ELLIPSIS
    RUN                               SERVER  NAME           METRIC         STEPS  BEST    SYNC       ACTIVE
    local-...  -       my-experiment  val_bpb (min)  5      2.1 @4  6 pending  3m ago
    """
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
    """The ``weco observe show`` text: a header, the tree as the guide draws it, the best step.

    >>> from weco_observe.views import run_view
    >>> print(format_show(run_view(journal, run_id)).split("\\n\\n", 1)[1], end="")
    [Baseline (step 0)]  val_bpb 2.366  baseline  [pending]
    +-- Step 1 (kept)  val_bpb 2.261  increase batch size to 32K  [pending]
    +-- Step 2 (kept)  val_bpb 2.2  halve the learning rate  [pending]
    +-- Step 3 (failed)  val_bpb 0  double model depth (OOM)  [pending]
    +-- Step 4 (kept, branched from 2)  val_bpb 2.1  tried warmup instead  [pending]  <- best
    <BLANKLINE>
    best: step 4, val_bpb 2.1 (11.2% better than baseline 2.366, -0.266)
    """
    run = view["run"]
    metric = run["metric"] or "?"

    def paint(text: str, code: str) -> str:
        return f"\x1b[{code}m{text}{_RESET}" if colour else text

    title = run["name"] or "(unnamed run)"
    server = run["server_id"] or "not synced yet"
    goal = run["goal"] or ("goal unknown: a run first seen by its server id" if run["remote_only"] else "goal unknown")
    lines = [
        paint(title, "1"),
        f"run {run['id']}  server {server}  sync: " + _sync_text(run),
        f"metric {metric} ({goal})  steps {run['steps']} ({run['failed']} failed)",
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
    if run["goal"] is None:
        lines.append("best: none (goal unknown)")
    elif best is None:
        lines.append(f"best: none yet (no kept step reports {metric})")
    else:
        imp = _improvement_text(best["improvement"])
        lines.append(f"best: step {best['step']}, {metric} {_num(best['value'])}" + (f" ({imp})" if imp else ""))
    return "\n".join(lines) + "\n"
