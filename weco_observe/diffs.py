"""Code diffs between steps: the unified diff itself, per-file diffs of two manifests, and its text.

A step's code is a manifest ``{path: blob hash}`` (see ``tree.effective_code``
for steps logged without code). Two manifests are compared path by path: a
path whose hash is unchanged is skipped without reading its blob, so a diff
costs only the files that changed; added and removed files diff against
``/dev/null``. The diff itself (:func:`unified_diff`) trims the common head and
tail before difflib runs, because the report diffs every step of a long run and
most edits touch a few lines of a large file.

``diff`` (CLI), the report (every step against its parent) and the UI's
``/api/runs/RUN/diff`` all call these, so a change looks the same everywhere.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from .errors import InvalidInput, JournalDamaged
from .journal import Journal
from .views import run_view

__all__ = ["damaged_files", "file_diffs", "format_diff", "step_diff", "unified_diff"]


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
    """Diff two code manifests file by file: ``[{"path", "status", "lines"}]`` for each changed file.

    A file whose text is damaged in the journal gets status ``damaged`` and one line saying so."""
    out = []
    for path in sorted(set(old) | set(new)):
        if old.get(path) == new.get(path):
            continue
        try:
            a = journal.read_blob(old[path]) if path in old else ""
            b = journal.read_blob(new[path]) if path in new else ""
        except JournalDamaged as exc:  # the text is lost: say so in place of the diff, show the rest
            out.append({"path": path, "status": "damaged", "lines": [str(exc)]})
            continue
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
    (the baseline has no parent). ``view`` is the run's :func:`views.run_view`
    when the caller already has it.

    >>> d = step_diff(journal, run_id, 4)
    >>> (d["against"], d["code_step"], [(f["path"], f["status"]) for f in d["files"]])
    (2, 4, [('train.py', 'modified')])
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
    """The text of ``weco observe diff``: one unified diff per changed file, coloured on request.

    >>> print(format_diff(step_diff(journal, run_id, 4)), end="")
    --- step2/train.py
    +++ step4/train.py
    @@ -1,3 +1,4 @@
     lr = 0.05
     batch = 32768
     depth = 4
    +warmup = 100
    """
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


def damaged_files(files: list[dict[str, Any]]) -> list[str]:
    """The messages of the files :func:`file_diffs` could not read."""
    return [f["lines"][0] for f in files if f["status"] == "damaged"]
