"""The tree rule: which step a newly logged step hangs from, decided once, at log time.

A step logged with ``parent_step`` has that parent (it must be lower than the
step, and for a run this journal created it must already be journaled).
Otherwise step 0 (the baseline) has none; a step logged again keeps its parent,
like every field a re-log leaves out; and a step logged for the first time gets
the highest-numbered step below it whose status is not ``failed``, or the
baseline when every step since the baseline failed (as the server's own chaining
does). Because the parent is stored and always sent, the tree never depends on
the order in which events later reach a server.

The rule is pure: the journal (local mode, SQL over its own steps) and the
cluster-mode writer (the merged journal plus the segments not yet merged) each
supply the two lookups it needs, so both modes resolve a parent the same way.

    >>> steps = {0: "completed", 1: "completed", 2: "failed"}
    >>> def last_kept_below(n):
    ...     return max((s for s, st in steps.items() if s < n and (st != "failed" or s == 0)), default=None)
    >>> resolve(3, None, None, remote_only=False, exists=steps.__contains__, last_kept_below=last_kept_below)
    1
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import InvalidInput
from .records import Step


def resolve(
    step: int,
    parent_step: int | None,
    prev: Step | None,
    *,
    run: str = "this run",
    remote_only: bool,
    exists: Callable[[int], bool],
    last_kept_below: Callable[[int], int | None],
) -> int | None:
    """The parent of ``step`` (None: the baseline, or left to the server for a remote-only run).

    ``run`` names the run in the error. ``prev`` is the step's current state when it is logged again; ``exists(n)``
    says whether step ``n`` of the run is known; ``last_kept_below(n)`` is the
    highest step below ``n`` that is not failed (step 0 counts even when failed).
    Raises InvalidInput for an explicit parent the run does not have.
    """
    if parent_step is not None:
        if not remote_only and not exists(parent_step):
            raise InvalidInput(
                f"parent step {parent_step}: run {run} has no step {parent_step}; "
                "log that step first or pick an existing one"
            )
        return parent_step
    if step == 0:
        return None
    if prev is not None:
        return prev.parent_step
    return last_kept_below(step)
