"""Collector API in-process (real SQLite file, real records/ batches and keys)."""
import base64
import hashlib
import json
import threading
import time
import warnings

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import delete, select, text, update

warnings.filterwarnings("ignore", category=DeprecationWarning)
from fastapi.testclient import TestClient  # noqa: E402

from collector.app import create_app  # noqa: E402
from collector.auth import create_enrollment_token, mint_api_token  # noqa: E402
from collector.config import CollectorConfig  # noqa: E402
from collector.ocsf import REQUIRED  # noqa: E402
from collector.simulate import SimulatedAgent  # noqa: E402
from collector.storage.schema import batches, events  # noqa: E402
from records.signing import public_key_bytes  # noqa: E402

T0 = 1_714_530_900 * 10**9  # 2024-05-01T02:35:00Z


@pytest.fixture
def env(tmp_path):
    config = CollectorConfig(state_dir=str(tmp_path / "state"), db=f"sqlite:///{tmp_path}/c.db")
    app = create_app(config)
    client = TestClient(app)
    store, keys = app.state.store, app.state.keys

    def token(role, subject=None, ttl=3600):
        with store.write() as c:
            return mint_api_token(c, keys, role=role, subject=subject or f"{role}-person", ttl_s=ttl,
                                  issuer=config.tokens.issuer, audience=config.tokens.audience)

    def enroll(agent):
        with store.write() as c:
            enrollment = create_enrollment_token(c, 3600)
        answer = client.post("/v1/agents/enroll", json=agent.enroll_body(enrollment))
        assert answer.status_code == 200, answer.text
        return enrollment

    def ingest(agent, evs, headers=None):
        return client.post("/v1/ingest", content=agent.batch_bytes(evs), headers=headers or agent.headers())

    class Env:
        pass
    e = Env()
    e.client, e.store, e.keys, e.config, e.token, e.enroll, e.ingest = client, store, keys, config, token, enroll, ingest
    e.auditor = {"Authorization": f"Bearer {token('auditor')}"}
    yield e
    client.close()
    store.dispose()


def test_ingest_and_who_touched_table_around_time(env):
    agent = SimulatedAgent("agent-a", hostname="db-client-1")
    env.enroll(agent)
    sid, evs = agent.session(identity="billing", target="orders-db", start_ns=T0,
                             statements=[("SELECT * FROM public.customers WHERE id = $1", ["public.customers"]),
                                         ("UPDATE orders SET paid = true", ["public.orders"])])
    other_sid, other = agent.session(identity="reports", target="orders-db", start_ns=T0 + 3600 * 10**9,
                                     statements=[("SELECT count(*) FROM public.customers", ["public.customers"])])
    answer = env.ingest(agent, evs)
    assert answer.json() == {"accepted": True, "duplicate": False, "last_seq": len(evs)}
    assert env.ingest(agent, other).json()["last_seq"] == len(evs) + len(other)

    # Around 02:35 only billing touched customers; the 03:35 read is outside a 5m window.
    found = env.client.get("/v1/events", params={"table": "public.customers", "at": "2024-05-01T02:35:00Z",
                                                 "window": "5m"}, headers=env.auditor).json()["items"]
    assert [(e["identity"], e["type"], e["sid"]) for e in found] == [("billing", "pg.statement", sid)]
    assert found[0]["fields"]["text"].startswith("SELECT * FROM public.customers")
    assert found[0]["tables"] == ["public.customers"]
    # Unqualified table names match any schema.
    assert len(env.client.get("/v1/events", params={"table": "customers"}, headers=env.auditor).json()["items"]) == 2

    sessions = env.client.get("/v1/sessions", params={"table": "public.orders"}, headers=env.auditor).json()["items"]
    assert [s["id"] for s in sessions] == [sid]
    assert sessions[0]["process"]["exe"] == "/usr/bin/psql" and sessions[0]["statement_count"] == 2
    assert sessions[0]["host"] == "db-client-1" and sessions[0]["end_ns"] is not None
    by_identity = env.client.get("/v1/sessions", params={"identity": "reports"}, headers=env.auditor).json()["items"]
    assert [s["id"] for s in by_identity] == [other_sid]

    timeline = env.client.get(f"/v1/sessions/{sid}/events", headers=env.auditor).json()["items"]
    assert [e["type"] for e in timeline] == ["session.start", "pg.statement", "pg.result",
                                             "pg.statement", "pg.result", "session.end"]
    assert [e["decision"] for e in timeline if e["type"] == "pg.statement"] == ["allow", "allow"]
    assert all(e["identity"] == "billing" for e in timeline)  # inherited from session.start
    assert env.client.get("/v1/sessions/nope", headers=env.auditor).status_code == 404


def test_duplicate_retry_is_idempotent(env):
    agent = SimulatedAgent("agent-d")
    env.enroll(agent)
    _, evs = agent.session(identity="svc", target="db", statements=[("SELECT 1", [])])
    raw = agent.batch_bytes(evs)
    first = env.client.post("/v1/ingest", content=raw, headers=agent.headers())
    again = env.client.post("/v1/ingest", content=raw, headers=agent.headers())
    assert first.json()["duplicate"] is False
    assert again.status_code == 200 and again.json()["accepted"] and again.json()["duplicate"] is True
    with env.store.read() as c:
        assert c.execute(text("SELECT count(*) FROM batches")).scalar_one() == 1
        assert c.execute(text("SELECT count(*) FROM events")).scalar_one() == len(evs)


def test_bad_signature_refused_and_counted(env):
    agent = SimulatedAgent("agent-s")
    env.enroll(agent)
    _, evs = agent.session(identity="svc", target="db", statements=[("SELECT 1", [])])
    impostor = SimulatedAgent("agent-s")  # same id, a key the collector never enrolled
    answer = env.client.post("/v1/ingest", content=impostor.batch_bytes(evs), headers=agent.headers())
    assert answer.status_code == 422 and "not what the agent signed" in answer.json()["detail"]
    assert env.client.post("/v1/ingest", content=b"not a batch", headers=agent.headers()).status_code == 400
    metrics = env.client.get("/metrics").text
    assert 'warden_collector_verify_failures_total{reason="bad_signature"} 1' in metrics
    assert 'warden_collector_ingest_batches_total{result="rejected"} 2' in metrics
    with env.store.read() as c:
        assert c.execute(text("SELECT count(*) FROM batches")).scalar_one() == 0


def test_forged_agent_tokens_are_refused(env):
    agent = SimulatedAgent("agent-j")
    env.enroll(agent)
    _, evs = agent.session(identity="svc", target="db", statements=[("SELECT 1", [])])
    raw = agent.batch_bytes(evs)
    now = int(time.time())
    claims = {"iss": agent.agent_id, "sub": agent.agent_id, "aud": "warden-collector", "iat": now,
              "exp": now + 120, "jti": "x"}
    forged = {
        "alg none": jwt.encode(claims, None, algorithm="none"),
        "HS256 keyed with the public key": jwt.encode(claims, public_key_bytes(agent.key), algorithm="HS256"),
        "wrong audience": jwt.encode({**claims, "aud": "someone-else"}, agent.key, algorithm="EdDSA"),
        "expired": jwt.encode({**claims, "iat": now - 900, "exp": now - 600}, agent.key, algorithm="EdDSA"),
        "too long-lived": jwt.encode({**claims, "exp": now + 3600}, agent.key, algorithm="EdDSA"),
        "other key": jwt.encode(claims, Ed25519PrivateKey.generate(), algorithm="EdDSA"),
        "sub differs": jwt.encode({**claims, "sub": "other"}, agent.key, algorithm="EdDSA"),
    }
    for name, token in forged.items():
        answer = env.client.post("/v1/ingest", content=raw, headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 401, name
    assert env.client.post("/v1/ingest", content=raw).status_code == 401
    # A person's token is not an agent's.
    assert env.client.post("/v1/ingest", content=raw, headers=env.auditor).status_code == 403
    assert env.client.post("/v1/ingest", content=raw, headers=agent.headers()).status_code == 200


def test_enrollment_token_single_use_and_expiry(env):
    with env.store.write() as c:
        token = create_enrollment_token(c, 3600)
        expired = create_enrollment_token(c, 0)
    first, second = SimulatedAgent("one"), SimulatedAgent("two")
    assert env.client.post("/v1/agents/enroll", json=first.enroll_body(token)).json() == {"agent_id": "one"}
    again = env.client.post("/v1/agents/enroll", json=second.enroll_body(token))
    assert again.status_code == 401 and "already used" in again.json()["detail"]
    assert env.client.post("/v1/agents/enroll", json=second.enroll_body(expired)).status_code == 401
    bad_key = {**second.enroll_body(token), "public_key": base64.b64encode(b"short").decode()}
    assert env.client.post("/v1/agents/enroll", json=bad_key).status_code in (400, 401)


def test_gap_is_stored_and_flagged(env):
    agent = SimulatedAgent("agent-g")
    env.enroll(agent)
    _, first = agent.session(identity="svc", target="db", statements=[("SELECT 1", [])])
    _, lost = agent.session(identity="svc", target="db", statements=[("SELECT 2", [])])
    _, third = agent.session(identity="svc", target="db", statements=[("SELECT 3", [])])
    assert env.ingest(agent, first).status_code == 200
    answer = env.ingest(agent, third)
    assert answer.status_code == 200 and answer.json()["accepted"]
    assert [p["kind"] for p in answer.json()["problems"]] == ["missing"]
    listed = env.client.get("/v1/agents", headers=env.auditor).json()["items"][0]
    assert listed["chain_ok"] is False and listed["problems"][0]["seq"] == lost[0]["seq"]
    assert listed["last_seq"] == third[-1]["seq"]
    metrics = env.client.get("/metrics").text
    assert 'warden_collector_agent_chain_ok{agent="agent-g"} 0' in metrics
    assert 'warden_collector_agent_chain_problems{agent="agent-g"} 1' in metrics
    report = env.client.get("/v1/verify", headers=env.auditor).json()
    assert not report["ok"] and report["problems"][0]["kind"] == "missing"


def test_verify_finds_edited_and_deleted_evidence(env):
    agent = SimulatedAgent("agent-t")
    env.enroll(agent)
    runs = [agent.session(identity="svc", target="db", statements=[(f"SELECT {i}", [])])[1] for i in range(3)]
    for evs in runs:
        env.ingest(agent, evs)
    assert env.client.get("/v1/verify", headers=env.auditor).json()["ok"] is True

    with env.store.read() as c:
        rows = c.execute(select(batches.c.id, batches.c.raw).order_by(batches.c.first_seq)).fetchall()
    # Re-encode batch 2 with one statement changed but the old signature kept.
    from records.batch import decode_batch, encode_batch
    from records.codec import canonical_encode, event_hash
    tampered = decode_batch(bytes(rows[1].raw))
    tampered.events[1]["f"]["text"] = "SELECT 'innocent'"
    previous = tampered.prev_hash
    for ev in tampered.events:
        ev["prev"] = previous
        ev["hash"] = previous = event_hash(previous, canonical_encode(ev))
    with env.store.write() as c:
        c.execute(update(batches).where(batches.c.id == rows[1].id).values(raw=encode_batch(tampered)))
    report = env.client.get("/v1/verify", headers=env.auditor).json()
    assert not report["ok"]
    modified = [p for p in report["problems"] if p["kind"] == "modified"]
    assert modified and modified[0]["seq"] == runs[1][1]["seq"] and modified[0]["batch_id"] == rows[1].id

    # Garbage bytes and a deleted batch are both located.
    with env.store.write() as c:
        c.execute(update(batches).where(batches.c.id == rows[1].id).values(raw=b"\x00garbage"))
        c.execute(delete(batches).where(batches.c.id == rows[2].id))
    kinds = {p["kind"]: p for p in env.client.get("/v1/verify", headers=env.auditor).json()["problems"]}
    assert kinds["batch_undecodable"]["batch_seq"] == f"{runs[1][0]['seq']}..{runs[1][-1]['seq']}"
    assert kinds["missing_tail"]["seq"] == runs[2][0]["seq"]
    assert kinds["evidence_missing"]["batch_id"] == rows[2].id


def test_verify_cross_checks_index(env):
    agent = SimulatedAgent("agent-i")
    env.enroll(agent)
    _, evs = agent.session(identity="svc", target="db", statements=[("SELECT 1", ["public.t"])])
    env.ingest(agent, evs)
    with env.store.write() as c:
        c.execute(update(events).where(events.c.seq == 2).values(fields=json.dumps({"text": "SELECT 2"})))
        c.execute(delete(events).where(events.c.seq == 3))
    problems = env.client.get("/v1/verify", params={"agent": "agent-i"}, headers=env.auditor).json()["problems"]
    assert {(p["kind"], p["seq"]) for p in problems} == {("index_mismatch", 2), ("index_missing", 3)}


def test_role_matrix_and_person_tokens(env):
    agent = SimulatedAgent("agent-r")
    env.enroll(agent)
    approver = {"Authorization": f"Bearer {env.token('approver', 'alice')}"}
    admin = {"Authorization": f"Bearer {env.token('admin', 'root')}"}
    created = env.client.post("/v1/approvals", json={"identity": "svc", "target": "db", "statement": "DELETE FROM t"},
                              headers={"Authorization": f"Bearer {agent.token()}"})
    assert created.status_code == 201
    approval_id = created.json()["id"]
    decision = {"decision": "approve", "reason": "ticket 42"}
    assert env.client.post(f"/v1/approvals/{approval_id}/decision", json=decision, headers=env.auditor).status_code == 403
    # People cannot create approvals; agents cannot read the index.
    assert env.client.post("/v1/approvals", json={}, headers=approver).status_code == 403
    assert env.client.get("/v1/sessions", headers={"Authorization": f"Bearer {agent.token()}"}).status_code == 401
    assert env.client.get("/v1/access-log", headers=approver).status_code == 403
    for headers in (env.auditor, approver, admin):
        assert env.client.get("/v1/sessions", headers=headers).status_code == 200
    expired = env.token("admin", ttl=-120)
    assert env.client.get("/v1/sessions", headers={"Authorization": f"Bearer {expired}"}).status_code == 401
    foreign = jwt.encode({"iss": "warden-collector", "aud": "warden-api", "sub": "x", "role": "admin",
                          "iat": int(time.time()), "exp": int(time.time()) + 60, "jti": "j"},
                         Ed25519PrivateKey.generate(), algorithm="EdDSA")
    assert env.client.get("/v1/sessions", headers={"Authorization": f"Bearer {foreign}"}).status_code == 401
    wrong_aud = jwt.encode({"iss": "warden-collector", "aud": "other", "sub": "x", "role": "admin",
                            "iat": int(time.time()), "exp": int(time.time()) + 60, "jti": "j"},
                           env.keys.private_key, algorithm="EdDSA")
    assert env.client.get("/v1/sessions", headers={"Authorization": f"Bearer {wrong_aud}"}).status_code == 401
    assert env.client.post(f"/v1/approvals/{approval_id}/decision", json=decision, headers=approver).json()["decided_by"] == "alice"
    log = env.client.get("/v1/access-log", headers=admin).json()["items"]
    assert {"auditor-person", "alice", "root"} <= {entry["subject"] for entry in log}


def test_approval_long_poll_sees_decision(env):
    agent = SimulatedAgent("agent-w")
    env.enroll(agent)
    agent_headers = {"Authorization": f"Bearer {agent.token()}"}
    approval = env.client.post("/v1/approvals", json={"identity": "svc", "target": "db", "statement": "DROP TABLE t",
                                                      "session_id": "s1"}, headers=agent_headers).json()
    pending = env.client.get("/v1/approvals", params={"status": "pending"}, headers=env.auditor).json()["items"]
    assert [a["id"] for a in pending] == [approval["id"]]
    assert 'warden_collector_approvals_pending 1' in env.client.get("/metrics").text
    approver = {"Authorization": f"Bearer {env.token('approver', 'bob')}"}

    def decide_later():
        time.sleep(0.5)
        env.client.post(f"/v1/approvals/{approval['id']}/decision",
                        json={"decision": "deny", "reason": "not in a change window"}, headers=approver)
    thread = threading.Thread(target=decide_later)
    started = time.monotonic()
    thread.start()
    waited = env.client.get(f"/v1/approvals/{approval['id']}", params={"wait": 10}, headers=agent_headers).json()
    thread.join()
    assert waited["status"] == "denied" and waited["decided_by"] == "bob"
    assert waited["reason"] == "not in a change window" and time.monotonic() - started < 5
    again = env.client.post(f"/v1/approvals/{approval['id']}/decision",
                            json={"decision": "approve", "reason": "x"}, headers=approver)
    assert again.status_code == 409
    short = env.client.post("/v1/approvals", json={"statement": "x", "timeout_s": 0.01}, headers=agent_headers).json()
    time.sleep(0.05)
    assert env.client.get(f"/v1/approvals/{short['id']}", headers=agent_headers).json()["status"] == "expired"


def test_ocsf_export_carries_required_fields(env):
    agent = SimulatedAgent("agent-o")
    env.enroll(agent)
    _, evs = agent.session(identity="billing", target="db", statements=[("SELECT * FROM t", ["public.t"])],
                           decision="deny")
    # field names as enforcer/http/proxy.py and agent/inventory.py emit them
    evs.append(agent.event("session.start", {"identity": "billing", "target": "users-api", "protocol": "http",
                                             "orig_dst": "127.0.0.3:443", "client": "127.0.0.1:50123"}, "http-1"))
    evs.append(agent.event("http.request", {"method": "GET", "scheme": "https", "host": "api.internal", "port": 443,
                                            "path": "/v1/users", "query": "", "headers": {}, "body_bytes": 0,
                                            "request_index": 1, "decision": "allow", "policy_ids": ["p1"],
                                            "reason": "permitted by p1", "action": "http:GET",
                                            "resource": "users-api/api.internal/v1/users"}, "http-1"))
    evs.append(agent.event("conn.observed", {"process": {"pid": 7, "tgid": 7, "comm": "curl", "exe": "/usr/bin/curl",
                                                         "uid": 1000}, "dst_ip": "127.0.0.3", "dst_port": 443,
                                             "target": None, "attempts": 1, "established": 1, "failed": 0}))
    env.ingest(agent, evs)
    lines = [json.loads(l) for l in env.client.get("/v1/export/ocsf", headers=env.auditor).text.splitlines()]
    assert sorted(r["class_uid"] for r in lines) == [4001, 4002, 6005]
    for record in lines:
        missing = [f for f in REQUIRED[record["class_uid"]] if record.get(f) in (None, "", {})]
        assert not missing, (record["class_uid"], missing)
        assert record["type_uid"] == record["class_uid"] * 100 + record["activity_id"]
        assert record["metadata"]["product"]["name"] == "Warden" and record["metadata"]["version"]
    datastore = next(r for r in lines if r["class_uid"] == 6005)
    assert datastore["activity_id"] == 1 and datastore["query_info"]["query_string"] == "SELECT * FROM t"
    assert datastore["disposition_id"] == 2 and datastore["status_id"] == 2  # the policy denied it
    http = next(r for r in lines if r["class_uid"] == 4002)
    assert http["activity_id"] == 3 and http["http_request"]["url"]["path"] == "/v1/users"
    assert http["src_endpoint"] == {"ip": "127.0.0.1", "port": 50123}   # from its session.start
    network = next(r for r in lines if r["class_uid"] == 4001)
    assert network["dst_endpoint"] == {"ip": "127.0.0.3", "port": 443}
    plain = env.client.get("/v1/export/ndjson", headers=env.auditor).text.splitlines()
    assert len(plain) == len(evs)


def test_event_pagination_with_cursor(env):
    agent = SimulatedAgent("agent-p")
    env.enroll(agent)
    _, evs = agent.session(identity="svc", target="db", start_ns=T0,
                           statements=[(f"SELECT {i} FROM t", ["public.t"]) for i in range(25)])
    env.ingest(agent, evs)
    seen, cursor = [], None
    while True:
        page = env.client.get("/v1/events", params={"table": "public.t", "limit": 10, "cursor": cursor},
                              headers=env.auditor).json()
        seen += [e["seq"] for e in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == sorted(seen) and len(seen) == 25 == len(set(seen))
    assert env.client.get("/v1/events", params={"cursor": "garbage"}, headers=env.auditor).status_code == 400
    assert env.client.get("/v1/events", params={"since": "yesterday-ish"}, headers=env.auditor).status_code == 400


def test_healthz_and_openapi(env):
    assert env.client.get("/healthz").json()["status"] == "ok"
    paths = env.client.get("/openapi.json").json()["paths"]
    for path in ("/v1/ingest", "/v1/sessions", "/v1/sessions/{sid}", "/v1/sessions/{sid}/events", "/v1/events",
                 "/v1/agents", "/v1/verify", "/v1/export/ocsf", "/v1/approvals", "/v1/approvals/{approval_id}",
                 "/v1/approvals/{approval_id}/decision", "/v1/agents/enroll"):
        assert path in paths, path


def test_approval_webhook_is_hmac_signed(tmp_path):
    import hmac
    from http.server import BaseHTTPRequestHandler, HTTPServer
    received = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.headers.get("X-Warden-Signature"), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        config = CollectorConfig(state_dir=str(tmp_path / "state"), db=f"sqlite:///{tmp_path}/c.db")
        config.webhook.url, config.webhook.secret = f"http://127.0.0.1:{server.server_port}/hook", "s3cret"
        app = create_app(config)
        with TestClient(app) as client:
            agent = SimulatedAgent("agent-h")
            with app.state.store.write() as c:
                enrollment = create_enrollment_token(c, 60)
            client.post("/v1/agents/enroll", json=agent.enroll_body(enrollment))
            created = client.post("/v1/approvals", json={"statement": "DELETE FROM t"},
                                  headers={"Authorization": f"Bearer {agent.token()}"}).json()
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        signature, body = received[0]
        assert signature == "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
        assert json.loads(body)["approval"]["id"] == created["id"]
        app.state.store.dispose()
    finally:
        server.shutdown()
        server.server_close()
