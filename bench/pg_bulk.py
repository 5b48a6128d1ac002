#!/usr/bin/env python3
"""A 1,000,000-row SELECT: direct vs through Warden (no masking rules) vs Warden masking 2 columns.

Starts its own PostgreSQL 15 (tests/pg_harness.py) and fills an unlogged table with
1,000,000 rows `(g int, h text, e text)` (h = md5(g), e = an e-mail address), so the server
only scans and the proxy's per-row cost shows. Two clients read it:
  - `select`: psql running `SELECT g, h, e FROM bulk` (rows arrive as DataRow messages),
    output discarded;
  - `copy`:   psql running `COPY (SELECT g, h, e FROM bulk) TO STDOUT` (CopyData messages),
    output discarded — the fastest possible client, so the proxy's share is largest.
Paths: direct, Warden without masking (allow-all policy, recording on), and Warden with the real
masking engine (`load_masking(...).for_session(...)`) masking columns h (partial) and e (email).
Each run is repeated (interleaved) and the medians are reported: seconds, rows/s, MB/s and
ratios. Targets: Warden unmasked >= 0.7x direct; masked >= 0.5x unmasked. Last line `BENCH {json}`.

    .venv/bin/python bench/pg_bulk.py [--rows 1000000] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# keep bench/ off the front of sys.path so no bench module can shadow a stdlib one
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.append(_HERE)

from enforcer.masking.config import load_masking  # noqa: E402
from tests.pg_harness import EnforcerThread, PostgresServer  # noqa: E402

from pg_pgbench import CountingSink, bench_policy  # noqa: E402

MASKING = {
    "rules": [
        {"name": "bulk-partial", "column": "h", "strategy": "partial"},
        {"name": "bulk-email", "column": "e", "strategy": "email"},
    ],
}
QUERIES = {
    "select": "SELECT g, h, e FROM bulk",
    "copy": "COPY (SELECT g, h, e FROM bulk) TO STDOUT",
}
PATHS = ("direct", "warden", "warden_masked")


def run_psql(pg, host, port, sql):
    env = dict(os.environ, PGPASSWORD="alice-pw")
    cmd = [pg.bin("psql"), "-h", host, "-p", str(port), "-U", "alice", "-d", "app", "-X", "-q", "-At",
           "-v", "ON_ERROR_STOP=1", "-c", sql]
    started = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=600)
    elapsed = time.perf_counter() - started
    if r.returncode != 0:
        raise RuntimeError(f"psql failed: {r.stderr.decode(errors='replace').strip()}")
    return elapsed, r.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--masked-copy", action="store_true",
                    help="also time COPY TO STDOUT with masking (slow: the masking engine's COPY row path)")
    args = ap.parse_args()
    runs: dict = {}
    with PostgresServer() as pg:
        pg.psql_local("CREATE UNLOGGED TABLE bulk AS SELECT g, md5(g::text) AS h, "
                      f"'user' || g || '@example.com' AS e FROM generate_series(1, {args.rows}) g; "
                      "ALTER TABLE bulk OWNER TO alice", dbname="app")
        pg.psql_local("VACUUM ANALYZE bulk", dbname="app")
        masker = load_masking(MASKING).for_session("bench-svc", {}, "benchdb")
        assert masker is not None
        sink = CountingSink()
        plain = EnforcerThread((pg.host, pg.port), sink=sink, policy=bench_policy("bench-svc", "benchdb"), identity="bench-svc",
                               target_name="benchdb", use_uvloop=True).start()
        masked = EnforcerThread((pg.host, pg.port), sink=sink, policy=bench_policy("bench-svc", "benchdb"), masking=masker,
                                identity="bench-svc", target_name="benchdb", use_uvloop=True).start()
        paths = {"direct": (pg.host, pg.port), "warden": (plain.host, plain.port),
                 "warden_masked": (masked.host, masked.port)}
        sizes: dict = {}
        try:
            # warm-up (buffer cache, plans), and a check that masking really happens
            _, out = run_psql(pg, *paths["warden_masked"], QUERIES["select"] + " LIMIT 3")
            if b"@example.com" in out and b"user1@example.com" in out:
                raise RuntimeError(f"masking did not apply: {out[:200]!r}")
            for rnd in range(args.rounds):
                for client, sql in QUERIES.items():
                    for name in PATHS:
                        if client == "copy" and name == "warden_masked" and not args.masked_copy:
                            continue
                        secs, out = run_psql(pg, *paths[name], sql)
                        lines = out.count(b"\n")
                        if lines != args.rows:
                            raise RuntimeError(f"{name}/{client}: {lines} rows, expected {args.rows}")
                        sizes[(client, name)] = len(out)
                        runs.setdefault((client, name), []).append(secs)
                        print(f"  round {rnd + 1} {client:6} {name:13} {secs:6.3f} s "
                              f"{args.rows / secs:10.0f} rows/s", flush=True)
        finally:
            plain.stop()
            masked.stop()

    print()
    print(f"medians of {args.rounds} rounds, {args.rows} rows")
    print(f"{'client':8}{'path':15}{'seconds':>9}{'rows/s':>12}{'MB/s':>8}{'vs direct':>11}{'vs unmasked':>13}")
    summary = {}
    for client in QUERIES:
        names = [n for n in PATHS if (client, n) in runs]
        secs = {n: statistics.median(runs[(client, n)]) for n in names}
        row = {}
        for n in names:
            mb = sizes[(client, n)] / 1e6
            row[n] = {"seconds": round(secs[n], 3), "rows_per_s": round(args.rows / secs[n]),
                      "mb_per_s": round(mb / secs[n], 1)}
            vs_direct = secs["direct"] / secs[n]
            vs_plain = secs["warden"] / secs[n]
            print(f"{client:8}{n:15}{secs[n]:>9.3f}{args.rows / secs[n]:>12.0f}{mb / secs[n]:>8.1f}"
                  f"{vs_direct:>11.2f}{vs_plain:>13.2f}")
        row["warden_vs_direct"] = round(secs["direct"] / secs["warden"], 3)
        if "warden_masked" in secs:
            row["masked_vs_unmasked"] = round(secs["warden"] / secs["warden_masked"], 3)
            row["masked_vs_direct"] = round(secs["direct"] / secs["warden_masked"], 3)
        summary[client] = row
    met = {c: summary[c]["warden_vs_direct"] >= 0.7 and summary[c].get("masked_vs_unmasked", 1) >= 0.5
           for c in QUERIES}
    print(f"targets: warden >= 0.7x direct, masked >= 0.5x unmasked: {met}")
    print("BENCH " + json.dumps({"bench": "pg_bulk", "rows": args.rows, "rounds": args.rounds,
                                 "results": summary, "targets_met": met, "events": sink.count}))


if __name__ == "__main__":
    main()
