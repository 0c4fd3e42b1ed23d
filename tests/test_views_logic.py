"""The pure logic behind the views: the unified diff and the tree's lane layout."""

from __future__ import annotations

import difflib

from hypothesis import given, settings
from hypothesis import strategies as st

from weco_observe.diffs import unified_diff
from weco_observe.tree import tree_layout

lines = st.lists(st.sampled_from(["a", "b", "c", "d", "", "x = 1", "y = 2"]), max_size=40)


def _apply(a: list[str], diff: list[str]) -> list[str]:
    """Apply a unified diff to ``a``, checking every context line and hunk header on the way."""
    out: list[str] = []
    pos = 0
    body = diff[2:]
    i = 0
    while i < len(body):
        header = body[i]
        assert header.startswith("@@ -") and header.endswith(" @@"), header
        old, new = header[3:-3].split(" ")
        start, _, count = old[1:].partition(",")
        old_start, old_count = int(start), int(count) if count else 1
        start, _, count = new[1:].partition(",")
        new_count = int(count) if count else 1
        first = old_start - 1 if old_count else old_start
        assert first >= pos
        out.extend(a[pos:first])
        pos = first
        i += 1
        seen_old = seen_new = 0
        while i < len(body) and not body[i].startswith("@@"):
            tag, text = body[i][0], body[i][1:]
            if tag in " -":
                assert a[pos] == text
                pos += 1
                seen_old += 1
            if tag in " +":
                out.append(text)
                seen_new += 1
            i += 1
        assert (seen_old, seen_new) == (old_count, new_count), header
    return out + a[pos:]


@settings(max_examples=300, deadline=None)
@given(lines, lines, st.integers(min_value=0, max_value=4))
def test_unified_diff_is_a_correct_patch(a, b, context):
    """Applying the diff to the old text gives the new text, with well-formed hunks.

    (Not always difflib's exact output: like GNU diff, the common head and tail are
    trimmed first, which can align an ambiguous edit differently.)"""
    ta, tb = "".join(x + "\n" for x in a), "".join(x + "\n" for x in b)
    diff = unified_diff(ta, tb, "old", "new", context)
    if a == b:
        assert diff == []
        return
    assert diff[:2] == ["--- old", "+++ new"]
    assert _apply(a, diff) == b


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 12), st.integers(0, 5), st.integers(0, 5), st.integers(0, 12), st.integers(0, 4))
def test_one_edit_diffs_like_difflib(n_head, n_old, n_new, n_tail, context):
    """Replacing one block between an unchanged head and tail (unambiguous lines) diffs exactly as difflib."""
    head, tail = [f"head {i}" for i in range(n_head)], [f"tail {i}" for i in range(n_tail)]
    a = head + [f"old {i}" for i in range(n_old)] + tail
    b = head + [f"new {i}" for i in range(n_new)] + tail
    expected = list(difflib.unified_diff(a, b, "old", "new", n=context, lineterm=""))
    ta, tb = "".join(x + "\n" for x in a), "".join(x + "\n" for x in b)
    assert unified_diff(ta, tb, "old", "new", context) == expected


def test_unified_diff_of_a_large_file_with_one_edit():
    a = "".join(f"line {i}\n" for i in range(20000))
    b = a.replace("line 12345\n", "changed\n")
    assert unified_diff(a, b, "x", "x") == [
        "--- x",
        "+++ x",
        "@@ -12343,7 +12343,7 @@",
        " line 12342",
        " line 12343",
        " line 12344",
        "-line 12345",
        "+changed",
        " line 12346",
        " line 12347",
        " line 12348",
    ]
    assert unified_diff(a, a, "x", "x") == []


def _steps(parents: dict[int, int | None], failed: frozenset[int] = frozenset()) -> list[dict]:
    return [
        {"step": s, "parent_step": p, "status": "failed" if s in failed else "completed"}
        for s, p in sorted(parents.items())
    ]


def test_guide_tree_keeps_the_main_line_in_lane_zero():
    lanes, count = tree_layout(_steps({0: None, 1: 0, 2: 1, 3: 2, 4: 2}, frozenset({3})))
    assert lanes == {0: 0, 1: 0, 2: 0, 4: 0, 3: 1} and count == 2


def test_lanes_are_reused_after_a_branch_ends():
    # 0-1-2-...-9 main line; 3 branches off 1 and ends; 8 branches off 6 later: same spare lane.
    parents = {0: None, 1: 0, 2: 1, 3: 1, 4: 2, 5: 4, 6: 5, 7: 6, 8: 6, 9: 7}
    lanes, count = tree_layout(_steps(parents, frozenset({3, 8})))
    assert lanes[3] == lanes[8] == 1 and count == 2
    assert all(lanes[s] == 0 for s in (0, 1, 2, 4, 5, 6, 7, 9))


def test_orphans_start_their_own_chain():
    # 7's parent is not in this journal (a remote-only run): a root of its own, drawn without an edge.
    lanes, count = tree_layout(_steps({5: None, 6: 5, 7: 3, 8: 5}))
    assert lanes == {5: 0, 6: 0, 8: 1, 7: 0} and count == 2  # lane 0 is free again after step 6


def test_a_linear_run_of_1000_steps_is_one_lane():
    lanes, count = tree_layout(_steps({i: (i - 1 if i else None) for i in range(1000)}))
    assert count == 1 and set(lanes.values()) == {0}


@st.composite
def trees(draw):
    n = draw(st.integers(min_value=1, max_value=60))
    parents: dict[int, int | None] = {0: None}
    for s in range(1, n):
        parents[s] = draw(st.one_of(st.none(), st.integers(min_value=0, max_value=s - 1))) if s > 0 else None
    failed = draw(st.frozensets(st.integers(min_value=1, max_value=max(1, n - 1))))
    return parents, failed


@settings(max_examples=200, deadline=None)
@given(trees())
def test_edges_never_cross_another_node(tree):
    """Every edge runs down its child's lane from the parent's row: no other node may sit there."""
    parents, failed = tree
    steps = _steps(parents, failed)
    lanes, count = tree_layout(steps)
    row = {s["step"]: i for i, s in enumerate(steps)}
    assert set(lanes) == set(parents) and set(lanes.values()) <= set(range(count))
    for child, parent in parents.items():
        if parent is None:
            continue
        for other in parents:
            if other not in (child, parent) and lanes[other] == lanes[child]:
                assert not row[parent] <= row[other] <= row[child], (child, parent, other, lanes)
