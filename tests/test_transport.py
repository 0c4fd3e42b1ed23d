"""The default transport (``transport.py``, http.client under httpx) against real servers on loopback.

What ``api.py`` relies on: connections are kept alive and reused, but never one the
server has closed meanwhile (a request written into it would come back ambiguous);
failures arrive as the httpx exceptions that ``api.py`` classifies (no connection:
unreachable; no answer: ambiguous); a 429's ``Retry-After`` reaches the retry policy.
"""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from emulator_fixtures import emulator  # noqa: F401
from hostile import HostileServer, response
from weco_observe import api
from weco_observe.api import WecoClient
from weco_observe.errors import ApiTransient
from weco_observe.transport import StdlibTransport

CODE = {"a.py": "x = 1\n" * 2000}


def _connections(emu) -> int:
    assert emu._server is not None
    return len(emu._server._sockets)


def test_requests_share_a_kept_alive_connection(emulator):
    with WecoClient(emulator.base_url, emulator.api_key) as client:
        run = client.create_run({"source_code": CODE, "metric_name": "loss", "maximize": False})
        for n in range(1, 21):
            assert client.log_step(run, {"step": n, "status": "completed", "code": CODE})["step"] == n
        assert _connections(emulator) == 1
    assert sorted(emulator.runs()[run]["steps"]) == list(range(21))
    assert emulator.stats()["steps_posted"] == 20


def test_connections_on_descriptors_past_1023_are_reused_too(emulator):
    """A busy relay has many files open; the idle check must not take a high descriptor for dead."""
    import os
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the descriptor limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = []
    try:
        while not held or held[-1] < 1100:
            held.append(os.dup(0))
        with WecoClient(emulator.base_url, emulator.api_key) as client:
            run = client.create_run({"source_code": CODE, "metric_name": "loss", "maximize": False})
            used = []
            for n in range(1, 4):
                client.log_step(run, {"step": n, "status": "completed"})
                used += [conn for idle in client._transport._idle.values() for conn, _ in idle]
            assert len(used) == 3 and used[0].sock.fileno() > 1023
            assert used[1] is used[0] and used[2] is used[0]  # one connection, kept
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_connection_the_server_closed_while_idle_is_not_reused(emulator):
    with WecoClient(emulator.base_url, emulator.api_key) as client:
        run = client.create_run({"source_code": CODE, "metric_name": "loss", "maximize": False})
        assert emulator._server is not None
        emulator._server.close_all()  # the server drops its idle keep-alive connections
        time.sleep(0.1)
        assert client.log_step(run, {"step": 1, "status": "completed"})["step"] == 1
    assert emulator.stats()["steps_posted"] == 1


def test_no_listener_is_unreachable_and_nothing_was_sent():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with WecoClient(f"http://127.0.0.1:{port}/v1", "k") as client, pytest.raises(ApiTransient) as info:
        client.log_step("5b7e0c1a-2222-4333-8444-555566667777", {"step": 1, "status": "completed"})
    assert api.is_unreachable(info.value) and not info.value.ambiguous


def test_no_answer_in_time_is_ambiguous(emulator):
    emulator.set_faults(latency=1.0)
    client = WecoClient(emulator.base_url, emulator.api_key, read_timeout=0.2)
    with client, pytest.raises(ApiTransient) as info:
        client.create_run({"source_code": CODE, "metric_name": "loss", "maximize": False})
    assert info.value.ambiguous and not api.is_unreachable(info.value)


def test_a_429_brings_its_retry_after_and_the_connection_stays_usable():
    answers = iter([response(429, {"detail": "slow down"}, headers=[("Retry-After", "7")])])

    def answer(req):
        return next(answers, None) or response(200, {"run_id": "r", "step": 1, "parent_step": 0})

    with HostileServer(answer) as server, WecoClient(server.base_url, "k") as client:
        with pytest.raises(ApiTransient) as info:
            client.log_step("5b7e0c1a-2222-4333-8444-555566667777", {"step": 1, "status": "completed"})
        assert info.value.status == 429 and info.value.retry_after == 7.0 and api.is_retryable(info.value)
        assert client.log_step("5b7e0c1a-2222-4333-8444-555566667777", {"step": 1, "status": "completed"})["step"] == 1


def test_more_requests_than_connections_wait_for_one(emulator):
    """``max_connections`` bounds the requests in flight, as httpx's own pool does."""
    emulator.set_faults(latency=0.2)
    body = {"source_code": CODE, "metric_name": "loss", "maximize": False}
    headers = {"Authorization": f"Bearer {emulator.api_key}"}
    transport = StdlibTransport(max_connections=2)
    with httpx.Client(base_url=emulator.base_url, headers=headers, transport=transport) as http:
        started = time.monotonic()
        threads = [threading.Thread(target=lambda: http.post("/external/runs", json=body)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        assert _connections(emulator) == 2
    assert emulator.stats()["created_runs"] == 4
    assert elapsed >= 0.4, "two rounds of two"
