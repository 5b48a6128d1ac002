#!/usr/bin/env python3
"""pgbench -S through: direct, a bare asyncio/uvloop byte relay, and Warden's serve_postgres.

Starts its own PostgreSQL 15 (tests/pg_harness.py), initialises pgbench (scale 1), then runs
pgbench -S in simple and prepared mode with 1 and 8 clients against each path. Warden runs
with an allow-all policy object (decide_sql) and records into an in-memory sink.
Prints a table of TPS and mean latency with ratios, then `BENCH {json}`.

    .venv/bin/python bench/pg_pgbench.py [--seconds 8]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import threading
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.pg_harness import EnforcerThread, PostgresServer  # noqa: E402


class AllowAll:
    """Policy object with the decide_sql interface that allows every statement."""

    _decision = SimpleNamespace(kind="allow", action="pg:select", policy_ids=("bench-allow",), reason="")

    def decide_sql(self, identity, identity_attrs, target, sql, approved=False):
        stmt = SimpleNamespace(action="pg:select", kind="select", tables=(), functions=(), has_where=None,
                               fingerprint="", text=sql, parse_error=None)
        return [SimpleNamespace(statement=stmt, decision=self._decision)]


class CountingSink:
    def __init__(self):
        self.count = 0
        self.events = []

    def emit(self, event_type, fields, session_id=None):
        self.count += 1
        if len(self.events) < 100000:
            self.events.append((event_type, fields, session_id))
        else:
            self.events.clear()


class ByteRelay:
    """The ceiling of any Python proxy: copy bytes both ways, nothing else (uvloop)."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.port = None
        self.loop = None
        self._thread = None

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

    def start(self):
        import uvloop
        ready = threading.Event()

        async def main():
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
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


def run_pgbench(pg, host, port, mode, clients, seconds):
    env = dict(os.environ, PGPASSWORD="alice-pw")
    cmd = [pg.bin("pgbench"), "-h", host, "-p", str(port), "-U", "alice", "-S", "-n", "-M", mode,
           "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds), "app"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + 60)
    if r.returncode != 0:
        raise RuntimeError(f"pgbench failed: {r.stderr.strip()}")
    tps = float(re.search(r"tps = ([0-9.]+)", r.stdout).group(1))
    lat = float(re.search(r"latency average = ([0-9.]+) ms", r.stdout).group(1))
    return tps, lat


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=8)
    args = ap.parse_args()
    results = {}
    with PostgresServer(extra_conf={"max_connections": "60"}) as pg:
        env = dict(os.environ, PGPASSWORD="alice-pw")
        subprocess.run([pg.bin("pgbench"), "-h", pg.host, "-p", str(pg.port), "-U", "alice", "-i", "-s", "1",
                        "-q", "app"], check=True, capture_output=True, env=env, timeout=120)
        relay = ByteRelay((pg.host, pg.port)).start()
        sink = CountingSink()
        warden = EnforcerThread((pg.host, pg.port), sink=sink, policy=AllowAll(), use_uvloop=True).start()
        paths = {"direct": (pg.host, pg.port), "relay": ("127.0.0.1", relay.port),
                 "warden": ("127.0.0.1", warden.port)}
        try:
            for mode in ("simple", "prepared"):
                for clients in (1, 8):
                    for name, (host, port) in paths.items():
                        tps, lat = run_pgbench(pg, host, port, mode, clients, args.seconds)
                        results[f"{mode}/c{clients}/{name}"] = {"tps": tps, "latency_ms": lat}
                        print(f"  {mode:8} c={clients} {name:7} tps={tps:10.1f} lat={lat:.3f} ms", flush=True)
        finally:
            warden.stop()
            relay.stop()
    print()
    print(f"{'mode':9}{'clients':>8}{'direct tps':>12}{'relay tps':>11}{'warden tps':>12}"
          f"{'w/relay':>9}{'w/direct':>10}{'added lat µs':>14}")
    summary = {}
    for mode in ("simple", "prepared"):
        for clients in (1, 8):
            d, r, w = (results[f"{mode}/c{clients}/{n}"] for n in ("direct", "relay", "warden"))
            ratio_relay = w["tps"] / r["tps"]
            ratio_direct = w["tps"] / d["tps"]
            added_us = (w["latency_ms"] - d["latency_ms"]) * 1000
            summary[f"{mode}/c{clients}"] = {"direct_tps": d["tps"], "relay_tps": r["tps"], "warden_tps": w["tps"],
                                             "warden_vs_relay": round(ratio_relay, 3),
                                             "warden_vs_direct": round(ratio_direct, 3),
                                             "added_latency_us": round(added_us, 1)}
            print(f"{mode:9}{clients:>8}{d['tps']:>12.0f}{r['tps']:>11.0f}{w['tps']:>12.0f}"
                  f"{ratio_relay:>9.2f}{ratio_direct:>10.2f}{added_us:>14.1f}")
    print(f"events recorded by Warden: {sink.count}")
    print("BENCH " + json.dumps({"bench": "pg_pgbench", "seconds": args.seconds, "results": summary,
                                 "events": sink.count}))


if __name__ == "__main__":
    main()
