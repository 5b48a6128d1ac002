"""Records pipeline benchmark: encode + chain + sign + compress + spool on one core.

Run: .venv/bin/python bench/records.py [--events N] [--batches 64,512,8192] [--runs 3]

The timed loop is the writer's own path (records.batch.BatchBuilder: canonical
encoding, hash chain, content tags, columns, Ed25519 signature, zstd, spool append with
fsync), without the writer thread's queue. It runs once per (dictionary: none / the
shipped one) x batch size, ``--runs`` times each, pinned to one core; throughput is the
median. Sizes are compared with the same events as JSON + gzip (one gzip member per
batch): "records" JSON carries prev/hash hex, which JSON needs for the same evidence
(our batches recompute them from the content); "content" JSON has no integrity data.
The dictionary was trained on records.corpus, whose vocabulary (tables, SQL) differs
from the statements generated here. Ends with one line ``BENCH {json}``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from records import dictionary as dictionaries  # noqa: E402
from records.batch import BatchBuilder  # noqa: E402
from records.codec import GENESIS_HASH, seal_event  # noqa: E402
from records.schema import new_session_id  # noqa: E402
from records.spool import Spool  # noqa: E402
from records.writer import DEFAULT_BATCH_EVENTS  # noqa: E402

TABLES = ["customers", "accounts", "orders", "order_items", "payments", "invoices",
          "ledger_entries", "users", "sessions", "audit_log", "addresses", "cards"]
COLUMNS = ["id", "customer_id", "account_id", "status", "amount", "currency", "created_at",
           "updated_at", "email", "name", "balance", "reference", "country", "kind"]


def statement_templates(rng: random.Random) -> list[tuple[str, str, list[str], int]]:
    """(kind, sql, tables, parameter count) shaped like ORM and job traffic."""
    templates = []
    for table in TABLES:
        cols = ", ".join(rng.sample(COLUMNS, rng.randint(3, 9)))
        other = rng.choice([t for t in TABLES if t != table])
        templates += [
            ("select", f"SELECT {cols} FROM {table} WHERE id = $1", [table], 1),
            ("select", f"SELECT {cols} FROM {table} WHERE customer_id = $1 AND status = $2 "
                       f"ORDER BY created_at DESC LIMIT $3", [table], 3),
            ("select", f"SELECT t.id, t.amount, o.reference FROM {table} t JOIN {other} o ON "
                       f"o.id = t.{rng.choice(['account_id', 'customer_id'])} WHERE "
                       f"t.created_at >= $1 AND t.created_at < $2", [table, other], 2),
            ("insert", f"INSERT INTO {table} (customer_id, amount, currency, reference) "
                       f"VALUES ($1, $2, $3, $4) RETURNING id", [table], 4),
            ("update", f"UPDATE {table} SET status = $1, updated_at = now() WHERE id = $2",
             [table], 2),
        ]
    templates += [("begin", "BEGIN", [], 0), ("commit", "COMMIT", [], 0),
                  ("select", "SELECT 1", [], 0)]
    return templates


def param(rng: random.Random) -> str:
    choice = rng.random()
    if choice < 0.4:
        return str(rng.randint(1, 50_000_000))
    if choice < 0.55:
        return rng.choice(["active", "closed", "pending", "failed", "USD", "EUR"])
    if choice < 0.75:
        return f"{rng.randint(1, 999_999) / 100:.2f}"
    if choice < 0.9:
        return f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:00:00Z"
    return "***"                      # masked value


def pg_statement_events(count: int, seed: int = 7):
    """(ts, sid, fields) for realistic pg.statement events from interleaved sessions."""
    rng = random.Random(seed)
    templates = statement_templates(rng)
    weights = [8 if kind == "select" else 3 for kind, *_ in templates]
    sessions = [[new_session_id(), 0] for _ in range(32)]
    ts = time.time_ns()
    for _ in range(count):
        ts += rng.randint(2_000, 400_000)
        session = rng.choice(sessions)
        session[1] += 1
        kind, sql, tables, nparams = rng.choices(templates, weights)[0]
        fields = {"text": sql, "params": [param(rng) for _ in range(nparams)], "kind": kind,
                  "tables": tables, "functions": ["now"] if "now()" in sql else [],
                  "fingerprint": hashlib.blake2b(sql.encode(), digest_size=8).hexdigest(),
                  "statement_index": session[1], "protocol": "extended"}
        if rng.random() < 0.05:
            session[0], session[1] = new_session_id(), 0
        yield ts, session[0], fields


def to_json(event: dict, with_hashes: bool) -> str:
    record = {k: v for k, v in event.items() if k not in ("prev", "hash")}
    if with_hashes:
        record["prev"], record["hash"] = event["prev"].hex(), event["hash"].hex()
    return json.dumps(record, separators=(",", ":"))


def run_pipeline(agent, key, inputs, batch_size, dictionary, tmp):
    """Returns (wall s, CPU s, payload bytes, bytes on disk)."""
    spool = Spool(tmp, max_bytes=8 << 30)
    builder = BatchBuilder(agent, GENESIS_HASH, 1)
    wall, cpu = time.perf_counter(), time.process_time()
    for ts, sid, fields in inputs:
        builder.add(ts, sid, "pg.statement", fields)
        if builder.count == batch_size:
            spool.append(builder.finish(key, dictionary=dictionary))
            builder = BatchBuilder(agent, builder.last_hash, builder.last_seq + 1)
    if builder.count:
        spool.append(builder.finish(key, dictionary=dictionary))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    payload = sum(ref.length for ref, _ in spool.pending())
    on_disk = spool.used_bytes
    spool.close()
    return wall, cpu, payload, on_disk


def sealed_events(agent, inputs):
    """The same events as dicts with their chain hashes (for the JSON comparison)."""
    prev, out = GENESIS_HASH, []
    for seq, (ts, sid, fields) in enumerate(inputs, 1):
        event = seal_event(agent, seq, ts, sid, "pg.statement", fields, prev)
        prev = event["hash"]
        out.append(event)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batches", default=f"64,512,{DEFAULT_BATCH_EVENTS}",
                        help="batch sizes, comma-separated (the last is the writer's default)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cpu", type=int, default=0, help="core to pin to")
    args = parser.parse_args()
    try:
        os.sched_setaffinity(0, {args.cpu})
    except (AttributeError, OSError):
        pass
    agent = "i-0123456789abcdef0"
    key = Ed25519PrivateKey.generate()
    inputs = list(pg_statement_events(args.events))
    events = len(inputs)
    sealed = sealed_events(agent, inputs)
    shipped = dictionaries.current()
    modes = [("none", None)] + ([("dictionary", shipped)] if shipped is not None else [])
    results = []
    print(f"{events:,} pg.statement events; {args.runs} runs each, median; one core "
          f"(cpu {args.cpu}); dictionary {shipped.dict_id() if shipped else 'absent'}")
    for batch_size in (int(b) for b in args.batches.split(",")):
        chunks = [sealed[i:i + batch_size] for i in range(0, events, batch_size)]
        gzip_records = sum(len(gzip.compress("\n".join(to_json(e, True) for e in chunk)
                                             .encode())) for chunk in chunks)
        gzip_content = sum(len(gzip.compress("\n".join(to_json(e, False) for e in chunk)
                                             .encode())) for chunk in chunks)
        for mode, dictionary in modes:
            walls, cpus = [], []
            for _ in range(args.runs):
                with tempfile.TemporaryDirectory(prefix="warden-bench-") as tmp:
                    wall, cpu, payload, on_disk = run_pipeline(agent, key, inputs, batch_size,
                                                               dictionary, tmp)
                walls.append(wall)
                cpus.append(cpu)
            row = {
                "batch_events": batch_size, "dictionary": mode,
                "events_per_s_wall": round(events / statistics.median(walls)),
                "events_per_s_cpu": round(events / statistics.median(cpus)),
                "events_per_s_cpu_runs": [round(events / c) for c in cpus],
                "bytes_per_event": round(payload / events, 2),
                "bytes_per_event_on_disk": round(on_disk / events, 2),
                "json_gzip_bytes_per_event": round(gzip_records / events, 2),
                "json_gzip_content_only_bytes_per_event": round(gzip_content / events, 2),
                "ratio_vs_json_gzip": round(payload / gzip_records, 3),
                "ratio_vs_json_gzip_content_only": round(payload / gzip_content, 3),
            }
            results.append(row)
            print(f"batch {batch_size:4d}  {mode:10s}  {row['events_per_s_cpu']:>8,} ev/s CPU "
                  f"{row['events_per_s_wall']:>8,} ev/s wall  {row['bytes_per_event']:6.2f} B/ev"
                  f"  vs JSON+gzip records {row['ratio_vs_json_gzip']:.3f} "
                  f"({row['json_gzip_bytes_per_event']} B/ev)  content-only "
                  f"{row['ratio_vs_json_gzip_content_only']:.3f} "
                  f"({row['json_gzip_content_only_bytes_per_event']} B/ev)")
    main_row = next((r for r in results if r["batch_events"] == DEFAULT_BATCH_EVENTS
                     and r["dictionary"] == modes[-1][0]), results[-1])
    print(f"targets: >= 100,000 events/s ({main_row['events_per_s_cpu']:,} CPU, "
          f"{main_row['events_per_s_wall']:,} wall at batch {main_row['batch_events']}, "
          f"{main_row['dictionary']}); ratio vs JSON+gzip records <= 0.5 "
          f"({main_row['ratio_vs_json_gzip']})")
    figures = {"events": events, "raw_json_bytes_per_event":
               round(sum(len(to_json(e, True)) + 1 for e in sealed) / events, 1),
               "dictionary_id": shipped.dict_id() if shipped else None,
               "headline": main_row, "results": results}
    print("BENCH " + json.dumps(figures))


if __name__ == "__main__":
    main()
