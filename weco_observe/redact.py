"""Keep the API key out of every text this package stores or prints.

Text from outside reaches our errors: a server's ``detail``, its reason phrase,
an httpx exception quoting a header line or the request. Any of it may hold
the key: a server (or a proxy) that echoes the ``Authorization`` header, or
the key itself made into an invalid header. So every path that stores or
prints an error's text passes it through :func:`redact` first: the API
client when it builds an error, the replay engine before ``last_error`` is
written, the background syncer's log lines, and ``sync``'s summary.

The key is found in the forms a server or a library would write it: as is,
JSON-escaped (``\\u0077`` for any character, ``\\/``), as a Python ``repr``
(``\\x77``, ``\\\\``), percent-encoded (``%77``) or as HTML character
references (``&#119;``), in any mix, nested escaping included. Base64 and
other encodings are not looked for.

The keys to look for are *registered* by whoever reads one
(``Settings.api_key``, ``WecoClient``), so code far from the key, such as the
CLI's last-resort error printer, still redacts it. Only the standard library
is imported: this sits on the ``log`` hot path through ``settings``.

    >>> register("wk-abc123")
    >>> redact('{"detail": "bad \\\\u0077k-abc123"} Bearer wk-abc123')
    '{"detail": "bad <api key>"} Bearer <api key>'
"""

from __future__ import annotations

import re
import threading
from typing import Any

__all__ = ["MASK", "redact", "redact_values", "register"]

#: what a key is replaced with
MASK = "<api key>"
#: shorter strings are not treated as secrets: masking every "ab" would garble the text and hide nothing
MIN_LENGTH = 4

_lock = threading.Lock()
_patterns: dict[str, re.Pattern[str]] = {}


def _char(c: str) -> str:
    """A regular expression for one character of a key, written in any of the encodings above."""
    code = ord(c)
    forms = [re.escape(c)]
    if c in "\\'\"/":
        forms = [r"\\*" + re.escape(c)]  # escaped with one or more backslashes (or not)
    forms.append(rf"\\+u0*(?i:{code:x})")  # JSON / JavaScript \uXXXX
    forms.append(rf"\\+x(?i:{code:02x})")  # Python repr
    forms.append(rf"%(?i:{code:02x})")  # percent-encoding
    forms.append(rf"&#0*{code};?")  # HTML, decimal
    forms.append(rf"&#[xX]0*(?i:{code:x});?")  # HTML, hex
    return "(?:" + "|".join(forms) + ")"


def _pattern(secret: str) -> re.Pattern[str]:
    pattern = _patterns.get(secret)
    if pattern is None:
        pattern = re.compile("".join(_char(c) for c in secret))
        with _lock:
            _patterns[secret] = pattern
    return pattern


def register(secret: str | None) -> None:
    """Remember ``secret`` for the life of this process: :func:`redact` blanks it out from now on."""
    if secret and len(secret) >= MIN_LENGTH:
        _pattern(secret)


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with every registered secret, and each of ``secrets``, replaced by ``<api key>``.

    Every error text that is stored (``last_error``) or printed goes through here.

    >>> redact("token=wk%2Dsecret-9", "wk-secret-9")
    'token=<api key>'
    """
    if not text:
        return text
    for secret in secrets:
        register(secret)
    with _lock:
        patterns = list(_patterns.values())
    for pattern in patterns:
        text = pattern.sub(MASK, text)
    return text


def redact_values(value: Any) -> Any:
    """Every string in a JSON-able value through :func:`redact` (the values, not the JSON text: a
    mask must never land inside an escape sequence). For ``--json`` output built from the journal.

    >>> register("wk-abc123")
    >>> redact_values({"last_error": ["key wk-abc123"], "n": 1})
    {'last_error': ['key <api key>'], 'n': 1}
    """
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [redact_values(v) for v in value]
    if isinstance(value, dict):
        return {k: redact_values(v) for k, v in value.items()}
    return value
