"""HTTP enforcer throughput: wrk against a small server (nginx with one worker when installed, as
in the issue's measurements; else a canned asyncio server) directly, through a bare uvloop byte
relay (the Python ceiling), through Warden's serve_http with policy and recording on (the real
Cedar engine; records sealed by the real RecordWriter into a spool in a temp dir, or
`--sink memory` to see what recording costs), and
through mitmproxy in reverse-proxy mode when mitmdump is available; plus the time to mask a
1 MB JSON response with the real masking engine.

Loopback only: the server listens on 127.0.0.2, the relay, Warden and mitmproxy on 127.0.0.1.
Each component runs in its own process (this script with --role). Small JSON responses,
keep-alive, 32 connections by default; a few seconds per run.

    .venv/bin/python bench/http_proxy.py [--duration 3] [--rounds 5] [--connections 32] [--mitmdump PATH]

Needs wrk (Debian package `wrk`); nginx from `nginx-light` (on a systemd host the package
also starts a service on port 80: `systemctl disable --now nginx`). mitmproxy is not a Warden dependency: install it into a
separate venv (`python3 -m venv /tmp/mitm && /tmp/mitm/bin/pip install mitmproxy`) and pass
`--mitmdump /tmp/mitm/bin/mitmdump` (default: mitmdump on PATH, else not measured).
Each path is measured --rounds times, in turns; prints the medians of requests/s per path, the
medians of the per-round ratios, and a final `BENCH {json}` line. Targets: Warden
>= 0.5x the bare relay and >= 30x mitmproxy; masking 1 MB of JSON <= 20 ms.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

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


async def _run_role(role: str, listen_port: int, server_port: int, sink_kind: str = "memory") -> None:
    """sink_kind: "memory", or the directory the warden role's spool goes to."""
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
        from bench._recording import SpoolSink
        sink = SpoolSink(sink_kind) if sink_kind != "memory" else _MemorySink()
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


def _start(role: str, listen_port: int, server_port: int = 0, spool_dir: str = "") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--role", role, "--spool-dir", spool_dir,
                             "--listen-port", str(listen_port), "--server-port", str(server_port)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"{role} did not start")
    return proc


def _listening(proc: subprocess.Popen, name: str, host: str, port: int, timeout: float) -> subprocess.Popen:
    """`proc` once it accepts connections on host:port; killed, with the reason, if it does not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            detail = proc.stderr.read()[-500:] if proc.stderr is not None else ""
            raise RuntimeError(f"{name} exited with {proc.returncode} {detail}".strip())
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{name} did not listen on {host}:{port} within {timeout:g} s")


def _start_mitmdump(mitmdump: str, listen_port: int, server_port: int, confdir: str) -> subprocess.Popen:
    """mitmproxy as a reverse proxy in front of the same server (its state kept in confdir)."""
    proc = subprocess.Popen([mitmdump, "--mode", f"reverse:http://{SERVER_HOST}:{server_port}",
                             "--listen-host", PROXY_HOST, "--listen-port", str(listen_port),
                             "--set", f"confdir={confdir}", "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return _listening(proc, "mitmdump", PROXY_HOST, listen_port, 30)


_NGINX_CONF = """daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen {host}:{port};
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""


def _start_nginx(nginx: str, port: int, workdir: str) -> subprocess.Popen:
    """nginx (one worker, its files in workdir) answering every request with BODY."""
    conf = os.path.join(workdir, "nginx.conf")
    with open(conf, "w") as handle:
        handle.write(_NGINX_CONF.format(dir=workdir, host=SERVER_HOST, port=port, body=BODY.decode()))
    proc = subprocess.Popen([nginx, "-p", workdir, "-c", conf], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    return _listening(proc, "nginx", SERVER_HOST, port, 10)


def _masking_ms(size: int = 1024 * 1024, rounds: int = 7) -> tuple[float, int]:
    """Median time to mask a ~1 MB JSON response (the real engine, one json_key rule)."""
    from enforcer.masking.config import load_masking
    masker = load_masking({"rules": [{"json_key": "card", "strategy": "partial"}]}).for_session("bench", {}, "api")
    record = {"id": 0, "name": "customer", "card": "4111 1111 1111 1111", "email": "a@example.com",
              "tags": ["x", "y"], "address": {"city": "Springfield", "zip": "12345"}, "balance": 12.5}
    one = len(json.dumps(record)) + 2
    body = json.dumps([dict(record, id=i) for i in range(size // one)]).encode()
    times, masked_values = [], 0
    for _ in range(rounds):
        started = time.perf_counter()
        masked, counts = masker.mask_json_body(body, "application/json")
        times.append((time.perf_counter() - started) * 1000)
        masked_values = sum(v for v in counts.values() if isinstance(v, int))
    if b"4111 1111 1111 1111" in masked:
        raise RuntimeError("the masking benchmark's cards came back unmasked")
    return statistics.median(times), masked_values


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
    parser.add_argument("--server", choices=("nginx", "asyncio"), default="nginx",
                        help="what answers: nginx when installed (the issue's reference), else a "
                             "canned asyncio server (default nginx)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="measurements per path, taken in turns; medians are reported (default 5: "
                             "single runs swing by 15%% on a shared 2-core machine)")
    parser.add_argument("--mitmdump", default=shutil.which("mitmdump"),
                        help="mitmdump to compare with (default: on PATH; not measured without one)")
    parser.add_argument("--sink", choices=("spool", "memory"), default="spool",
                        help="where Warden records: the real writer and spool (default) or an in-memory counter")
    parser.add_argument("--role", choices=("server", "relay", "warden"), help=argparse.SUPPRESS)
    parser.add_argument("--spool-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--listen-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--server-port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        try:
            import uvloop
            uvloop.run(_run_role(args.role, args.listen_port, args.server_port, args.spool_dir or "memory"))
        except ImportError:
            asyncio.run(_run_role(args.role, args.listen_port, args.server_port, args.spool_dir or "memory"))
        return 0

    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install -y wrk); nothing measured", file=sys.stderr)
        print("BENCH " + json.dumps({"name": "http", "skipped": "wrk not installed"}))
        return 0
    server_port = _free_port(SERVER_HOST)
    nginx = shutil.which("nginx") if args.server == "nginx" else None
    if args.server == "nginx" and nginx is None:
        print("nginx is not installed (apt-get install nginx-light); the server is the canned "
              "asyncio one", file=sys.stderr)
    paths = [("direct", SERVER_HOST, server_port), ("relay", PROXY_HOST, _free_port(PROXY_HOST)),
             ("warden", PROXY_HOST, _free_port(PROXY_HOST))]
    procs = []
    confdir = tempfile.mkdtemp(prefix="warden-bench-mitm-")
    spool_dir = tempfile.mkdtemp(prefix="warden-bench-http-spool-")
    server_dir = tempfile.mkdtemp(prefix="warden-bench-nginx-")
    try:
        procs.append(_start_nginx(nginx, server_port, server_dir) if nginx else _start("server", server_port))
        print(f"   server: {'nginx (1 worker)' if nginx else 'canned asyncio server'} on {SERVER_HOST}", flush=True)
        procs.append(_start("relay", paths[1][2], server_port))
        procs.append(_start("warden", paths[2][2], server_port, spool_dir if args.sink == "spool" else ""))
        if args.mitmdump:
            mitm_port = _free_port(PROXY_HOST)
            try:
                procs.append(_start_mitmdump(args.mitmdump, mitm_port, server_port, confdir))
                paths.append(("mitmproxy", PROXY_HOST, mitm_port))
            except (OSError, RuntimeError) as exc:
                print(f"mitmproxy: not measured ({exc})", file=sys.stderr)
        # warm up each path (connections, policy caches), then measure in rounds that visit
        # every path in turn, so that a slow spell of this shared machine hits all of them
        for name, host, port in paths:
            _wrk(host, port, 1, args.connections)
        rounds: dict[str, list[float]] = {name: [] for name, _, _ in paths}
        for round_no in range(1, args.rounds + 1):
            for name, host, port in paths:
                rounds[name].append(_wrk(host, port, args.duration, args.connections))
            print(f"round {round_no}: " + "  ".join(f"{name} {rounds[name][-1]:.0f}" for name in rounds),
                  flush=True)
        results = {name: statistics.median(values) for name, values in rounds.items()}
        for name, value in results.items():
            print(f"{name:>9}: {value:>10.0f} requests/s (median of {args.rounds})", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(confdir, ignore_errors=True)
        shutil.rmtree(server_dir, ignore_errors=True)
        shutil.rmtree(spool_dir, ignore_errors=True)
    mask_ms, masked_values = _masking_ms()
    def ratio(path: str, other: str) -> float:
        # ratios within a round (measured seconds apart), then their median
        return statistics.median(a / b for a, b in zip(rounds[path], rounds[other]))

    ratio_relay = ratio("warden", "relay")
    ratio_direct = ratio("warden", "direct")
    print(f"warden / relay     = {ratio_relay:.2f}x (target >= 0.5x)")
    print(f"warden / direct    = {ratio_direct:.2f}x")
    summary = {
        "name": "http", "connections": args.connections, "duration_s": args.duration, "rounds": args.rounds,
        "direct_rps": round(results["direct"]), "relay_rps": round(results["relay"]),
        "warden_rps": round(results["warden"]), "warden_vs_relay": round(ratio_relay, 3),
        "warden_vs_direct": round(ratio_direct, 3), "target_vs_relay": 0.5,
        "policy": True, "recording": args.sink, "server": "nginx" if nginx else "asyncio"}
    if "mitmproxy" in results:
        ratio_mitm = ratio("warden", "mitmproxy")
        print(f"warden / mitmproxy = {ratio_mitm:.1f}x (target >= 30x)")
        summary.update(mitmproxy_rps=round(results["mitmproxy"]), warden_vs_mitmproxy=round(ratio_mitm, 1),
                       target_vs_mitmproxy=30)
    else:
        print("mitmproxy: not measured (no mitmdump; see --mitmdump)")
        summary["mitmproxy_rps"] = None
    print(f"masking 1 MB JSON  = {mask_ms:.1f} ms, {masked_values} values (target <= 20 ms)")
    summary.update(mask_1mb_json_ms=round(mask_ms, 2), mask_values=masked_values, target_mask_ms=20)
    print("BENCH " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
