"""Hardening of the Postgres session, as bytes: startup parameters that would bypass policy,
notifications carrying masked values, prepared statements changed by SQL or refused by the
server, and the fast-path FunctionCall interface."""
from __future__ import annotations

import pytest

from enforcer import sqlclass
from enforcer.masking import load_masking
from enforcer.postgres import protocol as P
from enforcer.postgres import session as S
from enforcer.postgres.broker import BrokerConfig, BrokerFailure, PostgresBroker
from enforcer.postgres.session import PostgresSession, Verdict
from records.schema import validate_fields
from tests.unit.test_pg_session import AUTH_DONE, STARTUP, Driver
from tests.unit.test_pg_session_masking import messages, rows, types

SSN = "123-45-6789"
MASKED_SSN = b"***-**-6789"
# a column rule only: values in other columns (or with no known column) are not detected
COLUMN_RULES = {"rules": [{"name": "ssn", "column": "ssn", "strategy": "partial"}]}
DETECTOR_RULES = {"rules": [{"name": "ssn", "column": "ssn", "strategy": "partial"},
                            {"name": "scan", "scan_all_text": True, "detectors": ["ssn"]}]}
INT_A = P.FieldDescription("a", 0, 0, 23, 4, -1, 0)
TEXT_SSN = P.FieldDescription("ssn", 0, 0, 25, -1, -1, 0)
Z_IDLE = P.build_ready_for_query("I")


def classified(req) -> list:
    """Verdicts as the shell gives them: one per statement, with pglast's kind."""
    return [Verdict(True, st.text, action=st.action, kind=st.kind) for st in sqlclass.classify_sql(req.sql)]


def ready(rules=None, decider=None) -> Driver:
    masking = load_masking(rules).for_session("svc-a", {}, "db1") if rules else None
    d = Driver(masking=masking, decider=decider)
    d.client(STARTUP)
    d.server(AUTH_DONE)
    d.reset()
    return d


def statements(d: Driver) -> list:
    return [f for t, f in d.events if t == "pg.statement"]


def results(d: Driver) -> list:
    return [f for t, f in d.events if t == "pg.result"]


# ==== 1. startup parameters ====================================================================
def startup(params: dict, version: int = P.PROTOCOL_3_0) -> bytes:
    return P.build_startup_message(params, version)


# what real clients send by default (and with their usual settings), from their sources
REAL_CLIENT_STARTUPS = {
    # psql (libpq): application_name, and client_encoding=auto resolved from the locale
    "psql": {"user": "alice", "database": "app", "application_name": "psql", "client_encoding": "UTF8"},
    # libpq with PGDATESTYLE, PGTZ, PGGEQO in the environment, PGAPPNAME, PGOPTIONS
    "libpq-env": {"user": "alice", "database": "app", "datestyle": "ISO, MDY", "timezone": "UTC", "geqo": "off",
                  "application_name": "etl", "options": "-c statement_timeout=5s --lock_timeout=1s"},
    # pgbench: fallback_application_name=pgbench becomes application_name
    "pgbench": {"user": "alice", "database": "app", "application_name": "pgbench"},
    # psycopg 2 and 3 (libpq, nothing of their own)
    "psycopg": {"user": "alice", "database": "app"},
    # asyncpg: client_encoding quoted, then user, database, then server_settings (none by default)
    "asyncpg": {"client_encoding": "'utf-8'", "user": "alice", "database": "app"},
    "asyncpg-server-settings": {"client_encoding": "'utf-8'", "user": "alice", "database": "app",
                                "application_name": "svc", "jit": "off", "statement_timeout": "30000"},
    # pgjdbc ConnectionFactoryImpl.getParametersForStartup (assumeMinServerVersion >= 9.0)
    "pgjdbc": {"user": "alice", "database": "app", "client_encoding": "UTF8", "DateStyle": "ISO",
               "TimeZone": "Europe/Berlin", "extra_float_digits": "3", "application_name": "PostgreSQL JDBC Driver"},
    # node-postgres with its timeout settings; replication explicitly off
    "node-postgres": {"user": "alice", "database": "app", "client_encoding": "UTF8", "statement_timeout": "1000",
                      "lock_timeout": "500", "idle_in_transaction_session_timeout": "9000", "replication": "false"},
    "escaped-space-in-a-value": {"user": "alice", "options": "-c application_name=a\\ -c\\ role=admin"},
    "standard_conforming_strings": {"user": "alice", "standard_conforming_strings": "on",
                                    "IntervalStyle": "iso_8601", "lc_messages": "C"},
}


@pytest.mark.parametrize("client", sorted(REAL_CLIENT_STARTUPS))
def test_default_startup_packets_of_real_clients_pass_unchanged(client):
    packet = startup(REAL_CLIENT_STARTUPS[client])
    d = Driver()
    d.client(packet)
    assert d.other == [(S.CONNECT_UPSTREAM, packet)] and d.to_client == b""
    d.server(AUTH_DONE)
    assert d.s.phase == S.READY


REFUSED = [
    ({"search_path": "evil"}, "search_path"),
    ({"role": "admin"}, "role"),
    ({"Role": "admin"}, "role"),                                      # setting names are case-insensitive
    ({"session_authorization": "admin"}, "session_authorization"),
    ({"default_transaction_read_only": "off"}, "default_transaction_read_only"),
    ({"standard_conforming_strings": "off"}, "standard_conforming_strings"),
    ({"client_encoding": "SJIS"}, "client_encoding"),                  # second bytes can be backslashes
    ({"options": "-c client_encoding=gbk"}, "client_encoding"),
    ({"app.tenant_id": "7"}, "app.tenant_id"),                        # custom settings read by RLS policies
    ({"replication": "database"}, "replication"),
    ({"replication": "true"}, "replication"),
    ({"options": "-c search_path=evil"}, "search_path"),
    ({"options": "-csearch_path=evil"}, "search_path"),
    ({"options": "--search_path=evil"}, "search_path"),
    ({"options": "--search-path=evil"}, "search_path"),               # the server reads '-' as '_'
    ({"options": "-c r\\ole=admin"}, "role"),                         # backslash escapes: r\ole is role
    ({"options": "-c role\\=admin"}, "role"),
    ({"options": "-c statement_timeout=1 -c ROLE=admin"}, "role"),
    ({"options": "-c\tsession_authorization=admin"}, "session_authorization"),
    ({"options": "-c standard_conforming_strings=off"}, "standard_conforming_strings"),
    ({"options": "-c default_transaction_read_only=off"}, "default_transaction_read_only"),
    ({"options": "-e"}, "options"),                                   # other server switches
    ({"options": "-Pc role=admin"}, "options"),
    ({"options": "role=admin"}, "options"),
    ({"options": "-c"}, "options"),
    ({"options": "-c statement_timeout"}, "options"),
    ({"options": "-- -c role=admin"}, "options"),
    ({"options": "-c application_name=x\x85-crole=admin"}, "options"),  # a space in some server locales
]


@pytest.mark.parametrize("params,name", REFUSED, ids=[repr(p) for p, _ in REFUSED])
def test_startup_parameters_that_would_bypass_policy_are_refused(params, name):
    d = Driver()
    d.client(startup({"user": "alice", "database": "app", **params}))
    assert not any(kind == S.CONNECT_UPSTREAM for kind, _ in d.other)
    assert d.to_server == b""
    (t, body), = messages(d.to_client)
    err = P.parse_error_fields(body)
    assert t == b"E" and err["S"] == "FATAL" and err["C"] == "42501"
    assert name in err["M"] and "db1" in err["M"]
    assert "remove" in err["M"] or "cannot" in err["M"] or "only" in err["M"]
    assert "statement_timeout" in err["H"] and "search_path" not in err["H"]
    assert (S.CLOSE, "startup_parameter_refused") in d.other
    # recorded: who tried (session.start) and why it ended (session.end)
    assert d.event_types() == ["session.start", "session.end"]
    start, end = d.events[0][1], d.events[1][1]
    assert (start["auth_user"], start["database"]) == ("alice", "app")
    assert end["reason"] == "startup_parameter_refused" and end["sqlstate"] == "42501"
    assert name in end["error"]


def test_refused_parameter_with_protocol_options_gets_no_negotiation_first():
    d = Driver()
    d.client(startup({"user": "alice", "_pq_.compress": "on", "search_path": "evil"}, P.PROTOCOL_3_2))
    assert types(d.to_client) == b"E"
    # allowed parameters with protocol options: negotiated down as before, _pq_ options left out
    d = Driver()
    d.client(startup({"user": "alice", "_pq_.compress": "on", "TimeZone": "UTC"}, P.PROTOCOL_3_2))
    assert d.to_client == P.build_negotiate_protocol_version(0, ["_pq_.compress"])
    assert P.parse_startup_packet(d.other[0][1]).params == {"user": "alice", "TimeZone": "UTC"}


def test_startup_options_parser_reads_options_as_the_server_does():
    assert P.split_startup_options("  -c a\\ b=c\\\\d   --x=y\t") == ["-c", "a b=c\\d", "--x=y"]
    assert P.startup_option_settings("-c Search-Path=x -cA=1 --B-c=2") == [
        ("search_path", "x"), ("a", "1"), ("b_c", "2")]
    assert P.startup_option_settings("") == []
    for bad in ("-e", "x", "-c", "--", "-c a", "-c é=1", "-c a=\x1c"):
        with pytest.raises(P.ProtocolError):
            P.startup_option_settings(bad)


def broker_login(params: dict):
    broker = PostgresBroker(BrokerConfig(target="db1", user="app_rw", password_file="/nonexistent", accept="any"))
    return broker.login({"user": "w", "database": "app", **params}, client_secure=True)


@pytest.mark.parametrize("params", [
    {"options": "-c role=admin"}, {"options": "-c r\\ole=admin"}, {"options": "-crole=admin"},
    {"options": "--session-authorization=admin"}, {"options": "-c statement_timeout=1 -c ROLE=x"},
    {"options": "-c role\\=admin"}, {"role": "admin"}, {"ROLE": "admin"}, {"session_authorization": "x"},
    {"options": "-c application_name=x\x85-crole=admin"},    # unreadable: counts as choosing one
])
def test_brokered_login_refuses_a_role_chosen_at_startup_however_spelt(params):
    with pytest.raises(BrokerFailure) as e:
        broker_login(params).begin()
    assert e.value.sqlstate == "28000" and "role/session_authorization is not allowed" in e.value.message
    assert e.value.reason == "broker_refused_params"


def test_brokered_login_accepts_harmless_options():
    assert broker_login({"options": "-c statement_timeout=5s", "application_name": "etl"}).begin() == \
        P.build_authentication_cleartext()


# ==== 2. notifications ==========================================================================
def test_notification_payload_and_channel_are_masked():
    """SELECT pg_notify('x', ssn) FROM customers: the value arrives in a NotificationResponse."""
    d = ready(DETECTOR_RULES)
    d.client(P.build_query("SELECT pg_notify('x', ssn) FROM customers"))
    d.server(P.build_row_description([P.FieldDescription("pg_notify", 0, 0, 2278, 4, -1, 0)])
             + P.build_data_row([b""]) + P.build_command_complete("SELECT 1") + Z_IDLE
             + P.build_notification(4242, "x", f"ssn={SSN}") + P.build_notification(4242, SSN, "hi"))
    assert SSN.encode() not in d.to_client
    notes = [P.parse_notification(body) for t, body in messages(d.to_client) if t == b"A"]
    # the detectors of error and notice texts (the scan rule's strategy: redact)
    assert notes == [(4242, "x", "ssn=[REDACTED]"), (4242, "[REDACTED]", "hi")]


def test_notification_without_anything_to_mask_passes_unchanged():
    plain = P.build_notification(7, "jobs", "job 42 done")
    d = ready(DETECTOR_RULES)
    d.server(plain)
    assert d.to_client == plain
    d = ready()                   # no masking at all
    sensitive = P.build_notification(7, "x", SSN)
    d.server(sensitive)
    assert d.to_client == sensitive


def test_notification_arriving_while_a_refused_result_is_withheld_is_masked_too():
    d = ready({"rules": [{"name": "ids", "column": "id", "strategy": "redact", "on_binary": "error"},
                         {"name": "scan", "scan_all_text": True, "detectors": ["ssn"]}]})
    d.client(P.build_query("SELECT id FROM t"))
    d.server(P.build_row_description([P.FieldDescription("id", 0, 0, 23, 4, -1, 0)])
             + P.build_data_row([b"1"]) + P.build_notification(1, "c", SSN) + P.build_command_complete("SELECT 1")
             + Z_IDLE)
    assert types(d.to_client) == b"EAZ"
    assert SSN.encode() not in d.to_client


# ==== 3. SQL PREPARE / DEALLOCATE / DISCARD =======================================================
PREPARE_A = P.build_parse("s", "SELECT 1 AS a") + P.build_describe("S", "s") + P.SYNC
PREPARE_A_REPLY = P.PARSE_COMPLETE + P.build_parameter_description([]) + P.build_row_description([INT_A]) + Z_IDLE
EXECUTE_S = P.build_bind("", "s") + P.build_execute() + P.SYNC


def replace_s(d: Driver, sql: str, tags: list) -> None:
    """SQL that deallocates and re-prepares `s`, answered by the server."""
    d.client(P.build_query(sql))
    d.server(b"".join(P.build_command_complete(tag) for tag in tags) + Z_IDLE)


def execute_s_reading_an_ssn(d: Driver) -> None:
    d.reset()
    d.client(EXECUTE_S)
    described = b"D\0\0\0\x06P\0" in d.to_server
    d.server(P.BIND_COMPLETE + (P.build_row_description([TEXT_SSN]) if described else b"")
             + P.build_data_row([SSN.encode()]) + P.build_command_complete("SELECT 1") + Z_IDLE)


@pytest.mark.parametrize("decider", [None, classified], ids=["no-policy", "classified"])
@pytest.mark.parametrize("sql,tags", [
    ("DEALLOCATE s; PREPARE s AS SELECT ssn FROM customers", ["DEALLOCATE", "PREPARE"]),
    ("DEALLOCATE PREPARE s; PREPARE s AS SELECT ssn FROM customers", ["DEALLOCATE", "PREPARE"]),
    ("DEALLOCATE ALL; PREPARE s AS SELECT ssn FROM customers", ["DEALLOCATE ALL", "PREPARE"]),
    ("DISCARD ALL; PREPARE s AS SELECT ssn FROM customers", ["DISCARD ALL", "PREPARE"]),
])
def test_statement_replaced_by_sql_gets_a_fresh_describe_and_an_honest_record(sql, tags, decider):
    d = ready(COLUMN_RULES, decider)
    d.client(PREPARE_A)
    d.server(PREPARE_A_REPLY)
    replace_s(d, sql, tags)
    d.reset()
    d.client(EXECUTE_S)
    # the old description (a int4) would plan no masking: the session asks the server again
    assert [t for t, _ in messages(d.to_server)] == [b"B", b"D", b"E", b"S"]
    d.server(P.BIND_COMPLETE + P.build_row_description([TEXT_SSN]) + P.build_data_row([SSN.encode()])
             + P.build_command_complete("SELECT 1") + Z_IDLE)
    assert types(d.to_client) == b"2DCZ" and rows(d.to_client) == [[MASKED_SSN]]
    assert statements(d)[0]["text"] == "PREPARE s AS SELECT ssn FROM customers"


def test_deallocate_and_prepare_through_the_extended_protocol_are_tracked_too():
    d = ready(COLUMN_RULES, classified)
    d.client(PREPARE_A)
    d.server(PREPARE_A_REPLY)
    for sql, tag in (("DEALLOCATE s", "DEALLOCATE"), ("PREPARE s AS SELECT ssn FROM customers", "PREPARE")):
        d.client(P.build_parse("", sql) + P.build_bind("", "") + P.build_execute() + P.SYNC)
        d.server(P.PARSE_COMPLETE + P.BIND_COMPLETE + P.NO_DATA + P.build_command_complete(tag) + Z_IDLE)
    execute_s_reading_an_ssn(d)
    assert rows(d.to_client) == [[MASKED_SSN]]
    assert statements(d)[0]["text"] == "PREPARE s AS SELECT ssn FROM customers"


def test_name_prepared_in_sql_is_never_executed_with_an_unknown_plan():
    d = ready(COLUMN_RULES, classified)
    replace_s(d, "PREPARE s (int) AS SELECT ssn FROM customers WHERE id = $1", ["PREPARE"])
    d.reset()
    d.client(P.build_bind("", "s", [b"1"]) + P.build_execute() + P.SYNC)
    assert [t for t, _ in messages(d.to_server)] == [b"B", b"D", b"E", b"S"]
    d.server(P.BIND_COMPLETE + P.build_row_description([TEXT_SSN]) + P.build_data_row([SSN.encode()])
             + P.build_command_complete("SELECT 1") + Z_IDLE)
    assert rows(d.to_client) == [[MASKED_SSN]]
    st = statements(d)[0]
    assert st["text"] == "PREPARE s (int) AS SELECT ssn FROM customers WHERE id = $1"
    assert st["kind"] == "PrepareStmt" and st["params"] == ["1"]


def test_deallocate_that_fails_leaves_the_statement_as_the_server_keeps_it():
    d = ready(COLUMN_RULES, classified)
    d.client(PREPARE_A)
    d.server(PREPARE_A_REPLY)
    # in an aborted transaction the server refuses the DEALLOCATE and the PREPARE is never run
    d.client(P.build_query("DEALLOCATE s; PREPARE s AS SELECT ssn FROM customers"))
    d.server(P.build_error_response("25P02", "current transaction is aborted") + P.build_ready_for_query("E"))
    d.reset()
    d.client(EXECUTE_S)
    assert b"D\0\0\0\x06P\0" not in d.to_server          # the description of what runs is still right
    assert statements(d)[0]["text"] == "SELECT 1 AS a"


def test_deallocate_of_a_name_the_server_does_not_hold_forgets_it():
    d = ready(COLUMN_RULES, classified)
    d.client(PREPARE_A)
    d.server(PREPARE_A_REPLY)
    d.client(P.build_query("DEALLOCATE s"))
    d.server(P.build_error_response("26000", 'prepared statement "s" does not exist') + Z_IDLE)
    d.reset()
    d.client(EXECUTE_S)
    assert b"D\0\0\0\x06P\0" in d.to_server and statements(d)[0]["text"] is None


def test_prepare_of_a_name_the_session_holds_keeps_the_held_statement():
    d = ready(COLUMN_RULES, classified)
    d.client(PREPARE_A)
    d.server(PREPARE_A_REPLY)
    d.client(P.build_query("PREPARE s AS SELECT ssn FROM customers"))
    d.server(P.build_error_response("42P05", 'prepared statement "s" already exists') + Z_IDLE)
    d.reset()
    d.client(EXECUTE_S)
    assert statements(d)[0]["text"] == "SELECT 1 AS a"


def test_statement_replaced_by_sql_is_recorded_honestly_without_masking():
    """The C lane takes Binds of statements whose record template exists: it must not keep the old one."""
    d = ready(None, classified)
    d.client(PREPARE_A)
    d.server(PREPARE_A_REPLY)
    for _ in range(2):               # the template is built, then used
        d.client(EXECUTE_S)
        d.server(P.BIND_COMPLETE + P.build_data_row([b"1"]) + P.build_command_complete("SELECT 1") + Z_IDLE)
    assert [f["text"] for f in statements(d)] == ["SELECT 1 AS a"] * 2
    for _ in range(2):               # the same text twice: its verdict could carry a template
        replace_s(d, "DEALLOCATE s", ["DEALLOCATE"])
        replace_s(d, "PREPARE s AS SELECT ssn FROM customers", ["PREPARE"])
    d.reset()
    d.client(EXECUTE_S)
    assert statements(d)[0]["text"] == "PREPARE s AS SELECT ssn FROM customers"


# ==== 4. a Parse the server refuses ===============================================================
def test_parse_of_a_name_the_server_holds_does_not_change_what_executions_record():
    d = ready(COLUMN_RULES)
    d.client(PREPARE_A)
    d.server(PREPARE_A_REPLY)
    d.client(P.build_parse("s", "SELECT ssn FROM customers") + P.SYNC)
    d.server(P.build_error_response("42P05", 'prepared statement "s" already exists') + Z_IDLE)
    d.reset()
    d.client(EXECUTE_S)
    # the server runs the statement it holds: its description plans the masking, its text is recorded
    assert b"D\0\0\0\x06P\0" not in d.to_server
    d.server(P.BIND_COMPLETE + P.build_data_row([b"1"]) + P.build_command_complete("SELECT 1") + Z_IDLE)
    assert statements(d)[0]["text"] == "SELECT 1 AS a"
    assert results(d)[0]["command_tag"] == "SELECT 1"


def test_refused_parse_in_a_pipeline():
    """Parse s (refused: s exists), Bind/Execute s in the same batch (skipped), then Bind/Execute s
    after Sync in the same read: the second execution runs the held statement."""
    d = ready()
    d.client(P.build_parse("s", "SELECT 1 AS a") + P.SYNC)
    d.server(P.PARSE_COMPLETE + Z_IDLE)
    d.reset()
    d.client(P.build_parse("s", "SELECT ssn FROM customers") + EXECUTE_S + EXECUTE_S)
    assert [f["text"] for f in statements(d)] == ["SELECT ssn FROM customers", "SELECT 1 AS a"]
    d.server(P.build_error_response("42P05", 'prepared statement "s" already exists') + Z_IDLE
             + P.BIND_COMPLETE + P.build_data_row([b"1"]) + P.build_command_complete("SELECT 1") + Z_IDLE)
    assert [(r["sqlstate"], r["command_tag"]) for r in results(d)] == [("42P05", None), (None, "SELECT 1")]
    d.reset()
    d.client(EXECUTE_S)
    assert statements(d)[0]["text"] == "SELECT 1 AS a"


def test_parse_of_a_held_name_counts_once_the_server_confirms_it():
    """If the server did not hold the name after all (ParseComplete), the new statement is the name's."""
    d = ready(COLUMN_RULES)
    d.client(PREPARE_A)
    d.server(PREPARE_A_REPLY)
    d.client(P.build_parse("s", "SELECT ssn FROM customers") + P.SYNC)
    d.server(P.PARSE_COMPLETE + Z_IDLE)
    execute_s_reading_an_ssn(d)
    assert statements(d)[0]["text"] == "SELECT ssn FROM customers"
    assert rows(d.to_client) == [[MASKED_SSN]]


def test_parses_skipped_after_an_error_are_not_known():
    d = ready()
    d.client(P.build_parse("a", "SELECT 1") + P.build_parse("b", "SELEC 2") + P.build_parse("c", "SELECT 3")
             + P.SYNC)
    d.server(P.PARSE_COMPLETE + P.build_error_response("42601", "syntax error") + Z_IDLE)
    d.reset()
    for name in ("a", "b", "c"):
        d.client(P.build_bind("", name) + P.build_execute() + P.SYNC)
    assert [f["text"] for f in statements(d)] == ["SELECT 1", None, None]


def test_refused_unnamed_parse_leaves_no_unnamed_statement():
    d = ready()
    d.client(P.build_parse("", "SELECT 1") + P.SYNC)
    d.server(P.PARSE_COMPLETE + Z_IDLE)
    d.client(P.build_parse("", "SELEC 2") + P.SYNC)
    d.server(P.build_error_response("42601", "syntax error") + Z_IDLE)
    d.reset()
    d.client(P.build_bind("", "") + P.build_execute() + P.SYNC)
    assert statements(d)[0]["text"] is None


def test_close_of_the_name_while_its_parse_is_unconfirmed():
    d = ready()
    d.client(P.build_parse("s", "SELECT 1") + P.SYNC)
    d.server(P.PARSE_COMPLETE + Z_IDLE)
    d.client(P.build_parse("s", "SELECT 2") + P.SYNC + P.build_close("S", "s") + P.SYNC)
    d.server(P.PARSE_COMPLETE + Z_IDLE + P.CLOSE_COMPLETE + Z_IDLE)
    d.reset()
    d.client(EXECUTE_S)
    assert statements(d)[0]["text"] is None


# ==== 5. FunctionCall ===========================================================================
def test_function_call_is_refused_and_recorded():
    d = ready()
    d.client(P.build_function_call(1598, [b"\0\0\0\x05", None], [1]))
    (t, body), = messages(d.to_server)
    assert t == b"Q"
    sql = P.parse_query(body)
    assert sql.startswith("DO $warden$") and "ERRCODE = '42501'" in sql and "OID 1598" in sql
    assert "SELECT fn(...)" in sql                      # the hint says what to use instead
    err = P.build_error_response("42501", "permission denied by Warden: ...")
    d.server(err + Z_IDLE)
    assert d.to_client == err + Z_IDLE                  # the cycle ends with ReadyForQuery, as FunctionCall's does
    st, = statements(d)
    assert (st["kind"], st["action"], st["decision"], st["protocol"]) == \
        ("FunctionCall", "pg:function", "deny", "fastpath")
    assert "policy cannot see" in st["reason"] and st["params"] == ["\\x00000005", None]
    assert "1598" in st["text"]
    res, = results(d)
    assert res["sqlstate"] == "42501" and res["statement_index"] == st["statement_index"]
    for t, f in d.events:
        validate_fields(t, f)


def test_function_call_inside_a_transaction_aborts_it():
    d = ready()
    d.client(P.build_query("BEGIN"))
    d.server(P.build_command_complete("BEGIN") + P.build_ready_for_query("T"))
    d.reset()
    d.client(P.build_function_call(1598, []))
    # the server raises the error itself, so the transaction is aborted there: a later COMMIT rolls back
    assert P.parse_query(messages(d.to_server)[0][1]).startswith("DO $warden$")
    d.server(P.build_error_response("42501", "denied") + P.build_ready_for_query("E"))
    assert d.s.transaction_status == "E" and d.to_client.endswith(P.build_ready_for_query("E"))
    d.reset()
    d.client(P.build_query("COMMIT"))
    assert d.to_server == P.build_query("COMMIT")
    d.server(P.build_command_complete("ROLLBACK") + Z_IDLE)
    assert results(d)[0]["command_tag"] == "ROLLBACK"


def test_function_call_arguments_are_masked_in_the_record():
    d = ready(DETECTOR_RULES)
    d.client(P.build_function_call(1598, [SSN.encode()], [0]))
    assert statements(d)[0]["params"] == ["[REDACTED]"]


def test_function_call_in_a_pipeline_keeps_the_batches_in_step():
    d = ready()
    d.client(P.build_query("SELECT 1") + P.build_function_call(1598, []) + P.build_query("SELECT 2"))
    assert [t for t, _ in messages(d.to_server)] == [b"Q", b"Q", b"Q"]
    d.server(P.build_command_complete("SELECT 1") + Z_IDLE + P.build_error_response("42501", "denied") + Z_IDLE
             + P.build_command_complete("SELECT 1") + Z_IDLE)
    assert [(r["sqlstate"], r["command_tag"]) for r in results(d)] == [(None, "SELECT 1"), ("42501", None),
                                                                        (None, "SELECT 1")]
    assert not d.s._results and not d.s._expect


def test_malformed_function_call_is_a_protocol_error():
    d = ready()
    d.client(b"F\0\0\0\x06\0\0")
    assert P.parse_error_fields(messages(d.to_client)[0][1])["C"] == "08P01"
    assert d.to_server == b""


def test_function_call_with_inline_decisions_and_split_reads():
    """Under the proxy (decide given, C lanes when built) and cut anywhere: the same outcome."""
    msg = P.build_query("SELECT 1") + P.build_function_call(1598, [b"x"])
    for cut in range(1, len(msg)):
        d = Driver(PostgresSession(identity="svc-a", target="db1", random_bytes=lambda n: b"\x11" * n,
                                   decide=lambda sql: [Verdict(True, sql)]))
        d.client(STARTUP)
        d.server(AUTH_DONE)
        d.reset()
        d.client(msg[:cut]).client(msg[cut:])
        assert [t for t, _ in messages(d.to_server)] == [b"Q", b"Q"]        # no FunctionCall forwarded
        assert statements(d)[1]["kind"] == "FunctionCall"


# ==== the C lanes ===============================================================================
def test_these_flows_give_the_same_with_and_without_the_c_lanes(monkeypatch):
    """tests/unit/test_pg_lanes.py's differential check on the flows above: the lanes leave what
    changes the prepared statements, refused Parses and FunctionCall to Python."""
    pytest.importorskip("enforcer.postgres._pglanes")
    from tests.unit import test_pg_lanes as L

    memo: dict = {}

    def verdicts_for(sql):      # as the shell's cache: one verdict object per text, pglast kinds
        if sql not in memo:
            memo[sql] = [Verdict(True, st.text, action=st.action, kind=st.kind)
                         for st in sqlclass.classify_sql(sql)]
        return memo[sql]

    monkeypatch.setattr(L, "verdicts_for", verdicts_for)
    ok = P.build_bind_complete() + P.build_data_row([b"1"]) + P.build_command_complete("SELECT 1") + Z_IDLE
    steps = [("c", L.PREPARE), ("s", L.PREPARED_REPLY)]
    for _ in range(2):
        steps += [("c", L.execution(b"1")), ("s", ok)]
    steps += [
        # a Parse of the held name, refused; a same-batch and a later-batch execution in one read
        ("c", P.build_parse("s1", "SELECT 2") + L.execution(b"2") + L.execution(b"3")),
        ("s", P.build_error_response("42P05", "exists") + Z_IDLE + ok),
        ("c", L.execution(b"4")), ("s", ok),
        # replaced by SQL, twice (the second time the verdicts come from the memo)
        ("c", P.build_query("DEALLOCATE s1")), ("s", P.build_command_complete("DEALLOCATE") + Z_IDLE),
        ("c", P.build_query("PREPARE s1 AS SELECT 5")), ("s", P.build_command_complete("PREPARE") + Z_IDLE),
        ("c", L.execution(b"5")), ("s", ok),
        ("c", P.build_query("DEALLOCATE s1")), ("s", P.build_command_complete("DEALLOCATE") + Z_IDLE),
        ("c", P.build_query("PREPARE s1 AS SELECT 6")), ("s", P.build_command_complete("PREPARE") + Z_IDLE),
        ("c", L.execution(b"6") + L.execution(b"7")), ("s", ok + ok),
        # a Parse of the held name the server accepts after all
        ("c", P.build_parse("s1", "SELECT 8") + P.SYNC), ("s", P.PARSE_COMPLETE + Z_IDLE),
        ("c", L.execution(b"8")), ("s", ok),
        ("c", P.build_function_call(1598, [b"x"]) + L.execution(b"9")),
        ("s", P.build_error_response("42501", "denied") + Z_IDLE + ok + P.build_notification(1, "c", "p")),
    ]
    L.assert_same(steps)
    seen, _ = L.replay(steps, True, inline=True)
    texts = [dict(f[2])["text"] for actions in seen for f in actions if f[0] == S.EVENT and f[1] == "pg.statement"]
    assert texts == ["SELECT a FROM t WHERE b = $1"] * 2 + ["SELECT 2"] + ["SELECT a FROM t WHERE b = $1"] * 2 + [
        "DEALLOCATE s1", "PREPARE s1 AS SELECT 5", "PREPARE s1 AS SELECT 5", "DEALLOCATE s1",
        "PREPARE s1 AS SELECT 6", "PREPARE s1 AS SELECT 6", "PREPARE s1 AS SELECT 6", "SELECT 8",
        "<FunctionCall of function OID 1598>", "SELECT 8"]
