"""The exceptions weco-observe raises, and the exit codes the CLI maps them to.

Every error message is one line that says what was wrong and what to do. No
message ever contains the API key: text from a server or from httpx goes
through ``redact.redact`` before it is put in one.
"""

from __future__ import annotations

__all__ = [
    "ApiAuthFailed",
    "ApiError",
    "ApiMisconfigured",
    "ApiRejected",
    "ApiTransient",
    "BundleInvalid",
    "EXIT_AUTH",
    "EXIT_BAD_INPUT",
    "EXIT_BUSY",
    "EXIT_CONFIG",
    "EXIT_DAMAGED",
    "EXIT_JOURNAL",
    "EXIT_LOCKED",
    "EXIT_OK",
    "EXIT_PENDING",
    "EXIT_READ_ONLY",
    "EXIT_REJECTED",
    "InvalidInput",
    "JournalDamaged",
    "JournalLocked",
    "JournalReadOnly",
    "JournalUnavailable",
    "SyncBusy",
    "UnknownRun",
    "WecoObserveError",
]

EXIT_OK = 0
#: Bad input: nothing was written (click also uses 2 for usage errors).
EXIT_BAD_INPUT = 2
#: The journal could not be written (only with ``--strict``; otherwise 0).
EXIT_JOURNAL = 3
#: ``sync``: events still pending because the API is unreachable or kept failing.
EXIT_PENDING = 4
#: ``sync``: the API refused the key (401/403); run ``weco login``.
EXIT_AUTH = 5
#: ``sync``: some events were rejected by the API (kept, see ``status``).
EXIT_REJECTED = 6
#: ``doctor``: the journal is damaged (run ``weco observe doctor --repair``).
EXIT_DAMAGED = 7
#: ``sync --no-wait``: another syncer holds this journal's sync lock (``doctor --repair``: it stayed busy).
EXIT_BUSY = 8
#: ``sync``: a configuration error: ``WECO_BASE_URL`` is malformed or refused, or what answers
#: there is not the Weco API. Nothing was sent or marked. 78 is ``EX_CONFIG`` of BSD's sysexits.h.
EXIT_CONFIG = 78
#: ``doctor``: another process holds the journal's lock, or an interrupted write waits for an owner
#: to roll it back; nothing was judged damaged, try again.
EXIT_LOCKED = 9
#: ``doctor``: the journal or its folder cannot be read or written by you (not damage).
EXIT_READ_ONLY = 10


class WecoObserveError(Exception):
    """Base class of every error weco-observe raises on purpose."""

    exit_code = 1


class InvalidInput(WecoObserveError, ValueError):
    """The caller's input is invalid; nothing was recorded."""

    exit_code = EXIT_BAD_INPUT


class UnknownRun(InvalidInput):
    """A run id or prefix that the journal does not know."""


class JournalUnavailable(WecoObserveError):
    """The journal could not be opened or written (read-only, disk full, locked)."""

    exit_code = EXIT_JOURNAL


# -- bundles and doctor (issue 5) ---------------------------------------------


class BundleInvalid(InvalidInput):
    """A bundle file is truncated, corrupted, edited or not a bundle; nothing was imported."""


class JournalDamaged(WecoObserveError, ValueError):
    """The journal is damaged (integrity, a code blob or a payload): ``doctor --repair`` salvages it; a ValueError."""

    exit_code = EXIT_DAMAGED


class JournalLocked(WecoObserveError):
    """Another process holds the journal's lock (or its interrupted write awaits an owner): not damage."""

    exit_code = EXIT_LOCKED


class JournalReadOnly(WecoObserveError):
    """The journal or its folder cannot be read or written by this user: not damage."""

    exit_code = EXIT_READ_ONLY


# -- sync and the API client (issue 3) ----------------------------------------


class ApiError(WecoObserveError):
    """The Weco API did not accept a request; ``status`` and ``detail`` say how."""

    exit_code = EXIT_PENDING

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        detail: str | None = None,
        retry_after: float | None = None,
        ambiguous: bool = False,
        unreachable: bool = False,
    ):
        super().__init__(message)
        self.status = status
        self.detail = detail
        self.retry_after = retry_after
        #: the request may have been applied although no answer came (a timeout, a dropped connection)
        self.ambiguous = ambiguous
        #: no connection could be opened at all (refused, no route, DNS, connect timeout)
        self.unreachable = unreachable


class ApiTransient(ApiError):
    """A failure that may pass: a timeout, a dropped connection, 408/429/5xx, or a 2xx without a JSON object."""


class ApiAuthFailed(ApiError):
    """The API refused the key (401/403): run ``weco login``; everything stays pending."""

    exit_code = EXIT_AUTH


class ApiMisconfigured(ApiError):
    """``WECO_BASE_URL`` is malformed, or the server there does not answer as the Weco API: nothing was marked."""

    exit_code = EXIT_CONFIG


class ApiRejected(ApiError):
    """The API refused the request itself (a 4xx other than auth); resending it unchanged cannot succeed."""

    exit_code = EXIT_REJECTED


class SyncBusy(WecoObserveError):
    """Another syncer holds this journal's sync lock (``sync --no-wait``)."""

    exit_code = EXIT_BUSY
