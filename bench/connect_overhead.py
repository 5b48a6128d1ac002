#!/usr/bin/env python3
"""connect() latency with Warden's BPF programs attached vs none, and attribution lookup cost.

Runs a client in a scratch cgroup (created and removed here) that connects to a local
listener many times; medians in microseconds. Loopback only; bounded loop counts.
"""
from __future__ import annotations

import ipaddress
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agent import cgroups  # noqa: E402
from agent.bpfmgr import BpfManager, TargetRule  # noqa: E402

N = int(os.environ.get("WARDEN_BENCH_CONNECTS", "3000"))

CLIENT = r"""
import json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
samples = []
for _ in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t0 = time.perf_counter_ns()
    s.connect((host, port))
    samples.append(time.perf_counter_ns() - t0)
    s.close()
print(json.dumps(samples))
"""


class Acceptor:
    def __init__(self, host: str, on_accept=None):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(4096)
        self.port = self.sock.getsockname()[1]
        self.on_accept = on_accept
        self.stop = False
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        self.sock.settimeout(0.2)
        while not self.stop:
            try:
                conn, peer = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            if self.on_accept:
                self.on_accept(peer)
            conn.close()

    def close(self):
        self.stop = True
        self.thread.join(timeout=2)
        self.sock.close()


def run_client(cg_path: str, host: str, port: int, n: int) -> list[int]:
    def enter():
        with open(os.path.join(cg_path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    out = subprocess.run([sys.executable, "-c", CLIENT, host, str(port), str(n)], preexec_fn=enter,
                         capture_output=True, text=True, timeout=300, check=True)
    samples = json.loads(out.stdout)
    return samples[n // 10:]          # drop warm-up


def median_us(samples: list[int]) -> float:
    return statistics.median(samples) / 1000


def main() -> int:
    mount = cgroups.cgroup2_mount()
    tag = uuid.uuid4().hex[:8]
    cg = cgroups.create(os.path.join(mount, f"warden-bench-{tag}"))
    # a sibling cgroup without our programs: baseline rounds interleave with measured ones, so
    # both see the same machine load
    bare = cgroups.create(os.path.join(mount, f"warden-bench-bare-{tag}"))
    plain = Acceptor("127.0.0.1")
    lookups: list[int] = []
    mgr = BpfManager([cg])
    peers: list[tuple] = []
    # the acceptor only collects peers; lookups are timed afterwards on one thread, so the
    # figure is the lookup itself and not GIL hand-offs between the bench's threads
    enforcer = Acceptor("127.0.0.1", on_accept=peers.append)
    baseline: list[int] = []
    attached: list[int] = []
    governed: list[int] = []
    rounds = 3
    try:
        mgr.load()
        mgr.set_targets([TargetRule(1, ipaddress.ip_network("127.0.0.2/32"), 5432, enforcer.port, "refuse")])
        mgr.attach()
        mgr.start_events(lambda kind, cap: None)
        for _ in range(rounds):
            baseline += run_client(bare, "127.0.0.1", plain.port, N // rounds)
            attached += run_client(cg, "127.0.0.1", plain.port, N // rounds)
            governed += run_client(cg, "127.0.0.2", 5432, N // rounds)
        time.sleep(0.3)
        for peer in list(peers):
            t0 = time.perf_counter_ns()
            cap = mgr.take_redirected(peer[0], peer[1])
            lookups.append(time.perf_counter_ns() - t0)
            assert cap is not None and cap.orig_port == 5432, "redirected connection without attribution"
    finally:
        mgr.detach()
        plain.close()
        enforcer.close()
        cgroups.remove(cg)
        cgroups.remove(bare)

    rows = [
        ("connect(), no programs", median_us(baseline)),
        ("connect(), programs attached (ungoverned)", median_us(attached)),
        ("connect(), governed + redirected", median_us(governed)),
        ("attribution lookup (map read + delete)", median_us(lookups[len(lookups) // 10:])),
    ]
    added = median_us(attached) - median_us(baseline)
    added_governed = median_us(governed) - median_us(baseline)
    print(f"{'measure':48} {'median µs':>10}")
    for name, value in rows:
        print(f"{name:48} {value:10.2f}")
    print(f"added per ungoverned connect: {added:.2f} µs (target <= 3)")
    print(f"added per governed connect:   {added_governed:.2f} µs")
    print("BENCH " + json.dumps({
        "bench": "connect_overhead", "connects": N,
        "baseline_us": round(median_us(baseline), 2), "attached_us": round(median_us(attached), 2),
        "governed_us": round(median_us(governed), 2), "added_us": round(added, 2),
        "added_governed_us": round(added_governed, 2),
        "attribution_lookup_us": round(rows[3][1], 2),
        "ratio_attached_vs_direct": round(median_us(attached) / median_us(baseline), 3),
        "targets": {"added_us": 3.0, "attribution_lookup_us": 20.0}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
