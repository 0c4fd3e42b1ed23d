"""The API key: read cleanly from every source, and never stored or printed, whatever a server echoes.

The hostile servers here are real HTTP servers on loopback (``hostile.py``) that
quote the ``Authorization`` header back in every way seen in the wild: verbatim,
JSON-escaped character by character, in the reason phrase, and in a header line
so broken that httpx's own exception quotes it. After each, every output, the
journal's ``last_error`` and every byte under the data dir are searched for the
key and for any 8-character piece of its random part.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from emulator_fixtures import assert_server_matches_journal, emulator, pending_events  # noqa: F401
from hostile import HostileServer, Request, created, json_escaped, response
from weco_observe import replay, synclock
from weco_observe.api import WecoClient
from weco_observe.errors import EXIT_BAD_INPUT, InvalidInput, WecoObserveError
from weco_observe.journal import Journal
from weco_observe.redact import MASK, redact

SECRET_PART = uuid.uuid4().hex
KEY = "wk-" + SECRET_PART


def _pieces(key: str = KEY) -> list[str]:
    """The key itself, its fully JSON-escaped form, and every 8-character piece of its random part."""
    part = key.removeprefix("wk-")
    return [key, json_escaped(key), *(part[i : i + 8] for i in range(len(part) - 7))]


def assert_no_key(text: str | bytes, where: str, key: str = KEY) -> None:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    for piece in _pieces(key):
        assert piece not in text, f"the key ({piece!r}) leaked into {where}: {text[:2000]!r}"


def assert_no_key_on_disk(data_dir: Path, key: str = KEY) -> None:
    journal = data_dir / "journal.db"
    if journal.exists():
        with Journal(journal) as j:
            j.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for path in data_dir.rglob("*"):
        if path.is_file():
            assert_no_key(path.read_bytes(), str(path), key)


def _journal_some(cli, tmp_path: Path, env: dict[str, str] | None = None) -> str:
    (tmp_path / "train.py").write_text("x = 1\n")
    run = cli.ok("observe", "init", "--metric", "loss", "-s", "train.py", env=env).stdout.strip()
    cli.ok("observe", "log", "--run-id", run, "--step", "1", "--metrics", '{"loss": 0.5}', env=env)
    return run


# -- the redaction function ------------------------------------------------------------------


@pytest.mark.parametrize(
    "form",
    [
        KEY,
        json_escaped(KEY),
        json_escaped(KEY).upper().replace("\\U", "\\u"),
        "wk-" + json_escaped(SECRET_PART[:5]) + SECRET_PART[5:],  # mixed
        json_escaped(KEY).replace("\\", "\\\\"),  # escaped twice (JSON inside JSON)
        "".join(f"\\x{ord(c):02x}" for c in KEY),  # a Python repr
        "".join(f"%{ord(c):02X}" for c in KEY),  # percent-encoded
        "".join(f"&#{ord(c)};" for c in KEY),  # HTML
        "".join(f"&#x{ord(c):x};" for c in KEY),
    ],
)
def test_redact_finds_the_key_in_every_encoding(form):
    text = f'{{"detail": "Bearer {form} is not valid"}}\n'
    out = redact(text, KEY)
    assert out == f'{{"detail": "Bearer {MASK} is not valid"}}\n'


def test_redact_finds_a_key_with_json_special_characters():
    key = 'wk-a/b"c\\d' + SECRET_PART
    assert redact(json.dumps({"detail": key}), key) == json.dumps({"detail": MASK})
    assert redact(json.dumps({"detail": key}).replace("/", "\\/"), key) == json.dumps({"detail": MASK})
    assert redact(repr(key.encode()), key) == f"b'{MASK}'"


def test_redact_leaves_other_text_alone():
    text = "HTTP 500: wk-other-key; 0x41 \\u0041 %41 &#65;"
    assert redact(text, KEY) == text
    assert redact("abc abc", "abc") == "abc abc"  # too short to be a secret: nothing to hide


# -- keys are read cleanly from every source -------------------------------------------------


@pytest.mark.parametrize("source", ["env-lf", "env-crlf", "credentials-crlf", "login-stdin-crlf"])
def test_a_key_with_a_trailing_newline_or_cr_is_sent_stripped(cli, emulator, journal_path, tmp_path, source):
    """Env files and Kubernetes secrets often end in a newline: the key is sent without it."""
    emulator.api_key = KEY
    env = {"WECO_BASE_URL": emulator.base_url}
    if source == "env-lf":
        env["WECO_API_KEY"] = KEY + "\n"
    elif source == "env-crlf":
        env["WECO_API_KEY"] = KEY + "\r\n"
    elif source == "credentials-crlf":
        creds = tmp_path / "home" / ".config" / "weco" / "credentials.json"
        creds.parent.mkdir(parents=True)
        creds.write_text(json.dumps({"api_key": "  " + KEY + "\r\n"}))
    else:
        cli.ok("login", input=KEY + "\r\n")
        creds = tmp_path / "home" / ".config" / "weco" / "credentials.json"
        assert json.loads(creds.read_text()) == {"api_key": KEY}
    _journal_some(cli, tmp_path)
    result = cli("observe", "sync", env=env)
    assert result.returncode == 0, result.stderr
    assert_server_matches_journal(emulator, journal_path)
    assert_no_key(result.stdout + result.stderr, "sync's output")
    assert_no_key_on_disk(journal_path.parent)


def test_the_sdk_api_key_argument_is_stripped_too(emulator, journal_path, monkeypatch):
    """``WecoObserver(api_key=...)`` with a trailing newline: flush() delivers, nothing leaks."""
    from weco_observe import WecoObserver

    emulator.api_key = KEY
    monkeypatch.setenv("WECO_BASE_URL", emulator.base_url)
    with WecoObserver(api_key=KEY + "\n") as obs:
        run = obs.create_run(source_code={"a.py": "1"}, primary_metric="m")
        run.log_step(1, metrics={"m": 0.5})
        assert obs.flush(timeout=10) is True
    assert_server_matches_journal(emulator, journal_path)
    assert_no_key_on_disk(journal_path.parent)


@pytest.mark.parametrize("bad", ["wk-sécret-" + SECRET_PART, "wk-a b" + SECRET_PART, "wk-\x1b[31m" + SECRET_PART])
def test_a_malformed_key_is_a_one_line_error_in_status_and_sync(cli, journal_path, tmp_path, bad):
    """Inner white space, non-ASCII or control characters cannot go into a header: one line, no traceback."""
    _journal_some(cli, tmp_path)
    env = {"WECO_API_KEY": bad, "WECO_BASE_URL": "http://127.0.0.1:9/v1"}
    status = cli("observe", "status", env=env)
    assert status.returncode == 0, status.stderr
    assert "unusable" in status.stdout and "WECO_API_KEY" in status.stdout
    synced = cli("observe", "sync", env=env)
    assert synced.returncode == EXIT_BAD_INPUT
    assert synced.stderr.startswith("error: ") and len(synced.stderr.strip().splitlines()) == 1, synced.stderr
    assert "Traceback" not in synced.stderr and "WECO_API_KEY" in synced.stderr
    for out in (status.stdout + status.stderr, synced.stdout + synced.stderr):
        assert_no_key(out, "output", bad)
    assert pending_events(journal_path) == 2


@pytest.mark.parametrize("bad", ["wk-sécret-" + SECRET_PART, "wk-a\nb" + SECRET_PART])
def test_a_malformed_sdk_key_is_refused_in_one_line_without_a_traceback(journal_path, bad):
    with pytest.raises(InvalidInput) as info:
        WecoClient("http://127.0.0.1:9/v1", bad)
    assert "\n" not in str(info.value) and "api_key" in str(info.value)
    assert_no_key(str(info.value), "the error", bad)
    from weco_observe import WecoObserver

    with WecoObserver(api_key=bad) as obs:
        obs.create_run(source_code={"a.py": "1"}, primary_metric="m")
        with pytest.warns(UserWarning, match="api_key") as caught:
            assert obs.flush(timeout=5) is False
    for w in caught:
        assert_no_key(str(w.message), "the warning", bad)


def test_the_background_syncer_with_a_malformed_key_logs_one_line_and_cools_down(cli, journal_path, tmp_path):
    env = {"WECO_API_KEY": "wk-sécret-" + SECRET_PART, "WECO_OBSERVE_AUTO_SYNC": "1"}
    _journal_some(cli, tmp_path, env=env)
    assert _wait_for(lambda: synclock.in_cooldown(journal_path)), "the syncer set no cooldown"
    log = (journal_path.parent / "autosync.log").read_text()
    assert "not syncing" in log and "WECO_API_KEY" in log and "Traceback" not in log
    assert_no_key(log, "autosync.log", env["WECO_API_KEY"])


def _wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# -- a server that echoes the key ------------------------------------------------------------


def _echo(mode: str, status: int, *, create_ok: bool = False):
    """An ``answer`` function that quotes the request's key back, the way ``mode`` says."""

    def answer(req: Request) -> bytes:
        if create_ok and req.path.endswith("/external/runs"):
            return created(req)
        key = req.key
        if mode == "detail":
            return response(status, {"detail": f"bad header {req.auth!r}"})
        if mode == "json-escaped":
            return response(status, '{"detail": "token ' + json_escaped(key) + ' is not valid"}')
        if mode == "json-other":
            return response(status, '{"error": {"token": "' + json_escaped(key) + '"}}')
        if mode == "text":
            return response(status, f"invalid token {key}", content_type="text/plain")
        if mode == "reason":
            return response(status, b"", reason=f"Bad token {key}")
        if mode == "header":
            # a header line httpx (h11) refuses: its exception quotes the whole line
            return response(status, {"detail": "x"}, raw_headers=[f"X Echo: Bearer {key}".encode()])
        raise AssertionError(mode)

    return answer


@pytest.mark.parametrize(
    ("mode", "status", "create_ok"),
    [
        ("json-escaped", 422, False),
        ("json-escaped", 422, True),
        ("json-other", 422, True),
        ("reason", 422, True),
        ("json-escaped", 401, False),
        ("reason", 403, False),
    ],
)
def test_an_echoed_key_never_reaches_the_journal_sync_or_status(cli, journal_path, tmp_path, mode, status, create_ok):
    """Through the real CLI (the key quoted verbatim in a detail or as plain text: test_login.py)."""
    cli.ok("login", "--api-key", KEY)
    _journal_some(cli, tmp_path)
    with HostileServer(_echo(mode, status, create_ok=create_ok)) as server:
        env = {"WECO_BASE_URL": server.base_url}
        outputs = [
            cli("observe", "sync", env=env),
            cli("observe", "sync", "--json", env=env),
            cli("observe", "sync", "--retry-rejected", env=env),
            cli("observe", "status", env=env),
            cli("observe", "status", "--json", env=env),
        ]
    assert server.requests and all(r.key == KEY for r in server.requests)  # the server did see the key
    assert outputs[0].returncode != 0  # nothing was accepted
    for result in outputs:
        assert "Traceback" not in result.stderr, result.stderr
        assert_no_key(result.stdout + result.stderr, f"{result.args[3:]}'s output")
    with Journal(journal_path) as j:
        errors = [r[0] for r in j.query("SELECT last_error FROM events WHERE last_error IS NOT NULL")]
    assert errors or outputs[0].returncode == 5  # something was stored (auth failures store on the event too)
    for e in errors:
        assert_no_key(e, "events.last_error")
    assert_no_key_on_disk(journal_path.parent)


@pytest.mark.parametrize("mode", ["json-escaped", "json-other", "text", "reason", "header"])
@pytest.mark.parametrize("create_ok", [False, True])
def test_an_echoed_key_in_a_transient_failure_is_not_stored(journal_path, mode, create_ok):
    """5xx and a broken answer are retried: their last error is stored and reported. Real server, real
    journal, fast retries (in process)."""
    from emulator_fixtures import make_workload

    make_workload(journal_path, runs=1, steps=2, relog=False)
    status = 200 if mode == "header" else 500
    with HostileServer(_echo(mode, status, create_ok=create_ok)) as server:
        with Journal(journal_path) as journal, WecoClient(server.base_url, KEY, read_timeout=5) as client:
            result = replay.sync(journal, client, attempts=2, passes=1, initial_wait=0.01, max_wait=0.02)
    assert server.requests
    assert result.pending and result.last_error
    assert_no_key(result.last_error, "PassResult.last_error")
    assert_no_key(json.dumps(result.to_json()), "sync --json")
    with Journal(journal_path) as j:
        errors = [r[0] for r in j.query("SELECT last_error FROM events WHERE last_error IS NOT NULL")]
    assert errors
    for e in errors:
        assert_no_key(e, "events.last_error")
    assert_no_key_on_disk(journal_path.parent)


def test_httpx_errors_that_quote_the_request_are_redacted():
    """httpx (h11) quotes an invalid header value in its exception: the text must be redacted."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.LocalProtocolError(f"Illegal header value {request.headers['authorization'].encode()!r}")

    with WecoClient("https://api.test/v1", KEY, transport=httpx.MockTransport(handler)) as client:
        for call in (lambda: client.create_run({}), lambda: client.log_step("r", {"step": 1})):
            with pytest.raises(WecoObserveError) as info:
                call()
            assert_no_key(str(info.value), "the error")
            assert_no_key(repr(info.value.args), "the error's args")
            assert_no_key(str(getattr(info.value, "detail", "") or ""), "the error's detail")


def test_the_background_syncer_never_logs_an_echoed_key(cli, journal_path, tmp_path):
    """autosync.log gets each pass's last error: a 500 echoing the key JSON-escaped, then giving up."""
    with HostileServer(_echo("json-escaped", 500)) as server:
        env = {
            "WECO_BASE_URL": server.base_url,
            "WECO_API_KEY": KEY,
            "WECO_OBSERVE_AUTO_SYNC": "1",
            "WECO_OBSERVE_SYNC_GIVE_UP": "0.5",
            "WECO_OBSERVE_SYNC_LINGER": "0.2",
        }
        _journal_some(cli, tmp_path, env=env)
        assert _wait_for(lambda: synclock.in_cooldown(journal_path), timeout=60), "the syncer never gave up"
        assert _wait_for(lambda: not synclock.running(journal_path), timeout=20)
    assert server.requests
    log = (journal_path.parent / "autosync.log").read_text()
    assert "giving up" in log and "HTTP 500" in log, log
    assert_no_key(log, "autosync.log")
    assert_no_key_on_disk(journal_path.parent)


def test_an_sdk_flush_against_an_echoing_server_leaks_nothing_to_stderr(journal_path, tmp_path):
    """The SDK in a real process: its stderr and the journal stay clean."""
    with HostileServer(_echo("reason", 422, create_ok=True)) as server:
        script = (
            "from weco_observe import WecoObserver\n"
            f"obs = WecoObserver(api_key={KEY + chr(10)!r})\n"
            "run = obs.create_run(source_code={'a.py': '1'}, primary_metric='m')\n"
            "run.log_step(1, metrics={'m': 0.5})\n"
            "print(obs.flush(timeout=5))\n"
        )
        env = {**os.environ, "WECO_BASE_URL": server.base_url}
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path
        )
    assert done.returncode == 0, done.stderr
    assert server.requests and all(r.key == KEY for r in server.requests)
    assert_no_key(done.stdout + done.stderr, "the SDK's output")
    assert_no_key_on_disk(journal_path.parent)


# -- the key and the network: plain http:// to a host that is not loopback --------------------


def _loopback_alias() -> str:
    """A host name other than ``localhost`` that resolves to this machine (the box's own name is,
    in /etc/hosts): plain http:// to it is refused by name, while the test server stays on loopback."""
    import ipaddress
    import socket

    for name in {socket.gethostname(), socket.getfqdn()}:
        if not name or name.lower() == "localhost":
            continue
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(name, None, socket.AF_INET)}
        except OSError:
            continue
        if addresses and all(ipaddress.ip_address(a).is_loopback for a in addresses):
            return name
    pytest.skip("no host name other than localhost resolves to 127.0.0.0/8 here")


def test_plain_http_to_a_host_that_is_not_loopback_is_refused_before_the_key_is_sent(cli, journal_path, tmp_path):
    alias = _loopback_alias()
    _journal_some(cli, tmp_path)
    with HostileServer(created) as server:
        env = {"WECO_BASE_URL": f"http://{alias}:{server.port}/v1", "WECO_API_KEY": KEY}
        start = time.monotonic()
        result = cli("observe", "sync", env=env)
        elapsed = time.monotonic() - start
    assert server.requests == []  # the key never left in clear
    assert result.returncode == 78, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "https://" in lines[0] and "WECO_OBSERVE_ALLOW_HTTP=1" in lines[0] and "in clear" in lines[0]
    assert elapsed < 10
    assert pending_events(journal_path) == 2


def test_plain_http_to_a_name_that_does_not_resolve_is_refused_too(cli, journal_path, tmp_path):
    """Refused by its name, before any DNS look-up or connection."""
    _journal_some(cli, tmp_path)
    result = cli("observe", "sync", env={"WECO_BASE_URL": "http://api.weco.invalid/v1", "WECO_API_KEY": KEY})
    assert result.returncode == 78 and "WECO_OBSERVE_ALLOW_HTTP" in result.stderr, result.stderr
    assert "cannot reach" not in result.stderr


def test_allow_http_sends_but_warns_once_per_sync(cli, emulator, journal_path, tmp_path):
    alias = _loopback_alias()
    emulator.api_key = KEY
    _journal_some(cli, tmp_path)
    url = f"http://{alias}:{emulator.port}/v1"
    env = {"WECO_BASE_URL": url, "WECO_API_KEY": KEY, "WECO_OBSERVE_ALLOW_HTTP": "1"}
    result = cli("observe", "sync", env=env)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "unencrypted" in line]
    assert len(warnings) == 1 and url in warnings[0] and "warning" in warnings[0], result.stderr
    assert_server_matches_journal(emulator, journal_path)
    # loopback by address needs no opt-in and gets no warning
    cli.ok("observe", "log", "--run-id", emulator_run(journal_path), "--step", "2")
    quiet = cli("observe", "sync", env={"WECO_BASE_URL": emulator.base_url, "WECO_API_KEY": KEY})
    assert quiet.returncode == 0 and "unencrypted" not in quiet.stderr, quiet.stderr


def emulator_run(journal_path: Path) -> str:
    with Journal(journal_path) as j:
        return j.query("SELECT id FROM runs")[0][0]


def test_the_background_syncer_refuses_plain_http_or_warns_in_its_log(cli, emulator, journal_path, tmp_path):
    alias = _loopback_alias()
    emulator.api_key = KEY
    env = {
        "WECO_BASE_URL": f"http://{alias}:{emulator.port}/v1",
        "WECO_API_KEY": KEY,
        "WECO_OBSERVE_AUTO_SYNC": "1",
        "WECO_OBSERVE_SYNC_LINGER": "0.2",
    }
    # Journal with auto-sync off, then start exactly one syncer: with one per call, a second one
    # started late (a loaded machine) could still hold the journal when the test moves on.
    run = _journal_some(cli, tmp_path, env={**env, "WECO_OBSERVE_AUTO_SYNC": "0"})
    cli.ok("observe", "log", "--run-id", run, "--step", "1", "--metrics", '{"loss": 0.4}', env=env)
    assert _wait_for(lambda: synclock.in_cooldown(journal_path)), "the syncer set no cooldown"
    assert _wait_for(lambda: not synclock.running(journal_path))
    log = (journal_path.parent / "autosync.log").read_text()
    assert "not syncing" in log and "WECO_OBSERVE_ALLOW_HTTP" in log, log
    assert emulator.stats().get("requests", 0) == 0
    synclock.set_cooldown(journal_path, 0)
    cli.ok("observe", "log", "--run-id", run, "--step", "2", env={**env, "WECO_OBSERVE_ALLOW_HTTP": "1"})
    assert _wait_for(lambda: pending_events(journal_path) == 0), "the syncer did not deliver"
    assert _wait_for(lambda: not synclock.running(journal_path))
    log = (journal_path.parent / "autosync.log").read_text()
    assert "unencrypted" in log, log
    assert_server_matches_journal(emulator, journal_path)


def _as_an_older_release_left_it(journal_path: Path, create_error: str, step_error: str | None = None) -> None:
    """A run with a step, its create rejected with ``create_error`` (and its step retried after
    ``step_error``), stored as is: what a release before redaction may have written."""
    from emulator_fixtures import make_workload

    make_workload(journal_path, runs=1, steps=1, relog=False)
    conn = sqlite3.connect(journal_path)
    with conn:
        conn.execute("UPDATE events SET state = 'rejected', last_error = ? WHERE kind = 'create_run'", (create_error,))
        if step_error is not None:
            conn.execute("UPDATE events SET attempts = 1, last_error = ? WHERE kind = 'log_step'", (step_error,))
    conn.close()


def test_sync_redacts_what_an_older_journal_already_holds(cli, emulator, journal_path):
    """A journal written before redaction may hold an echoed key in last_error; sync's summary
    and --json print it (a rejected create's reason) without the key."""
    emulator.api_key = KEY
    _as_an_older_release_left_it(journal_path, f'bad token "{KEY}" and {json_escaped(KEY)}')
    env = {"WECO_BASE_URL": emulator.base_url, "WECO_API_KEY": KEY}
    human = cli("observe", "sync", env=env)
    as_json = cli("observe", "sync", "--json", env=env)
    assert "blocked: create rejected: bad token" in human.stderr, human.stderr
    assert json.loads(as_json.stdout)["runs"][0]["blocked"].startswith("create rejected: bad token")
    for result in (human, as_json):
        assert_no_key(result.stdout + result.stderr, "sync's output")


def test_status_redacts_what_an_older_journal_already_holds(cli, journal_path):
    """The same for status: a rejected event's reason and a pending event's last error, as stored."""
    _as_an_older_release_left_it(
        journal_path, f'bad token "{KEY}"', f"502 from proxy: Authorization: Bearer {json_escaped(KEY)}"
    )
    env = {"WECO_API_KEY": KEY}
    human = cli("observe", "status", env=env)
    as_json = cli("observe", "status", "--json", env=env)
    assert "rejected:" in human.stdout and "bad token" in human.stdout, human.stdout
    info = json.loads(as_json.stdout)
    assert info["last_error"] == f"502 from proxy: Authorization: Bearer {MASK}"
    assert info["rejected"][0]["last_error"] == f'bad token "{MASK}"'
    for result in (human, as_json):
        assert_no_key(result.stdout + result.stderr, "status's output")
