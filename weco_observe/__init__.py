"""weco-observe: a local-first, offline-safe drop-in for ``weco observe``.

Every call writes to a local SQLite journal and returns at once; ``weco observe
sync`` (or the background syncer) replays the journal to the Weco API later.

The public names are loaded on first use (PEP 562), so the CLI's hot path
(``weco observe log``) does not pay for the SDK.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "InvalidInput": "errors",
    "JournalUnavailable": "errors",
    "UnknownRun": "errors",
    "WecoObserveError": "errors",
    "ObserveRun": "sdk",
    "WecoObserveWarning": "sdk",
    "WecoObserver": "sdk",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:
    from .errors import InvalidInput, JournalUnavailable, UnknownRun, WecoObserveError  # noqa: F401
    from .sdk import ObserveRun, WecoObserver, WecoObserveWarning  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'weco_observe' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
