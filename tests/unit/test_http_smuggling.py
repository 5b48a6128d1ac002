"""Request-smuggling and desync cases, as bytes: each is refused and never forwarded.

Every case is checked twice: against the sans-IO parser (it raises ProtocolError with the
status to answer, before yielding anything that could be forwarded) and end to end through
serve_http between a raw client socket and a raw upstream that records what reaches it
(requests: the client gets a 4xx and the connection closes; the smuggled part never reaches
the upstream. Upstream responses: the client gets a 502 and none of the smuggled bytes).
"""
from __future__ import annotations

import asyncio

import pytest

from enforcer.context import ConnectionContext, TargetInfo
from enforcer.http.protocol import NEED_DATA, Data, EndOfMessage, HttpReader, ProtocolError, Request
from enforcer.http.proxy import serve_http

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


def _chunked(extra_head: bytes, body: bytes) -> bytes:
    return b"POST /up HTTP/1.1\r\nHost: api\r\n" + extra_head + b"Transfer-Encoding: chunked\r\n\r\n" + body


# (case id, raw request bytes). Each contains or implies a second request the upstream must never see.
REQUEST_CASES = [
    ("cl-and-te", b"POST / HTTP/1.1\r\nHost: api\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"0\r\n\r\n" + SMUGGLED),
    ("te-and-cl", b"POST / HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n"
                  b"0\r\n\r\n" + SMUGGLED),
    ("cl-duplicate-same", b"POST / HTTP/1.1\r\nHost: api\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
                          + SMUGGLED),
    ("cl-duplicate-different", b"POST / HTTP/1.1\r\nHost: api\r\nContent-Length: 0\r\nContent-Length: 36\r\n\r\n"
                               + SMUGGLED),
    ("cl-list-different", b"POST / HTTP/1.1\r\nHost: api\r\nContent-Length: 0, 36\r\n\r\n" + SMUGGLED),
    ("cl-list-same", b"POST / HTTP/1.1\r\nHost: api\r\nContent-Length: 5, 5\r\n\r\nhello" + SMUGGLED),
    ("cl-plus", b"POST / HTTP/1.1\r\nHost: api\r\nContent-Length: +36\r\n\r\n" + SMUGGLED),
    ("cl-minus", b"POST / HTTP/1.1\r\nHost: api\r\nContent-Length: -1\r\n\r\n" + SMUGGLED),
    ("cl-hex", b"POST / HTTP/1.1\r\nHost: api\r\nContent-Length: 0x24\r\n\r\n" + SMUGGLED),
    ("cl-empty", b"POST / HTTP/1.1\r\nHost: api\r\nContent-Length: \r\n\r\n" + SMUGGLED),
    ("cl-letters", b"POST / HTTP/1.1\r\nHost: api\r\nContent-Length: 3a\r\n\r\n" + SMUGGLED),
    ("cl-inner-space", b"POST / HTTP/1.1\r\nHost: api\r\nContent-Length: 3 6\r\n\r\n" + SMUGGLED),
    ("cl-overflow", b"POST / HTTP/1.1\r\nHost: api\r\nContent-Length: 99999999999999999999999\r\n\r\n" + SMUGGLED),
    ("te-identity", b"POST / HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: identity\r\n\r\n" + SMUGGLED),
    ("te-chunked-identity", b"POST / HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
                            b"0\r\n\r\n" + SMUGGLED),
    ("te-gzip-chunked", b"POST / HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"
                        + SMUGGLED),
    ("te-twice", b"POST / HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"0\r\n\r\n" + SMUGGLED),
    ("te-xchunked", b"POST / HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLED),
    ("te-vertical-tab", b"POST / HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\x0b\r\n\r\n0\r\n\r\n" + SMUGGLED),
    ("te-in-http10", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED),
    ("space-before-colon-te", b"POST / HTTP/1.1\r\nHost: api\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n"
                              + SMUGGLED),
    ("space-before-colon-cl", b"POST / HTTP/1.1\r\nHost: api\r\nContent-Length : 36\r\n\r\n" + SMUGGLED),
    ("tab-before-colon", b"GET / HTTP/1.1\r\nHost\t: api\r\n\r\n" + SMUGGLED),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: api\r\nX-Long: a\r\n b\r\n\r\n" + SMUGGLED),
    ("obs-fold-te", b"POST / HTTP/1.1\r\nHost: api\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n" + SMUGGLED),
    ("bare-lf-head", b"GET / HTTP/1.1\nHost: api\n\n" + SMUGGLED),
    ("bare-lf-one-header", b"GET / HTTP/1.1\r\nHost: api\nX-A: b\r\n\r\n" + SMUGGLED),
    ("bare-lf-request-line", b"GET / HTTP/1.1\nHost: api\r\n\r\n" + SMUGGLED),
    ("bare-cr-value", b"GET / HTTP/1.1\r\nHost: api\r\nX-A: b\rContent-Length: 36\r\n\r\n" + SMUGGLED),
    ("nul-in-value", b"GET / HTTP/1.1\r\nHost: api\r\nX-A: b\x00c\r\n\r\n" + SMUGGLED),
    ("nul-in-name", b"GET / HTTP/1.1\r\nHost: api\r\nX-\x00A: b\r\n\r\n" + SMUGGLED),
    ("ctl-in-value", b"GET / HTTP/1.1\r\nHost: api\r\nX-A: b\x01c\r\n\r\n" + SMUGGLED),
    ("del-in-name", b"GET / HTTP/1.1\r\nHost: api\r\nX-\x7fA: b\r\n\r\n" + SMUGGLED),
    ("high-byte-in-name", b"GET / HTTP/1.1\r\nHost: api\r\nX-\xe9: b\r\n\r\n" + SMUGGLED),
    ("no-colon", b"GET / HTTP/1.1\r\nHost: api\r\nJustAName\r\n\r\n" + SMUGGLED),
    ("oversize-request-line", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: api\r\n\r\n" + SMUGGLED),
    ("oversize-headers", b"GET / HTTP/1.1\r\nHost: api\r\n" + b"X-Pad: " + b"p" * 70000 + b"\r\n\r\n" + SMUGGLED),
    ("no-host-http11", b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n" + SMUGGLED),
    ("two-hosts", b"GET / HTTP/1.1\r\nHost: api\r\nHost: admin\r\n\r\n" + SMUGGLED),
    ("absolute-form-host-mismatch", b"GET http://admin/secret HTTP/1.1\r\nHost: api\r\n\r\n" + SMUGGLED),
    ("space-in-target", b"GET /a b HTTP/1.1\r\nHost: api\r\n\r\n" + SMUGGLED),
    ("bad-version", b"GET / HTTP/1.2\r\nHost: api\r\n\r\n" + SMUGGLED),
    ("http2-version", b"GET / HTTP/2.0\r\nHost: api\r\n\r\n" + SMUGGLED),
    ("bad-method", b"G@T / HTTP/1.1\r\nHost: api\r\n\r\n" + SMUGGLED),
    ("two-spaces-request-line", b"GET  / HTTP/1.1\r\nHost: api\r\n\r\n" + SMUGGLED),
    ("relative-target", b"GET smuggled HTTP/1.1\r\nHost: api\r\n\r\n" + SMUGGLED),
    ("fragment-in-target", b"GET /a#b HTTP/1.1\r\nHost: api\r\n\r\n" + SMUGGLED),
    # body framing (the head is fine; the body is not): the upstream never gets a complete request
    ("chunk-size-not-hex", _chunked(b"", b"g\r\nhello\r\n0\r\n\r\n" + SMUGGLED)),
    ("chunk-size-0x", _chunked(b"", b"0x5\r\nhello\r\n0\r\n\r\n" + SMUGGLED)),
    ("chunk-size-overflow", _chunked(b"", b"10000000000000005\r\nhello\r\n0\r\n\r\n" + SMUGGLED)),
    ("chunk-size-leading-space", _chunked(b"", b" 5\r\nhello\r\n0\r\n\r\n" + SMUGGLED)),
    ("chunk-size-trailing-space", _chunked(b"", b"5 \r\nhello\r\n0\r\n\r\n" + SMUGGLED)),
    ("chunk-size-negative", _chunked(b"", b"-5\r\nhello\r\n0\r\n\r\n" + SMUGGLED)),
    ("chunk-size-empty", _chunked(b"", b"\r\nhello\r\n0\r\n\r\n" + SMUGGLED)),
    ("chunk-data-too-long", _chunked(b"", b"3\r\nhello\r\n0\r\n\r\n" + SMUGGLED)),
    ("chunk-bare-lf-size", _chunked(b"", b"5\nhello\r\n0\r\n\r\n" + SMUGGLED)),
    ("chunk-bare-lf-after-data", _chunked(b"", b"5\r\nhello\n0\r\n\r\n" + SMUGGLED)),
    ("chunk-ext-control", _chunked(b"", b"5;a\x01=b\r\nhello\r\n0\r\n\r\n" + SMUGGLED)),
    ("chunk-last-bare-lf", _chunked(b"", b"5\r\nhello\r\n0\n\n" + SMUGGLED)),
    ("trailer-obs-fold", _chunked(b"", b"5\r\nhello\r\n0\r\nX-T: a\r\n b\r\n\r\n" + SMUGGLED)),
    ("trailer-space-before-colon", _chunked(b"", b"5\r\nhello\r\n0\r\nX-T : a\r\n\r\n" + SMUGGLED)),
]

_RESPONSE_OK_HEAD = b"HTTP/1.1 200 OK\r\n"
SMUGGLED_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED"

# (case id, raw upstream response to `GET / HTTP/1.1`). The client must get a 502, never these bytes.
RESPONSE_CASES = [
    ("resp-cl-and-te", _RESPONSE_OK_HEAD + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                       + SMUGGLED_RESPONSE),
    ("resp-cl-duplicate", _RESPONSE_OK_HEAD + b"Content-Length: 0\r\nContent-Length: 46\r\n\r\n" + SMUGGLED_RESPONSE),
    ("resp-cl-list", _RESPONSE_OK_HEAD + b"Content-Length: 0, 46\r\n\r\n" + SMUGGLED_RESPONSE),
    ("resp-cl-plus", _RESPONSE_OK_HEAD + b"Content-Length: +46\r\n\r\n" + SMUGGLED_RESPONSE),
    ("resp-cl-hex", _RESPONSE_OK_HEAD + b"Content-Length: 0x2e\r\n\r\n" + SMUGGLED_RESPONSE),
    ("resp-te-gzip", _RESPONSE_OK_HEAD + b"Transfer-Encoding: gzip\r\n\r\n" + SMUGGLED_RESPONSE),
    ("resp-te-chunked-identity", _RESPONSE_OK_HEAD + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"
                                 + SMUGGLED_RESPONSE),
    ("resp-obs-fold", _RESPONSE_OK_HEAD + b"Content-Length: 0\r\nX-A: a\r\n b\r\n\r\n" + SMUGGLED_RESPONSE),
    ("resp-space-before-colon", _RESPONSE_OK_HEAD + b"Content-Length : 0\r\n\r\n" + SMUGGLED_RESPONSE),
    ("resp-bare-lf", b"HTTP/1.1 200 OK\nContent-Length: 0\n\n" + SMUGGLED_RESPONSE),
    ("resp-bare-cr", _RESPONSE_OK_HEAD + b"X-A: a\rContent-Length: 0\r\n\r\n" + SMUGGLED_RESPONSE),
    ("resp-nul-in-value", _RESPONSE_OK_HEAD + b"X-A: a\x00b\r\nContent-Length: 0\r\n\r\n" + SMUGGLED_RESPONSE),
    ("resp-bad-status", b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n" + SMUGGLED_RESPONSE),
    ("resp-http2", b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n" + SMUGGLED_RESPONSE),
    ("resp-not-http", b"SMUGGLED garbage\r\n\r\n"),
    ("resp-101-unrequested", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
                             + SMUGGLED_RESPONSE),
    ("resp-100-with-body", b"HTTP/1.1 100 Continue\r\nContent-Length: 46\r\n\r\n" + SMUGGLED_RESPONSE),
    ("resp-chunk-size-bad", _RESPONSE_OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nSMUGGLED\r\n0\r\n\r\n"),
    ("resp-oversize-head", _RESPONSE_OK_HEAD + b"X-Pad: " + b"p" * 70000 + b"\r\nContent-Length: 8\r\n\r\nSMUGGLED"),
]


@pytest.mark.parametrize("case_id,raw", REQUEST_CASES, ids=[c[0] for c in REQUEST_CASES])
def test_parser_refuses_request(case_id, raw):
    events = []
    reader = HttpReader("request")
    reader.receive_data(raw)
    with pytest.raises(ProtocolError) as info:
        while True:
            event = reader.next_event()
            assert event is not NEED_DATA, f"{case_id}: parser waited for more data instead of refusing"
            events.append(event)
    assert 400 <= info.value.status < 600
    assert info.value.reason
    # nothing of the smuggled request was ever produced as an event
    assert not any(type(e) is Request and e.target == "/smuggled" for e in events)
    if any(type(e) is Request for e in events):
        # only chunked-body cases get past the head, and they never complete the message
        assert events[0].framing == "chunked"
        assert not any(type(e) is EndOfMessage for e in events)


@pytest.mark.parametrize("case_id,raw", RESPONSE_CASES, ids=[c[0] for c in RESPONSE_CASES])
def test_parser_refuses_response(case_id, raw):
    reader = HttpReader("response")
    reader.expect_response("GET")
    reader.receive_data(raw)
    with pytest.raises(ProtocolError) as info:
        for _ in range(100):
            event = reader.next_event()
            assert event is not NEED_DATA, f"{case_id}: parser waited for more data instead of refusing"
            assert not (type(event) is Data and b"SMUGGLED" in event.data)
    assert info.value.status == 502


def test_case_counts():
    assert len(REQUEST_CASES) + len(RESPONSE_CASES) >= 40
    assert len({c[0] for c in REQUEST_CASES + RESPONSE_CASES}) == len(REQUEST_CASES) + len(RESPONSE_CASES)


# -- end to end through serve_http ---------------------------------------------------------

class _Sink:
    def __init__(self):
        self.events = []

    def emit(self, event_type, fields, session_id=None):
        self.events.append((event_type, fields))


async def _through_proxy(client_bytes: bytes, upstream_response: bytes | None) -> tuple[bytes, bytes, list]:
    received = bytearray()
    upstream_conns = []

    async def upstream(reader, writer):
        upstream_conns.append(writer)
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                received.extend(data)
                if upstream_response is not None and b"\r\n\r\n" in received:
                    writer.write(upstream_response)
                    await writer.drain()
                    upstream_response_sent.set()
        except ConnectionError:
            pass
        finally:
            writer.close()

    upstream_response_sent = asyncio.Event()
    server = await asyncio.start_server(upstream, "127.0.0.2", 0)
    port = server.sockets[0].getsockname()[1]
    sink = _Sink()

    async def handle(reader, writer):
        ctx = ConnectionContext("sess", "svc", {}, TargetInfo("api", "http", "127.0.0.2", port), None, sink)
        await serve_http(reader, writer, ctx)

    proxy = await asyncio.start_server(handle, "127.0.0.1", 0)
    proxy_port = proxy.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    writer.write(client_bytes)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(-1), 5)     # the proxy must close the connection
    writer.close()
    await asyncio.sleep(0.01)
    proxy.close()
    server.close()
    return answer, bytes(received), sink.events


@pytest.mark.parametrize("case_id,raw", REQUEST_CASES, ids=[c[0] for c in REQUEST_CASES])
def test_proxy_refuses_request(case_id, raw):
    answer, upstream_saw, events = asyncio.run(_through_proxy(raw, None))
    status = int(answer.split(b" ", 2)[1])
    assert 400 <= status < 500 or status == 505, answer[:200]
    assert b"smuggled" not in upstream_saw.lower()
    # the upstream never saw a complete request: at most the head of a chunked one, without its end
    assert not upstream_saw.endswith(b"0\r\n\r\n")
    assert events[-1][0] == "session.end"


@pytest.mark.parametrize("case_id,raw", RESPONSE_CASES, ids=[c[0] for c in RESPONSE_CASES])
def test_proxy_refuses_upstream_response(case_id, raw):
    answer, upstream_saw, events = asyncio.run(
        _through_proxy(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n", raw))
    assert answer.startswith(b"HTTP/1.1 502 "), answer[:200]
    assert b"SMUGGLED" not in answer.split(b"\r\n\r\n", 1)[1].replace(b"SMUGGLED garbage", b"")
    assert upstream_saw == b"GET / HTTP/1.1\r\nHost: api\r\n\r\n"
    responses = [f for t, f in events if t == "http.response"]
    assert responses and responses[-1]["status"] == 502


# -- the shell's own desync guards -----------------------------------------------------------

async def _stray_response_run() -> tuple[bytes, int]:
    """The upstream answers the first request twice; the second client request must get its own answer."""
    connections = []

    async def upstream(reader, writer):
        connections.append(writer)
        served = 0
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                served += 1
                body = b"%d-%d" % (len(connections), served)
                reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                writer.write(reply + (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nSTRAY" if served == 1 else b""))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.2", 0)
    port = server.sockets[0].getsockname()[1]

    async def handle(reader, writer):
        ctx = ConnectionContext("sess", "svc", {}, TargetInfo("api", "http", "127.0.0.2", port), None, _Sink())
        await serve_http(reader, writer, ctx)

    proxy = await asyncio.start_server(handle, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.sockets[0].getsockname()[1])
    writer.write(b"GET /1 HTTP/1.1\r\nHost: api\r\n\r\n")
    first = await asyncio.wait_for(reader.readuntil(b"1-1"), 5)
    await asyncio.sleep(0.05)                    # the stray bytes arrive while the session is idle
    writer.write(b"GET /2 HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
    rest = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    proxy.close()
    server.close()
    return first + rest, len(connections)


def test_bytes_from_an_idle_upstream_are_never_paired_with_the_next_request():
    answer, upstream_connections = asyncio.run(_stray_response_run())
    assert b"STRAY" not in answer
    assert answer.endswith(b"2-1")               # a new upstream connection answered request 2
    assert upstream_connections == 2


async def _late_handover_run() -> bytes:
    """The agent's stream may already hold the request when serve_http takes the transport."""
    async def upstream(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.2", 0)
    port = server.sockets[0].getsockname()[1]

    async def handle(reader, writer):
        await asyncio.sleep(0.1)                 # the request lands in the StreamReader's buffer
        ctx = ConnectionContext("sess", "svc", {}, TargetInfo("api", "http", "127.0.0.2", port), None, _Sink())
        await serve_http(reader, writer, ctx)

    proxy = await asyncio.start_server(handle, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.sockets[0].getsockname()[1])
    writer.write(b"GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    proxy.close()
    server.close()
    return answer


def test_bytes_buffered_before_the_handover_are_served():
    answer = asyncio.run(_late_handover_run())
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nok")
