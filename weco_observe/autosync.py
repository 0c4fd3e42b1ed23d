"""Background auto-sync trigger, called after every successful ``init``/``log``/``log_step``.

Filled in by the sync work (issue 3): when a key is configured and
``WECO_OBSERVE_AUTO_SYNC`` is not ``0``, start a detached syncer if none runs.
Until then it deliberately does nothing, so logging stays purely local.
"""

from __future__ import annotations

from pathlib import Path


def trigger(journal_path: Path, api_key: str | None = None) -> None:
    """Start a background syncer for ``journal_path`` if one is needed. Never raises."""
    return None
