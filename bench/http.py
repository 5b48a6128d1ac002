"""HTTP enforcer throughput: wrk against a small server directly, through a bare uvloop byte
relay (the Python ceiling) and through Warden's serve_http with policy and recording on.

Loopback only: the server listens on 127.0.0.2, the relay and Warden on 127.0.0.1. Each
component runs in its own process (this script with --role). Small JSON responses,
keep-alive, 32 connections by default; a few seconds per run.

    .venv/bin/python bench/http.py [--duration 3] [--connections 32]

Needs wrk (Debian package `wrk`). Prints requests/s per path, the ratios, and a final
`BENCH {json}` line. Target: Warden >= 0.5x the bare relay.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SERVER_HOST, PROXY_HOST = "127.0.0.2", "127.0.0.1"
BODY = json.dumps({"id": 42, "name": "widget", "price": 9.5, "tags": ["a", "b"]}).encode()
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(BODY), BODY))
POLICY = """
@id("bench-read")
permit(principal == Service::"bench", action in Action::"http:read", resource in Target::"api");
"""


# -- roles (each runs in its own process) -------------------------------------------------

class _CannedServer(asyncio.Protocol):
    """Answers every complete request head with the same small JSON response (keep-alive)."""

    def connection_made(self, transport):
        self.transport = transport
        self.buffer = b""

    def data_received(self, data):
        buffer = self.buffer + data
        count = buffer.count(b"\r\n\r\n")
        if count:
            self.transport.write(RESPONSE * count)
            buffer = buffer[buffer.rfind(b"\r\n\r\n") + 4:]
        self.buffer = buffer


class _RelayUpstream(asyncio.Protocol):
    def __init__(self, client):
        self.client = client

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.client.transport.write(data)

    def connection_lost(self, exc):
        self.client.transport.close()


class _Relay(asyncio.Protocol):
    """The bare byte relay: no parsing, no records — what any Python proxy cannot beat."""

    def __init__(self, port):
        self.port = port
        self.upstream = None
        self.early = []

    def connection_made(self, transport):
        self.transport = transport
        asyncio.ensure_future(self._connect())

    async def _connect(self):
        loop = asyncio.get_running_loop()
        _, self.upstream = await loop.create_connection(lambda: _RelayUpstream(self), SERVER_HOST, self.port)
        for data in self.early:
            self.upstream.transport.write(data)

    def data_received(self, data):
        if self.upstream is None:
            self.early.append(data)
        else:
            self.upstream.transport.write(data)

    def connection_lost(self, exc):
        if self.upstream is not None:
            self.upstream.transport.close()


class _MemorySink:
    def __init__(self):
        self.count = 0
        self.last = None

    def emit(self, event_type, fields, session_id=None):
        # what a real sink must at least do: keep the event
        self.count += 1
        self.last = (event_type, fields, session_id)


async def _run_role(role: str, listen_port: int, server_port: int) -> None:
    loop = asyncio.get_running_loop()
    if role == "server":
        server = await loop.create_server(_CannedServer, SERVER_HOST, listen_port, backlog=1024)
    elif role == "relay":
        server = await loop.create_server(lambda: _Relay(server_port), PROXY_HOST, listen_port, backlog=1024)
    else:
        from enforcer.context import ConnectionContext, TargetInfo
        from enforcer.http.proxy import serve_http
        from enforcer.policy.engine import PolicyEngine
        policy = PolicyEngine.from_text(POLICY)
        sink = _MemorySink()
        target = TargetInfo("api", "http", SERVER_HOST, server_port)
        sessions = [0]

        async def handle(reader, writer):
            sessions[0] += 1
            ctx = ConnectionContext(f"bench-{sessions[0]}", "bench", {"unit": "bench.service"}, target,
                                    None, sink, policy=policy)
            await serve_http(reader, writer, ctx)

        server = await asyncio.start_server(handle, PROXY_HOST, listen_port, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


# -- driver ---------------------------------------------------------------------------------

def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _start(role: str, listen_port: int, server_port: int = 0) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--role", role,
                             "--listen-port", str(listen_port), "--server-port", str(server_port)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"{role} did not start")
    return proc


def _wrk(host: str, port: int, duration: float, connections: int) -> float:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
                          f"http://{host}:{port}/item"],
                         capture_output=True, text=True, timeout=duration + 30).stdout
    match = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if match is None or errors:
        raise RuntimeError(f"wrk failed or saw errors:\n{out}")
    return float(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run (default 3)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--role", choices=("server", "relay", "warden"), help=argparse.SUPPRESS)
    parser.add_argument("--listen-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--server-port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        try:
            import uvloop
            uvloop.run(_run_role(args.role, args.listen_port, args.server_port))
        except ImportError:
            asyncio.run(_run_role(args.role, args.listen_port, args.server_port))
        return 0

    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install -y wrk); nothing measured", file=sys.stderr)
        print("BENCH " + json.dumps({"name": "http", "skipped": "wrk not installed"}))
        return 0
    server_port = _free_port(SERVER_HOST)
    relay_port = _free_port(PROXY_HOST)
    warden_port = _free_port(PROXY_HOST)
    procs = []
    try:
        procs.append(_start("server", server_port))
        procs.append(_start("relay", relay_port, server_port))
        procs.append(_start("warden", warden_port, server_port))
        # warm up each path (connections, policy caches), then measure
        results = {}
        for name, host, port in (("direct", SERVER_HOST, server_port), ("relay", PROXY_HOST, relay_port),
                                 ("warden", PROXY_HOST, warden_port)):
            _wrk(host, port, 1, args.connections)
            results[name] = _wrk(host, port, args.duration, args.connections)
            print(f"{name:>8}: {results[name]:>10.0f} requests/s", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
    ratio_relay = results["warden"] / results["relay"]
    ratio_direct = results["warden"] / results["direct"]
    print(f"warden / relay  = {ratio_relay:.2f}x (target >= 0.5x)")
    print(f"warden / direct = {ratio_direct:.2f}x")
    print("mitmproxy: not measured (not installed here)")
    print("BENCH " + json.dumps({
        "name": "http", "connections": args.connections, "duration_s": args.duration,
        "direct_rps": round(results["direct"]), "relay_rps": round(results["relay"]),
        "warden_rps": round(results["warden"]), "warden_vs_relay": round(ratio_relay, 3),
        "warden_vs_direct": round(ratio_direct, 3), "target_vs_relay": 0.5,
        "policy": True, "recording": "memory"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
