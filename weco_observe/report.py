"""The HTML views: one self-contained report file per run, and the page the local UI serves.

A report is a single ``.html`` file with everything inlined: the stylesheet and
script from ``assets/`` and the run's data (the ``show --json`` document plus
every step's diff against its parent) as a JSON island. The script draws the
tree and the chart as SVG in the browser. A Content-Security-Policy that allows
no source at all (``default-src 'none'``, inline style and script only) makes
"no network request" a property the browser enforces, so the file opens from
``file://`` on an air-gapped machine exactly as it does anywhere else.

The local UI (``ui.py``) serves the same page in ``ui`` mode, where the script
fetches the same data from ``/api`` instead and refreshes it live.
"""

from __future__ import annotations

import html
import json
import os
import time
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from . import diffs, views
from .errors import InvalidInput
from .files import output_file
from .journal import Journal

# Inline style and script only: no fetch, image, font or frame from anywhere.
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"
# The UI page may also call its own /api.
UI_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:; connect-src 'self';"
    " form-action 'self'"
)


@cache
def asset(name: str) -> str:
    """The text of a file in ``weco_observe/assets/``."""
    return resources.files("weco_observe").joinpath("assets").joinpath(name).read_text(encoding="utf-8")


def _json_island(data: Any) -> str:
    # "<" never appears raw, so no "</script>" or "<!--" inside a string can end the island.
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def page(mode: str, title: str, data: Any | None = None, *, dashboard: bool = False) -> str:
    """The HTML page: ``mode`` is ``report`` (``data`` embedded) or ``ui`` (data fetched from /api).

    ``dashboard`` is the relay's team dashboard (``ui`` mode behind a key): the sidebar
    also says whose key the page is open with and has a button to log out."""
    csp = REPORT_CSP if mode == "report" else UI_CSP
    island = f'<script id="data" type="application/json">{_json_island(data)}</script>\n' if data is not None else ""
    session = (
        '<form class="session" method="post" action="logout"><span id="viewer" class="viewer"></span>'
        '<button type="submit" id="logout">Log out</button></form>'
        if dashboard
        else ""
    )
    sidebar = (
        f'<nav class="sidebar" aria-label="runs">{session}<h2>Runs <span id="live" class="live">live</span></h2>'
        '<div id="filters"></div><div id="runs"></div></nav>'
        if mode == "ui"
        else ""
    )
    generated = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    flag = ' data-dashboard="1"' if dashboard else ""
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="referrer" content="no-referrer">\n'
        f"<title>{html.escape(title)}</title>\n<style>\n{asset('app.css')}</style>\n</head>\n"
        f'<body data-mode="{mode}"{flag} data-generated="{generated}">\n'
        f'<div class="app">{sidebar}<main id="main"><div class="empty">Loading…</div>'
        "<noscript><p>This page draws its charts with JavaScript; enable it to see the run.</p></noscript>"
        "</main></div>\n"
        f"{island}<script>\n{asset('app.js')}</script>\n</body>\n</html>\n"
    )


def page_data(view: dict[str, Any]) -> dict[str, Any]:
    """The run as the page script reads it: the ``show --json`` document plus the tree's lane count."""
    data = views.show_json(view)
    data["lanes"] = view["lanes"]
    return data


def report_html(journal: Journal, ref: str, damage: list[str] | None = None) -> str:
    """The report of run ``ref`` as one HTML string, every step's diff against its parent included.

    What is damaged in the journal is shown as such; its messages are added to ``damage``."""
    view = views.run_view(journal, ref)
    parent_diffs: dict[str, list[dict[str, Any]]] = {}
    by_step = {s["step"]: s for s in view["steps"]}
    for s in view["steps"]:
        parent = by_step.get(s["parent_step"]) if s["parent_step"] is not None else None
        if parent is None:
            continue
        parent_diffs[str(s["step"])] = diffs.file_diffs(
            journal, parent["manifest"], s["manifest"], f"step{parent['step']}", f"step{s['step']}"
        )
        view["damage"].extend(f"step {s['step']}: {m}" for m in diffs.damaged_files(parent_diffs[str(s["step"])]))
    if damage is not None:
        damage.extend(view["damage"])
    run = view["run"]
    title = f"{run['name'] or run['id']} · weco-observe report"
    return page("report", title, {"view": page_data(view), "diffs": parent_diffs})


def write_report(journal: Journal, ref: str, output: str | os.PathLike[str]) -> tuple[Path, int]:
    """Write the report of run ``ref`` to ``output`` (atomically); return ``(path, bytes)``.

    The file holds the run's code: it is written 0600, or with the mode of the file it
    replaces when that one is yours (``files.output_file``). When something is damaged in the
    journal the report is written with the rest, then JournalDamaged says what is missing.

    >>> path, size = write_report(journal, run_id, "report.html")
    >>> path.name, path.read_text(encoding="utf-8").startswith("<!doctype html>"), size == path.stat().st_size
    ('report.html', True, True)
    """
    damage: list[str] = []
    text = report_html(journal, ref, damage).encode("utf-8")
    path = Path(output)
    try:
        with output_file(path, text=False) as out:
            out.write(text)
    except OSError as exc:
        raise InvalidInput(f"cannot write {path}: {exc.strerror or exc}") from None
    damaged = views.damage_error(damage, f"wrote {path}")
    if damaged is not None:  # the report shows the rest; the caller learns what is missing
        raise damaged
    return path, len(text)
