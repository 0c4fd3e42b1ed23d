"""The command line: ``weco observe ...`` (and ``weco-observe ...``), plus ``weco login``/``logout``/``setup``.

Each command parses its flags, makes one library call and formats the result;
no SQL or HTTP here. Library errors become a one-line ``error: ...`` on stderr
with the exit code of the error class (see ``errors.py``).

``log`` is the hot path, run once per experiment by agents in a loop, so the CLI
builds only the command it runs. Typer turns a function into a click command by
inspecting its signature, which costs more than the rest of ``log``; the groups
below are click's documented lazy groups ("Lazily Loading Subcommands"): they
know their commands by name and import and build one only when it is run, or
listed by ``--help`` and shell completion. This module imports only typer and
the small validation modules at load time; each command imports what it needs
inside its body.

Adding a command: write a plain function in a ``cli_*.py`` module (typer
``Annotated`` options, a docstring for the help), then add one line
``"name": "module:function"`` to ``OBSERVE_COMMANDS`` (``weco observe NAME`` and
``weco-observe NAME``) or ``TOP_COMMANDS`` (``weco NAME``). Help lists commands
in table order. Then run ``python tests/cli_reference.py --write`` to refresh
the README's reference.
"""

# No `from __future__ import annotations` here: typer reads each option from its annotation, and evaluates
# string annotations four times while it builds a command (4.8 ms for `log`, against 0.7 ms from objects);
# evaluating every command's annotations once at import costs 0.3 ms.
import atexit
import importlib
import json
import os
import sys
from typing import Annotated, Any, NoReturn, Optional

import typer
from typer.core import TyperGroup, TyperOption

from . import errors, validate
from .settings import Settings

#: ``weco observe NAME`` (and ``weco-observe NAME``) -> "module:function" in this package.
OBSERVE_COMMANDS = {
    "init": "cli:init",
    "log": "cli:log",
    "status": "cli:status",
    "sync": "cli_sync:sync_command",
    "discard": "cli_sync:discard_command",
    "merge": "cli_sync:merge_command",
    "emulator": "cli_sync:emulator_command",
    "runs": "cli_views:runs",
    "show": "cli_views:show",
    "diff": "cli_views:diff",
    "export": "cli_views:export",
    "report": "cli_views:report",
    "ui": "cli_views:ui",
    "setup": "cli_views:setup",
    "bundle": "cli_bundle:bundle_cmd",
    "import": "cli_bundle:import_cmd",
    "doctor": "cli_bundle:doctor_cmd",
    "serve": "cli_relay:serve",
}

#: Commands of the official client's top level that ``weco-observe``, which has no top level, also takes.
ACCOUNT_COMMANDS = {
    "login": "cli:login",
    "logout": "cli:logout",
}

#: ``weco NAME`` -> "module:function"; the ``observe`` group is listed after these.
TOP_COMMANDS = {
    **ACCOUNT_COMMANDS,
    # The official guide says `weco setup claude-code`; `weco observe setup` is the same command.
    "setup": "cli_views:setup",
}


def plural(n: int, noun: str) -> str:
    """``plural(1, "step")`` is "1 step", ``plural(2, "step")`` is "2 steps"."""
    return f"{n} {noun if n == 1 else noun + 's'}"


def _print_version(ctx: Any, param: Any, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        from . import __version__

        print(f"weco-observe {__version__}")
        ctx.exit()


class LazyGroup(TyperGroup):
    """A typer group whose commands are built from ``table`` on first use, one at a time.

    Every group also takes ``--version``, and run bare it prints its help.
    """

    table: dict[str, str] = {}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # A click option, not a typer callback parameter: typer would inspect the callback of every group
        # on every run, `log` included, for a flag that is rarely given.
        self.params.append(
            TyperOption(
                param_decls=["--version"],
                is_flag=True,
                default=False,
                is_eager=True,
                expose_value=False,
                callback=_print_version,
                help="Print the version and exit.",
            )
        )

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if not args and self.no_args_is_help and not ctx.resilient_parsing:
            # A bare `weco` asks what it can do: print the help and succeed, as docker, kubectl, cargo and
            # pip do. (Click 8.2+ raises a usage error here, exit 2, with the help as its message.)
            typer.echo(ctx.get_help(), color=ctx.color)
            ctx.exit()
        return super().parse_args(ctx, args)

    def list_commands(self, ctx: Any) -> list[str]:
        return [*self.table, *(name for name in self.commands if name not in self.table)]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = self.commands.get(cmd_name)
        if command is None and cmd_name in self.table:
            module, _, function = self.table[cmd_name].partition(":")
            target = getattr(importlib.import_module(f".{module}", __package__), function)
            if isinstance(target, typer.Typer):  # a command with subcommands of its own (`serve keys ...`)
                command = typer.main.get_group(target)
                command.name = cmd_name
            else:
                command = typer.main.get_command_from_info(
                    typer.models.CommandInfo(name=cmd_name, callback=target),
                    pretty_exceptions_short=True,
                    rich_markup_mode=self.rich_markup_mode,
                )
            self.commands[cmd_name] = command
        return command

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args and args[0] not in self.commands and args[0] not in self.table:
            # Not a command: build them all, since "Did you mean ...?" is chosen from those built.
            for name in self.table:
                self.get_command(ctx, name)
        return super().resolve_command(ctx, args)


def _lazy_group(table: dict[str, str]) -> type[LazyGroup]:
    # typer takes the group's class, not an instance, so each table gets its own subclass.
    return type("LazyGroup", (LazyGroup,), {"table": table})


def _group_callback() -> None:
    """weco-observe."""


app = typer.Typer(
    name="weco",
    help="weco-observe: local-first `weco observe`. Every call is journaled locally and synced later.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_lazy_group(TOP_COMMANDS),
)
observe = typer.Typer(
    help="Track experiments: journal runs and steps locally, sync them to Weco when the network allows.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=_lazy_group(OBSERVE_COMMANDS),
    # With no command registered on the Typer itself, only a callback makes typer build a group.
    callback=_group_callback,
)
app.add_typer(observe, name="observe")
#: The ``weco-observe`` script: the ``observe`` group plus ``login``/``logout``, since it has no top level.
observe_script = typer.Typer(
    help=observe.info.help,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=_lazy_group({**OBSERVE_COMMANDS, **ACCOUNT_COMMANDS}),
    callback=_group_callback,
)

SourceOpt = Annotated[Optional[str], typer.Option("--source", "-s", help="Single source code file to track.")]
SourcesOpt = Annotated[
    Optional[list[str]],
    typer.Option("--sources", help="Multiple source code files to track: --sources a.py b.py (or repeat the flag)."),
]
MetadataOpt = Annotated[Optional[str], typer.Option("--metadata", help="JSON object of extra metadata.")]
StrictOpt = Annotated[
    bool,
    typer.Option("--strict", help="Exit non-zero (3) when the journal cannot be written, instead of 0."),
]
MaxSourceOpt = Annotated[
    float,
    typer.Option(
        "--max-source-mb",
        metavar="<MiB>",
        help=f"Refuse a source file larger than this (default {validate.DEFAULT_MAX_SOURCE_MB} MiB).",
    ),
]


def fail(message: str, code: int = errors.EXIT_BAD_INPUT) -> typer.Exit:
    """Print a one-line error to stderr; return the Exit to raise."""
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(code)


def _sources(source: str | None, sources: list[str] | None, required: bool, max_mb: float) -> dict[str, str] | None:
    files = ([source] if source else []) + list(sources or [])
    if not files:
        if required:
            raise errors.InvalidInput("no source files: pass --source FILE or --sources FILE [FILE ...]")
        return None
    return validate.read_sources(files, validate.max_source_bytes(max_mb))


def _metadata(text: str | None) -> dict[str, Any] | None:
    # `--metadata ''` is refused, not ignored: an empty value is a mistake (an unset shell variable, say).
    return None if text is None else validate.parse_json_object(text, "--metadata")


def _unwritable(exc: errors.JournalUnavailable, op: str, kwargs: dict[str, Any], strict: bool, what: str) -> bool:
    """The journal could not be written: spill the call, say so loudly; True if it was saved."""
    from . import spill

    where = spill.write(op, kwargs)
    if where is not None:
        print(
            f"weco-observe: WARNING {exc}; {what} saved to {where} and imported on the next successful open",
            file=sys.stderr,
        )
    else:
        print(f"weco-observe: WARNING {exc}; could not save {what} anywhere ({what} dropped)", file=sys.stderr)
    if strict:
        raise typer.Exit(errors.EXIT_JOURNAL)
    return where is not None


def _open_writer() -> Any:
    """The journal's writer (the journal itself, or in cluster mode a segment writer), with any
    calls spilled while it could not be written replayed into it first."""
    from . import store

    return store.writer(Settings.load())


def _trigger_sync(backlog: bool = False) -> None:
    from . import background

    settings = Settings.load()
    background.trigger(settings.journal_path, settings=settings, merge=backlog)


#: Cluster mode: a run with this many segment files unmerged gets a background merge, key or not.
MERGE_BACKLOG = 64

#: Set by `init` and `log` once everything they did is committed and closed (see _exit).
_skip_teardown = False


def _done() -> None:
    global _skip_teardown
    _skip_teardown = True


def init(
    metric: Annotated[str, typer.Option("--metric", help="Primary metric name (e.g. val_bpb).")],
    source: SourceOpt = None,
    sources: SourcesOpt = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Run name.")] = None,
    goal: Annotated[str, typer.Option("--goal", "-g", help="maximize/max or minimize/min.")] = "minimize",
    additional_instructions: Annotated[
        Optional[str], typer.Option("--additional-instructions", "-i", help="Instructions for the run.")
    ] = None,
    metadata: MetadataOpt = None,
    strict: StrictOpt = False,
    max_source_mb: MaxSourceOpt = validate.DEFAULT_MAX_SOURCE_MB,
) -> None:
    """Create a new run; print only its id on stdout (RUN_ID=$(weco observe init ...)).

    The baseline code becomes step 0. Works offline and without credentials.
    """
    from . import ids, spill

    kwargs = {
        "source_code": _sources(source, sources, required=True, max_mb=max_source_mb),
        "metric": metric,
        "maximize": validate.goal_to_maximize(goal),
        "name": validate.check_text(name, "--name"),
        "additional_instructions": validate.check_text(additional_instructions, "--additional-instructions"),
        "metadata": _metadata(metadata),
        "run_id": ids.new_run_id(),
        "event_id": ids.ulid(),
    }
    try:
        journal = _open_writer()
        with journal:
            run_id = journal.create_run(**kwargs)
    except errors.JournalUnavailable as exc:
        if strict:  # no spill: a create is not idempotent, and a retry would make a second run
            spill.check("create_run", kwargs)
            print(f"weco-observe: ERROR {exc}; the run was not recorded", file=sys.stderr)
            raise typer.Exit(errors.EXIT_JOURNAL) from None
        if not _unwritable(exc, "create_run", kwargs, strict, "the run"):
            raise typer.Exit(1) from None
        run_id = kwargs["run_id"]
    print(run_id)
    _trigger_sync()
    _done()


def log(
    run_id: Annotated[str, typer.Option("--run-id", help="Run ID from weco observe init (or a Weco server run id).")],
    # Parsed as text so that a bad value gets validate.parse_step's one-line error; shown as an integer.
    step: Annotated[
        str, typer.Option("--step", metavar="<int>", help="Step number (0 = baseline, then 1, 2, 3, ...).")
    ],
    status: Annotated[str, typer.Option("--status", help="completed or failed.")] = "completed",
    description: Annotated[
        Optional[str], typer.Option("--description", help="What was tried in this experiment.")
    ] = None,
    metrics: Annotated[
        Optional[str], typer.Option("--metrics", help="JSON object of metrics (e.g. '{\"val_bpb\": 1.03}').")
    ] = None,
    source: Annotated[Optional[str], typer.Option("--source", "-s", help="Source file to snapshot.")] = None,
    sources: Annotated[
        Optional[list[str]], typer.Option("--sources", help="Multiple source files to snapshot.")
    ] = None,
    parent_step: Annotated[
        Optional[str],
        typer.Option(
            "--parent-step", metavar="<int>", help="Parent step for tree branching (default: last successful step)."
        ),
    ] = None,
    metadata: MetadataOpt = None,
    strict: StrictOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")] = False,
    max_source_mb: MaxSourceOpt = validate.DEFAULT_MAX_SOURCE_MB,
) -> None:
    """Log a step (experiment) to a run. Journaled locally in milliseconds; synced later."""
    from . import ids

    kwargs = {
        "run": validate.check_run_ref(run_id),
        "step": validate.parse_step(step),
        "status": validate.check_status(status),
        "description": validate.check_text(description, "--description"),
        "metrics": validate.parse_metrics(metrics) if metrics is not None else None,
        "code": _sources(source, sources, required=False, max_mb=max_source_mb),
        "parent_step": validate.parse_step(parent_step, "--parent-step") if parent_step is not None else None,
        "metadata": _metadata(metadata),
        "event_id": ids.ulid(),
    }
    try:
        journal = _open_writer()
        with journal:
            result = journal.log_step(**kwargs)
            backlog = getattr(journal, "backlog", 0) >= MERGE_BACKLOG
            notes = _log_notes(journal, kwargs, result)
    except errors.JournalUnavailable as exc:
        _unwritable(exc, "log_step", kwargs, strict, f"step {kwargs['step']}")
        return
    for note in notes:  # even with --quiet: the step was journaled, but maybe not where it was meant to go
        print(f"weco-observe: note: {note}", file=sys.stderr)
    if not quiet:
        parent = result["parent_step"]
        where = (
            "baseline"
            if result["step"] == 0
            else (f"parent {parent}" if parent is not None else "parent chosen by the server")
        )
        done = "updated" if result.get("updated") else "journaled"
        print(f"weco-observe: step {result['step']} {done} ({where})", file=sys.stderr)
    _trigger_sync(backlog)
    _done()


def _log_notes(journal: Any, kwargs: dict[str, Any], result: dict[str, Any]) -> list[str]:
    """What ``log`` should point out about a step it journaled (see ``notices.py``). The step is
    journaled by now: a note that cannot be worked out is left out, never an error."""
    notes = []
    try:
        if result.get("run_first_seen"):
            from . import notices

            notes.append(notices.first_seen_server_id(journal, kwargs["run"], result.get("run_id")))
        elif kwargs["metrics"] and kwargs["status"] != "failed":
            run = journal.find_run(result["run_id"])
            if run is not None and run["metric"] is not None and run["metric"] not in kwargs["metrics"]:
                from . import notices  # only when there is something to say: `log` imports little

                note = notices.missing_primary_metric(
                    run["metric"], kwargs["metrics"], kwargs["status"], kwargs["step"], "--metrics"
                )
                notes += [note] if note else []
    except errors.JournalUnavailable:
        pass
    return notes


def status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show the journal: where it is, its size and schema, runs, steps and events by state."""
    from . import outbox, segments, spill, store
    from .files import JournalFiles
    from .journal import Journal, SharedReader

    settings = Settings.load()
    path = settings.journal_path
    mode = store.mode(settings)
    events, problems, version, runs, steps = dict.fromkeys(outbox.STATES, 0), outbox.problems(None), None, 0, 0
    blocked = 0
    if path.exists() or not mode.shared:
        # status reads and never merges: in cluster mode through the seqlock, from any host
        journal = SharedReader(path, settings=settings) if mode.shared else Journal(path, settings=settings)
        with journal:
            events = outbox.counts(journal)
            problems = outbox.problems(journal)
            blocked = outbox.count_blocked(journal)
            version = journal.schema_version()
            runs, steps = journal.query("SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM steps)")[0]
    rejected = problems["rejected"]
    files = JournalFiles(path)
    size = sum(p.stat().st_size for p in (path, *files.sqlite_companions()) if p.exists())
    waiting = segments.backlog(files) if mode.shared else {"files": 0, "bytes": 0}
    key_source: str | None = None
    key_problem: str | None = None
    try:
        key_source = settings.api_key_source
    except errors.InvalidInput as exc:
        key_problem = str(exc)
    from ._weco_alias import which

    gives, origin = which()
    info = {
        "journal": str(path),
        "mode": "cluster" if mode.shared else "local",
        "mode_source": mode.source,
        "filesystem": {"type": mode.fstype, "mount_point": mode.mount_point},
        "segments_waiting": waiting,
        "size_bytes": size,
        "schema_version": version,
        "runs": runs,
        "steps": steps,
        "events": events,
        "pending_with_errors": problems["retrying"],
        "last_error": problems["last_error"],
        "rejected": rejected,
        "blocked": blocked,
        "possible_duplicates": problems["possible_duplicates"],
        "spill_files": len(spill.pending(path)),
        "api_key_configured": key_source is not None,
        "api_key_source": key_source,
        "api_key_problem": key_problem,
        "base_url": settings.base_url,
        "auto_sync": settings.auto_sync and key_source is not None,
        "auto_sync_setting": settings.auto_sync,
        # what the guide's `from weco.observe import WecoObserver` gives in this Python
        "weco_observe_import": {"gives": gives, "origin": origin, "python": sys.executable},
    }
    # Journals written before redaction may hold an echoed key in last_error: what is shown goes
    # through redact, as sync's output does (the key read above is registered by Settings).
    from .redact import redact, redact_values

    if as_json:
        print(json.dumps(redact_values(info), indent=2))
        return
    ev = info["events"]
    unsent = sum(ev[state] for state in outbox.UNSENT)
    sent = sum(ev[state] for state in outbox.SENT)
    if info["auto_sync"]:
        auto = "on"
    elif not settings.auto_sync:
        auto = "off (WECO_OBSERVE_AUTO_SYNC is off)"
    else:
        auto = "off (no API key: run `weco login`)"
    lines = [
        f"journal:        {info['journal']} ({size / 1024:.1f} KiB)",
        f"mode:           {_mode_text(mode)}",
        f"schema version: {version if version is not None else 'none yet'}",
        f"runs:           {info['runs']}",
        f"steps:          {info['steps']}",
        f"events:         {unsent} pending, {sent} delivered, {ev['rejected']} rejected"
        + (f", {ev['superseded']} superseded" if ev["superseded"] else "")
        + (f", {ev['discarded']} discarded" if ev["discarded"] else ""),
        "api key:        "
        + (
            f"configured ({info['api_key_source']})"
            if info["api_key_configured"]
            else f"unusable: {key_problem}"
            if key_problem
            else "not configured (run `weco login`)"
        ),
        f"api base url:   {info['base_url']}",
        f"auto-sync:      {auto}",
        "weco.observe:   "
        + (
            "weco-observe's (`from weco.observe import WecoObserver` works; the official weco package is not installed)"
            if gives == "weco-observe"
            else f"the official weco package's ({origin}): it wins over weco-observe's alias"
            if gives == "official"
            else f"not importable in {sys.executable}: use `from weco_observe import WecoObserver`"
            " (the alias comes with an installed weco-observe)"
        ),
    ]
    if info["pending_with_errors"]:
        lines.append(
            f"retrying:       {plural(info['pending_with_errors'], 'pending event')}"
            f" {'has' if info['pending_with_errors'] == 1 else 'have'} failed before;"
            f" last error: {info['last_error']}"
        )
    if waiting["files"]:
        lines.append(
            f"segments:       {plural(waiting['files'], 'segment file')} ({waiting['bytes'] / 1024:.1f} KiB)"
            " from writers wait to be merged (the next sync, view or `weco observe merge` merges them)"
        )
    if info["spill_files"]:
        lines.append(f"spill files:    {info['spill_files']} waiting to be imported")
    for d in info["possible_duplicates"]:
        lines.append(f"duplicate?:     {d['run_id']}: {d['note']}")
    for r in rejected:
        what = "create" if r["kind"] == "create_run" else f"step {r['step']}"
        lines.append(f"rejected:       {r['run_id']} {what}: {r['last_error']}")
    if blocked:
        lines.append(
            f"blocked:        {plural(blocked, 'pending event')} of runs whose create was rejected or discarded"
            " cannot be sent"
        )
    if ev["rejected"] or blocked:
        lines.append(
            "                fix the cause and `weco observe sync --retry-rejected`,"
            " or give up on them: `weco observe discard --rejected [--run-id ID]`"
        )
    print(redact("\n".join(lines)))


def _mode_text(mode: Any) -> str:
    where = f"{mode.fstype} at {mode.mount_point}" if mode.fstype else "filesystem type unknown"
    why = "set by WECO_OBSERVE_SHARED_FS" if mode.source == "WECO_OBSERVE_SHARED_FS" else where
    if mode.shared:
        return f"cluster ({why}): writers append segments, one owner merges them"
    return f"local ({why})"


def login(
    api_key: Annotated[
        Optional[str], typer.Option("--api-key", help="The key; otherwise read from stdin or a hidden prompt.")
    ] = None,
) -> None:
    """Save a Weco API key to ~/.config/weco/credentials.json (0600), shared with the official client."""
    key = api_key
    if key is None:
        if sys.stdin is not None and not sys.stdin.isatty():
            key = sys.stdin.readline()
        else:
            import getpass

            key = getpass.getpass("Weco API key (input hidden): ")
    from .settings import save_api_key

    settings = Settings.load()
    path = save_api_key(settings, key)
    print(f"Saved API key to {path} (mode 0600).", file=sys.stderr)
    if settings.env_api_key:
        print("Note: WECO_API_KEY is set in the environment and wins over the file.", file=sys.stderr)


def logout() -> None:
    """Remove the saved API key (the credentials file)."""
    from .settings import delete_api_key

    settings = Settings.load()
    if delete_api_key(settings):
        print(f"Removed {settings.credentials_path}.", file=sys.stderr)
    else:
        print("No saved API key.", file=sys.stderr)


def _expand_sources(args: list[str]) -> list[str]:
    """Accept the official client's ``--sources a.py b.py`` by rewriting it to repeated flags."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        out.append(arg)
        i += 1
        if arg == "--sources":
            first = True
            while i < len(args) and (first or not args[i].startswith("-")):
                if not first:
                    out.append("--sources")
                out.append(args[i])
                first = False
                i += 1
    return out


def run(group: typer.Typer, args: list[str] | None = None, prog_name: str | None = None) -> int:
    """Run the CLI with one-line errors; return the exit code."""
    args = _expand_sources(list(sys.argv[1:] if args is None else args))
    command = typer.main.get_command(group)
    try:
        result = command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except errors.WecoObserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (typer.Exit, typer.Abort) as exc:
        return getattr(exc, "exit_code", 1)
    except Exception as exc:
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):  # click usage errors
            ctx = getattr(exc, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            print(f"error: {exc.format_message()}{hint}", file=sys.stderr)
            return exc.exit_code
        if type(exc).__module__ == "sqlite3":  # a read SQLite refused: damage, a lock, or permissions
            return _journal_error(exc)
        raise
    return result if isinstance(result, int) else 0


def _journal_error(exc: Exception) -> int:
    """One line for an SQLite error no command expected: damage says to repair, anything else to ask doctor."""
    from .doctor import _classify

    if _classify(exc) == "damaged":  # type: ignore[arg-type]
        print(f"error: the journal is damaged ({exc}): run `weco observe doctor --repair`", file=sys.stderr)
        return errors.EXIT_DAMAGED
    print(f"error: cannot read the journal ({exc}): `weco observe doctor` says why", file=sys.stderr)
    return errors.EXIT_JOURNAL


def _exit(code: int) -> NoReturn:
    """End the process; after `init` and `log`, without the interpreter's teardown.

    Python spends 15-30 ms at exit unloading typer and our modules, as long as `log` spends on its own
    work, and agents pay it once per experiment. `init` and `log` have committed and closed the journal
    (and any spill file) when they return, so if no other thread runs and no atexit callback is
    registered, flushing stdout and stderr is all the teardown would still do for them.
    """
    threading = sys.modules.get("threading")
    callbacks = getattr(atexit, "_ncallbacks", None)  # CPython's count of atexit callbacks
    if (
        _skip_teardown
        and (threading is None or threading.active_count() == 1)
        and callbacks is not None
        and callbacks() == 0
    ):
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # a closed pipe, say: let the normal exit report it
            sys.exit(code)
        os._exit(code)
    sys.exit(code)


def main_weco(prog_name: str = "weco") -> None:
    """Entry point of the ``weco`` script (and of ``python -m weco_observe``)."""
    _exit(run(app, prog_name=prog_name))


def main_observe() -> None:
    """Entry point of the ``weco-observe`` script (the ``weco observe`` group, plus ``login``/``logout``)."""
    _exit(run(observe_script, prog_name="weco-observe"))
