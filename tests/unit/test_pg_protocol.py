"""Bytes-level tests of every PostgreSQL v3 message, frontend and backend: builders and parsers."""
import struct

import pytest

from enforcer.postgres import protocol as P


def body_of(msg: bytes) -> bytes:
    """Check framing (type byte + int32 length) and return the body."""
    (length,) = struct.unpack("!i", msg[1:5])
    assert length == len(msg) - 1
    return msg[5:]


# ---- startup-phase packets -------------------------------------------------------------
def test_startup_message_bytes_and_parse():
    msg = P.build_startup_message({"user": "alice", "database": "app"})
    assert msg[4:8] == b"\x00\x03\x00\x00"
    assert msg[8:] == b"user\0alice\0database\0app\0\0"
    assert struct.unpack("!i", msg[:4])[0] == len(msg)
    pkt = P.parse_startup_packet(msg)
    assert (pkt.kind, pkt.major, pkt.minor, pkt.params) == ("startup", 3, 0, {"user": "alice", "database": "app"})


def test_startup_message_protocol_3_2():
    pkt = P.parse_startup_packet(P.build_startup_message({"user": "u", "_pq_.x": "1"}, P.PROTOCOL_3_2))
    assert (pkt.major, pkt.minor) == (3, 2)
    assert pkt.params["_pq_.x"] == "1"


def test_ssl_gssenc_cancel_requests():
    assert P.build_ssl_request() == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
    assert P.build_gssenc_request() == b"\x00\x00\x00\x08\x04\xd2\x16\x30"
    assert P.parse_startup_packet(P.build_ssl_request()).kind == "ssl"
    assert P.parse_startup_packet(P.build_gssenc_request()).kind == "gssenc"
    cancel = P.build_cancel_request(1234, b"\x01\x02\x03\x04")
    assert cancel == b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x04\xd2\x01\x02\x03\x04"
    pkt = P.parse_startup_packet(cancel)
    assert (pkt.kind, pkt.cancel_pid, pkt.cancel_key) == ("cancel", 1234, b"\x01\x02\x03\x04")
    # protocol 3.2 long cancel key
    long_key = bytes(range(32))
    assert P.parse_startup_packet(P.build_cancel_request(7, long_key)).cancel_key == long_key


def test_startup_packet_malformed():
    with pytest.raises(P.ProtocolError):
        P.parse_startup_packet(b"\x00\x00\x00\x0c\x00\x03\x00\x00user")      # unterminated
    with pytest.raises(P.ProtocolError):
        P.parse_startup_packet(b"\x00\x00\x00\x09\x04\xd2\x16\x2f\x00")      # SSLRequest with a tail
    with pytest.raises(P.ProtocolError):
        P.parse_startup_packet(b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00")  # length mismatch


# ---- frontend messages -----------------------------------------------------------------
def test_query():
    msg = P.build_query("select 1")
    assert msg == b"Q\x00\x00\x00\x0dselect 1\x00"
    assert P.parse_query(body_of(msg)) == "select 1"
    with pytest.raises(P.ProtocolError):
        P.parse_query(b"select 1")


def test_parse():
    msg = P.build_parse("s1", "select $1", [23])
    assert msg[:1] == b"P"
    assert body_of(msg) == b"s1\0select $1\0\x00\x01\x00\x00\x00\x17"
    m = P.parse_parse(body_of(msg))
    assert (m.name, m.query, m.param_types) == ("s1", "select $1", [23])


def test_bind_text_binary_null():
    msg = P.build_bind("p", "s1", [b"42", None, b"\x00\x01"], param_formats=[0, 0, 1], result_formats=[1])
    b = P.parse_bind(body_of(msg))
    assert (b.portal, b.statement) == ("p", "s1")
    assert b.params == [b"42", None, b"\x00\x01"]
    assert b.param_formats == [0, 0, 1]
    assert b.result_formats == [1]
    assert body_of(P.build_bind("", "")) == b"\0\0\x00\x00\x00\x00\x00\x00"
    with pytest.raises(P.ProtocolError):
        P.parse_bind(body_of(msg)[:-1])


def test_describe_close_execute():
    assert P.build_describe("S", "s1") == b"D\x00\x00\x00\x08Ss1\x00"
    assert P.parse_describe(b"Ps1\0") == ("P", "s1")
    assert P.build_close("P", "") == b"C\x00\x00\x00\x06P\x00"
    assert P.parse_close(b"S\0") == ("S", "")
    with pytest.raises(P.ProtocolError):
        P.parse_describe(b"Xs\0")
    assert P.build_execute("", 0) == b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"
    assert P.parse_execute(b"cur\0\x00\x00\x00\x0a") == ("cur", 10)


def test_sync_flush_terminate_copy_frontend():
    assert P.build_sync() == b"S\x00\x00\x00\x04"
    assert P.build_flush() == b"H\x00\x00\x00\x04"
    assert P.build_terminate() == b"X\x00\x00\x00\x04"
    assert P.build_copy_data(b"1\tx\n") == b"d\x00\x00\x00\x081\tx\n"
    assert P.build_copy_done() == b"c\x00\x00\x00\x04"
    fail = P.build_copy_fail("aborted")
    assert fail[:1] == b"f" and P.parse_copy_fail(body_of(fail)) == "aborted"


def test_function_call():
    msg = P.build_function_call(1598, [b"\x00\x00\x00\x05", None], arg_formats=[1], result_format=1)
    fc = P.parse_function_call(body_of(msg))
    assert (fc.function_oid, fc.arg_formats, fc.args, fc.result_format) == (1598, [1], [b"\x00\x00\x00\x05", None], 1)


def test_password_and_sasl_messages():
    assert P.build_password("secret") == b"p\x00\x00\x00\x0bsecret\x00"
    assert P.parse_password(b"md5abc\0") == b"md5abc"
    init = P.build_sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc")
    assert P.parse_sasl_initial_response(body_of(init)) == ("SCRAM-SHA-256", b"n,,n=,r=abc")
    assert P.parse_sasl_initial_response(body_of(P.build_sasl_initial_response("X", None))) == ("X", None)
    resp = P.build_sasl_response(b"c=biws,r=abc,p=xyz")
    assert P.parse_sasl_response(body_of(resp)) == b"c=biws,r=abc,p=xyz"


# ---- backend messages ------------------------------------------------------------------
def test_authentication_requests():
    assert P.build_authentication_ok() == b"R\x00\x00\x00\x08\x00\x00\x00\x00"
    assert P.parse_authentication(body_of(P.build_authentication_cleartext())).code == P.AUTH_CLEARTEXT
    md5 = P.parse_authentication(body_of(P.build_authentication_md5(b"\x01\x02\x03\x04")))
    assert (md5.code, md5.salt) == (P.AUTH_MD5, b"\x01\x02\x03\x04")
    sasl = P.build_authentication_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])
    assert body_of(sasl) == b"\x00\x00\x00\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"
    assert P.parse_authentication(body_of(sasl)).mechanisms == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    cont = P.parse_authentication(body_of(P.build_authentication_sasl_continue(b"r=abc,s=xyz,i=4096")))
    assert (cont.code, cont.data) == (P.AUTH_SASL_CONTINUE, b"r=abc,s=xyz,i=4096")
    fin = P.parse_authentication(body_of(P.build_authentication_sasl_final(b"v=sig")))
    assert (fin.code, fin.data) == (P.AUTH_SASL_FINAL, b"v=sig")


def test_parameter_status_backend_key_ready():
    ps = P.build_parameter_status("client_encoding", "UTF8")
    assert ps == b"S\x00\x00\x00\x19client_encoding\x00UTF8\x00"
    assert P.parse_parameter_status(body_of(ps)) == ("client_encoding", "UTF8")
    k = P.build_backend_key_data(99, b"\xaa\xbb\xcc\xdd")
    assert k == b"K\x00\x00\x00\x0c\x00\x00\x00\x63\xaa\xbb\xcc\xdd"
    assert P.parse_backend_key_data(body_of(k)) == (99, b"\xaa\xbb\xcc\xdd")
    assert P.build_ready_for_query("T") == b"Z\x00\x00\x00\x05T"
    assert P.parse_ready_for_query(b"E") == "E"
    with pytest.raises(P.ProtocolError):
        P.parse_ready_for_query(b"Q")


def test_row_description_and_data_row():
    fields = [P.FieldDescription("id", 16384, 1, 23, 4, -1, 0), P.FieldDescription("email", 16384, 2, 25, -1, -1, 1)]
    rd = P.build_row_description(fields)
    assert rd[:1] == b"T"
    assert body_of(rd)[:2] == b"\x00\x02"
    assert P.parse_row_description(body_of(rd)) == fields
    dr = P.build_data_row([b"1", None, b""])
    assert dr == b"D\x00\x00\x00\x13\x00\x03\x00\x00\x00\x011\xff\xff\xff\xff\x00\x00\x00\x00"
    assert P.parse_data_row(body_of(dr)) == [b"1", None, b""]
    with pytest.raises(P.ProtocolError):
        P.parse_data_row(b"\x00\x01\x00\x00\x00\x05ab")


def test_command_complete_and_row_counts():
    cc = P.build_command_complete("INSERT 0 3")
    assert cc == b"C\x00\x00\x00\x0fINSERT 0 3\x00"
    assert P.parse_command_complete(body_of(cc)) == "INSERT 0 3"
    assert P.rows_from_tag("SELECT 5") == 5
    assert P.rows_from_tag("COPY 10") == 10
    assert P.rows_from_tag("BEGIN") is None


def test_error_and_notice_response():
    err = P.build_error_response("42501", "denied", detail="d")
    assert err[:1] == b"E"
    assert body_of(err) == b"SERROR\0VERROR\0C42501\0Mdenied\0Dd\0\0"
    assert P.parse_error_fields(body_of(err)) == {"S": "ERROR", "V": "ERROR", "C": "42501", "M": "denied", "D": "d"}
    notice = P.build_notice_response({"S": "NOTICE", "C": "00000", "M": "hi"})
    assert notice[:1] == b"N"
    assert P.parse_error_fields(body_of(notice))["M"] == "hi"
    with pytest.raises(P.ProtocolError):
        P.parse_error_fields(b"Mno terminator")


def test_notification_parameter_description_copy_responses():
    n = P.build_notification(7, "chan", "payload")
    assert n == b"A\x00\x00\x00\x15\x00\x00\x00\x07chan\x00payload\x00"
    assert P.parse_notification(body_of(n)) == (7, "chan", "payload")
    pd = P.build_parameter_description([23, 25])
    assert pd == b"t\x00\x00\x00\x0e\x00\x02\x00\x00\x00\x17\x00\x00\x00\x19"
    assert P.parse_parameter_description(body_of(pd)) == [23, 25]
    for build, t in ((P.build_copy_in_response, b"G"), (P.build_copy_out_response, b"H"),
                     (P.build_copy_both_response, b"W")):
        m = build(0, [0, 0])
        assert m == t + b"\x00\x00\x00\x0b\x00\x00\x02\x00\x00\x00\x00"
        assert P.parse_copy_response(body_of(m)) == (0, [0, 0])


def test_fixed_backend_messages():
    assert P.build_parse_complete() == b"1\x00\x00\x00\x04"
    assert P.build_bind_complete() == b"2\x00\x00\x00\x04"
    assert P.build_close_complete() == b"3\x00\x00\x00\x04"
    assert P.build_no_data() == b"n\x00\x00\x00\x04"
    assert P.build_portal_suspended() == b"s\x00\x00\x00\x04"
    assert P.build_empty_query_response() == b"I\x00\x00\x00\x04"


def test_negotiate_protocol_version_and_function_call_response():
    v = P.build_negotiate_protocol_version(0, ["_pq_.foo"])
    assert v == b"v\x00\x00\x00\x15\x00\x00\x00\x00\x00\x00\x00\x01_pq_.foo\x00"
    assert P.parse_negotiate_protocol_version(body_of(v)) == (0, ["_pq_.foo"])
    fr = P.build_function_call_response(b"\x00\x01")
    assert P.parse_function_call_response(body_of(fr)) == b"\x00\x01"
    assert P.parse_function_call_response(body_of(P.build_function_call_response(None))) is None


def test_split_messages_keeps_incomplete_tail():
    stream = P.build_query("a") + P.build_sync() + P.build_query("bbb")[:4]
    msgs, rest = P.split_messages(stream)
    assert msgs == [(b"Q", b"a\0"), (b"S", b"")]
    assert rest == P.build_query("bbb")[:4]
    with pytest.raises(P.ProtocolError):
        P.split_messages(b"Q\x00\x00\x00\x02")


def test_param_format_follows_binds_rule():
    assert [P.param_format([], i) for i in range(3)] == [0, 0, 0]
    assert [P.param_format([1], i) for i in range(3)] == [1, 1, 1]
    assert [P.param_format([0, 1], i) for i in range(3)] == [0, 1, 0]


def test_binary_values_read_as_text():
    import struct
    import uuid
    assert P.binary_value_text(21, struct.pack("!h", 1)) == "1"
    assert P.binary_value_text(20, struct.pack("!q", -7)) == "-7"
    assert P.binary_value_text(16, b"\x01") == "true"
    assert P.binary_value_text(2950, uuid.UUID(int=5).bytes) == str(uuid.UUID(int=5))
    assert P.binary_value_text(1082, struct.pack("!i", 1)) == "2000-01-02"
    assert P.binary_value_text(3802, b'\x01{"a": 1}') == '{"a": 1}'
    # bytes that do not fit the type, or a type without a simple binary form: None (shown as hex)
    assert P.binary_value_text(23, b"\x00\x01") is None
    assert P.binary_value_text(3802, b'\x02{}') is None
    assert P.binary_value_text(25, b"\xff") is None
    assert P.binary_value_text(1700, b"\x00\x01\x00\x00") is None
