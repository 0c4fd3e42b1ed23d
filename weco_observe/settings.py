"""Settings: every environment variable, credential and default, read at call time in one place.

``Settings.load()`` reads the environment when it is called, never at import, so a
test (or a long-lived SDK process) that changes ``WECO_OBSERVE_DIR`` sees the new
value on the next call. Nothing else in the package reads ``os.environ`` for
configuration; modules take a ``Settings`` (or call ``Settings.load()``).

The API key is looked up lazily (``settings.api_key``): ``$WECO_API_KEY`` wins over
the official client's credentials file ``~/.config/weco/credentials.json``, which
``weco login`` writes (0600) so one login serves both tools. Surrounding white
space is stripped wherever a key is read (env files and Kubernetes secrets often
end in a newline); a key with inner white space or non-ASCII characters is refused
with a one-line :class:`~weco_observe.errors.InvalidInput`, because it cannot go
into an HTTP header and would otherwise surface as a traceback.

Only the standard library is imported: this runs on the ``weco observe log`` hot path.

    >>> s = Settings.load({"WECO_OBSERVE_DIR": "/tmp/j", "WECO_OBSERVE_AUTO_SYNC": "off"})
    >>> s.journal_path, s.auto_sync
    (PosixPath('/tmp/j/journal.db'), False)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from .errors import InvalidInput

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_DASHBOARD_URL",
    "Settings",
    "check_api_key",
    "check_base_url",
    "delete_api_key",
    "insecure_warning",
    "is_loopback",
    "save_api_key",
]

DEFAULT_BASE_URL = "https://api.weco.ai/v1"
DEFAULT_DASHBOARD_URL = "https://dashboard.weco.ai"
DEFAULT_BUSY_TIMEOUT = 30.0
DEFAULT_SYNC_LINGER = 2.0
DEFAULT_SYNC_GIVE_UP = 60.0

_FALSE = ("0", "false", "no", "off")


def _flag(value: str | None, default: bool) -> bool:
    if value is None or not value.strip():
        return default
    return value.strip().lower() not in _FALSE


def _seconds(value: str | None, default: float) -> float:
    try:
        return float(value) if value is not None and value.strip() else default
    except ValueError:
        return default


def check_api_key(key: str | None, where: str) -> str | None:
    """A key as it may be sent: surrounding white space stripped, None when empty.

    Raises InvalidInput (naming ``where``, never the key) for inner white space or
    non-ASCII characters.

    >>> check_api_key("wk-abc\\n", "WECO_API_KEY")
    'wk-abc'
    """
    if key is None:
        return None
    key = key.strip()
    if not key:
        return None
    if any(c.isspace() for c in key):
        raise InvalidInput(f"the API key from {where} contains white space: give the key alone")
    if not key.isascii() or not key.isprintable():
        raise InvalidInput(f"the API key from {where} contains non-ASCII or control characters: give the key alone")
    return key


def _shown_url(url: str) -> str:
    """A URL as an error message may show it: any user name or password masked, quoted, cut short."""
    import re

    shown = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@", r"\1***@", url)
    return repr(shown if len(shown) <= 200 else shown[:197] + "...")


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1: names that never leave this machine.

    >>> is_loopback("127.0.0.2"), is_loopback("::1"), is_loopback("LocalHost"), is_loopback("api.weco.ai")
    (True, True, True, False)
    """
    import ipaddress

    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def check_base_url(url: str, *, allow_http: bool = False) -> str:
    """``url`` if it can be the Weco API's base URL; else a one-line ``ApiMisconfigured`` naming
    ``WECO_BASE_URL`` (never a password in it). Nothing is sent to a malformed URL: httpx would
    call it a network fault and sync would retry it as one.

    Plain ``http://`` is refused for a host that is not loopback (the key would cross the
    network in clear) unless ``allow_http`` (``WECO_OBSERVE_ALLOW_HTTP=1``).

    >>> check_base_url("https://api.weco.ai/v1"), check_base_url("http://127.0.0.1:8765/v1")
    ('https://api.weco.ai/v1', 'http://127.0.0.1:8765/v1')
    """
    import re
    from urllib.parse import urlsplit

    from .errors import ApiMisconfigured

    shown = _shown_url(url)

    def bad(why: str) -> ApiMisconfigured:
        return ApiMisconfigured(f"WECO_BASE_URL {shown} {why} (nothing was sent)")

    if not url or any(c.isspace() or not c.isprintable() for c in url):
        raise bad("contains white space or control characters")
    if re.fullmatch(r"(?i)https?:/*", url):  # "http://" (its slashes stripped as trailing ones)
        raise bad("has no host")
    if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", url):
        host = re.split(r"[:/]", url, maxsplit=1)[0]
        scheme = "http" if is_loopback(host) else "https"
        raise bad(f"has no scheme: did you mean {scheme}://{url}?")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check: ValueError when out of range
    except ValueError:
        raise bad("is not a valid URL (its host or port)") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise bad(f"uses {parts.scheme}://: the Weco API speaks https:// (for example {DEFAULT_BASE_URL})")
    if not parts.hostname:
        raise bad("has no host")
    if parts.username is not None or parts.password is not None:
        raise bad("has a user name or password in it: remove it (the API key goes in WECO_API_KEY or `weco login`)")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise bad("has a query or fragment: give the API's base, for example https://api.weco.ai/v1")
    if parts.scheme.lower() == "http" and not is_loopback(parts.hostname) and not allow_http:
        raise bad(
            "is plain http:// to a host that is not this machine: the API key would cross the network"
            " in clear: use https://, or set WECO_OBSERVE_ALLOW_HTTP=1 to send it anyway"
        )
    return url


def insecure_warning(url: str) -> str | None:
    """The warning for a base URL that sends the key in clear (allowed by ``WECO_OBSERVE_ALLOW_HTTP``),
    None for https:// or loopback."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme.lower() != "http" or is_loopback(parts.hostname or ""):
        return None
    return (
        f"weco-observe: warning: WECO_BASE_URL {_shown_url(url)} is plain http:// to {parts.hostname}:"
        " the API key and your code cross the network unencrypted (WECO_OBSERVE_ALLOW_HTTP is set)"
    )


@dataclass(frozen=True)
class Settings:
    """One reading of the environment. Build it with :meth:`load`; it never changes afterwards."""

    #: ``$WECO_OBSERVE_DIR``, else the platform's user data dir (resolved lazily: platformdirs costs ~15 ms)
    dir_override: Path | None
    base_url: str
    dashboard_url: str
    #: ``$WECO_OBSERVE_AUTO_SYNC`` (default on); the background syncer also needs a key, see :meth:`auto_sync_active`
    auto_sync: bool
    #: ``$WECO_OBSERVE_ALLOW_HTTP`` (default off): send the key over plain http:// to a host that is not loopback
    allow_http: bool
    #: ``$WECO_OBSERVE_CA_BUNDLE`` (else ``$SSL_CERT_FILE``): the CA certificates to trust for https, e.g. a
    #: site relay's own CA; None trusts the system's
    ca_bundle: Path | None
    #: seconds a writer waits for the journal's lock (``$WECO_OBSERVE_BUSY_TIMEOUT``)
    busy_timeout: float
    #: the background syncer lingers this long for new events before it exits
    sync_linger: float
    #: ... and gives up this long after the API started failing (then a cooldown)
    sync_give_up: float
    #: ``$WECO_OBSERVE_SHARED_FS``: 1/0 forces the cluster mode on or off; unset detects it
    #: (``fsdetect.shared_mode`` parses it, and warns once about a value it does not understand)
    shared_fs_raw: str | None
    #: ``$TMPDIR`` (or ``$TEMP``/``$TMP``), else /tmp: where the spill fallback lives
    temp_dir: Path
    #: ``$XDG_RUNTIME_DIR``: a private, node-local folder for small caches, when the system has one
    runtime_dir: Path | None
    home: Path
    env_api_key: str | None = field(repr=False)
    #: ``$WECO_OBSERVE_BUNDLE_KEY``: a key file; every bundle import must then be signed with it
    bundle_key: Path | None = None

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the environment now (``environ`` defaults to ``os.environ``)."""
        env = os.environ if environ is None else environ
        override = env.get("WECO_OBSERVE_DIR")
        temp = next((env[n] for n in ("TMPDIR", "TEMP", "TMP") if env.get(n)), "/tmp")
        return cls(
            dir_override=Path(override).expanduser() if override else None,
            base_url=(env.get("WECO_BASE_URL") or DEFAULT_BASE_URL).strip().rstrip("/"),
            dashboard_url=(env.get("WECO_DASHBOARD_URL") or DEFAULT_DASHBOARD_URL).strip().rstrip("/"),
            auto_sync=_flag(env.get("WECO_OBSERVE_AUTO_SYNC"), True),
            allow_http=_flag(env.get("WECO_OBSERVE_ALLOW_HTTP"), False),
            ca_bundle=Path(ca) if (ca := env.get("WECO_OBSERVE_CA_BUNDLE") or env.get("SSL_CERT_FILE")) else None,
            busy_timeout=_seconds(env.get("WECO_OBSERVE_BUSY_TIMEOUT"), DEFAULT_BUSY_TIMEOUT),
            sync_linger=_seconds(env.get("WECO_OBSERVE_SYNC_LINGER"), DEFAULT_SYNC_LINGER),
            sync_give_up=_seconds(env.get("WECO_OBSERVE_SYNC_GIVE_UP"), DEFAULT_SYNC_GIVE_UP),
            shared_fs_raw=env.get("WECO_OBSERVE_SHARED_FS"),
            temp_dir=Path(temp),
            runtime_dir=Path(env["XDG_RUNTIME_DIR"]) if env.get("XDG_RUNTIME_DIR") else None,
            home=Path(env.get("HOME") or os.path.expanduser("~")),
            env_api_key=env.get("WECO_API_KEY"),
            bundle_key=Path(env["WECO_OBSERVE_BUNDLE_KEY"]).expanduser()
            if env.get("WECO_OBSERVE_BUNDLE_KEY")
            else None,
        )

    # -- where things live ---------------------------------------------------------

    @cached_property
    def data_dir(self) -> Path:
        """The directory holding ``journal.db``: ``$WECO_OBSERVE_DIR`` or the user data dir, or
        a private subfolder ``weco-observe-<user>`` in it when that folder is someone else's or
        others can write to it (``files.journal_dir``; one ``stat``, once per ``Settings``).

        >>> Settings.load({"WECO_OBSERVE_DIR": "/data/weco"}).data_dir
        PosixPath('/data/weco')
        """
        from .files import journal_dir

        if self.dir_override is not None:
            return journal_dir(self.dir_override)
        import platformdirs

        return journal_dir(Path(platformdirs.user_data_dir("weco-observe", appauthor=False)))

    @property
    def journal_path(self) -> Path:
        return self.data_dir / "journal.db"

    @cached_property
    def credentials_path(self) -> Path:
        """The official client's credentials file, shared so one login serves both tools."""
        return self.home / ".config" / "weco" / "credentials.json"

    # -- the API key -------------------------------------------------------------------

    @cached_property
    def _key(self) -> tuple[str | None, str | None]:
        """``(key, where it came from)``; raises InvalidInput for a malformed key.

        A key read here is registered with :mod:`~weco_observe.redact`, so every error
        text stored or printed by this process has it blanked out."""
        from .redact import register

        key = check_api_key(self.env_api_key, "WECO_API_KEY")
        if key:
            register(key)
            return key, "environment (WECO_API_KEY)"
        try:
            data = json.loads(self.credentials_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None, None
        raw = data.get("api_key") if isinstance(data, dict) else None
        key = check_api_key(raw, str(self.credentials_path)) if isinstance(raw, str) else None
        register(key)
        return (key, str(self.credentials_path)) if key else (None, None)

    @property
    def api_key(self) -> str | None:
        """The API key (env wins over the credentials file), None when neither has one."""
        return self._key[0]

    @property
    def api_key_source(self) -> str | None:
        """Where the key comes from, for ``status``."""
        return self._key[1]

    def key_configured(self, api_key: str | None = None) -> bool:
        """Cheap check for the ``log`` hot path: a key was given, is in the env, or the file exists."""
        if api_key or (self.env_api_key and self.env_api_key.strip()):
            return True
        return os.path.exists(self.credentials_path)

    def auto_sync_active(self, api_key: str | None = None) -> bool:
        """Whether a background syncer runs after a write: auto-sync on and some key configured."""
        return self.auto_sync and self.key_configured(api_key)


def save_api_key(settings: Settings, key: str) -> Path:
    """Write the credentials file with mode 0600 (its directory 0700); return its path."""
    key = check_api_key(key, "the prompt, stdin or --api-key") or ""
    if not key:
        raise InvalidInput("no API key given: pass --api-key, pipe it on stdin, or type it at the prompt")
    path = settings.credentials_path
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps({"api_key": key}).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def delete_api_key(settings: Settings) -> bool:
    """Remove the credentials file; True if there was one."""
    try:
        settings.credentials_path.unlink()
        return True
    except FileNotFoundError:
        return False
