"""Derive the query index (events, tables touched, sessions) from decoded events.

Agents write fields by event type; this module is the one place that knows which
field means identity, target, tables or a one-line summary, and it tolerates
fields it does not know.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field


def _json_default(value):
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "base64:" + base64.b64encode(bytes(value)).decode()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


# One encoder, built once: json.dumps with options builds a new encoder per call,
# which is measurable at ingest rates. Output is identical to json.dumps(...).
_encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=_json_default)


def _direct_encoder():
    """The C encoder JSONEncoder.encode uses, called without its per-call Python wrapper
    and circular-reference bookkeeping (decoded msgpack cannot be circular): about half
    the cost per event. None when this Python's json lacks it or disagrees on a sample."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    try:
        iterencode = make(None, _json_default, json.encoder.encode_basestring_ascii, None, ":", ",",
                          True, False, True)
    except TypeError:  # another Python's signature
        return None

    def encode(value) -> str:
        return "".join(iterencode(value, 0))

    sample = {"b": [1, 2.5, None, True, "é\n"], "a": {"z": b"\x00", "y": (1,)}, "c": -(2**70), "d": float("nan")}
    try:
        return encode if encode(sample) == _encoder.encode(sample) else None
    except Exception:
        return None


canonical_json = _direct_encoder() or _encoder.encode


def _name(value) -> str | None:
    """identity/target may be a string or a mapping with a name."""
    if value is None:
        return None
    if isinstance(value, dict):
        for key in ("name", "id", "identity", "target"):
            if isinstance(value.get(key), str):
                return value[key]
        return None
    return str(value)


def _text(value) -> str | None:
    """A text column's value (the binary COPY on PostgreSQL takes str only; SQLite's TEXT
    affinity stored other scalars as their text anyway)."""
    return value if value is None or type(value) is str else str(value)


def table_names(fields: dict) -> list[str]:
    raw = fields.get("tables") or []
    if isinstance(raw, (str, dict)):
        raw = [raw]
    names = []
    for item in raw:
        if isinstance(item, dict):
            schema, name = item.get("schema"), item.get("name") or item.get("table")
            item = f"{schema}.{name}" if schema and name else name
        if item:
            text = str(item).strip().strip('"').lower()
            if text and text not in names:
                names.append(text)
    return names


def _table_list(raw) -> list[str]:
    """table_names for the usual shape (one clean, lower-case name), else the general rule."""
    if type(raw) is list and len(raw) == 1:
        item = raw[0]
        if type(item) is str and item and item == item.strip().strip('"').lower():
            return raw
    return table_names({"tables": raw})


def table_base(name: str) -> str:
    """public.customers -> customers (unqualified queries match any schema)."""
    return name.rsplit(".", 1)[-1]


def _clip(text, limit: int = 500) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def summarize(event_type: str, f: dict) -> str:
    if event_type == "pg.statement":
        return _clip(f.get("text") or f.get("sql") or "")
    if event_type == "pg.result":
        if f.get("error") or f.get("sqlstate"):
            # the session records sqlstate None for errors the server never sent (connection
            # closed, statement not executed): present with no value
            return _clip(" ".join(str(p) for p in ("ERROR", f.get("sqlstate"), f.get("error")) if p))
        # command_tag is the schema name; "tag" was written by early simulators and is still read.
        parts = [str(f.get("command_tag") or f.get("tag") or "")]
        if f.get("rows") is not None:
            parts.append(f"rows={f['rows']}")
        return _clip(" ".join(p for p in parts if p))
    if event_type == "http.request":
        host = f.get("host") or ""
        return _clip(f"{f.get('method', '')} {host}{f.get('path', '')}".strip())
    if event_type == "http.response":
        status, body_bytes = f.get("status", ""), f.get("body_bytes")
        return _clip(f"{status} bytes={body_bytes}" if body_bytes is not None else str(status))
    if event_type == "policy.decision":
        policies = f.get("policy_ids") or f.get("policies") or []
        return _clip(f"{f.get('decision', '')} {' '.join(map(str, policies))}".strip())
    if event_type.startswith("approval."):
        return _clip(approval_summary(event_type, f))
    if event_type == "mask.applied":
        return _clip(mask_summary(f))
    if event_type == "conn.observed":
        process = f.get("process") if isinstance(f.get("process"), dict) else {}
        exe = process.get("exe") or process.get("comm") or ""
        return _clip(f"{exe} -> {host_port(f.get('dst_ip'), f.get('dst_port'))}")
    if event_type == "session.start":
        process = f.get("process") if isinstance(f.get("process"), dict) else {}
        return _clip(f"{process.get('exe') or ''} pid={process.get('pid', '')}".strip())
    return _clip(canonical_json(f), 300)


def host_port(ip, port) -> str:
    """"127.0.0.5:443", "[2001:db8::1]:443" (conn.observed's dst_ip/dst_port)."""
    ip = "" if ip is None else str(ip)
    if ":" in ip:
        ip = f"[{ip}]"
    return f"{ip}:{port}" if port is not None else ip


def _seconds(value) -> str:
    return f"{value:g} s" if isinstance(value, (int, float)) else f"{value} s"


def approval_summary(event_type: str, f: dict) -> str:
    """One line per approval step, with what enforcer/approvals.py records: who decided,
    why and how long the statement or request waited."""
    approval = f"approval {f.get('approval_id') or '?'}"
    if event_type == "approval.requested":
        text = f"{approval} requested: {f.get('summary') or ''}"
        if f.get("action") or f.get("resource"):
            text += f" ({f.get('action') or '?'} on {f.get('resource') or '?'})"
        return text + (f", waiting up to {_seconds(f['timeout_s'])}" if f.get("timeout_s") is not None else "")
    if event_type == "approval.decided":
        text = f"{approval} {f.get('decision') or 'decided'} by {f.get('approver') or '?'}"
        if f.get("reason"):
            text += f": {f['reason']}"
        latency_ns = f.get("latency_ns")
        return text + (f" (after {latency_ns / 1e9:.3f} s)" if isinstance(latency_ns, (int, float)) else "")
    if event_type == "approval.expired":
        timeout = f" within {_seconds(f['timeout_s'])}" if f.get("timeout_s") is not None else ""
        return f"{approval} expired: no decision{timeout}"
    return f"{approval} {canonical_json(f)}"


def mask_summary(f: dict) -> str:
    """"3 value(s) masked in 2 row(s): email=2, ssn=1" from a mask.applied event."""
    count = f.get("values_masked", f.get("count"))
    head = f"{count} value(s) masked" if count is not None else "masked"
    if f.get("rows"):
        head += f" in {f['rows']} row(s)"
    detail = f.get("columns") or f.get("fields") or f.get("column")
    if isinstance(detail, dict) and detail:
        head += ": " + ", ".join(f"{name}={n}" for name, n in detail.items())
    elif isinstance(detail, (list, str)) and detail:
        head += ": " + (", ".join(map(str, detail)) if isinstance(detail, list) else detail)
    rules = f.get("rules") or f.get("rule")
    if isinstance(rules, dict) and rules:
        head += " (rules " + ", ".join(f"{name}={n}" for name, n in rules.items()) + ")"
    elif rules:
        head += f" (rules {', '.join(map(str, rules)) if isinstance(rules, list) else rules})"
    return head


def _same_step(request: dict, decision: dict) -> bool:
    """False when both name their statement/request index and the indexes differ."""
    for key in ("statement_index", "request_index"):
        if key in request and key in decision:
            return request[key] == decision[key]
    return True


# Decisions a later policy.decision may replace: held for approval, or none yet (an
# SNI-only TLS stream's request is recorded before its decision).
OPEN_DECISIONS = (None, "approval")


@dataclass(frozen=True)
class LateDecision:
    """A policy.decision whose http.request is not in its batch: the outcome of an approval
    usually is not, since a human took time to decide. Ingest applies it to the stored
    request, keyed by session and request_index. Postgres needs none: a statement held for
    approval is recorded once decided, carrying its decision."""
    sid: str
    request_index: int
    decision: str


# approval.decided carries its decision ("approved"/"denied"); the other steps imply theirs.
_APPROVAL_STATES = {"approval.requested": "pending", "approval.expired": "expired"}


def _decision(event_type: str, f: dict) -> str | None:
    value = f.get("decision")
    if value is None:
        value = _APPROVAL_STATES.get(event_type)
    return str(value) if value is not None else None


# Process attribution a session.start may carry as top-level fields (records/schema.py
# _PROCESS) instead of one `process` record (agent/procinfo.as_record, what the agent sends).
_PROCESS_FIELDS = ("pid", "tgid", "exe", "cmdline", "comm", "uid", "user", "gid", "systemd_unit", "cgroup",
                   "cgroup_id", "container")

# The session row's "how" columns, filled from session.start / session.end (the events keep
# every field; these are what `warden sessions` filters on and shows at a glance).
SESSION_START_COLUMNS = ("auth_user", "database_name", "client", "orig_dst", "tls_client", "tls_upstream",
                         "credentials", "client_user")
SESSION_END_COLUMNS = ("end_reason", "end_error", "end_sqlstate")
# column -> its length in collector/storage/schema.py: a value the workload controls (a startup
# parameter) must never make PostgreSQL refuse the batch, so longer values are clipped
_COLUMN_LIMITS = {"auth_user": 255, "database_name": 255, "client": 255, "orig_dst": 255, "credentials": 50,
                  "client_user": 255, "end_reason": 100, "end_error": 2000, "end_sqlstate": 10}


def _column_text(value, limit: int) -> str | None:
    """A short text column's value: str, no NUL (PostgreSQL text cannot hold one), at most limit characters."""
    if value is None or isinstance(value, (dict, list)):
        return None
    text = value if type(value) is str else str(value)
    if "\x00" in text:
        text = text.replace("\x00", "")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _flag(value) -> bool | None:
    return value if isinstance(value, bool) else None


def session_start_columns(f: dict) -> dict:
    """The sessions table's "how" columns from a session.start's fields, as the enforcers emit them:
    enforcer/postgres/session.py _emit_start (database, auth_user: the role the session runs as
    upstream, tls_client, tls_upstream), enforcer/postgres/broker.py record_fields (credentials,
    brokered_user, client_user), agent/daemon.py (client, orig_dst) and enforcer/http/proxy.py
    (tls_client and x_tls_*/x_sni, present only when the client spoke TLS)."""
    limits = _COLUMN_LIMITS
    tls_client = _flag(f.get("tls_client"))
    if tls_client is None:
        tls_client = _flag(f.get("tls"))    # the schema's generic flag (records/corpus.py writes it)
    if tls_client is None and f.get("protocol") == "http" and f.get("x_client_tls") is None:
        # the HTTP enforcer adds its TLS fields to every connection that began with a TLS
        # record (intercepted, relayed by SNI or refused): without them the client spoke plain HTTP
        tls_client = False
    return {
        "auth_user": _column_text(f.get("auth_user") or f.get("brokered_user"), limits["auth_user"]),
        "database_name": _column_text(f.get("database"), limits["database_name"]),
        "client": _column_text(f.get("client") or f.get("client_addr"), limits["client"]),
        "orig_dst": _column_text(f.get("orig_dst"), limits["orig_dst"]),
        "tls_client": tls_client,
        "tls_upstream": _flag(f.get("tls_upstream")),
        "credentials": _column_text(f.get("credentials"), limits["credentials"]),
        "client_user": _column_text(f.get("client_user"), limits["client_user"]),
    }


def session_end_columns(f: dict) -> dict:
    """How the session ended, from its session.end: reason, error, last SQLSTATE."""
    limits = _COLUMN_LIMITS
    return {"end_reason": _column_text(f.get("reason"), limits["end_reason"]),
            "end_error": _column_text(f.get("error") or None, limits["end_error"]),
            "end_sqlstate": _column_text(f.get("sqlstate") or None, limits["end_sqlstate"])}


def session_process(f: dict):
    """A session.start's process record; built from the top-level process fields when it has none."""
    process = f.get("process")
    if process is None:
        found = {key: f[key] for key in _PROCESS_FIELDS if f.get(key) is not None}
        process = found or None
    return process


@dataclass
class SessionDelta:
    """What one batch adds to one session row."""
    sid: str
    agent_id: str
    start: dict | None = None        # columns from session.start
    end_ns: int | None = None
    end: dict | None = None          # SESSION_END_COLUMNS from session.end
    first_ts: int | None = None
    events: int = 0
    statements: int = 0
    requests: int = 0
    denied: int = 0


# Column order of the positional rows build_index produces (bulk inserts take them as is).
EVENT_COLUMNS = ("agent_id", "seq", "ts", "sid", "type", "identity", "target", "summary", "decision",
                 "batch_id", "event_hash", "fields")
TABLE_COLUMNS = ("agent_id", "seq", "table_name", "table_base", "ts", "sid")
_DECISION, _BATCH_ID = EVENT_COLUMNS.index("decision"), EVENT_COLUMNS.index("batch_id")
_IDENTITY, _TARGET = EVENT_COLUMNS.index("identity"), EVENT_COLUMNS.index("target")


@dataclass
class BatchIndex:
    event_rows: list[list] = field(default_factory=list)   # EVENT_COLUMNS order
    table_rows: list[tuple] = field(default_factory=list)  # TABLE_COLUMNS order
    sessions: dict[str, SessionDelta] = field(default_factory=dict)
    # sid -> rows still lacking identity/target: their session started in an earlier batch
    unresolved: dict[str, list[list]] = field(default_factory=dict)
    late_decisions: list[LateDecision] = field(default_factory=list)

    def set_batch_id(self, batch_id: int) -> None:
        for row in self.event_rows:
            row[_BATCH_ID] = batch_id

    def resolve(self, stored_sessions: dict[str, tuple]) -> None:
        """Fill identity/target of rows whose session.start is already stored."""
        for sid, rows in self.unresolved.items():
            identity, target = stored_sessions.get(sid, (None, None))
            for row in rows:
                row[_IDENTITY] = row[_IDENTITY] or identity
                row[_TARGET] = row[_TARGET] or target


def build_index(agent_id: str, hostname: str | None, batch_id: int, events: list[dict],
                known_sessions: dict[str, tuple[str | None, str | None]]) -> BatchIndex:
    """known_sessions: sid -> (identity, target) of sessions already stored; it is
    extended in place with sessions started in this batch."""
    index = BatchIndex()
    last_request: dict[str, tuple] = {}  # sid -> (row, fields) of the statement/request awaiting its decision
    event_rows, table_rows = index.event_rows, index.table_rows
    # The hot loop of ingest: names bound locally, no per-event helper calls where a
    # type test does (a plain str identity/target is what _name would return anyway).
    sessions, unresolved = index.sessions, index.unresolved
    append_event, append_table = event_rows.append, table_rows.append
    name_of, summary_of, to_json, decision_of, tables_of = _name, summarize, canonical_json, _decision, _table_list
    for ev in events:
        f = ev.get("f") or {}
        event_type, sid, ts, seq = ev["type"], ev.get("sid"), int(ev["ts"]), int(ev["seq"])
        identity, target = f.get("identity"), f.get("target")
        if type(identity) is not str:
            identity = name_of(identity)
        if type(target) is not str:
            target = name_of(target)
        if sid is not None:
            if event_type == "session.start":
                known_sessions[sid] = (identity, target)
            if identity is None or target is None:
                inherited = known_sessions.get(sid, (None, None))
                identity, target = identity or inherited[0], target or inherited[1]
        decision = f.get("decision")
        if decision is not None:
            decision = decision if type(decision) is str else str(decision)
        elif event_type.startswith("approval."):
            decision = decision_of(event_type, f)
        denied = False
        if event_type == "policy.decision":
            # A statement or request carries its own decision; a policy.decision event is the
            # outcome of one held for approval (or, from older agents, a request's decision):
            # copy it onto the pending statement/request it decided, unless that is already
            # decided or names another statement/request index; a request not in this batch
            # (a human took time to approve) is left to ingest as a LateDecision. Denials are
            # counted once: on the statement/request, else on the decision (its request was
            # held for approval, or an SNI-only TLS stream's: not counted). A Postgres
            # statement always carries its decision.
            denied = decision in ("deny", "denied") and "statement_index" not in f
            pending = last_request.get(sid) if sid is not None and decision else None
            if pending is not None and _same_step(pending[1], f):
                del last_request[sid]
                if pending[0][_DECISION] in OPEN_DECISIONS:
                    pending[0][_DECISION] = decision
                else:
                    denied = False          # counted on the statement it came with
            elif sid is not None and decision and type(f.get("request_index")) is int:
                index.late_decisions.append(LateDecision(sid, f["request_index"], decision))
        elif event_type == "pg.statement" or event_type == "http.request":
            denied = decision in ("deny", "denied")
        row = [agent_id, seq, ts, sid, event_type, identity, target, summary_of(event_type, f), decision,
               batch_id, ev["hash"].hex(), to_json(f)]
        append_event(row)
        tables = f.get("tables")
        if tables:
            for name in tables_of(tables):
                append_table((agent_id, seq, name, name.rsplit(".", 1)[-1], ts, sid))
        if sid is None:
            continue
        if (identity is None or target is None) and sid not in known_sessions:
            unresolved.setdefault(sid, []).append(row)
        if event_type == "pg.statement" or event_type == "http.request":
            last_request[sid] = (row, f)
        delta = sessions.get(sid)
        if delta is None:
            delta = sessions[sid] = SessionDelta(sid, agent_id)
        delta.events += 1
        first_ts = delta.first_ts
        delta.first_ts = ts if first_ts is None or ts < first_ts else first_ts
        if event_type == "session.start":
            process = session_process(f)
            delta.start = {
                "identity": identity, "target": target,
                "host": _text(f.get("host") or hostname),
                "protocol": _text(f.get("protocol")),
                "process": canonical_json(process) if process is not None else None,
                "start_ns": ts,
                **session_start_columns(f),
            }
        elif event_type == "session.end":
            delta.end_ns = ts
            delta.end = session_end_columns(f)
        elif event_type == "pg.statement":
            delta.statements += 1
        elif event_type == "http.request":
            delta.requests += 1
        if denied:
            delta.denied += 1
    return index
