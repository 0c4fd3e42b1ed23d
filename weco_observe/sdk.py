"""The Python SDK: ``WecoObserver`` and ``ObserveRun``, with the official signatures.

Thin on purpose: each call is one journal transaction and returns. It never
touches the network (a background syncer does that) and never interrupts the
user's loop: invalid arguments give a ``WecoObserveWarning`` and record nothing
(``strict=True`` raises instead); a journal that cannot be written spills the
call to a file that the next successful open imports, and warns.

    from weco_observe import WecoObserver

    obs = WecoObserver()
    run = obs.create_run(source_code={"train.py": src}, primary_metric="val_bpb")
    run.log_step(1, metrics={"val_bpb": 2.26}, code={"train.py": src})
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import background, ids, spill
from .settings import Settings
from .errors import InvalidInput, JournalUnavailable

__all__ = ["ObserveRun", "WecoObserveWarning", "WecoObserver"]


class WecoObserveWarning(UserWarning):
    """Something was not recorded as asked (bad input, or the journal was unavailable)."""


def _check(op: str, kwargs: dict[str, Any]) -> None:
    """The journal's own checks, first, so that a message names the SDK's keyword arguments
    (``metrics``, ``primary_metric``), not the CLI's flags the journal's would name."""
    from . import validate

    get = kwargs.get
    if op == "create_run":
        validate.check_run_args(
            get("source_code"),
            get("metric"),
            get("name"),
            get("additional_instructions"),
            get("metadata"),
            names=validate.SDK_NAMES,
        )
    else:
        validate.check_step_args(
            get("step"),
            get("status"),
            get("description"),
            get("metrics"),
            get("code"),
            get("parent_step"),
            get("metadata"),
            names=validate.SDK_NAMES,
        )


class WecoObserver:
    """Entry point of the SDK. ``api_key`` is used only by the background syncer and is never stored.

    >>> obs = WecoObserver(journal_path=tmp / "sdk" / "journal.db")
    >>> run = obs.create_run(source_code={"a.py": "x=1"}, primary_metric="loss")
    >>> run.log_step(1, metrics={"loss": 0.5})["parent_step"]
    0
    >>> obs.close()
    """

    def __init__(
        self,
        api_key: str | None = None,
        *,
        journal_path: str | Path | None = None,
        strict: bool = False,
    ):
        self._api_key = api_key
        self._path = Path(journal_path) if journal_path is not None else Settings.load().journal_path
        self.strict = strict
        self._journal: Any = None
        #: read when the journal is first opened, and kept: building one costs more than a durable
        #: ``log_step`` without it (the background-sync check after each call reads it)
        self._settings: Settings | None = None
        self._lock = threading.Lock()

    # -- plumbing -------------------------------------------------------------

    @property
    def journal_path(self) -> Path:
        return self._path

    def _open(self) -> Any:
        """The journal writer, opened once (the journal, or in cluster mode a segment writer); the
        first open replays calls spilled while the journal could not be written."""
        with self._lock:
            if self._journal is None:
                from . import store

                self._settings = Settings.load()
                self._journal = store.writer(self._settings, self._path, append=True)
            return self._journal

    def _warn(self, message: str, stacklevel: int = 4) -> None:
        warnings.warn(f"weco-observe: {message}", WecoObserveWarning, stacklevel=stacklevel)

    def _record(self, op: str, kwargs: dict[str, Any]) -> Any:
        """Run one journal write; on bad input warn (or raise), on an unavailable journal spill."""
        try:
            _check(op, kwargs)
            journal = self._open()
            result = journal.create_run(**kwargs) if op == "create_run" else journal.log_step(**kwargs)
        except InvalidInput as exc:
            if self.strict:
                raise
            self._warn(f"{exc} (nothing recorded)")
            return None
        except JournalUnavailable as exc:
            try:
                if self.strict and op == "create_run":  # a create is not idempotent: no spill the caller can't see
                    spill.check(op, kwargs)
                    raise JournalUnavailable(f"{exc}; the run was not recorded") from None
                where = spill.write(op, kwargs, self._path)
            except InvalidInput as bad:  # refused whatever state the journal is in
                if self.strict:
                    raise bad from None
                self._warn(f"{bad} (nothing recorded)")
                return None
            if where is None:
                message = f"{exc}; could not spill it either: this call is lost"
            else:
                message = f"{exc}; saved to {where}, imported on the next successful open"
            if self.strict:
                raise JournalUnavailable(message) from None
            self._warn(message)
            return kwargs
        if op == "log_step" and result.get("run_first_seen"):
            self._note_first_seen(journal, kwargs["run"], result.get("run_id"))
        background.trigger(self._path, self._api_key, self._settings)
        return result

    def _note_first_seen(self, journal: Any, ref: str, run_id: str | None) -> None:
        """Warn that ``ref`` became a remote-only run (maybe a mistyped server id); never raises otherwise."""
        from . import notices

        try:
            note = notices.first_seen_server_id(journal, ref, run_id)
        except JournalUnavailable:
            return
        self._warn(note, stacklevel=5)

    # -- API ------------------------------------------------------------------

    def create_run(
        self,
        *,
        source_code: Mapping[str, str],
        primary_metric: str,
        maximize: bool = False,
        name: str | None = None,
        additional_instructions: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> ObserveRun | None:
        """Create a run with ``source_code`` as its baseline (step 0).

        If nothing could be recorded (bad arguments: a warning said why), the result is a
        falsy run with ``run_id`` None whose ``log_step`` warns and records nothing, so a
        loop written like the guide's keeps running instead of failing on ``None.log_step``.
        """
        run_id = ids.new_run_id()
        kwargs = {
            "source_code": source_code,
            "metric": primary_metric,
            "maximize": maximize,
            "name": name,
            "additional_instructions": additional_instructions,
            "metadata": metadata,
            "run_id": run_id,
            "event_id": ids.ulid(),
        }
        if self._record("create_run", kwargs) is None:
            return ObserveRun(self, None, primary_metric=primary_metric, maximize=bool(maximize))
        return ObserveRun(self, run_id, primary_metric=primary_metric, maximize=bool(maximize))

    def run(self, run_id: str) -> ObserveRun:
        """Open an existing run (local id, server id, or a unique prefix) to keep logging to it.

        A server run id this journal has never seen (made by the official client,
        say) is accepted: its steps are journaled and later synced to that id.
        """
        from . import validate

        validate.check_run_ref(run_id, "run_id")
        try:
            row = self._open().find_run(run_id, prefix=True)
        except JournalUnavailable:
            row = None
        if row is not None:
            return ObserveRun(
                self,
                row["id"],
                primary_metric=row["metric"],
                maximize=bool(row["maximize"]) if row["maximize"] is not None else None,
            )
        if ids.looks_like_server_id(run_id) or ids.is_local_run_id(run_id):
            return ObserveRun(self, run_id)
        raise InvalidInput(f"unknown run {run_id!r}: use an id from create_run() or `weco observe runs`")

    get_run = run

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until every pending event is delivered (or ``timeout`` passes); True if none remain."""
        from . import replay

        return replay.flush(self._path, timeout=timeout, api_key=self._api_key)

    def close(self) -> None:
        with self._lock:
            if self._journal is not None:
                self._journal.close()
                self._journal = None

    def __enter__(self) -> WecoObserver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ObserveRun:
    """One run. ``run_id`` is the local id (``local-...``); ``server_id`` appears once synced."""

    def __init__(
        self,
        observer: WecoObserver,
        run_id: str | None,
        *,
        primary_metric: str | None = None,
        maximize: bool | None = None,
    ):
        self._observer = observer
        self.run_id = run_id
        self.primary_metric = primary_metric
        self.maximize = maximize

    def __repr__(self) -> str:
        return f"ObserveRun(run_id={self.run_id!r})"

    def __bool__(self) -> bool:
        """False for a run that was never created (``run_id`` None)."""
        return self.run_id is not None

    @property
    def server_id(self) -> str | None:
        """The Weco API's id for this run, once the create has been delivered."""
        try:
            row = self._observer._open().find_run(self.run_id)
        except JournalUnavailable:
            return None
        return row["server_id"] if row is not None else None

    def log_step(
        self,
        step: int,
        *,
        status: str = "completed",
        description: str | None = None,
        metrics: Mapping[str, float] | None = None,
        code: Mapping[str, str] | None = None,
        parent_step: int | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Journal one step (durably, before returning). Returns the stored step, or None if refused."""
        if self.run_id is None:
            self._observer._warn(
                f"step {step}: this run was never created, see the warning from create_run (nothing recorded)",
                stacklevel=3,
            )
            return None
        result = self._observer._record(
            "log_step",
            {
                "run": self.run_id,
                "step": step,
                "status": status,
                "description": description,
                "metrics": metrics,
                "code": code,
                "parent_step": parent_step,
                "metadata": metadata,
                "event_id": ids.ulid(),
            },
        )
        if result is not None and metrics and self.primary_metric not in (None, *metrics):
            from .notices import missing_primary_metric

            note = missing_primary_metric(self.primary_metric, metrics, status, step, "metrics")
            if note:  # journaled all the same
                self._observer._warn(note, stacklevel=3)
        return result

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait for delivery of everything pending (see :meth:`WecoObserver.flush`)."""
        return self._observer.flush(timeout=timeout)

    def __enter__(self) -> ObserveRun:
        return self

    def __exit__(self, *exc: object) -> None:
        return None
