#!/usr/bin/env python3
"""pgbench -S through: direct, pgbouncer, two bare uvloop byte relays, and Warden's serve_postgres.

Starts its own PostgreSQL 15 (tests/pg_harness.py), initialises pgbench (scale 1), starts
pgbouncer (session pooling, its own ini in a temp dir on 127.0.0.1), then runs pgbench -S in
simple and prepared mode with 1 and 8 clients against each path. Warden runs as deployed:
the real Cedar policy engine (a permit for the bench identity on the pgbench tables, so
every new statement text is classified by pglast and decided) and the real RecordWriter
(chained, signed, zstd batches appended to a durable spool in a temp dir, on its
background thread in the same process). `--sink memory` swaps the writer for an
in-memory counter, to show what recording itself costs.

Two bare relays bound what a Python proxy can reach here: `relay` copies bytes with asyncio
streams (a reader and a writer per leg, as most Python proxies are written), `relay-proto`
with asyncio.Protocol callbacks and no tasks, as Warden's shell does after the startup. The
issue's target is stated against the first; the second is the stricter ceiling and is
reported beside it.

The machine is small and shared, so every configuration is run in several interleaved
rounds and the medians are reported: TPS, median per-transaction latency (from pgbench's
per-transaction log), the latency each path adds over direct (and Warden over the relay) as
the median of per-round differences, ratios, and the proxy's own CPU time per transaction
(a steadier signal than TPS when other work competes for the cores). The last line is
`BENCH {json}`.

    .venv/bin/python bench/pg_pgbench.py [--seconds 3] [--rounds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import glob
import json
import os
import pwd
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

# keep bench/ off the front of sys.path so no bench module can shadow a stdlib one
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

from bench._recording import SpoolSink  # noqa: E402
from tests.pg_harness import EnforcerThread, PostgresServer, free_port  # noqa: E402

PATHS = ("direct", "pgbouncer", "relay", "relay-proto", "warden")
PROXIES = ("pgbouncer", "relay", "relay-proto", "warden")
MODES = ("simple", "prepared")
CLIENTS = (1, 8)


BENCH_POLICY = """
@id("bench-connect")
permit (principal == Service::"IDENTITY", action == Action::"pg:connect", resource == Target::"TARGET");
@id("bench-reads")
permit (principal == Service::"IDENTITY", action == Action::"pg:select", resource in Target::"TARGET");
@id("bench-copy-out")
permit (principal == Service::"IDENTITY", action == Action::"pg:copy_out", resource in Target::"TARGET");
@id("bench-housekeeping")
permit (principal == Service::"IDENTITY", action == Action::"pg:other", resource)
when { ["TransactionStmt", "VariableSetStmt", "VariableShowStmt"].contains(context.statement_kind) };
"""


def bench_policy(identity: str = "test-svc", target: str = "testdb"):
    """The real Cedar engine with reads allowed for `identity` on `target`."""
    from enforcer.policy.engine import PolicyEngine
    text = BENCH_POLICY.replace("IDENTITY", identity).replace("TARGET", target)
    return PolicyEngine.from_text(text, source="bench-policy")


class CountingSink:
    """Records into memory like a writer's queue that a background thread keeps draining: counts
    every event and keeps the latest ones (retaining all of them would only measure the garbage
    collector walking an ever-growing list)."""

    def __init__(self, keep: int = 2000):
        self.count = 0
        self.events = collections.deque(maxlen=keep)

    def emit(self, event_type, fields, session_id=None):
        self.count += 1
        self.events.append((event_type, fields, session_id))

    def close(self):
        pass


class _RelayThread:
    """A relay listening on 127.0.0.1 on its own uvloop in a background thread; start() returns
    once it listens, stop() cancels everything on its loop."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.port = None
        self.loop = None
        self._thread = None

    async def _listen(self):
        raise NotImplementedError

    def start(self):
        import uvloop
        ready = threading.Event()

        async def main():
            server = await self._listen()
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            async with server:
                await server.serve_forever()

        def run():
            self.loop = uvloop.new_event_loop()
            try:
                self.loop.run_until_complete(main())
            except BaseException:
                pass

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self):
        if self.loop:
            self.loop.call_soon_threadsafe(lambda: [t.cancel() for t in asyncio.all_tasks(self.loop)])
        if self._thread:
            self._thread.join(10)


class ByteRelay(_RelayThread):
    """The ceiling most Python proxies have: asyncio streams copying bytes both ways, nothing else."""

    async def _pipe(self, reader, writer):
        try:
            while True:
                data = await reader.read(256 * 1024)
                if not data:
                    break
                writer.write(data)
                if writer.transport.get_write_buffer_size() > 512 * 1024:
                    await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, creader, cwriter):
        sreader, swriter = await asyncio.open_connection(*self.upstream)
        await asyncio.gather(self._pipe(creader, swriter), self._pipe(sreader, cwriter))

    async def _listen(self):
        return await asyncio.start_server(self._handle, "127.0.0.1", 0)


class _RelayLeg(asyncio.Protocol):
    """One side of ProtocolRelay: what it reads is written to its peer from the callback."""

    def __init__(self):
        self.transport = None
        self.peer = None
        self.early = []          # bytes read before the peer leg exists (pause_reading may come late)

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if self.peer is None:
            self.early.append(data)
        else:
            self.peer.transport.write(data)

    def eof_received(self):
        if self.peer is not None:
            self.peer.transport.close()
        return False

    def connection_lost(self, exc):
        if self.peer is not None:
            self.peer.transport.close()

    def pause_writing(self):
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self):
        if self.peer is not None:
            self.peer.transport.resume_reading()


class ProtocolRelay(_RelayThread):
    """A bare relay on asyncio.Protocol callbacks with no tasks, as Warden's shell after the
    startup: the stricter ceiling, with the transports' flow control between the legs."""

    def _client_leg(self):
        upstream = self.upstream

        class ClientLeg(_RelayLeg):
            def connection_made(self, transport):
                super().connection_made(transport)
                transport.pause_reading()          # until the upstream leg exists
                asyncio.get_running_loop().create_task(self._connect())

            async def _connect(self):
                try:
                    _, server = await asyncio.get_running_loop().create_connection(_RelayLeg, *upstream)
                except OSError:
                    self.transport.close()
                    return
                server.peer, self.peer = self, server
                server.transport.writelines(self.early)
                self.early = []
                self.transport.resume_reading()

        return ClientLeg()

    async def _listen(self):
        return await asyncio.get_running_loop().create_server(self._client_leg, "127.0.0.1", 0)


class PgBouncer:
    """pgbouncer (Debian package) in front of the test server: session pooling, SCRAM for clients,
    its own ini and auth file in a temp dir; runs as the `postgres` user (it refuses root)."""

    def __init__(self, upstream_host: str, upstream_port: int, binary: str = ""):
        self.binary = binary or shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self.dir = None
        self.proc = None

    def start(self) -> "PgBouncer":
        if not os.path.exists(self.binary):
            raise RuntimeError("pgbouncer not found: install the Debian package (apt-get install -y pgbouncer)")
        self.dir = tempfile.mkdtemp(prefix="warden-pgbouncer-")
        ini = os.path.join(self.dir, "pgbouncer.ini")
        users = os.path.join(self.dir, "userlist.txt")
        with open(users, "w") as f:
            f.write('"alice" "alice-pw"\n')
        with open(ini, "w") as f:
            f.write(f"""[databases]
app = host={self.upstream[0]} port={self.upstream[1]} dbname=app

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {users}
pool_mode = session
max_client_conn = 100
default_pool_size = 20
logfile = {os.path.join(self.dir, "pgbouncer.log")}
pidfile =
log_connections = 0
log_disconnections = 0
""")
        kw = {}
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            for p in (self.dir, ini, users):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            kw = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        # started directly (no shell, no daemon mode) so self.proc.pid is pgbouncer itself
        self.proc = subprocess.Popen([self.binary, ini], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     cwd=self.dir, **kw)
        deadline = time.monotonic() + 10
        import socket
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited: {self.proc.stderr.read().decode(errors='replace')}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("pgbouncer did not start listening within 10 s")

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def _own_cpu_seconds() -> float:
    # this process hosts only the relay's and Warden's event loops (pgbench runs as a child)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_pgbench(pg, host, port, mode, clients, seconds, logdir):
    env = dict(os.environ, PGPASSWORD="alice-pw")
    for old in glob.glob(os.path.join(logdir, "tx*")):
        os.unlink(old)
    cmd = [pg.bin("pgbench"), "-h", host, "-p", str(port), "-U", "alice", "-S", "-n", "-M", mode,
           "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds),
           "-l", "--log-prefix", os.path.join(logdir, "tx"), "app"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + 60, cwd=logdir)
    if r.returncode != 0:
        raise RuntimeError(f"pgbench failed: {r.stderr.strip()}")
    tps = float(re.search(r"tps = ([0-9.]+)", r.stdout).group(1))
    txs = int(re.search(r"number of transactions actually processed: (\d+)", r.stdout).group(1))
    lat_us = []
    for path in glob.glob(os.path.join(logdir, "tx*")):
        with open(path) as f:
            for line in f:
                parts = line.split(None, 3)
                if len(parts) >= 3:
                    lat_us.append(int(parts[2]))
    median_us = statistics.median(lat_us) if lat_us else float("nan")
    return tps, median_us, txs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=3, help="length of one pgbench run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians are reported")
    ap.add_argument("--sink", choices=("spool", "memory"), default="spool",
                    help="where Warden records: the real writer and spool (default) or an in-memory counter")
    ap.add_argument("--clients", default=",".join(map(str, CLIENTS)),
                    help="comma-separated client counts (default 1,8); e.g. --clients 1 --rounds 9 for a "
                         "steadier 1-client latency figure")
    args = ap.parse_args()
    clients_list = tuple(int(c) for c in args.clients.split(","))
    runs: dict = {}
    logdir = tempfile.mkdtemp(prefix="warden-pgbench-")
    os.chmod(logdir, 0o777)
    with PostgresServer(extra_conf={"max_connections": "60"}) as pg:
        env = dict(os.environ, PGPASSWORD="alice-pw")
        subprocess.run([pg.bin("pgbench"), "-h", pg.host, "-p", str(pg.port), "-U", "alice", "-i", "-s", "1",
                        "-q", "app"], check=True, capture_output=True, env=env, timeout=120)
        relay = ByteRelay((pg.host, pg.port)).start()
        proto_relay = ProtocolRelay((pg.host, pg.port)).start()
        sink = SpoolSink() if args.sink == "spool" else CountingSink()
        warden = EnforcerThread((pg.host, pg.port), sink=sink, policy=bench_policy(), use_uvloop=True).start()
        bouncer = PgBouncer(pg.host, pg.port).start()
        paths = {"direct": (pg.host, pg.port), "pgbouncer": ("127.0.0.1", bouncer.port),
                 "relay": ("127.0.0.1", relay.port), "relay-proto": ("127.0.0.1", proto_relay.port),
                 "warden": ("127.0.0.1", warden.port)}
        cpu_of = {"relay": _own_cpu_seconds, "relay-proto": _own_cpu_seconds, "warden": _own_cpu_seconds,
                  "pgbouncer": bouncer.cpu_seconds}
        try:
            for rnd in range(args.rounds):
                for mode in MODES:
                    for clients in clients_list:
                        for name in PATHS:
                            host, port = paths[name]
                            cpu0 = cpu_of[name]() if name in cpu_of else 0.0
                            tps, med, txs = run_pgbench(pg, host, port, mode, clients, args.seconds, logdir)
                            cpu_us = ((cpu_of[name]() - cpu0) * 1e6 / txs) if name in cpu_of and txs else None
                            runs.setdefault((mode, clients, name), []).append((tps, med, cpu_us))
                            print(f"  round {rnd + 1} {mode:8} c={clients} {name:11} tps={tps:9.0f} "
                                  f"median={med:7.0f} µs" + (f" proxy cpu={cpu_us:5.1f} µs/tx" if cpu_us else ""),
                                  flush=True)
        finally:
            warden.stop()
            sink.close()
            relay.stop()
            proto_relay.stop()
            bouncer.stop()
            shutil.rmtree(logdir, ignore_errors=True)

    def med(mode, clients, name, i):
        vals = [r[i] for r in runs[(mode, clients, name)] if r[i] is not None]
        return statistics.median(vals) if vals else None

    def added(mode, clients, name, base="direct"):
        # Latency a path adds over `base`, taken within each round (the two runs are seconds
        # apart, so the machine's drift between rounds cancels) and then the median.
        pairs = zip(runs[(mode, clients, name)], runs[(mode, clients, base)])
        return statistics.median(a[1] - b[1] for a, b in pairs)

    def num(v, width, digits=0):
        return f"{v:>{width}.{digits}f}" if v is not None else f"{'-':>{width}}"

    summary = {}
    for mode in MODES:
        for clients in clients_list:
            tps = {n: med(mode, clients, n, 0) for n in PATHS}
            lat = {n: med(mode, clients, n, 1) for n in PATHS}
            cpu = {n: med(mode, clients, n, 2) for n in PROXIES}
            summary[f"{mode}/c{clients}"] = {
                "tps": {n: round(v, 1) for n, v in tps.items()},
                "median_latency_us": {n: round(v, 1) for n, v in lat.items()},
                "added_latency_us": {n: round(added(mode, clients, n), 1) for n in PROXIES},
                "proxy_cpu_us_per_tx": {n: (round(v, 1) if v is not None else None) for n, v in cpu.items()},
                "warden_vs_relay": round(tps["warden"] / tps["relay"], 3),
                "warden_vs_relay_proto": round(tps["warden"] / tps["relay-proto"], 3),
                "warden_vs_direct": round(tps["warden"] / tps["direct"], 3),
                "warden_vs_pgbouncer": round(tps["warden"] / tps["pgbouncer"], 3),
                "relay_vs_direct": round(tps["relay"] / tps["direct"], 3),
                "relay_proto_vs_direct": round(tps["relay-proto"] / tps["direct"], 3),
                "pgbouncer_vs_direct": round(tps["pgbouncer"] / tps["direct"], 3),
                "warden_added_latency_us": round(added(mode, clients, "warden"), 1),
                "warden_over_relay_latency_us": round(added(mode, clients, "warden", "relay"), 1),
                "warden_over_relay_proto_latency_us": round(added(mode, clients, "warden", "relay-proto"), 1),
                # the 30 µs budget was set where pgbouncer added about 14 µs: what Warden
                # adds beyond pgbouncer in the same rounds is the part of it that does not move
                # with the machine (16 µs there)
                "warden_over_pgbouncer_latency_us": round(added(mode, clients, "warden", "pgbouncer"), 1),
            }

    print()
    print(f"medians of {args.rounds} rounds x {args.seconds} s")
    print("throughput (tx/s) and Warden's ratios")
    print(f"{'mode':9}{'c':>3}" + "".join(f"{n:>13}" for n in PATHS)
          + f"{'w/relay':>9}{'w/proto':>9}{'w/direct':>10}{'w/bouncer':>11}")
    for key, row in summary.items():
        mode, clients = key.split("/c")
        print(f"{mode:9}{clients:>3}" + "".join(num(row["tps"][n], 13) for n in PATHS)
              + f"{row['warden_vs_relay']:>9.2f}{row['warden_vs_relay_proto']:>9.2f}"
              + f"{row['warden_vs_direct']:>10.2f}{row['warden_vs_pgbouncer']:>11.2f}")
    print("latency: median µs per transaction; added over direct (median of per-round differences);"
          " proxy CPU µs per transaction")
    print(f"{'mode':9}{'c':>3}{'direct':>8}" + "".join(f"{n:>13}" for n in PROXIES)
          + f"{'w-relay':>9}{'w-proto':>9}{'w-bouncer':>11}" + "".join(f"{'cpu ' + n:>17}" for n in PROXIES))
    for key, row in summary.items():
        mode, clients = key.split("/c")
        print(f"{mode:9}{clients:>3}{row['median_latency_us']['direct']:>8.0f}"
              + "".join(f"{row['median_latency_us'][n]:>7.0f} +{row['added_latency_us'][n]:<4.0f}" for n in PROXIES)
              + f"{row['warden_over_relay_latency_us']:>9.0f}{row['warden_over_relay_proto_latency_us']:>9.0f}"
              + f"{row['warden_over_pgbouncer_latency_us']:>11.0f}"
              + "".join(num(row["proxy_cpu_us_per_tx"][n], 17, 1) for n in PROXIES))
    def meets(key, check):
        # None where that client count was not run
        return check(summary[key]) if key in summary else None

    targets = {
        "warden_vs_relay_c8_min": 0.9,
        "warden_added_latency_c1_max_us": 30,
        "met": {k: {"c8_vs_relay": meets(f"{k}/c8", lambda r: r["warden_vs_relay"] >= 0.9),
                    "c1_added_latency": meets(f"{k}/c1", lambda r: r["warden_added_latency_us"] <= 30)}
                for k in MODES},
    }
    print(f"targets: warden >= 0.9x relay at 8 clients, <= 30 µs added median latency at 1 client: {targets['met']}"
          f" (against relay-proto at 8 clients: "
          f"{ {k: meets(f'{k}/c8', lambda r: r['warden_vs_relay_proto'] >= 0.9) for k in MODES} })")
    print(f"events recorded by Warden: {sink.count} (sink: {args.sink}; policy: Cedar engine)")
    print("BENCH " + json.dumps({"bench": "pg_pgbench", "seconds": args.seconds, "rounds": args.rounds,
                                 "sink": args.sink, "policy": "cedar",
                                 "results": summary, "targets": targets, "events": sink.count}))


if __name__ == "__main__":
    main()
