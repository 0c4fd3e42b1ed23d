"""Helpers for the tests that treat a bundle as hostile input (``from bundle_helpers import ...``).

- :func:`journal_rows`: every row of every table of a journal, to show a refused
  import changed nothing at all;
- :func:`reforge`: rewrite a real bundle with edits, recomputing every checksum
  (what a careful forger does);
- :class:`RecordingEmulator`: the real API emulator, also recording the path of
  every request it receives (including the ones it answers 404).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from weco_observe import bundle
from weco_observe.emulator import Emulator


def journal_rows(path: Path) -> dict[str, list[tuple]]:
    """Every row of every table, sorted (``steps`` has no rowid): equal means the same content."""
    if not Path(path).exists():
        return {}
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: sorted((tuple(r) for r in conn.execute(f'SELECT * FROM "{t}"')), key=repr) for t in tables}
    finally:
        conn.close()


def read_members(path: Path) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """A bundle's rows by member, and its manifest."""
    with zipfile.ZipFile(path) as zf:
        members = {n: [json.loads(line) for line in zf.read(n).splitlines()] for n in bundle.MEMBERS}
        return members, json.loads(zf.read(bundle.MANIFEST))


def write_members(
    out: Path,
    members: dict[str, list[Any]],
    manifest: dict[str, Any],
    *,
    encode: Callable[[Any], bytes] = lambda row: json.dumps(row, separators=(",", ":")).encode() + b"\n",
    recount: bool = True,
) -> None:
    """Write ``members`` as a bundle whose manifest describes them exactly (sha256, bytes, lines,
    counts, and the manifest's own checksum): it passes every checksum."""
    manifest = json.loads(json.dumps(manifest))
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, rows in members.items():
            data = b"".join(row if isinstance(row, bytes) else encode(row) for row in rows)
            manifest["members"][name] = {
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data),
                "lines": len(rows),
            }
            zf.writestr(name, data)
        if recount:
            manifest["counts"] = {k: len(members[f"{k}.jsonl"]) for k in ("runs", "steps", "events", "blobs")}
        manifest["checksum"] = bundle._manifest_checksum(manifest)
        zf.writestr(bundle.MANIFEST, json.dumps(manifest))


def reforge(good: Path, out: Path, edit: Callable[[dict[str, list[dict[str, Any]]]], Any]) -> None:
    """Rewrite bundle ``good`` to ``out`` with ``edit(members)`` applied, every checksum recomputed."""
    members, manifest = read_members(good)
    edit(members)
    write_members(out, members, manifest)


class RecordingEmulator(Emulator):
    """The Weco API emulator, recording ``(method, raw request path)`` of every request it receives."""

    def start(self) -> RecordingEmulator:
        super().start()
        self.requests: list[tuple[str, str]] = []
        seen = self.requests
        served = self._server.RequestHandlerClass  # type: ignore[union-attr]

        class Recording(served):  # type: ignore[misc, valid-type]
            def parse_request(self) -> bool:
                ok = super().parse_request()
                seen.append((self.command, self.path))
                return ok

        # The server looks its handler class up per connection, and none has arrived yet.
        self._server.RequestHandlerClass = Recording  # type: ignore[union-attr]
        return self
