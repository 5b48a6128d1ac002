"""The session's masking point and records, as bytes: extended-protocol plans from earlier Describes,
refusals, COPY TO STDOUT, error/notice details, and what the events hold."""
import pytest

from enforcer.masking import load_masking
from enforcer.postgres import protocol as P
from enforcer.postgres import session as S
from enforcer.postgres.copyopts import copy_options
from enforcer.postgres.session import Verdict, result_formats
from records.schema import validate_fields
from tests.unit.test_pg_session import AUTH_DONE, STARTUP, Driver

SSN = "123-45-6789"
RULES = {"rules": [
    {"name": "ssn", "column": "ssn", "strategy": "partial"},
    {"name": "ids", "column": "id", "strategy": "redact", "on_binary": "error"},
    {"name": "scan", "scan_all_text": True, "detectors": ["ssn", "email"]},
]}
TEXT_SSN = P.FieldDescription("ssn", 0, 0, 25, -1, -1, 0)
INT_ID = P.FieldDescription("id", 0, 0, 23, 4, -1, 0)
Z_IDLE = P.build_ready_for_query("I")


def masked_driver(rules: dict = RULES, catalog=None, **kw) -> Driver:
    d = Driver(masking=load_masking(rules).for_session("svc-a", {}, "db1", catalog=catalog), **kw)
    d.client(STARTUP)
    d.server(AUTH_DONE)
    d.reset()
    return d


def messages(data: bytes) -> list:
    msgs, rest = P.split_messages(data)
    assert rest == b""
    return msgs


def types(data: bytes) -> bytes:
    return b"".join(t for t, _ in messages(data))


def rows(data: bytes) -> list:
    return [P.parse_data_row(body) for t, body in messages(data) if t == b"D"]


def test_bind_result_format_rule():
    assert result_formats([], 3) == [0, 0, 0]
    assert result_formats([1], 3) == [1, 1, 1]
    assert result_formats([0, 1, 1], 3) == [0, 1, 1]


def test_copy_options_from_statement_text():
    assert copy_options("COPY t TO STDOUT (FORMAT csv, DELIMITER ';')").format == "csv"
    assert copy_options("COPY t TO STDOUT (FORMAT csv, DELIMITER ';')").delimiter == ";"
    assert copy_options("COPY  t TO STDOUT csv header").format == "csv"
    assert copy_options("COPY public.t (id, ssn) TO STDOUT").columns == ("public.t.id", "public.t.ssn")
    assert copy_options("COPY (SELECT 1) TO STDOUT WITH BINARY").format == "binary"
    assert copy_options("not sql at all").format == "text"


def test_cached_statement_executed_without_describe_uses_the_statement_description():
    """asyncpg: Parse+Describe S once, then Bind(binary results)/Execute only."""
    d = masked_driver()
    d.client(P.build_parse("s1", "SELECT ssn FROM t WHERE id = $1") + P.build_describe("S", "s1") + P.SYNC)
    d.server(P.PARSE_COMPLETE + P.build_parameter_description([23]) + P.build_row_description([TEXT_SSN]) + Z_IDLE)
    for _ in range(2):
        d.reset()
        d.client(P.build_bind("", "s1", [b"\0\0\0\1"], [1], [1]) + P.build_execute() + P.SYNC)
        assert b"D\0" not in d.to_server                      # no Describe of our own: the statement has one
        d.server(P.BIND_COMPLETE + P.build_data_row([SSN.encode()]) + P.build_command_complete("SELECT 1") + Z_IDLE)
        assert rows(d.to_client) == [[b"***-**-6789"]]


def test_refusal_on_a_cached_statement_execution():
    d = masked_driver()
    d.client(P.build_parse("s2", "SELECT id, ssn FROM t") + P.build_describe("S", "s2") + P.SYNC)
    d.server(P.PARSE_COMPLETE + P.build_parameter_description([]) + P.build_row_description([INT_ID, TEXT_SSN])
             + Z_IDLE)
    d.reset()
    # "id" is masked by an on_binary: error rule and is an integer: its rows are refused
    d.client(P.build_bind("", "s2", result_formats=[0, 1]) + P.build_execute() + P.SYNC)
    d.server(P.BIND_COMPLETE + P.build_data_row([b"1", SSN.encode()]) + P.build_command_complete("SELECT 1") + Z_IDLE)
    assert types(d.to_client) == b"2EZ"
    assert P.parse_error_fields(messages(d.to_client)[1][1])["C"] == "42501"


def test_portal_described_with_describe_p():
    d = masked_driver()
    d.client(P.build_parse("", "SELECT ssn FROM t") + P.build_bind("", "") + P.build_describe("P", "")
             + P.build_execute() + P.SYNC)
    assert d.to_server.count(b"D\0\0\0\x06P\0") == 1           # the client's own Describe only
    d.server(P.PARSE_COMPLETE + P.BIND_COMPLETE + P.build_row_description([TEXT_SSN])
             + P.build_data_row([SSN.encode()]) + P.build_command_complete("SELECT 1") + Z_IDLE)
    assert types(d.to_client) == b"12TDCZ"
    assert rows(d.to_client) == [[b"***-**-6789"]]


def test_execute_without_any_describe_gets_our_describe_and_its_answer_is_swallowed():
    d = masked_driver()
    d.client(P.build_parse("", "SELECT ssn FROM t") + P.build_bind("", "", result_formats=[1])
             + P.build_execute() + P.SYNC)
    sent = [t for t, _ in messages(d.to_server)]
    assert sent == [b"P", b"B", b"D", b"E", b"S"]
    rd = P.build_row_description([P.FieldDescription("ssn", 0, 0, 25, -1, -1, 1)])
    d.server(P.PARSE_COMPLETE + P.BIND_COMPLETE + rd + P.build_data_row([SSN.encode()])
             + P.build_command_complete("SELECT 1") + Z_IDLE)
    assert types(d.to_client) == b"12DCZ"
    assert rows(d.to_client) == [[b"***-**-6789"]]


def test_without_masking_no_describe_is_injected():
    d = Driver()
    d.client(STARTUP)
    d.server(AUTH_DONE)
    d.reset()
    msg = P.build_parse("", "SELECT 1") + P.build_bind("", "") + P.build_execute() + P.SYNC
    d.client(msg)
    assert d.to_server == msg


def test_refused_simple_query_result_is_replaced_by_an_error_and_the_batch_withheld():
    d = masked_driver()
    d.client(P.build_query("SELECT id FROM t; SELECT 2"))
    d.server(P.build_row_description([INT_ID]) + P.build_data_row([b"7"]) + P.build_command_complete("SELECT 1")
             + P.build_row_description([P.FieldDescription("x", 0, 0, 23, 4, -1, 0)])
             + P.build_data_row([b"2"]) + P.build_command_complete("SELECT 1")
             + P.build_parameter_status("application_name", "x") + Z_IDLE)
    assert types(d.to_client) == b"ESZ"
    err = P.parse_error_fields(messages(d.to_client)[0][1])
    assert err["C"] == "42501" and "on_binary" in err["M"]
    results = [f for t, f in d.events if t == "pg.result"]
    assert results[0]["sqlstate"] == "42501" and results[0]["command_tag"] is None
    # the session keeps working
    d.reset()
    d.client(P.build_query("SELECT ssn FROM t"))
    d.server(P.build_row_description([TEXT_SSN]) + P.build_data_row([SSN.encode()])
             + P.build_command_complete("SELECT 1") + Z_IDLE)
    assert types(d.to_client) == b"TDCZ" and rows(d.to_client) == [[b"***-**-6789"]]


def test_copy_out_csv_is_masked_and_binary_copy_is_refused():
    d = masked_driver()
    d.client(P.build_query("COPY t (name, ssn) TO STDOUT (FORMAT csv)"))
    d.server(P.build_copy_out_response(0, [0, 0]) + P.build_copy_data(f"Jane,{SSN}\n".encode())
             + P.build_copy_data(b"Joe,\n") + P.COPY_DONE + P.build_command_complete("COPY 2") + Z_IDLE)
    data = [body for t, body in messages(d.to_client) if t == b"d"]
    assert data[0] in (b"Jane,***-**-6789\n", b'Jane,"***-**-6789"\n')
    assert data[1] == b"Joe,\n"
    d.reset()
    d.client(P.build_query("COPY t TO STDOUT (FORMAT binary)"))
    d.server(P.build_copy_out_response(1, [1, 1]) + P.build_copy_data(b"PGCOPY\n\xff\r\n\0" + SSN.encode())
             + P.COPY_DONE + P.build_command_complete("COPY 1") + Z_IDLE)
    assert types(d.to_client) == b"EZ"
    assert SSN.encode() not in d.to_client


def test_error_and_notice_details_are_masked_and_untouched_otherwise():
    d = masked_driver()
    d.client(P.build_query("INSERT INTO t VALUES (1)"))
    notice = P.build_notice_response({"S": "NOTICE", "C": "00000", "M": f"saw {SSN}"})
    err = P.build_error_fields({"S": "ERROR", "C": "23505", "M": "duplicate key value violates unique constraint",
                                "D": f"Key (ssn)=({SSN}) already exists."})
    d.server(notice + err + Z_IDLE)
    assert SSN.encode() not in d.to_client
    msgs = messages(d.to_client)
    assert P.parse_error_fields(msgs[1][1])["D"] == "Key (ssn)=([REDACTED]) already exists."
    assert P.parse_error_fields(msgs[1][1])["C"] == "23505"
    d.reset()
    d.client(P.build_query("SELECT 1/0"))
    plain = P.build_error_response("22012", "division by zero") + Z_IDLE
    d.server(plain)
    assert d.to_client == plain


def test_records_hold_masked_texts_params_and_errors():
    d = masked_driver()
    d.client(P.build_query(f"SELECT * FROM t WHERE ssn = '{SSN}'"))
    d.server(P.build_row_description([TEXT_SSN]) + P.build_data_row([SSN.encode()])
             + P.build_command_complete("SELECT 1") + Z_IDLE)
    d.client(P.build_parse("", "SELECT $1::text, $2::text") + P.build_bind("", "", [SSN.encode(), b"a@b.example"],
                                                                            [0, 1])
             + P.build_execute() + P.SYNC)
    d.server(P.PARSE_COMPLETE + P.BIND_COMPLETE + P.build_error_response("22000", f"bad value {SSN}") + Z_IDLE)
    assert SSN not in repr(d.events) and "a@b.example" not in repr(d.events)
    assert b"a@b.example".hex() not in repr(d.events)
    stmts = [f for t, f in d.events if t == "pg.statement"]
    assert stmts[0]["text"] == "SELECT * FROM t WHERE ssn = '[REDACTED]'"
    assert stmts[1]["params"] == ["[REDACTED]", "[REDACTED]"]
    applied = [f for t, f in d.events if t == "mask.applied"]
    assert applied and applied[0]["columns"] == {"ssn": 1} and applied[0]["statement_index"] == 1


def deny_deletes(req):
    out = []
    for part in [p.strip() for p in req.sql.split(";") if p.strip()]:
        denied = part.lower().startswith("delete")
        out.append(Verdict(not denied, part, action="pg:delete" if denied else "pg:select", kind="select",
                           decision="deny" if denied else "allow", policy_ids=("p1",),
                           reason="no deletes" if denied else ""))
    return out


@pytest.mark.parametrize("masking", [False, True], ids=["plain", "masking"])
def test_every_event_fits_the_record_schema(masking):
    masker = load_masking(RULES).for_session("svc-a", {}, "db1") if masking else None
    d = Driver(decider=deny_deletes, masking=masker)
    d.client(STARTUP)
    d.server(AUTH_DONE)
    d.client(P.build_query("SELECT ssn FROM t; SELECT 2"))
    d.server(P.build_row_description([TEXT_SSN]) + P.build_data_row([SSN.encode()])
             + P.build_command_complete("SELECT 1") + P.build_row_description([INT_ID])
             + P.build_data_row([b"2"]) + P.build_command_complete("SELECT 1") + Z_IDLE)
    d.client(P.build_query("DELETE FROM t"))
    d.server(P.build_error_response("42501", "denied") + Z_IDLE)
    d.client(P.build_parse("", "SELECT $1") + P.build_bind("", "", [b"x"]) + P.build_describe("P", "")
             + P.build_execute() + P.SYNC)
    d.server(P.PARSE_COMPLETE + P.BIND_COMPLETE + P.build_row_description([TEXT_SSN])
             + P.build_data_row([b"x"]) + P.build_command_complete("SELECT 1") + Z_IDLE)
    d.client(P.build_parse("", "DELETE FROM t") + P.build_bind("", "") + P.build_execute() + P.SYNC)
    d.server(P.build_error_response("42501", "denied") + Z_IDLE)
    d.client(P.build_query("COPY t TO STDOUT"))
    d.server(P.build_copy_out_response(0, [0]) + P.build_copy_data(f"{SSN}\n".encode()) + P.COPY_DONE
             + P.build_command_complete("COPY 1") + Z_IDLE)
    d.client(P.build_query("SELECT 1"))                   # still running when the session ends
    d._run(d.s.finish("client_closed"))
    seen = set()
    for event_type, fields in d.events:
        validate_fields(event_type, fields)
        assert {k for k in fields if k.startswith("x_")} <= {"x_statement_name", "x_values_nulled", "x_copy_rows",
                                                             "x_text_values_masked"}
        seen.add(event_type)
    expected = {"session.start", "pg.statement", "pg.result", "session.end"}
    assert expected <= seen
    if masking:
        assert "mask.applied" in seen
    start = [f for t, f in d.events if t == "session.start"][0]
    assert start["auth_user"] == "alice" and "user" not in start
    end = [f for t, f in d.events if t == "session.end"][0]
    assert end["duration_ns"] >= 0 and end["statements"] == 7


def test_session_start_keeps_the_agent_fields_as_given():
    process = {"pid": 7, "user": "svc", "cmdline": ["app", "--password=<redacted>"]}
    d = Driver(start_fields={"identity": "svc-a", "target": "db1", "process": process, "client": "127.0.0.1:5"})
    d.client(STARTUP)
    d.server(AUTH_DONE)
    start = [f for t, f in d.events if t == "session.start"][0]
    assert start["process"] == process and start["client"] == "127.0.0.1:5" and start["auth_user"] == "alice"
    validate_fields("session.start", start)


def test_direct_ssl_detection_needs_only_the_first_byte():
    """PG17 sslnegotiation=direct: the first byte is a TLS handshake record (0x16), never a
    startup length (which would be >= 0x16000000 bytes: far over the startup limit)."""
    hello = bytes([P.TLS_HANDSHAKE_BYTE]) + b"\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
    for chunk in (hello[:1], hello):
        d = Driver(client_tls_available=True)
        d.client(chunk)
        assert d.other == [(S.START_CLIENT_TLS, "direct")] and d.to_client == b""
    # an SSLRequest starts with a length word 0x00000008: not mistaken for TLS
    d = Driver(client_tls_available=True)
    d.client(P.build_ssl_request())
    assert d.to_client == b"S" and d.other == [(S.START_CLIENT_TLS, "sslrequest")]
