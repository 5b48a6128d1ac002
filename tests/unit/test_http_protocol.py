"""The sans-IO HTTP core on valid traffic: bytes in, events out, normalised bytes back."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.http.credentials import BrokeredCredential, CredentialError
from enforcer.http.protocol import (CHUNKED, LENGTH, NEED_DATA, NO_BODY, TUNNEL, UNTIL_CLOSE,
                                    ConnectionClosed, Data, EndOfMessage, HttpReader, HttpWriter,
                                    ProtocolError, Request, Response, forwardable_headers)
from enforcer.http.recording import Redactor


def events_of(reader: HttpReader, data: bytes) -> list:
    reader.receive_data(data)
    out = []
    while True:
        event = reader.next_event()
        if event is NEED_DATA or type(event) is ConnectionClosed:
            return out
        out.append(event)


def merged(events: list) -> list:
    """Adjacent Data events joined, so different splits of the input compare equal."""
    out = []
    for event in events:
        if type(event) is Data and out and type(out[-1]) is Data:
            out[-1] = Data(out[-1].data + event.data)
        else:
            out.append(event)
    return out


PIPELINE = (b"\r\nGET /a?x=1 HTTP/1.1\r\nHost: api\r\nAccept: */*\r\n\r\n"
            b"POST /b HTTP/1.1\r\nHost: api\r\nContent-Length: 5\r\n\r\nhello"
            b"PUT /c HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Check: 7\r\n\r\n"
            b"GET /d HTTP/1.0\r\n\r\n")


def test_pipelined_requests_parse_in_order():
    events = merged(events_of(HttpReader("request"), PIPELINE))
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["Request", "EndOfMessage", "Request", "Data", "EndOfMessage",
                     "Request", "Data", "EndOfMessage", "Request", "EndOfMessage"]
    first, post, put, old = events[0], events[2], events[5], events[8]
    assert (first.method, first.path, first.query, first.host) == ("GET", "/a", "x=1", "api")
    assert post.framing == LENGTH and post.content_length == 5 and events[3].data == b"hello"
    assert put.framing == CHUNKED and events[6].data == b"abcde"
    assert events[7].trailers == [("X-Check", "7")]
    assert old.version == "1.0" and not old.keep_alive and old.framing == NO_BODY


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(PIPELINE) - 1), max_size=12))
def test_any_split_of_the_input_gives_the_same_events(cuts):
    reader = HttpReader("request")
    events = []
    bounds = [0, *sorted(set(cuts)), len(PIPELINE)]
    for start, end in zip(bounds, bounds[1:]):
        events += events_of(reader, PIPELINE[start:end])
    assert merged(events) == merged(events_of(HttpReader("request"), PIPELINE))


def test_keep_alive_rules():
    r11 = events_of(HttpReader("request"), b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")[0]
    r10 = events_of(HttpReader("request"), b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")[0]
    assert not r11.keep_alive and r10.keep_alive


def test_absolute_form_becomes_origin_form():
    request = events_of(HttpReader("request"), b"GET http://API:80/x/y?q=1 HTTP/1.1\r\nHost: api:80\r\n\r\n")[0]
    assert request.target == "/x/y?q=1" and request.host == "API:80"


def test_connect_is_judged_by_its_target_and_a_different_host_is_refused():
    # the tunnel goes to the request target (RFC 9110 9.3.6): that is the host decided and recorded
    request = events_of(HttpReader("request"), b"CONNECT Api.Example:443 HTTP/1.1\r\nHost: api.example:443\r\n\r\n")[0]
    assert (request.method, request.target, request.host) == ("CONNECT", "Api.Example:443", "Api.Example:443")
    assert events_of(HttpReader("request"), b"CONNECT [::1]:8443 HTTP/1.0\r\n\r\n")[0].host == "[::1]:8443"
    with pytest.raises(ProtocolError) as refused:
        events_of(HttpReader("request"), b"CONNECT evil.example:443 HTTP/1.1\r\nHost: allowed.example:443\r\n\r\n")
    assert refused.value.status == 400
    assert "evil.example:443" in refused.value.reason and "allowed.example:443" in refused.value.reason
    # a Host without the port names another authority too; so does one for another port
    for host in (b"evil.example", b"evil.example:8443"):
        with pytest.raises(ProtocolError):
            events_of(HttpReader("request"), b"CONNECT evil.example:443 HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    for target in (b"evil.example", b"evil.example:", b":443", b"evil.example:https", b"evil.example:443/x",
                   b"user@evil.example:443", b"evil.example:123456"):
        with pytest.raises(ProtocolError, match="host:port"):
            events_of(HttpReader("request"), b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n\r\n")


def test_expect_continue_and_upgrade_are_reported():
    request = events_of(HttpReader("request"),
                        b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")[0]
    assert request.expect_continue
    ws = events_of(HttpReader("request"), b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                                          b"Upgrade: websocket\r\n\r\n")[0]
    assert ws.upgrade == "websocket"


def test_obs_text_and_tabs_in_values_are_accepted():
    request = events_of(HttpReader("request"), b"GET / HTTP/1.1\r\nHost: a\r\nX-Name: caf\xe9\tau lait \r\n\r\n")[0]
    assert request.headers[1] == ("X-Name", "caf\xe9\tau lait")


def test_response_framing_depends_on_request_method_and_status():
    reader = HttpReader("response")
    for method in ("HEAD", "GET", "GET", "GET"):
        reader.expect_response(method)
    events = events_of(reader, b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"      # HEAD: no body
                               b"HTTP/1.1 100 Continue\r\n\r\n"                          # interim
                               b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"
                               b"HTTP/1.1 204 No Content\r\n\r\n"
                               b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
    statuses = [(e.status, e.framing) for e in events if type(e) is Response]
    assert statuses == [(200, NO_BODY), (100, NO_BODY), (304, NO_BODY), (204, NO_BODY), (200, UNTIL_CLOSE)]
    reader.receive_data(b"")
    tail = [reader.next_event(), reader.next_event()]
    assert type(tail[0]) is EndOfMessage and type(tail[1]) is ConnectionClosed
    assert events[-1] == Data(b"until the end")


def test_upgrade_and_connect_become_tunnels():
    reader = HttpReader("response")
    reader.expect_response("GET", upgrade=True)
    events = events_of(reader, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                               b"Connection: Upgrade\r\n\r\n\x81\x02hi")
    assert events[0].framing == TUNNEL and events[1] == Data(b"\x81\x02hi")
    connect = HttpReader("response")
    connect.expect_response("CONNECT")
    assert events_of(connect, b"HTTP/1.1 200 Connection established\r\n\r\nraw")[1] == Data(b"raw")


def test_writer_normalises_framing():
    writer = HttpWriter()
    head = Request("POST", "/up", [("Host", "a"), ("Transfer-Encoding", "chunked")])
    out = writer.send(head) + writer.send(Data(b"hello")) + writer.send(Data(b"")) \
        + writer.send(EndOfMessage([("X-T", "1")]))
    assert out == (b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n")
    plain = HttpWriter()
    assert plain.send(Response(200, [("Content-Length", "2")])) + plain.send(Data(b"ok")) \
        + plain.send(EndOfMessage()) == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_forwardable_headers_drop_hop_by_hop_and_connection_listed():
    headers = [("Host", "a"), ("Connection", "keep-alive, X-Secret-Hop"), ("Keep-Alive", "timeout=5"),
               ("X-Secret-Hop", "1"), ("TE", "trailers"), ("Content-Length", "3"), ("Accept", "*/*")]
    assert forwardable_headers(headers, frozenset({"keep-alive", "x-secret-hop"})) == [("Host", "a"),
                                                                                          ("Accept", "*/*")]


def test_forbidden_trailers_are_dropped():
    events = events_of(HttpReader("request"), b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                                              b"0\r\nContent-Length: 5\r\nX-Ok: 1\r\n\r\n")
    assert events[-1].trailers == [("X-Ok", "1")]


def test_eof_inside_body_is_an_error():
    reader = HttpReader("request")
    events_of(reader, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    reader.receive_data(b"")
    with pytest.raises(ProtocolError):
        reader.next_event()


def test_unsupported_expect_is_417():
    with pytest.raises(ProtocolError) as info:
        events_of(HttpReader("request"), b"GET / HTTP/1.1\r\nHost: a\r\nExpect: magic\r\n\r\n")
    assert info.value.status == 417


def test_redactor_hides_secrets_in_headers_and_query():
    redactor = Redactor(headers=["X-Internal-Token"], query_params=["ssn"])
    record = redactor.headers_for_record([("Authorization", "Bearer s3cret"), ("Cookie", "a=b"),
                                          ("X-Internal-Token", "t"), ("Accept", "*/*"), ("Accept", "x")])
    assert record == {"authorization": "[redacted]", "cookie": "[redacted]", "x-internal-token": "[redacted]",
                      "accept": "*/*, x"}
    assert redactor.query_for_record("a=1&token=abc&ssn=123-45&b") == "a=1&token=%5Bredacted%5D&ssn=%5Bredacted%5D&b"


def test_brokered_credential_rereads_on_change(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("first\n")
    now = [0.0]
    credential = BrokeredCredential("Authorization", str(secret), "Bearer", recheck_s=1.0, clock=lambda: now[0])
    assert credential.value() == "Bearer first"
    secret.write_text("second-longer\n")
    assert credential.value() == "Bearer first"        # within the recheck interval: no stat
    now[0] = 2.0
    assert credential.value() == "Bearer second-longer"
    secret.unlink()
    now[0] = 4.0
    with pytest.raises(CredentialError, match="cannot read the credential file"):
        credential.value()
    secret.write_text("bad\nvalue")
    now[0] = 6.0
    with pytest.raises(CredentialError, match="control characters"):
        credential.value()


def test_repeated_heads_parse_the_same_from_the_memo():
    head = b"GET /a?x=1 HTTP/1.1\r\nHost: api\r\nAccept:  */* \r\n\r\n"
    reader = HttpReader("request")
    first, second = events_of(reader, head + head)[0::2]
    fresh = events_of(HttpReader("request"), head)[0]
    assert first == second == fresh and first.headers == [("Host", "api"), ("Accept", "*/*")]
    assert first.headers is not second.headers          # each event owns its header list
    second.headers.append(("X-Mutated", "1"))
    assert events_of(reader, head)[0].headers == [("Host", "api"), ("Accept", "*/*")]


def test_a_refused_head_is_refused_again_not_remembered():
    head = b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n"                   # no Host: refused when routed
    for _ in range(2):
        with pytest.raises(ProtocolError, match="without a Host"):
            events_of(HttpReader("request"), head)
    reader = HttpReader("response")
    reader.expect_response("GET")
    reader.expect_response("HEAD")
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
    # the same response head frames differently after HEAD: routing is redone on every hit
    events = events_of(reader, ok + b"ok" + ok)
    assert [e.framing for e in events if type(e) is Response] == [LENGTH, NO_BODY]
