"""The relay (`weco observe serve`) as boxes and the official client use it, all on loopback.

Every test runs the relay as a real process; boxes are real journals synced by
the real CLI; the upstream is the API emulator.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from emulator_fixtures import emulator  # noqa: F401
from relay_fixtures import RelayProcess, add_key, relay_cli, relay_data, relays  # noqa: F401
from weco_observe.journal import Journal

CODE = "".join(f"line {i}\n" for i in range(300))


def cli(data: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120):
    full = {**os.environ, "WECO_OBSERVE_DIR": str(data), "WECO_OBSERVE_AUTO_SYNC": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "weco_observe", "observe", *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=timeout,
    )


def make_box(root: Path, name: str, steps: int, *, src: Path) -> tuple[Path, str]:
    """A box's journal with one run of ``steps`` steps (every third failed, code changing)."""
    data = root / name
    src.write_text(CODE)
    init = cli(data, "init", "--metric", "loss", "--name", name, "--source", str(src))
    assert init.returncode == 0, init.stderr
    run = init.stdout.strip()
    with Journal(data / "journal.db") as j:
        for n in range(1, steps + 1):
            j.log_step(
                run,
                n,
                status="failed" if n % 3 == 0 else "completed",
                metrics={"loss": 1.0 / n},
                description=f"{name} step {n}",
                code={str(src.name): CODE + f"lr = {n}\n"},
            )
    return data, run


def relay_state(data: Path) -> dict[str, dict]:
    """The relay journal's runs by the id boxes know them by: {relay_id: {meta, steps}}."""
    conn = sqlite3.connect(data / "journal.db")
    conn.row_factory = sqlite3.Row
    out = {}
    for r in conn.execute("SELECT rr.relay_id, rr.key_name, r.* FROM relay_runs rr JOIN runs r ON r.id = rr.run_id"):
        steps = {s["step"]: dict(s) for s in conn.execute("SELECT * FROM steps WHERE run_id = ?", (r["id"],))}
        out[r["relay_id"]] = {**dict(r), "steps": steps}
    conn.close()
    return out


def box_steps(data: Path, run: str) -> tuple[str, dict[int, dict]]:
    with Journal(data / "journal.db") as j:
        row = j.require_run(run)
        steps = {s["step"]: s for s in j.steps(row["id"])}
        return row["server_id"], {
            n: {**s, "code_text": j.read_code(s["code"]) if s["code"] else None} for n, s in steps.items()
        }


def assert_relay_holds_box(relay_data_dir: Path, box: Path, run: str) -> None:
    server_id, steps = box_steps(box, run)
    assert server_id, "the box never got a relay id"
    held = relay_state(relay_data_dir)[server_id]
    assert sorted(held["steps"]) == sorted(steps)
    with Journal(relay_data_dir / "journal.db") as relay_journal:
        for n, s in steps.items():
            got = held["steps"][n]
            assert (got["status"], got["description"], got["parent_step"]) == (
                s["status"],
                s["description"],
                s["parent_step"],
            ), n
            assert json.loads(got["metrics"] or "null") == s["metrics"]
            code = relay_journal.read_code(json.loads(got["code"])) if got["code"] else None
            assert code == s["code_text"], n


# -- durable before it answers ------------------------------------------------------------


def test_a_request_is_answered_only_after_the_wal_holding_it_is_fsynced(relay_data, monkeypatch):
    # The relay's commits leave the WAL's fsync to the writer, after the write lock is released
    # (synchronous=NORMAL); the answer must still wait for it. kill -9 cannot tell the two apart
    # (the page cache survives it), so the order is watched here.
    from weco_observe import relay

    store = relay.RelayStore(relay_data)
    wal = relay_data / "journal.db-wal"
    order: list[tuple[str, object]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        order.append(("fsync", os.fstat(fd).st_ino))

    monkeypatch.setattr(relay.os, "fsync", fsync)
    try:
        created = store.create({"source_code": {"a.py": CODE}, "metric_name": "loss", "maximize": False}, "box")
        run = created.result(timeout=30)
        order.append(("answered", run))
        done = store.log_step(run, {"step": 1, "metrics": {"loss": 0.5}}).result(timeout=30)
        order.append(("answered", done["step"]))
        with pytest.raises(Exception, match="not found"):
            store.log_step(str(uuid.uuid4()), {"step": 1}).result(timeout=30)  # a refused request fails alone
        inode = wal.stat().st_ino
        assert order[:4] == [("fsync", inode), ("answered", run), ("fsync", inode), ("answered", 1)]
    finally:
        store.close()


def test_steps_move_their_runs_last_activity_and_a_bad_request_fails_alone(relay_data):
    # the relay moves a run's last activity once per group of requests, not per step
    from weco_observe import relay

    store = relay.RelayStore(relay_data)
    try:
        body = {"source_code": {"a.py": CODE}, "metric_name": "loss", "maximize": False}
        a, b = (store.create(dict(body), "box").result(timeout=30) for _ in range(2))
        conn = sqlite3.connect(relay_data / "journal.db")
        query = "SELECT r.updated_at FROM runs r JOIN relay_runs rr ON rr.run_id = r.id WHERE rr.relay_id = ?"
        created = {run: conn.execute(query, (run,)).fetchone()[0] for run in (a, b)}
        time.sleep(0.05)
        futures = [store.log_step(a, {"step": n, "metrics": {"loss": 1 / n}}) for n in range(1, 6)]
        futures.insert(2, store.log_step(str(uuid.uuid4()), {"step": 1}))  # no such run: in the same group
        with pytest.raises(Exception, match="not found"):
            futures.pop(2).result(timeout=30)
        for f in futures:
            f.result(timeout=30)
        moved = conn.execute(query, (a,)).fetchone()[0]
        assert created[a] + 0.05 <= moved <= time.time()
        assert conn.execute(query, (b,)).fetchone()[0] == created[b]  # untouched
        steps = conn.execute(
            "SELECT count(*) FROM steps s JOIN relay_runs rr ON rr.run_id = s.run_id WHERE rr.relay_id = ?", (a,)
        )
        assert steps.fetchone()[0] == 6  # the baseline and five steps
        conn.close()
    finally:
        store.close()


def test_a_failed_fsync_answers_no_request_as_durable(relay_data, monkeypatch):
    from weco_observe import relay
    from weco_observe.errors import JournalUnavailable

    store = relay.RelayStore(relay_data)
    try:
        run = store.create({"source_code": {"a.py": CODE}, "metric_name": "loss", "maximize": False}, "box")
        run = run.result(timeout=30)

        def fsync(fd: int) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(relay.os, "fsync", fsync)
        with pytest.raises(JournalUnavailable, match="cannot fsync journal .*journal.db-wal: .*Input/output error"):
            store.log_step(run, {"step": 1, "metrics": {"loss": 0.5}}).result(timeout=30)
        monkeypatch.undo()
        again = store.log_step(run, {"step": 1, "metrics": {"loss": 0.25}}).result(timeout=30)  # the box's retry
        assert again == {"run_id": run, "step": 1, "parent_step": 0}
    finally:
        store.close()


# -- the wire contract ---------------------------------------------------------------------


def test_the_api_as_the_wire_contract_describes_it(relays, relay_data):
    key = add_key(relay_data, "box-a")
    viewer = add_key(relay_data, "alice", "--read-only")
    relay = relays(relay_data)
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=relay.base_url, timeout=10) as http:
        made = http.post(
            "/external/runs",
            json={"source_code": {"a.py": "x = 1\n"}, "metric_name": "loss", "maximize": False},
            headers=auth,
        )
        assert made.status_code == 200
        run_id = made.json()["run_id"]
        assert str(uuid.UUID(run_id)) == run_id
        step = http.post(
            f"/external/runs/{run_id}/steps",
            json={"step": 1, "status": "completed", "description": "d", "metrics": {"loss": 0.5}},
            headers=auth,
        )
        assert step.status_code == 200 and step.json() == {"run_id": run_id, "step": 1, "parent_step": 0}
        again = http.post(f"/external/runs/{run_id}/steps", json={"step": 1, "status": "failed"}, headers=auth)
        assert again.status_code == 200  # an upsert: fields left out keep their value
        child = http.post(
            f"/external/runs/{run_id}/steps", json={"step": 9, "status": "completed", "parent_step": 7}, headers=auth
        )
        assert child.json()["parent_step"] == 7  # a parent not there yet is accepted, as the API does
        cases = [
            ({"Authorization": "Bearer wor_wrong"}, "/external/runs", {"source_code": {}}, 401),
            ({}, "/external/runs", {}, 401),
            (
                {"Authorization": f"Bearer {viewer}"},
                "/external/runs",
                {"source_code": {"a": "b"}, "metric_name": "m", "maximize": False},
                403,
            ),
            (auth, f"/external/runs/{uuid.uuid4()}/steps", {"step": 1, "status": "completed"}, 404),
            (auth, "/external/other", {}, 404),
            (auth, "/external/runs", {"source_code": {"a.py": "x"}, "maximize": False}, 422),
            (
                auth,
                f"/external/runs/{run_id}/steps",
                {"step": 2, "status": "completed", "metrics": {"loss": "NaN"}},
                422,
            ),
            (auth, f"/external/runs/{run_id}/steps", {"step": -1, "status": "completed"}, 422),
        ]
        for headers, path, body, status in cases:
            answer = http.post(path, json=body, headers=headers)
            assert answer.status_code == status, (path, body, answer.text)
            assert isinstance(answer.json()["detail"], str)
        bad_json = http.post(
            "/external/runs", content=b"{not json", headers={**auth, "Content-Type": "application/json"}
        )
        assert bad_json.status_code == 422
        nan = http.post(
            f"/external/runs/{run_id}/steps",
            content=b'{"step": 2, "status": "completed", "metrics": {"loss": NaN}}',
            headers=auth,
        )
        assert nan.status_code == 422
    held = relay_state(relay_data)[run_id]
    assert held["key_name"] == "box-a"
    assert held["steps"][1]["status"] == "failed" and held["steps"][1]["description"] == "d"
    assert sorted(held["steps"]) == [0, 1, 9]
    log = "".join(relay.log)
    assert key not in log and viewer not in log  # keys never reach the access log
    assert "POST /v1/external/runs/" in log and " 401 " in log


def test_a_create_sent_again_after_a_lost_answer_gets_the_same_run(relays, relay_data):
    key = add_key(relay_data, "box-a")
    relay = relays(relay_data)
    body = {
        "source_code": {"a.py": "x = 1\n"},
        "metric_name": "loss",
        "maximize": False,
        "metadata": {"weco_observe_local_id": "local-01m8aaaaaaaaaaaaaaaaaaaaaa", "team": "x"},
    }
    with httpx.Client(base_url=relay.base_url, headers={"Authorization": f"Bearer {key}"}) as http:
        first = http.post("/external/runs", json=body).json()["run_id"]
        second = http.post("/external/runs", json=body).json()["run_id"]
        other = http.post("/external/runs", json={**body, "metadata": {}}).json()["run_id"]
    assert first == second != other
    assert len(relay_state(relay_data)) == 2


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_revoked_key_is_refused_mid_stream(relays, relay_data, workers):
    # with 2 workers, each remembers the keys it has seen: the revocation must reach both
    key = add_key(relay_data, "box-a")
    relay = relays(relay_data, "--workers", workers)
    with httpx.Client(base_url=relay.base_url, headers={"Authorization": f"Bearer {key}"}) as http:
        run_id = http.post(
            "/external/runs", json={"source_code": {"a": "x"}, "metric_name": "m", "maximize": False}
        ).json()["run_id"]
        assert http.post(f"/external/runs/{run_id}/steps", json={"step": 1, "status": "completed"}).status_code == 200
        revoked = relay_cli(relay_data, "keys", "revoke", "box-a")
        assert revoked.returncode == 0, revoked.stderr
        refused = http.post(
            f"/external/runs/{run_id}/steps", json={"step": 2, "status": "completed"}
        )  # same connection
        assert refused.status_code == 401
    for _ in range(8):  # new connections, which either worker may take
        with httpx.Client(base_url=relay.base_url, headers={"Authorization": f"Bearer {key}"}) as fresh:
            assert fresh.post(f"/external/runs/{run_id}/steps", json={"step": 3}).status_code == 401
    assert sorted(relay_state(relay_data)[run_id]["steps"]) == [0, 1]
    listed = relay_cli(relay_data, "keys", "list", "--json")
    assert [(k["name"], k["revoked_at"] is not None) for k in json.loads(listed.stdout)] == [("box-a", True)]
    assert key not in listed.stdout


def test_keys_are_stored_as_hashes_and_shown_once(relay_data):
    key = add_key(relay_data, "box-a")
    assert key.startswith("wor_") and len(key) > 40
    raw = (relay_data / "journal.db").read_bytes()
    assert key.encode() not in raw
    duplicate = relay_cli(relay_data, "keys", "add", "box-a")
    assert duplicate.returncode == 2 and duplicate.stderr.startswith("error: ")
    assert relay_cli(relay_data, "keys", "revoke", "nobody").returncode == 2


def test_a_non_loopback_address_needs_a_key_and_tls(relay_data):
    def serve(*flags: str) -> subprocess.CompletedProcess[str]:
        return relay_cli(relay_data, "--host", "192.0.2.10", "--port", "0", *flags)

    no_key = serve()
    assert no_key.returncode == 2 and "no key" in no_key.stderr
    add_key(relay_data, "box-a")
    no_tls = serve()
    assert no_tls.returncode == 2 and "without TLS" in no_tls.stderr


def test_a_bad_worker_count_or_a_taken_port_is_a_one_line_error(relay_data, relays):
    for bad in ("0", "33"):
        refused = relay_cli(relay_data, "--port", "0", "--workers", bad)
        assert refused.returncode == 2 and refused.stderr == "error: --workers must be between 1 and 32\n"
    running = relays(relay_data)
    port = running.url.rsplit(":", 1)[1]
    taken = relay_cli(relay_data, "--port", port, "--workers", "2")
    assert taken.returncode == 2 and taken.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}: ")
    assert len(taken.stderr.splitlines()) == 1 and "Traceback" not in taken.stderr


# -- boxes, the relay and upstream --------------------------------------------------------------


def test_boxes_sync_to_the_relay_and_it_forwards_upstream_exactly_once(relays, relay_data, emulator, tmp_path):
    key_a, key_b = add_key(relay_data, "box-a"), add_key(relay_data, "box-b")
    relay = relays(relay_data, "--upstream", emulator.base_url, env={"WECO_API_KEY": emulator.api_key})
    boxes = [
        (*make_box(tmp_path, "box-a", 12, src=tmp_path / "a.py"), key_a),
        (*make_box(tmp_path, "box-b", 7, src=tmp_path / "b.py"), key_b),
    ]
    for data, _run, key in boxes:
        synced = cli(data, "sync", env=relay.env(key))
        assert synced.returncode == 0, synced.stderr
        synced = cli(data, "sync", env=relay.env(key))  # nothing new: nothing doubled
        assert synced.returncode == 0
    for data, run, _key in boxes:
        assert_relay_holds_box(relay_data, data, run)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(len(r["steps"]) for r in emulator.runs().values()) < 13 + 8:
        time.sleep(0.2)
    runs = emulator.runs()
    assert len(runs) == 2, "every run reached upstream once"
    by_local = {r["metadata"]["weco_observe_local_id"]: r for r in runs.values()}
    for data, run, _key in boxes:
        _server, steps = box_steps(data, run)
        upstream = by_local[Journal(data / "journal.db").require_run(run)["id"]]  # the box's own id travels
        assert sorted(upstream["steps"]) == sorted(steps)
        for n, s in steps.items():
            got = upstream["steps"][n]
            assert (got["status"], got["description"], got["metrics"] or None, got["parent_step"]) == (
                s["status"],
                s["description"],
                s["metrics"] or None,
                s["parent_step"],
            )
            assert got["code"] == s["code_text"]
    health = httpx.get(relay.url + "/healthz").json()
    assert health["ok"] and health["pending_upstream"] == 0


def test_forwarding_honours_429_and_retry_after_and_sends_each_step_once(relays, relay_data, emulator, tmp_path):
    """The upstream rate-limits a third of the requests: the forwarding process waits as asked and
    gets everything there once (a 429 stores nothing, so one post per step means no resend)."""
    emulator.set_faults(rate_limit_rate=0.3, retry_after=0.3, seed=11)
    key = add_key(relay_data, "box")
    relay = relays(relay_data, "--upstream", emulator.base_url, env={"WECO_API_KEY": emulator.api_key})
    data, run = make_box(tmp_path, "box", 30, src=tmp_path / "a.py")
    synced = cli(data, "sync", env=relay.env(key))
    assert synced.returncode == 0, synced.stderr
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and httpx.get(relay.url + "/healthz").json()["pending_upstream"]:
        time.sleep(0.2)
    assert emulator.stats().get("status_429", 0) > 0
    (upstream,) = emulator.runs().values()
    _server, steps = box_steps(data, run)
    assert sorted(upstream["steps"]) == sorted(steps)
    assert all(s["posts"] == 1 for n, s in upstream["steps"].items() if n != 0)


def _children(pid: int) -> set[int]:
    """Live processes whose parent is ``pid`` (Linux /proc)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if int(ppid) == pid and state != "Z":
            out.add(int(stat.parent.name))
    return out


def _workers(pid: int) -> set[int]:
    """The serving processes of ``serve --workers N`` (not multiprocessing's resource tracker)."""
    out = set()
    for child in _children(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                out.add(child)
        except OSError:
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_forwarding_process_ends_with_a_killed_relay(relays, relay_data, emulator):
    """Forwarding runs in a process of its own; a ``kill -9`` of the relay must not leave it sending."""
    relay = relays(relay_data, "--upstream", emulator.base_url, env={"WECO_API_KEY": emulator.api_key})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _children(relay.proc.pid):
        time.sleep(0.1)
    forwarders = _children(relay.proc.pid)
    assert forwarders
    relay.kill()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(pid) for pid in forwarders):
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in forwarders)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_kill_9_of_the_relay_while_four_boxes_sync_loses_and_doubles_nothing(relays, relay_data, tmp_path, workers):
    key = add_key(relay_data, "site")
    boxes = [make_box(tmp_path, f"box-{i}", 40, src=tmp_path / f"s{i}.py") for i in range(4)]
    rng = random.Random(7)
    for _round in range(3):
        relay = relays(relay_data, "--workers", workers)
        serving = _children(relay.proc.pid)
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "weco_observe", "observe", "sync", "--workers", "2"],
                env={**os.environ, "WECO_OBSERVE_DIR": str(data), "WECO_OBSERVE_AUTO_SYNC": "0", **relay.env(key)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for data, _run in boxes
        ]
        time.sleep(rng.uniform(0.2, 0.8))
        relay.kill()  # SIGKILL, answers in flight lost
        for p in procs:
            _out, err = p.communicate(timeout=120)
            assert "Traceback" not in err, err
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(pid) for pid in serving):
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in serving), "a worker outlived its killed relay"
    relay = relays(relay_data, "--workers", workers)
    for data, _run in boxes:
        final = cli(data, "sync", env=relay.env(key))
        assert final.returncode == 0, final.stderr
    state = relay_state(relay_data)
    assert len(state) == 4, "one relay run per box run, however many creates were resent"
    for data, run in boxes:
        assert_relay_holds_box(relay_data, data, run)
    conn = sqlite3.connect(relay_data / "journal.db")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_finishes_requests_in_flight(relays, relay_data, tmp_path, workers):
    key = add_key(relay_data, "box")
    relay = relays(relay_data, "--workers", workers)
    answered: list[int] = []
    stop = threading.Event()
    with httpx.Client(base_url=relay.base_url, headers={"Authorization": f"Bearer {key}"}) as http:
        run_id = http.post(
            "/external/runs", json={"source_code": {"a": "x"}, "metric_name": "m", "maximize": False}
        ).json()["run_id"]

        def hammer(offset: int) -> None:
            with httpx.Client(base_url=relay.base_url, headers={"Authorization": f"Bearer {key}"}) as own:
                n = offset
                while not stop.is_set():
                    n += 4
                    try:
                        r = own.post(f"/external/runs/{run_id}/steps", json={"step": n, "status": "completed"})
                    except httpx.HTTPError:
                        return
                    if r.status_code == 200:
                        answered.append(n)

        workers = [threading.Thread(target=hammer, args=(i,)) for i in range(1, 5)]
        for w in workers:
            w.start()
        time.sleep(1.0)
        code = relay.stop()  # SIGTERM
        stop.set()
        for w in workers:
            w.join(30)
    assert code in (0, -15)  # uvicorn re-raises SIGTERM once it has shut down gracefully
    assert "stopped: every request answered was committed" in "".join(relay.log)
    assert len(answered) > 20
    held = relay_state(relay_data)[run_id]["steps"]
    assert set(answered) <= set(held), "every answered step is durable"


def test_tls_with_a_site_ca(relays, relay_data, tmp_path):
    ca_key, ca_cert = tmp_path / "ca.key", tmp_path / "ca.pem"
    key, csr, cert, ext = tmp_path / "relay.key", tmp_path / "relay.csr", tmp_path / "relay.pem", tmp_path / "san.ext"

    def openssl(*args: str) -> None:
        done = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca_cert),
        "-days",
        "2",
        "-subj",
        "/CN=test site CA",
    )
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    ext.write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca_cert),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        "2",
        "-extfile",
        str(ext),
    )
    os.chmod(key, 0o600)
    api_key = add_key(relay_data, "box-a")
    relay = relays(relay_data, "--tls-cert", str(cert), "--tls-key", str(key))
    assert relay.base_url.startswith("https://127.0.0.1:")
    with httpx.Client(
        base_url=relay.base_url,
        verify=ssl.create_default_context(cafile=str(ca_cert)),
        headers={"Authorization": f"Bearer {api_key}"},
    ) as http:
        made = http.post("/external/runs", json={"source_code": {"a": "x"}, "metric_name": "m", "maximize": False})
        assert made.status_code == 200
    with pytest.raises(httpx.ConnectError), httpx.Client(base_url=relay.base_url) as untrusting:
        untrusting.post("/external/runs", json={})  # the system CAs do not know the site's CA
    with pytest.raises(httpx.HTTPError):
        httpx.post(relay.base_url.replace("https://", "http://") + "/external/runs", json={}, timeout=5)
    # a box trusts the site's CA through WECO_OBSERVE_CA_BUNDLE, and syncs unchanged otherwise
    box, run = make_box(tmp_path, "box-tls", 3, src=tmp_path / "t.py")
    untrusted = cli(box, "sync", env=relay.env(api_key))
    assert untrusted.returncode == 4 and "Traceback" not in untrusted.stderr
    synced = cli(box, "sync", env={**relay.env(api_key), "WECO_OBSERVE_CA_BUNDLE": str(ca_cert)})
    assert synced.returncode == 0, synced.stderr
    assert_relay_holds_box(relay_data, box, run)


# -- the official client -----------------------------------------------------------------------


OFFICIAL = "weco==0.4.0"


@pytest.fixture(scope="session")
def official_weco(tmp_path_factory) -> Path:
    """The official ``weco`` client in a venv of its own (skipped, with the reason, when it cannot be installed)."""
    venv = tmp_path_factory.mktemp("official") / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=120)
    if made.returncode != 0:
        pytest.skip(f"cannot make a venv: {made.stderr.strip()[-200:]}")
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", OFFICIAL], capture_output=True, text=True, timeout=600
    )
    if pip.returncode != 0:
        pytest.skip(f"cannot install {OFFICIAL}: {pip.stderr.strip().splitlines()[-1:]}")
    return venv / "bin" / "weco"


def test_the_official_client_logs_a_run_through_the_relay(relays, relay_data, official_weco, tmp_path):
    key = add_key(relay_data, "official-client")
    relay = relays(relay_data)
    src = tmp_path / "train.py"
    src.write_text("lr = 0.1\n")
    env = {**os.environ, **relay.env(key)}  # HOME is the test's own (conftest): no credentials of ours
    init = subprocess.run(
        [str(official_weco), "observe", "init", "--metric", "loss", "--source", str(src), "--name", "official"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert init.returncode == 0, init.stderr
    run_id = init.stdout.strip()
    src.write_text("lr = 0.05\n")
    logged = subprocess.run(
        [
            str(official_weco),
            "observe",
            "log",
            "--run-id",
            run_id,
            "--step",
            "1",
            "--metrics",
            '{"loss": 0.4}',
            "--source",
            str(src),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert logged.returncode == 0 and "dropped" not in logged.stdout + logged.stderr, logged.stdout + logged.stderr
    held = relay_state(relay_data)[run_id]
    assert held["name"] == "official" and held["key_name"] == "official-client"
    assert held["steps"][1]["parent_step"] == 0 and json.loads(held["steps"][1]["metrics"]) == {"loss": 0.4}
    with Journal(relay_data / "journal.db") as j:
        assert j.read_code(json.loads(held["steps"][1]["code"])) == {str(src): "lr = 0.05\n"}


OFFICIAL_SDK = """
import json, sys
from weco.observe import WecoObserver
obs = WecoObserver()
run = obs.create_run(name="sdk", source_code={"train.py": "lr = 0.1\\n"}, primary_metric="loss", maximize=False)
run.log_step(step=1, status="completed", description="lower lr", metrics={"loss": 0.3},
             code={"train.py": "lr = 0.05\\n"})
run.log_step(step=2, status="failed", description="oom", metrics={"loss": 9.0})
print(json.dumps({"run_id": run.run_id}))
"""


def test_the_official_sdk_logs_a_run_through_the_relay(relays, relay_data, official_weco, tmp_path):
    """The guide's SDK code, run by the official package (its own `weco.observe`, not ours)."""
    key = add_key(relay_data, "official-sdk")
    relay = relays(relay_data)
    python = official_weco.with_name("python")
    env = {**os.environ, **relay.env(key)}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(python), "-c", OFFICIAL_SDK], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    run_id = json.loads(done.stdout.strip().splitlines()[-1])["run_id"]
    held = relay_state(relay_data)[run_id]
    assert held["name"] == "sdk" and held["key_name"] == "official-sdk" and held["metric"] == "loss"
    assert {n: s["status"] for n, s in held["steps"].items()} == {0: "completed", 1: "completed", 2: "failed"}
    assert json.loads(held["steps"][1]["metrics"]) == {"loss": 0.3} and held["steps"][2]["description"] == "oom"
    with Journal(relay_data / "journal.db") as j:
        assert j.read_code(json.loads(held["steps"][1]["code"])) == {"train.py": "lr = 0.05\n"}


def test_a_host_that_only_looks_like_loopback_needs_a_key(relay_data):
    for host in ("127.example.org", "localhost.example.org"):
        refused = relay_cli(relay_data, "--host", host, "--port", "0")
        assert refused.returncode == 2 and "no key" in refused.stderr, (host, refused.stderr)


def test_workers_share_one_port_one_journal_and_one_run_per_local_id(relays, relay_data):
    """`serve --workers 2`: the same create sent at once on many connections (either worker may take
    each) makes one run; steps from every connection land in it; a worker killed is replaced."""
    key = add_key(relay_data, "box")
    relay = relays(relay_data, "--workers", "2")
    serving = _workers(relay.proc.pid)
    assert len(serving) == 2
    body = {
        "source_code": {"a.py": "x = 1\n"},
        "metric_name": "loss",
        "maximize": False,
        "metadata": {"weco_observe_local_id": "local-01m8bbbbbbbbbbbbbbbbbbbbbb"},
    }
    answers: list[str] = []

    def create() -> None:
        with httpx.Client(base_url=relay.base_url, headers={"Authorization": f"Bearer {key}"}) as http:
            answers.append(http.post("/external/runs", json=body).json()["run_id"])

    threads = [threading.Thread(target=create) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == 16 and len(set(answers)) == 1
    run_id = answers[0]

    def steps(first: int) -> None:
        with httpx.Client(base_url=relay.base_url, headers={"Authorization": f"Bearer {key}"}) as http:
            for n in range(first, first + 10):
                assert http.post(f"/external/runs/{run_id}/steps", json={"step": n}).status_code == 200

    threads = [threading.Thread(target=steps, args=(1 + 10 * i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(relay_state(relay_data)[run_id]["steps"]) == list(range(81))
    assert len(relay_state(relay_data)) == 1

    victim = min(serving)
    os.kill(victim, 9)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (len(_workers(relay.proc.pid) - {victim}) < 2):
        time.sleep(0.1)
    assert len(_workers(relay.proc.pid) - {victim}) == 2, "the killed worker was not replaced"
    with httpx.Client(base_url=relay.base_url, headers={"Authorization": f"Bearer {key}"}) as http:
        for n in range(81, 91):  # whichever worker takes them
            assert http.post(f"/external/runs/{run_id}/steps", json={"step": n}).status_code == 200
    assert relay.stop() == 0
    log = "".join(relay.log)
    assert f"worker {victim} exited (-9): starting another" in log, log
    assert "stopped: every worker finished its requests and committed them" in log
    assert sorted(relay_state(relay_data)[run_id]["steps"]) == list(range(91))
