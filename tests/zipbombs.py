"""Real decompression bombs, built in milliseconds (``from zipbombs import ...``).

Deflating 2 GiB takes a quarter of a minute, so a bomb is assembled instead: a
full flush resets the compressor's dictionary, after which the same input always
deflates to the same bytes, so one compressed unit is repeated ``count`` times.
CRC-32 and Adler-32 of the repetition are combined arithmetically (zlib's
``crc32_combine`` / ``adler32_combine``), so every bomb is a well-formed zip (or
zlib stream) that ``unzip`` would inflate in full, checksums included.

:func:`write_zip` writes the container by hand, so a member's header can *lie*
about its size.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

_CRC_POLY = 0xEDB88320
_ADLER_BASE = 65521


def _gf2_times(mat: list[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_square(mat: list[int]) -> list[int]:
    return [_gf2_times(mat, mat[n]) for n in range(32)]


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of ``A + B`` from ``crc(A)``, ``crc(B)`` and ``len(B)`` (zlib's algorithm)."""
    if len2 <= 0:
        return crc1
    odd = [_CRC_POLY] + [1 << n for n in range(31)]  # the operator for one zero bit
    even = _gf2_square(odd)  # two zero bits
    odd = _gf2_square(even)  # four zero bits
    while True:
        even = _gf2_square(odd)
        if len2 & 1:
            crc1 = _gf2_times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = _gf2_square(even)
        if len2 & 1:
            crc1 = _gf2_times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2


def adler32_combine(adler1: int, adler2: int, len2: int) -> int:
    """Adler-32 of ``A + B`` from ``adler(A)``, ``adler(B)`` and ``len(B)`` (zlib's algorithm)."""
    rem = len2 % _ADLER_BASE
    sum1 = adler1 & 0xFFFF
    sum2 = (rem * sum1) % _ADLER_BASE
    sum1 += (adler2 & 0xFFFF) + _ADLER_BASE - 1
    sum2 += ((adler1 >> 16) & 0xFFFF) + ((adler2 >> 16) & 0xFFFF) + _ADLER_BASE - rem
    return (sum1 % _ADLER_BASE) | ((sum2 % _ADLER_BASE) << 16)


def _repeat(combine, value: int, length: int, count: int) -> tuple[int, int]:
    """The checksum of ``count`` copies of a piece with checksum ``value`` and ``length``, by doubling."""
    acc: tuple[int, int] | None = None
    while count:
        if count & 1:
            acc = (value, length) if acc is None else (combine(acc[0], value, length), acc[1] + length)
        value, length = combine(value, value, length), length * 2
        count >>= 1
    assert acc is not None
    return acc


@dataclass
class Deflated:
    """A raw deflate stream and what it inflates to."""

    data: bytes
    size: int
    crc: int
    adler: int

    def zlib(self) -> bytes:
        """The same stream in the zlib format (what a code blob holds)."""
        return b"\x78\xda" + self.data + struct.pack(">I", self.adler)


def deflate_repeat(head: bytes, unit: bytes, count: int, tail: bytes = b"") -> Deflated:
    """``head + unit * count + tail``, deflated without ever building it."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    h = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    u = c.compress(unit) + c.flush(zlib.Z_FULL_FLUSH)
    assert c.compress(unit) + c.flush(zlib.Z_FULL_FLUSH) == u  # a full flush makes the unit's bytes repeat
    t = c.compress(tail) + c.flush()
    n = len(unit) * count
    unit_crc = _repeat(crc32_combine, zlib.crc32(unit), len(unit), count)[0]
    unit_adler = _repeat(adler32_combine, zlib.adler32(unit), len(unit), count)[0]
    crc = crc32_combine(crc32_combine(zlib.crc32(head), unit_crc, n), zlib.crc32(tail), len(tail))
    adler = adler32_combine(adler32_combine(zlib.adler32(head), unit_adler, n), zlib.adler32(tail), len(tail))
    size = len(head) + n + len(tail)
    return Deflated(h + u * count + t, size, crc, adler)


def deflate(data: bytes) -> Deflated:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return Deflated(c.compress(data) + c.flush(), len(data), zlib.crc32(data), zlib.adler32(data))


def store(data: bytes) -> Deflated:
    """``data`` as it is: for a member written with the zip method "stored" (``Member(..., method=0)``)."""
    return Deflated(data, len(data), zlib.crc32(data), zlib.adler32(data))


@dataclass
class Member:
    name: str
    body: Deflated
    #: what the headers claim the member inflates to (a lie when it differs from ``body.size``)
    declared: int | None = None
    #: 8 deflated, 0 stored
    method: int = 8


def write_zip(path: Path, members: list[Member]) -> None:
    """A zip of deflated members, written by hand so that a header can lie about a member's size."""
    out = bytearray()
    central = bytearray()
    for m in members:
        name = m.name.encode()
        declared = m.body.size if m.declared is None else m.declared
        offset = len(out)
        fields = (20, 0, m.method, 0, 0x21, m.body.crc, len(m.body.data), declared, len(name))
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, *fields, 0) + name + m.body.data
        central += struct.pack("<IH", 0x02014B50, 20) + struct.pack("<HHHHHIIIHHHHHII", *fields, 0, 0, 0, 0, 0, offset)
        central += name
    out += central + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(out), 0)
    path.write_bytes(bytes(out))
