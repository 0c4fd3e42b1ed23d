"""The Weco API emulator speaks the wire contract, over real HTTP on loopback."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from emulator_fixtures import emulator  # noqa: F401
from weco_observe.emulator import DEFAULT_API_KEY, Emulator


def _client(emu: Emulator, key: str | None = DEFAULT_API_KEY, timeout: float = 5.0) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=emu.base_url, headers=headers, timeout=timeout)


def test_create_and_upsert_steps_with_auto_chaining(emulator):
    with _client(emulator) as c:
        r = c.post(
            "/external/runs",
            json={"source_code": {"a.py": "x=1"}, "metric_name": "loss", "maximize": False, "name": "demo"},
        )
        assert r.status_code == 200
        run_id = r.json()["run_id"]
        assert len(run_id) == 36
        steps = f"/external/runs/{run_id}/steps"
        assert c.post(steps, json={"step": 1, "status": "completed", "metrics": {"loss": 1.0}}).status_code == 200
        assert c.post(steps, json={"step": 2, "status": "failed", "description": "oom"}).status_code == 200
        assert c.post(steps, json={"step": 3, "status": "completed"}).status_code == 200
        assert c.post(steps, json={"step": 4, "status": "completed", "parent_step": 1}).status_code == 200
        # an update keeps omitted optional fields
        assert c.post(steps, json={"step": 2, "status": "failed", "metrics": {"loss": 9.0}}).status_code == 200
    run = emulator.runs()[run_id]
    assert run["name"] == "demo" and run["metric_name"] == "loss" and run["maximize"] is False
    tree = {n: s["parent_step"] for n, s in run["steps"].items()}
    assert tree == {0: None, 1: 0, 2: 1, 3: 1, 4: 1}
    assert run["steps"][0]["code"] == {"a.py": "x=1"}
    assert run["steps"][2]["description"] == "oom" and run["steps"][2]["metrics"] == {"loss": 9.0}
    assert emulator.stats()["created_runs"] == 1


def test_auth_unknown_run_and_invalid_bodies(emulator):
    with _client(emulator, key="wrong") as c:
        r = c.post("/external/runs", json={"source_code": {}, "metric_name": "m", "maximize": True})
        assert r.status_code == 401 and "detail" in r.json()
    with _client(emulator, key=None) as c:
        assert c.post("/external/runs", json={}).status_code == 401
    with _client(emulator) as c:
        r = c.post("/external/runs/00000000-0000-4000-8000-000000000000/steps", json={"step": 1, "status": "completed"})
        assert r.status_code == 404
        r = c.post("/external/runs", json={"source_code": {"a": "b"}, "metric_name": "m"})
        assert r.status_code == 422 and "maximize" in r.json()["detail"]
        run_id = emulator.create_run({"a.py": "1"})
        r = c.post(f"/external/runs/{run_id}/steps", json={"step": 2, "status": "weird"})
        assert r.status_code == 422
        r = c.post(f"/external/runs/{run_id}/steps", json={"step": 2, "status": "completed", "parent_step": 5})
        assert r.status_code == 422
    assert emulator.runs().keys() == {run_id}


def test_any_key_mode():
    with Emulator(api_key=None) as emu, _client(emu, key="whatever") as c:
        assert (
            c.post("/external/runs", json={"source_code": {}, "metric_name": "m", "maximize": True}).status_code == 200
        )


@pytest.mark.parametrize(
    ("faults", "check"),
    [
        ({"error_rate": 1.0}, lambda r: r.status_code in (500, 503)),
        (
            {"rate_limit_rate": 1.0, "retry_after": 3},
            lambda r: r.status_code == 429 and r.headers["Retry-After"] == "3",
        ),
        ({"non_json_rate": 1.0}, lambda r: r.status_code == 200 and r.text == "<html>OK</html>"),
        ({"reject_steps": [1]}, lambda r: r.status_code == 422),
    ],
)
def test_answer_faults(emulator, faults, check):
    run_id = emulator.create_run({"a.py": "1"})
    emulator.set_faults(**faults)
    with _client(emulator) as c:
        r = c.post(f"/external/runs/{run_id}/steps", json={"step": 1, "status": "completed"})
    assert check(r)


def test_drop_stores_nothing_and_commit_then_timeout_stores(emulator):
    run_id = emulator.create_run({"a.py": "1"})
    emulator.set_faults(drop_rate=1.0)
    with _client(emulator) as c, pytest.raises(httpx.RemoteProtocolError):
        c.post(f"/external/runs/{run_id}/steps", json={"step": 1, "status": "completed"})
    assert 1 not in emulator.runs()[run_id]["steps"]
    emulator.set_faults(drop_rate=0.0, commit_then_timeout_rate=1.0, hang=1.0)
    with _client(emulator, timeout=0.2) as c, pytest.raises(httpx.ReadTimeout):
        c.post(f"/external/runs/{run_id}/steps", json={"step": 1, "status": "completed"})
    assert 1 in emulator.runs()[run_id]["steps"]


def test_latency_is_added(emulator):
    emulator.set_faults(latency=0.2)
    with _client(emulator) as c:
        start = time.monotonic()
        c.post("/external/runs", json={"source_code": {}, "metric_name": "m", "maximize": True})
        assert time.monotonic() - start >= 0.2


def test_state_and_faults_endpoints(emulator):
    run_id = emulator.create_run({"a.py": "1"}, name="x")
    with httpx.Client(base_url=emulator.base_url) as c:
        state = c.get("/_emulator/state").json()
        assert state["runs"][run_id]["steps"]["0"]["code"] == {"a.py": "1"}
        assert c.post("/_emulator/faults", json={"latency": 0.01}).json()["latency"] == 0.01
        assert c.post("/_emulator/faults", json={"nope": 1}).status_code == 422
    assert emulator.faults.latency == 0.01


def test_accepted_sockets_have_tcp_nodelay(emulator):
    with _client(emulator) as c:
        c.post("/external/runs", json={"source_code": {}, "metric_name": "m", "maximize": True})
        # the keep-alive connection is still open on the server side
        socks = list(emulator._server._sockets)
        assert socks
        assert all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in socks)


def test_emulator_command_serves_until_interrupted(cli, tmp_path, journal_path):
    """`weco observe emulator --port 0` prints its base URL; a real sync to it works; Ctrl-C stops it."""
    import os
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "weco_observe", "observe", "emulator", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base_url = proc.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        (tmp_path / "a.py").write_text("x = 1\n")
        cli.ok("observe", "init", "--metric", "m", "--source", "a.py")
        env = {"WECO_BASE_URL": base_url, "WECO_API_KEY": DEFAULT_API_KEY}
        cli.ok("observe", "sync", env=env)
        state = httpx.get(f"{base_url}/_emulator/state").json()
        assert len(state["runs"]) == 1
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "WECO_API_KEY=weco-emulator-key" in err
    assert os.environ.get("WECO_API_KEY") is None
