"""Our events as OCSF (schema 1.1) records, one JSON object per line.

Mapping:
  pg.statement   -> Datastore Activity (class_uid 6005, category 6 Application Activity);
                    activity from the statement kind: read/select -> 1 Read, update -> 2 Update,
                    insert/copy-in -> 5 Write, create/ddl -> 6 Create, delete/drop/truncate -> 7 Delete,
                    otherwise 4 Query. database.name = target, query_info.query_string = text.
  http.request   -> HTTP Activity (4002, category 4 Network Activity); activity from the method
                    (CONNECT 1, DELETE 2, GET 3, HEAD 4, OPTIONS 5, POST 6, PUT 7, TRACE 8, PATCH 9).
  conn.observed  -> Network Activity (4001); activity 1 Open.
Every record: time (ms), type_uid = class_uid*100 + activity_id, severity_id 1, status,
metadata (product Warden, version, uid = agent:seq, the event hash as correlation),
actor (identity + process), src/dst endpoints, unmapped (our raw fields).
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

_DATASTORE_ACTIVITY = {"read": 1, "select": 1, "update": 2, "connect": 3, "query": 4, "write": 5,
                       "insert": 5, "copy": 5, "create": 6, "ddl": 6, "delete": 7, "drop": 7,
                       "truncate": 7, "list": 8}
_HTTP_ACTIVITY = {"CONNECT": 1, "DELETE": 2, "GET": 3, "HEAD": 4, "OPTIONS": 5, "POST": 6, "PUT": 7,
                  "TRACE": 8, "PATCH": 9}
OCSF_EVENT_TYPES = ("pg.statement", "http.request", "conn.observed")


def _process(fields: dict) -> dict | None:
    process = fields.get("process")
    if not isinstance(process, dict):
        return None
    out = {"pid": process.get("pid"), "name": process.get("comm") or process.get("exe"),
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


def to_ocsf(event: dict, host: str | None = None) -> dict | None:
    """event: an /v1/events item (agent_id, seq, ts, sid, type, identity, target, decision, hash, fields)."""
    event_type, f = event["type"], event.get("fields") or {}
    actor = {"app_name": event.get("identity") or "unknown",
             "user": {"name": event.get("identity") or "unknown", "type_id": 3}}  # 3 = System (a service)
    process = _process(f)
    if process:
        actor["process"] = process
    if event_type == "pg.statement":
        kind = str(f.get("kind") or "").lower()
        class_uid, category_uid, activity_id = CLASS_DATASTORE, 6, _DATASTORE_ACTIVITY.get(kind, 4)
        specific = {
            "database": {"name": f.get("database") or event.get("target") or "unknown", "type_id": 99,
                         "type": "PostgreSQL"},
            "query_info": {"query_string": f.get("text") or "", "name": kind or None},
            "src_endpoint": _endpoint(f.get("src"), host or event["agent_id"]),
            "dst_endpoint": _endpoint(f.get("dst") or f.get("original_dst"), event.get("target")),
            "type_id": 1, "type": "Database",
        }
    elif event_type == "http.request":
        method = str(f.get("method") or "").upper()
        class_uid, category_uid, activity_id = CLASS_HTTP, 4, _HTTP_ACTIVITY.get(method, 99)
        host_header = f.get("host") or event.get("target") or "unknown"
        specific = {
            "http_request": {"http_method": method or None,
                             "url": {"hostname": host_header, "path": f.get("path") or "/",
                                     "scheme": f.get("scheme") or "https"}},
            "src_endpoint": _endpoint(f.get("src"), host or event["agent_id"]),
            "dst_endpoint": _endpoint(f.get("dst") or f.get("original_dst"), host_header),
        }
    elif event_type == "conn.observed":
        class_uid, category_uid, activity_id = CLASS_NETWORK, 4, 1
        dst = f.get("dst") or ({"ip": f.get("daddr"), "port": f.get("dport")} if f.get("daddr") else None)
        specific = {"src_endpoint": _endpoint(f.get("src"), host or event["agent_id"]),
                    "dst_endpoint": _endpoint(dst, "unknown")}
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
        "device": {"hostname": host or event["agent_id"], "type_id": 6},  # 6 = Virtual
        "unmapped": {"warden": {"hash": event.get("hash"), "target": event.get("target"), "fields": f}},
        **specific,
    }
    if denied:
        record["disposition_id"] = 2
    return record
