"""Versioned event schema: the stable field names of every record type.

Fields are optional (an enforcer records what it knows) but their names are fixed per
type, so queries and exports can rely on them. Producers may add their own fields only
under an ``x_`` prefix, which keeps the stable namespace free for future versions.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

SCHEMA_VERSION = 1

# Process attribution shared by every event that names a process.
_PROCESS = ("pid", "tgid", "exe", "cmdline", "comm", "uid", "user", "gid",
            "systemd_unit", "cgroup", "cgroup_id", "container")

EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "session.start": ("host", "agent", *_PROCESS, "identity", "target", "protocol",
                      "orig_dst", "client_addr", "tls", "tls_version", "auth_user",
                      "database", "application_name",
                      # the process as one record, and TLS/auth detail from the enforcers
                      "process", "client", "tls_client", "tls_upstream", "auth_method",
                      # brokered credentials: who logged in as whom, with which token (never the secret)
                      "credentials", "brokered_user", "client_user", "presented", "upstream_auth",
                      "token"),
    "session.end": ("reason", "duration_ns", "statements", "requests", "bytes_in",
                    "bytes_out", "error", "sqlstate"),
    "pg.statement": ("text", "params", "kind", "tables", "functions", "fingerprint",
                     "statement_index", "protocol", "portal", "action", "decision",
                     "policy_ids", "reason", "statement_name",
                     # an SQL EXECUTE: the prepared statement it ran, {name, text}
                     "prepared"),
    "pg.result": ("command_tag", "rows", "bytes", "sqlstate", "error", "duration_ns",
                  "statement_index"),
    "http.request": ("method", "scheme", "host", "port", "path", "query", "headers",
                     "body_bytes", "request_index", "decision", "policy_ids", "reason", "action",
                     "resource"),
    "http.response": ("status", "headers", "body_bytes", "duration_ns", "request_index"),
    "policy.decision": ("decision", "policy_ids", "reason", "identity", "action",
                        "resource", "cached", "statement_index", "request_index"),
    "approval.requested": ("approval_id", "identity", "action", "resource", "summary",
                           "timeout_s", "statement_index", "request_index"),
    # summary: what the approver was shown (as approval.requested)
    "approval.decided": ("approval_id", "decision", "approver", "reason", "latency_ns", "summary"),
    "approval.expired": ("approval_id", "timeout_s", "summary"),
    "mask.applied": ("rules", "columns", "fields", "method", "values_masked", "rows",
                     "statement_index", "request_index"),
    "conn.observed": (*_PROCESS, "identity", "family", "src", "dst", "dport",
                      "governed", "target", "action",
                      # aggregated per (process, destination) per interval by the agent
                      "process", "dst_ip", "dst_port", "attempts", "established", "failed",
                      "pending", "redirected", "bypassed", "pids", "first_ns", "last_ns"),
    "agent.start": ("version", "hostname", "pid", "config_path", "kernel", "boot_id",
                    "bpf", "chain_seq", "chain_hash", "agent_id", "host", "scope", "targets",
                    "listeners_passed"),
    "agent.stop": ("reason", "uptime_s", "agent_id", "stats", "programs_left", "sessions_drained", "sessions_cut"),
    "agent.heartbeat": ("version", "uptime_s", "spool_backlog_bytes",
                        "spool_backlog_batches", "spool_full", "chain_seq", "chain_hash",
                        "bpf_state", "sessions_active", "stats"),
    "agent.alert": ("kind", "severity", "message", "detail"),
    "agent.bypass": (*_PROCESS, "identity", "target", "orig_dst", "reason", "process", "connected_ns"),
    # a policy or config change that failed validation; the previous one stays active
    "agent.policy_rejected": ("file", "line", "reason", "problems"),
    "agent.config_rejected": ("file", "problems"),
    "agent.reloaded": ("what", "generation", "detail"),
}

_FIELD_SETS = {name: frozenset(fields) for name, fields in EVENT_FIELDS.items()}


class SchemaError(ValueError):
    """An event does not fit the schema (unknown type or unknown field)."""


# (event type, field names in order) already found valid: producers emit the same shapes
# over and over, so the check is one dict lookup after the first time
_valid_shapes: dict[tuple, bool] = {}


def validate_fields(event_type: str, fields: dict) -> None:
    if type(fields) is dict and (event_type, *fields) in _valid_shapes:
        return
    _validate_fields(event_type, fields)
    if type(fields) is dict and len(_valid_shapes) < 8192:
        _valid_shapes[(event_type, *fields)] = True


def _validate_fields(event_type: str, fields: dict) -> None:
    allowed = _FIELD_SETS.get(event_type)
    if allowed is None:
        raise SchemaError(f"unknown event type {event_type!r}; known types: "
                          f"{', '.join(sorted(EVENT_FIELDS))}")
    if not isinstance(fields, dict):
        raise SchemaError(f"{event_type}: fields must be a dict, got {type(fields).__name__}")
    for name in fields:
        if name not in allowed and not (isinstance(name, str) and name.startswith("x_")):
            raise SchemaError(f"{event_type}: unknown field {name!r}; add it to "
                              f"records.schema.EVENT_FIELDS or prefix it with 'x_'")


_uuid_lock = threading.Lock()
_last_uuid_tick = 0


def new_session_id() -> str:
    """A UUIDv7 (RFC 9562): 48-bit Unix milliseconds, then 12 bits of sub-millisecond
    time (method 3), so ids minted by one process sort in creation order."""
    global _last_uuid_tick
    with _uuid_lock:
        # tick = 1/4096 ms units; strictly increasing within the process.
        tick = time.time_ns() * 4096 // 1_000_000
        if tick <= _last_uuid_tick:
            tick = _last_uuid_tick + 1
        _last_uuid_tick = tick
    unix_ms, sub_ms = divmod(tick, 4096)
    rand_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = ((unix_ms & ((1 << 48) - 1)) << 80) | (0x7 << 76) | (sub_ms << 64) \
        | (0b10 << 62) | rand_b
    return str(uuid.UUID(int=value))
