"""The collector reads the fields the agent really emits.

Every event here comes from the real emitter, not typed by hand: HTTP sessions from
enforcer.http.proxy.serve_http (an asyncio upstream on loopback, a real Cedar policy) whose
approvals go through enforcer.approvals.ApprovalClient to a real collector served by uvicorn on
loopback; Postgres statements from the sans-IO enforcer.postgres.session.PostgresSession decided
by enforcer.postgres.proxy.decide_now; conn.observed from agent.inventory.Inventory; process
records from agent.procinfo (this test process). They are then sealed, signed and ingested
like an agent's batches (collector.simulate seals them; it only chains and signs).
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import warnings

import pytest
from sqlalchemy import select

warnings.filterwarnings("ignore", category=DeprecationWarning)

import httpx  # noqa: E402
import uvicorn  # noqa: E402

import collector.queries as queries  # noqa: E402
from agent import procinfo  # noqa: E402
from agent.bpfmgr import EV_ATTEMPT, EV_ESTABLISHED, Capture  # noqa: E402
from agent.inventory import Inventory  # noqa: E402
from collector.client_cli import replay_steps  # noqa: E402
from collector.config import CollectorConfig  # noqa: E402
from collector.ingest import set_ingest_workers  # noqa: E402
from collector.simulate import SimulatedAgent  # noqa: E402
from collector.storage.schema import events as events_table  # noqa: E402
from enforcer.approvals import ApprovalClient  # noqa: E402
from enforcer.context import Attribution, ConnectionContext, TargetInfo  # noqa: E402
from enforcer.http.proxy import serve_http  # noqa: E402
from enforcer.policy.engine import PolicyEngine  # noqa: E402
from enforcer.postgres import protocol as P  # noqa: E402
from enforcer.postgres.proxy import decide_now  # noqa: E402
from enforcer.postgres.session import PostgresSession  # noqa: E402
from tests.pg_harness import collector_pg_url_fixture, fresh_postgres_database  # noqa: E402
from tests.unit.test_collector_retention import Env  # noqa: E402
from tests.unit.test_pg_session import AUTH_DONE, STARTUP, Driver  # noqa: E402

HTTP_POLICY = """
@id("billing-reads")
permit(principal == Service::"billing", action == Action::"http:GET", resource in Target::"api");

@id("billing-refunds")
permit(principal == Service::"billing", action == Action::"http:POST", resource in Endpoint::"api/api/refunds");

@id("refunds-need-approval")
@approval("required")
forbid(principal, action == Action::"http:POST", resource in Endpoint::"api/api/refunds")
unless { context.approved };
"""

PG_POLICY = """
@id("billing-db")
permit(principal == Service::"billing", action, resource in Target::"db");
"""

UPSTREAM_BODY = b"hello world"
APPROVER = "alice.approver"


# --- recording what the enforcers emit -----------------------------------------------------

class Recorder:
    """The enforcers' event sink: (type, fields, session id, ts) in emit order, as the agent's
    record writer receives them."""

    def __init__(self):
        self.events: list[tuple[str, dict, str | None, int]] = []

    def emit(self, event_type: str, fields: dict, session_id: str | None = None) -> None:
        self.events.append((event_type, dict(fields), session_id, time.time_ns()))


def this_process() -> procinfo.ProcessInfo:
    """The workload's attribution: this test process, described by the agent's own code."""
    pid = os.getpid()
    return procinfo.describe(pid, pid, os.getuid(), os.getgid(), "python3", 0)


def agent_start_fields(protocol: str, target: str, orig_dst: str, client: str, agent_id: str) -> dict:
    """The session.start fields agent/daemon.py prepares for the enforcers (session_start_fields)."""
    return {"identity": "billing", "target": target, "protocol": protocol, "orig_dst": orig_dst,
            "process": procinfo.as_record(this_process()), "client": client, "host": "app-1", "agent": agent_id}


async def _upstream(reader, writer):
    """An HTTP/1.1 server answering every request with 200 and UPSTREAM_BODY."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(UPSTREAM_BODY), UPSTREAM_BODY))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def _record_http_sessions(approvals_env: Env, agent: SimulatedAgent) -> list:
    """Three sessions through serve_http: a GET and a POST held for approval and approved; a POST
    denied by the approver; a POST nobody decides (approval.expired)."""
    recorder = Recorder()
    upstream = await asyncio.start_server(_upstream, "127.0.0.1", 0)
    upstream_port = upstream.sockets[0].getsockname()[1]
    collector = uvicorn.Server(uvicorn.Config(approvals_env.app, host="127.0.0.1", port=0, log_level="warning",
                                              lifespan="off"))
    serving = asyncio.create_task(collector.serve())
    while not collector.started:
        assert not serving.done(), "the collector did not start"
        await asyncio.sleep(0.01)
    collector_url = f"http://127.0.0.1:{collector.servers[0].sockets[0].getsockname()[1]}"
    policy, process = PolicyEngine.from_text(HTTP_POLICY), this_process()
    settings = {"approvals": ApprovalClient(collector_url, agent.token, timeout_s=20)}
    sessions = []

    async def enforce(reader, writer):
        client_ip, client_port = writer.get_extra_info("peername")[:2]
        sessions.append(f"http-{len(sessions) + 1}")
        attribution = Attribution(orig_ip="127.0.0.1", orig_port=upstream_port, family=socket.AF_INET,
                                  target_id=1, client_ip=client_ip, client_port=client_port,
                                  socket_cookie=len(sessions), connect_ns=time.monotonic_ns(), process=process)
        ctx = ConnectionContext(sessions[-1], "billing", {}, TargetInfo("api", "http", "127.0.0.1", upstream_port),
                                attribution, recorder, policy=policy, approvals=settings["approvals"])
        ctx.extra["session_start_fields"] = agent_start_fields(
            "http", "api", f"127.0.0.1:{upstream_port}", f"{client_ip}:{client_port}", agent.agent_id)
        await serve_http(reader, writer, ctx)

    proxy = await asyncio.start_server(enforce, "127.0.0.1", 0)
    proxy_url = f"http://127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
    approver = approvals_env.headers("approver", APPROVER)

    async def decide(verdict: str, reason: str) -> None:
        async with httpx.AsyncClient(base_url=collector_url, headers=approver) as people:
            while True:
                pending = (await people.get("/v1/approvals", params={"status": "pending"})).json()["items"]
                if pending:
                    break
                await asyncio.sleep(0.05)
            answer = await people.post(f"/v1/approvals/{pending[0]['id']}/decision",
                                       json={"decision": verdict, "reason": reason})
            assert answer.status_code == 200, answer.text

    try:
        async with httpx.AsyncClient(base_url=proxy_url, headers={"Host": "api"}) as workload:
            assert (await workload.get("/status")).status_code == 200
            posted, _ = await asyncio.gather(workload.post("/refunds", content=b"{}"),
                                             decide("approve", "ticket CHG-1"))
            assert posted.status_code == 200
        async with httpx.AsyncClient(base_url=proxy_url, headers={"Host": "api"}) as workload:
            posted, _ = await asyncio.gather(workload.post("/refunds", content=b"{}"), decide("deny", "freeze"))
            assert posted.status_code == 403
        settings["approvals"] = ApprovalClient(collector_url, agent.token, timeout_s=0.3)
        async with httpx.AsyncClient(base_url=proxy_url, headers={"Host": "api"}) as workload:
            assert (await workload.post("/refunds", content=b"{}")).status_code == 403
        deadline = time.monotonic() + 5
        while sum(1 for e in recorder.events if e[0] == "session.end") < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        proxy.close()
        upstream.close()
        collector.should_exit = True
        await serving
    return recorder.events


def record_pg_session(statements: list[tuple[str, str]], sid: str = "pg-1") -> list:
    """A Postgres session through PostgresSession: each (sql, command tag) is decided by the real
    policy engine and answered by the server; a last statement stays unanswered when the client
    goes away."""
    policy = PolicyEngine.from_text(PG_POLICY)
    ctx = ConnectionContext(session_id=sid, identity="billing", identity_attrs={},
                            target=TargetInfo("db", "postgres", "127.0.0.2", 5432), attribution=None, sink=None,
                            policy=policy)
    session = PostgresSession(identity="billing", target="db", start_fields=agent_start_fields(
        "postgres", "db", "127.0.0.2:5432", "127.0.0.1:45678", "pg-agent"))
    driver = Driver(session=session, decider=lambda request: decide_now(ctx, request.sql)[0])
    driver.client(STARTUP).server(AUTH_DONE)
    for sql, tag in statements:
        driver.client(P.build_query(sql))
        if tag is not None:
            driver.server(P.build_command_complete(tag) + P.build_ready_for_query("I"))
    driver._run(session.finish("client_closed"))
    now = time.time_ns()
    return [(event_type, fields, sid, now + n) for n, (event_type, fields) in enumerate(driver.events)]


def record_conn_observed(destinations: list[tuple[str, int]]) -> list:
    """conn.observed as the agent's inventory aggregates the kernel's connect reports."""
    def describe(cap: Capture) -> dict:
        return procinfo.as_record(procinfo.describe(cap.tgid, cap.pid, cap.uid, cap.gid, cap.comm, cap.cgroup_id))
    inventory = Inventory(describe, lambda target_id: None)
    for cookie, (ip, port) in enumerate(destinations, start=1):
        capture = Capture(cookie=cookie, cgroup_id=0, ktime_ns=time.monotonic_ns(), orig_ip=ip, orig_port=port,
                          target_id=0, tgid=os.getpid(), pid=os.getpid(), uid=os.getuid(), gid=os.getgid(),
                          family=6 if ":" in ip else 4, flags=0, comm="python3")
        inventory.on_event(EV_ATTEMPT, capture)
        inventory.on_event(EV_ESTABLISHED, capture)
    now = time.time_ns()
    return [("conn.observed", fields, None, now + n) for n, fields in enumerate(inventory.flush())]


def seal(agent: SimulatedAgent, recorded: list) -> list[dict]:
    return [agent.event(event_type, fields, sid, ts) for event_type, fields, sid, ts in recorded]


def held_request_batches(agent: SimulatedAgent, recorded: list) -> list[list[dict]]:
    """The recording cut into batches right after each request held for approval, so its
    outcome (policy.decision) always arrives in a later batch, as it does when a human decides."""
    batches, current = [], []
    for event in seal(agent, recorded):
        current.append(event)
        if event["type"] == "http.request" and event["f"].get("decision") == "approval":
            batches.append(current)
            current = []
    return batches + [current] if current else batches


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def http_recording(tmp_path_factory):
    work = tmp_path_factory.mktemp("approvals")
    approvals_env = Env(CollectorConfig(state_dir=str(work / "state"), db=f"sqlite:///{work}/c.db",
                                        ingest_workers=0))
    try:
        agent = SimulatedAgent("approvals-agent")
        approvals_env.enroll(agent)
        recorded = asyncio.run(asyncio.wait_for(_record_http_sessions(approvals_env, agent), 90))
    finally:
        approvals_env.close()
        set_ingest_workers(None)
    assert [e[2] for e in recorded if e[0] == "session.start"] == ["http-1", "http-2", "http-3"]
    return recorded


pg_url = pytest.fixture(scope="module", name="pg_url")(collector_pg_url_fixture)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def env(request, tmp_path):
    """A collector (the app, in-process) on the parametrized database backend."""
    if request.param == "sqlite":
        db = f"sqlite:///{tmp_path}/c.db"
    else:
        db = fresh_postgres_database(request.getfixturevalue("pg_url"), f"fields_{request.node.name[:40]}"
                                      .replace("[", "_").replace("]", "").replace("-", "_").lower())
    env = Env(CollectorConfig(state_dir=str(tmp_path / "state"), db=db, ingest_workers=0))
    yield env
    env.close()
    set_ingest_workers(None)


@pytest.fixture
def sqlite_env(tmp_path):
    env = Env(CollectorConfig(state_dir=str(tmp_path / "state"), db=f"sqlite:///{tmp_path}/c.db", ingest_workers=0))
    yield env
    env.close()
    set_ingest_workers(None)


def stored(env: Env, sid: str) -> list[dict]:
    return env.client.get(f"/v1/sessions/{sid}/events", headers=env.headers("auditor")).json()["items"]


def ocsf_export(env: Env) -> list[dict]:
    return [json.loads(line) for line in
            env.client.get("/v1/export/ocsf", headers=env.headers("auditor")).text.splitlines()]


# --- 1. http.response: body_bytes --------------------------------------------------------------

def test_http_response_summary_reads_body_bytes(sqlite_env, http_recording):
    agent = SimulatedAgent("http-agent")
    sqlite_env.enroll(agent)
    sqlite_env.ingest(agent, seal(agent, http_recording))
    responses = [e for e in stored(sqlite_env, "http-1") + stored(sqlite_env, "http-2")
                 if e["type"] == "http.response"]
    assert [e["summary"] for e in responses] == [f"{e['fields']['status']} bytes={e['fields']['body_bytes']}"
                                                 for e in responses]
    assert [e["summary"] for e in responses][:2] == [f"200 bytes={len(UPSTREAM_BODY)}"] * 2
    assert responses[2]["summary"].startswith("403 bytes=") and responses[2]["fields"]["body_bytes"] > 0


# --- 2. conn.observed: dst_ip / dst_port -------------------------------------------------------

def test_conn_observed_summary_and_ocsf_read_dst_ip_and_port(sqlite_env):
    agent = SimulatedAgent("inventory-agent")
    sqlite_env.enroll(agent)
    recorded = record_conn_observed([("127.0.0.7", 443), ("2001:db8::7", 5432)])
    sqlite_env.ingest(agent, seal(agent, recorded))
    found = sqlite_env.client.get("/v1/events", params={"type": "conn.observed"},
                                  headers=sqlite_env.headers("auditor")).json()["items"]
    exe = recorded[0][1]["process"]["exe"]
    assert exe and [e["summary"] for e in found] == [f"{exe} -> 127.0.0.7:443", f"{exe} -> [2001:db8::7]:5432"]
    network = [r for r in ocsf_export(sqlite_env) if r["class_uid"] == 4001]
    assert [r["dst_endpoint"] for r in network] == [{"ip": "127.0.0.7", "port": 443},
                                                    {"ip": "2001:db8::7", "port": 5432}]
    assert network[0]["actor"]["process"]["pid"] == os.getpid()


# --- 3. pg.statement kinds are pglast node names -----------------------------------------------

PG_STATEMENTS = [
    ("SELECT * FROM customers", "SELECT 1", 1),                           # SelectStmt -> Read
    ("INSERT INTO orders VALUES (1)", "INSERT 0 1", 5),                   # InsertStmt -> Write
    ("UPDATE orders SET paid = true WHERE id = 1", "UPDATE 1", 2),        # UpdateStmt -> Update
    ("DELETE FROM orders WHERE id = 1", "DELETE 1", 7),                   # DeleteStmt -> Delete
    ("TRUNCATE audit", "TRUNCATE TABLE", 7),                              # TruncateStmt -> Delete
    ("CREATE TABLE scratch (a int)", "CREATE TABLE", 6),                  # CreateStmt -> Create
    ("ALTER TABLE scratch ADD COLUMN b int", "ALTER TABLE", 2),           # AlterTableStmt -> Update
    ("DROP TABLE scratch", "DROP TABLE", 7),                              # DropStmt -> Delete
    ("WITH gone AS (DELETE FROM orders RETURNING *) SELECT * FROM gone", "SELECT 1", 7),  # deletes
    ("GRANT SELECT ON customers TO reports", "GRANT", 4),                 # GrantStmt -> Query
    ("COPY orders FROM STDIN", None, 5),                                  # COPY in -> Write
]


def test_ocsf_datastore_activity_from_real_statement_kinds(sqlite_env):
    agent = SimulatedAgent("pg-agent")
    sqlite_env.enroll(agent)
    recorded = record_pg_session([(sql, tag) for sql, tag, _ in PG_STATEMENTS])
    sqlite_env.ingest(agent, seal(agent, recorded))
    kinds = [f["kind"] for t, f, _, _ in recorded if t == "pg.statement"]
    assert kinds[:4] == ["SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt"]   # what the enforcer records
    datastore = [r for r in ocsf_export(sqlite_env) if r["class_uid"] == 6005]
    assert [(r["query_info"]["query_string"], r["activity_id"]) for r in datastore] == \
        [(sql, activity) for sql, _, activity in PG_STATEMENTS]
    assert [r["query_info"]["name"] for r in datastore] == kinds
    assert all(r["type_uid"] == 600500 + r["activity_id"] for r in datastore)


def test_simulated_statements_match_the_real_classifier():
    """collector.simulate's kind/action for its statements are what enforcer/sqlclass.py says."""
    from enforcer.sqlclass import classify_sql
    agent = SimulatedAgent("sim")
    texts = ["SELECT * FROM t", "INSERT INTO t VALUES (1)", "UPDATE t SET a = 1", "DELETE FROM t"]
    _, evs = agent.session(identity="svc", target="db", statements=[(text, ["public.t"]) for text in texts])
    simulated = [(e["f"]["kind"], e["f"]["action"]) for e in evs if e["type"] == "pg.statement"]
    assert simulated == [(c.kind, c.action) for text in texts for c in classify_sql(text)]


def test_simulator_refuses_field_names_the_agent_cannot_record():
    """Like the agent's record writer, so fake events cannot drift from records/schema.py again."""
    from records.schema import SchemaError
    agent = SimulatedAgent("sim")
    with pytest.raises(SchemaError, match="daddr"):
        agent.event("conn.observed", {"daddr": "127.0.0.10", "dport": 443})
    with pytest.raises(SchemaError, match="decided_by"):
        agent.event("approval.decided", {"approval_id": "a1", "decision": "approved", "decided_by": "bob"})
    assert agent.seq == 0   # nothing was sealed


# --- 4. OCSF records carry the session's process and endpoints ---------------------------------

def test_ocsf_records_carry_the_session_process_and_endpoints(env, http_recording, monkeypatch):
    agent = SimulatedAgent("ocsf-agent")
    env.enroll(agent)
    pg_recorded = record_pg_session([("SELECT * FROM customers", "SELECT 1")])
    env.ingest(agent, seal(agent, http_recording + pg_recorded))
    lookups = []
    real_lookup = queries.session_starts

    def counted(connection, sids):
        lookups.extend(sids)
        return real_lookup(connection, sids)
    monkeypatch.setattr(queries, "session_starts", counted)
    monkeypatch.setattr(queries, "MAX_LIMIT", 4)   # the export spans many pages
    records = ocsf_export(env)
    assert sorted(lookups) == ["http-1", "http-2", "http-3", "pg-1"]   # once per session, not per event or page

    starts = {sid: f for t, f, sid, _ in http_recording + pg_recorded if t == "session.start"}
    process = starts["http-1"]["process"]
    assert process["pid"] == os.getpid() and process["exe"]
    http = [r for r in records if r["class_uid"] == 4002]
    assert len(http) == 4
    for record in http:
        start = starts[record["metadata"]["correlation_uid"]]
        client_ip, client_port = start["client"].rsplit(":", 1)
        upstream_ip, upstream_port = start["orig_dst"].rsplit(":", 1)
        assert record["actor"]["process"]["pid"] == os.getpid()
        assert record["actor"]["process"]["file"] == {"path": process["exe"]}
        assert record["actor"]["user"]["name"] == "billing"
        assert record["src_endpoint"] == {"ip": client_ip, "port": int(client_port)}
        assert record["dst_endpoint"] == {"ip": upstream_ip, "port": int(upstream_port), "hostname": "api"}
    [datastore] = [r for r in records if r["class_uid"] == 6005]
    assert datastore["actor"]["process"]["pid"] == os.getpid()
    assert datastore["src_endpoint"] == {"ip": "127.0.0.1", "port": 45678}
    assert datastore["dst_endpoint"] == {"ip": "127.0.0.2", "port": 5432}
    assert datastore["database"]["name"] == "app"   # the database the client logged in to (session.start)


# --- 5. approval.*: approver, reason, latency --------------------------------------------------

def test_approval_summaries_show_approver_reason_and_latency(sqlite_env, http_recording):
    agent = SimulatedAgent("approval-agent")
    sqlite_env.enroll(agent)
    sqlite_env.ingest(agent, seal(agent, http_recording))
    recorded = {(t, sid): f for t, f, sid, _ in http_recording if t.startswith("approval.")}

    approved = [e for e in stored(sqlite_env, "http-1") if e["type"].startswith("approval.")]
    requested, decided = recorded[("approval.requested", "http-1")], recorded[("approval.decided", "http-1")]
    approval_id = requested["approval_id"]
    assert [(e["type"], e["summary"], e["decision"]) for e in approved] == [
        ("approval.requested", f"approval {approval_id} requested: POST api/refunds (http:POST on api/refunds), "
                               f"waiting up to 20 s", "pending"),
        ("approval.decided", f"approval {approval_id} approved by {APPROVER}: ticket CHG-1 "
                             f"(after {decided['latency_ns'] / 1e9:.3f} s)", "approved")]
    denied = [e for e in stored(sqlite_env, "http-2") if e["type"] == "approval.decided"]
    assert denied[0]["summary"].startswith(f"approval {recorded[('approval.decided', 'http-2')]['approval_id']} "
                                           f"denied by {APPROVER}: freeze (after ")
    assert denied[0]["decision"] == "denied"
    expired = [e for e in stored(sqlite_env, "http-3") if e["type"] == "approval.expired"]
    assert [(e["summary"], e["decision"]) for e in expired] == [
        (f"approval {recorded[('approval.expired', 'http-3')]['approval_id']} expired: no decision within 0.3 s",
         "expired")]

    # `warden replay` shows them as steps
    steps = replay_steps(stored(sqlite_env, "http-1"))
    step = next(s for s in steps if s["step"] == "approval.decided")
    assert APPROVER in step["text"] and "ticket CHG-1" in step["text"] and " s)" in step["text"]
    assert step["decision"] == "approved"


# --- 6. pg.result with sqlstate present but None -----------------------------------------------

def test_pg_result_error_without_sqlstate(sqlite_env):
    agent = SimulatedAgent("pg-result-agent")
    sqlite_env.enroll(agent)
    recorded = record_pg_session([("SELECT 1", "SELECT 1"), ("SELECT pg_sleep(60)", None)])
    unanswered = [f for t, f, _, _ in recorded if t == "pg.result"][-1]
    assert "sqlstate" in unanswered and unanswered["sqlstate"] is None and unanswered["error"]
    sqlite_env.ingest(agent, seal(agent, recorded))
    results = [e["summary"] for e in stored(sqlite_env, "pg-1") if e["type"] == "pg.result"]
    assert results == ["SELECT 1 rows=1", "ERROR connection closed before the statement completed"]


# --- 7. an approval decided in a later batch ---------------------------------------------------

def test_approval_outcome_in_a_later_batch_decides_the_held_request(env, http_recording):
    agent = SimulatedAgent("late-agent")
    env.enroll(agent)
    batches = held_request_batches(agent, http_recording)
    assert len(batches) == 4
    for batch in batches:
        env.ingest(agent, batch)
    auditor = env.headers("auditor")

    def request_decisions(sid):
        return [e["decision"] for e in stored(env, sid) if e["type"] == "http.request"]
    assert request_decisions("http-1") == ["allow", "allow"]   # GET allowed; POST approved later
    assert request_decisions("http-2") == ["deny"]             # denied by the approver
    assert request_decisions("http-3") == ["deny"]             # nobody decided in time
    sessions = {s["id"]: s for s in env.client.get("/v1/sessions", headers=auditor).json()["items"]}
    assert {sid: s["denied_count"] for sid, s in sessions.items()} == {"http-1": 0, "http-2": 1, "http-3": 1}
    assert env.client.get("/v1/sessions", params={"decision": "approval"}, headers=auditor).json()["items"] == []
    denied = env.client.get("/v1/sessions", params={"decision": "deny"}, headers=auditor).json()["items"]
    assert sorted(s["id"] for s in denied) == ["http-2", "http-3"]
    # the evidence itself is untouched: only the index's decision column changed
    assert env.client.get("/v1/verify", headers=auditor).json()["ok"] is True
    with env.store.read() as c:
        held = [json.loads(f) for f in c.execute(select(events_table.c.fields).where(
            events_table.c.type == "http.request", events_table.c.sid == "http-1")
            .order_by(events_table.c.seq)).scalars()]
    assert [f["decision"] for f in held] == ["allow", "approval"]
