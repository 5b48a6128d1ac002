"""Sans-IO HTTP/1.1 core: a strict message parser and a normalising serializer.

No sockets here. A reader is fed bytes with `receive_data` and yields events from
`next_event`: a `Request` or `Response` head, `Data`, `EndOfMessage`, `NEED_DATA`, or
`ConnectionClosed`; anything ambiguous raises `ProtocolError` carrying the status to answer
(the message is never forwarded). A writer turns events back into bytes with `send`,
choosing the body framing from the headers of the head it was given, so whatever leaves
Warden is re-serialised from parsed values: one Content-Length or `chunked`, CRLF line
endings, chunks without extensions.

Strictness (RFC 9112 plus the request-smuggling lessons): CRLF only (bare CR or LF
refused), no obs-fold, no whitespace before the colon, no control characters in names or
values, Content-Length digits only and at most once, Transfer-Encoding exactly `chunked`
and never together with Content-Length, chunk sizes hex digits only, limits on line and
head sizes.
"""
from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Union

# -- events --------------------------------------------------------------------------------


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")

# body framing of one message, as parsed and as written
NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE, TUNNEL = "none", "length", "chunked", "until_close", "tunnel"


@dataclass(slots=True)
class Request:
    method: str
    target: str                        # origin-form ("/a?b"), "*", or authority-form for CONNECT
    headers: list[tuple[str, str]]     # names as sent, values without surrounding whitespace
    version: str = "1.1"               # "1.1" | "1.0"
    # derived while parsing (the writer ignores them)
    framing: str = NO_BODY
    content_length: int = 0
    keep_alive: bool = True
    host: str = ""
    upgrade: Optional[str] = None
    expect_continue: bool = False
    connection_tokens: frozenset = frozenset()
    head_key: Optional[bytes] = None   # the raw head if small: equal keys mean equal parses (for caches)

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]


@dataclass(slots=True)
class Response:
    status: int
    headers: list[tuple[str, str]]
    reason: str = ""
    version: str = "1.1"
    framing: str = NO_BODY
    content_length: int = 0
    keep_alive: bool = True
    connection_tokens: frozenset = frozenset()
    head_key: Optional[bytes] = None


@dataclass(slots=True)
class Data:
    data: bytes


@dataclass(slots=True)
class EndOfMessage:
    trailers: list[tuple[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class ConnectionClosed:
    """The peer closed cleanly between messages (or the tunnel/close-delimited body ended)."""


Event = Union[Request, Response, Data, EndOfMessage, ConnectionClosed, _Sentinel]


class ProtocolError(Exception):
    """A message Warden refuses to interpret; `status` is what to answer (400, 414, 431, 501, 505, 502)."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.reason = reason
        self.status = status


# -- grammar -------------------------------------------------------------------------------

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE = re.compile(rf"({_TOKEN}) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
_STATUS_LINE = re.compile(r"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
# every header line at once: name, colon, value of visible chars/obs-text/SP/HT, CRLF
_HEADER_BLOCK = re.compile(rf"(?:{_TOKEN}:[\t\x20-\x7e\x80-\xff]*\r\n)*")
_HEADER_LINE = re.compile(rf"({_TOKEN}):([\t\x20-\x7e\x80-\xff]*)")
# a whole head in one pass (start line + header block); anything it rejects is diagnosed by
# the line-by-line checks, which only run on that error path
_FIELDS = rf"((?:{_TOKEN}:[\t\x20-\x7e\x80-\xff]*\r\n)*)"
_REQUEST_HEAD = re.compile(rf"({_TOKEN}) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])\r\n" + _FIELDS)
_STATUS_HEAD = re.compile(r"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?\r\n" + _FIELDS)
# one field of a validated block: name, value without surrounding SP/HT (values may hold inner HT)
_FIELD = re.compile(rf"({_TOKEN}):[ \t]*((?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?)"
                    r"[ \t]*\r\n")
_DIGITS = re.compile(r"[0-9]{1,18}")
_PORT = re.compile(r"[0-9]{1,5}")
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})((?:;[!#$%&'*+.^_`|~0-9A-Za-z-]+"
                         rb"(?:=(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+|\"[\t\x20\x21\x23-\x5b\x5d-\x7e]*\"))?)*)")
_FRAMING_NAMES = frozenset({"content-length", "transfer-encoding", "host", "connection",
                            "upgrade", "expect"})
# hop-by-hop: meaningful for one connection only, never forwarded as received
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                        "transfer-encoding", "upgrade", "content-length"})
# fields that must not arrive as trailers (they would change framing or routing)
_FORBIDDEN_TRAILERS = frozenset({"content-length", "transfer-encoding", "host", "trailer",
                                 "connection", "keep-alive", "upgrade", "te", "expect",
                                 "authorization", "cookie", "set-cookie", "proxy-authorization"})

DEFAULT_MAX_HEAD = 64 * 1024
DEFAULT_MAX_LINE = 8 * 1024
# Clients and servers on a keep-alive connection repeat the same heads byte for byte; a
# reader remembers the grammar-checked parse of recent small heads (the parse is a pure
# function of the bytes, so strictness is unchanged; only heads that passed are kept).
MEMO_HEAD_BYTES = 2048
MEMO_ENTRIES = 32


def _diagnose_header_line(line: str) -> str:
    """Why one header line failed the block grammar (only run on the error path)."""
    if not line:
        return "empty header line"
    if line[0] in " \t":
        return "obsolete line folding (a header line starting with whitespace) is not accepted"
    name, colon, _ = line.partition(":")
    if not colon:
        return f"header line without a colon: {line[:40]!r}"
    if name != name.rstrip(" \t"):
        return f"whitespace between the header name and the colon: {name!r}"
    if not name:
        return "empty header name"
    if re.fullmatch(_TOKEN, name) is None:
        return f"invalid character in header name {name[:40]!r}"
    return f"control character (NUL, CR, LF or other) in the value of header {name!r}"


def _check_line_endings(text: str, what: str) -> None:
    crlf = text.count("\r\n")
    if text.count("\n") != crlf:
        raise ProtocolError(f"bare LF line ending in the {what}; lines must end with CRLF")
    if text.count("\r") != crlf:
        raise ProtocolError(f"bare CR in the {what}; lines must end with CRLF")


def _parse_fields(block: str, what: str) -> list[tuple[str, str]]:
    """Header or trailer lines, each ending with CRLF, into (name, value) pairs."""
    if _HEADER_BLOCK.fullmatch(block) is None:
        for line in block.split("\r\n"):
            if line and _HEADER_LINE.fullmatch(line) is None:
                raise ProtocolError(f"{what}: {_diagnose_header_line(line)}")
        raise ProtocolError(f"{what}: malformed header block")
    return _FIELD.findall(block)


def _comma_tokens(values: list[str]) -> list[str]:
    tokens = []
    for value in values:
        for part in value.split(","):
            part = part.strip(" \t").lower()
            if part:
                tokens.append(part)
    return tokens


_NO_TOKENS: frozenset = frozenset()


def _framing(headers: list[tuple[str, str]], http10: bool, side: str):
    """The framing-relevant headers of one head, checked for every known ambiguity.

    Returns (content_length or None, chunked, host or None, connection tokens, upgrade or None,
    expect values or None).
    """
    found: Optional[dict[str, list[str]]] = None
    for name, value in headers:
        lname = name.lower()
        if lname in _FRAMING_NAMES:
            if found is None:
                found = {lname: [value]}
            elif lname in found:
                found[lname].append(value)
            else:
                found[lname] = [value]
    if found is None:
        return None, False, None, _NO_TOKENS, None, None
    content_length: Optional[int] = None
    chunked = False
    lengths = found.get("content-length")
    codings = found.get("transfer-encoding")
    if lengths is not None:
        if len(lengths) > 1:
            raise ProtocolError(f"{side}: Content-Length appears {len(lengths)} times")
        value = lengths[0]
        if _DIGITS.fullmatch(value) is None:
            raise ProtocolError(f"{side}: invalid Content-Length {value[:40]!r}; only decimal digits are accepted")
        content_length = int(value)
    if codings is not None:
        if lengths is not None:
            raise ProtocolError(f"{side}: both Content-Length and Transfer-Encoding are present")
        if len(codings) > 1 or codings[0].lower() != "chunked":
            raise ProtocolError(f"{side}: Transfer-Encoding {', '.join(codings)[:60]!r} is not accepted; "
                                f"only exactly 'chunked'")
        if http10:
            raise ProtocolError(f"{side}: Transfer-Encoding in an HTTP/1.0 message")
        chunked = True
    hosts = found.get("host")
    host = None
    if hosts is not None:
        if len(hosts) > 1:
            raise ProtocolError(f"{side}: Host appears {len(hosts)} times")
        host = hosts[0]
    connection = found.get("connection")
    tokens = frozenset(_comma_tokens(connection)) if connection is not None else _NO_TOKENS
    upgrades = found.get("upgrade")
    return (content_length, chunked, host, tokens, ", ".join(upgrades) if upgrades else None,
            found.get("expect"))


# -- reader --------------------------------------------------------------------------------

_HEAD, _BODY_LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _BODY_CLOSE, _TUNNEL_STATE, \
    _DONE, _CLOSED = range(10)


class HttpReader:
    """Parses a stream of requests (role "request") or of responses (role "response").

    A response reader must be told the method of each request sent upstream, in order
    (`expect_response`), because HEAD and CONNECT change how the response is framed.
    After a 101 or a successful CONNECT the stream becomes an opaque tunnel: the rest
    arrives as Data.
    """

    def __init__(self, role: str, max_head: int = DEFAULT_MAX_HEAD, max_line: int = DEFAULT_MAX_LINE):
        if role not in ("request", "response"):
            raise ValueError("role must be 'request' or 'response'")
        self.role = role
        self._requests = role == "request"
        self.max_head = max_head
        self.max_line = max_line
        self._buf = bytearray()
        self._eof = False
        self._state = _HEAD
        self._remaining = 0
        self._methods: deque[str] = deque()
        self._upgrade_requested: deque[bool] = deque()
        self.tunnel = False
        self._memo: dict[bytes, tuple] = {}

    # -- input ---------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; b"" means the peer closed its side."""
        if data:
            self._buf += data
        else:
            self._eof = True

    def expect_response(self, method: str, upgrade: bool = False) -> None:
        self._methods.append(method)
        self._upgrade_requested.append(upgrade)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def at_message_start(self) -> bool:
        return self._state == _HEAD

    # -- events --------------------------------------------------------------------------
    def next_event(self) -> Event:
        state = self._state
        if state == _HEAD:
            if not self._buf and not self._eof:
                return NEED_DATA            # the common idle probe, without the head machinery
            return self._head()
        if state == _DONE:
            # the body is complete: report it once, then parse the next head
            self._state = _HEAD
            return EndOfMessage([])
        if state == _BODY_LENGTH:
            return self._length_body()
        if state == _CHUNK_DATA or state == _CHUNK_SIZE or state == _CHUNK_CRLF or state == _TRAILERS:
            return self._chunked_body()
        if state == _BODY_CLOSE or state == _TUNNEL_STATE:
            if self._buf:
                data = bytes(self._buf)
                self._buf.clear()
                return Data(data)
            if self._eof:
                self._state = _CLOSED
                return EndOfMessage() if state == _BODY_CLOSE else ConnectionClosed()
            return NEED_DATA
        if state == _CLOSED:
            return ConnectionClosed()
        raise RuntimeError(f"reader in state {state}")

    def _head(self) -> Event:
        buf = self._buf
        if self._requests:
            # RFC 9112 2.2: ignore empty lines before a request line
            while buf.startswith(b"\r\n"):
                del buf[:2]
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if not buf:
                if self._eof:
                    self._state = _CLOSED
                    return ConnectionClosed()
                return NEED_DATA
            if self._eof:
                raise ProtocolError(f"connection closed inside a message head ({len(buf)} bytes)",
                                    400 if self.role == "request" else 502)
            self._check_incomplete_head(buf)
            return NEED_DATA
        if end + 4 > self.max_head:
            raise ProtocolError(f"message head of {end + 4} bytes exceeds the limit of {self.max_head}",
                                431 if self.role == "request" else 502)
        if end + 4 == len(buf):
            key = bytes(buf)
            buf.clear()
        else:
            key = bytes(buf[:end + 4])
            del buf[:end + 4]
        if self._requests:
            return self._request(key)
        return self._response(key)

    def _remember(self, key: bytes, parsed: tuple) -> None:
        if len(key) <= MEMO_HEAD_BYTES:
            memo = self._memo
            if len(memo) >= MEMO_ENTRIES:
                memo.clear()
            memo[key] = parsed

    def _check_incomplete_head(self, buf: bytearray) -> None:
        """Fail early, before the head is complete, on what can never become valid."""
        if len(buf) > self.max_head:
            raise ProtocolError(f"message head exceeds the limit of {self.max_head} bytes",
                                431 if self.role == "request" else 502)
        first_line_end = buf.find(b"\r\n")
        if (first_line_end < 0 and len(buf) > self.max_line) or first_line_end > self.max_line:
            raise ProtocolError(f"{'request' if self.role == 'request' else 'status'} line exceeds "
                                f"{self.max_line} bytes", 414 if self.role == "request" else 502)
        newlines = buf.count(b"\n")
        if newlines and newlines != buf.count(b"\r\n"):
            raise ProtocolError("bare LF line ending in the message head; lines must end with CRLF",
                                400 if self.role == "request" else 502)

    def _request(self, key: bytes) -> Request:
        try:
            parsed = self._memo.get(key)
            if parsed is None:
                parsed = self._parse_request_head(key[:-2].decode("latin-1"))
                self._remember(key, parsed)
            method, target, headers, version, framing = parsed
            request = Request(method, target, list(headers), version,
                              head_key=key if len(key) <= MEMO_HEAD_BYTES else None)
            self._route_request(request, framing)
        except ProtocolError:
            self._state = _CLOSED
            raise
        return request

    def _parse_request_head(self, text: str) -> tuple:
        match = _REQUEST_HEAD.fullmatch(text)
        if match is None:
            raise self._request_head_error(text)
        method, target, major, minor, block = match.groups()
        if match.end(4) > self.max_line:
            raise ProtocolError(f"request line exceeds {self.max_line} bytes", 414)
        if major != "1" or (minor != "1" and minor != "0"):
            raise ProtocolError(f"HTTP version {major}.{minor} is not supported", 505)
        headers = tuple(_FIELD.findall(block)) if block else ()
        return method, target, headers, "1." + minor, _framing(headers, minor == "0", "request")

    def _request_head_error(self, text: str) -> ProtocolError:
        """Why a request head failed the one-pass grammar, checked in the order a reader would."""
        try:
            _check_line_endings(text, "request head")
            line, _, block = text.partition("\r\n")
            if len(line) > self.max_line:
                return ProtocolError(f"request line exceeds {self.max_line} bytes", 414)
            match = _REQUEST_LINE.fullmatch(line)
            if match is None:
                return ProtocolError(f"malformed request line {line[:80]!r}")
            method, target, major, minor = match.groups()
            if major != "1" or minor not in ("0", "1"):
                return ProtocolError(f"HTTP version {major}.{minor} is not supported", 505)
            _parse_fields(block, "request header")
        except ProtocolError as exc:
            return exc
        return ProtocolError("malformed request head")

    def _route_request(self, request: Request, framing: tuple) -> None:
        content_length, chunked, host, connection, upgrade, expect = framing
        target = request.target
        if request.version == "1.1" and host is None:
            raise ProtocolError("HTTP/1.1 request without a Host header")
        if request.method == "CONNECT":
            name, colon, port = target.rpartition(":")
            if "/" in target or "@" in target or not colon or not name or _PORT.fullmatch(port) is None:
                raise ProtocolError(f"CONNECT target must be host:port, got {target[:80]!r}")
            # RFC 9110 9.3.6: the tunnel goes to the request target, so that is the authority
            # decided on and recorded; a Host naming another one is refused (as for absolute-form)
            if host is not None and host.lower() != target.lower():
                raise ProtocolError(f"CONNECT target {target[:80]!r} differs from Host {host[:80]!r}")
            request.host = target
        elif target.startswith("/"):
            request.host = host or ""
        elif target == "*":
            if request.method != "OPTIONS":
                raise ProtocolError("request target '*' is only valid for OPTIONS")
            request.host = host or ""
        elif target[:7].lower() == "http://" or target[:8].lower() == "https://":
            # absolute-form: the authority must agree with Host, then forward origin-form
            rest = target.split("://", 1)[1]
            slash = rest.find("/")
            authority, path = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
            if "?" in authority:
                authority, _, query = authority.partition("?")
                path = "/?" + query
            if not authority or "@" in authority:
                raise ProtocolError(f"invalid authority in request target {target[:80]!r}")
            if host is not None and host.lower() != authority.lower():
                raise ProtocolError(f"request target authority {authority!r} differs from Host {host!r}")
            request.target = path
            request.host = authority
        else:
            raise ProtocolError(f"request target {target[:80]!r} is not origin-form, absolute-form or '*'")
        if "#" in request.target:
            raise ProtocolError("a fragment ('#') is not allowed in a request target")
        if connection:
            request.connection_tokens = connection
            if request.version == "1.1":
                request.keep_alive = "close" not in connection
            else:
                request.keep_alive = "keep-alive" in connection and "close" not in connection
            if upgrade is not None and "upgrade" in connection:
                request.upgrade = upgrade
        elif request.version == "1.0":
            request.keep_alive = False
        if expect is not None:
            if len(expect) != 1 or expect[0].lower() != "100-continue":
                raise ProtocolError(f"unsupported Expect {', '.join(expect)[:60]!r}", 417)
            request.expect_continue = True
        if chunked:
            request.framing = CHUNKED
            self._state = _CHUNK_SIZE
        elif content_length:
            request.framing = LENGTH
            request.content_length = self._remaining = content_length
            self._state = _BODY_LENGTH
        else:
            request.framing = NO_BODY
            self._state = _DONE

    def _response(self, key: bytes) -> Response:
        try:
            parsed = self._memo.get(key)
            if parsed is None:
                parsed = self._parse_response_head(key[:-2].decode("latin-1"))
                self._remember(key, parsed)
            status, headers, reason, version, framing = parsed
            response = Response(status, list(headers), reason, version,
                                head_key=key if len(key) <= MEMO_HEAD_BYTES else None)
            self._route_response(response, framing)
        except ProtocolError as exc:
            self._state = _CLOSED
            # a malformed upstream response is the upstream's fault: the client gets a 502
            raise ProtocolError(exc.reason, 502) from None
        return response

    def _parse_response_head(self, text: str) -> tuple:
        match = _STATUS_HEAD.fullmatch(text)
        if match is None:
            raise self._response_head_error(text)
        major, minor, status, reason, block = match.groups()
        if major != "1" or (minor != "1" and minor != "0"):
            raise ProtocolError(f"upstream HTTP version {major}.{minor} is not supported", 502)
        headers = tuple(_FIELD.findall(block)) if block else ()
        return int(status), headers, reason or "", "1." + minor, _framing(headers, minor == "0", "response")

    def _response_head_error(self, text: str) -> ProtocolError:
        try:
            _check_line_endings(text, "response head")
            line, _, block = text.partition("\r\n")
            match = _STATUS_LINE.fullmatch(line)
            if match is None:
                return ProtocolError(f"malformed status line {line[:80]!r}", 502)
            major, minor = match.group(1), match.group(2)
            if major != "1" or minor not in ("0", "1"):
                return ProtocolError(f"upstream HTTP version {major}.{minor} is not supported", 502)
            _parse_fields(block, "response header")
        except ProtocolError as exc:
            return exc
        return ProtocolError("malformed response head", 502)

    def _route_response(self, response: Response, framing: tuple) -> None:
        content_length, chunked, _host, connection, _upgrade, _expect = framing
        status = response.status
        if status < 100:
            raise ProtocolError(f"invalid status code {status}", 502)
        if not self._methods:
            raise ProtocolError(f"upstream sent a response ({status}) to no request", 502)
        method = self._methods[0]
        if connection:
            response.connection_tokens = connection
            if response.version == "1.1":
                response.keep_alive = "close" not in connection
            else:
                response.keep_alive = "keep-alive" in connection and "close" not in connection
        elif response.version == "1.0":
            response.keep_alive = False
        if status < 200:
            if status == 101:
                if not self._upgrade_requested[0]:
                    raise ProtocolError("upstream switched protocols without an Upgrade request", 502)
                self._enter_tunnel(response)
                return
            # an informational response: the final one for the same request follows
            if content_length or chunked:
                raise ProtocolError(f"a {status} response must not have a body", 502)
            response.framing = NO_BODY
            self._state = _HEAD
            return
        self._methods.popleft()
        self._upgrade_requested.popleft()
        if method == "CONNECT" and status < 300:
            self._enter_tunnel(response)
            return
        if method == "HEAD" or status == 204 or status == 304:
            response.framing = NO_BODY
            response.content_length = content_length or 0
            self._state = _DONE
        elif chunked:
            response.framing = CHUNKED
            self._state = _CHUNK_SIZE
        elif content_length is not None:
            response.framing = LENGTH if content_length else NO_BODY
            response.content_length = self._remaining = content_length
            self._state = _BODY_LENGTH if content_length else _DONE
        else:
            response.framing = UNTIL_CLOSE
            response.keep_alive = False
            self._state = _BODY_CLOSE

    def _enter_tunnel(self, response: Response) -> None:
        response.framing = TUNNEL
        response.keep_alive = False
        self.tunnel = True
        self._state = _TUNNEL_STATE

    def start_tunnel(self) -> None:
        """Request side of an upgrade: after the upstream agreed, client bytes are opaque."""
        self.tunnel = True
        self._state = _TUNNEL_STATE

    # -- bodies --------------------------------------------------------------------------
    def _length_body(self) -> Event:
        buf = self._buf
        if not buf:
            if self._eof:
                self._state = _CLOSED
                raise ProtocolError(f"connection closed with {self._remaining} body bytes missing",
                                    400 if self.role == "request" else 502)
            return NEED_DATA
        take = min(self._remaining, len(buf))
        if take == len(buf):
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:take])
            del buf[:take]
        self._remaining -= take
        if self._remaining == 0:
            self._state = _DONE
        return Data(data)

    def _body_error(self, reason: str) -> ProtocolError:
        self._state = _CLOSED
        return ProtocolError(reason, 400 if self.role == "request" else 502)

    def _chunked_body(self) -> Event:
        buf = self._buf
        state = self._state
        if state == _CHUNK_DATA:
            if not buf:
                if self._eof:
                    raise self._body_error("connection closed inside a chunk")
                return NEED_DATA
            take = min(self._remaining, len(buf))
            data = bytes(buf[:take])
            del buf[:take]
            self._remaining -= take
            if self._remaining == 0:
                self._state = _CHUNK_CRLF
            return Data(data)
        if state == _CHUNK_CRLF:
            if len(buf) < 2:
                if self._eof or (buf and buf[0] != 13):
                    raise self._body_error("chunk data not followed by CRLF")
                return NEED_DATA
            if buf[0] != 13 or buf[1] != 10:
                raise self._body_error("chunk data not followed by CRLF (chunk size and data disagree)")
            del buf[:2]
            self._state = _CHUNK_SIZE
            return self._chunked_body()
        if state == _CHUNK_SIZE:
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > 1024:
                    raise self._body_error("chunk size line too long")
                if b"\n" in buf or (b"\r" in buf[:-1]):
                    raise self._body_error("chunk size line not terminated by CRLF")
                if self._eof:
                    raise self._body_error("connection closed inside a chunk size line")
                return NEED_DATA
            line = bytes(buf[:end])
            match = _CHUNK_LINE.fullmatch(line)
            if match is None:
                raise self._body_error(f"invalid chunk size line {line[:40]!r}")
            del buf[:end + 2]
            size = int(match.group(1), 16)
            if size == 0:
                self._state = _TRAILERS
                return self._chunked_body()
            self._remaining = size
            self._state = _CHUNK_DATA
            return self._chunked_body()
        # trailers: zero or more fields, then an empty line
        if buf[:2] == b"\r\n":
            del buf[:2]
            self._state = _HEAD
            return EndOfMessage()
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > self.max_head:
                raise self._body_error("trailer section too large")
            if (buf.count(b"\n") != buf.count(b"\r\n")) or self._eof:
                raise self._body_error("malformed or incomplete trailer section")
            return NEED_DATA
        text = buf[:end + 2].decode("latin-1")
        del buf[:end + 4]
        try:
            _check_line_endings(text, "trailer section")
            trailers = _parse_fields(text, "trailer")
        except ProtocolError as exc:
            raise self._body_error(exc.reason) from None
        self._state = _HEAD
        return EndOfMessage([(n, v) for n, v in trailers if n.lower() not in _FORBIDDEN_TRAILERS])

    def __repr__(self) -> str:
        return f"HttpReader(role={self.role!r}, state={self._state}, buffered={len(self._buf)})"


# -- writer --------------------------------------------------------------------------------

_REASONS = {100: "Continue", 101: "Switching Protocols", 200: "OK", 204: "No Content",
            304: "Not Modified", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 413: "Content Too Large", 414: "URI Too Long",
            417: "Expectation Failed", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported"}


def reason_phrase(status: int) -> str:
    return _REASONS.get(status, "")


class HttpWriter:
    """Serialises events. The body framing is taken from the head's headers: a
    `Transfer-Encoding: chunked` header means chunks, otherwise bytes go out as given
    (the caller set Content-Length or will close the connection)."""

    __slots__ = ("chunked",)

    def __init__(self) -> None:
        self.chunked = False            # the current message's body goes out in chunks

    def send(self, event) -> bytes:
        kind = type(event)
        if kind is Data:
            data = event.data
            if not data:
                return b""
            if self.chunked:
                return b"%x\r\n%b\r\n" % (len(data), data)
            return data
        if kind is EndOfMessage:
            if not self.chunked:
                return b""
            self.chunked = False
            if event.trailers:
                return ("0\r\n" + "".join(f"{n}: {v}\r\n" for n, v in event.trailers) + "\r\n").encode("latin-1")
            return b"0\r\n\r\n"
        if kind is Request:
            start = f"{event.method} {event.target} HTTP/{event.version}\r\n"
        elif kind is Response:
            if event.status < 200:
                start = f"HTTP/1.1 {event.status} {event.reason or reason_phrase(event.status)}\r\n"
                return (start + "".join(f"{n}: {v}\r\n" for n, v in event.headers) + "\r\n").encode("latin-1")
            start = f"HTTP/1.1 {event.status} {event.reason or reason_phrase(event.status)}\r\n"
        else:
            raise TypeError(f"cannot send {event!r}")
        chunked = False
        lines = [start]
        for name, value in event.headers:
            if len(name) == 17 and name.lower() == "transfer-encoding":
                chunked = True
            lines.append(f"{name}: {value}\r\n")
        lines.append("\r\n")
        self.chunked = chunked
        return "".join(lines).encode("latin-1")


def forwardable_headers(headers: list[tuple[str, str]], connection_tokens: frozenset) -> list[tuple[str, str]]:
    """End-to-end headers only: hop-by-hop fields and those named in Connection removed."""
    if connection_tokens:
        drop = HOP_BY_HOP | connection_tokens
    else:
        drop = HOP_BY_HOP
    return [(n, v) for n, v in headers if n.lower() not in drop]


def find_header(headers: list[tuple[str, str]], name: str) -> Optional[str]:
    lname = name.lower()
    for n, v in headers:
        if n.lower() == lname:
            return v
    return None


def simple_response(status: int, body: bytes, content_type: str = "application/json",
                    keep_alive: bool = True, extra_headers: tuple = ()) -> bytes:
    """A complete response Warden itself answers with (errors, denials)."""
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), *extra_headers]
    if not keep_alive:
        headers.append(("Connection", "close"))
    return HttpWriter().send(Response(status, headers)) + body
