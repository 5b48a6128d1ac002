"""Read side of the index: sessions, events, agents — filters, time ranges (UTC ns)
and opaque cursor pagination ordered by time."""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass

from sqlalchemy import Connection, and_, or_, select

from collector.indexer import table_base
from collector.storage.schema import agent_problems, agents, event_tables, events, sessions
from collector.timeparse import format_ns, now_ns

MAX_LIMIT = 1000


class QueryError(ValueError):
    """400: a filter or cursor the caller must fix."""


def encode_cursor(*values) -> str:
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, arity: int) -> list:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except Exception:
        raise QueryError("bad cursor: pass back the next_cursor value unchanged") from None
    if not isinstance(values, list) or len(values) != arity:
        raise QueryError("bad cursor: pass back the next_cursor value unchanged")
    return values


def _limit(limit: int | None, default: int = 100) -> int:
    if limit is None:
        return default
    if limit < 1:
        raise QueryError("limit must be at least 1")
    return min(int(limit), MAX_LIMIT)


def _table_condition(column_name, column_base, table: str):
    name = table.strip().strip('"').lower()
    if "." in name:
        # The base-name condition lets the (table_base, ts) index do the range scan.
        return and_(column_base == table_base(name), column_name == name)
    return column_base == table_base(name)


@dataclass
class Page:
    items: list[dict]
    next_cursor: str | None

    def as_dict(self) -> dict:
        return {"items": self.items, "next_cursor": self.next_cursor, "count": len(self.items)}


def _flag(value) -> bool | None:
    return None if value is None else bool(value)


def session_dict(row) -> dict:
    process = json.loads(row.process) if row.process else None
    return {
        "id": row.sid, "agent_id": row.agent_id, "host": row.host, "identity": row.identity,
        "target": row.target, "protocol": row.protocol, "process": process,
        "start_ns": row.start_ns, "start": format_ns(row.start_ns),
        "end_ns": row.end_ns, "end": format_ns(row.end_ns),
        "event_count": row.event_count, "statement_count": row.statement_count,
        "request_count": row.request_count, "denied_count": row.denied_count,
        # how it connected (session.start) and ended (session.end); None: not recorded
        "auth_user": row.auth_user, "database": row.database_name, "client": row.client,
        "orig_dst": row.orig_dst, "tls_client": _flag(row.tls_client), "tls_upstream": _flag(row.tls_upstream),
        "credentials": row.credentials, "client_user": row.client_user,
        "end_reason": row.end_reason, "end_error": row.end_error, "end_sqlstate": row.end_sqlstate,
    }


def event_dict(row, tables: list[str] | None = None) -> dict:
    return {
        "agent_id": row.agent_id, "seq": row.seq, "ts": row.ts, "time": format_ns(row.ts),
        "sid": row.sid, "type": row.type, "identity": row.identity, "target": row.target,
        "summary": row.summary, "decision": row.decision, "hash": row.event_hash,
        "fields": json.loads(row.fields), **({"tables": tables} if tables is not None else {}),
    }


def list_sessions(connection: Connection, *, identity=None, target=None, host=None, table=None,
                  decision=None, user=None, since=None, until=None, limit=None, cursor=None) -> Page:
    """user: the database role the session ran as (auth_user; brokered: the upstream role)."""
    limit = _limit(limit)
    query = select(sessions)
    conditions = []
    if identity:
        conditions.append(sessions.c.identity == identity)
    if user:
        conditions.append(sessions.c.auth_user == user)
    if target:
        conditions.append(sessions.c.target == target)
    if host:
        conditions.append(sessions.c.host == host)
    if since is not None:  # sessions still open at `since` count too
        conditions.append(or_(sessions.c.end_ns.is_(None), sessions.c.end_ns >= since))
    if until is not None:
        conditions.append(sessions.c.start_ns <= until)
    if table:
        touched = select(event_tables.c.sid).where(
            _table_condition(event_tables.c.table_name, event_tables.c.table_base, table),
            event_tables.c.sid.is_not(None))
        if since is not None:
            touched = touched.where(event_tables.c.ts >= since)
        if until is not None:
            touched = touched.where(event_tables.c.ts <= until)
        conditions.append(sessions.c.sid.in_(touched))
    if decision:
        # statements and requests carry their decision; policy.decision holds approval outcomes
        decided = select(events.c.sid).where(
            events.c.type.in_(("pg.statement", "http.request", "policy.decision")), events.c.decision == decision)
        conditions.append(sessions.c.sid.in_(decided))
    if cursor:
        start_ns, sid = decode_cursor(cursor, 2)
        conditions.append(or_(sessions.c.start_ns < start_ns,
                              and_(sessions.c.start_ns == start_ns, sessions.c.sid < sid)))
    rows = connection.execute(query.where(*conditions)
                              .order_by(sessions.c.start_ns.desc(), sessions.c.sid.desc())
                              .limit(limit + 1)).fetchall()
    items = [session_dict(r) for r in rows[:limit]]
    next_cursor = encode_cursor(rows[limit - 1].start_ns, rows[limit - 1].sid) if len(rows) > limit else None
    return Page(items, next_cursor)


def get_session(connection: Connection, sid: str, *, detail: bool = False) -> dict | None:
    """detail: add start_fields and end_fields, the session.start and session.end fields as
    recorded (auth method, TLS version and server name, token claims, bytes, ...): {} if not stored."""
    row = connection.execute(select(sessions).where(sessions.c.sid == sid)).first()
    if row is None:
        return None
    session = session_dict(row)
    if detail:
        session["start_fields"], session["end_fields"] = {}, {}
        moments = [ts for ts in (row.start_ns, row.end_ns) if ts is not None]
        if moments:
            # one (sid, ts) probe of ix_events_sid each, not a walk over the session's events
            for found in connection.execute(select(events.c.type, events.c.fields).where(
                    events.c.sid == sid, events.c.ts.in_(moments),
                    events.c.type.in_(("session.start", "session.end"))).order_by(events.c.agent_id, events.c.seq)):
                key = "start_fields" if found.type == "session.start" else "end_fields"
                if not session[key]:
                    session[key] = json.loads(found.fields)
    return session


def _tables_for(connection: Connection, rows) -> dict[tuple, list[str]]:
    keys = {(r.agent_id, r.seq) for r in rows}
    if not keys:
        return {}
    found: dict[tuple, list[str]] = {}
    by_agent: dict[str, list[int]] = {}
    for agent_id, seq in keys:
        by_agent.setdefault(agent_id, []).append(seq)
    for agent_id, seqs in by_agent.items():
        for chunk_start in range(0, len(seqs), 500):
            chunk = seqs[chunk_start:chunk_start + 500]
            for t in connection.execute(select(event_tables.c.agent_id, event_tables.c.seq, event_tables.c.table_name)
                                        .where(event_tables.c.agent_id == agent_id, event_tables.c.seq.in_(chunk))):
                found.setdefault((t.agent_id, t.seq), []).append(t.table_name)
    return found


def session_starts(connection: Connection, sids) -> dict[str, dict]:
    """sid -> the fields of its session.start, for the sids that have one stored."""
    sids = sorted(set(sids))
    found: dict[str, dict] = {}
    for chunk_start in range(0, len(sids), 500):
        chunk = sids[chunk_start:chunk_start + 500]
        # the session row keeps its start's ts: one (sid, ts) probe of ix_events_sid per
        # session, not a walk over all its events
        for row in connection.execute(select(events.c.sid, events.c.fields).join(
                sessions, and_(sessions.c.sid == events.c.sid, sessions.c.start_ns == events.c.ts)).where(
                sessions.c.sid.in_(chunk), events.c.type == "session.start")):
            found.setdefault(row.sid, json.loads(row.fields))
    return found


def session_events(connection: Connection, sid: str, *, limit=None, cursor=None) -> Page:
    limit = _limit(limit, 1000)
    conditions = [events.c.sid == sid]
    if cursor:
        agent_id, seq = decode_cursor(cursor, 2)
        conditions.append(or_(events.c.agent_id > agent_id, and_(events.c.agent_id == agent_id, events.c.seq > seq)))
    rows = connection.execute(select(events).where(*conditions)
                              .order_by(events.c.agent_id, events.c.seq).limit(limit + 1)).fetchall()
    tables = _tables_for(connection, rows[:limit])
    items = [event_dict(r, tables.get((r.agent_id, r.seq), [])) for r in rows[:limit]]
    next_cursor = encode_cursor(rows[limit - 1].agent_id, rows[limit - 1].seq) if len(rows) > limit else None
    return Page(items, next_cursor)


def list_events(connection: Connection, *, table=None, identity=None, event_type=None, sid=None,
                agent_id=None, since=None, until=None, limit=None, cursor=None) -> Page:
    """Ordered by (ts, agent, seq) ascending. With a table filter the scan starts on
    event_tables' (table, ts) index."""
    limit = _limit(limit)
    conditions = []
    if table:
        query = select(events).join(event_tables, and_(event_tables.c.agent_id == events.c.agent_id,
                                                       event_tables.c.seq == events.c.seq))
        conditions.append(_table_condition(event_tables.c.table_name, event_tables.c.table_base, table))
        range_column = ts_column = event_tables.c.ts
        if "." not in table:
            # An unqualified name can match several schemas' tables in one event.
            query, ts_column = query.distinct(), events.c.ts
    else:
        query = select(events)
        range_column = ts_column = events.c.ts
    if since is not None:
        conditions.append(range_column >= since)
    if until is not None:
        conditions.append(range_column <= until)
    if identity:
        conditions.append(events.c.identity == identity)
    if event_type:
        if event_type.endswith("*"):
            conditions.append(events.c.type.like(event_type[:-1].replace("%", r"\%") + "%"))
        else:
            conditions.append(events.c.type == event_type)
    if sid:
        conditions.append(events.c.sid == sid)
    if agent_id:
        conditions.append(events.c.agent_id == agent_id)
    if cursor:
        ts, cursor_agent, seq = decode_cursor(cursor, 3)
        conditions.append(or_(ts_column > ts, and_(ts_column == ts, or_(
            events.c.agent_id > cursor_agent, and_(events.c.agent_id == cursor_agent, events.c.seq > seq)))))
    rows = connection.execute(query.where(*conditions)
                              .order_by(ts_column, events.c.agent_id, events.c.seq).limit(limit + 1)).fetchall()
    page = rows[:limit]
    tables = _tables_for(connection, page)
    items = [event_dict(r, tables.get((r.agent_id, r.seq), [])) for r in page]
    last = rows[limit - 1] if len(rows) > limit else None
    next_cursor = encode_cursor(last.ts, last.agent_id, last.seq) if last is not None else None
    return Page(items, next_cursor)


def list_agents(connection: Connection) -> list[dict]:
    now = now_ns()
    result = []
    for row in connection.execute(select(agents).order_by(agents.c.agent_id)):
        problems = connection.execute(select(agent_problems).where(agent_problems.c.agent_id == row.agent_id)
                                      .order_by(agent_problems.c.id.desc()).limit(20)).fetchall()
        result.append({
            "agent_id": row.agent_id, "hostname": row.hostname, "version": row.version,
            "enrolled": format_ns(row.enrolled_ns), "last_seen_ns": row.last_seen_ns,
            "last_seen": format_ns(row.last_seen_ns), "last_event": format_ns(row.last_event_ns),
            "lag_seconds": round((now - row.last_event_ns) / 1e9, 3) if row.last_event_ns else None,
            "last_seq": row.last_seq, "last_hash": bytes(row.last_hash).hex() if row.last_hash else None,
            "batches": row.batches, "events": row.events, "spool_backlog": row.spool_backlog,
            "chain_ok": bool(row.chain_ok), "problem_count": row.problem_count,
            "problems": [{"kind": p.kind, "seq": p.seq, "batch_id": p.batch_id, "detail": p.detail,
                          "detected": format_ns(p.detected_ns)} for p in problems],
        })
    return result
