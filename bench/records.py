"""Records pipeline benchmark: encode + chain + sign + compress + spool on one core.

Run: .venv/bin/python bench/records.py [--events N] [--batch N]
Prints events/s (wall and CPU), bytes per event on disk, and the size against the same
events as JSON + gzip, then one line ``BENCH {json}``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from records.batch import build_batch, encode_batch  # noqa: E402
from records.codec import GENESIS_HASH, seal_event_encoded  # noqa: E402
from records.schema import new_session_id  # noqa: E402
from records.spool import Spool  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--cpu", type=int, default=0, help="core to pin to")
    args = parser.parse_args()
    try:
        os.sched_setaffinity(0, {args.cpu})
    except (AttributeError, OSError):
        pass
    agent = "i-0123456789abcdef0"
    key = Ed25519PrivateKey.generate()
    inputs = list(pg_statement_events(args.events))
    with tempfile.TemporaryDirectory(prefix="warden-bench-") as tmp:
        spool = Spool(tmp, max_bytes=8 << 30)
        prev, seq, batch_events, encodings, sealed = GENESIS_HASH, 0, [], [], []
        wall, cpu = time.perf_counter(), time.process_time()
        for ts, sid, fields in inputs:
            seq += 1
            event, encoded = seal_event_encoded(agent, seq, ts, sid, "pg.statement", fields,
                                                prev)
            prev = event["hash"]
            batch_events.append(event)
            encodings.append(encoded)
            if len(batch_events) == args.batch:
                spool.append(encode_batch(build_batch(agent, batch_events, key,
                                                      encodings=encodings)))
                sealed += batch_events
                batch_events, encodings = [], []
        if batch_events:
            spool.append(encode_batch(build_batch(agent, batch_events, key,
                                                  encodings=encodings)))
            sealed += batch_events
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        spooled = sum(ref.length for ref, _ in spool.pending())
        on_disk = spool.used_bytes
        spool.close()

    def gzip_size(with_hashes: bool) -> int:
        return sum(len(gzip.compress("\n".join(to_json(e, with_hashes)
                                               for e in sealed[i:i + args.batch]).encode()))
                   for i in range(0, len(sealed), args.batch))

    json_gzip_records = gzip_size(True)      # the same records: content + chain hashes
    json_gzip_content = gzip_size(False)     # content only, no integrity data
    json_raw = sum(len(to_json(e, True)) + 1 for e in sealed)
    figures = {
        "events": len(sealed), "batch_events": args.batch,
        "events_per_s_wall": round(len(sealed) / wall),
        "events_per_s_cpu": round(len(sealed) / cpu),
        "bytes_per_event": round(spooled / len(sealed), 2),
        "bytes_per_event_on_disk": round(on_disk / len(sealed), 2),
        "json_bytes_per_event": round(json_raw / len(sealed), 1),
        "json_gzip_bytes_per_event": round(json_gzip_records / len(sealed), 2),
        "json_gzip_content_only_bytes_per_event": round(json_gzip_content / len(sealed), 2),
        "ratio_vs_json_gzip": round(spooled / json_gzip_records, 3),
        "ratio_vs_json_gzip_content_only": round(spooled / json_gzip_content, 3),
    }
    print(f"events                 {figures['events']:,} pg.statement in batches of {args.batch}")
    print(f"throughput             {figures['events_per_s_wall']:,} events/s wall, "
          f"{figures['events_per_s_cpu']:,} events/s CPU (one core; target >= 100,000)")
    print(f"size                   {figures['bytes_per_event']} bytes/event "
          f"(raw JSON {figures['json_bytes_per_event']})")
    print(f"vs JSON+gzip records   {figures['ratio_vs_json_gzip']} "
          f"({figures['json_gzip_bytes_per_event']} bytes/event incl. prev/hash; target <= 0.5)")
    print(f"vs JSON+gzip content   {figures['ratio_vs_json_gzip_content_only']} "
          f"({figures['json_gzip_content_only_bytes_per_event']} bytes/event without hashes)")
    print("BENCH " + json.dumps(figures))


if __name__ == "__main__":
    main()
