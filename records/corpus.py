"""Seeded generator of realistic record traffic, for training the zstd dictionary.

It covers every common event type the way an agent emits them: sessions that start
(with the process record), run statements and HTTP requests, get decisions and end,
plus host-level ``conn.observed`` and heartbeats. The vocabulary (tables, services,
paths) is deliberately generic and differs from ``bench/records.py``'s, so the bench
measures the dictionary on traffic it was not trained on.

``events(count, seed)`` yields ``(ts, sid, type, fields)`` in emission order.
"""

from __future__ import annotations

import hashlib
import random
import uuid

TABLES = ["users", "accounts", "transactions", "transfers", "loans", "loan_payments",
          "merchants", "devices", "events", "notifications", "kyc_documents", "branches",
          "employees", "statements", "limits", "beneficiaries", "fx_rates", "tickets"]
COLUMNS = ["id", "user_id", "account_id", "merchant_id", "status", "amount", "currency",
           "created_at", "updated_at", "deleted_at", "email", "phone", "first_name",
           "last_name", "iban", "balance", "external_ref", "country_code", "type", "note",
           "risk_score", "version", "tenant_id", "metadata"]
FUNCTIONS = ["now", "count", "sum", "coalesce", "lower", "date_trunc", "jsonb_build_object",
             "nextval", "pg_advisory_xact_lock"]
SERVICES = [("payments-api", "/usr/bin/python3.11", ["python3.11", "-m", "gunicorn",
                                                     "payments.wsgi", "-w", "4"]),
            ("ledger-worker", "/usr/local/bin/ledger-worker", ["ledger-worker", "--queue",
                                                                "ledger", "--concurrency", "8"]),
            ("reporting", "/usr/bin/java", ["java", "-Xmx2g", "-jar",
                                            "/opt/reporting/reporting.jar"]),
            ("admin-console", "/usr/bin/node", ["node", "/srv/admin/server.js"]),
            ("psql", "/usr/bin/psql", ["psql", "-h", "db.internal", "-U", "ops"]),
            ("cron-reconcile", "/usr/bin/python3.11", ["python3.11", "/opt/jobs/reconcile.py",
                                                       "--since", "1d"])]
HTTP_HOSTS = ["api.stripe.com", "hooks.slack.com", "kms.us-east-1.amazonaws.com",
              "s3.us-east-1.amazonaws.com", "identity.internal", "risk.internal:8443",
              "sqs.us-east-1.amazonaws.com"]
HTTP_PATHS = ["/v1/charges", "/v1/payment_intents/{id}", "/services/T0/B0/{id}", "/",
              "/reports/{id}.csv", "/v2/score", "/oauth2/token", "/v1/customers/{id}/cards",
              "/api/v1/users/{id}", "/healthz"]
SQLSTATES = ["23505", "40001", "57014", "42P01", "23503"]
POLICIES = ["pii-read-approval", "prod-write-window", "deny-ddl", "allow-readonly",
            "mask-pan", "mask-email", "break-glass"]


def _sql_templates(rng: random.Random) -> list[tuple[str, str, list[str], list[str], int]]:
    """(kind, text, tables, functions, parameter count)."""
    out = []
    for table in TABLES:
        cols = ", ".join(rng.sample(COLUMNS, rng.randint(2, 10)))
        join = rng.choice([t for t in TABLES if t != table])
        out += [
            ("select", f"SELECT {cols} FROM {table} WHERE id = $1", [table], [], 1),
            ("select", f"SELECT {cols} FROM {table} WHERE tenant_id = $1 AND status = ANY($2) "
                       f"ORDER BY created_at DESC LIMIT $3 OFFSET $4", [table], [], 4),
            ("select", f"SELECT count(*) FROM {table} WHERE created_at >= $1", [table],
             ["count"], 1),
            ("select", f"SELECT a.id, coalesce(a.note, '') AS note, b.status FROM {table} a "
                       f"LEFT JOIN {join} b ON b.id = a.{rng.choice(COLUMNS[1:4])} "
                       f"WHERE a.updated_at > $1", [table, join], ["coalesce"], 1),
            ("insert", f"INSERT INTO {table} ({cols}) VALUES "
                       f"({', '.join(f'${i + 1}' for i in range(cols.count(',') + 1))})",
             [table], [], cols.count(",") + 1),
            ("update", f"UPDATE {table} SET status = $1, updated_at = now(), version = "
                       f"version + 1 WHERE id = $2 AND version = $3", [table], ["now"], 3),
            ("delete", f"DELETE FROM {table} WHERE id = $1", [table], [], 1),
        ]
    out += [("begin", "BEGIN", [], [], 0), ("commit", "COMMIT", [], [], 0),
            ("rollback", "ROLLBACK", [], [], 0), ("select", "SELECT 1", [], [], 0),
            ("set", "SET statement_timeout = '30s'", [], [], 0),
            ("select", "SELECT pg_advisory_xact_lock($1)", [], ["pg_advisory_xact_lock"], 1),
            ("select", "SELECT nextval('transactions_id_seq')", [], ["nextval"], 0)]
    return out


def _param(rng: random.Random) -> str | None:
    roll = rng.random()
    if roll < 0.35:
        return str(rng.randint(1, 90_000_000))
    if roll < 0.5:
        return rng.choice(["active", "pending", "settled", "reversed", "USD", "EUR", "GBP",
                           "true", "false"])
    if roll < 0.65:
        return f"{rng.randint(0, 5_000_000) / 100:.2f}"
    if roll < 0.78:
        return (f"20{rng.randint(23, 26)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} "
                f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00+00")
    if roll < 0.86:
        return str(uuid.UUID(int=rng.getrandbits(128)))
    if roll < 0.95:
        return "***"
    return None


def _process(rng: random.Random, service) -> dict:
    name, exe, cmdline = service
    pid = rng.randint(300, 4_000_000)
    unit = f"{name}.service"
    return {"pid": pid, "tgid": pid, "exe": exe, "cmdline": cmdline, "comm": exe.rsplit("/", 1)[1][:15],
            "uid": 1000 + SERVICES.index(service), "user": name.replace("-", "_"),
            "gid": 1000 + SERVICES.index(service), "systemd_unit": unit,
            "cgroup": f"/system.slice/{unit}", "cgroup_id": rng.randint(2_000, 90_000),
            "container": None}


class _Session:
    def __init__(self, rng: random.Random, ts: int):
        self.sid = str(uuid.UUID(int=(ts // 1_000_000 << 80) | (0x7 << 76)
                                 | (rng.getrandbits(74) & ((1 << 74) - 1) & ~(0x3 << 62))
                                 | (0b10 << 62)))
        self.service = rng.choice(SERVICES)
        self.process = _process(rng, self.service)
        self.http = rng.random() < 0.3
        self.index = 0
        self.started = ts
        self.left = rng.randint(3, 200)


def events(count: int, seed: int = 20240601):
    rng = random.Random(seed)
    templates = _sql_templates(rng)
    weights = [10 if t[0] == "select" else 3 for t in templates]
    ts = 1_717_200_000_000_000_000 + rng.randint(0, 10**15)
    sessions: list[_Session] = []
    produced = 0
    next_heartbeat = ts
    while produced < count:
        ts += rng.randint(1_000, 2_000_000)
        if ts >= next_heartbeat:
            next_heartbeat = ts + 10_000_000_000
            yield ts, None, "agent.heartbeat", {
                "version": "0.9.3", "uptime_s": rng.randint(60, 9_000_000),
                "spool_backlog_bytes": rng.choice([0, 0, rng.randint(1, 9_000_000)]),
                "spool_backlog_batches": rng.randint(0, 40), "spool_full": False,
                "chain_seq": rng.randint(1, 10**9), "chain_hash": rng.randbytes(32).hex(),
                "bpf_state": "attached", "sessions_active": len(sessions),
                "stats": {"events": rng.randint(0, 10**8), "dropped": 0,
                          "sessions": rng.randint(0, 10**6)}}
            produced += 1
            continue
        if rng.random() < 0.03:
            service = rng.choice(SERVICES)
            yield ts, None, "conn.observed", {
                "process": _process(rng, service), "identity": f"spiffe://prod/{service[0]}",
                "family": "inet", "dst_ip": f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}."
                                            f"{rng.randint(1, 254)}",
                "dst_port": rng.choice([5432, 443, 6379, 8443]), "attempts": rng.randint(1, 50),
                "established": rng.randint(0, 50), "failed": rng.randint(0, 2), "pending": 0,
                "redirected": rng.randint(0, 50), "bypassed": 0, "governed": True,
                "pids": [rng.randint(300, 4_000_000) for _ in range(rng.randint(1, 3))],
                "first_ns": ts - rng.randint(10**6, 10**10), "last_ns": ts}
            produced += 1
            continue
        if not sessions or (len(sessions) < 40 and rng.random() < 0.04):
            session = _Session(rng, ts)
            sessions.append(session)
            target = ("payments-db:5432" if not session.http else rng.choice(HTTP_HOSTS))
            yield ts, session.sid, "session.start", {
                "host": f"ip-10-0-{rng.randint(0, 255)}-{rng.randint(0, 255)}.ec2.internal",
                "agent": "0.9.3", "process": session.process,
                "identity": f"spiffe://prod/{session.service[0]}", "target": target,
                "protocol": "http" if session.http else "postgres",
                "orig_dst": f"10.0.{rng.randint(0, 255)}.{rng.randint(1, 254)}:"
                            f"{443 if session.http else 5432}",
                "client_addr": f"127.0.0.1:{rng.randint(30000, 60999)}",
                "tls": True, "tls_version": "TLSv1.3",
                "auth_user": None if session.http else session.process["user"],
                "database": None if session.http else "payments",
                "application_name": None if session.http else session.service[0]}
            produced += 1
            continue
        session = rng.choice(sessions)
        session.index += 1
        session.left -= 1
        if session.left <= 0:
            sessions.remove(session)
            yield ts, session.sid, "session.end", {
                "reason": rng.choice(["client_closed", "client_closed", "server_closed",
                                      "idle_timeout"]),
                "duration_ns": ts - session.started, "statements": session.index,
                "requests": 0, "bytes_in": rng.randint(100, 10**7),
                "bytes_out": rng.randint(100, 10**8)}
            produced += 1
            continue
        if session.http:
            method = rng.choice(["GET", "GET", "POST", "PUT", "DELETE"])
            path = rng.choice(HTTP_PATHS).replace("{id}", f"{rng.getrandbits(40):x}")
            yield ts, session.sid, "http.request", {
                "method": method, "scheme": "https", "host": rng.choice(HTTP_HOSTS),
                "port": 443, "path": path, "query": rng.choice(["", "", "limit=100",
                                                                "expand[]=customer"]),
                "headers": {"user-agent": "python-requests/2.31.0", "accept": "*/*",
                            "authorization": "[redacted]", "content-type": "application/json"},
                "body_bytes": 0 if method == "GET" else rng.randint(20, 4000),
                "request_index": session.index}
            ts += rng.randint(100_000, 300_000_000)
            yield ts, session.sid, "http.response", {
                "status": rng.choice([200, 200, 200, 201, 204, 400, 404, 429, 500]),
                "headers": {"content-type": "application/json", "content-length":
                            str(rng.randint(2, 90000)), "x-request-id": f"req_{rng.getrandbits(64):x}"},
                "body_bytes": rng.randint(2, 90000), "duration_ns": rng.randint(10**5, 10**9),
                "request_index": session.index}
            produced += 2
            continue
        kind, text, tables, functions, nparams = rng.choices(templates, weights)[0]
        fields = {"text": text, "params": [_param(rng) for _ in range(nparams)],
                  "kind": kind, "tables": tables, "functions": functions,
                  "fingerprint": hashlib.blake2b(text.encode(), digest_size=8).hexdigest(),
                  "statement_index": session.index,
                  "protocol": rng.choice(["extended", "extended", "simple"])}
        if rng.random() < 0.1:
            fields["decision"] = rng.choice(["allow", "allow", "deny", "approve"])
            fields["policy_ids"] = rng.sample(POLICIES, rng.randint(1, 2))
        yield ts, session.sid, "pg.statement", fields
        if rng.random() < 0.02:
            yield ts, session.sid, "mask.applied", {
                "rules": ["mask-pan"], "columns": ["iban"], "method": "partial",
                "values_masked": rng.randint(1, 500), "statement_index": session.index}
            produced += 1
        ts += rng.randint(50_000, 50_000_000)
        failed = rng.random() < 0.01
        tag = {"select": "SELECT", "insert": "INSERT 0", "update": "UPDATE",
               "delete": "DELETE"}.get(kind, kind.upper())
        rows = rng.randint(0, 500) if kind in ("select", "update", "delete", "insert") else 0
        result = {"command_tag": f"{tag} {rows}" if kind in ("select", "insert", "update",
                                                               "delete") else tag,
                  "rows": rows, "bytes": rows * rng.randint(40, 400),
                  "duration_ns": rng.randint(30_000, 900_000_000),
                  "statement_index": session.index}
        if failed:
            result = {"sqlstate": rng.choice(SQLSTATES), "error": "could not serialize access",
                      "duration_ns": rng.randint(30_000, 9_000_000),
                      "statement_index": session.index}
        yield ts, session.sid, "pg.result", result
        produced += 2
