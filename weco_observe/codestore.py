"""Content-addressed, compressed code snapshots.

A file's text is keyed by the sha256 of its UTF-8 bytes, so an unchanged file
costs nothing to log again. A changed file is stored as a delta against the
previous version of the same path: the common prefix and suffix are kept by
reference and only the middle is zlib-compressed, so a one-line edit to a 50 KB
file costs a few dozen bytes. Chains are capped at ``MAX_DEPTH`` deltas (then a
full copy), which bounds the cost of reading any version.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Iterable, Mapping

#: ``(base, prefix, suffix, data, size)`` of a stored blob, or None when it is missing
Fetch = Callable[[str], "tuple[str | None, int, int, bytes, int] | None"]

MAX_DEPTH = 32
_LEVEL = 6


def text_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def text_hashes(code: Mapping[str, str]) -> dict[str, str]:
    """``{path: text_hash}`` of a code dict (each text as UTF-8).

    >>> text_hashes({"a.py": "x = 1"}) == {"a.py": text_hash(b"x = 1")}
    True
    """
    return {path: text_hash(text.encode("utf-8")) for path, text in code.items()}


def _common_prefix(a: bytes, b: bytes) -> int:
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:  # invariant: a[:lo] == b[:lo], a[:hi+1] != b[:hi+1]
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a: bytes, b: bytes, limit: int) -> int:
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid :] == b[len(b) - mid :]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def encode(data: bytes, base: bytes | None, base_depth: int) -> tuple[int, int, int, bytes]:
    """Return ``(depth, prefix, suffix, payload)`` for ``data``, as a delta when that pays.

    ``depth`` 0 means a full copy (``payload`` is the whole text compressed).
    """
    if base is not None and base_depth < MAX_DEPTH:
        prefix = _common_prefix(base, data)
        limit = min(len(base), len(data)) - prefix
        suffix = _common_suffix(base, data, limit)
        middle = data[prefix : len(data) - suffix]
        if len(middle) < len(data) // 2:
            return base_depth + 1, prefix, suffix, zlib.compress(middle, _LEVEL)
    return 0, 0, 0, zlib.compress(data, _LEVEL)


def decode(payload: bytes, prefix: int, suffix: int, base: bytes | None, limit: int | None = None) -> bytes:
    """Inverse of :func:`encode`.

    ``limit`` (the text's size, when the blob comes from a file this process did
    not write) bounds the work: the middle is inflated to at most what is left
    of it, so a crafted blob cannot inflate without end. Raises ValueError (or
    zlib.error) for a blob that does not fit its own description.
    """
    keep = 0 if base is None else prefix + suffix
    if base is not None and (prefix < 0 or suffix < 0 or keep > len(base)):
        raise ValueError("delta reaches outside its base")
    if limit is None:
        middle = zlib.decompress(payload)
    else:
        inflater = zlib.decompressobj()
        middle = inflater.decompress(payload, max(0, limit - keep) + 1)
        if len(middle) > limit - keep or inflater.unconsumed_tail:
            raise ValueError("blob inflates past its size")
    if base is None:
        return middle
    return base[:prefix] + middle + base[len(base) - suffix :]


def broken(digests: Iterable[str], fetch: Fetch) -> list[str]:
    """The blobs among ``digests`` that do not decode to the text their hash names: a flipped byte
    in their data, or in a delta base they need. A missing blob, or one whose base is missing, is
    not counted here (it is *missing*, not damaged).

    >>> good = zlib.compress(b"x = 1")
    >>> rows = {text_hash(b"x = 1"): (None, 0, 0, good, 5), "ab" * 32: (None, 0, 0, b"junk", 5)}
    >>> broken(rows, rows.get)
    ['abababababababababababababababababababababababababababababababab']
    """
    texts: dict[str, bytes | None] = {}
    rows: dict[str, tuple[str | None, int, int, bytes, int] | None] = {}

    def row(digest: str) -> tuple[str | None, int, int, bytes, int] | None:
        if digest not in rows:
            rows[digest] = fetch(digest)
        return rows[digest]

    def text(digest: str, depth: int = 0) -> bytes | None:
        if digest in texts:
            return texts[digest]
        texts[digest] = None  # a loop or a missing base decodes to nothing
        found = row(digest)
        if found is None or depth > 2 * MAX_DEPTH:
            return None
        base_hash, prefix, suffix, data, size = found
        base = text(base_hash, depth + 1) if base_hash else None
        if base_hash and base is None:
            return None
        try:
            plain = decode(data, prefix, suffix, base, limit=size)
        except (zlib.error, ValueError, TypeError):
            return None
        texts[digest] = plain if text_hash(plain) == digest and len(plain) == size else None
        return texts[digest]

    out = []
    for digest in dict.fromkeys(digests):
        found = row(digest)
        if found is None or text(digest) is not None:
            continue
        base_hash = found[0]
        if base_hash is None or row(base_hash) is not None:
            out.append(digest)
    return out
