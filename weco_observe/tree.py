"""The step tree of one run: which code each step has, where it branched, and how to draw it.

Pure functions over a run's steps (dicts with ``step``, ``parent_step``,
``status`` and ``code``, in step order), with no journal access, so they can be
tested and reasoned about without a database; :func:`views.run_view` reads the
steps and calls them.

- A step's **code** is its own manifest, or, when it was logged without code,
  its nearest ancestor's (following ``parent_step``): :func:`effective_code`.
- The tree is drawn as the guide draws it: one line per step in step order,
  and ``branched from N`` when a step's parent is not the step just above it.
  The report lays the same tree out in lanes, like a git graph
  (:func:`tree_layout`), so a 1,000-step run stays readable.

Parents always come before their children (``parent_step < step``) in a local
run, so one pass in step order sees every parent first. A remote-only run may
name a parent this journal never saw; such a step is treated as a root.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["changed_files", "effective_code", "link_tree", "tree_layout"]


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


def effective_code(steps: Sequence[dict[str, Any]]) -> None:
    """Fill ``code_step``/``manifest`` of each step: its own code, else its nearest ancestor's.

    >>> steps = [{"step": 0, "parent_step": None, "code": {"a.py": "h0"}},
    ...          {"step": 1, "parent_step": 0, "code": None},
    ...          {"step": 2, "parent_step": 9, "code": None}]
    >>> effective_code(steps)
    >>> [(s["code_step"], s["manifest"]) for s in steps]
    [(0, {'a.py': 'h0'}), (0, {'a.py': 'h0'}), (None, {})]
    """
    by_step = {s["step"]: s for s in steps}
    for s in steps:  # parents come before children, so one pass suffices
        if s["code"]:
            s["code_step"], s["manifest"] = s["step"], s["code"]
            continue
        parent = by_step.get(s["parent_step"]) if s["parent_step"] is not None else None
        if parent is not None and parent["step"] < s["step"]:
            s["code_step"], s["manifest"] = parent["code_step"], parent["manifest"]
        else:
            s["code_step"], s["manifest"] = None, {}


def changed_files(manifest: Mapping[str, str], base: Mapping[str, str]) -> list[str]:
    """The paths whose content differs between two manifests (added and removed files included).

    >>> changed_files({"a.py": "h1", "b.py": "h2"}, {"a.py": "h1", "c.py": "h3"})
    ['b.py', 'c.py']
    """
    return sorted(p for p in set(manifest) | set(base) if manifest.get(p) != base.get(p))


def link_tree(steps: Sequence[dict[str, Any]]) -> int:
    """Fill each step's ``branched_from``, ``lane``, ``changed`` and ``files``; return the lane count.

    Needs :func:`effective_code` first (``changed`` compares effective code).
    ``branched_from`` is the parent when it is not the step just above;
    ``changed`` lists the files that differ from the parent's code (every file
    for a step without a parent).

    >>> steps = [{"step": 0, "parent_step": None, "status": "completed", "code": {"a.py": "h0"}},
    ...          {"step": 1, "parent_step": 0, "status": "failed", "code": {"a.py": "h1"}},
    ...          {"step": 2, "parent_step": 0, "status": "completed", "code": None}]
    >>> effective_code(steps)
    >>> link_tree(steps)
    2
    >>> [(s["branched_from"], s["lane"], s["changed"]) for s in steps]
    [(None, 0, ['a.py']), (None, 1, ['a.py']), (0, 0, [])]
    """
    lanes, lane_count = tree_layout(steps)
    by_step = {s["step"]: s for s in steps}
    previous: int | None = None
    for s in steps:
        parent = s["parent_step"]
        s["branched_from"] = parent if parent is not None and parent != previous else None
        s["lane"] = lanes[s["step"]]
        base = by_step[parent]["manifest"] if parent in by_step else {}
        s["changed"] = changed_files(s["manifest"], base) if parent is not None else sorted(s["manifest"])
        s["files"] = sorted(s["manifest"])
        previous = s["step"]
    return lane_count
