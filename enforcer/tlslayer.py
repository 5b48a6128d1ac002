"""TLS termination over memory BIOs, shared by the HTTP and Postgres enforcers.

Both enforcers read the client's first bytes before they know TLS is coming (the HTTP
enforcer parses the ClientHello for its SNI; a PostgreSQL 17 "direct SSL" client starts with
the ClientHello instead of SSLRequest). asyncio's start_tls cannot replay bytes already read,
on the stdlib loop or uvloop, so `TlsServerTransport` drives an ssl.SSLObject over memory BIOs:
it is the raw transport's protocol below and looks like a plain transport to the protocol
above it (write, close, pause/resume reading, flow control).
"""
from __future__ import annotations

import asyncio
import ssl
from typing import Collection, Optional

READ_CHUNK = 256 * 1024


class TlsServerTransport(asyncio.Transport):
    """The decrypted side of a client connection whose TLS Warden terminates.

    Create it, make `raw_protocol` the raw transport's protocol, `feed` what was already read,
    await `handshake`; then `set_protocol` the plaintext protocol and resume reading, which
    delivers what was decrypted meanwhile. Until then, reading stays paused after the handshake.

    `accepted_alpn`: the ALPN outcomes this listener serves (None in it: no ALPN negotiated);
    any other outcome fails the handshake. Left None, every outcome is accepted and the caller
    checks `alpn` itself (e.g. to answer with a protocol-level error inside the TLS session).
    """

    def __init__(self, raw: asyncio.Transport, context: ssl.SSLContext, loop: asyncio.AbstractEventLoop,
                 accepted_alpn: Optional[Collection[Optional[str]]] = None):
        super().__init__()
        self._raw = raw
        self._accepted_alpn = None if accepted_alpn is None else tuple(accepted_alpn)
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
        accepted = self._accepted_alpn
        if accepted is not None and alpn not in accepted:
            # the agent's leaf contexts list several protocols (shared by both enforcers); a
            # client that settled on one this listener does not speak is not served
            served = " or ".join(name for name in accepted if name)
            said = f"negotiated ALPN {alpn!r}" if alpn is not None else "did not negotiate ALPN"
            self._fail(ssl.SSLError(f"client {said}; only {served} is served"))
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
