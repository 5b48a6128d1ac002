"""A shortened `make reliability` (the --quick scenarios), plus regression tests for what it found.

The quick scenarios run the real agent (BPF on a test cgroup), the real collector and a real
PostgreSQL; they skip without root/BPF/PostgreSQL unless WARDEN_REQUIRE_BPF=1.
spool_full and concurrent take about a minute each; they run here only with
WARDEN_RELIABILITY_SMOKE_ALL=1 (always in `make reliability`).
"""
from __future__ import annotations

import asyncio
import os
import socket
import threading

import pytest

from enforcer.postgres import protocol as P
from tests.pg_harness import postgres_available

FAST = ["collector_outage", "agent_kill9", "agent_kill9_durable", "agent_handover", "postgres_restart",
        "stalled_clients"]
SLOW = ["spool_full", "concurrent"]


def _needs_rig(bpf_required):
    if not postgres_available():
        pytest.skip("PostgreSQL 15 is not installed (make setup installs it)")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", FAST + SLOW)
def test_quick_scenario(name, bpf_required):
    if name in SLOW and os.environ.get("WARDEN_RELIABILITY_SMOKE_ALL") != "1":
        pytest.skip("about a minute: set WARDEN_RELIABILITY_SMOKE_ALL=1 (make reliability always runs it)")
    _needs_rig(bpf_required)
    from tests.reliability.scenarios import SCENARIOS
    result = SCENARIOS[name](True)
    assert result.error is None, result.error
    assert result.ok, (result.failures, result.notes)
    assert result.lost == 0 and result.duplicated == 0 and result.verify == "ok"
    assert result.stored > 0 and result.runs > 0


def test_runner_table_and_result_line(capsys):
    from tests.reliability.run import render, row
    from tests.reliability.scenarios import ScenarioResult
    good = ScenarioResult("x", runs=1, sessions=2, produced=10, stored=10, verify="ok")
    bad = ScenarioResult("y", runs=1, failures=["lost 1"])
    table = render([row(good, 1.0), row(bad, 2.0)])
    lines = table.splitlines()
    assert lines[0].split()[:9] == ["scenario", "runs", "sessions", "events", "stored", "spooled", "lost", "dup",
                                    "verify"]
    assert "PASS" in lines[2] and "FAIL" in lines[3]


# ---------------------------------------------------------------------------------------------
# Regression: the spool-full refusal must reach libpq clients using the default sslmode=prefer
# ---------------------------------------------------------------------------------------------
def _serve_refusal(refuse=None):
    """agent.daemon.refuse_unrecordable (or `refuse(reader, writer)`) on a loopback listener, on
    its own loop in a thread."""
    from agent.daemon import refuse_unrecordable
    refuse = refuse or (lambda r, w: refuse_unrecordable("postgres", r, w))
    ready = threading.Event()
    box = {}

    async def main():
        server = await asyncio.start_server(refuse, "127.0.0.1", 0)
        box["port"] = server.sockets[0].getsockname()[1]
        box["loop"] = asyncio.get_running_loop()
        box["stop"] = asyncio.Event()
        ready.set()
        async with server:
            await box["stop"].wait()

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    assert ready.wait(10)
    return box, thread


def _first_error(sock) -> dict:
    """Read until the refusing side closes; the fields of the first message (an ErrorResponse)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    msgs, _ = P.split_messages(data)
    return P.parse_error_fields(msgs[0][1])


def test_spool_full_refusal_reaches_sslmode_prefer_clients():
    """Bug fix: the 53100 refusal was written before the startup packet was read, so libpq
    (sslmode=prefer sends SSLRequest first) only showed 'error response during SSL exchange'."""
    box, thread = _serve_refusal()
    try:
        with socket.create_connection(("127.0.0.1", box["port"]), timeout=10) as s:
            s.sendall(P.build_ssl_request())
            answer = s.recv(1)
            # like PostgreSQL: answer SSLRequest with 'N', then refuse after the StartupMessage
            assert answer == b"N", f"SSLRequest answered with {answer!r}"
            s.sendall(P.build_startup_message({"user": "alice", "database": "app"}))
            fields = _first_error(s)
        assert fields["C"] == "53100" and "spool is full" in fields["M"]
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(10)


def test_spool_full_refusal_reaches_sslmode_disable_clients():
    box, thread = _serve_refusal()
    try:
        with socket.create_connection(("127.0.0.1", box["port"]), timeout=10) as s:
            s.sendall(P.build_startup_message({"user": "alice", "database": "app"}))
            fields = _first_error(s)
        assert fields["C"] == "53100" and fields["S"] == "FATAL" and "spool.max_bytes" in fields["M"]
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(10)


def test_connection_limit_refusal_in_each_protocol():
    """max_connections: Postgres clients get FATAL 53300 after their startup packet, HTTP clients
    a 503 with the reason, both before the connection closes."""
    import httpx

    from agent.daemon import refuse_connection
    message = "Warden refused this connection: target 'db' already has 2 connections open"
    for protocol in ("postgres", "http"):
        box, thread = _serve_refusal(lambda r, w, protocol=protocol: refuse_connection(protocol, r, w, "53300", message))
        try:
            if protocol == "postgres":
                with socket.create_connection(("127.0.0.1", box["port"]), timeout=10) as s:
                    s.sendall(P.build_startup_message({"user": "alice", "database": "app"}))
                    fields = _first_error(s)
                assert fields["C"] == "53300" and fields["S"] == "FATAL" and fields["M"] == message
            else:
                got = httpx.get(f"http://127.0.0.1:{box['port']}/x", timeout=10)
                assert got.status_code == 503 and got.json() == {"error": message}
                # an HTTPS workload gets no plaintext in the middle of its handshake: a clean close
                with pytest.raises(httpx.ConnectError, match="EOF|closed|reset"):
                    httpx.get(f"https://127.0.0.1:{box['port']}/x", timeout=10, verify=False)
        finally:
            box["loop"].call_soon_threadsafe(box["stop"].set)
            thread.join(10)


# ---------------------------------------------------------------------------------------------
# Regression: libpq's default sslmode=prefer through the agent (client TLS offered by the agent)
# ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_default_sslmode_connects_promptly_through_the_agent(bpf_required):
    """Regression guard: libpq's default sslmode=prefer through the agent (which offers client TLS)
    must connect promptly; stalls were seen while the enforcer was being edited under the agent."""
    _needs_rig(bpf_required)
    from tests.reliability import env as E
    from tests.reliability.scenarios import Rig
    scene = E.Scene("sslprefer")
    try:
        rig = Rig(scene)
        rig.start_agent()
        outcomes = []
        for _ in range(3):
            res = rig.cgroup.run([rig.pg.bin("psql"), "-h", rig.pg.host, "-p", str(rig.pg.port), "-U", "alice",
                                  "-d", "app", "-qAt", "-c", "SELECT 1"],
                                 env={**os.environ, "PGPASSWORD": "alice-pw", "PGSSLMODE": "prefer",
                                      "PGCONNECT_TIMEOUT": "8"}, timeout=30)
            outcomes.append((res.returncode, res.stdout.strip(), res.stderr.strip()[-120:]))
        assert all(code == 0 and out == "1" for code, out, _ in outcomes), outcomes
    finally:
        scene.close()
