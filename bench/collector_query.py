#!/usr/bin/env python3
"""Collector query benchmark: ingest N signed events into a SQLite collector through the
real ingest path (decode, verify signature + chain, store evidence + index), then time
"events on table X in a 10-minute window" and "who touched table X around T".

Prints a summary and, as its last line, `BENCH {json}`.
Usage: bench/collector_query.py [--events 200000] [--queries 200] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# run as a script, bench/ would come first on sys.path: import the project from the repo root instead
_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
sys.path.insert(0, str(_BENCH_DIR.parent))

from collector.ingest import ingest_batch  # noqa: E402
from collector.queries import list_events, list_sessions  # noqa: E402
from collector.simulate import SimulatedAgent  # noqa: E402
from collector.storage.engine import Store  # noqa: E402
from collector.storage.schema import agents  # noqa: E402

DAY_NS = 86400 * 10**9
START_NS = 1_714_521_600 * 10**9  # 2024-05-01T00:00:00Z


def load(store: Store, total: int, tables: list[str], batch_size: int, rng: random.Random) -> float:
    agent = SimulatedAgent("bench-agent", hostname="bench-host")
    with store.write() as connection:
        connection.execute(agents.insert().values(
            agent_id=agent.agent_id, public_key=bytes.fromhex(_public_hex(agent)), hostname=agent.hostname,
            enrolled_ns=time.time_ns(), last_seq=0, batches=0, events=0, chain_ok=True, problem_count=0))
    step = DAY_NS // total
    ts = START_NS
    ingest_s = 0.0  # only the collector's work, not producing and signing the batches
    produced = 0
    identities = [f"svc-{i}" for i in range(20)]
    while produced < total:
        events = []
        while len(events) < batch_size and produced < total:
            # Sessions of ~10 events: start, 4 x (statement, result), end.
            sid = f"s{produced:09d}"
            identity = rng.choice(identities)
            events.append(agent.event("session.start", {"identity": identity, "target": "crm", "protocol": "postgres",
                                                         "process": {"pid": 100 + produced % 5000, "exe": "/usr/bin/app"}},
                                      sid, ts))
            for _ in range(4):
                ts += step
                table = rng.choice(tables)
                events.append(agent.event("pg.statement", {"text": f"SELECT * FROM {table} WHERE id = $1",
                                                            "params": ["42"], "kind": "select", "tables": [table]},
                                          sid, ts))
                ts += step
                events.append(agent.event("pg.result", {"command_tag": "SELECT 1", "rows": 1}, sid, ts))
            ts += step
            events.append(agent.event("session.end", {}, sid, ts))
            ts += step
            produced += 10
        raw = agent.batch_bytes(events)
        started = time.perf_counter()
        ingest_batch(store, agent.agent_id, raw)
        ingest_s += time.perf_counter() - started
    return ingest_s


def _public_hex(agent: SimulatedAgent) -> str:
    from records.signing import public_key_bytes
    return public_key_bytes(agent.key).hex()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--tables", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--keep", metavar="DIR", help="keep the database in DIR")
    args = parser.parse_args()
    rng = random.Random(7)
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="warden-bench-collector-"))
    workdir.mkdir(parents=True, exist_ok=True)
    store = Store(f"sqlite:///{workdir / 'collector.db'}")
    try:
        store.migrate()
        tables = [f"public.table_{i}" for i in range(args.tables)]
        load_s = load(store, args.events, tables, args.batch_size, rng)
        with store.read() as connection:
            stored = connection.exec_driver_sql("SELECT count(*) FROM events").scalar_one()
        window_ms, around_ms, sessions_ms, rows_seen = [], [], [], []
        for _ in range(args.queries):
            table = rng.choice(tables)
            since = START_NS + rng.randrange(0, DAY_NS - 600 * 10**9)
            t0 = time.perf_counter()
            with store.read() as connection:
                page = list_events(connection, table=table, since=since, until=since + 600 * 10**9, limit=1000)
            window_ms.append((time.perf_counter() - t0) * 1000)
            rows_seen.append(len(page.items))
            at = START_NS + rng.randrange(0, DAY_NS)
            t0 = time.perf_counter()
            with store.read() as connection:
                list_events(connection, table=table.split(".")[1], since=at - 300 * 10**9, until=at + 300 * 10**9,
                            limit=100)
            around_ms.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            with store.read() as connection:
                list_sessions(connection, table=table, since=at - 300 * 10**9, until=at + 300 * 10**9, limit=100)
            sessions_ms.append((time.perf_counter() - t0) * 1000)
        result = {
            "backend": "sqlite", "events": stored, "ingest_s": round(load_s, 2),
            "ingest_events_per_s": round(stored / load_s),
            "table_window_10m_p50_ms": round(statistics.median(window_ms), 2),
            "table_window_10m_p95_ms": round(sorted(window_ms)[int(len(window_ms) * 0.95) - 1], 2),
            "rows_per_window_avg": round(statistics.mean(rows_seen), 1),
            "who_touched_unqualified_5m_p50_ms": round(statistics.median(around_ms), 2),
            "sessions_by_table_p50_ms": round(statistics.median(sessions_ms), 2),
            "queries": args.queries, "target_p50_ms": 1000,
        }
        print(f"ingested {stored} events: {load_s:.1f}s of collector time ({result['ingest_events_per_s']}/s: "
              f"decode, verify signature + chain, store evidence + index)")
        print(f"events on table X in a 10-minute window: median {result['table_window_10m_p50_ms']} ms "
              f"(p95 {result['table_window_10m_p95_ms']} ms, ~{result['rows_per_window_avg']} rows)")
        print(f"who touched table X (any schema) within ±5m: median {result['who_touched_unqualified_5m_p50_ms']} ms")
        print(f"sessions touching table X within ±5m: median {result['sessions_by_table_p50_ms']} ms")
        print("BENCH " + json.dumps(result, sort_keys=True))
        return 0
    finally:
        store.dispose()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
