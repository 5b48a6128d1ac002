"""Bind parameters in binary format, as the pg.statement records show them: read by the statement's
parameter types (declared in its Parse, or the server's ParameterDescription answering a Describe
'S'), in the C lanes and the Python loops alike; hex only when the type is unknown or the bytes do
not fit it."""
import struct
import uuid

import pytest

from enforcer.postgres import protocol as P
from enforcer.postgres import session as S
from tests.unit.test_pg_session import Driver, ready_driver
from tests.unit.test_pg_session_masking import masked_driver

Z_IDLE = P.build_ready_for_query("I")
SELECT = "SELECT * FROM customers WHERE id = $1"
UUID = uuid.UUID("12345678-1234-5678-1234-567812345678")


def params_of(d: Driver) -> list:
    return [f["params"] for t, f in d.events if t == "pg.statement"]


def bind(values, statement="", formats=(1,)) -> bytes:
    return P.build_bind("", statement, values, param_formats=list(formats)) + P.build_execute() + P.SYNC


def answer(tag="SELECT 0") -> bytes:
    return P.build_bind_complete() + P.build_command_complete(tag) + Z_IDLE


def test_declared_types_read_binary_values_as_postgres_prints_them(lane):
    d = ready_driver()
    types = [21, 23, 20, 26, 16, 25, 2950, 701, 1082, 17, 0, 23]
    d.client(P.build_parse("q", SELECT, types) + P.SYNC)
    d.server(P.build_parse_complete() + Z_IDLE)
    values = [struct.pack("!h", -2), struct.pack("!i", 42), struct.pack("!q", -9007199254740993),
              struct.pack("!I", 4294967295), b"\x01", "zoë".encode(), UUID.bytes, struct.pack("!d", 1.5),
              struct.pack("!i", 9465), b"\x00\x01", b"\x00\x2a", b"\x00\x2a"]
    # twice: the first Bind builds the statement's record template, the second is the C lanes' case
    for _ in range(2):
        d.client(bind(values, "q"))
        d.server(answer())
    expected = ["-2", "42", "-9007199254740993", "4294967295", "true", "zoë", str(UUID), "1.5", "2025-11-30",
                "\\x0001",      # bytea: no text form read here
                "\\x002a",      # type left to the server and never described
                "\\x002a"]      # an int4 of two bytes is not what the type says
    assert params_of(d) == [expected, expected]


def test_text_format_values_and_nulls_are_unchanged(lane):
    d = ready_driver()
    d.client(P.build_parse("q", SELECT, [23, 23]) + P.SYNC)
    d.server(P.build_parse_complete() + Z_IDLE)
    for _ in range(2):
        d.client(bind([b"42", None], "q", formats=()))
        d.server(answer())
        d.client(bind([None, struct.pack("!i", 7)], "q", formats=(1,)))
        d.server(answer())
    assert params_of(d) == [["42", None], [None, "7"]] * 2


def test_types_described_by_the_server_are_used_for_later_executions(lane):
    """asyncpg prepares with untyped parameters and a Describe 'S', then binds every value in binary."""
    d = ready_driver()
    d.client(P.build_parse("q", SELECT) + P.build_describe("S", "q") + P.SYNC)
    d.server(P.build_parse_complete() + P.build_parameter_description([23, 25]) + P.NO_DATA + Z_IDLE)
    for i in range(2):
        d.client(bind([struct.pack("!i", 7 + i), b"abc"], "q"))
        d.server(answer())
    assert params_of(d) == [["7", "abc"], ["8", "abc"]]
    assert d.to_client.count(b"t\0\0\0") == 1        # the ParameterDescription still reaches the client


def test_each_describe_of_a_batch_gets_its_own_answer(lane):
    d = ready_driver()
    d.client(P.build_parse("a", SELECT) + P.build_parse("b", SELECT) + P.build_describe("S", "a")
             + P.build_describe("S", "b") + P.SYNC)
    d.server(P.build_parse_complete() * 2 + P.build_parameter_description([21]) + P.NO_DATA
             + P.build_parameter_description([20]) + P.NO_DATA + Z_IDLE)
    d.client(bind([struct.pack("!h", 5)], "a"))
    d.server(answer())
    d.client(bind([struct.pack("!q", 6)], "b"))
    d.server(answer())
    assert params_of(d) == [["5"], ["6"]]


def test_a_describe_skipped_after_an_error_takes_no_later_answer(lane):
    """The server skips a failed batch's Describe: the next batch's ParameterDescription belongs
    to the next batch's statement, not to the skipped one."""
    d = ready_driver()
    d.client(P.build_parse("bad", "SELEC 1") + P.build_describe("S", "bad") + P.SYNC
             + P.build_parse("good", SELECT) + P.build_describe("S", "good") + P.SYNC)
    d.server(P.build_error_response("42601", "syntax error") + Z_IDLE)
    d.server(P.build_parse_complete() + P.build_parameter_description([23]) + P.NO_DATA + Z_IDLE)
    d.client(bind([struct.pack("!i", 99)], "good"))
    d.server(answer())
    assert params_of(d) == [["99"]]
    assert not d.s._described_params


def test_a_describe_of_a_statement_unknown_here_keeps_the_order(lane):
    """A name the session does not know (the server answers it with an error) still holds its
    place, so the answers that follow go to the right statements."""
    d = ready_driver()
    d.client(P.build_parse("q", SELECT) + P.SYNC)
    d.server(P.build_parse_complete() + Z_IDLE)
    d.client(P.build_describe("S", "q") + P.SYNC + P.build_describe("S", "nope") + P.SYNC)
    d.server(P.build_parameter_description([23]) + P.NO_DATA + Z_IDLE)
    d.server(P.build_error_response("26000", 'prepared statement "nope" does not exist') + Z_IDLE)
    d.client(bind([struct.pack("!i", 3)], "q"))
    d.server(answer())
    assert params_of(d) == [["3"]]


def test_a_malformed_parameter_description_ends_the_session_with_08P01(lane):
    d = ready_driver()
    d.client(P.build_parse("q", SELECT) + P.build_describe("S", "q") + P.SYNC)
    d.server(P.build_parse_complete() + b"t\0\0\0\x07\0\x02\0")
    errors = [f for f in P.split_messages(d.to_client)[0] if f[0] == b"E"]
    assert errors and b"08P01" in errors[-1][1] and b"ParameterDescription" in errors[-1][1]
    assert d.s.phase == S.CLOSED


@pytest.mark.skipif(S._lanes is None, reason="the session runs without the C lanes (WARDEN_PURE_PYTHON=1)")
def test_the_c_lane_reads_typed_values_itself():
    d = ready_driver()
    d.client(P.build_parse("q", SELECT, [23, 701, 25]) + P.SYNC)
    d.server(P.build_parse_complete() + Z_IDLE)
    d.client(bind([b"\0\0\0\1", struct.pack("!d", 0.1), b"x"], "q"))
    d.server(answer())
    data = bind([b"\0\0\0\2", struct.pack("!d", 2.5), "é".encode()], "q")
    out = []
    assert S._lanes.client_lane(d.s, data, 0, S.DEFAULT_MAX_MESSAGE_BYTES, out) == len(data)
    assert [f["params"] for _, (_, f) in out] == [["2", "2.5", "é"]]


def test_masking_applies_to_values_read_by_their_type():
    """A binary text value is masked like a text one; a declared int is masked by the detectors
    when it is what they look for (a card number as an int8)."""
    d = masked_driver()
    d.client(P.build_parse("q", SELECT, [25, 20]) + P.SYNC)
    d.server(P.build_parse_complete() + Z_IDLE)
    d.client(bind([b"ssn 123-45-6789", struct.pack("!q", 4111111111111111)], "q"))
    d.server(answer())
    (params,) = params_of(d)
    assert "123-45-6789" not in params[0] and "4111111111111111" not in params[1]


@pytest.mark.parametrize("describe", [b"D\0\0\0\x07P\0C", b"D\0\0\0\x06X\0", b"D\0\0\0\x06Pp"])
def test_a_malformed_describe_gets_08P01_with_or_without_the_lanes(lane, describe):
    """Every Describe is read now (its ParameterDescription is noted): trailing bytes, an unknown
    target or a missing NUL closes the connection with 08P01 instead of reaching the server."""
    d = ready_driver()
    d.client(describe + P.SYNC)
    assert d.to_server == b""
    errors = [f for f in P.split_messages(d.to_client)[0] if f[0] == b"E"]
    assert errors and b"08P01" in errors[-1][1]


def test_describes_that_fail_leave_no_notes_behind(lane):
    """A client describing unknown statements again and again: each batch's note is dropped once a
    later batch notes its own, so they do not pile up while no ParameterDescription comes."""
    d = ready_driver()
    for _ in range(50):
        d.client(P.build_describe("S", "nope") + P.SYNC)
        d.server(P.build_error_response("26000", 'prepared statement "nope" does not exist') + Z_IDLE)
    assert len(d.s._described_params) == 1
