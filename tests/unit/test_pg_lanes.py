"""enforcer/postgres/_pglanes.c against the Python loops it stands in for: for any byte stream,
cut anywhere, a session with the C lanes gives the same actions (bytes, records with their
fields in the same order, decisions), the same clock readings and the same state as one
without them."""
from __future__ import annotations

import contextlib
import itertools
import os
import time
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer import sqlclass
from enforcer.policy.cachekeys import base_guard
from enforcer.postgres import protocol as P
from enforcer.postgres import session as S
from enforcer.postgres.protocol import FieldDescription
from enforcer.postgres.session import DECIDE, EVENT, TO_CLIENT, TO_SERVER, PostgresSession, Verdict
from tests.native_switch import lanes

try:
    from enforcer.postgres import _pglanes as native
except ImportError:
    if os.environ.get("CI") == "true":
        raise   # make setup builds the module: a missing one in CI is a build bug, not a skip
    pytest.skip("enforcer.postgres._pglanes is not built (pip install -e .)", allow_module_level=True)

LANES = S._lanes
# tests that call the lanes directly need them configured by session.py; with WARDEN_PURE_PYTHON=1
# it leaves them off (the Python loops are then the ones every other test file runs)
needs_lanes = pytest.mark.skipif(LANES is None, reason="the session runs without the C lanes (WARDEN_PURE_PYTHON=1)")


def new_session(inline=False) -> PostgresSession:
    """inline: decisions by verdicts_for; "memo": and the shell's shape memo over its templates,
    which the C lane reads itself (as proxy._Connection._decide_inline publishes it)."""
    ticks = itertools.count(1_000, 7)
    keys = itertools.count(1)
    s = PostgresSession(identity="svc", target="db", clock=lambda: next(ticks),
                        random_bytes=lambda n: next(keys).to_bytes(n, "big"),
                        decide=verdicts_for if inline else None)
    if inline == "memo":
        s.shape_memo = shape_memo(MemoContext(), _templates)
    s.feed_client(P.build_startup_message({"user": "alice", "database": "app"}))
    s.feed_server(P.build_authentication_ok() + P.build_ready_for_query("I"))
    assert s.phase == "ready"
    return s


class MemoContext:
    """The ConnectionContext attributes the shape memo's guard reads."""

    def __init__(self):
        self.policy = SimpleNamespace(version=3)
        self.identity = "svc"
        self.identity_attrs = {"user": "app"}


def shape_memo(ctx, shapes: dict, until: float | None = None) -> tuple:
    """session.shape_memo as the shell makes it (proxy._Connection._decide_inline); `until`: the
    end of its hour instead of the real one."""
    guard = base_guard(ctx, ctx.policy, (int(time.time() // 3600),))
    return (*guard[:5], until if until is not None else guard[5], shapes)


def verdicts_for(sql: str, prepared=None) -> list:
    """As the shell's memo answers: one-statement texts of a shape get copies of one verdict
    (Verdict.with_text of the statement's text, sharing the record template it keeps once used);
    others a fresh decision."""
    if ";" in sql.strip().rstrip(";"):
        return _decide(sql)
    shape = sqlclass.statement_shape(sql)
    if shape not in _templates:
        _templates[shape] = _decide(sql)[0]
    return [_templates[shape].with_text(sqlclass.single_statement_text(sql))]


_templates: dict = {}


def _decide(sql: str) -> list:
    if "forbidden" in sql:
        return [Verdict(False, sql, action="pg:delete", kind="delete", tables=("t",), decision="deny",
                        policy_ids=("deny-1",), reason="denied by deny-1")]
    return [Verdict(True, sql, action="pg:select", kind="select", tables=("t",), policy_ids=("p1",))]


def normal(actions: list, session: PostgresSession) -> list:
    """Actions as comparable values (record fields with their order); decisions answered. Writes
    are compared as the bytes each leg gets in order (the shell issues them after the records,
    however they are cut into actions): one entry per leg, last."""
    out = _actions(actions, session)
    writes = [(kind, b"".join(a[1] for a in out if a[0] == kind)) for kind in (TO_SERVER, TO_CLIENT)]
    return [a for a in out if a[0] not in (TO_SERVER, TO_CLIENT)] + writes


def _actions(actions: list, session: PostgresSession) -> list:
    out = []
    for kind, payload in actions:
        if kind in (TO_CLIENT, TO_SERVER):
            out.append((kind, bytes(payload)))
        elif kind == EVENT:
            out.append((kind, payload[0], list(payload[1].items())))
        elif kind == DECIDE:
            # answered like the shell does; the same as a session deciding inline gives
            out += _actions(session.resume(verdicts_for(payload.sql)), session)
        else:
            out.append((kind, payload))
    return out


def state(s: PostgresSession) -> dict:
    def portal(p):
        return None if p is None else (p.index, p.formats, p.statement.text if p.statement else None,
                                       p.described, p.fields, p.undo)
    return {
        "phase": s.phase, "statements": s.statements, "client_batch": s._client_batch,
        "server_batch": s._server_batch, "status": s.transaction_status, "expect": list(s._expect),
        "results": [(r.text, r.start_ns, r.rows, r.nbytes, r.batch, r.denied, r.index, portal(r.portal),
                     r.refusal, r.undo) for r in s._results],
        "portals": {k: portal(v) for k, v in s._portals.items()}, "unnamed": portal(s._unnamed_portal),
        "prepared": sorted(s._statements), "bytes": (s.bytes_in, s.bytes_out), "cbuf": s._cbuf,
        "param_types": {k: v.param_types for k, v in s._statements.items()},
        "described": [(b, st.text if st is not None else None) for b, st in s._described_params],
        "sbuf": s._sbuf, "discard": s._discard_until_sync, "sqlstate": s.last_sqlstate,
        "terminated": s.terminated, "end": s.end_reason,
    }


def replay(steps: list, enabled: bool, inline: bool = False) -> tuple[list, dict]:
    with lanes(enabled):
        s = new_session(inline)
        seen = []
        for side, data in steps:
            actions = s.feed_client(data) if side == "c" else s.feed_server(data)
            seen.append(normal(actions, s))
        return seen, state(s)


def assert_same(steps: list) -> None:
    """The lanes and the Python loops agree, with decisions as DECIDE actions and inline."""
    want, want_state = replay(steps, False)
    for enabled, inline in ((True, False), (True, True), (False, True), (True, "memo")):
        got, got_state = replay(steps, enabled, inline)
        assert got == want
        assert got_state == want_state


# ---- message vocabularies -------------------------------------------------------------------

names = st.sampled_from(["", "s1", "s2", "nope", "sé"])
portals = st.sampled_from(["", "p1", "p2"])
values = st.one_of(st.none(), st.binary(max_size=12), st.sampled_from([b"12345", "é".encode(), b"\xff\xfe"]))
formats = st.lists(st.sampled_from([0, 1]), max_size=3)
# parameter types: unknown, read in C (bool, integers, oid, text), read by protocol.binary_value_text
# (floats, uuid, date), and one neither reads (bytea)
type_oids = st.lists(st.sampled_from([0, 16, 20, 21, 23, 25, 26, 700, 701, 1082, 2950, 17]), max_size=4)


def _cstr_msg(kind: bytes, body: bytes) -> bytes:
    return kind + (len(body) + 4).to_bytes(4, "big") + body


client_message = st.one_of(
    st.builds(lambda n, q, ty: P.build_parse(n, q, ty), names,
              st.sampled_from(["SELECT $1::int", "SELECT a FROM t WHERE b = $1", "DELETE FROM forbidden"]), type_oids),
    st.builds(lambda p, n, v, f, r: P.build_bind(p, n, v, param_formats=f, result_formats=r),
              portals, names, st.lists(values, max_size=4), formats, formats),
    st.builds(lambda p, m: P.build_execute(p, m), portals, st.sampled_from([0, 1])),
    st.builds(lambda k, n: P.build_describe(k, n), st.sampled_from(["S", "P"]), names),
    st.builds(lambda k, n: P.build_close(k, n), st.sampled_from(["S", "P"]), names),
    st.just(P.SYNC), st.just(P.SYNC), st.just(b"H\0\0\0\4"),
    st.builds(P.build_query, st.sampled_from(["SELECT 1", "SELECT 2", "SELECT 1; SELECT 2", "DELETE FROM forbidden",
                                              " SELECT 3 ;;\n", "\tSELECT 4 ;;\n", "select 'x' FROM t",
                                              "EXECUTE s1 (5)", "DELETE FROM forbidden WHERE a = 7"])),
    st.just(_cstr_msg(b"E", b"p1")),                      # Execute without its NUL
    st.just(b"B\0\0\0\x0b\0s1\0\xff\xff\0"),              # malformed Bind
    st.just(b"d\0\0\0\x06ab"), st.just(b"c\0\0\0\4"),
    st.just(b"?\0\0\0\4"),                                # unknown type
    st.just(b"S\0\0\0\3"),                                # invalid length
)

FIELDS = [FieldDescription("a", 0, 0, 23, 4, -1, 0)]
server_message = st.one_of(
    st.just(P.build_parse_complete()), st.just(P.build_bind_complete()), st.just(P.build_bind_complete()),
    st.builds(lambda vs: P.build_data_row(vs), st.lists(values, max_size=3)),
    st.builds(P.build_copy_data, st.binary(max_size=8)),
    st.builds(P.build_command_complete, st.sampled_from([
        "SELECT 1", "SELECT 0", "INSERT 0 3", "UPDATE 12", "COPY 99999999999999999999", "BEGIN", "",
        "SELECT 1x", "SÉLECT 2", "UPDATE ²", "DELETE 007", "SELECT " + "9" * 30, "A  5"])),
    st.just(b"C\0\0\0\x07ab"),                            # tag without its NUL
    st.just(b"C\0\0\0\x08a\0b\0"),                        # two strings
    st.just(b"I\0\0\0\4"), st.just(b"s\0\0\0\4"),
    st.builds(P.build_ready_for_query, st.sampled_from(["I", "T", "E"])),
    st.just(b"Z\0\0\0\x06IX"), st.just(b"Z\0\0\0\4"),
    st.builds(lambda c: P.build_error_response(c, "boom"), st.sampled_from(["42601", "57014"])),
    st.just(P.build_notice_response({"S": "NOTICE", "C": "00000", "M": "hi"})),
    st.just(P.build_row_description(FIELDS)), st.just(b"n\0\0\0\4"),
    st.builds(P.build_parameter_description, type_oids), st.just(b"t\0\0\0\x05\0"),   # and one cut short
    st.just(b"S\0\0\0\x0ba\0b\0c\0"[:5] + b"a\0b\0"),    # ParameterStatus (length ignored below)
    st.just(P.build_backend_key_data(7, b"\0\0\0\x09")),
    st.just(b"D\0\0\0\2"),                                # invalid length
)


@st.composite
def streams(draw):
    steps = []
    for _ in range(draw(st.integers(1, 8))):
        side = draw(st.sampled_from("cs"))
        msgs = draw(st.lists(client_message if side == "c" else server_message, min_size=1, max_size=8))
        data = b"".join(msgs)
        # cut the side's bytes into reads anywhere
        cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=2)))
        prev = 0
        for c in cuts + [len(data)]:
            if c > prev:
                steps.append((side, data[prev:c]))
            prev = c
    return steps


@settings(max_examples=1500, deadline=None)
@given(streams())
def test_lanes_match_the_python_loops(steps):
    assert_same(steps)


@st.composite
def executions(draw):
    """A statement prepared and bound once (its record template built), then reads of further
    executions with any parameters and formats, and the server's answers: what the lanes take."""
    steps = [("c", PREPARE), ("s", PREPARED_REPLY), ("c", execution(b"1")), ("s", answer(1))]
    for _ in range(draw(st.integers(1, 6))):
        msgs = []
        for _ in range(draw(st.integers(1, 4))):
            portal = draw(portals)
            msgs += [P.build_bind(portal, draw(st.sampled_from(["s1", "s1", "s2"])), draw(st.lists(values, max_size=4)),
                                  param_formats=draw(formats), result_formats=draw(formats)),
                     P.build_execute(draw(st.sampled_from([portal, portal, "p9"])), 0)]
            if draw(st.booleans()):
                msgs.append(P.SYNC)
        steps.append(("c", b"".join(msgs)))
        steps.append(("s", b"".join(draw(st.lists(server_message, max_size=6)))))
    return steps


@settings(max_examples=1000, deadline=None)
@given(executions())
def test_lanes_match_the_python_loops_on_executions(steps):
    assert_same(steps)


# ---- the cycles the lanes exist for, spelled out ----------------------------------------------

PREPARE = P.build_parse("s1", "SELECT a FROM t WHERE b = $1", [23]) + P.build_describe("S", "s1") + P.SYNC
PREPARED_REPLY = (P.build_parse_complete() + P.build_parameter_description([23]) + P.build_row_description(FIELDS)
                  + P.build_ready_for_query("I"))


def execution(value: bytes, portal: str = "") -> bytes:
    return P.build_bind(portal, "s1", [value]) + P.build_execute(portal, 0) + P.SYNC


def answer(rows: int) -> bytes:
    return (P.build_bind_complete() + b"".join(P.build_data_row([str(i).encode()]) for i in range(rows))
            + P.build_command_complete(f"SELECT {rows}") + P.build_ready_for_query("I"))


@needs_lanes
def test_prepared_cycle_is_taken_whole_by_the_lanes():
    s = new_session()
    normal(s.feed_client(PREPARE), s)
    normal(s.feed_server(PREPARED_REPLY), s)
    normal(s.feed_client(execution(b"1")), s)    # the first Bind builds the statement's record template
    normal(s.feed_server(answer(1)), s)
    data = execution(b"42") + execution(b"43", "p1")
    out = []
    assert native.client_lane(s, data, 0, S.DEFAULT_MAX_MESSAGE_BYTES, out) == len(data)
    assert [(t, f["params"], f["statement_index"], f.get("portal")) for _, (t, f) in out] == [
        ("pg.statement", ["42"], 2, None), ("pg.statement", ["43"], 3, "p1")]
    reply = answer(3) + answer(0)
    out = []
    assert native.server_lane(s, reply, 0, out) == len(reply)
    assert [(f["command_tag"], f["rows"], f["statement_index"]) for _, (_, f) in out] == [
        ("SELECT 3", 3, 2), ("SELECT 0", 0, 3)]
    assert s._server_batch == s._client_batch and not s._results and not s._expect


@needs_lanes
def test_lanes_stop_at_what_they_leave_to_python():
    s = new_session()
    normal(s.feed_client(PREPARE), s)
    normal(s.feed_server(PREPARED_REPLY), s)
    normal(s.feed_client(execution(b"1")), s)
    normal(s.feed_server(answer(1)), s)
    first = execution(b"2")
    for rest in (P.build_query("SELECT 1"), P.build_parse("", "SELECT 1"), P.build_close("S", "s1"),
                 P.build_bind("", "unknown"), b"X\0\0\0\4", first[:7]):
        assert native.client_lane(s, first + rest, 0, S.DEFAULT_MAX_MESSAGE_BYTES, []) == len(first)
    for rest in (P.build_error_response("42601", "boom"), P.build_backend_key_data(1, b"1234"),
                 P.build_command_complete("SÉLECT 1"), b"C\0\0\0\x05x", b"D\0\0\0\3"):
        s2 = new_session()
        normal(s2.feed_client(PREPARE), s2)
        normal(s2.feed_server(PREPARED_REPLY), s2)
        normal(s2.feed_client(execution(b"1")), s2)     # a result is pending
        reply = P.build_bind_complete()
        assert native.server_lane(s2, reply + rest, 0, []) == len(reply)


def memo_session(ctx, shapes: dict, until=None) -> tuple[PostgresSession, list]:
    """A session whose decider counts its calls, with the shell's shape memo over `shapes`."""
    asked = []

    def decide(sql, prepared=None):
        asked.append(sql)
        return verdicts_for(sql, prepared)
    s = PostgresSession(identity="svc", target="db", clock=itertools.count(1_000, 7).__next__,
                        random_bytes=lambda n: b"\x01" * n, decide=decide)
    s.shape_memo = shape_memo(ctx, shapes, until)
    s.feed_client(P.build_startup_message({"user": "alice", "database": "app"}))
    s.feed_server(P.build_authentication_ok() + P.build_ready_for_query("I"))
    return s, asked


def query_records(s: PostgresSession, sql: str) -> list:
    actions = s.feed_client(P.build_query(sql))
    normal(actions, s)
    s.feed_server(P.build_command_complete("SELECT 1") + P.build_ready_for_query("I"))
    return [a[1][1] for a in actions if a[0] == EVENT and a[1][0] == "pg.statement"]


@needs_lanes
def test_the_c_lane_answers_a_known_shape_from_the_shell_memo_without_asking():
    """The simple-query steady state: a text of a shape the shell decided is recorded by the C
    lane from the memo's template, with the statement's text (stripped as the shell strips it)."""
    with lanes(True):
        ctx = MemoContext()
        shapes: dict = {}
        s, asked = memo_session(ctx, shapes)
        query_records(s, "SELECT a FROM t WHERE b = 1")            # the shell decides; its template
        shapes[sqlclass.statement_shape("SELECT a FROM t WHERE b = 2")] = _templates[
            sqlclass.statement_shape("SELECT a FROM t WHERE b = 1")]
        assert set(asked) == {"SELECT a FROM t WHERE b = 1"}
        before = len(asked)
        (fields,) = query_records(s, "SELECT a FROM t WHERE b = 2")
        assert len(asked) == before                                 # the memo answered
        assert fields["text"] == "SELECT a FROM t WHERE b = 2" and fields["decision"] == "allow"
        assert fields["statement_index"] == 2
        (fields,) = query_records(s, "SELECT a FROM t WHERE b = 77")
        assert len(asked) == before and fields["text"] == "SELECT a FROM t WHERE b = 77"
        # the shell's own strip: surrounding whitespace and trailing semicolons are not the statement
        shapes[sqlclass.statement_shape(" SELECT a FROM t WHERE b = 3 ;;\n")] = shapes[
            sqlclass.statement_shape("SELECT a FROM t WHERE b = 2")]
        (fields,) = query_records(s, " SELECT a FROM t WHERE b = 9 ;;\n")
        assert fields["text"] == "SELECT a FROM t WHERE b = 9" and len(asked) == before


@needs_lanes
@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=" \t\n\x0b\x0c\r\x1c\x1f;SELECT abt=12.5", min_size=1, max_size=24))
def test_the_memo_records_the_text_as_the_shell_strips_it(sql):
    """The C lane strips a text as sqlclass.single_statement_text does (str.strip's whitespace,
    then trailing semicolons, then whitespace again) for every text it can shape."""
    shape = native.number_shape(sql)
    if shape is None or not sqlclass.single_statement_text(sql):
        return
    with lanes(True):
        template = verdicts_for("SELECT a FROM t WHERE b = 5")[0]
        s, asked = memo_session(MemoContext(), {shape: template})
        query_records(s, "SELECT a FROM t WHERE b = 5")            # the template is kept
        before = len(asked)
        (fields,) = query_records(s, sql)
        assert len(asked) == before and fields["text"] == sqlclass.single_statement_text(sql)


@needs_lanes
@pytest.mark.parametrize("change", [None, "policy", "version", "attributes", "identity", "hour"])
def test_the_shell_memo_never_answers_once_what_it_was_made_with_changed(change):
    """A reloaded policy (a new object or a new version), another principal (brokered login
    replaces the attributes or the identity) or the next hour: the shell decides again."""
    with lanes(True):
        ctx = MemoContext()
        shape = sqlclass.statement_shape("SELECT a FROM t WHERE b = 1")
        shapes = {shape: verdicts_for("SELECT a FROM t WHERE b = 1")[0]}
        s, asked = memo_session(ctx, shapes, until=time.time() - 1 if change == "hour" else None)
        query_records(s, "SELECT a FROM t WHERE b = 1")     # the template is kept on first use
        before = len(asked)
        if change == "policy":
            ctx.policy = SimpleNamespace(version=3)
        elif change == "version":
            ctx.policy.version = 4
        elif change == "attributes":
            ctx.identity_attrs = {"user": "app"}             # equal, but replaced: not the same principal
        elif change == "identity":
            ctx.identity = "other"
        query_records(s, "SELECT a FROM t WHERE b = 2")
        if change is None:
            assert len(asked) == before          # unchanged: the memo answers
        else:
            assert len(asked) == before + 1 and asked[-1] == "SELECT a FROM t WHERE b = 2"


@needs_lanes
def test_the_shell_memo_answers_for_a_policy_without_a_version():
    """A policy engine used as it is (no PolicyStore, so no version attribute, as in the bench):
    the memo answers; once the policy has a version it did not have, the shell decides again."""
    with lanes(True):
        ctx = MemoContext()
        ctx.policy = SimpleNamespace()
        shape = sqlclass.statement_shape("SELECT a FROM t WHERE b = 1")
        shapes = {shape: verdicts_for("SELECT a FROM t WHERE b = 1")[0]}
        s, asked = memo_session(ctx, shapes)
        query_records(s, "SELECT a FROM t WHERE b = 1")
        before = len(asked)
        for value in range(2, 5):
            query_records(s, f"SELECT a FROM t WHERE b = {value}")
        assert len(asked) == before
        ctx.policy.version = 1
        query_records(s, "SELECT a FROM t WHERE b = 5")
        assert len(asked) == before + 1


@needs_lanes
@pytest.mark.parametrize("sql", ["EXECUTE q (1)", "SELECT a FROM t WHERE b = 1 OR 1 = (SELECT 1) -- exEcUte",
                                 "SELECT a FROM t WHERE b = 'é'", "SELECT a FROM t WHERE b = '1'",
                                 "SELECT é FROM t WHERE b = 1"])
def test_the_shell_memo_leaves_execute_quoted_and_non_ascii_texts_to_the_shell(sql):
    with lanes(True):
        ctx = MemoContext()
        shapes = {}
        s, asked = memo_session(ctx, shapes)
        template = verdicts_for("SELECT a FROM t WHERE b = 5")[0]
        query_records(s, "SELECT a FROM t WHERE b = 5")            # the template is kept
        for text in (sql, sql.replace("1", "2")):
            # a template under the text's own shape, as if the shell had kept one
            shapes[native.number_shape(text) or sqlclass.statement_shape(text)] = template
            before = len(asked)
            query_records(s, text)
            assert len(asked) > before and asked[-1] == text       # the shell was asked


def test_denied_statement_in_a_transaction_still_aborts_it_with_the_lanes():
    steps = [("c", P.build_query("BEGIN")), ("s", P.build_command_complete("BEGIN") + P.build_ready_for_query("T")),
             ("c", PREPARE), ("s", PREPARED_REPLY.replace(b"Z\0\0\0\5I", b"Z\0\0\0\5T")),
             ("c", execution(b"1") + P.build_parse("", "DELETE FROM forbidden") + P.build_bind("", "")
              + P.build_execute("", 0) + P.SYNC),
             ("s", answer(1)[:-6] + P.build_parse_complete() + P.build_bind_complete()
              + P.build_error_response("42501", "denied") + P.build_ready_for_query("E"))]
    assert_same(steps)
    seen, end = replay(steps, True)
    assert end["status"] == "E"
    assert [f for a in seen for f in a if f[0] == EVENT and f[1] == "pg.result"][-1][2][-2:] == [
        ("error", "denied"), ("statement_index", 3)]


def test_unconfigured_lanes_raise_instead_of_crashing():
    """Bug fix: with WARDEN_PURE_PYTHON=1 session.py never configures the module, and calling it
    directly then dereferenced NULL (a segfault of the whole process)."""
    from tests.native_switch import printed_with_pure_python
    code = ("from enforcer.postgres import _pglanes, session\n"
            "for call in (lambda: _pglanes.client_lane(object(), b'', 0, 1, []),\n"
            "             lambda: _pglanes.server_lane(object(), b'', 0, []),\n"
            "             lambda: _pglanes.feed_client(object(), b''), lambda: _pglanes.feed_server(object(), b''),\n"
            "             lambda: _pglanes.apply_steady(None, None, None, [])):\n"
            "    try:\n"
            "        call()\n"
            "    except RuntimeError as e:\n"
            "        print('configured' in str(e))\n")
    assert printed_with_pure_python(code, "1").split() == ["True"] * 5


@needs_lanes
def test_configure_refuses_result_and_portal_classes_whose_slots_changed():
    """The lanes build session._Result and _Portal without their __init__, setting their slots
    themselves: a class with other slots would get objects missing a field, so configure refuses it."""
    class GrownResult:
        __slots__ = S._Result.__slots__ + ("extra",)

    class GrownPortal:
        __slots__ = S._Portal.__slots__[:-1]
    rest = (S._BIND_EXPECT, S._SYNC_EXPECT, EVENT, S._NOT_EXECUTED, TO_SERVER, TO_CLIENT, S.READY, P.binary_value_text)
    for portal, result in ((S._Portal, GrownResult), (GrownPortal, S._Result)):
        with pytest.raises(TypeError, match="__slots__"):
            native.configure(portal, result, *rest)

    # the names are right but one is no longer the class's own slot: the lanes write slots at
    # their member offsets, so anything else there is refused too
    class ShadowedPortal:
        __slots__ = S._Portal.__slots__
    ShadowedPortal.fields = property(lambda self: None)

    class SameResult:
        __slots__ = S._Result.__slots__
    with pytest.raises(TypeError, match="not a plain slot"):
        native.configure(ShadowedPortal, SameResult, *rest)
    native.configure(S._Portal, S._Result, *rest)      # as session.py configured it
    s = new_session(inline=True)
    normal(s.feed_client(P.build_query("SELECT 1")), s)     # Python's (the template is made)
    reads = native.client_lane(s, P.build_query("SELECT 2"), 0, S.DEFAULT_MAX_MESSAGE_BYTES, [])
    assert reads == len(P.build_query("SELECT 2"))        # taken by the lane: its _Result
    first, second = s._results
    fields = ("rows", "nbytes", "batch", "denied", "index", "portal", "refusal", "undo")
    assert type(second) is S._Result and second.text == "SELECT 2" and second.start_ns > first.start_ns
    assert [getattr(first, f) for f in fields] == [0, 0, 0, False, 1, None, None, None]
    assert [getattr(second, f) for f in fields] == [0, 0, 1, False, 2, None, None, None]


def test_pure_python_switch_turns_the_lanes_off():
    from tests.native_switch import printed_with_pure_python
    code = ("from enforcer.postgres import session, proxy; from enforcer import sqlclass; "
            "print(session._lanes is None, proxy._apply_steady is None, proxy._Reader is None, "
            "sqlclass._number_shape is None)")
    for env_value, want in (("1", "True True True True"), ("0", "False False False False")):
        assert printed_with_pure_python(code, env_value) == want


@pytest.mark.parametrize("attr, value", [("phase", "auth"), ("masking", object()), ("_pending", ("Q", b"", "")),
                                         ("_cbig", [[b"x"], 1, 9]), ("_discard_until_sync", True),
                                         ("_cbuf", b"B\0")])
@needs_lanes
def test_client_reads_outside_the_steady_state_are_left_to_python(attr, value):
    s = new_session()
    setattr(s, attr, value)
    before = state(s)
    assert native.feed_client(s, execution(b"1")) is None
    assert state(s) == before


@pytest.mark.parametrize("attr, value", [("phase", "auth"), ("masking", object()), ("_withhold", True),
                                         ("_sbig", [[b"x"], 1, 9]), ("_sbuf", b"D\0")])
@needs_lanes
def test_server_reads_outside_the_steady_state_are_left_to_python(attr, value):
    s = new_session()
    normal(s.feed_client(execution(b"1")), s)
    setattr(s, attr, value)
    before = state(s)
    assert native.feed_server(s, answer(1)) is None
    assert state(s) == before


# ---- statement shapes -------------------------------------------------------------------------

SQL_CHARS = "0123456789.eE+-$_ aZx(),;=*/'\"\\\x01\0é\n"


def python_shape(sql: str):
    saved = sqlclass._number_shape
    sqlclass._number_shape = None
    try:
        return sqlclass.statement_shape(sql)
    finally:
        sqlclass._number_shape = saved


@settings(max_examples=4000, deadline=None)
@given(st.text(alphabet=SQL_CHARS, max_size=40))
def test_number_shape_matches_the_regex_path(sql):
    shape = native.number_shape(sql)
    if shape is not None:
        assert shape == python_shape(sql)
    quote_free = sql.isascii() and not any(c in sql for c in "'\"\\\0\x01") and "--" not in sql \
        and "/*" not in sql and sqlclass._NAMED_DOLLAR.search(sql) is None
    # every text the regex path would take without quotes, C takes too
    assert (shape is not None) == quote_free


@pytest.mark.parametrize("sql, want", [
    ("SELECT abalance FROM pgbench_accounts WHERE aid = 4242;", "FSELECT abalance FROM pgbench_accounts WHERE aid = \x01;"),
    ("select 1.5e3, .5, 12., 1e+7, 2e-5, 1E-2x", "Fselect \x01, \x01, \x01, \x01, \x01, 1E-2x"),
    ("select 1e, a1, $1, 1.2.3, x.5, t.1, 1..2", "Fselect 1e, a1, $1, 1.2.3, x.5, t.1, 1..2"),
    ("select 'a', 1", None), ("select 1 -- c", None), ("select $x$1$x$", None), ("sélect 1", None),
])
def test_number_shape_cases(sql, want):
    assert native.number_shape(sql) == want
    if want is not None:
        assert python_shape(sql) == want


# ---- the shell's steady state -----------------------------------------------------------------

class FakeTransport:
    def __init__(self, closing=False):
        self.closing = closing
        self.calls = []

    def write(self, data):
        self.calls.append(("write", bytes(data)))

    def writelines(self, parts):
        self.calls.append(("writelines", [bytes(p) for p in parts]))

    def is_closing(self):
        return self.closing


def python_apply(actions, emit, server, client):
    """proxy._Connection._apply, run on a connection holding only what it uses here."""
    from enforcer.context import ConnectionContext
    from enforcer.postgres.proxy import _Connection

    class Writer:
        def __init__(self, transport):
            self.transport = transport
    conn = object.__new__(_Connection)
    conn.ctx = object.__new__(ConnectionContext)
    conn.ctx.emit = emit
    conn.swriter, conn.cwriter = Writer(server), Writer(client)
    conn._apply(actions)


steady_action = st.one_of(
    st.builds(lambda d: (TO_SERVER, d), st.binary(min_size=1, max_size=6)),
    st.builds(lambda d: (TO_CLIENT, d), st.binary(min_size=1, max_size=6)),
    st.builds(lambda t, n: (EVENT, (t, {"n": n})), st.sampled_from(["pg.statement", "pg.result"]), st.integers()),
)


@needs_lanes
@settings(max_examples=500, deadline=None)
@given(st.lists(steady_action, max_size=8), st.booleans(), st.booleans())
def test_apply_steady_does_what_the_shell_does(actions, server_closing, client_closing):
    runs = []
    for use_c in (True, False):
        events, server, client = [], FakeTransport(server_closing), FakeTransport(client_closing)
        emit = lambda t, f: events.append((t, f))  # noqa: E731
        if use_c:
            assert native.apply_steady(emit, server, client, list(actions)) is True
        else:
            python_apply(list(actions), emit, server, client)
        runs.append((events, server.calls, client.calls))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("other", [(DECIDE, None), (S.CLOSE, "done"), (S.REGISTER_CANCEL_KEY, (1, b"k", 2, b"k")),
                                   (EVENT, ("pg.result",)), ("junk",)])
@needs_lanes
def test_apply_steady_leaves_any_other_list_untouched(other):
    events, server = [], FakeTransport()
    actions = [(EVENT, ("pg.result", {"rows": 1})), (TO_SERVER, b"x"), other]
    assert native.apply_steady(lambda t, f: events.append(t), server, FakeTransport(), actions) is False
    assert events == [] and server.calls == []


@needs_lanes
def test_apply_steady_writes_nothing_when_a_record_cannot_be_taken():
    class Refused(Exception):
        pass

    def emit(t, f):
        if f["n"] == 2:
            raise Refused("backlog full")
    server = FakeTransport()
    with pytest.raises(Refused):
        native.apply_steady(emit, server, FakeTransport(), [(EVENT, ("pg.statement", {"n": 1})), (TO_SERVER, b"a"),
                                                            (EVENT, ("pg.statement", {"n": 2}))])
    assert server.calls == []


# ---- the legs' Reader against the shell's Python handlers ----------------------------------------

class FinishedFlag:
    """The connection's _done future as far as the shell uses it."""

    def __init__(self):
        self.outcome = None

    def done(self):
        return self.outcome is not None

    def set_result(self, reason):
        self.outcome = ("finished", reason)

    def set_exception(self, exc):
        self.outcome = ("failed", repr(exc))


def shell(session, emit, reader: bool):
    """A _Connection after the hand-over, holding only what its read handlers use, and its two
    legs' data_received: the C Reader, or the Python handlers."""
    import functools

    from enforcer.context import ConnectionContext
    from enforcer.postgres import proxy

    class Writer:
        def __init__(self, transport):
            self.transport = transport
    conn = object.__new__(proxy._Connection)
    conn.ctx = object.__new__(ConnectionContext)
    conn.ctx.emit = emit
    conn.swriter, conn.cwriter = Writer(FakeTransport()), Writer(FakeTransport())
    conn.session, conn._done, conn.closing = session, FinishedFlag(), False
    conn.client_reads, conn._steady_reads = 0, None
    conn._apply_steady = functools.partial(native.apply_steady, emit, conn.swriter.transport,
                                           conn.cwriter.transport)
    saved = proxy._Reader
    proxy._Reader = native.Reader if reader else None
    try:
        legs = {"c": conn._reader(True), "s": conn._reader(False)}
    finally:
        proxy._Reader = saved
    assert isinstance(legs["c"], native.Reader) == reader
    return conn, legs


def run_shell(steps: list, reader: bool, emit_fails_at: int = -1):
    events = []

    def emit(event_type, fields):
        if len(events) == emit_fails_at:
            raise RuntimeError("record backlog full")
        events.append((event_type, list(fields.items())))
    _templates.clear()      # both runs start from the same decisions (their record templates too)
    session = new_session(inline=True)
    conn, legs = shell(session, emit, reader)
    for side, data in steps:
        legs[side](data)
    return (events, conn.swriter.transport.calls, conn.cwriter.transport.calls, conn._done.outcome,
            conn._client_read_count(), state(session))


def assert_shell_same(steps: list, emit_fails_at: int = -1) -> None:
    assert run_shell(steps, True, emit_fails_at) == run_shell(steps, False, emit_fails_at)


@needs_lanes
@settings(max_examples=800, deadline=None)
@given(streams())
def test_reader_does_what_the_python_handlers_do(steps):
    assert_shell_same(steps)


@needs_lanes
@settings(max_examples=500, deadline=None)
@given(executions(), st.integers(-1, 12))
def test_reader_matches_the_handlers_on_executions_and_refused_records(steps, emit_fails_at):
    assert_shell_same(steps, emit_fails_at)


def sent(transport: FakeTransport) -> bytes:
    return b"".join(data if how == "write" else b"".join(data) for how, data in transport.calls)


def steady_steps(n: int) -> list:
    steps = [("c", PREPARE), ("s", PREPARED_REPLY)]
    for i in range(n):
        steps += [("c", execution(str(i).encode())), ("s", answer(1))]
    return steps


@needs_lanes
def test_reader_takes_steady_reads_itself_and_counts_them():
    session = new_session(inline=True)
    conn, legs = shell(session, lambda t, f: None, True)
    handled = []

    def handler(data):
        handled.append(data)
        conn._on_client_data(data)
    reader = native.Reader(session, True, conn._done, conn.ctx.emit, conn.swriter.transport,
                           conn.cwriter.transport, handler, conn._client_rest, conn._fail)
    conn._steady_reads = reader
    steps = steady_steps(3)
    for side, data in steps:
        (reader if side == "c" else legs["s"])(data)
    # a ready session's reads never need the Python handler: what the lanes leave (the Parse,
    # the first Bind) is finished by the session's own loop inside the feed
    assert handled == [] and reader.reads == 4 and conn._client_read_count() == 4
    assert sent(conn.swriter.transport) == b"".join(d for side, d in steps if side == "c")
    assert sent(conn.cwriter.transport) == b"".join(d for side, d in steps if side == "s")


@needs_lanes
def test_reader_hands_reads_outside_the_steady_state_to_the_handler():
    calls = []
    session = new_session(inline=True)
    conn, _ = shell(session, lambda t, f: None, True)
    reader = native.Reader(session, True, conn._done, conn.ctx.emit, conn.swriter.transport,
                           conn.cwriter.transport, lambda d: calls.append(d), None, None)
    session.phase = "auth"
    reader(execution(b"1"))
    assert calls == [execution(b"1")] and reader.reads == 0


@needs_lanes
def test_reader_drops_reads_once_the_connection_finished():
    session = new_session(inline=True)
    conn, legs = shell(session, lambda t, f: None, True)
    conn._finish("client_closed")
    legs["c"](P.build_query("SELECT 1"))
    assert conn.swriter.transport.calls == [] and session.statements == 0


@needs_lanes
def test_reader_ends_the_connection_on_terminate():
    for reader in (True, False):
        got = run_shell(steady_steps(2) + [("c", execution(b"9") + P.build_terminate())], reader)
        assert got[3] == ("finished", "client_terminated")


@needs_lanes
def test_reader_fails_the_connection_when_a_record_is_refused():
    steps = steady_steps(3)
    got = run_shell(steps, True, emit_fails_at=4)      # the third execution's pg.statement
    assert got[3] == ("failed", "RuntimeError('record backlog full')")
    assert got == run_shell(steps, False, emit_fails_at=4)
    # the refused statement never reached the server; the client was told why
    server = FakeTransport()
    server.calls = got[1]
    assert execution(b"1") in sent(server) and execution(b"2") not in sent(server)
    assert b"Warden ended this session" in got[2][-1][1]


@needs_lanes
def test_reader_lets_base_exceptions_through():
    session = new_session(inline=True)

    def emit(t, f):
        raise KeyboardInterrupt
    conn, legs = shell(session, emit, True)
    for side, data in steady_steps(1)[:2]:
        with contextlib.suppress(KeyboardInterrupt):
            legs[side](data)
    with pytest.raises(KeyboardInterrupt):
        legs["c"](execution(b"1"))
