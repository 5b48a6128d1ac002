"""The hot-path shortcuts of the Postgres session: bytes in -> the same bytes out, whatever the
read boundaries, and the same records as message-by-message processing would give."""
from __future__ import annotations

import pytest

from enforcer.postgres import protocol as P
from enforcer.postgres.protocol import FieldDescription
from enforcer.postgres.session import DECIDE, EVENT, TO_CLIENT, TO_SERVER, PostgresSession, Verdict

FIELDS = [FieldDescription("g", 0, 0, 23, 4, -1, 0), FieldDescription("h", 0, 0, 25, -1, -1, 0)]


def ready_session() -> PostgresSession:
    s = PostgresSession(identity="svc", target="db")
    s.feed_client(P.build_startup_message({"user": "alice", "database": "app"}))
    s.feed_server(P.build_authentication_ok() + P.build_ready_for_query("I"))
    assert s.phase == "ready"
    return s


def run(session: PostgresSession, actions: list, sink: dict) -> None:
    """Execute actions like the shell: collect writes and events, answer decisions with allow."""
    for kind, payload in actions:
        if kind == TO_CLIENT:
            sink["client"] += bytes(payload)
        elif kind == TO_SERVER:
            sink["server"] += bytes(payload)
        elif kind == EVENT:
            sink["events"].append(payload)
        elif kind == DECIDE:
            run(session, session.resume([Verdict(True, payload.sql, action="pg:select", kind="select",
                                                  tables=("t",), policy_ids=("p1",))]), sink)


def new_sink() -> dict:
    return {"client": b"", "server": b"", "events": []}


def server_stream(rows: int = 50, big: int = 0) -> bytes:
    """A simple query's answer, a COPY TO STDOUT's answer, with notices in between."""
    out = [P.build_row_description(FIELDS)]
    for i in range(rows):
        out.append(P.build_data_row([str(i).encode(), None if i % 7 == 0 else b"x" * (i % 13)]))
    if big:
        out.append(P.build_data_row([b"1", b"y" * big]))
    out += [P.build_command_complete(f"SELECT {rows + (1 if big else 0)}"), P.build_ready_for_query("I"),
            P.build_copy_out_response(0, [0, 0])]
    out += [P.build_copy_data(f"{i}\trow {i}\n".encode()) for i in range(rows)]
    out += [P.build_notice_response({"S": "NOTICE", "C": "00000", "M": "between"}),
            P.COPY_DONE, P.build_command_complete(f"COPY {rows}"), P.build_ready_for_query("I")]
    return b"".join(out)


def client_queries(session: PostgresSession, sink: dict) -> None:
    run(session, session.feed_client(P.build_query("SELECT g, h FROM t")
                                      + P.build_query("COPY t TO STDOUT")), sink)


def results(sink: dict) -> list:
    return [(f["command_tag"], f["rows"], f["bytes"]) for t, f in sink["events"] if t == "pg.result"]


@pytest.mark.parametrize("big", [0, 300_000])
def test_server_bytes_pass_unchanged_at_every_split(big):
    stream = server_stream(big=big)
    reference = None
    step = 1 if not big else 997          # every offset for the small stream; a dense sweep for the big one
    for cut in range(0, len(stream) + 1, step):
        s = ready_session()
        sink = new_sink()
        client_queries(s, sink)
        run(s, s.feed_server(stream[:cut]), sink)
        run(s, s.feed_server(stream[cut:]), sink)
        assert sink["client"] == stream, cut
        got = results(sink)
        if reference is None:
            reference = got
            assert got[0][:2] == (f"SELECT {50 + (1 if big else 0)}", 50 + (1 if big else 0))
            assert got[1][:2] == ("COPY 50", 50)
        assert got == reference, cut


def test_server_bytes_fed_in_small_reads():
    stream = server_stream(big=1_000_000)
    for size in (1, 7, 4096, 65536):
        if size == 1:
            stream_used = server_stream(rows=20)
        else:
            stream_used = stream
        s = ready_session()
        sink = new_sink()
        client_queries(s, sink)
        for i in range(0, len(stream_used), size):
            run(s, s.feed_server(stream_used[i:i + size]), sink)
        assert sink["client"] == stream_used
        assert [r[1] for r in results(sink)][1] in (20, 50)


def test_rows_and_bytes_counted_per_result():
    stream = server_stream(rows=10)
    s = ready_session()
    sink = new_sink()
    client_queries(s, sink)
    run(s, s.feed_server(stream), sink)
    (tag1, rows1, bytes1), (tag2, rows2, bytes2) = results(sink)
    data_rows = [m for m in P.split_messages(stream)[0] if m[0] == b"D"]
    copy_rows = [m for m in P.split_messages(stream)[0] if m[0] == b"d"]
    assert rows1 == len(data_rows) == 10 and bytes1 == sum(len(b) + 4 for _, b in data_rows)
    assert rows2 == 10 and bytes2 == sum(len(b) + 4 for _, b in copy_rows)


def extended_cycle(n: int) -> bytes:
    out = []
    for i in range(n):
        out += [P.build_bind("" if i % 2 else "p1", "st", [str(i).encode(), None], result_formats=[0]),
                P.build_describe("P", "" if i % 2 else "p1"), P.build_execute("" if i % 2 else "p1", 0), P.SYNC]
    return b"".join(out)


def test_client_extended_cycle_at_every_split():
    prepare = P.build_parse("st", "SELECT $1::int, $2::text", [23, 25]) + P.SYNC
    cycle = extended_cycle(4)
    reference = None
    for cut in range(len(cycle) + 1):
        s = ready_session()
        sink = new_sink()
        run(s, s.feed_client(prepare), sink)
        run(s, s.feed_client(cycle[:cut]), sink)
        run(s, s.feed_client(cycle[cut:]), sink)
        assert sink["server"] == prepare + cycle, cut
        stmts = [f for t, f in sink["events"] if t == "pg.statement"]
        if reference is None:
            reference = stmts
            assert [f["params"] for f in stmts] == [[str(i), None] for i in range(4)]
            assert [f["statement_index"] for f in stmts] == [1, 2, 3, 4]
            assert [f.get("portal") for f in stmts] == ["p1", None, "p1", None]
            assert all(f["text"] == "SELECT $1::int, $2::text" and f["tables"] == ["t"]
                       and f["policy_ids"] == ["p1"] and f["protocol"] == "extended"
                       and f["statement_name"] == "st" for f in stmts)
            # each execution has its own record (the shared template is never handed out)
            assert len({id(f) for f in stmts}) == 4
        assert stmts == reference, cut


def test_large_bind_in_many_reads():
    s = ready_session()
    sink = new_sink()
    run(s, s.feed_client(P.build_parse("st", "SELECT $1::text", [25]) + P.SYNC), sink)
    sink["server"] = b""
    value = b"v" * 2_000_000
    msg = P.build_bind("", "st", [value]) + P.build_execute("", 0) + P.SYNC
    for i in range(0, len(msg), 16384):
        run(s, s.feed_client(msg[i:i + 16384]), sink)
    assert sink["server"] == msg
    (stmt,) = [f for t, f in sink["events"] if t == "pg.statement"]
    assert stmt["params"] == [value.decode()]


@pytest.mark.parametrize("msg", [
    P.build_bind("", ""),
    P.build_bind("portal", "stmt", [b"1", None, b""], param_formats=[0, 1, 0], result_formats=[1, 0]),
    P.build_bind("", "s", [b"\x00\x01"], param_formats=[1]),
])
def test_parse_bind_at_matches_parse_bind(msg):
    body = msg[5:]
    b = P.parse_bind(body)
    assert P.parse_bind_at(b"junk" + body + b"more", 4, 4 + len(body)) == (
        b.portal, b.statement, b.param_formats, b.params, b.result_formats)


@pytest.mark.parametrize("body", [b"", b"a\0", b"a\0b\0\0\1", b"\0\0\0\0\0\1\0\0\0\x09x\0\0",
                                  b"\0\0\0\0\0\0\0\0\0", b"\0\0\xff\xff\0\0\0\0"])
def test_parse_bind_at_rejects_malformed(body):
    with pytest.raises(P.ProtocolError):
        P.parse_bind_at(body, 0, len(body))
    with pytest.raises(P.ProtocolError):
        P.parse_bind(body)


def test_malformed_bind_closes_with_08P01():
    s = ready_session()
    sink = new_sink()
    run(s, s.feed_client(P.build_parse("st", "SELECT 1") + P.SYNC), sink)
    run(s, s.feed_client(b"B" + (9).to_bytes(4, "big") + b"\0st\0\xff\xff"), sink)
    assert b"08P01" in sink["client"] and s.phase == "closed"


def test_pipelined_simple_queries_each_get_their_result():
    # the ReadyForQuery ending startup answers no batch: it must not shift later batches
    s = ready_session()
    sink = new_sink()
    run(s, s.feed_client(P.build_query("SELECT 1") + P.build_query("SELECT 2")), sink)
    one = P.build_data_row([b"1"]) + P.build_command_complete("SELECT 1") + P.build_ready_for_query("I")
    run(s, s.feed_server(one + one), sink)
    got = [(f["statement_index"], f["command_tag"], f["error"]) for t, f in sink["events"] if t == "pg.result"]
    assert got == [(1, "SELECT 1", None), (2, "SELECT 1", None)]
