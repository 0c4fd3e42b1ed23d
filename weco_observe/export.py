"""``weco observe export``: a run's steps as JSON, JSON Lines or CSV, for scripts and spreadsheets.

Each format streams the steps of :func:`views.run_view` one at a time to the
output, so a 1,000-step export with ``--code`` never holds every step's code in
memory at once. A step's row holds its parent, status, description, metrics and
primary value, best flag, sync state, timestamps, metadata and changed files;
with ``code``, also its effective code as ``{path: text}`` (a JSON column in
CSV) and ``code_step``, the step that code came from.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

from .errors import InvalidInput, JournalDamaged
from .files import output_file
from .journal import Journal
from .views import damage_error, run_view

__all__ = ["EXPORT_FORMATS", "export_file", "export_run"]

EXPORT_FORMATS = ("json", "jsonl", "csv")


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
            try:
                row["code"] = journal.read_code(s["manifest"])
            except JournalDamaged as exc:  # exported without its code; the error says so at the end
                row["code"] = None
                view["damage"].append(f"step {s['step']}'s code: {exc}")
        yield row


def export_run(
    journal: Journal, ref: str, fmt: str, out: io.TextIOBase | Any, code: bool = False, damage: list[str] | None = None
) -> int:
    """Write a run's steps to ``out`` as ``json`` (one document), ``jsonl`` (a run line, then one
    line per step) or ``csv`` (one row per step, one column per metric). Returns the step count.

    What is damaged in the journal is left out (a step's unreadable metrics, its lost code); once
    everything else is written, JournalDamaged says what (or, given ``damage``, its messages are
    added there).

    With ``code``, each step carries its effective code ``{path: text}`` and
    ``code_step`` (in CSV, as a JSON column).

    >>> out = io.StringIO()
    >>> export_run(journal, run_id, "csv", out)
    5
    >>> out.getvalue().splitlines()[0]
    'run_id,step,parent_step,status,description,is_best,sync,created_at,updated_at,changed_files,metric:val_bpb'
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
    if damage is not None:
        damage.extend(view["damage"])
        return n
    damaged = damage_error(view["damage"], f"{n} steps exported")
    if damaged is not None:
        raise damaged
    return n


def export_file(journal: Journal, ref: str, fmt: str, output: str | os.PathLike[str], code: bool = False) -> int:
    """:func:`export_run` into the file ``output``, written atomically: 0600 (an export can hold code),
    or the mode of the file it replaces when that one is yours (``files.output_file``)."""
    if fmt not in EXPORT_FORMATS:
        raise InvalidInput(f"unknown --format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
    damage: list[str] = []
    try:
        with output_file(output) as out:
            n = export_run(journal, ref, fmt, out, code=code, damage=damage)
    except OSError as exc:
        raise InvalidInput(f"cannot write {output}: {exc.strerror or exc}") from None
    damaged = damage_error(damage, f"wrote {n} steps to {output}")
    if damaged is not None:  # the file holds the rest
        raise damaged
    return n
