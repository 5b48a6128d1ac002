"""Sans-IO reader of a TLS ClientHello: what a workload asks for before any TLS runs.

Used to route a client connection that starts with a TLS record (first byte 0x16): the
server name (SNI) decides which leaf certificate to present or, without interception, what
policy judges. Framing follows RFC 8446 §5.1 (records), §4 (handshake messages), §4.1.2
(ClientHello, also the TLS 1.2 layout) and RFC 6066 §3 (server_name).

Every length is checked against what encloses it; anything malformed, ambiguous or oversized
raises TlsHelloError and the caller closes the connection. No bytes are ever answered from here.
"""
from __future__ import annotations

import dataclasses
import ipaddress
from typing import Optional

CONTENT_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
RECORD_HEADER = 5
MAX_RECORD_PAYLOAD = 1 << 14          # RFC 8446 §5.1: a plaintext fragment is at most 2^14 bytes
DEFAULT_MAX_HELLO = 64 * 1024         # real hellos are a few KiB, even with post-quantum key shares

EXT_SERVER_NAME = 0
EXT_ALPN = 16
EXT_SUPPORTED_VERSIONS = 43
NAME_TYPE_HOST = 0
MAX_HOSTNAME = 253
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


class TlsHelloError(Exception):
    """The bytes are not a well-formed ClientHello; the connection must be closed."""


@dataclasses.dataclass(frozen=True)
class ClientHello:
    server_name: Optional[str]          # lower-case host name, None when the client sent no SNI
    alpn_protocols: tuple[str, ...]     # offered ALPN protocol names, in the client's order
    versions: tuple[int, ...]           # offered protocol versions (0x0304 = TLS 1.3)
    record_bytes: int                   # stream bytes taken by the records carrying the hello


def looks_like_tls(data: bytes) -> bool:
    """A TLS connection starts with a handshake record; no HTTP method starts with 0x16."""
    return data[:1] == b"\x16"


class ClientHelloReader:
    """Feed client bytes until `feed` returns the ClientHello (None: more bytes are needed).

    The hello may be split across several handshake records; its total size is bounded by
    `max_hello`. Bytes after the records carrying the hello are left alone (`record_bytes`
    says where they start).
    """

    def __init__(self, max_hello: int = DEFAULT_MAX_HELLO):
        self.max_hello = max_hello
        self._buffer = bytearray()
        self._offset = 0                  # start of the first record not yet taken
        self._handshake = bytearray()     # handshake bytes gathered from the records so far
        self._expected: Optional[int] = None
        self.hello: Optional[ClientHello] = None

    def feed(self, data: bytes) -> Optional[ClientHello]:
        if self.hello is not None:
            return self.hello
        self._buffer += data
        while True:
            available = len(self._buffer) - self._offset
            if available < RECORD_HEADER:
                return None
            header = self._buffer[self._offset:self._offset + RECORD_HEADER]
            if header[0] != CONTENT_HANDSHAKE:
                raise TlsHelloError(f"expected a handshake record, got content type {header[0]}")
            if header[1] != 3 or header[2] > 4:
                raise TlsHelloError(f"unknown record version {header[1]}.{header[2]}")
            length = int.from_bytes(header[3:5], "big")
            if length == 0:
                raise TlsHelloError("empty handshake record")       # forbidden by RFC 8446 §5.1
            if length > MAX_RECORD_PAYLOAD:
                raise TlsHelloError(f"record length {length} exceeds {MAX_RECORD_PAYLOAD}")
            if available < RECORD_HEADER + length:
                return None
            start = self._offset + RECORD_HEADER
            self._handshake += self._buffer[start:start + length]
            self._offset = start + length
            if self._expected is None and len(self._handshake) >= 4:
                if self._handshake[0] != HANDSHAKE_CLIENT_HELLO:
                    raise TlsHelloError(f"first handshake message is type {self._handshake[0]}, "
                                        f"not a ClientHello")
                self._expected = 4 + int.from_bytes(self._handshake[1:4], "big")
                if self._expected > self.max_hello:
                    raise TlsHelloError(f"ClientHello of {self._expected} bytes exceeds {self.max_hello}")
            if self._expected is not None and len(self._handshake) >= self._expected:
                if len(self._handshake) > self._expected:
                    # nothing may share the hello's records: the client must wait for the server
                    raise TlsHelloError("bytes after the ClientHello inside its handshake records")
                parsed = parse_client_hello(bytes(self._handshake[4:]))
                self.hello = dataclasses.replace(parsed, record_bytes=self._offset)
                self._buffer = bytearray()
                return self.hello
            if len(self._handshake) > self.max_hello:
                raise TlsHelloError(f"ClientHello exceeds {self.max_hello} bytes")


class _Cursor:
    """Bounds-checked reads over one length-delimited piece of the hello."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, start: int = 0, end: Optional[int] = None):
        self.data = data
        self.pos = start
        self.end = len(data) if end is None else end

    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, count: int, what: str) -> bytes:
        if count > self.end - self.pos:
            raise TlsHelloError(f"truncated {what}")
        piece = self.data[self.pos:self.pos + count]
        self.pos += count
        return piece

    def take_all(self) -> bytes:
        return self.take(self.end - self.pos, "vector")

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def vector(self, length_size: int, what: str, minimum: int = 0, maximum: Optional[int] = None) -> "_Cursor":
        """The next vector (length prefix of `length_size` bytes) as its own cursor."""
        length = self.uint(length_size, f"{what} length")
        if length < minimum or (maximum is not None and length > maximum):
            raise TlsHelloError(f"{what} length {length} out of range")
        if length > self.end - self.pos:
            raise TlsHelloError(f"{what} length {length} runs past its enclosing data")
        inner = _Cursor(self.data, self.pos, self.pos + length)
        self.pos += length
        return inner

    def expect_end(self, what: str) -> None:
        if self.pos != self.end:
            raise TlsHelloError(f"{self.end - self.pos} unexpected bytes after {what}")


def parse_client_hello(body: bytes) -> ClientHello:
    """The ClientHello's fields Warden routes on, from the handshake message body."""
    cursor = _Cursor(body)
    legacy_version = cursor.uint(2, "client version")
    if legacy_version >> 8 != 3:
        raise TlsHelloError(f"unknown client version {legacy_version:#06x}")
    cursor.take(32, "random")
    cursor.vector(1, "session id", maximum=32)
    suites = cursor.vector(2, "cipher suites", minimum=2)
    if suites.remaining() % 2:
        raise TlsHelloError("odd cipher suites length")
    cursor.vector(1, "compression methods", minimum=1)
    server_name: Optional[str] = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = (legacy_version,)
    if cursor.remaining():       # a TLS 1.2 hello may end here; otherwise the extensions fill the rest
        extensions = cursor.vector(2, "extensions")
        cursor.expect_end("the extensions")
        seen: set[int] = set()
        while extensions.remaining():
            ext_type = extensions.uint(2, "extension type")
            data = extensions.vector(2, f"extension {ext_type}")
            if ext_type in seen:
                raise TlsHelloError(f"extension {ext_type} appears twice")   # RFC 8446 §4.2
            seen.add(ext_type)
            if ext_type == EXT_SERVER_NAME:
                server_name = _server_name(data)
            elif ext_type == EXT_ALPN:
                alpn = _alpn(data)
            elif ext_type == EXT_SUPPORTED_VERSIONS:
                versions = _versions(data)
    return ClientHello(server_name, alpn, versions, 0)


def _server_name(data: _Cursor) -> str:
    names = data.vector(2, "server name list", minimum=1)
    data.expect_end("the server name list")
    host: Optional[str] = None
    while names.remaining():
        name_type = names.uint(1, "server name type")
        name = names.vector(2, "server name", minimum=1).take_all()
        if name_type != NAME_TYPE_HOST:
            # only host_name is defined; another type's layout is unknown, so it cannot be skipped
            raise TlsHelloError(f"unknown server name type {name_type}")
        if host is not None:
            raise TlsHelloError("more than one host name in server_name")     # RFC 6066 §3
        host = valid_hostname(name)
    if host is None:
        raise TlsHelloError("empty server_name")
    return host


def _alpn(data: _Cursor) -> tuple[str, ...]:
    protocols = data.vector(2, "ALPN list", minimum=2)
    data.expect_end("the ALPN list")
    offered = []
    while protocols.remaining():
        offered.append(protocols.vector(1, "ALPN protocol", minimum=1).take_all().decode("latin-1"))
    return tuple(offered)


def _versions(data: _Cursor) -> tuple[int, ...]:
    listed = data.vector(1, "supported versions", minimum=2)
    data.expect_end("the supported versions")
    if listed.remaining() % 2:
        raise TlsHelloError("odd supported versions length")
    return tuple(listed.uint(2, "version") for _ in range(listed.remaining() // 2))


def valid_hostname(raw: bytes) -> str:
    """A DNS host name as RFC 6066 allows in SNI: ASCII (IDNs as A-labels), no trailing dot,
    not an IP literal. Returned lower-case."""
    try:
        name = raw.decode("ascii").lower()
    except UnicodeDecodeError:
        raise TlsHelloError("server name is not ASCII") from None
    if len(name) > MAX_HOSTNAME:
        raise TlsHelloError(f"server name longer than {MAX_HOSTNAME} characters")
    labels = name.split(".")
    if any(not label or len(label) > 63 or not set(label) <= _HOST_CHARS for label in labels):
        raise TlsHelloError(f"invalid server name {name!r}")
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    raise TlsHelloError(f"server name {name!r} is an IP address")
