"""Where things live: the journal, the credentials file, the API and dashboard URLs.

One function per location, environment override first. Tests point everything
at ``tmp_path`` with ``monkeypatch.setenv("WECO_OBSERVE_DIR", ...)`` and
``HOME``; nothing here is a module-level constant that would need patching.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DEFAULT_BASE_URL = "https://api.weco.ai/v1"
DEFAULT_DASHBOARD_URL = "https://dashboard.weco.ai"


def journal_dir() -> Path:
    """The directory holding ``journal.db``: ``$WECO_OBSERVE_DIR`` or the user data dir.

    >>> journal_dir()  # doctest: +SKIP
    PosixPath('/home/me/.local/share/weco-observe')
    """
    override = os.environ.get("WECO_OBSERVE_DIR")
    if override:
        return Path(override).expanduser()
    # platformdirs costs ~15 ms to import; only pay it when no override is set.
    import platformdirs

    return Path(platformdirs.user_data_dir("weco-observe", appauthor=False))


def journal_path() -> Path:
    """The SQLite journal file."""
    return journal_dir() / "journal.db"


def credentials_path() -> Path:
    """The official client's credentials file, shared so one login serves both tools."""
    return Path.home() / ".config" / "weco" / "credentials.json"


def api_base_url() -> str:
    """The Weco API base URL, ``$WECO_BASE_URL`` verbatim or the public default."""
    return (os.environ.get("WECO_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


def dashboard_url() -> str:
    """The dashboard base URL; a run's page is ``{dashboard_url()}/runs/{server_id}``."""
    return (os.environ.get("WECO_DASHBOARD_URL") or DEFAULT_DASHBOARD_URL).rstrip("/")


def api_key() -> str | None:
    """The API key: ``$WECO_API_KEY`` wins over the credentials file; None when neither has one."""
    key = os.environ.get("WECO_API_KEY")
    if key:
        return key
    try:
        data = json.loads(credentials_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    key = data.get("api_key") if isinstance(data, dict) else None
    return key if isinstance(key, str) and key else None


def api_key_source() -> str | None:
    """Where the key comes from (``"environment"`` or the file path), for ``status``."""
    if os.environ.get("WECO_API_KEY"):
        return "environment (WECO_API_KEY)"
    if api_key():
        return str(credentials_path())
    return None


def save_api_key(key: str) -> Path:
    """Write the credentials file with mode 0600 (its directory 0700)."""
    path = credentials_path()
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


def delete_api_key() -> bool:
    """Remove the credentials file; True if there was one."""
    try:
        credentials_path().unlink()
        return True
    except FileNotFoundError:
        return False
