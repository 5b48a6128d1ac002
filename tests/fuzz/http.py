"""Fuzz targets for enforcer.http.protocol (the sans-IO HTTP/1.1 core), requests and responses.

Properties checked on every input:
- the only exception is ProtocolError, with 400/414/417/431/501/505 for requests and 502 for
  responses; bounded work (per-input alarm and a cap on events per input);
- after a ProtocolError nothing more is produced from that connection;
- no ambiguous message is forwarded: every accepted message, re-serialised as the proxy
  does (HttpWriter, hop-by-hop headers removed, one framing header), parses back with a
  fresh reader to the same method/target/status and the same body bytes.
"""
from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enforcer.http import protocol as H
from tests.fuzz.common import PropertyViolation, Stats, mutate, run_one, split_points, timed

REQUEST_STATUSES = {400, 413, 414, 417, 431, 501, 505}
MAX_EVENTS = 10_000


def request_seeds() -> list[bytes]:
    return [
        b"GET /v1/customers?id=7 HTTP/1.1\r\nHost: api.internal\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n",
        b"POST /v1/orders HTTP/1.1\r\nHost: api.internal\r\nContent-Type: application/json\r\n"
        b"Content-Length: 13\r\n\r\n{\"amount\": 5}",
        b"PUT /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n"
        b"X-Trailer: t\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
        b"CONNECT db.internal:443 HTTP/1.1\r\nHost: db.internal:443\r\n\r\n",
        b"GET http://api.internal/p?q=1 HTTP/1.1\r\nHost: api.internal\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"POST /u HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    ]


def response_seeds() -> list[bytes]:
    return [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\": true}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close",
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05hello",
    ]


def _drain(reader: H.HttpReader, role: str, messages: list) -> bool:
    """Pull events until NEED_DATA/closed; append (head, body, complete). True on ProtocolError."""
    for _ in range(MAX_EVENTS):
        try:
            ev = reader.next_event()
        except H.ProtocolError as exc:
            allowed = {502} if role == "response" else REQUEST_STATUSES
            if exc.status not in allowed:
                raise PropertyViolation(f"{role} error answered with status {exc.status}: {exc.reason}") from exc
            # the connection is over: nothing may come out of it any more
            try:
                after = reader.next_event()
            except H.ProtocolError:
                return True
            if not isinstance(after, H.ConnectionClosed) and after is not H.NEED_DATA:
                raise PropertyViolation(f"reader produced {after!r} after a protocol error")
            return True
        if ev is H.NEED_DATA or isinstance(ev, H.ConnectionClosed):
            return False
        if isinstance(ev, (H.Request, H.Response)):
            messages.append([ev, bytearray(), False])
        elif isinstance(ev, H.Data):
            if not messages:
                raise PropertyViolation("body data before any head")
            messages[-1][1] += ev.data
        elif isinstance(ev, H.EndOfMessage):
            if not messages:
                raise PropertyViolation("end of message before any head")
            messages[-1][2] = True
    raise PropertyViolation(f"more than {MAX_EVENTS} events from one input")


def _reserialise(head, body: bytes) -> bytes:
    """What the proxy would forward: end-to-end headers plus one framing header of its choosing."""
    headers = H.forwardable_headers(head.headers, head.connection_tokens)
    if isinstance(head, H.Request):
        if head.version == "1.1" and H.find_header(headers, "host") is None:
            headers.append(("Host", head.host or "x"))
        headers.append(("Content-Length", str(len(body))))
        out = H.Request(head.method, head.target, headers, head.version)
    else:
        headers.append(("Content-Length", str(len(body))))
        out = H.Response(head.status, headers, head.reason, "1.1")
    return H.HttpWriter().send(out) + body


def _roundtrip(role: str, head, body: bytes) -> bool:
    """Check one accepted message; False if it is of a kind that is not re-framed."""
    if isinstance(head, H.Request) and (head.method == "CONNECT" or head.upgrade):
        return False                   # tunnels are not re-framed
    if isinstance(head, H.Response) and (head.status < 200 or head.framing in (H.TUNNEL,)):
        return False
    wire = _reserialise(head, body)
    reader = H.HttpReader(role)
    if role == "response":
        reader.expect_response("GET")
    reader.receive_data(wire)
    again: list = []
    if _drain(reader, role, again):
        raise PropertyViolation(f"a message Warden accepted does not parse after re-serialisation: {wire[:120]!r}")
    if len(again) != 1 or not again[0][2]:
        raise PropertyViolation(f"re-serialised message parses as {len(again)} messages: {wire[:120]!r}")
    h2, b2, _ = again[0]
    same = (h2.method, h2.target) == (head.method, head.target) if role == "request" else h2.status == head.status
    if not same or bytes(b2) != body:
        raise PropertyViolation(f"re-serialised message changed meaning: {wire[:120]!r}")
    return True


def fuzz_http(role: str, chunks: list[bytes], methods: list[str] = ("GET",), stats: Stats | None = None) -> bool:
    """True if the input ended in a protocol error. Every message completed before the end, or
    before the error (the proxy has forwarded it by then), is round-tripped; `stats.checked`
    counts them."""
    reader = H.HttpReader(role)
    if role == "response":
        for m in methods:
            reader.expect_response(m, upgrade=True)
    messages: list = []
    refused = False
    for chunk in chunks + [b""]:          # b"" last: the peer closes
        reader.receive_data(chunk)
        if _drain(reader, role, messages):
            refused = True
            break
    for head, body, complete in messages:
        if complete and _roundtrip(role, head, bytes(body)) and stats is not None:
            stats.checked += 1
    return refused


def fuzz_well_formed(role: str, chunks: list[bytes], expected: list[tuple], stats: Stats | None = None) -> bool:
    """Valid messages (responses to GETs) must all be accepted, each with what was sent, and
    round-trip; False (never refused)."""
    reader = H.HttpReader(role)
    if role == "response":
        for _ in expected:
            reader.expect_response("GET")
    messages: list = []
    for chunk in chunks:
        reader.receive_data(chunk)
        if _drain(reader, role, messages):
            raise PropertyViolation(f"a well-formed {role} stream was refused: {b''.join(chunks)[:160]!r}")
    got = [((head.method, head.target) if role == "request" else (head.status,)) + (bytes(body),)
           for head, body, complete in messages if complete]
    if got != [tuple(e) for e in expected] or not all(complete for _, _, complete in messages):
        raise PropertyViolation(f"well-formed {role}s parsed as {got!r}, sent {expected!r}")
    for head, body, _ in messages:
        if _roundtrip(role, head, bytes(body)) and stats is not None:
            stats.checked += 1
    return False


def mutation_target(name: str, n: int, seed: int) -> Stats:
    rng = random.Random(seed)
    stats = Stats(name, checked=0)
    role = "request" if name == "http_request_mutated" else "response"
    corpus = request_seeds() if role == "request" else response_seeds()
    with timed(stats):
        for _ in range(n):
            base = rng.choice(corpus)
            if rng.random() < 0.3:
                base += rng.choice(corpus)
            data = mutate(rng, base, corpus=corpus)
            methods = [rng.choice(["GET", "HEAD", "POST", "CONNECT"]) for _ in range(4)]
            run_one(stats, lambda c: fuzz_http(role, c, methods, stats), split_points(rng, data))
    return stats


_token = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$%&'*+.^_`|~", min_size=1,
                 max_size=12)
_value = st.one_of(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
                   st.text(st.characters(min_codepoint=0, max_codepoint=255), max_size=20))
_framing = st.sampled_from(["Content-Length", "Transfer-Encoding", "Connection", "Host", "Expect", "Upgrade"])


_field_name = st.sampled_from(["Accept", "User-Agent", "X-Request-Id", "Authorization", "Cookie", "Content-Type",
                               "Cache-Control", "X-Forwarded-For", "If-None-Match", "Accept-Encoding"])
_field_value = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20)


def _framed_body(draw, body: bytes, chunked_ok: bool) -> tuple[list[tuple[str, str]], bytes]:
    """Framing headers and the bytes that carry `body`: Content-Length or chunked."""
    if not chunked_ok or draw(st.booleans()):
        return [("Content-Length", str(len(body)))], body
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(body))), max_size=3))))
    pieces, prev = [], 0
    for c in cuts + [len(body)]:
        if prev < c <= len(body):       # a chunk of size 0 would end the body
            pieces.append(body[prev:c])
            prev = c
    wire = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    return [("Transfer-Encoding", "chunked")], wire


@st.composite
def well_formed_message(draw, role: str):
    """One to three valid messages back to back (pipelined), with consistent framing: the
    accepting path, which the adversarial generator below rarely reaches. Returns (chunks,
    expected): what each message must parse as, (method, target, body) or (status, body)."""
    data, expected = b"", []
    for _ in range(draw(st.integers(1, 3))):
        headers = draw(st.lists(st.tuples(_field_name, _field_value), max_size=4))
        body = draw(st.binary(max_size=40))
        if role == "request":
            method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]))
            target = draw(st.sampled_from(["/", "/a?b=c", "/v1/customers/7", "http://api.internal/p"]))
            version = draw(st.sampled_from(["1.1", "1.1", "1.0"]))
            if version == "1.1":
                headers.insert(draw(st.integers(0, len(headers))), ("Host", "api.internal"))
            start = f"{method} {target} HTTP/{version}"
            # the reader hands on an absolute-form target as its path (the host goes to Host)
            expected.append((method, target.removeprefix("http://api.internal"), body))
        else:
            version = "1.1"
            status = draw(st.sampled_from([200, 201, 202, 400, 403, 404, 500, 503]))
            start = f"HTTP/1.1 {status} {draw(st.sampled_from(['OK', 'Not Found', 'Whatever it says', '']))}"
            expected.append((status, body))
        # chunked is HTTP/1.1 only; a response says how long it is, or it would run until close
        if body or role == "response" or draw(st.booleans()):
            framing, wire = _framed_body(draw, body, chunked_ok=version == "1.1")
        else:
            framing, wire = [], b""
        for f in framing:
            headers.insert(draw(st.integers(0, len(headers))), f)
        data += (start + "\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n").encode() + wire
    return _cut(draw, data), expected


def _cut(draw, data: bytes) -> list[bytes]:
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=3))))
    chunks, prev = [], 0
    for c in cuts:
        chunks.append(data[prev:c])
        prev = c
    chunks.append(data[prev:])
    return [c for c in chunks if c]


@st.composite
def http_message(draw, role: str):
    if role == "request":
        start = (f"{draw(st.sampled_from(['GET', 'POST', 'HEAD', 'PUT', 'CONNECT', 'OPTIONS', draw(_token)]))} "
                 f"{draw(st.sampled_from(['/', '/a?b=c', '/x', '*', 'http://api.internal/p', 'h:443', draw(_value) or '/']))} "
                 f"HTTP/{draw(st.sampled_from(['1.1'] * 6 + ['1.0', '2.0', '1.1 ']))}")
    else:
        status = draw(st.one_of(st.sampled_from([200, 201, 204, 304, 404, 500]), st.integers(0, 999)))
        start = f"HTTP/{draw(st.sampled_from(['1.1', '1.0']))} {status:03d} {draw(_value)}"
    headers = draw(st.lists(st.tuples(st.one_of(_framing, _token), st.one_of(
        st.sampled_from(["chunked", "0", "5", "close", "keep-alive", "h", " 5", "5, 5", "chunked, gzip"]),
        _value)), max_size=6))
    if role == "request" and draw(st.integers(0, 4)):
        headers.insert(draw(st.integers(0, len(headers))), ("Host", "api.internal"))
    sep = draw(st.sampled_from(["\r\n"] * 8 + ["\n", "\r"]))
    head = start + sep + "".join(f"{n}{draw(st.sampled_from([': '] * 6 + [':', ' :']))}{v}{sep}"
                                 for n, v in headers) + sep
    body = draw(st.binary(max_size=30))
    return _cut(draw, head.encode("latin-1", "replace") + body)


def hypothesis_target(name: str, n: int) -> Stats:
    stats = Stats(name, checked=0)
    role = "request" if name == "http_request_generated" else "response"

    # about half well-formed (the accepting path: nothing valid refused, each message as sent),
    # half adversarial heads
    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(well_formed_message(role), http_message(role)),
           st.lists(st.sampled_from(["GET", "HEAD", "CONNECT"]), min_size=1, max_size=3))
    def body(generated, methods):
        if isinstance(generated, tuple):
            chunks, expected = generated
            run_one(stats, lambda c: fuzz_well_formed(role, c, expected, stats), chunks)
        else:
            run_one(stats, lambda c: fuzz_http(role, c, methods, stats), generated)

    with timed(stats):
        body()
    return stats
