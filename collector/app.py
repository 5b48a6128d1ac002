"""The collector's HTTP API (FastAPI). Endpoint handlers are thin: parse, authorize,
call the module that owns the work, shape the answer."""

import asyncio
import contextlib
import json
import logging
import time
from typing import Annotated, Iterator

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import insert, select

from collector import approvals as approvals_mod
from collector import queries, retention
from collector.auth import (ROLE_RANK, AuthError, CollectorKeys, ForbiddenError, OIDCVerifier, Principal,
                            looks_like_agent_token, verify_agent_token, verify_api_token)
from collector.config import CollectorConfig
from collector.ingest import IngestRejected, enroll_agent, ingest_batch, set_ingest_workers
from collector.integrity import verify_store
from collector.metrics import Counters, render
from collector.ocsf import OCSF_EVENT_TYPES, to_ocsf
from collector.storage.engine import Store
from collector.storage.schema import access_log, agent_keys, agents
from collector.timeparse import TimeFormatError, format_ns, now_ns, parse_duration_ns, parse_time_ns

log = logging.getLogger("warden.collector")
MAX_BATCH_BYTES = 64 * 1024 * 1024
MAX_WAIT_S = 120.0
_EXPORT_SESSION_CACHE = 10_000   # session.start fields an OCSF export keeps at once


class EnrollRequest(BaseModel):
    token: str
    agent_id: str
    public_key: str = Field(description="base64 of the raw 32-byte Ed25519 public key")
    hostname: str | None = None
    version: str | None = None


class ApprovalRequest(BaseModel):
    identity: str | None = None
    target: str | None = None
    statement: str | None = None
    session_id: str | None = None
    timeout_s: float | None = Field(None, description="defaults to approvals.timeout from the config")


class DecisionRequest(BaseModel):
    decision: str = Field(description="approve | deny")
    reason: str


def _time(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return parse_time_ns(value)
    except TimeFormatError as exc:
        raise HTTPException(400, f"{name}: {exc}") from None


def _window(at: str | None, window: str | None, since: str | None, until: str | None) -> tuple[int | None, int | None]:
    since_ns, until_ns = _time(since, "since"), _time(until, "until")
    if at is not None:
        center = _time(at, "at")
        try:
            half = parse_duration_ns(window or "5m")
        except TimeFormatError as exc:
            raise HTTPException(400, f"window: {exc}") from None
        since_ns, until_ns = center - half, center + half
    return since_ns, until_ns


async def _retention_loop(store: Store, keys: CollectorKeys, config: CollectorConfig) -> None:
    """Purge on start and then every retention.interval; replicas may all run it (each agent's
    purge locks that agent's row, so a second replica finds nothing left to purge)."""
    while True:
        try:
            result = await run_in_threadpool(retention.purge, store, keys.private_key, days=config.retention_days,
                                             actor="retention (scheduled)")
            if result["agents"]:
                log.info("retention purged %d batch(es), %d event(s), %d session(s) before %s",
                         result["batches"], result["events"], result["sessions"], result["before"])
        except Exception:
            log.exception("retention run failed; retrying at the next interval")
        await asyncio.sleep(config.retention_interval_s)


def create_app(config: CollectorConfig, store: Store | None = None) -> FastAPI:
    store = store or Store(config.database_url)
    store.migrate()
    if config.ingest_workers is not None:
        set_ingest_workers(config.ingest_workers)
    keys = CollectorKeys(config.state_dir)
    counters = Counters()
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        task = None
        if config.retention_days:
            task = asyncio.create_task(_retention_loop(store, keys, config))
        yield
        if task is not None:
            task.cancel()

    app = FastAPI(title="Warden collector", version="0.1.0", lifespan=lifespan,
                  description="Verified ingest of Warden session records, query, approvals and export.")
    app.state.store, app.state.keys, app.state.counters, app.state.config = store, keys, counters, config

    def bearer(request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPException(401, "missing bearer token: pass --token or set WARDEN_TOKEN",
                                headers={"WWW-Authenticate": "Bearer"})
        return token.strip()

    oidc = OIDCVerifier(config.tokens.oidc) if config.tokens.oidc else None

    def authenticate(request: Request, allow_agent: bool) -> Principal:
        token = bearer(request)
        try:
            if oidc is not None and config.tokens.oidc.issuer != config.tokens.issuer \
                    and oidc.claims_issuer_matches(token):
                return oidc.principal(token)
            with store.read() as connection:
                if allow_agent and looks_like_agent_token(token) is not None:
                    return verify_agent_token(connection, token)
                return verify_api_token(connection, keys, token, issuer=config.tokens.issuer,
                                        audience=config.tokens.audience)
        except AuthError as exc:
            counters.inc("warden_collector_verify_failures_total", reason="token")
            raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None
        except ForbiddenError as exc:
            raise HTTPException(403, str(exc)) from None

    def _log_access(principal: Principal, request: Request) -> None:
        if principal.kind != "person":
            return
        with store.write() as connection:
            connection.execute(insert(access_log).values(
                ts=now_ns(), subject=principal.subject, role=principal.role, method=request.method,
                path=request.url.path, query=str(request.url.query) or None))

    def person(min_role: str):
        def dependency(request: Request) -> Principal:
            principal = authenticate(request, allow_agent=False)
            if ROLE_RANK[principal.role] < ROLE_RANK[min_role]:
                raise HTTPException(403, f"role {principal.role!r} may not do this; needs {min_role} or higher")
            _log_access(principal, request)
            return principal
        return dependency

    def agent_only(request: Request) -> Principal:
        principal = authenticate(request, allow_agent=True)
        if principal.kind != "agent":
            raise HTTPException(403, "only an enrolled agent may do this")
        return principal

    def agent_or_reader(request: Request) -> Principal:
        principal = authenticate(request, allow_agent=True)
        _log_access(principal, request)
        return principal

    Auditor = Annotated[Principal, Depends(person("auditor"))]
    Approver = Annotated[Principal, Depends(person("approver"))]
    Admin = Annotated[Principal, Depends(person("admin"))]
    Agent = Annotated[Principal, Depends(agent_only)]

    @app.exception_handler(queries.QueryError)
    async def _query_error(_request, exc):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.get("/healthz", tags=["ops"])
    def healthz():
        version = store.schema_version()
        return {"status": "ok", "schema_version": version, "backend": "sqlite" if store.is_sqlite else "postgresql"}

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    def metrics():
        now = now_ns()
        gauges = []
        with store.read() as connection:
            gauges.append(("warden_collector_approvals_pending", "Approvals waiting for a decision.",
                           approvals_mod.pending_count(connection), ()))
            for row in connection.execute(select(agents)):
                labels = (("agent", row.agent_id),)
                if row.last_seen_ns:
                    gauges.append(("warden_collector_agent_last_seen_seconds",
                                   "Seconds since the agent last delivered a batch.", round((now - row.last_seen_ns) / 1e9, 3), labels))
                if row.last_event_ns:
                    gauges.append(("warden_collector_agent_lag_seconds",
                                   "Seconds between now and the newest stored event of the agent.",
                                   round((now - row.last_event_ns) / 1e9, 3), labels))
                gauges.append(("warden_collector_agent_last_seq", "Highest stored sequence number.", row.last_seq, labels))
                gauges.append(("warden_collector_agent_events", "Events stored for the agent.", row.events, labels))
                gauges.append(("warden_collector_agent_chain_ok", "1 if no gap or broken chain was seen.",
                               1 if row.chain_ok else 0, labels))
                gauges.append(("warden_collector_agent_chain_problems", "Gaps and breaks flagged at ingest.",
                               row.problem_count, labels))
        return PlainTextResponse(render(counters, gauges), media_type="text/plain; version=0.0.4")

    # --- agents ---------------------------------------------------------------

    @app.post("/v1/agents/enroll", tags=["agents"])
    def enroll(body: EnrollRequest):
        """Enroll an agent id with its Ed25519 key using a one-time enrollment token. An enrolled
        agent id keeps its key: another key is refused (409) unless the token was created for that
        agent id with `warden-collector enroll create --agent ID --rotate`."""
        try:
            result = enroll_agent(store, token=body.token, agent_id=body.agent_id, public_key_b64=body.public_key,
                                  hostname=body.hostname, version=body.version)
        except (AuthError, ForbiddenError) as exc:
            counters.inc("warden_collector_enrollments_total", result="refused")
            log.warning("refused enrollment of agent %r: %s", body.agent_id[:200], exc)
            raise HTTPException(401 if isinstance(exc, AuthError) else 403, str(exc)) from None
        except IngestRejected as exc:
            counters.inc("warden_collector_enrollments_total", result="refused")
            log.warning("refused enrollment of agent %r: %s", body.agent_id[:200], exc.detail)
            raise HTTPException(exc.status, exc.detail) from None
        counters.inc("warden_collector_enrollments_total", result="rotated" if result == "rotated" else "ok")
        return {"agent_id": body.agent_id}

    @app.post("/v1/ingest", tags=["agents"],
              openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {
                  "schema": {"type": "string", "format": "binary"}}}}})
    async def ingest(request: Request):
        principal = await run_in_threadpool(authenticate, request, True)
        if principal.kind != "agent":
            raise HTTPException(403, "only an enrolled agent may ingest")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BATCH_BYTES:
            raise HTTPException(413, f"batch larger than {MAX_BATCH_BYTES} bytes")
        # read at most the limit: an oversize or lying body never sits in memory whole
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BATCH_BYTES:
                raise HTTPException(413, f"batch larger than {MAX_BATCH_BYTES} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            result = await run_in_threadpool(ingest_batch, store, principal.subject, raw)
        except IngestRejected as exc:
            counters.inc("warden_collector_ingest_batches_total", result="rejected")
            counters.inc("warden_collector_verify_failures_total", reason=exc.reason)
            log.warning("refused batch from %s: %s", principal.subject, exc.detail)
            raise HTTPException(exc.status, exc.detail) from None
        if result.duplicate:
            counters.inc("warden_collector_ingest_batches_total", result="duplicate")
            return {"accepted": True, "duplicate": True, "last_seq": result.last_seq}
        counters.inc("warden_collector_ingest_batches_total", result="flagged" if result.problems else "ok")
        counters.inc("warden_collector_ingest_events_total", result.events)
        answer = {"accepted": True, "duplicate": False, "last_seq": result.last_seq}
        if result.problems:
            answer["problems"] = result.problems
        return answer

    @app.get("/v1/agents", tags=["query"])
    def list_agents(_: Auditor):
        """Enrolled agents, their chain state and their key history (`keys`, oldest first: which
        sequence numbers each key signed, when it was enrolled or rotated in, and who created the
        enrollment token)."""
        with store.read() as connection:
            items = queries.list_agents(connection)
            history: dict[str, list[dict]] = {}
            for row in connection.execute(select(agent_keys).order_by(agent_keys.c.agent_id, agent_keys.c.id)):
                history.setdefault(row.agent_id, []).append({
                    "key_id": row.key_id, "valid_from_seq": row.valid_from_seq, "valid_to_seq": row.valid_to_seq,
                    "enrolled": format_ns(row.enrolled_ns), "replaced": format_ns(row.replaced_ns),
                    "current": row.replaced_ns is None, "rotation": bool(row.rotation), "hostname": row.hostname,
                    "token_created_by": row.minted_by})
        for item in items:
            item["keys"] = history.get(item["agent_id"], [])
            item["key_rotations"] = sum(1 for key in item["keys"] if key["rotation"])
        return {"items": items}

    # --- sessions and events --------------------------------------------------

    @app.get("/v1/sessions", tags=["query"])
    def list_sessions(_: Auditor, identity: str | None = None, target: str | None = None,
                      host: str | None = None, table: str | None = None, decision: str | None = None,
                      user: str | None = Query(None, description="database role the session ran as (auth_user; "
                                                                 "brokered: the upstream role)"),
                      since: str | None = None, until: str | None = None,
                      limit: int = Query(100, ge=1, le=queries.MAX_LIMIT), cursor: str | None = None):
        """Sessions newest first, each with who (identity, process, host), how it connected (auth_user,
        database, client, orig_dst, tls_client, tls_upstream, credentials, client_user) and ended
        (end_reason, end_error, end_sqlstate)."""
        with store.read() as connection:
            return queries.list_sessions(connection, identity=identity, target=target, host=host, table=table,
                                         decision=decision, user=user, since=_time(since, "since"),
                                         until=_time(until, "until"), limit=limit, cursor=cursor).as_dict()

    @app.get("/v1/sessions/{sid}", tags=["query"])
    def get_session(sid: str, _: Auditor):
        """One session as listed, plus start_fields and end_fields: its session.start and session.end
        fields as recorded (auth method, TLS version and server name, brokered token claims, bytes)."""
        with store.read() as connection:
            session = queries.get_session(connection, sid, detail=True)
        if session is None:
            raise HTTPException(404, f"no session {sid}")
        return session

    @app.get("/v1/sessions/{sid}/events", tags=["query"])
    def get_session_events(sid: str, _: Auditor, limit: int = Query(1000, ge=1, le=queries.MAX_LIMIT),
                           cursor: str | None = None):
        with store.read() as connection:
            if queries.get_session(connection, sid) is None:
                raise HTTPException(404, f"no session {sid}")
            return queries.session_events(connection, sid, limit=limit, cursor=cursor).as_dict()

    @app.get("/v1/events", tags=["query"])
    def list_events(_: Auditor, table: str | None = None, identity: str | None = None,
                    type: str | None = None, sid: str | None = None, agent: str | None = None,
                    at: str | None = None, window: str | None = None,
                    since: str | None = None, until: str | None = None,
                    limit: int = Query(100, ge=1, le=queries.MAX_LIMIT), cursor: str | None = None):
        since_ns, until_ns = _window(at, window, since, until)
        with store.read() as connection:
            return queries.list_events(connection, table=table, identity=identity, event_type=type, sid=sid,
                                       agent_id=agent, since=since_ns, until=until_ns, limit=limit,
                                       cursor=cursor).as_dict()

    # --- integrity and export -------------------------------------------------

    @contextlib.contextmanager
    def _snapshot():
        """One read transaction that sees one state of the database throughout (SQLite's read
        transactions do; PostgreSQL needs REPEATABLE READ), so batches ingested while verify runs
        cannot make the index look inconsistent with the evidence."""
        if store.is_sqlite:
            with store.read() as connection:
                yield connection
            return
        with store.engine.connect() as connection:
            connection = connection.execution_options(isolation_level="REPEATABLE READ")
            with connection.begin():
                yield connection

    @app.get("/v1/verify", tags=["integrity"])
    def verify(_: Auditor, agent: str | None = None, since: str | None = None, until: str | None = None):
        started = time.monotonic()
        with _snapshot() as connection:
            report = verify_store(connection, agent_id=agent, since_ns=_time(since, "since"),
                                  until_ns=_time(until, "until"), checkpoint_key=keys.public_key)
        if not report["ok"]:
            counters.inc("warden_collector_verify_failures_total", len(report["problems"]), reason="evidence")
        report["elapsed_s"] = round(time.monotonic() - started, 3)
        return report

    def _export_lines(ocsf: bool, since_ns, until_ns, event_type) -> Iterator[bytes]:
        cursor = None
        hosts: dict[str, str | None] = {}
        # sid -> its session.start fields ({} if none is stored), looked up once per session
        # for all the events of a page at a time; bounded, oldest dropped (sessions of a
        # time-ordered export end and are not seen again)
        starts: dict[str, dict] = {}
        with store.read() as connection:
            hosts = {r.agent_id: r.hostname for r in connection.execute(select(agents.c.agent_id, agents.c.hostname))}
        while True:
            with store.read() as connection:
                page = queries.list_events(connection, since=since_ns, until=until_ns, event_type=event_type,
                                           limit=queries.MAX_LIMIT, cursor=cursor)
                if ocsf:
                    missing = {item["sid"] for item in page.items
                               if item["sid"] is not None and item["type"] in OCSF_EVENT_TYPES} - starts.keys()
                    if missing:
                        found = queries.session_starts(connection, missing)
                        for sid in missing:
                            starts[sid] = found.get(sid, {})
                        while len(starts) > _EXPORT_SESSION_CACHE:
                            del starts[next(iter(starts))]
            for item in page.items:
                if ocsf:
                    if item["type"] not in OCSF_EVENT_TYPES:
                        continue
                    record = to_ocsf(item, hosts.get(item["agent_id"]), starts.get(item["sid"]))
                    if record is None:
                        continue
                    yield (json.dumps(record, separators=(",", ":")) + "\n").encode()
                else:
                    yield (json.dumps(item, separators=(",", ":")) + "\n").encode()
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    @app.get("/v1/export/ocsf", tags=["integrity"], response_class=StreamingResponse)
    def export_ocsf(_: Auditor, since: str | None = None, until: str | None = None):
        """NDJSON of OCSF records (Datastore Activity 6005, HTTP Activity 4002, Network Activity 4001)."""
        return StreamingResponse(_export_lines(True, _time(since, "since"), _time(until, "until"), None),
                                 media_type="application/x-ndjson")

    @app.get("/v1/export/ndjson", tags=["integrity"], response_class=StreamingResponse)
    def export_ndjson(_: Auditor, since: str | None = None, until: str | None = None, type: str | None = None):
        """NDJSON of our own indexed events (all types)."""
        return StreamingResponse(_export_lines(False, _time(since, "since"), _time(until, "until"), type),
                                 media_type="application/x-ndjson")

    # --- approvals ------------------------------------------------------------

    @app.post("/v1/approvals", tags=["approvals"], status_code=201)
    def create_approval(body: ApprovalRequest, principal: Agent):
        timeout_ns = int(body.timeout_s * 1e9) if body.timeout_s else config.approval_timeout_ns
        with store.write() as connection:
            approval = approvals_mod.create_approval(
                connection, agent_id=principal.subject, identity=body.identity, target=body.target,
                statement=body.statement, session_id=body.session_id, timeout_ns=timeout_ns)
        approvals_mod.notify_webhook(config.webhook.url, config.webhook.secret, approval)
        return approval

    @app.get("/v1/approvals", tags=["approvals"])
    def list_approvals(_: Auditor, status: str | None = None, limit: int = Query(200, ge=1, le=1000)):
        with store.write() as connection:
            approvals_mod.expire_due(connection)
            return {"items": approvals_mod.list_approvals(connection, status, limit)}

    def _read_approval(approval_id: str) -> dict | None:
        with store.read() as connection:
            return approvals_mod.get_approval(connection, approval_id)

    @app.get("/v1/approvals/{approval_id}", tags=["approvals"])
    async def get_approval(approval_id: str, request: Request,
                           wait: float = Query(0, ge=0, description="long-poll up to this many seconds")):
        principal = await run_in_threadpool(agent_or_reader, request)
        if principal.kind == "person" and ROLE_RANK[principal.role] < ROLE_RANK["auditor"]:
            raise HTTPException(403, "forbidden")
        deadline = time.monotonic() + min(wait, MAX_WAIT_S)
        while True:
            approval = await run_in_threadpool(_read_approval, approval_id)
            if approval is None:
                raise HTTPException(404, f"no approval {approval_id}")
            if approval["status"] != "pending" or time.monotonic() >= deadline:
                return approval
            # Polling the database keeps replicas stateless: any one may take the decision.
            await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    @app.post("/v1/approvals/{approval_id}/decision", tags=["approvals"])
    def decide(approval_id: str, body: DecisionRequest, principal: Approver):
        try:
            with store.write() as connection:
                return approvals_mod.decide(connection, approval_id, decision=body.decision, reason=body.reason,
                                            decided_by=principal.subject)
        except approvals_mod.ApprovalError as exc:
            raise HTTPException(exc.status, exc.detail) from None

    # --- administration -------------------------------------------------------

    @app.post("/v1/retention/run", tags=["admin"])
    def run_retention(principal: Admin, days: int | None = Query(None, ge=0,
                                                                 description="default: retention.days")):
        days = days if days is not None else config.retention_days
        if days is None:
            raise HTTPException(400, "no retention period: set retention.days in collector.yaml or pass ?days=N")
        return retention.purge(store, keys.private_key, days=days, actor=principal.subject)

    @app.get("/v1/access-log", tags=["admin"])
    def read_access_log(_: Admin, since: str | None = None, limit: int = Query(200, ge=1, le=1000)):
        query = select(access_log).order_by(access_log.c.id.desc()).limit(limit)
        since_ns = _time(since, "since")
        if since_ns is not None:
            query = query.where(access_log.c.ts >= since_ns)
        with store.read() as connection:
            return {"items": [{"time": format_ns(r.ts), "subject": r.subject, "role": r.role, "method": r.method,
                               "path": r.path, "query": r.query} for r in connection.execute(query)]}

    return app
