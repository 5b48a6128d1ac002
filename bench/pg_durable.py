"""What durable_before_forward costs: pgbench -S through Warden with records batched (the
default: fsynced within spool.flush_interval) and with every statement held until its record is
fsynced (durable_before_forward: true), against direct, in interleaved rounds.

    python bench/pg_durable.py [--seconds 3] [--rounds 3]

Both Warden listeners record with the real RecordWriter into a spool on this machine's disk
(one each), with the Cedar policy of bench/pg_pgbench.py. Loopback only.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

from bench._recording import SpoolSink  # noqa: E402
from bench.pg_pgbench import bench_policy, run_pgbench  # noqa: E402
from tests.pg_harness import EnforcerThread, PostgresServer  # noqa: E402

PATHS = ("direct", "batched", "durable")
MODES = ("simple", "prepared")
CLIENTS = (1, 8)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    logdir = tempfile.mkdtemp(prefix="warden-durable-")
    os.chmod(logdir, 0o777)
    runs: dict = {}
    with PostgresServer(extra_conf={"max_connections": "60"}) as pg:
        env = dict(os.environ, PGPASSWORD="alice-pw")
        subprocess.run([pg.bin("pgbench"), "-h", pg.host, "-p", str(pg.port), "-U", "alice", "-i", "-s", "1",
                        "-q", "app"], check=True, capture_output=True, env=env, timeout=120)
        sinks = {"batched": SpoolSink(), "durable": SpoolSink()}
        wardens = {name: EnforcerThread((pg.host, pg.port), sink=sinks[name], policy=bench_policy(), use_uvloop=True,
                                        options={"durable_before_forward": name == "durable"}).start()
                   for name in sinks}
        paths = {"direct": (pg.host, pg.port), **{n: ("127.0.0.1", w.port) for n, w in wardens.items()}}
        try:
            for rnd in range(args.rounds):
                for mode in MODES:
                    for clients in CLIENTS:
                        for name in PATHS:
                            tps, med, _ = run_pgbench(pg, *paths[name], mode, clients, args.seconds, logdir)
                            runs.setdefault((mode, clients, name), []).append((tps, med))
                            print(f"  round {rnd + 1} {mode:8} c={clients} {name:8} tps={tps:9.0f} "
                                  f"median={med:7.0f} µs", flush=True)
        finally:
            for w in wardens.values():
                w.stop()
            for s in sinks.values():
                s.close()
    summary = {}
    print(f"\nmedians of {args.rounds} rounds x {args.seconds} s; added = median latency over direct")
    print(f"{'mode':9}{'c':>3}" + "".join(f"{n + ' tps':>14}" for n in PATHS)
          + f"{'batched +µs':>13}{'durable +µs':>13}{'durable/batched':>17}")
    for mode in MODES:
        for clients in CLIENTS:
            rows = {n: runs[(mode, clients, n)] for n in PATHS}
            tps = {n: statistics.median(r[0] for r in rows[n]) for n in PATHS}
            added = {n: statistics.median(a[1] - d[1] for a, d in zip(rows[n], rows["direct"]))
                     for n in ("batched", "durable")}
            ratio = tps["durable"] / tps["batched"]
            summary[f"{mode}/c{clients}"] = {"tps": {n: round(v, 1) for n, v in tps.items()},
                                             "added_latency_us": {n: round(v, 1) for n, v in added.items()},
                                             "durable_vs_batched": round(ratio, 3)}
            print(f"{mode:9}{clients:>3}" + "".join(f"{tps[n]:>14.0f}" for n in PATHS)
                  + f"{added['batched']:>13.0f}{added['durable']:>13.0f}{ratio:>17.2f}")
    print("BENCH " + json.dumps({"bench": "pg_durable", "seconds": args.seconds, "rounds": args.rounds,
                                 "results": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
