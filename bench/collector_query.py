#!/usr/bin/env python3
"""Collector query benchmark at the issue's size: load N signed events through the real
ingest path (collector.ingest.ingest_batch with its worker processes: decode, every
event's hash, Ed25519 signature + chain check, index rows, evidence + index committed),
then time "events on table X in a 10-minute window" (the target: p50 <= 50 ms),
"who touched table X (any schema) within +-5m" and "sessions touching table X".

Batches are produced first by writer-side code (records.batch.BatchBuilder, the agent's
fast path) in parallel processes; that is not counted. Event density is ~1,000,000 per
day as in bench/collector.py, so a window holds the same rows at any size (10M = 10 days).
SQLite by default; --backends sqlite,postgresql also runs a real PostgreSQL (started
here with tests/pg_harness.PostgresServer, fsync and synchronous_commit on).

Prints a summary and, as its last line, `BENCH {json}`.
Usage: bench/collector_query.py [--events 10000000] [--backends sqlite,postgresql] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# run as a script, bench/ would come first on sys.path: import the project from the repo root instead
_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
sys.path.insert(0, str(_BENCH_DIR.parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from collector.ingest import ingest_batch, shutdown_ingest_workers, start_ingest_workers  # noqa: E402
from collector.queries import list_events, list_sessions  # noqa: E402
from collector.storage.engine import Store  # noqa: E402
from collector.storage.schema import agents  # noqa: E402
from records.batch import BatchBuilder  # noqa: E402
from records.codec import GENESIS_HASH  # noqa: E402
from records.signing import public_key_bytes  # noqa: E402

from bench.collector import (DAY_NS, EVENTS_PER_DAY, POSTGRES_SETTINGS, POSTGRES_SKIPPED,  # noqa: E402
                             START_NS, WINDOW_NS, durable_postgres, percentile, timed_window_query)

IDENTITIES = [f"svc-{i}" for i in range(20)]


def produce_agent(job: tuple) -> tuple[str, bytes, list[bytes]]:
    """One agent's signed batches: sessions of 10 events (start, 4 x (statement, result),
    end), its events spread evenly over the span, interleaved in time with other agents."""
    index, agents_total, count, tables, batch_size, span_ns, seed = job
    rng = random.Random(seed)
    agent_id, key = f"bench-agent-{index}", Ed25519PrivateKey.generate()
    step = span_ns // (count * agents_total)
    ts = START_NS + index * step
    raws: list[bytes] = []
    builder = BatchBuilder(agent_id, GENESIS_HASH, 1)
    produced = session = 0
    while produced < count:
        sid = f"{agent_id}-s{session:08d}"
        session += 1
        builder.add(ts, sid, "session.start", {
            "identity": rng.choice(IDENTITIES), "target": "crm", "protocol": "postgres",
            "process": {"pid": 100 + session % 5000, "exe": "/usr/bin/app"}})
        for _ in range(4):
            ts += step * agents_total
            table = rng.choice(tables)
            builder.add(ts, sid, "pg.statement", {"text": f"SELECT * FROM {table} WHERE id = $1", "params": ["42"],
                                                  "kind": "select", "tables": [table]})
            ts += step * agents_total
            builder.add(ts, sid, "pg.result", {"command_tag": "SELECT 1", "rows": 1})
        ts += step * agents_total
        builder.add(ts, sid, "session.end", {})
        ts += step * agents_total
        produced += 10
        if builder.count >= batch_size or produced >= count:
            raws.append(builder.finish(key))
            builder = BatchBuilder(agent_id, builder.last_hash, builder.last_seq + 1)
    return agent_id, public_key_bytes(key), raws


def produce(total: int, agent_count: int, tables: list[str], batch_size: int, span_ns: int) -> list:
    per_agent = -(-total // agent_count)
    per_agent += -per_agent % 10
    jobs = [(i, agent_count, per_agent, tables, batch_size, span_ns, 7 + i) for i in range(agent_count)]
    with ProcessPoolExecutor(min(agent_count, os.cpu_count() or 1)) as pool:
        return list(pool.map(produce_agent, jobs))


def load(store: Store, produced) -> float:
    """Ingest every batch, one thread per agent (as the API's thread pool would); wall seconds."""
    with store.write() as connection:
        for agent_id, public_key, _ in produced:
            connection.execute(agents.insert().values(
                agent_id=agent_id, public_key=public_key, hostname="bench-host", enrolled_ns=time.time_ns(),
                last_seq=0, batches=0, events=0, chain_ok=True, problem_count=0))
    errors: list = []

    def one_agent(agent_id, raws):
        try:
            for raw in raws:
                if ingest_batch(store, agent_id, raw).problems:
                    raise RuntimeError("unexpected chain problems")
        except Exception as exc:  # reported after the run
            errors.append(exc)

    start_ingest_workers()
    threads = [threading.Thread(target=one_agent, args=(agent_id, raws)) for agent_id, _, raws in produced]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    shutdown_ingest_workers()
    if errors:
        raise errors[0]
    return elapsed


def measure(store: Store, tables: list[str], span_ns: int, queries: int, rng: random.Random) -> dict:
    window_ms, around_ms, sessions_ms, rows_seen = [], [], [], []
    for _ in range(queries):
        ms, rows = timed_window_query(store, tables, span_ns, rng)
        window_ms.append(ms)
        rows_seen.append(rows)
        table = rng.choice(tables)
        at = START_NS + rng.randrange(0, span_ns)
        t0 = time.perf_counter()
        with store.read() as connection:
            list_events(connection, table=table.split(".")[1], since=at - WINDOW_NS // 2, until=at + WINDOW_NS // 2,
                        limit=100)
        around_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        with store.read() as connection:
            list_sessions(connection, table=table, since=at - WINDOW_NS // 2, until=at + WINDOW_NS // 2, limit=100)
        sessions_ms.append((time.perf_counter() - t0) * 1000)
    return {"table_window_10m_p50_ms": round(statistics.median(window_ms), 2),
            "table_window_10m_p95_ms": percentile(window_ms, 0.95),
            "rows_per_window_avg": round(statistics.mean(rows_seen), 1),
            "who_touched_unqualified_10m_p50_ms": round(statistics.median(around_ms), 2),
            "who_touched_unqualified_10m_p95_ms": percentile(around_ms, 0.95),
            "sessions_by_table_10m_p50_ms": round(statistics.median(sessions_ms), 2),
            "sessions_by_table_10m_p95_ms": percentile(sessions_ms, 0.95)}


def run_backend(name: str, url: str, produced, tables, span_ns, queries, rng) -> dict:
    store = Store(url)
    try:
        store.migrate()
        load_s = load(store, produced)
        with store.read() as connection:
            stored = connection.exec_driver_sql("SELECT count(*) FROM events").scalar_one()
        with store.write() as connection:
            connection.exec_driver_sql("ANALYZE")  # what autovacuum / a maintenance job keeps current
        result = {"backend": name, "events": stored, "ingest_s": round(load_s, 2),
                  "ingest_events_per_s": round(stored / load_s), "queries": queries, "target_p50_ms": 50,
                  **measure(store, tables, span_ns, queries, rng)}
    finally:
        store.dispose()
    print(f"{name}: loaded {stored} events through the full ingest path in {load_s:.0f}s "
          f"({result['ingest_events_per_s']}/s: decode, verify signature + chain, store evidence + index)")
    print(f"{name}: events on table X in a 10-minute window: p50 {result['table_window_10m_p50_ms']} ms, "
          f"p95 {result['table_window_10m_p95_ms']} ms (~{result['rows_per_window_avg']} rows)")
    print(f"{name}: who touched table X (any schema) in a 10-minute window: p50 "
          f"{result['who_touched_unqualified_10m_p50_ms']} ms, p95 {result['who_touched_unqualified_10m_p95_ms']} ms")
    print(f"{name}: sessions touching table X in a 10-minute window: p50 {result['sessions_by_table_10m_p50_ms']} ms, "
          f"p95 {result['sessions_by_table_10m_p95_ms']} ms", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="stored events (the issue's size: 10000000)")
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--tables", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--backends", default="sqlite")
    parser.add_argument("--keep", metavar="DIR", help="keep the SQLite database in DIR")
    args = parser.parse_args()
    rng = random.Random(7)
    tables = [f"public.table_{i}" for i in range(args.tables)]
    span_ns = max(1, -(-args.events // EVENTS_PER_DAY)) * DAY_NS
    started = time.perf_counter()
    produced = produce(args.events, args.agents, tables, args.batch_size, span_ns)
    print(f"produced {sum(len(p[2]) for p in produced)} signed batches from {args.agents} agents "
          f"({time.perf_counter() - started:.0f}s, not counted)", flush=True)
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="warden-bench-collector-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        for backend in args.backends.split(","):
            if backend == "sqlite":
                results["sqlite"] = run_backend("sqlite", f"sqlite:///{workdir / 'collector.db'}", produced,
                                                tables, span_ns, args.queries, rng)
            elif backend == "postgresql":
                results["postgresql"] = _postgres(produced, tables, span_ns, args.queries, rng)
            else:
                parser.error(f"unknown backend {backend!r}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print("BENCH " + json.dumps({"events_requested": args.events, "span_days": span_ns // DAY_NS,
                                 "agents": args.agents, **results}, sort_keys=True))
    return 0


def _postgres(produced, tables, span_ns, queries, rng) -> dict:
    with durable_postgres() as server:
        if server is None:
            return dict(POSTGRES_SKIPPED)
        result = run_backend("postgresql", server[0], produced, tables, span_ns, queries, rng)
    return dict(result, settings=POSTGRES_SETTINGS)


if __name__ == "__main__":
    sys.exit(main())
