"""CLI commands for the bundle work; listed in ``cli.OBSERVE_COMMANDS``.

``bundle`` / ``import`` move runs between journals by file (see ``bundle.py``);
``doctor`` checks and repairs the journal (see ``doctor.py``). ``sync --bundle``
belongs to the sync command and calls ``bundle.import_bundle``.

The CLI imports this module only to run or list these commands.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .cli import plural

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def import_lines(s: dict[str, Any]) -> list[str]:
    """The human summary of one bundle import (shared by `import` and `sync --bundle`)."""
    if s["already_imported"]:
        return [f"bundle {s['bundle_id']} was already imported here: nothing changed"]
    lines = [
        (
            f"imported {s['path']} (bundle {s['bundle_id']} from {s['source']}): "
            f"{plural(s['runs_new'], 'new run')}, {s['runs_known']} already known, "
            f"{plural(s['events_new'], 'new event')} ({s['events_pending']} to sync), "
            f"{s['events_known']} already here, "
            f"{plural(s['steps_updated'], 'step')} updated, {plural(s['blobs_new'], 'new code blob')}"
        )
    ]
    if s["server_ids_adopted"]:
        one = s["server_ids_adopted"] == 1
        lines.append(
            f"{plural(s['server_ids_adopted'], 'run')} {'was' if one else 'were'} already synced from the other box: "
            + ("its new steps go to the same server run" if one else "their new steps go to the same server runs")
        )
    lines.extend(f"warning: {c}" for c in s["conflicts"])
    signature = s.get("signature")
    if signature and signature["verified"]:
        lines.append(f"signature verified: key {signature['key_id']}")
    return lines


def bundle_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="The bundle file to write.")],
    run_id: Annotated[
        Optional[str], typer.Option("--run-id", help="Only this run (local id, server id or prefix).")
    ] = None,
    everything: Annotated[
        bool, typer.Option("--all", help="Everything, not only what no earlier bundle holds.")
    ] = False,
    sign: Annotated[
        Optional[Path],
        typer.Option(
            "--sign",
            metavar="KEYFILE",
            help="Sign the bundle with this key file (0600; make one with `openssl rand -hex 32`).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write runs, steps, code and events not yet bundled to one file, for a box with no network.

    Carry the file to a machine that reaches the API and run
    `weco observe sync --bundle FILE` (or `weco observe import FILE`) there.
    The next bundle holds only what was logged since this one (--all: everything).
    With --sign, the receiver can check with --verify-key that no one changed it on the way.
    """
    from . import bundle, store
    from .settings import Settings

    with store.reader(Settings.load()) as journal:
        summary = bundle.write_bundle(journal, output, run_ref=run_id, everything=everything, sign=sign)
    if as_json:
        print(json.dumps(summary, indent=2))
    elif summary["events"] == 0:
        print(
            "nothing new to bundle since the last bundle (use --all for everything); no file written",
            file=sys.stderr,
        )
    else:
        print(
            # Still "1 runs": tests/test_bundle.py asserts that text; move to plural() together with that test.
            f"wrote {summary['path']} ({_kib(summary['bytes'])}): {summary['runs']} runs, "
            f"{summary['steps']} steps, {summary['events']} events, {summary['blobs']} code blobs"
            + (f", signed with key {summary['signed_by']}" if summary["signed_by"] else "")
        )
        print(
            f"on a machine that reaches the API: weco observe sync --bundle {Path(summary['path']).name}",
            file=sys.stderr,
        )


def import_cmd(
    file: Annotated[Path, typer.Argument(help="A bundle written by `weco observe bundle`.")],
    verify_key: Annotated[
        Optional[Path],
        typer.Option(
            "--verify-key",
            metavar="KEYFILE",
            help="Refuse the bundle unless it is signed with this key file (default: $WECO_OBSERVE_BUNDLE_KEY).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Verify a bundle and merge it into this journal (queued for the next sync).

    A truncated, corrupted, edited or foreign file is refused and nothing is
    imported. Importing the same or an overlapping bundle again changes nothing.
    """
    from . import bundle, store
    from .settings import Settings

    with store.reader(Settings.load(), wait=None) as journal:
        summary = bundle.import_bundle(journal, file, verify_key=verify_key)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        print("\n".join(import_lines(summary)))


def doctor_cmd(
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Copy everything readable into a fresh journal; keep the damaged file beside it; fix permissions.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Check the journal: integrity, schema, code, payloads, WAL, permissions and filesystem.

    Reports orphaned or missing code blobs, unreadable payloads, and a journal on a network
    filesystem. Exits 7 when the journal is damaged (then run `weco observe doctor --repair`), 9 when
    another process holds it locked, 10 when it or its folder is read-only for you, 8 when
    --repair found a syncer holding it. Only damage is ever repaired.
    """
    from . import doctor, errors
    from .settings import Settings

    path = Settings.load().journal_path
    report = doctor.check(path)
    verdict = report["verdict"]
    if not as_json:
        for item in report["checks"]:
            print(f"{item['level']:<5} {item['name']:<12} {item['message']}")
    repaired = None
    failed: errors.WecoObserveError | None = None
    if repair and verdict == "damaged":
        try:
            repaired = doctor.repair(path)
        except (errors.SyncBusy, errors.JournalLocked, errors.JournalReadOnly, errors.JournalDamaged) as exc:
            failed = exc
    fixed = doctor.fix_permissions(path) if repair else []
    if as_json:
        extra = {"permissions_fixed": fixed} if repair else {}
        error = {"repair_error": str(failed)} if failed else {}
        print(json.dumps({**report, "repair": repaired, **extra, **error}, indent=2))
    else:
        for line in fixed:
            print(f"fixed permissions: {line}")
        if repaired is not None:
            print(doctor.describe_repair(repaired))
    if failed is not None:
        if not as_json:
            print(f"error: {failed}", file=sys.stderr)
        raise typer.Exit(failed.exit_code)
    if repaired is not None or (repair and verdict == "damaged"):
        return  # repaired, or found healthy once the sync lock was held
    code = {
        "damaged": errors.EXIT_DAMAGED,
        "locked": errors.EXIT_LOCKED,
        "busy": errors.EXIT_BUSY,
        "read-only": errors.EXIT_READ_ONLY,
    }.get(verdict, errors.EXIT_OK)
    if code:
        raise typer.Exit(code)
