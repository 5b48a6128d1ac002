#!/usr/bin/env python3
"""Policy decision latency: cache hit, cache miss (new constants), cold miss (Cedar), HTTP.

Standalone: `python bench/policy.py [--seconds-per-case 0.5]`. Uses the example bank policy
(packaging/policy.example.cedar). Prints a table and a final `BENCH {json}` line with
per-case min/p50/mean/p99 in microseconds (each sample is the mean of a batch of calls). Targets: hit <= 5 us, miss <= 150 us.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cedarpy  # noqa: E402
from pglast import parser as pg  # noqa: E402

from enforcer.policy.engine import PolicyEngine  # noqa: E402

POLICY = os.path.join(ROOT, "packaging", "policy.example.cedar")
GROUPS = {"payments": ["payments-api"], "reporting": ["reporting-nightly", "reporting-dashboard"]}
ATTRS = {"unit": "payments-api.service", "user": "payments", "uid": 1001,
         "exe": "/usr/bin/python3.11", "host": "ip-10-0-1-7", "container": ""}
TARGET = "payments-db"

# A payments service's everyday statements; {n} makes each text unique for the miss cases.
STATEMENTS = [
    "SELECT id, name, email, status FROM customers WHERE id = {n}",
    "SELECT a.id, a.balance_cents FROM accounts a WHERE a.customer_id = {n} AND a.status = 'open'",
    "UPDATE accounts SET balance_cents = balance_cents - 1250 WHERE id = {n} AND balance_cents >= 1250",
    "INSERT INTO payments (id, account_id, amount_cents, currency, created_at) VALUES ({n}, 42, 1250, 'EUR', now())",
    "INSERT INTO ledger_entries (payment_id, debit, credit) SELECT id, amount_cents, 0 FROM payments WHERE id = {n}",
    "SELECT c.id, c.name, sum(p.amount_cents) FROM customers c JOIN accounts a ON a.customer_id = c.id "
    "JOIN payments p ON p.account_id = a.id WHERE p.created_at > now() - interval '1 day' AND c.id > {n} "
    "GROUP BY c.id, c.name ORDER BY 3 DESC LIMIT 50",
    "DELETE FROM sessions WHERE expires_at < now() AND id = {n}",
    "BEGIN",
]


def measure(fn, seconds: float, batch: int = 200) -> list[float]:
    """Per-call times in microseconds, measured over batches to hide timer overhead."""
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    gc.disable()
    try:
        while time.perf_counter() < deadline or len(samples) < 20:
            start = time.perf_counter_ns()
            for _ in range(batch):
                fn()
            samples.append((time.perf_counter_ns() - start) / batch / 1000)
    finally:
        gc.enable()
    return samples


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"min_us": round(ordered[0], 2), "mean_us": round(statistics.fmean(samples), 2),
            "p50_us": round(ordered[len(ordered) // 2], 2),
            "p99_us": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds-per-case", type=float, default=0.5)
    args = ap.parse_args()
    secs = args.seconds_per_case
    engine = PolicyEngine.from_files(POLICY, groups=GROUPS)
    results: dict[str, dict] = {}

    # warm the principal's entities so every case measures steady state
    for text in STATEMENTS:
        engine.decide_sql("payments-api", ATTRS, TARGET, text.format(n=1))

    # 1. hit: the exact message was decided before
    texts = [t.format(n=7) for t in STATEMENTS]
    for t in texts:
        engine.decide_sql("payments-api", ATTRS, TARGET, t)
    state = {"i": 0}

    def hit():
        i = state["i"] = (state["i"] + 1) % len(texts)
        engine.decide_sql("payments-api", ATTRS, TARGET, texts[i])
    results["sql hit (same text)"] = summary(measure(hit, secs))

    # 2. miss, known shape: new constants -> parse + fingerprint + statement-cache hit
    counter = {"n": 1000}

    def new_constants():
        counter["n"] += 1
        n = counter["n"]
        engine.decide_sql("payments-api", ATTRS, TARGET, STATEMENTS[n % len(STATEMENTS)].format(n=n))
    results["sql miss (new constants)"] = summary(measure(new_constants, secs, batch=50))

    # 3. cold miss: nothing cached -> parse + fingerprint + entities + Cedar
    def cold_case(template):
        def run():
            engine.clear_caches()
            counter["n"] += 1
            engine.decide_sql("payments-api", ATTRS, TARGET, template.format(n=counter["n"]))
        return run
    cold_all: list[float] = []
    for template, label in ((STATEMENTS[0], "1 table"), (STATEMENTS[2], "1 table, UPDATE"),
                            (STATEMENTS[4], "2 tables"), (STATEMENTS[5], "3 tables, join")):
        samples = measure(cold_case(template), secs / 2, batch=20)
        cold_all.extend(samples)
        results[f"sql cold miss ({label})"] = summary(samples)
    results["sql cold miss (all)"] = summary(cold_all)

    # 4. HTTP
    engine.decide_http("payments-api", ATTRS, "card-api", "POST", "api.cards.example", "/v2/authorizations")
    results["http hit"] = summary(measure(lambda: engine.decide_http(
        "payments-api", ATTRS, "card-api", "POST", "api.cards.example", "/v2/authorizations"), secs))

    def http_miss():
        counter["n"] += 1
        engine.decide_http("payments-api", ATTRS, "card-api", "GET", "api.cards.example",
                           f"/v2/authorizations/{counter['n']}")
    results["http miss (new path)"] = summary(measure(http_miss, secs, batch=20))

    # 5. the parts, for reference
    sample_sql = STATEMENTS[0].format(n=5)
    results["part: pglast parse_sql_json+loads"] = summary(measure(
        lambda: json.loads(pg.parse_sql_json(sample_sql)), secs / 2))
    results["part: pglast fingerprint"] = summary(measure(lambda: pg.fingerprint(sample_sql), secs / 2))
    request = {"principal": {"type": "Service", "id": "payments-api"},
               "action": {"type": "Action", "id": "pg:select"},
               "resource": {"type": "Target", "id": TARGET},
               "context": {"statement_kind": "SelectStmt", "statement_count": 1, "has_where": False,
                           "locks_rows": False, "functions": [], "dangerous_functions": [],
                           "parse_error": False, "hour": 3, "approved": False}}
    principal = engine._principal("payments-api", ATTRS)
    entities = engine._entities(principal, TARGET, [])
    results["part: cedarpy is_authorized (1 request)"] = summary(measure(
        lambda: cedarpy.is_authorized(request, engine.loaded.policy_set, entities), secs / 2, batch=50))
    results["part: cedarpy is_authorized_batch (3) per request"] = {
        k: round(v / 3, 2) for k, v in summary(measure(
            lambda: cedarpy.is_authorized_batch([request] * 3, engine.loaded.policy_set, entities),
            secs / 2, batch=20)).items()}

    width = max(len(k) for k in results)
    print(f"{'case':<{width}}  {'min µs':>9}  {'p50 µs':>9}  {'mean µs':>9}  {'p99 µs':>9}")
    for name, row in results.items():
        print(f"{name:<{width}}  {row['min_us']:>9}  {row['p50_us']:>9}  {row['mean_us']:>9}  {row['p99_us']:>9}")
    verdict = {
        "hit_target_us": 5, "miss_target_us": 150,
        "hit_ok": results["sql hit (same text)"]["p50_us"] <= 5,
        "miss_ok": results["sql cold miss (all)"]["p50_us"] <= 150,
    }
    print("BENCH " + json.dumps({"bench": "policy", "results": results, **verdict}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
