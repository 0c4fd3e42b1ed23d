"""Client-generated, globally unique, time-sortable ids (ULIDs).

Every run and every outbox event gets one on the machine that logged it, so a
replay, a bundle import or a retried sync can recognise what it already has.
A ULID is 48 bits of milliseconds and 80 random bits in Crockford base32; ids
made in one process are strictly increasing even within one millisecond.
"""

from __future__ import annotations

import os
import re
import threading
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_lock = threading.Lock()
_last = 0

LOCAL_RUN_PREFIX = "local-"


def _encode(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def ulid() -> str:
    """A new lowercase ULID, e.g. ``01jdx7m3a4k6d1q8zr2t5v9w0c``."""
    global _last
    with _lock:
        value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
        if value <= _last:
            value = _last + 1
        _last = value
    return _encode(value, 26)


def new_run_id() -> str:
    """A local run id: ``local-`` + ULID, visibly not a server UUID."""
    return LOCAL_RUN_PREFIX + ulid()


#: 26 lowercase Crockford base32 characters, the first at most 7 (48 bits of milliseconds lead)
_ULID = re.compile(r"[0-7][0-9a-hjkmnp-tv-z]{25}")


def is_ulid(value: object) -> bool:
    """True for a ULID as :func:`ulid` makes them (26 lowercase Crockford base32 characters).

    >>> is_ulid(ulid()), is_ulid("8" + "0" * 25), is_ulid("0" * 25 + "u"), is_ulid("0" * 26 + "\\n")
    (True, False, False, False)
    """
    return isinstance(value, str) and _ULID.fullmatch(value) is not None


def is_local_run_id(value: object) -> bool:
    """True for a local run id as :func:`new_run_id` makes them: ``local-`` + a ULID."""
    return isinstance(value, str) and value.startswith(LOCAL_RUN_PREFIX) and is_ulid(value[len(LOCAL_RUN_PREFIX) :])


def ulid_time(value: str) -> float:
    """The creation time (epoch seconds) encoded in a ULID or local run id."""
    value = value.removeprefix(LOCAL_RUN_PREFIX)
    ms = 0
    for ch in value[:10]:
        ms = ms * 32 + _ALPHABET.index(ch)
    return ms / 1000.0


def is_server_id(value: object) -> bool:
    """True for a string that is safe as one URL path segment and short: what a server's run id
    may be. Ids from a bundle or a server's answer are checked with this before they reach a URL.

    >>> is_server_id("5b7e0c1a-2222-4333-8444-555566667777"), is_server_id("../admin?x=/steps")
    (True, False)
    """
    return (
        isinstance(value, str)
        and 0 < len(value) <= 128
        and value not in (".", "..")
        and all(c.isascii() and (c.isalnum() or c in "-._") for c in value)
    )


def looks_like_server_id(value: str) -> bool:
    """True for a UUID-shaped string (what the Weco API returns as ``run_id``)."""
    import uuid

    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return len(value) in (32, 36)
