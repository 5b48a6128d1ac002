"""Workload TLS on the HTTP enforcer's listener: termination (intercept) and opaque relay (sni).

The ClientHello has already been read from the client stream (to learn the SNI) when either
mode starts, and asyncio's start_tls cannot replay bytes already read, on the stdlib loop or
uvloop. So interception runs its own TLS layer: `TlsServerTransport` drives an ssl.SSLObject
over memory BIOs, is the raw transport's protocol below, and looks like a plain transport to
the HttpSession above it (write, close, pause/resume reading, flow control).
"""
from __future__ import annotations

import asyncio
import ipaddress
import ssl
import time
import weakref
from typing import Optional

READ_CHUNK = 256 * 1024
RELAY_CHUNK = 64 * 1024
HTTP_ALPN = "http/1.1"
# leaf contexts are asked of the LocalCA again after this long, so its renewal takes effect
_LEAF_REFRESH_S = 3600.0
_LEAF_CACHE_MAX = 1024

_leaf_contexts: "weakref.WeakKeyDictionary[object, dict[str, tuple[ssl.SSLContext, float]]]" = \
    weakref.WeakKeyDictionary()


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


async def leaf_context(local_ca, name: str) -> ssl.SSLContext:
    """A server context presenting the LocalCA's leaf for `name` (a host name or an IP).

    Issuing (key generation, files) runs in a thread; contexts are cached per CA and name.
    """
    per_ca = _leaf_contexts.setdefault(local_ca, {})
    found = per_ca.get(name)
    now = time.monotonic()
    if found is not None and now - found[1] < _LEAF_REFRESH_S:
        return found[0]
    hostnames, ips = ([], [name]) if is_ip(name) else ([name], [])
    context = await asyncio.to_thread(local_ca.server_context_for, hostnames, ips)
    if len(per_ca) >= _LEAF_CACHE_MAX:
        per_ca.clear()
    per_ca[name] = (context, now)
    return context


def name_allowed(name: str, patterns) -> bool:
    """`patterns`: exact names or `*.suffix` (one label, as in certificates)."""
    for pattern in patterns:
        pattern = str(pattern).lower().rstrip(".")
        if pattern.startswith("*."):
            head, dot, rest = name.partition(".")
            if dot and head and rest == pattern[2:]:
                return True
        elif name == pattern:
            return True
    return False


class TlsServerTransport(asyncio.Transport):
    """The decrypted side of a client connection whose TLS Warden terminates.

    Create it, make `raw_protocol` the raw transport's protocol, `feed` what was already read,
    await `handshake`; then `set_protocol` the plaintext protocol and resume reading, which
    delivers what was decrypted meanwhile. Until then, reading stays paused after the handshake.
    """

    def __init__(self, raw: asyncio.Transport, context: ssl.SSLContext, loop: asyncio.AbstractEventLoop):
        super().__init__()
        self._raw = raw
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._protocol: Optional[asyncio.BaseProtocol] = None
        self.handshake: asyncio.Future = loop.create_future()
        self._plain = bytearray()        # decrypted, not yet delivered (no protocol yet, or paused)
        self._eof = False                # the client ended its stream (close_notify or FIN)
        self._eof_delivered = False
        self._paused = False
        self._closing = False
        self._error: Optional[BaseException] = None
        self.raw_protocol = _RawSide(self)

    # -- what was negotiated --------------------------------------------------------------
    @property
    def version(self) -> Optional[str]:
        return self._tls.version()

    @property
    def alpn(self) -> Optional[str]:
        return self._tls.selected_alpn_protocol()

    # -- records from the client ----------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if self._closing:
            return
        if data:
            self._incoming.write(data)
        if not self.handshake.done():
            if not self._handshake_step():
                return
        self._decrypt()
        self._deliver()

    def _handshake_step(self) -> bool:
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except (ssl.SSLError, ssl.CertificateError) as exc:
            self._flush()            # the alert says why, to clients that log it
            self._fail(exc)
            return False
        self._flush()
        alpn = self._tls.selected_alpn_protocol()
        if alpn is not None and alpn != HTTP_ALPN:
            # the agent's leaf contexts also list "postgresql" (shared with the Postgres
            # enforcer); a client that picked anything but HTTP/1.1 is not served here
            self._fail(ssl.SSLError(f"client negotiated ALPN {alpn!r}; only {HTTP_ALPN} is served"))
            return False
        self.handshake.set_result(None)
        if self._protocol is None:
            self.pause_reading()     # hold what follows until the HTTP session is attached
        return True

    def _decrypt(self) -> None:
        while not self._eof:
            try:
                chunk = self._tls.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._eof = True
                break
            except ssl.SSLError as exc:
                self._flush()
                self._fail(exc)
                return
            if not chunk:            # close_notify
                self._eof = True
                break
            self._plain += chunk
        self._flush()                # reading can produce records (TLS 1.3 key updates)

    def _deliver(self) -> None:
        protocol = self._protocol
        if protocol is None or self._paused or self._closing:
            return
        if self._plain:
            data = bytes(self._plain)
            self._plain.clear()
            protocol.data_received(data)
        if self._eof and not self._eof_delivered and not self._paused and not self._closing \
                and not self._plain:
            self._eof_delivered = True
            if not protocol.eof_received():
                self.close()

    def _raw_eof(self) -> bool:
        if not self.handshake.done():
            self._fail(ConnectionResetError("the client closed the connection during the TLS handshake"))
            return False
        self._eof = True
        self._deliver()
        return True

    def _raw_lost(self, exc: Optional[BaseException]) -> None:
        self._closing = True
        if not self.handshake.done():
            self.handshake.set_exception(exc or self._error or
                                         ConnectionResetError("connection lost during the TLS handshake"))
            return
        if self._protocol is not None:
            self._protocol.connection_lost(exc or self._error)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        if not self.handshake.done():
            self.handshake.set_exception(exc)
        self._closing = True
        self._raw.close()

    def _flush(self) -> None:
        if self._outgoing.pending:
            data = self._outgoing.read()
            if not self._raw.is_closing():
                self._raw.write(data)

    # -- asyncio.Transport, for the plaintext protocol -------------------------------------
    def write(self, data) -> None:
        if self._closing or not data:
            return
        view = memoryview(data)
        sent = 0
        try:
            while sent < len(view):
                sent += self._tls.write(view[sent:])
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        self._flush()

    def writelines(self, list_of_data) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False                 # TLS has no half-close; close_notify ends both directions

    def write_eof(self) -> None:
        raise NotImplementedError("TLS connections cannot be half-closed")

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self.handshake.done() and self._error is None:
            try:
                self._tls.unwrap()   # queues close_notify; the client's reply is not awaited
            except (ssl.SSLError, ValueError):
                pass
            self._flush()
        self._raw.close()

    def abort(self) -> None:
        self._closing = True
        self._raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self._raw.is_closing()

    def pause_reading(self) -> None:
        if not self._paused:
            self._paused = True
            if not self._raw.is_closing():
                self._raw.pause_reading()

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        self._deliver()
        if not self._paused and not self._closing and not self._raw.is_closing():
            self._raw.resume_reading()

    def is_reading(self) -> bool:
        return not self._paused and not self._closing

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> Optional[asyncio.BaseProtocol]:
        return self._protocol

    def get_extra_info(self, name: str, default=None):
        if name == "ssl_object":
            return self._tls
        if name == "cipher":
            return self._tls.cipher()
        return self._raw.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self._raw.set_write_buffer_limits(high, low)


class _RawSide(asyncio.Protocol):
    """The raw transport's protocol: records in, flow control passed up to the plaintext side."""

    def __init__(self, owner: TlsServerTransport):
        self.owner = owner

    def data_received(self, data: bytes) -> None:
        self.owner.feed(data)

    def eof_received(self) -> bool:
        return self.owner._raw_eof()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.owner._raw_lost(exc)

    def pause_writing(self) -> None:
        protocol = self.owner._protocol
        if protocol is not None:
            protocol.pause_writing()

    def resume_writing(self) -> None:
        protocol = self.owner._protocol
        if protocol is not None:
            protocol.resume_writing()


# -- sni mode: the TLS stream relayed untouched --------------------------------------------

async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: list, index: int) -> None:
    try:
        while True:
            data = await reader.read(RELAY_CHUNK)
            if not data:
                break
            counter[index] += len(data)
            writer.write(data)
            await writer.drain()     # backpressure: at most one chunk in flight per direction
    finally:
        try:
            if not writer.is_closing() and writer.can_write_eof():
                writer.write_eof()
        except (OSError, RuntimeError):
            pass


async def relay_opaque(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                       upstream_reader: asyncio.StreamReader, upstream_writer: asyncio.StreamWriter,
                       first: bytes, counts: list) -> tuple[str, Optional[str]]:
    """Relay both ways until both directions end; `counts` = [client->upstream, upstream->client].

    `first` (the ClientHello and whatever came with it) goes upstream before the relay starts.
    Returns the session's end reason and error.
    """
    counts[0] += len(first)
    upstream_writer.write(first)
    pumps = [asyncio.ensure_future(_pump(client_reader, upstream_writer, counts, 0)),
             asyncio.ensure_future(_pump(upstream_reader, client_writer, counts, 1))]
    reason, error = "closed", None
    try:
        done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            exc = task.exception()
            if exc is not None:
                # one side failed: the other would wait forever on a peer that keeps quiet
                reason, error = "reset", f"{type(exc).__name__}: {exc}"
                break
    finally:
        upstream_writer.close()
        client_writer.close()
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
    return reason, error
