"""The records: one type each for a run, a step, an outbox event and a code blob, from store to wire.

Every place that moves a run or a step between forms goes through here:

- a journal row (``from_row`` / ``to_row``, in :data:`Run.COLUMNS` order),
- a JSON document in a bundle line or a cluster-mode segment (``to_doc`` / ``from_doc``),
- the outbox payload: the exact request body the API will get, with code as
  blob hashes (``Run.create_payload``, ``Step.payload``; ``Run.from_create_payload``,
  ``Step.from_payload``),
- the wire body, where code is file text (:func:`wire_body`), and back
  (:func:`run_args_from_wire`, :func:`step_args_from_wire`, for a server such as
  the relay or the emulator).

No other module lists the journal's columns or the API's payload keys. The
payload keys are the wire contract's (``shared/reference/weco-api.md``):
optional fields are left out unless set, and ``parent_step`` is sent whenever the
parent is known so the server's tree equals the local one.

One JSON encoder serves the package: :func:`dumps` (compact, UTF-8 kept as is,
NaN and infinities refused).

**Damaged rows.** A few flipped bytes in the journal file (a bad disk block, a torn
copy) can leave a column that is not UTF-8 or a payload that does not parse; SQLite's
integrity check does not see it. Every connection to a journal reads text through
:func:`journal_text`, which never fails: text that is not UTF-8 comes back as a
:class:`DamagedText` (shown with U+FFFD), and :func:`loads` raises
:class:`~weco_observe.errors.JournalDamaged` for it or for JSON that does not parse,
so a damaged row is refused where it is read, never sent or bundled. An event whose
payload is damaged is still an :class:`Event` (its state can be counted and marked)
but carries ``damage``: every use of its payload raises JournalDamaged.

Only the standard library and the package's two lightest modules (``errors``, ``validate``) are
imported: this runs on the ``weco observe log`` hot path.

    >>> step = Step(run_id="local-1", step=2, status="completed", metrics={"loss": 0.5}, parent_step=1,
    ...             event_id="e2", created_at=1.0, updated_at=1.0)
    >>> step.payload()
    {'step': 2, 'status': 'completed', 'metrics': {'loss': 0.5}, 'parent_step': 1}
    >>> Step.from_payload(step.payload(), run_id="local-1", event_id="e2", at=1.0) == step
    True
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from . import validate
from .errors import InvalidInput, JournalDamaged

__all__ = [
    "CREATE",
    "EVENT_KINDS",
    "LOCAL_ID_KEY",
    "LOG",
    "STATUSES",
    "Blob",
    "CodeRef",
    "Event",
    "Run",
    "Step",
    "DamagedText",
    "disagrees",
    "dumps",
    "journal_text",
    "loads",
    "run_args_from_wire",
    "step_args_from_wire",
    "wire_body",
]

#: The two kinds of outbox event, one per API endpoint.
CREATE = "create_run"
LOG = "log_step"
EVENT_KINDS = (CREATE, LOG)
STATUSES = ("completed", "failed")
#: The create's metadata key that carries the local run id, so a duplicate run on the server can be traced.
LOCAL_ID_KEY = "weco_observe_local_id"


class Row(Protocol):
    """A row as SQLite (``sqlite3.Row``) or a dict gives it."""

    def __getitem__(self, key: str, /) -> Any: ...

    def keys(self) -> Iterable[str]: ...


class DamagedText(str):
    """Text a journal column held that was not valid UTF-8 (flipped bytes), decoded with U+FFFD."""


def journal_text(data: bytes) -> str:
    """The ``text_factory`` of every journal connection: UTF-8, or :class:`DamagedText`, never an error.

    >>> journal_text("é".encode()), type(journal_text(b"caf\\xe9")).__name__
    ('é', 'DamagedText')
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return DamagedText(data.decode("utf-8", "replace"))


def _damaged(what: str) -> Exception:
    return JournalDamaged(f"{what} is damaged in the journal: run `weco observe doctor --repair`")


#: made once: ``json.dumps`` with options builds a new encoder per call, a third of the cost of a small value
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def dumps(value: Any) -> str:
    """The package's one JSON encoder: compact, non-ASCII kept, NaN/Infinity refused (ValueError).

    >>> dumps({"é": [1, 2.5]})
    '{"é":[1,2.5]}'
    """
    return _ENCODER.encode(value)


def loads(text: str | bytes | None, what: str = "a journal row") -> Any:
    """Inverse of :func:`dumps` for a journal column; None stays None (a NULL column).

    Raises :class:`~weco_observe.errors.JournalDamaged` (a ValueError) for text that
    was not UTF-8 on disk or does not parse.
    """
    if text is None:
        return None
    if isinstance(text, DamagedText):
        raise _damaged(what)
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise _damaged(what) from None


def _json_column(value: Any) -> str | None:
    return None if value is None else dumps(value)


# -- code ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeRef:
    """A code snapshot as stored: file path -> sha256 of the file's UTF-8 text (a blob's name).

    >>> CodeRef.from_manifest({"b.py": "22", "a.py": "11"}).manifest()
    {'a.py': '11', 'b.py': '22'}
    """

    files: tuple[tuple[str, str], ...]

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, str] | None) -> CodeRef | None:
        if manifest is None:
            return None
        return cls(tuple(sorted(manifest.items())))

    def manifest(self) -> dict[str, str]:
        return dict(self.files)

    def hashes(self) -> list[str]:
        return [digest for _, digest in self.files]

    def __bool__(self) -> bool:
        return bool(self.files)


def _code(value: Mapping[str, str] | CodeRef | None) -> CodeRef | None:
    return value if isinstance(value, CodeRef) or value is None else CodeRef.from_manifest(value)


def _manifest(code: CodeRef | None) -> dict[str, str] | None:
    return None if code is None else code.manifest()


# -- runs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """A run as this journal knows it. ``id`` is the local id; ``server_id`` the API's once known.

    A *remote-only* run was first seen by its server id (made elsewhere): it has
    no create event, and its name, metric and goal are unknown (None).
    """

    id: str
    server_id: str | None = None
    remote_only: bool = False
    name: str | None = None
    metric: str | None = None
    maximize: bool | None = None
    additional_instructions: str | None = None
    metadata: dict[str, Any] | None = None
    created_at: float = 0.0
    updated_at: float = 0.0

    COLUMNS = (
        "id",
        "server_id",
        "remote_only",
        "name",
        "metric",
        "maximize",
        "additional_instructions",
        "metadata",
        "created_at",
        "updated_at",
    )

    @classmethod
    def from_row(cls, row: Row) -> Run:
        maximize = row["maximize"]
        return cls(
            id=row["id"],
            server_id=row["server_id"],
            remote_only=bool(row["remote_only"]),
            name=row["name"],
            metric=row["metric"],
            maximize=None if maximize is None else bool(maximize),
            additional_instructions=row["additional_instructions"],
            metadata=loads(row["metadata"]),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    def to_row(self) -> tuple[Any, ...]:
        return (
            self.id,
            self.server_id,
            int(self.remote_only),
            self.name,
            self.metric,
            None if self.maximize is None else int(self.maximize),
            self.additional_instructions,
            _json_column(self.metadata or None),
            self.created_at,
            self.updated_at,
        )

    def to_doc(self) -> dict[str, Any]:
        """A JSON document (a bundle's ``runs.jsonl`` line, a segment's run)."""
        row = dict(zip(self.COLUMNS, self.to_row(), strict=True))
        row["metadata"] = self.metadata or None
        return row

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Run:
        row: dict[str, Any] = {**dict.fromkeys(cls.COLUMNS), **doc, "metadata": _json_column(doc.get("metadata"))}
        return cls.from_row(row)

    def create_payload(self, source_code: CodeRef) -> dict[str, Any]:
        """The body of ``POST /external/runs`` as journaled (code as blob hashes)."""
        payload: dict[str, Any] = {
            "source_code": source_code.manifest(),
            "metric_name": self.metric,
            "maximize": bool(self.maximize),
        }
        if self.name is not None:
            payload["name"] = self.name
        if self.additional_instructions is not None:
            payload["additional_instructions"] = self.additional_instructions
        if self.metadata:
            payload["metadata"] = self.metadata
        return payload

    @classmethod
    def from_create_payload(cls, payload: Mapping[str, Any], *, run_id: str, at: float) -> tuple[Run, CodeRef]:
        """The run and its baseline code from a journaled create body."""
        run = cls(
            id=run_id,
            name=payload.get("name"),
            metric=payload.get("metric_name"),
            maximize=bool(payload.get("maximize")),
            additional_instructions=payload.get("additional_instructions"),
            metadata=payload.get("metadata") or None,
            created_at=at,
            updated_at=at,
        )
        return run, CodeRef.from_manifest(payload.get("source_code") or {}) or CodeRef(())


# -- steps -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """The current state of one (run, step), with its tree parent resolved at log time.

    ``event_id`` names the outbox event that last set it, so merges keep the newest state.
    """

    run_id: str
    step: int
    status: str = "completed"
    description: str | None = None
    metrics: dict[str, float] | None = None
    code: CodeRef | None = None
    parent_step: int | None = None
    metadata: dict[str, Any] | None = None
    event_id: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0

    COLUMNS = (
        "run_id",
        "step",
        "status",
        "description",
        "metrics",
        "code",
        "parent_step",
        "metadata",
        "event_id",
        "created_at",
        "updated_at",
    )

    def __post_init__(self) -> None:
        if self.code is not None and not isinstance(self.code, CodeRef):
            object.__setattr__(self, "code", CodeRef.from_manifest(self.code))

    @classmethod
    def from_row(cls, row: Row) -> Step:
        return cls(
            run_id=row["run_id"],
            step=row["step"],
            status=row["status"],
            description=row["description"],
            metrics=loads(row["metrics"]),
            code=CodeRef.from_manifest(loads(row["code"])),
            parent_step=row["parent_step"],
            metadata=loads(row["metadata"]),
            event_id=row["event_id"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    def to_row(self) -> tuple[Any, ...]:
        return (
            self.run_id,
            self.step,
            self.status,
            self.description,
            _json_column(self.metrics),
            _json_column(_manifest(self.code)),
            self.parent_step,
            _json_column(self.metadata),
            self.event_id,
            self.created_at,
            self.updated_at,
        )

    def to_doc(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "step": self.step,
            "status": self.status,
            "description": self.description,
            "metrics": self.metrics,
            "code": _manifest(self.code),
            "parent_step": self.parent_step,
            "metadata": self.metadata,
            "event_id": self.event_id,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Step:
        return cls(
            run_id=doc["run_id"],
            step=doc["step"],
            status=doc["status"],
            description=doc.get("description"),
            metrics=doc.get("metrics"),
            code=CodeRef.from_manifest(doc.get("code")),
            parent_step=doc.get("parent_step"),
            metadata=doc.get("metadata"),
            event_id=doc["event_id"],
            created_at=doc.get("created_at") or 0.0,
            updated_at=doc.get("updated_at") or 0.0,
        )

    def payload(self) -> dict[str, Any]:
        """The body of ``POST /external/runs/{id}/steps`` as journaled (the step's whole state,
        code as blob hashes); optional fields only when set."""
        payload: dict[str, Any] = {"step": self.step, "status": self.status}
        if self.description is not None:
            payload["description"] = self.description
        if self.metrics:
            payload["metrics"] = self.metrics
        if self.code:
            payload["code"] = _manifest(self.code)
        if self.parent_step is not None:
            payload["parent_step"] = self.parent_step
        if self.metadata:
            payload["metadata"] = self.metadata
        return payload

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], *, run_id: str, event_id: str, at: float) -> Step:
        """The step a journaled step body describes (it carries the step's whole state)."""
        return cls(
            run_id=run_id,
            step=payload["step"],
            status=payload.get("status", "completed"),
            description=payload.get("description"),
            metrics=payload.get("metrics"),
            code=CodeRef.from_manifest(payload.get("code")),
            parent_step=payload.get("parent_step"),
            metadata=payload.get("metadata"),
            event_id=event_id,
            created_at=at,
            updated_at=at,
        )

    @classmethod
    def baseline(cls, run_id: str, code: CodeRef, *, event_id: str, at: float) -> Step:
        """Step 0 as a create makes it: completed, the baseline code, no parent."""
        return cls(run_id=run_id, step=0, code=code, event_id=event_id, created_at=at, updated_at=at)

    def merged_with(self, prev: Step | None) -> Step:
        """A re-log keeps every field it leaves out (None), as the API's upsert does."""
        if prev is None:
            return self
        return replace(
            self,
            description=self.description if self.description is not None else prev.description,
            metrics=self.metrics if self.metrics is not None else prev.metrics,
            code=self.code if self.code is not None else prev.code,
            metadata=self.metadata if self.metadata is not None else prev.metadata,
            created_at=prev.created_at,
        )


# -- outbox events -------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One outbox event: a create or a step log, as the request body it will send.

    The delivery state lives in the outbox columns (see ``outbox.py``); here it is
    carried as data only (a bundle moves it between journals).
    """

    id: str
    run_id: str
    kind: str
    step: int | None
    payload: dict[str, Any]
    created_at: float
    state: str = "pending"
    seq: int | None = None
    attempts: int = 0
    unanswered: int = 0
    last_error: str | None = None
    delivered_at: float | None = None
    #: why the journaled payload cannot be read (flipped bytes); None for a sound event
    damage: str | None = None

    #: the columns written when an event is first journaled (the rest are the outbox's)
    NEW_COLUMNS = ("id", "run_id", "kind", "step", "payload", "state", "created_at", "delivered_at")

    @classmethod
    def from_row(cls, row: Row) -> Event:
        """The event of a journal row. A payload that cannot be read gives an event with ``damage``
        set (its state can still be counted and marked); its payload is then never used."""
        keys = row.keys()
        damage = None
        try:
            payload = loads(row["payload"], f"the payload of event {row['id']}")
            if not isinstance(payload, dict):
                raise _damaged(f"the payload of event {row['id']}")
        except ValueError as exc:
            payload, damage = {}, str(exc)
        return cls(
            id=row["id"],
            run_id=row["run_id"],
            kind=row["kind"],
            step=row["step"],
            payload=payload,
            created_at=row["created_at"],
            state=row["state"],
            seq=row["seq"] if "seq" in keys else None,
            attempts=row["attempts"] if "attempts" in keys else 0,
            unanswered=row["unanswered"] if "unanswered" in keys else 0,
            last_error=row["last_error"] if "last_error" in keys else None,
            delivered_at=row["delivered_at"] if "delivered_at" in keys else None,
            damage=damage,
        )

    def sound(self) -> Event:
        """This event, if its payload was read intact; else raises JournalDamaged."""
        if self.damage is not None:
            raise JournalDamaged(self.damage)
        return self

    def check(self) -> None:
        """Raise InvalidInput (or TypeError/KeyError) unless the payload is one this tool writes: the
        wire contract's keys only, values that pass the same checks as ``init``/``log``, code as blob
        hashes, the step of its row."""
        payload = self.payload
        allowed = _CREATE_KEYS if self.kind == CREATE else _LOG_KEYS if self.kind == LOG else frozenset()
        if not allowed or not set(payload) <= allowed:
            raise InvalidInput(f"unexpected keys {sorted(set(payload) - allowed)}")
        _check_payload(self.kind, payload, self.step)

    def checked(self) -> Event:
        """This event, if :meth:`check` passes; else raises JournalDamaged: a payload can parse and
        still hold a flipped byte."""
        self.sound()
        try:
            self.check()
        except (InvalidInput, TypeError, KeyError) as exc:
            raise JournalDamaged(
                f"the payload of event {self.id} is damaged in the journal ({exc}): run `weco observe doctor --repair`"
            ) from None
        return self

    def to_row(self) -> tuple[Any, ...]:
        """Values for :data:`NEW_COLUMNS`."""
        self.sound()
        return (
            self.id,
            self.run_id,
            self.kind,
            self.step,
            dumps(self.payload),
            self.state,
            self.created_at,
            self.delivered_at,
        )

    def to_doc(self) -> dict[str, Any]:
        self.sound()
        return {
            "id": self.id,
            "run_id": self.run_id,
            "kind": self.kind,
            "step": self.step,
            "payload": self.payload,
            "state": self.state,
            "created_at": self.created_at,
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Event:
        return cls(
            id=doc["id"],
            run_id=doc["run_id"],
            kind=doc["kind"],
            step=doc.get("step"),
            payload=doc["payload"],
            created_at=doc.get("created_at") or 0.0,
            state=doc.get("state", "pending"),
        )

    @classmethod
    def create(cls, run: Run, code: CodeRef, *, event_id: str) -> Event:
        return cls(
            id=event_id,
            run_id=run.id,
            kind=CREATE,
            step=None,
            payload=run.create_payload(code),
            created_at=run.created_at,
        )

    @classmethod
    def log(cls, step: Step) -> Event:
        return cls(
            id=step.event_id,
            run_id=step.run_id,
            kind=LOG,
            step=step.step,
            payload=step.payload(),
            created_at=step.updated_at,
        )

    def code(self) -> CodeRef | None:
        """The code this event's body names (a create's baseline, a step's snapshot)."""
        value = self.sound().payload.get("source_code" if self.kind == CREATE else "code")
        return CodeRef.from_manifest(value) if isinstance(value, dict) else None

    def as_step(self) -> Step:
        """The step state this event sets (a create sets step 0)."""
        if self.kind == CREATE:
            return Step.baseline(self.run_id, self.code() or CodeRef(()), event_id=self.id, at=self.created_at)
        return Step.from_payload(self.sound().payload, run_id=self.run_id, event_id=self.id, at=self.created_at)

    def as_run(self) -> Run:
        """The run a create event describes."""
        return Run.from_create_payload(self.sound().payload, run_id=self.run_id, at=self.created_at)[0]


# -- code blobs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    """A stored code blob: content-addressed, zlib-compressed, maybe a delta against ``base``."""

    hash: str
    size: int
    base: str | None
    depth: int
    prefix: int
    suffix: int
    data: bytes = field(repr=False)

    COLUMNS = ("hash", "size", "base", "depth", "prefix", "suffix", "data")

    @classmethod
    def from_row(cls, row: Row) -> Blob:
        return cls(*(row[c] for c in cls.COLUMNS))

    def to_row(self) -> tuple[Any, ...]:
        return (self.hash, self.size, self.base, self.depth, self.prefix, self.suffix, self.data)

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = dict(zip(self.COLUMNS, self.to_row(), strict=True))
        doc["data"] = base64.b64encode(self.data).decode("ascii")
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Blob:
        """Raises ValueError when ``data`` is not base64."""
        data = base64.b64decode(doc["data"], validate=True)
        return cls(doc["hash"], doc["size"], doc.get("base") or None, doc["depth"], doc["prefix"], doc["suffix"], data)


# -- the wire ----------------------------------------------------------------------------------


def disagrees(event: Event, step: Step, run: Run | None = None) -> bool:
    """True when ``step``'s row names ``event`` (it holds the step's current state) but the event's
    payload is not that state: one of the two copies has a flipped byte. A create is compared with
    step 0's code, and with its run's row too when ``run`` was made from it (same ``created_at``).
    Events are written with their step (and a create with its run) in one transaction, so the
    copies never differ otherwise.

    >>> step = Step(run_id="r", step=1, status="completed", metrics={"loss": 0.5}, event_id="e1")
    >>> disagrees(Event.log(step), step), disagrees(replace(Event.log(step), payload={"step": 1}), step)
    (False, True)
    """
    if event.damage is not None or step.event_id != event.id:
        return False
    if event.kind == LOG:
        return event.payload != step.payload()
    if event.kind == CREATE:
        if run is None or run.created_at != event.created_at:  # a run row made elsewhere (a bundle's match)
            return event.payload.get("source_code") != (step.code.manifest() if step.code else {})
        return event.payload != run.create_payload(step.code or CodeRef(()))
    return False


_CREATE_KEYS = frozenset({"source_code", "metric_name", "maximize", "name", "additional_instructions", "metadata"})
_LOG_KEYS = frozenset({"step", "status", "description", "metrics", "code", "parent_step", "metadata"})
_HEX = frozenset("0123456789abcdef")


def _check_payload(kind: str, payload: Mapping[str, Any], step: int | None) -> None:
    """Raise InvalidInput (or TypeError/KeyError) unless ``payload`` is a body this tool journals."""
    if kind == CREATE:
        if not isinstance(payload.get("maximize"), bool):
            raise InvalidInput("maximize is not true or false")
        validate.check_run_args(
            payload["source_code"],
            payload.get("metric_name"),
            payload.get("name"),
            payload.get("additional_instructions"),
            payload.get("metadata"),
        )
        manifest = payload["source_code"]
    else:
        if payload.get("step") != step:
            raise InvalidInput(f"step {payload.get('step')!r} is not the event's step {step}")
        args = step_args_from_wire(payload)
        validate.check_step_args(**args)
        manifest = payload.get("code") or {}
    if not all(isinstance(h, str) and len(h) == 64 and _HEX.issuperset(h) for h in manifest.values()):
        raise InvalidInput("a code hash is not a sha256")


def wire_body(event: Event, read_text: Callable[[str], str], local_id: str | None = None) -> dict[str, Any]:
    """The request body to send for ``event``: its payload with code hashes turned into file text.

    A create also carries the local run id in ``metadata[LOCAL_ID_KEY]`` (unless it has
    one already, from the box a relay received it from). Raises
    KeyError when a blob is missing from the journal.
    """
    body = dict(event.checked().payload)
    key = "source_code" if event.kind == CREATE else "code"
    if isinstance(body.get(key), dict):
        body[key] = {path: read_text(digest) for path, digest in body[key].items()}
    if event.kind == CREATE and local_id is not None:
        # A run that came through a relay already carries the id of the box that made it: that one
        # traces a duplicate best, so it is kept.
        body["metadata"] = {LOCAL_ID_KEY: local_id, **(body.get("metadata") or {})}
    return body


def run_args_from_wire(body: Mapping[str, Any]) -> dict[str, Any]:
    """A create request's body as ``Journal.create_run`` keyword arguments (not yet validated)."""
    return {
        "source_code": body.get("source_code"),
        "metric": body.get("metric_name"),
        "maximize": body.get("maximize", False),
        "name": body.get("name"),
        "additional_instructions": body.get("additional_instructions"),
        "metadata": body.get("metadata"),
    }


def step_args_from_wire(body: Mapping[str, Any]) -> dict[str, Any]:
    """A step request's body as ``Journal.log_step`` keyword arguments (not yet validated)."""
    return {
        "step": body.get("step"),
        "status": body.get("status", "completed"),
        "description": body.get("description"),
        "metrics": body.get("metrics"),
        "code": body.get("code"),
        "parent_step": body.get("parent_step"),
        "metadata": body.get("metadata"),
    }
