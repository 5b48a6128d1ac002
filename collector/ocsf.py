"""Our events as OCSF (schema 1.1) records, one JSON object per line.

Mapping:
  pg.statement   -> Datastore Activity (class_uid 6005, category 6 Application Activity);
                    activity from what the statement does (its action, else its kind, the
                    pglast node name enforcer/sqlclass.py records): reads (SelectStmt, COPY TO)
                    -> 1 Read, UpdateStmt/Alter* -> 2 Update, InsertStmt/COPY FROM -> 5 Write,
                    Create* -> 6 Create, DeleteStmt/TruncateStmt/Drop* -> 7 Delete, otherwise
                    4 Query. database.name = the session's database (else target),
                    query_info.query_string = text.
  http.request   -> HTTP Activity (4002, category 4 Network Activity); activity from the method
                    (CONNECT 1, DELETE 2, GET 3, HEAD 4, OPTIONS 5, POST 6, PUT 7, TRACE 8, PATCH 9).
  conn.observed  -> Network Activity (4001); activity 1 Open; dst_endpoint = dst_ip:dst_port.
Every record: time (ms), type_uid = class_uid*100 + activity_id, severity_id 1, status,
metadata (product Warden, version, uid = agent:seq, the event hash as correlation),
actor (identity + process), src/dst endpoints, unmapped (our raw fields).
Statements and requests name neither process nor endpoints: those are on their session's
session.start (process, client, orig_dst), which the caller passes as `start`.
A policy deny shows as disposition_id 2 (Blocked) / status_id 2 (Failure).
Other event types are not exported to OCSF (they are in the plain NDJSON export).
"""
from __future__ import annotations

OCSF_VERSION = "1.1.0"
PRODUCT = {"name": "Warden", "vendor_name": "Warden", "version": "0.1.0"}

CLASS_DATASTORE, CLASS_HTTP, CLASS_NETWORK = 6005, 4002, 4001
# Attributes each class requires (base event + class), checked by the tests.
REQUIRED = {
    CLASS_DATASTORE: ["activity_id", "category_uid", "class_uid", "metadata", "severity_id", "time",
                      "type_uid", "actor", "src_endpoint"],
    CLASS_HTTP: ["activity_id", "category_uid", "class_uid", "metadata", "severity_id", "time",
                 "type_uid", "http_request", "dst_endpoint"],
    CLASS_NETWORK: ["activity_id", "category_uid", "class_uid", "metadata", "severity_id", "time",
                    "type_uid", "src_endpoint", "dst_endpoint"],
}

READ, UPDATE, QUERY, WRITE, CREATE, DELETE = 1, 2, 4, 5, 6, 7     # Datastore Activity ids
# What a statement does (enforcer/sqlclass.py's action: its most consequential access) comes
# first: WITH d AS (DELETE ...) SELECT deletes, COPY reads or writes by direction.
_ACTION_ACTIVITY = {"pg:select": READ, "pg:copy_out": READ, "pg:insert": WRITE, "pg:copy_in": WRITE,
                    "pg:update": UPDATE, "pg:delete": DELETE}
# Otherwise its kind, the parser's node name (DDL is pg:ddl whatever it does).
_KIND_ACTIVITY = {"SelectStmt": READ, "InsertStmt": WRITE, "UpdateStmt": UPDATE, "DeleteStmt": DELETE,
                  "TruncateStmt": DELETE, "MergeStmt": WRITE, "IndexStmt": CREATE, "ViewStmt": CREATE}
_KIND_PREFIX_ACTIVITY = (("Create", CREATE), ("Drop", DELETE), ("Alter", UPDATE), ("Rename", UPDATE))
_HTTP_ACTIVITY = {"CONNECT": 1, "DELETE": 2, "GET": 3, "HEAD": 4, "OPTIONS": 5, "POST": 6, "PUT": 7,
                  "TRACE": 8, "PATCH": 9}
OCSF_EVENT_TYPES = ("pg.statement", "http.request", "conn.observed")


def datastore_activity(fields: dict) -> int:
    """The Datastore Activity id of a pg.statement."""
    activity = _ACTION_ACTIVITY.get(fields.get("action"))
    if activity is not None:
        return activity
    kind = fields.get("kind") or ""
    if kind in _KIND_ACTIVITY:
        return _KIND_ACTIVITY[kind]
    for prefix, activity in _KIND_PREFIX_ACTIVITY:
        if kind.startswith(prefix):
            return activity
    return QUERY


def _process(process) -> dict | None:
    if not isinstance(process, dict):
        return None
    out = {"pid": process.get("pid", process.get("tgid")), "name": process.get("comm") or process.get("exe"),
           "file": {"path": process.get("exe")} if process.get("exe") else None,
           "cmd_line": " ".join(process["cmdline"]) if isinstance(process.get("cmdline"), list)
           else process.get("cmdline"),
           "user": {"name": process.get("user"), "uid": str(process["uid"])} if process.get("uid") is not None
           else None}
    return {k: v for k, v in out.items() if v is not None}


def _endpoint(value, fallback_name=None) -> dict:
    if isinstance(value, dict):
        out = {"ip": value.get("ip") or value.get("addr"), "port": value.get("port"),
               "hostname": value.get("host") or value.get("hostname"), "name": value.get("name")}
        return {k: v for k, v in out.items() if v is not None} or {"name": fallback_name or "unknown"}
    if isinstance(value, str) and value:
        host, _, port = value.rpartition(":")
        if port.isdigit() and host:
            return {"ip": host.strip("[]"), "port": int(port)}
        return {"hostname": value}
    return {"name": fallback_name or "unknown"}


def to_ocsf(event: dict, host: str | None = None, start: dict | None = None) -> dict | None:
    """event: an /v1/events item (agent_id, seq, ts, sid, type, identity, target, decision, hash, fields);
    start: the fields of its session's session.start, when it has one."""
    event_type, f = event["type"], event.get("fields") or {}
    start = start or {}
    identity = event.get("identity") or start.get("identity") or "unknown"
    actor = {"app_name": identity, "user": {"name": identity, "type_id": 3}}  # 3 = System (a service)
    # conn.observed names its process; a statement's or request's is its session's
    process = _process(f.get("process") if event_type == "conn.observed" else start.get("process"))
    if process:
        actor["process"] = process
    device = host or event["agent_id"]
    client = _endpoint(start.get("client"), device)
    if event_type == "pg.statement":
        kind = f.get("kind")
        class_uid, category_uid, activity_id = CLASS_DATASTORE, 6, datastore_activity(f)
        specific = {
            "database": {"name": start.get("database") or event.get("target") or "unknown", "type_id": 99,
                         "type": "PostgreSQL"},
            "query_info": {"query_string": f.get("text") or "", "name": kind or None},
            "src_endpoint": client,
            "dst_endpoint": _endpoint(start.get("orig_dst"), event.get("target")),
            "type_id": 1, "type": "Database",
        }
    elif event_type == "http.request":
        method = str(f.get("method") or "").upper()
        class_uid, category_uid, activity_id = CLASS_HTTP, 4, _HTTP_ACTIVITY.get(method, 99)
        host_header = f.get("host") or event.get("target") or "unknown"
        dst = _endpoint(start.get("orig_dst"), host_header)
        if f.get("host"):
            dst["hostname"] = f["host"]   # the name asked for, beside the address connected to
        specific = {
            "http_request": {"http_method": method or None,
                             "url": {"hostname": host_header, "path": f.get("path") or "/",
                                     "scheme": f.get("scheme") or "https"}},
            "src_endpoint": client,
            "dst_endpoint": dst,
        }
    elif event_type == "conn.observed":
        class_uid, category_uid, activity_id = CLASS_NETWORK, 4, 1
        dst = {"ip": f.get("dst_ip"), "port": f.get("dst_port")} if f.get("dst_ip") else None
        specific = {"src_endpoint": _endpoint(None, device), "dst_endpoint": _endpoint(dst, "unknown")}
    else:
        return None
    denied = (event.get("decision") or f.get("decision")) in ("deny", "denied")
    record = {
        "class_uid": class_uid, "category_uid": category_uid, "activity_id": activity_id,
        "type_uid": class_uid * 100 + activity_id, "severity_id": 1,
        "time": int(event["ts"]) // 1_000_000, "status_id": 2 if denied else 1,
        "metadata": {"version": OCSF_VERSION, "product": PRODUCT, "uid": f"{event['agent_id']}:{event['seq']}",
                     "correlation_uid": event.get("sid"), "original_time": event.get("time"),
                     "log_name": "warden", "event_code": event_type},
        "actor": actor,
        "device": {"hostname": device, "type_id": 6},  # 6 = Virtual
        "unmapped": {"warden": {"hash": event.get("hash"), "target": event.get("target"), "fields": f}},
        **specific,
    }
    if denied:
        record["disposition_id"] = 2
    return record
