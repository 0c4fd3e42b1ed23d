"""CLI commands for the local views: runs, show, diff, export, report, ui, setup.

Listed in ``cli.OBSERVE_COMMANDS``; the CLI imports this module only to run
or list these commands. Each imports the view modules it needs (``views``,
``formats``, ``diffs``, ``export``, ``report``, ``ui`` or ``skill``) inside its
body, makes one library call and prints the result. The journal is opened
through ``store.reader``: in cluster mode that merges what writers appended first.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from .cli import plural

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output (for agents and scripts).")]
ColorOpt = Annotated[str, typer.Option("--color", help="Colour the output: auto (on a terminal), always or never.")]


def _colour(mode: str) -> bool:
    from .errors import InvalidInput

    if mode not in ("auto", "always", "never"):
        raise InvalidInput(f"unknown --color {mode!r}: use auto, always or never")
    return mode == "always" or (mode == "auto" and sys.stdout.isatty())


def _journal():
    from . import store
    from .settings import Settings

    return store.reader(Settings.load())


def runs(as_json: JsonOpt = False) -> None:
    """List every run: ids, name, metric and goal, steps, best value, sync state, last activity."""
    from . import formats, views

    with _journal() as journal:
        rows = views.list_runs(journal)
    if as_json:
        print(json.dumps([{k: v for k, v in r.items() if k != "last_activity_ts"} for r in rows], indent=2))
    else:
        sys.stdout.write(formats.format_runs(rows))


def show(
    run: Annotated[str, typer.Argument(help="Run: local id, server id, or a unique prefix of either.")],
    as_json: JsonOpt = False,
    color: ColorOpt = "auto",
) -> None:
    """Show a run's step tree, each step's metric and description, and the best step."""
    from . import formats, views

    colour = _colour(color)
    with _journal() as journal:
        view = views.run_view(journal, run)
    if as_json:
        print(json.dumps(views.show_json(view), indent=2, ensure_ascii=False))
    else:
        sys.stdout.write(formats.format_show(view, colour=colour))
    damaged = views.damage_error(view["damage"], "the run is shown")
    if damaged is not None:
        raise damaged


def diff(
    run: Annotated[str, typer.Argument(help="Run: local id, server id, or a unique prefix of either.")],
    step: Annotated[int, typer.Argument(help="The step whose code to show.", min=0)],
    against: Annotated[
        int | None, typer.Option("--against", help="Compare with this step instead of the parent.", min=0)
    ] = None,
    context: Annotated[int, typer.Option("--context", "-U", help="Lines of context.", min=0)] = 3,
    color: ColorOpt = "auto",
) -> None:
    """Unified diff of every tracked file between a step and its parent (or --against another step).

    A step logged without code is compared using its nearest ancestor's code.
    """
    from . import diffs

    from .views import damage_error

    colour = _colour(color)
    with _journal() as journal:
        result = diffs.step_diff(journal, run, step, against, context=context)
        text = diffs.format_diff(result, colour=colour)
    sys.stdout.write(text)
    damaged = damage_error(diffs.damaged_files(result["files"]), "the diff is shown")
    if damaged is not None:
        raise damaged


def export(
    run: Annotated[str, typer.Argument(help="Run: local id, server id, or a unique prefix of either.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="json, jsonl or csv.")] = "json",
    code: Annotated[bool, typer.Option("--code", help="Include each step's code (path -> text).")] = False,
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", help="Write to this file, not stdout (0600, or the replaced file's mode)."),
    ] = None,
) -> None:
    """Export a run's steps, metrics and parents (and code with --code) as JSON, JSON Lines or CSV."""
    from . import export as export_mod

    with _journal() as journal:
        if output is None:
            export_mod.export_run(journal, run, fmt, sys.stdout, code=code)
            return
        n = export_mod.export_file(journal, run, fmt, output, code=code)
    print(f"wrote {plural(n, 'step')} to {output}", file=sys.stderr)


def report(
    run: Annotated[str, typer.Argument(help="Run: local id, server id, or a unique prefix of either.")],
    output: Annotated[
        str,
        typer.Option("--output", "-o", help="The HTML file to write (0600, or the replaced file's mode)."),
    ],
) -> None:
    """Write one self-contained HTML file (no network requests) with the tree, the chart and the diffs."""
    from . import report as report_mod

    with _journal() as journal:
        path, size = report_mod.write_report(journal, run, output)
    print(f"wrote {path} ({size / 1024:.0f} KiB): open it in a browser", file=sys.stderr)


def ui(
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0 picks a free one).")] = 8421,
    host: Annotated[str, typer.Option("--host", help="Address to bind; loopback by default.")] = "127.0.0.1",
) -> None:
    """Serve a read-only local web UI of every run, updating live as steps are logged. Ctrl-C stops it."""
    from . import ui as ui_mod

    ui_mod.serve(host=host, port=port)


def setup(
    agent: Annotated[str, typer.Argument(help="claude-code, cursor or codex.")],
    print_only: Annotated[bool, typer.Option("--print", help="Print the skill instead of writing it.")] = False,
    project: Annotated[
        bool, typer.Option("--project", help="Install into this project's folder instead of your home.")
    ] = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="Overwrite a SKILL.md written by neither us nor Weco (Weco's: never)."),
    ] = False,
) -> None:
    """Install the weco skill so your coding agent monitors its experiments by itself.

    It goes to the agent's skills folder as `weco`, the name the guide's "Use the
    weco skill to monitor the experiments" asks for. An official Weco skill there
    is never overwritten (not even with --force): ours then goes beside it as
    `weco-observe`, and a note says so.
    """
    from . import skill

    if print_only:
        sys.stdout.write(skill.skill_text(agent))
        return
    done = skill.install(agent, project=project, force=force)
    print(f"{done.outcome} {done.path}", file=sys.stderr)
    for note in done.notes:
        print(f"note: {note}", file=sys.stderr)
