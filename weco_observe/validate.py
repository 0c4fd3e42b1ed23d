"""Input checks shared by the CLI, the SDK, the journal, spill files, segments and bundles.

Each check raises :class:`~weco_observe.errors.InvalidInput` with a one-line
message naming what was wrong and what to do; nothing has been written when it
does. Cheap enough for the hot path: json, math and os only.

Everything a check lets through can be stored and sent as it is: text is valid
UTF-8 (no lone surrogates, which a terminal or a file name in a foreign encoding
can produce and which SQLite, JSON files and HTTP all refuse), JSON is at most
:data:`MAX_JSON_DEPTH` levels deep (a deeper document overflows the parser's
recursion long before it means anything), and a source file is a regular file
of at most ``--max-source-mb`` (read with that bound, so ``/dev/zero`` or a
FIFO never hangs or fills memory).

A message names each argument as its caller calls it: the CLI's flags
(``--metrics``, :data:`CLI_NAMES`, the default) or the SDK's keyword arguments
(``metrics=``, :data:`SDK_NAMES`). Each check takes that name (``flag``,
``name``), and ``check_run_args``/``check_step_args`` a ``names`` table.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import InvalidInput

#: Deeper JSON (metadata, --metrics) is refused: real metadata is a few levels deep, and the
#: parsers on the way (Python's, SQLite's, the server's) give up somewhere past a thousand.
MAX_JSON_DEPTH = 100
#: A source file larger than this many MiB is refused unless ``--max-source-mb`` raises it.
DEFAULT_MAX_SOURCE_MB = 50

STATUSES = ("completed", "failed")
_GOALS = {"max": True, "maximize": True, "min": False, "minimize": False}

#: What the CLI calls each argument of ``create_run``/``log_step`` in its messages: its flags.
CLI_NAMES = {
    "step": "--step",
    "status": "--status",
    "description": "--description",
    "metrics": "--metrics",
    "code": "--source/--sources",
    "parent_step": "--parent-step",
    "metadata": "--metadata",
    "source_code": "--source/--sources",
    "metric": "--metric",
    "name": "--name",
    "additional_instructions": "--additional-instructions",
}
#: What the SDK calls them: its keyword arguments (``create_run(primary_metric=...)``).
SDK_NAMES = {**{key: key for key in CLI_NAMES}, "metric": "primary_metric"}


def _example(name: str, value: str) -> str:
    """How the caller would pass ``value`` as ``name``: ``--metric val_bpb`` or ``primary_metric='val_bpb'``."""
    return f"{name} {value}" if name.startswith("--") else f"{name}={value!r}"


def goal_to_maximize(goal: str) -> bool:
    """``max``/``maximize`` -> True, ``min``/``minimize`` -> False (case-insensitive)."""
    try:
        return _GOALS[goal.strip().lower()]
    except (KeyError, AttributeError):
        raise InvalidInput(f"unknown --goal {goal!r}: use one of max, maximize, min, minimize") from None


def check_status(status: Any, flag: str = "--status") -> str:
    if status not in STATUSES:
        raise InvalidInput(f"unknown {flag} {status!r}: use 'completed' or 'failed'")
    return status


#: SQLite stores integers in 64 bits; a larger step cannot be journaled.
MAX_STEP = 2**63 - 1


def check_step(step: Any, flag: str = "--step") -> int:
    if isinstance(step, bool) or not isinstance(step, int):
        raise InvalidInput(f"{flag} must be a whole number, got {step!r}")
    if step < 0:
        raise InvalidInput(f"{flag} must be 0 or more (0 is the baseline), got {step}")
    if step > MAX_STEP:
        raise InvalidInput(f"{flag} is too large (at most {MAX_STEP}), got {step}")
    return step


def parse_step(text: str, flag: str = "--step") -> int:
    """Parse a step number given as text: ``"3"`` -> 3; ``"-1"``, ``"1.5"`` are refused."""
    text = text.strip()
    digits = text[1:] if text[:1] in ("+", "-") else text
    # ASCII only: str.isdigit() also accepts "²" (which int() refuses) and other scripts' digits.
    if not (digits.isascii() and digits.isdigit()):
        raise InvalidInput(f"{flag} must be a whole number, got {text!r}")
    return check_step(int(text), flag)


def check_metrics(metrics: Any, flag: str = "--metrics") -> dict[str, float]:
    """Metrics are an object of metric name -> finite number (booleans are not numbers)."""
    if not isinstance(metrics, Mapping):
        example = """'{"val_bpb": 1.03}'""" if flag.startswith("--") else """{"val_bpb": 1.03}"""
        raise InvalidInput(f"{flag} must be a JSON object of name -> number, e.g. {example}")
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"{flag}: metric names must be non-empty strings, got {name!r}")
        if not is_encodable(name):
            raise InvalidInput(f"{flag}: metric name {name!r} is not valid UTF-8 text (a lone surrogate)")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidInput(f"{flag}: metric {name!r} must be a number, got {_shown(value)}")
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an int too large for a float (JSON allows 1000...0)
            raise InvalidInput(f"{flag}: metric {name!r} is too large to be a number") from None
        if not finite:
            raise InvalidInput(f"{flag}: metric {name!r} must be finite, got {value!r}")
        out[name] = value
    return out


def _shown(value: Any) -> str:
    """A value as the user wrote it in JSON (``true``, ``"x"``, ``null``), falling back to repr."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(text: str, flag: str) -> dict[str, Any]:
    """Parse a flag's JSON object; an empty value, NaN, or nesting past :data:`MAX_JSON_DEPTH` is refused.

    >>> parse_json_object('{"a": [1, {"b": 2}]}', "--metadata")
    {'a': [1, {'b': 2}]}
    """
    if not text.strip():
        raise InvalidInput(f"{flag} is empty: pass a JSON object such as '{{\"a\": 1}}', or leave the flag out")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidInput(f"{flag} is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except ValueError as exc:
        raise InvalidInput(f"{flag} is not valid JSON ({exc}): pass an object such as '{{\"a\": 1}}'") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"{flag} must be a JSON object, got {type(value).__name__}")
    check_json_value(value, flag)
    return value


def check_json_value(value: Any, flag: str) -> None:
    """``value`` can be stored and sent as JSON: at most :data:`MAX_JSON_DEPTH` deep, every key and
    string valid UTF-8. Walks without recursion, so a 60,000-deep value is refused, not a crash.

    >>> check_json_value({"a": ["\\ud800"]}, "--metadata")
    Traceback (most recent call last):
    ...
    weco_observe.errors.InvalidInput: --metadata: "a" holds text that is not valid UTF-8 (a lone surrogate)
    """
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]
    while stack:
        item, depth, where = stack.pop()
        if isinstance(item, str):
            if not is_encodable(item):
                raise InvalidInput(f"{flag}: {_place(where)} holds text that is not valid UTF-8 (a lone surrogate)")
            continue
        if not isinstance(item, (Mapping, list, tuple)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise InvalidInput(f"{flag} is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
        if isinstance(item, Mapping):
            for key, child in item.items():
                if isinstance(key, str) and not is_encodable(key):
                    raise InvalidInput(f"{flag}: a key {key!r} is not valid UTF-8 text (a lone surrogate)")
                stack.append((child, depth + 1, where or str(key)))
        else:
            stack.extend((child, depth + 1, where) for child in item)


def _place(where: str) -> str:
    return f'"{where}"' if where else "a value"


def parse_metrics(text: str) -> dict[str, float]:
    """Parse ``--metrics``: ``'{"val_bpb": 1.03}'`` -> ``{"val_bpb": 1.03}``."""
    return check_metrics(parse_json_object(text, "--metrics"))


def check_metadata(metadata: Any, flag: str = "--metadata") -> dict[str, Any]:
    if not isinstance(metadata, Mapping):
        raise InvalidInput(f"{flag} must be a JSON object")
    check_json_value(metadata, flag)
    try:
        json.dumps(metadata, allow_nan=False)
    except RecursionError:  # a cycle (a dict that holds itself) or nesting in an object json cannot see into
        raise InvalidInput(f"{flag} is nested too deeply or holds itself") from None
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{flag} must be JSON-serialisable with finite numbers ({exc})") from None
    return dict(metadata)


def check_code(code: Any, flag: str = "code") -> dict[str, str]:
    """Code is a non-empty object of path -> file text, without NUL bytes."""
    if not isinstance(code, Mapping) or not code:
        raise InvalidInput(f"{flag} must be a non-empty dict of path -> file text")
    for path, text in code.items():
        if not isinstance(path, str) or not path:
            raise InvalidInput(f"{flag}: paths must be non-empty strings, got {path!r}")
        if not is_encodable(path):
            raise InvalidInput(f"{flag}: path {path!r} is not valid UTF-8 text: rename the file")
        if not isinstance(text, str):
            raise InvalidInput(f"{flag}: {path!r} must be text (str), got {type(text).__name__}")
        if "\x00" in text:
            raise InvalidInput(f"{flag}: {path!r} looks binary (contains NUL bytes); track text files only")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInput(f"{flag}: {path!r} is not valid UTF-8 text") from None
    return dict(code)


def is_encodable(text: str) -> bool:
    """False for text that cannot be stored as UTF-8 (lone surrogates, from a bad terminal or file name)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(value: Any, name: str) -> str | None:
    """None, or a string that is valid UTF-8 text (``name`` is the flag or argument, for the message)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"{name} must be a string, got {type(value).__name__}")
    if not is_encodable(value):
        raise InvalidInput(f"{name} is not valid UTF-8 text (it holds a lone surrogate, {_first_surrogate(value)})")
    return value


def _first_surrogate(text: str) -> str:
    return next((f"U+{ord(c):04X} at {i}" for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), "?")


def is_time(value: Any) -> bool:
    """None, or a plausible epoch time in seconds (a number, not a boolean, before the year 5138)."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e11)


def check_run_ref(ref: Any, flag: str = "--run-id") -> str:
    """A run id or prefix as given: non-empty UTF-8 text (it is looked up, never trusted further)."""
    if not isinstance(ref, str) or not ref:
        raise InvalidInput(f"{flag} must be a run id, got {ref!r}")
    check_text(ref, flag)
    return ref


def max_source_bytes(mb: Any) -> int:
    """``--max-source-mb`` in bytes (MiB): a positive number."""
    if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not math.isfinite(mb) or mb <= 0:
        raise InvalidInput(f"--max-source-mb must be a positive number of MiB, got {mb!r}")
    return int(mb * 2**20)


def read_sources(paths: Iterable[str], max_bytes: int = DEFAULT_MAX_SOURCE_MB * 2**20) -> dict[str, str]:
    """Read source files as UTF-8 text, keyed by the path as given.

    Only regular files are read (a FIFO, a device such as ``/dev/zero`` or a socket
    is refused without blocking), and at most ``max_bytes`` of each (a larger file
    is refused). Unreadable, binary (NUL bytes) or non-UTF-8 files are refused.
    """
    code: dict[str, str] = {}
    for raw in paths:
        data = _read_source(raw, max_bytes)
        if b"\x00" in data:
            raise InvalidInput(f"source file {raw!r} looks binary (contains NUL bytes): track text files only")
        try:
            code[raw] = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(
                f"source file {raw!r} is not UTF-8 text (bad byte at offset {exc.start}): re-encode it as UTF-8"
            ) from None
    return code


def _read_source(raw: str, max_bytes: int) -> bytes:
    if not is_encodable(raw):
        raise InvalidInput(f"source file name {raw!r} is not valid UTF-8: rename the file")
    mib = f"{max_bytes / 2**20:g} MiB"

    def too_large() -> InvalidInput:
        return InvalidInput(f"source file {raw!r} is larger than {mib}: pass --max-source-mb to allow a larger one")

    def kind(mode: int) -> InvalidInput:
        if stat.S_ISDIR(mode):
            return InvalidInput(f"source {raw!r} is a directory: pass files with --source/--sources")
        if stat.S_ISFIFO(mode):
            what = "a FIFO"
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            what = "a device"
        else:
            what = "not a regular file"
        return InvalidInput(f"source {raw!r} is {what}: pass a regular file with --source/--sources")

    try:
        # stat first, so a FIFO or a device is never opened; O_NONBLOCK covers a swap in between
        st = os.stat(raw)
        if not stat.S_ISREG(st.st_mode):
            raise kind(st.st_mode)
        if st.st_size > max_bytes:
            raise too_large()
        fd = os.open(raw, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidInput(f"source file {raw!r} does not exist: check the path") from None
    except OSError as exc:
        raise InvalidInput(f"cannot read source file {raw!r}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise kind(st.st_mode)
        chunks, size = [], 0
        while size <= max_bytes:  # bounded: a file that grows while read stops at the limit
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:
            raise too_large()
        return b"".join(chunks)
    except OSError as exc:
        raise InvalidInput(f"cannot read source file {raw!r}: {exc.strerror}") from None
    finally:
        os.close(fd)


def check_run_args(
    source_code: Any,
    metric: Any,
    name: Any = None,
    additional_instructions: Any = None,
    metadata: Any = None,
    *,
    names: Mapping[str, str] = CLI_NAMES,
) -> tuple[dict[str, str], str | None, str | None, dict[str, Any]]:
    """Every check of a ``create_run`` that needs no journal; returns (code, name, instructions, metadata).
    ``names``: what the caller calls each argument (:data:`CLI_NAMES` or :data:`SDK_NAMES`)."""
    code = check_code(source_code, names["source_code"])
    if not isinstance(metric, str) or not metric.strip():
        raise InvalidInput(
            f"{names['metric']} must name the primary metric, e.g. {_example(names['metric'], 'val_bpb')}"
        )
    check_text(metric, names["metric"])
    return (
        code,
        check_text(name, names["name"]),
        check_text(additional_instructions, names["additional_instructions"]),
        check_metadata(metadata, names["metadata"]) if metadata else {},
    )


def check_step_args(
    step: Any,
    status: Any,
    description: Any = None,
    metrics: Any = None,
    code: Any = None,
    parent_step: Any = None,
    metadata: Any = None,
    *,
    names: Mapping[str, str] = CLI_NAMES,
) -> tuple[str | None, dict[str, float] | None, dict[str, str] | None, dict[str, Any] | None]:
    """Every check of a ``log_step`` that needs no journal (not: does the parent step exist);
    returns (description, metrics, code, metadata), None where not given.
    ``names``: what the caller calls each argument (:data:`CLI_NAMES` or :data:`SDK_NAMES`)."""
    check_step(step, names["step"])
    check_status(status, names["status"])
    description = check_text(description, names["description"])
    metrics = check_metrics(metrics, names["metrics"]) if metrics is not None else None
    code = check_code(code, names["code"]) if code is not None else None
    if parent_step is not None:
        check_step(parent_step, names["parent_step"])
        if parent_step >= step:
            raise InvalidInput(
                f"{names['parent_step']} {parent_step} must be lower than {names['step']} {step}:"
                " a parent comes before its child"
            )
    metadata = check_metadata(metadata, names["metadata"]) if metadata is not None else None
    return description, metrics, code, metadata
