"""CLI commands for the sync work: ``weco observe sync`` and ``weco observe emulator``.

Listed in ``cli.OBSERVE_COMMANDS``; the CLI imports this module only to run
or list these commands. Each imports ``sync`` or ``emulator`` in its body,
makes one library call and formats the result.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Optional

import typer

from .cli import plural


def _progress_bar(total: int):
    """A one-line progress bar on stderr, only when stderr is a terminal."""
    if not sys.stderr.isatty():
        return None
    width = 30

    def update(done: int) -> None:
        filled = min(width, int(width * done / max(total, 1)))
        sys.stderr.write(f"\rsyncing [{'#' * filled}{'.' * (width - filled)}] {done}/{plural(total, 'event')}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return update


def _summary_lines(result: Any) -> list[str]:
    from .settings import Settings

    waiting = f"{plural(result.pending, 'event')} {'waits' if result.pending == 1 else 'wait'}"
    lines = []
    for run in result.runs:
        label = f"{run.run_id}" + (f" ({run.name})" if run.name else "")
        state = f"{run.delivered} delivered, {run.pending} pending, {run.rejected} rejected"
        link = run.dashboard or "not on the server yet"
        lines.append(f"  {label}: {state}  {link}")
        if run.blocked:
            lines.append(f"    blocked: {run.blocked} (fix it, then `weco observe sync --retry-rejected`)")
        if run.possible_duplicate:
            lines.append(
                f"    possible duplicate run on the server: look for metadata.weco_observe_local_id = {run.run_id}"
            )
    head = (
        f"sync: {result.delivered} delivered, {result.superseded} superseded, {result.rejected} rejected"
        f" in {result.elapsed:.1f}s; {result.pending} pending, {result.rejected_total} rejected in total"
    )
    lines.insert(0, head)
    if result.misconfigured:  # its message ends with the hint: keep that last
        lines.append(f"error: {result.last_error} (nothing was changed; {waiting} in the journal)")
    elif result.auth_failed:
        lines.append(f"error: {result.last_error}; nothing was changed, {waiting}")
    elif result.retry_at is not None:
        from .replay import retry_clock

        lines.append(
            f"error: the server asked to retry after {retry_clock(result.retry_at)}: {waiting} in the journal"
            f" (last error: {result.last_error}); run `weco observe sync` again then"
        )
    elif result.unreachable:
        lines.append(
            f"error: cannot reach the Weco API at {Settings.load().base_url}: {waiting}"
            " in the journal (run `weco observe sync` again later)"
        )
    elif result.pending:
        lines.append(
            f"warning: {plural(result.pending, 'event')} still pending after retries; last error: {result.last_error}"
        )
    if result.rejected_total:
        lines.append(
            "rejected events are kept: see `weco observe status`; after fixing the cause run "
            "`weco observe sync --retry-rejected`"
        )
    if result.possible_duplicates:
        lines.append(
            f"warning: {plural(result.possible_duplicates, 'run')} may have a duplicate on the server "
            "(a create got no answer and was sent again)"
        )
    return lines


def sync_command(
    run_id: Annotated[
        Optional[str], typer.Option("--run-id", help="Sync only this run (local or server id, or a unique prefix).")
    ] = None,
    bundles: Annotated[
        Optional[list[str]],
        typer.Option(
            "--bundle",
            help="Import this bundle file first (from `weco observe bundle` on a box with no network); repeatable.",
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be sent; send nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")] = False,
    watch: Annotated[
        bool,
        typer.Option("--watch", help="Keep running and send new events as they are journaled (Ctrl-C to stop)."),
    ] = False,
    retry_rejected: Annotated[
        bool, typer.Option("--retry-rejected", help="Send rejected events again (after fixing the cause).")
    ] = False,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Exit (code 8) instead of waiting when another sync is running.")
    ] = False,
    workers: Annotated[int, typer.Option("--workers", min=1, max=64, help="Runs sent in parallel.")] = 8,
    verify_key: Annotated[
        Optional[str],
        typer.Option(
            "--verify-key",
            metavar="KEYFILE",
            help="Refuse a --bundle file unless it is signed with this key file (as $WECO_OBSERVE_BUNDLE_KEY does).",
        ),
    ] = None,
) -> None:
    """Send pending runs and steps to the Weco API (retrying; nothing is ever lost or deleted).

    Exit codes say what is still actionable: 0 nothing (all delivered; discarded
    events count for nothing); 4 events a later sync can send (API unreachable or
    failing, or it asked to be retried later: the time is printed); 5 the API refused the key (run `weco login`);
    6 events only you can move: rejected by the API, or blocked behind a run's
    rejected create (see `weco observe status`; fix the cause and sync
    --retry-rejected, or give up: `weco observe discard --rejected`);
    8 another sync is running (--no-wait); 78 WECO_BASE_URL is wrong (malformed,
    refused, or not the Weco API): nothing was sent or marked.
    """
    from . import replay

    if verify_key is not None:
        # The import reads $WECO_OBSERVE_BUNDLE_KEY through the settings, at call time: the flag sets it
        # for this one command (replay.command, which calls the import, takes no key of its own).
        import os

        from .errors import InvalidInput

        if not bundles:
            raise InvalidInput("--verify-key checks --bundle files: give one or more with --bundle FILE")
        os.environ["WECO_OBSERVE_BUNDLE_KEY"] = verify_key
    if dry_run:
        if bundles:
            from .errors import InvalidInput

            raise InvalidInput("--dry-run does not import bundles: run `weco observe import FILE` first")
        requests = replay.dry_run(run_id)
        if as_json:
            print(json.dumps({"requests": requests}, indent=2))
            return
        for r in requests:
            what = "create run" if "step" not in r else f"step {r['step']} ({r['status']}, parent {r['parent_step']})"
            files = f" files: {', '.join(r['files'])}" if r["files"] else ""
            print(f"{r['method']} {r['path']}  {r['run_id']} {what}{files}")
        print(f"{plural(len(requests), 'request')} would be sent", file=sys.stderr)
        return

    def on_wait(holder: dict[str, Any]) -> None:
        print(
            f"weco-observe: another syncer (pid {holder.get('pid', '?')}) is running on this journal;"
            " waiting for it (--no-wait to exit instead)",
            file=sys.stderr,
        )

    def on_pass(result: Any) -> None:
        if not as_json:
            later = ""
            if result.retry_at is not None:
                from .replay import retry_clock

                later = f"; the server asked to retry after {retry_clock(result.retry_at)}: waiting until then"
            print(f"sync: {result.delivered} delivered, {result.pending} pending{later}", file=sys.stderr)

    result = replay.command(
        run_ref=run_id,
        bundles=bundles,
        retry_rejected=retry_rejected,
        watch=watch,
        wait=not no_wait,
        workers=workers,
        on_wait=on_wait,
        progress_factory=None if as_json else _progress_bar,
        on_pass=on_pass,
    )
    from .redact import redact, redact_values

    # The errors in a result come from servers and were redacted when stored; this is the last
    # line of defence for what a journal written by an older version may hold.
    if as_json:
        print(json.dumps(redact_values(result.to_json()), indent=2))
    else:
        if result.imports:
            from .cli_bundle import import_lines

            for imported in result.imports:
                print("\n".join(import_lines(imported)), file=sys.stderr)
        print(redact("\n".join(_summary_lines(result))), file=sys.stderr)
    raise typer.Exit(result.exit_code)


def emulator_command(
    port: Annotated[int, typer.Option("--port", help="TCP port on 127.0.0.1 (0 picks a free one).")] = 8765,
    api_key: Annotated[
        str, typer.Option("--api-key", help="The Bearer key accepted; '*' accepts any key.")
    ] = "weco-emulator-key",
    error_rate: Annotated[float, typer.Option("--error-rate", help="Fraction of requests answered 500/503.")] = 0.0,
    rate_limit_rate: Annotated[
        float, typer.Option("--rate-limit-rate", help="Fraction answered 429 with Retry-After.")
    ] = 0.0,
    latency: Annotated[float, typer.Option("--latency", help="Seconds added to every request.")] = 0.0,
    drop_rate: Annotated[
        float, typer.Option("--drop-rate", help="Fraction of connections dropped with no answer.")
    ] = 0.0,
    timeout_rate: Annotated[float, typer.Option("--timeout-rate", help="Fraction stored, then never answered.")] = 0.0,
    non_json_rate: Annotated[
        float, typer.Option("--non-json-rate", help="Fraction answered 200 with a non-JSON body.")
    ] = 0.0,
) -> None:
    """Run a local Weco API emulator on 127.0.0.1 (for trying sync offline and for tests).

    Point the client at it with WECO_BASE_URL=http://127.0.0.1:PORT/v1 and
    WECO_API_KEY=weco-emulator-key. Its state: GET /v1/_emulator/state.
    """
    from .emulator import Emulator

    emu = Emulator(
        port,
        api_key=None if api_key == "*" else api_key,
        error_rate=error_rate,
        rate_limit_rate=rate_limit_rate,
        latency=latency,
        drop_rate=drop_rate,
        commit_then_timeout_rate=timeout_rate,
        non_json_rate=non_json_rate,
    ).start()
    print(emu.base_url, flush=True)
    print(
        f"weco API emulator listening; export WECO_BASE_URL={emu.base_url} "
        f"WECO_API_KEY={emu.api_key or 'anything'}  (Ctrl-C to stop)",
        file=sys.stderr,
        flush=True,
    )
    emu.serve_forever()


def merge_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")] = False,
) -> None:
    """Merge what writers appended to segment files into the journal (cluster mode).

    On a journal other hosts share, `init`, `log` and the SDK write segment
    files; `sync`, the views and `bundle` merge them first. This merges now.
    Exit 8 when another process keeps the journal busy past WECO_OBSERVE_BUSY_TIMEOUT.
    """
    from . import store
    from .settings import Settings

    settings = Settings.load()
    if not store.is_shared(settings):
        print("the journal is in local mode: every call writes it directly, nothing to merge", file=sys.stderr)
        if as_json:
            print(json.dumps({"mode": "local", "applied": 0}))
        return
    with store.exclusive(settings, "merge", timeout=settings.busy_timeout) as held:
        result = held.merged
    if as_json:
        print(json.dumps({"mode": "cluster", **vars(result)}, indent=2))
        return
    print(
        f"merged {plural(result.applied, 'record')} ({result.known} already in the journal) from"
        f" {plural(result.files_merged, 'segment file')}; removed {result.files_removed}",
        file=sys.stderr,
    )
    for problem in result.problems:
        print(f"warning: {problem}", file=sys.stderr)
    for kept in result.kept:
        print(f"kept {kept}: its run's create is not in the journal yet", file=sys.stderr)


def discard_command(
    rejected: Annotated[
        bool, typer.Option("--rejected", help="Give up on the events the API rejected (required: say what).")
    ] = False,
    run_id: Annotated[
        Optional[str], typer.Option("--run-id", help="Only this run's (local or server id, or a unique prefix).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")] = False,
) -> None:
    """Give up on rejected events: keep them in the journal, marked discarded, and never send them.

    For a mistyped server run id, say, whose steps the server will never take. A run
    whose create was rejected is given up whole: its steps waiting behind the create
    are discarded too. Nothing is deleted (`weco observe status` counts them), and
    `sync` no longer exits 6 for them.
    """
    from . import replay
    from .errors import InvalidInput

    if not rejected:
        raise InvalidInput("say what to discard: `weco observe discard --rejected [--run-id ID]`")
    result = replay.discard(run_id)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    left = result["left"]
    if not result["rejected"] and not result["blocked"]:
        print(f"nothing to discard: no rejected events{f' in run {run_id}' if run_id else ''}", file=sys.stderr)
    else:
        print(
            f"discarded {plural(result['rejected'], 'rejected event')}"
            + (
                f" and {plural(result['blocked'], 'event')} waiting behind a discarded create"
                if result["blocked"]
                else ""
            )
            + " (kept in the journal, marked discarded, never sent)",
            file=sys.stderr,
        )
        for run in result["runs"]:
            label = run["run_id"] + (f" (server id {run['server_id']})" if run["server_id"] else "")
            print(f"  {label}: {run['rejected']}", file=sys.stderr)
    print(
        f"left: {left['pending']} pending, {left['rejected']} rejected, {left['blocked']} blocked"
        + (" (`weco observe sync` sends what is pending)" if left["pending"] else ""),
        file=sys.stderr,
    )
