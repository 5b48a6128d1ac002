"""A shortened `make fuzz`: every fuzz target with a few hundred to a few thousand inputs,
plus regression tests for what the fuzzers found."""
from __future__ import annotations

import pytest

from enforcer.postgres import protocol as P
from enforcer.postgres import session as S
from tests.fuzz import run as fuzz_run
from tests.fuzz.pg import Driver

KNOWN_BUGS: dict[str, str] = {}     # fuzz targets with an open bug (xfail strict); none at the moment


def _param(name, core, kind, full):
    marks = [pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[name])] if name in KNOWN_BUGS else []
    if name == "native_lanes_mutated" and S._lanes is None:
        # it compares the C lanes with the Python loops: nothing to compare with WARDEN_PURE_PYTHON=1
        marks.append(pytest.mark.skip(reason="the session runs without the C lanes (WARDEN_PURE_PYTHON=1)"))
    return pytest.param(name, kind, full, id=name, marks=marks)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name,kind,full", [_param(*p) for p in fuzz_run.PLAN])
def test_fuzz_target_quick(name, kind, full):
    count = max(30, int(full * fuzz_run.QUICK_SCALE))
    stats = fuzz_run.run_target(name, kind, count, seed=20240601)
    assert stats.inputs >= count if kind != "stateful" else stats.inputs > count
    assert stats.ok, stats.examples
    if stats.checked is not None:
        # the accepting path is exercised too: a fuzzer whose inputs are all refused checks
        # nothing about what the proxy forwards (the HTTP generator once refused 92% of them)
        assert stats.checked >= stats.inputs // 4, (stats.checked, stats.inputs)


def test_well_formed_property_flags_a_refusal_and_a_changed_message():
    """The harness itself: a valid stream that is refused, or parses as something other than
    what was sent, is a violation."""
    from tests.fuzz.common import PropertyViolation
    from tests.fuzz.http import fuzz_well_formed
    good = b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
    stats = fuzz_run.Stats("t", checked=0)
    assert fuzz_well_formed("request", [good[:10], good[10:]], [("POST", "/a", b"abc")], stats) is False
    assert stats.checked == 1
    with pytest.raises(PropertyViolation, match="parsed as"):
        fuzz_well_formed("request", [good], [("POST", "/a", b"abd")])
    with pytest.raises(PropertyViolation, match="refused"):
        fuzz_well_formed("request", [good.replace(b"Content-Length: 3", b"Content-Length: x")],
                         [("POST", "/a", b"abc")])
    response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
    assert fuzz_well_formed("response", [response], [(200, b"hi")]) is False


def test_messages_before_a_protocol_error_are_still_round_tripped():
    """A request the proxy forwarded before a later one was refused is checked all the same."""
    from tests.fuzz.http import fuzz_http
    stats = fuzz_run.Stats("t", checked=0)
    stream = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n" + b"\x00garbage\r\n\r\n"
    assert fuzz_http("request", [stream], stats=stats) is True
    assert stats.checked == 1


def test_quick_plan_feeds_thousands_per_core():
    per_core: dict[str, int] = {}
    for _name, core, kind, full in fuzz_run.PLAN:
        if kind != "stateful":
            per_core[core] = per_core.get(core, 0) + int(full * fuzz_run.QUICK_SCALE)
    assert all(n >= 3000 for n in per_core.values()), per_core
    full_per_core: dict[str, int] = {}
    for _name, core, kind, full in fuzz_run.PLAN:
        if kind != "stateful":
            full_per_core[core] = full_per_core.get(core, 0) + full
    assert all(n >= fuzz_run.MIN_PER_CORE_FULL for n in full_per_core.values()), full_per_core


def test_driver_flags_a_close_without_error_response():
    """The harness itself: a CLOSE not preceded by a FATAL ErrorResponse is a violation."""
    from tests.fuzz.common import PropertyViolation
    d = Driver()
    with pytest.raises(PropertyViolation):
        d.run([(S.CLOSE, "protocol_error")])


def test_client_garbage_after_handshake_ends_with_08P01():
    d = Driver()
    d.handshake()
    d.run(d.session.feed_client(b"\x00\x00\x00\x00\x03garbage"))
    assert d.closed
    msgs, rest = P.split_messages(bytes(d.to_client))
    assert not rest and msgs[-1][0] == b"E"
    assert P.parse_error_fields(msgs[-1][1])["C"] == "08P01"


def test_malformed_command_complete_from_server_ends_session_with_08P01():
    """Bug fix (found by fuzzing): a CommandComplete without its NUL terminator raised out of
    feed_server and silently killed the server-side task; now it ends the session with 08P01."""
    d = Driver()
    d.handshake()
    d.run(d.session.feed_client(P.build_query("UPDATE t SET a = 1")))
    # CommandComplete whose tag lacks its NUL terminator, then ReadyForQuery
    bad = b"C" + (4 + 8).to_bytes(4, "big") + b"UPDATE 3" + P.build_ready_for_query("I")
    d.run(d.session.feed_server(bad))
    assert d.closed
    msgs, _ = P.split_messages(bytes(d.to_client))
    assert P.parse_error_fields(msgs[-1][1])["C"] == "08P01"
