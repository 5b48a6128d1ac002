"""Tables of the collector database and the ordered migrations that create them.

Raw batches are the evidence; every other table is an index derived from them
(plus approvals, tokens and the access log, which the collector owns).
"""
from __future__ import annotations

import json

from sqlalchemy import (BigInteger, Boolean, Column, Index, Integer, LargeBinary, MetaData,
                        String, Table, Text, UniqueConstraint)

metadata = MetaData()

schema_migrations = Table(
    "schema_migrations", metadata,
    Column("version", Integer, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("applied_ns", BigInteger, nullable=False),
)

agents = Table(
    "agents", metadata,
    Column("agent_id", String(200), primary_key=True),
    Column("public_key", LargeBinary, nullable=False),
    Column("hostname", String(255)),
    Column("version", String(100)),
    Column("enrolled_ns", BigInteger, nullable=False),
    Column("last_seen_ns", BigInteger),
    Column("last_event_ns", BigInteger),
    Column("last_seq", BigInteger, nullable=False, default=0),
    Column("last_hash", LargeBinary),
    Column("batches", BigInteger, nullable=False, default=0),
    Column("events", BigInteger, nullable=False, default=0),
    Column("chain_ok", Boolean, nullable=False, default=True),
    Column("problem_count", Integer, nullable=False, default=0),
    Column("spool_backlog", BigInteger),
    # The first sequence number the current key (public_key) signed; NULL after a rotation until
    # the new key's first batch arrives (until then the previous key's batches are still taken,
    # on a request authenticated by the new key). Migration 6.
    Column("key_from_seq", BigInteger, default=1, server_default="1"),
)

# Every key an agent id has been enrolled with (migration 6): which one signed which sequence
# numbers, so `warden verify` checks each stored batch with the key of its range, and who
# rotated it when. A key's range is [valid_from_seq, the next key's valid_from_seq - 1];
# valid_from_seq stays NULL for a rotated-in key until its first batch arrives.
agent_keys = Table(
    "agent_keys", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("agent_id", String(200), nullable=False),
    Column("public_key", LargeBinary, nullable=False),
    Column("key_id", String(64), nullable=False),       # sha256 of the raw public key, hex
    Column("valid_from_seq", BigInteger),
    Column("valid_to_seq", BigInteger),                 # set once the next key signed its first batch
    Column("enrolled_ns", BigInteger, nullable=False),
    Column("replaced_ns", BigInteger),                  # when a rotation replaced it
    Column("hostname", String(255)),                    # the hostname enrolled with it (indexes its batches)
    Column("rotation", Boolean, nullable=False, default=False),
    Column("token_id", String(64)),                     # the enrollment token used (tokens.id)
    Column("minted_by", String(255)),                   # who created that token
    Index("ix_agent_keys_agent", "agent_id", "valid_from_seq"),
)

# Chain problems found at ingest: stored, never hidden.
agent_problems = Table(
    "agent_problems", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("agent_id", String(200), nullable=False, index=True),
    Column("detected_ns", BigInteger, nullable=False),
    Column("kind", String(100), nullable=False),
    Column("seq", BigInteger),
    Column("batch_id", BigInteger),
    Column("detail", Text),
)

batches = Table(
    "batches", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("agent_id", String(200), nullable=False),
    Column("first_seq", BigInteger, nullable=False),
    Column("last_seq", BigInteger, nullable=False),
    Column("prev_hash", LargeBinary, nullable=False),
    Column("last_hash", LargeBinary, nullable=False),
    Column("event_count", Integer, nullable=False),
    Column("first_ts", BigInteger),
    Column("last_ts", BigInteger),
    Column("received_ns", BigInteger, nullable=False),
    Column("raw", LargeBinary, nullable=False),
    Column("raw_sha256", String(64), nullable=False),
    Column("chain_ok", Boolean, nullable=False, default=True),
    UniqueConstraint("agent_id", "first_seq", "last_seq", name="uq_batches_range"),
    Index("ix_batches_agent_seq", "agent_id", "first_seq"),
    Index("ix_batches_agent_last", "agent_id", "last_seq"),
    Index("ix_batches_last_ts", "last_ts"),
)

events = Table(
    "events", metadata,
    Column("agent_id", String(200), primary_key=True),
    Column("seq", BigInteger, primary_key=True),
    Column("ts", BigInteger, nullable=False),
    Column("sid", String(200)),
    Column("type", String(100), nullable=False),
    Column("identity", String(255)),
    Column("target", String(255)),
    Column("summary", Text),
    Column("decision", String(50)),
    Column("batch_id", BigInteger, nullable=False),
    Column("event_hash", String(64), nullable=False),
    Column("fields", Text, nullable=False),  # canonical JSON of the event's fields
    Index("ix_events_ts", "ts"),
    Index("ix_events_sid", "sid", "ts"),
    Index("ix_events_identity_ts", "identity", "ts"),
    # Dropped because each cost every insert and no query needed them: ix_events_batch
    # (migration 3); ix_events_type_ts (migration 4): a type filter comes with a time
    # window, which ix_events_ts serves, and a dozen types made it a poor range key anyway.
)

# One row per table an event touched; ts and sid are copied so "who touched
# table X around T" is one index range scan.
event_tables = Table(
    "event_tables", metadata,
    Column("agent_id", String(200), primary_key=True),
    Column("seq", BigInteger, primary_key=True),
    Column("table_name", String(255), primary_key=True),
    Column("table_base", String(255), nullable=False),
    Column("ts", BigInteger, nullable=False),
    Column("sid", String(200)),
    # One index serves both lookups: a qualified name is found on its base name and
    # filtered (ix_event_tables_name_ts was dropped in migration 4: it cost every insert).
    Index("ix_event_tables_base_ts", "table_base", "ts"),
)

sessions = Table(
    "sessions", metadata,
    Column("sid", String(200), primary_key=True),
    Column("agent_id", String(200), nullable=False),
    Column("host", String(255)),
    Column("identity", String(255)),
    Column("target", String(255)),
    Column("protocol", String(50)),
    Column("process", Text),  # JSON: pid, exe, cmdline, user, unit, cgroup, container
    Column("start_ns", BigInteger),
    Column("end_ns", BigInteger),
    Column("event_count", Integer, nullable=False, default=0),
    Column("statement_count", Integer, nullable=False, default=0),
    Column("request_count", Integer, nullable=False, default=0),
    Column("denied_count", Integer, nullable=False, default=0),
    # How the session connected and ended (migration 5), from session.start / session.end
    # (collector/indexer.py session_start_columns / session_end_columns); the events keep
    # every field (auth_method, TLS version, SNI, token claims, ...).
    Column("auth_user", String(255)),      # database role the session ran as (brokered: the upstream role)
    Column("database_name", String(255)),
    Column("client", String(255)),         # client address, ip:port
    Column("orig_dst", String(255)),       # the destination the workload connected to
    Column("tls_client", Boolean),         # NULL: not recorded
    Column("tls_upstream", Boolean),
    Column("credentials", String(50)),     # "brokered" when Warden logged in for the client
    Column("client_user", String(255)),    # brokered: the user name the client presented
    Column("end_reason", String(100)),
    Column("end_error", Text),
    Column("end_sqlstate", String(10)),    # the last SQLSTATE of the session (Postgres)
    Index("ix_sessions_start", "start_ns"),
    Index("ix_sessions_identity_start", "identity", "start_ns"),
    Index("ix_sessions_target_start", "target", "start_ns"),
    Index("ix_sessions_auth_user_start", "auth_user", "start_ns"),
)

approvals = Table(
    "approvals", metadata,
    Column("id", String(64), primary_key=True),
    Column("agent_id", String(200)),
    Column("identity", String(255)),
    Column("target", String(255)),
    Column("statement", Text),
    Column("session_id", String(200)),
    Column("status", String(20), nullable=False),  # pending | approved | denied | expired
    Column("created_ns", BigInteger, nullable=False),
    Column("expires_ns", BigInteger, nullable=False),
    Column("decided_ns", BigInteger),
    Column("decided_by", String(255)),
    Column("reason", Text),
    Index("ix_approvals_status_created", "status", "created_ns"),
)

# Enrollment tokens (hashed, single use) and minted API tokens (by jti, revocable).
tokens = Table(
    "tokens", metadata,
    Column("id", String(64), primary_key=True),  # sha256 of an enrollment token, or an API token's jti
    Column("kind", String(20), nullable=False),  # enroll | api
    Column("role", String(20)),
    Column("subject", String(255)),
    Column("created_ns", BigInteger, nullable=False),
    Column("expires_ns", BigInteger, nullable=False),
    Column("used_ns", BigInteger),
    Column("used_by", String(200)),
    Column("revoked_ns", BigInteger),
    # Enrollment tokens (migration 6): the agent id it may enroll (NULL: any id not enrolled
    # yet), whether it may replace that agent's key, and who created it.
    Column("agent_id", String(200)),
    Column("rotate", Boolean),
    Column("created_by", String(255)),
)

access_log = Table(
    "access_log", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("ts", BigInteger, nullable=False),
    Column("subject", String(255), nullable=False),
    Column("role", String(20), nullable=False),
    Column("method", String(10), nullable=False),
    Column("path", Text, nullable=False),
    Column("query", Text),
    Column("status", Integer),
    Index("ix_access_log_ts", "ts"),
)


# Signed by the collector's own key before retention deletes the start of an agent's
# chain: verification of what remains restarts from (seq + 1, chain_hash).
checkpoints = Table(
    "checkpoints", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("agent_id", String(200), nullable=False),
    Column("seq", BigInteger, nullable=False),          # last purged sequence number
    Column("chain_hash", LargeBinary, nullable=False),  # the agent-signed hash of that event
    Column("before_ns", BigInteger, nullable=False),    # retention cutoff the purge applied
    Column("created_ns", BigInteger, nullable=False),
    Column("batches", Integer, nullable=False),
    Column("events", BigInteger, nullable=False),
    Column("problems", Integer, nullable=False),        # found when verifying the purged range
    Column("actor", String(255), nullable=False),
    Column("key_id", String(64), nullable=False),       # sha256 of the collector public key
    Column("signature", LargeBinary, nullable=False),
    Index("ix_checkpoints_agent_seq", "agent_id", "seq"),
)


def _create(*tables_):
    def step(connection):
        for table in tables_:
            table.create(connection, checkfirst=True)
    return step


def _drop_index(name: str):
    def step(connection):
        connection.exec_driver_sql(f"DROP INDEX IF EXISTS {name}")
    return step


def _drop_indexes(*names: str):
    def step(connection):
        for name in names:
            connection.exec_driver_sql(f"DROP INDEX IF EXISTS {name}")
    return step


# Added to sessions by migration 5 (a database made by migration 1 since then has them already).
_SESSION_HOW_COLUMNS = ("auth_user", "database_name", "client", "orig_dst", "tls_client", "tls_upstream",
                        "credentials", "client_user", "end_reason", "end_error", "end_sqlstate")
_BACKFILL_CHUNK = 500


def _session_how(connection) -> None:
    """Add the sessions' "how" columns and their index, then fill them for the sessions already
    stored from their session.start / session.end events (found by (sid, start_ns / end_ns) on
    ix_events_sid, like queries.session_starts), with the code ingest uses."""
    from sqlalchemy import bindparam, inspect, select, update

    from collector.indexer import canonical_json, session_end_columns, session_process, session_start_columns

    present = {column["name"] for column in inspect(connection).get_columns("sessions")}
    for name in _SESSION_HOW_COLUMNS:
        if name not in present:
            column_type = sessions.c[name].type.compile(dialect=connection.dialect)
            connection.exec_driver_sql(f"ALTER TABLE sessions ADD COLUMN {name} {column_type}")
    connection.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_sessions_auth_user_start "
                               "ON sessions (auth_user, start_ns)")

    s, e = sessions.c, events.c
    start_keys = ("auth_user", "database_name", "client", "orig_dst", "tls_client", "tls_upstream",
                  "credentials", "client_user")
    end_keys = ("end_reason", "end_error", "end_sqlstate")
    fill = update(sessions).where(s.sid == bindparam("b_sid")).values(
        {name: bindparam(f"b_{name}") for name in (*start_keys, *end_keys)})
    fill_process = update(sessions).where(s.sid == bindparam("b_sid")).values(process=bindparam("b_process"))
    after = ""
    while True:
        chunk = list(connection.execute(select(s.sid, s.process).where(s.sid > after)
                                        .order_by(s.sid).limit(_BACKFILL_CHUNK)))
        if not chunk:
            return
        after = chunk[-1].sid
        sids = [row.sid for row in chunk]
        no_process = {row.sid for row in chunk if row.process is None}
        found: dict[str, dict] = {}
        for kind, moment in (("session.start", s.start_ns), ("session.end", s.end_ns)):
            for row in connection.execute(select(e.sid, e.fields).join(
                    sessions, (s.sid == e.sid) & (moment == e.ts)).where(s.sid.in_(sids), e.type == kind)):
                fields = json.loads(row.fields)
                values = found.setdefault(row.sid, {})
                if kind == "session.start":
                    values.update(session_start_columns(fields))
                    process = session_process(fields) if row.sid in no_process else None
                    if process is not None:
                        values["process"] = canonical_json(process)
                else:
                    values.update(session_end_columns(fields))
        rows = [{"b_sid": sid, **{f"b_{name}": values.get(name) for name in (*start_keys, *end_keys)}}
                for sid, values in found.items()]
        if rows:
            connection.execute(fill, rows)
        processes = [{"b_sid": sid, "b_process": values["process"]} for sid, values in found.items()
                     if "process" in values]
        if processes:
            connection.execute(fill_process, processes)


def _add_columns(connection, table: Table, names: tuple[str, ...], defaults: dict | None = None) -> None:
    from sqlalchemy import inspect
    present = {column["name"] for column in inspect(connection).get_columns(table.name)}
    for name in names:
        if name not in present:
            column_type = table.c[name].type.compile(dialect=connection.dialect)
            default = f" DEFAULT {defaults[name]}" if defaults and name in defaults else ""
            connection.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {name} {column_type}{default}")


def _agent_keys(connection) -> None:
    """Key history and enrollment tokens bound to an agent id: create agent_keys, add the token
    and agents columns, and record each enrolled agent's current key as valid from seq 1 (what
    verification assumed so far)."""
    import hashlib

    from sqlalchemy import select

    _add_columns(connection, tokens, ("agent_id", "rotate", "created_by"))
    _add_columns(connection, agents, ("key_from_seq",), {"key_from_seq": 1})
    agent_keys.create(connection, checkfirst=True)
    known = set(connection.execute(select(agent_keys.c.agent_id).distinct()).scalars())
    rows = [{"agent_id": row.agent_id, "public_key": bytes(row.public_key),
             "key_id": hashlib.sha256(bytes(row.public_key)).hexdigest(), "valid_from_seq": 1,
             "enrolled_ns": row.enrolled_ns, "hostname": row.hostname, "rotation": False}
            for row in connection.execute(select(agents.c.agent_id, agents.c.public_key, agents.c.enrolled_ns,
                                                 agents.c.hostname))
            if row.agent_id not in known]
    if rows:
        connection.execute(agent_keys.insert(), rows)


# Append new steps; never edit an applied one.
MIGRATIONS = [
    (1, "initial schema", _create(agents, agent_problems, batches, events, event_tables,
                                   sessions, approvals, tokens, access_log)),
    (2, "retention checkpoints", _create(checkpoints)),
    (3, "drop unused index ix_events_batch", _drop_index("ix_events_batch")),
    (4, "drop ix_event_tables_name_ts (served by ix_event_tables_base_ts) and ix_events_type_ts",
     _drop_indexes("ix_event_tables_name_ts", "ix_events_type_ts")),
    (5, "sessions: how each session connected and ended (role, database, client, TLS, brokered, end)",
     _session_how),
    (6, "agent key history (agent_keys); enrollment tokens bound to an agent id, rotation flag, creator",
     _agent_keys),
]
