"""The Postgres session state machine: fed client bytes and server bytes, returns actions. No I/O.

Actions are `(kind, payload)` tuples, executed in order by the asyncio shell (proxy.py):

    TO_SERVER  bytes                      write to the upstream
    TO_CLIENT  bytes                      write to the client
    EVENT      (event_type, fields)       record an event
    DECIDE     DecisionRequest            ask policy; then call `resume(verdicts)` and run its actions.
                                          Client input is held (not processed) until then.
    CONNECT_UPSTREAM  bytes               open the upstream (TLS per target), then send these startup bytes
    START_CLIENT_TLS  None                run the TLS handshake on the client leg, then `client_tls_established()`
    CANCEL     (pid, key)                 the client sent a CancelRequest carrying this (client-facing) key
    REGISTER_CANCEL_KEY (client_pid, client_key, server_pid, server_key)
    CLOSE      reason                     flush pending writes and close both legs

Unchanged messages are forwarded as slices of the received bytes; consecutive forwarded
messages are coalesced into one write.

Denials: the denied statement never reaches the server. So that the *server's* transaction
state ends up exactly as if the statement had failed there (an explicit transaction becomes
aborted, an implicit one is rolled back, later statements of a pipeline are skipped), the
enforcer sends in its place a DO block that raises SQLSTATE 42501 with the denial message:
- simple Query: the whole Query message is replaced (none of its statements run — a
  multi-statement string is all-or-nothing under Warden, which is stricter than Postgres);
- extended protocol: the denied Parse is replaced by Parse/Bind/Execute of the DO block on
  the unnamed statement and portal; their ParseComplete/BindComplete are swallowed, the
  client's following messages are discarded until Sync, and Sync is forwarded so the
  server answers ReadyForQuery with the true transaction status.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import struct
import time
from typing import Any, Callable, Optional

from . import protocol as P

TO_SERVER = 1
TO_CLIENT = 2
EVENT = 3
DECIDE = 4
CONNECT_UPSTREAM = 5
START_CLIENT_TLS = 6
CANCEL = 7
REGISTER_CANCEL_KEY = 8
CLOSE = 9

# phases
STARTUP = "startup"
TLS_HANDSHAKE = "tls_handshake"
AUTH = "auth"
READY = "ready"
CLOSED = "closed"

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_STARTUP_PACKET = 10000          # same limit as the server's
_SERVER_MAX_MESSAGE_BYTES = (1 << 30) + 1024

_I32 = struct.Struct("!i")
_unpack_i32 = _I32.unpack_from
_pack_i32 = _I32.pack

# client message types allowed once authenticated (anything else is a protocol violation)
_CLIENT_FORWARD_TYPES = frozenset(b"HDCdcfF")


@dataclasses.dataclass
class DecisionRequest:
    sql: str
    protocol: str                 # simple | extended
    statement_name: Optional[str]


@dataclasses.dataclass
class Verdict:
    """The final decision for one statement (after approvals), as the session needs it."""
    allowed: bool
    text: str
    action: Optional[str] = None
    kind: Optional[str] = None
    tables: tuple = ()
    functions: tuple = ()
    decision: str = "allow"        # allow | deny
    policy_ids: tuple = ()
    reason: str = ""


class _Result:
    """One expected statement result (an Execute, or one statement of a simple Query)."""
    __slots__ = ("text", "start_ns", "rows", "nbytes", "batch", "denied")

    def __init__(self, text: Optional[str], start_ns: int, batch: int, denied: bool = False):
        self.text = text
        self.start_ns = start_ns
        self.rows = 0
        self.nbytes = 0
        self.batch = batch
        self.denied = denied


def _quote_literal(s: str) -> str:
    # E'' works whatever standard_conforming_strings says
    return "E'" + s.replace("\\", "\\\\").replace("'", "''") + "'"


def denial_message(identity: str, target: str, verdict: Verdict) -> str:
    policies = ", ".join(verdict.policy_ids) if verdict.policy_ids else "default deny"
    msg = (f'permission denied by Warden: identity "{identity}" may not perform '
           f'{verdict.action or "this statement"} on target "{target}" (policy: {policies})')
    if verdict.reason:
        msg += f": {verdict.reason}"
    return msg


def denial_do_block(message: str) -> str:
    """SQL that makes the server itself raise 42501 with `message` (aborting the transaction like any error)."""
    body = ("BEGIN RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = "
            + _quote_literal(message) + "; END")
    tag = "$warden$"
    while tag in body:
        tag = "$warden" + os.urandom(4).hex() + "$"
    return f"DO {tag}{body}{tag}"


def render_params(bind: P.BindMessage) -> list:
    """Bind parameters as recorded: text format decoded, binary format as hex '\\x..'."""
    fmts = bind.param_formats
    out = []
    for i, v in enumerate(bind.params):
        if v is None:
            out.append(None)
            continue
        fmt = fmts[0] if len(fmts) == 1 else (fmts[i] if i < len(fmts) else 0)
        if fmt == 0:
            out.append(v.decode("utf-8", "replace"))
        else:
            out.append("\\x" + v.hex())
    return out


class PostgresSession:
    def __init__(self, *, identity: str = "", target: str = "",
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 client_tls_available: bool = False, masking: Any = None,
                 clock: Callable[[], int] = time.perf_counter_ns,
                 random_bytes: Callable[[int], bytes] = os.urandom,
                 start_fields: Optional[dict] = None):
        self.identity = identity
        self.target = target
        self.max_message_bytes = max_message_bytes
        self.client_tls_available = client_tls_available
        self.masking = masking
        self.clock = clock
        self.random_bytes = random_bytes
        self.start_fields = dict(start_fields or {})

        self.phase = STARTUP
        self.tls_client = False
        self.tls_upstream = False
        self.startup_params: dict = {}
        self.auth_method: Optional[str] = None
        self.transaction_status = "I"
        self.server_key: Optional[tuple[int, bytes]] = None
        self.client_key: Optional[tuple[int, bytes]] = None
        self.end_reason: Optional[str] = None

        self._cbuf = b""
        self._sbuf = b""
        self._pending: Optional[tuple] = None      # held client message awaiting resume()
        self._discard_until_sync = False
        self._terminated = False
        # per forwarded message that the server answers with ParseComplete/BindComplete/ReadyForQuery:
        # (expected type byte, injected-by-us); lets us swallow replies to our own injected messages
        self._expect: collections.deque = collections.deque()
        self._results: collections.deque = collections.deque()
        self._statements: dict[str, tuple] = {}    # prepared statement name -> (text, Verdict)
        self._portals: dict[str, Optional[str]] = {}
        self._unnamed_portal: Optional[str] = None
        self._client_batch = 0                     # Sync/Query messages sent
        self._server_batch = 0                     # ReadyForQuery received
        self._mask_plan = None
        self._started_ns = clock()
        self._start_emitted = False
        self._end_emitted = False
        self.statements = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.last_sqlstate: Optional[str] = None

    # ================================================================================
    # public API
    # ================================================================================
    def feed_client(self, data: bytes) -> list:
        self.bytes_in += len(data)
        if self.phase == CLOSED:
            return []
        self._cbuf = self._cbuf + data if self._cbuf else bytes(data)
        if self._pending is not None:
            return []          # held until resume()
        if self.phase == TLS_HANDSHAKE:
            # bytes after SSLRequest and before the handshake: a known injection (CVE-2021-23214)
            return self._fatal("08P01", "received unencrypted data after SSL request", "tls_injection")
        return self._process_client()

    def feed_server(self, data: bytes) -> list:
        if self.phase == CLOSED:
            return []
        buf = self._sbuf + data if self._sbuf else data
        self._sbuf = b""
        return self._process_server(buf)

    def client_tls_established(self) -> list:
        self.tls_client = True
        self.phase = STARTUP
        if self._cbuf:
            return self._process_client()
        return []

    def resume(self, verdicts: list[Verdict]) -> list:
        """Continue after a DECIDE action with the final verdict per statement."""
        pending = self._pending
        if pending is None:
            raise RuntimeError("resume() without a pending decision")
        self._pending = None
        out: list = []
        kind = pending[0]
        if kind == "Q":
            self._resume_query(pending, verdicts, out)
        else:
            self._resume_parse(pending, verdicts, out)
        if self.phase != CLOSED and self._pending is None:
            out += self._process_client()
        return out

    def fatal(self, sqlstate: str, message: str, reason: str) -> list:
        """Error the connection from outside (timeouts, upstream failures)."""
        return self._fatal(sqlstate, message, reason)

    def finish(self, reason: str) -> list:
        """Session end (idempotent): returns the session.start (if never sent) and session.end events."""
        out: list = []
        if self._end_emitted:
            return out
        self._end_emitted = True
        if self.end_reason is None:
            self.end_reason = reason
        self._emit_start(out)
        # statements still waiting for a result never got one
        while self._results:
            self._emit_result(out, self._results.popleft(), None, "connection closed before the statement completed", None)
        out.append((EVENT, ("session.end", {
            "reason": self.end_reason,
            "duration_us": (self.clock() - self._started_ns) // 1000,
            "statements": self.statements,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "sqlstate": self.last_sqlstate,
        })))
        self.phase = CLOSED
        return out

    @property
    def waiting_for_decision(self) -> bool:
        return self._pending is not None

    # ================================================================================
    # client side
    # ================================================================================
    def _process_client(self) -> list:
        out: list = []
        while self.phase == STARTUP and self._cbuf and self.phase != CLOSED:
            if not self._process_startup(out):
                return out
        if self.phase in (AUTH, READY):
            self._process_messages(out)
        return out

    def _process_startup(self, out: list) -> bool:
        """Handle one startup-phase packet; False when more bytes are needed or the phase changed."""
        buf = self._cbuf
        if buf[0] == P.TLS_HANDSHAKE_BYTE:
            # PG17 direct SSL: a TLS ClientHello instead of SSLRequest
            if self.client_tls_available and not self.tls_client:
                self.phase = TLS_HANDSHAKE
                out.append((START_CLIENT_TLS, "direct"))
                return False
            out += self._fatal("08P01", "direct TLS connection is not enabled on this Warden target", "protocol_error")
            return False
        if len(buf) < 8:
            return False
        length = _unpack_i32(buf, 0)[0]
        if length < 8 or length > MAX_STARTUP_PACKET:
            out += self._fatal("08P01", f"invalid startup packet length {length}", "protocol_error")
            return False
        if len(buf) < length:
            return False
        packet, self._cbuf = buf[:length], buf[length:]
        try:
            pkt = P.parse_startup_packet(packet)
        except P.ProtocolError as e:
            out += self._fatal("08P01", f"invalid startup packet: {e}", "protocol_error")
            return False
        if pkt.kind == "ssl":
            if self.client_tls_available and not self.tls_client:
                if self._cbuf:
                    out += self._fatal("08P01", "received unencrypted data after SSL request", "tls_injection")
                    return False
                out.append((TO_CLIENT, b"S"))
                self.bytes_out += 1
                self.phase = TLS_HANDSHAKE
                out.append((START_CLIENT_TLS, "sslrequest"))
                return False
            out.append((TO_CLIENT, b"N"))
            self.bytes_out += 1
            return True
        if pkt.kind == "gssenc":
            out.append((TO_CLIENT, b"N"))
            self.bytes_out += 1
            return True
        if pkt.kind == "cancel":
            out.append((CANCEL, (pkt.cancel_pid, pkt.cancel_key)))
            self.end_reason = "cancel_request"
            out.append((CLOSE, "cancel_request"))
            self.phase = CLOSED
            return False
        # StartupMessage
        if pkt.major != 3:
            out += self._fatal("0A000", f"unsupported frontend protocol {pkt.major}.{pkt.minor}: "
                                        "server supports 3.0", "protocol_error")
            return False
        params = pkt.params
        unrecognized = [k for k in params if k.startswith("_pq_.")]
        if pkt.minor != 0 or unrecognized:
            # we speak 3.0 only: tell the client, and ask the server for plain 3.0
            out.append((TO_CLIENT, P.build_negotiate_protocol_version(0, unrecognized)))
            params = {k: v for k, v in params.items() if not k.startswith("_pq_.")}
            packet = P.build_startup_message(params, P.PROTOCOL_3_0)
        if "user" not in params:
            out += self._fatal("28000", "no PostgreSQL user name specified in startup packet", "protocol_error")
            return False
        self.startup_params = params
        self.phase = AUTH
        out.append((CONNECT_UPSTREAM, bytes(packet)))
        return False

    def _process_messages(self, out: list) -> None:
        buf = self._cbuf
        n = len(buf)
        pos = 0
        run = 0          # start of the pending forward run
        limit = self.max_message_bytes
        expect = self._expect
        ready = self.phase == READY
        while n - pos >= 5:
            t = buf[pos]
            length = _unpack_i32(buf, pos + 1)[0]
            if length < 4 or length > limit:
                if run < pos:
                    out.append((TO_SERVER, buf[run:pos]))
                self._cbuf = b""
                if length < 4:
                    out += self._fatal("08P01", f"invalid message length {length}", "protocol_error")
                else:
                    out += self._fatal("08P01", f"message of {length} bytes exceeds the limit of {limit} "
                                                f"bytes (target option max_message_bytes)", "message_too_large")
                return
            end = pos + 1 + length
            if end > n:
                break
            if self._discard_until_sync:
                if run < pos:
                    out.append((TO_SERVER, buf[run:pos]))
                if t == 83:  # 'S' Sync: forwarded so the server answers ReadyForQuery with the true status
                    self._discard_until_sync = False
                    expect.append((90, False))
                    self._client_batch += 1
                    run = pos
                else:
                    run = end
                pos = end
                continue
            if not ready:
                if t == 112 or t == 88:   # 'p' password/SASL, 'X' Terminate
                    if t == 88:
                        self._terminated = True
                    pos = end
                    continue
                if run < pos:
                    out.append((TO_SERVER, buf[run:pos]))
                self._cbuf = b""
                out += self._fatal("08P01", f"unexpected message type {chr(t)!r} during authentication",
                                   "protocol_error")
                return
            if t == 66:          # 'B' Bind
                try:
                    bind = P.parse_bind(buf[pos + 5:end])
                except P.ProtocolError as e:
                    return self._client_protocol_error(out, buf, run, pos, e)
                expect.append((50, False))
                self._record_bind(bind, out)
            elif t == 69:        # 'E' Execute
                nul = buf.find(b"\0", pos + 5, end)
                portal = buf[pos + 5:nul] if nul > 0 else b""
                text = self._portals.get(portal.decode("utf-8", "replace")) if portal else self._unnamed_portal
                self._results.append(_Result(text, self.clock(), self._client_batch))
            elif t == 83:        # 'S' Sync
                expect.append((90, False))
                self._client_batch += 1
            elif t == 81 or t == 80:   # 'Q' Query, 'P' Parse: need a decision
                if run < pos:
                    out.append((TO_SERVER, buf[run:pos]))
                msg = buf[pos:end]
                self._cbuf = buf[end:]
                try:
                    if t == 81:
                        sql = P.parse_query(msg[5:])
                        self._pending = ("Q", msg, sql)
                        out.append((DECIDE, DecisionRequest(sql, "simple", None)))
                    else:
                        parse = P.parse_parse(msg[5:])
                        self._pending = ("P", msg, parse)
                        out.append((DECIDE, DecisionRequest(parse.query, "extended", parse.name)))
                except P.ProtocolError as e:
                    self._pending = None
                    return self._client_protocol_error(out, msg, 0, 0, e)
                return
            elif t == 88:        # 'X' Terminate
                self._terminated = True
            elif t == 70:        # 'F' FunctionCall: answered with ReadyForQuery like a simple query
                expect.append((90, False))
                self._client_batch += 1
                self._results.append(_Result("<function call>", self.clock(), self._client_batch - 1))
            elif t not in _CLIENT_FORWARD_TYPES:
                return self._client_protocol_error(out, buf, run, pos,
                                                   P.ProtocolError(f"unknown message type {chr(t)!r}"))
            pos = end
        if run < pos:
            out.append((TO_SERVER, buf if (run == 0 and pos == n) else buf[run:pos]))
        self._cbuf = buf[pos:] if pos < n else b""

    def _client_protocol_error(self, out, buf, run, pos, err) -> None:
        if run < pos:
            out.append((TO_SERVER, buf[run:pos]))
        self._cbuf = b""
        out += self._fatal("08P01", f"invalid frontend message: {err}", "protocol_error")

    def _record_bind(self, bind: P.BindMessage, out: list) -> None:
        text, verdict = self._statements.get(bind.statement, (None, None))
        if bind.portal:
            self._portals[bind.portal] = text
        else:
            self._unnamed_portal = text
        self.statements += 1
        out.append((EVENT, ("pg.statement", self._statement_fields(
            text, render_params(bind), verdict, "extended", bind.statement))))

    def _statement_fields(self, text, params, verdict: Optional[Verdict], protocol: str, name) -> dict:
        if verdict is None:
            return {"text": text, "params": params, "kind": None, "action": None, "tables": [],
                    "functions": [], "decision": "allow", "policy_ids": [], "protocol": protocol,
                    "statement_name": name}
        return {"text": text if text is not None else verdict.text, "params": params,
                "kind": verdict.kind, "action": verdict.action, "tables": list(verdict.tables),
                "functions": list(verdict.functions), "decision": verdict.decision,
                "policy_ids": list(verdict.policy_ids), "protocol": protocol, "statement_name": name}

    def _resume_query(self, pending, verdicts: list[Verdict], out: list) -> None:
        _, msg, sql = pending
        denied = next((v for v in verdicts if not v.allowed), None)
        batch = self._client_batch
        self._client_batch += 1
        self._expect.append((90, False))
        now = self.clock()
        if not verdicts:
            verdicts = [Verdict(True, sql)]
        if denied is None:
            for v in verdicts:
                self.statements += 1
                out.append((EVENT, ("pg.statement", self._statement_fields(v.text, None, v, "simple", None))))
                self._results.append(_Result(v.text, now, batch))
            out.append((TO_SERVER, msg))
            return
        for v in verdicts:
            self.statements += 1
            out.append((EVENT, ("pg.statement", self._statement_fields(v.text, None, v, "simple", None))))
            if v is denied:
                break
        message = denial_message(self.identity, self.target, denied)
        self._results.append(_Result(denied.text, now, batch, denied=True))
        out.append((TO_SERVER, P.build_query(denial_do_block(message))))

    def _resume_parse(self, pending, verdicts: list[Verdict], out: list) -> None:
        _, msg, parse = pending
        if not verdicts:
            verdicts = [Verdict(True, parse.query)]
        denied = next((v for v in verdicts if not v.allowed), None)
        verdict = denied or verdicts[0]
        if denied is None:
            self._statements[parse.name] = (parse.query, verdict)
            self._expect.append((49, False))
            out.append((TO_SERVER, msg))
            return
        self.statements += 1
        out.append((EVENT, ("pg.statement", self._statement_fields(parse.query, None, denied, "extended",
                                                                     parse.name))))
        message = denial_message(self.identity, self.target, denied)
        self._statements.pop(parse.name, None)
        self._expect.append((49, True))
        self._expect.append((50, True))
        self._results.append(_Result(parse.query, self.clock(), self._client_batch, denied=True))
        out.append((TO_SERVER, P.build_parse("", denial_do_block(message)) + P.build_bind("", "")
                    + P.build_execute("", 0)))
        self._discard_until_sync = True

    # ================================================================================
    # server side
    # ================================================================================
    def _process_server(self, buf: bytes) -> list:
        out: list = []
        n = len(buf)
        pos = 0
        run = 0
        results = self._results
        plan = self._mask_plan
        while n - pos >= 5:
            t = buf[pos]
            length = _unpack_i32(buf, pos + 1)[0]
            if length < 4 or length > _SERVER_MAX_MESSAGE_BYTES:
                out += self._fatal("08P01", f"upstream sent an invalid message length {length}", "upstream_protocol_error")
                return out
            end = pos + 1 + length
            if end > n:
                break
            if t == 68:                      # 'D' DataRow
                if results:
                    r = results[0]
                    r.rows += 1
                    r.nbytes += length
                if plan is not None:
                    masked = plan.mask_data_row(buf[pos + 5:end])
                    if masked is not None and masked != buf[pos + 5:end]:
                        if run < pos:
                            out.append((TO_CLIENT, buf[run:pos]))
                        out.append((TO_CLIENT, b"D" + _pack_i32(len(masked) + 4) + masked))
                        run = end
            elif t == 100:                   # 'd' CopyData (COPY TO STDOUT)
                if results:
                    r = results[0]
                    r.nbytes += length
            elif t == 67 or t == 73 or t == 115:   # CommandComplete, EmptyQueryResponse, PortalSuspended
                self._mask_plan = plan = None
                if results:
                    tag = (P.parse_command_complete(buf[pos + 5:end]) if t == 67
                           else ("" if t == 73 else "PORTAL SUSPENDED"))
                    self._emit_result(out, results.popleft(), tag, None, None)
            elif t == 90:                    # 'Z' ReadyForQuery
                self._mask_plan = plan = None
                self.transaction_status = chr(buf[pos + 5]) if length == 5 else "?"
                self._server_batch += 1
                expect = self._expect
                while expect:
                    if expect.popleft()[0] == 90:
                        break
                # statements of this batch skipped after an error never produce a result
                while results and results[0].batch < self._server_batch:
                    self._emit_result(out, results.popleft(), None, "not executed: an earlier statement "
                                      "in the same batch failed", None)
                if self.phase == AUTH:
                    self.phase = READY
                    if run < pos:
                        out.append((TO_CLIENT, buf[run:pos]))
                    run = pos
                    self._emit_start(out)
            elif t == 49 or t == 50:         # ParseComplete / BindComplete
                expect = self._expect
                if expect and expect[0][0] == t:
                    if expect.popleft()[1]:
                        if run < pos:
                            out.append((TO_CLIENT, buf[run:pos]))
                        run = end            # reply to our injected message: swallow
            elif t == 84:                    # 'T' RowDescription
                if self.masking is not None:
                    try:
                        fields = P.parse_row_description(buf[pos + 5:end])
                    except P.ProtocolError as e:
                        out += self._fatal("08P01", f"upstream sent a malformed RowDescription: {e}",
                                           "upstream_protocol_error")
                        return out
                    self._mask_plan = plan = self.masking.plan_for(fields)
            elif t == 69:                    # 'E' ErrorResponse
                self._mask_plan = plan = None
                try:
                    fields = P.parse_error_fields(buf[pos + 5:end])
                except P.ProtocolError:
                    fields = {}
                sqlstate = fields.get("C")
                self.last_sqlstate = sqlstate
                if results:
                    self._emit_result(out, results.popleft(), None, fields.get("M"), sqlstate)
            elif t == 82 and self.phase == AUTH:    # 'R' Authentication
                replacement = self._on_authentication(buf[pos + 5:end])
                if replacement is not None:
                    if run < pos:
                        out.append((TO_CLIENT, buf[run:pos]))
                    out.append((TO_CLIENT, replacement))
                    run = end
            elif t == 75:                    # 'K' BackendKeyData: the client gets our key, we keep the server's
                try:
                    spid, skey = P.parse_backend_key_data(buf[pos + 5:end])
                except P.ProtocolError as e:
                    out += self._fatal("08P01", f"upstream sent malformed BackendKeyData: {e}", "upstream_protocol_error")
                    return out
                self.server_key = (spid, skey)
                cpid = int.from_bytes(self.random_bytes(4), "big") & 0x7FFFFFFF or 1
                ckey = self.random_bytes(len(skey))
                self.client_key = (cpid, ckey)
                out.append((REGISTER_CANCEL_KEY, (cpid, ckey, spid, skey)))
                if run < pos:
                    out.append((TO_CLIENT, buf[run:pos]))
                out.append((TO_CLIENT, P.build_backend_key_data(cpid, ckey)))
                run = end
            pos = end
        if run < pos:
            chunk = buf if (run == 0 and pos == n) else buf[run:pos]
            out.append((TO_CLIENT, chunk))
        if pos < n:
            self._sbuf = buf[pos:]
        for kind, payload in out:
            if kind == TO_CLIENT:
                self.bytes_out += len(payload)
        return out

    def _on_authentication(self, body: bytes) -> Optional[bytes]:
        """Track the auth method; strip SCRAM -PLUS mechanisms (channel binding cannot cross a re-originated TLS)."""
        try:
            req = P.parse_authentication(body)
        except P.ProtocolError:
            return None
        if self.auth_method is None:
            self.auth_method = P.AUTH_METHOD_NAMES.get(req.code, f"code-{req.code}")
        if req.code == P.AUTH_SASL:
            mechs = [m for m in req.mechanisms if not m.endswith("-PLUS")]
            if mechs != req.mechanisms:
                return P.build_authentication_sasl(mechs)
        return None

    def _emit_start(self, out: list) -> None:
        if self._start_emitted:
            return
        self._start_emitted = True
        fields = dict(self.start_fields)
        fields.update({
            "database": self.startup_params.get("database", self.startup_params.get("user")),
            "user": self.startup_params.get("user"),
            "application_name": self.startup_params.get("application_name"),
            "tls_client": self.tls_client,
            "tls_upstream": self.tls_upstream,
            "auth_method": self.auth_method,
        })
        out.append((EVENT, ("session.start", fields)))

    def _emit_result(self, out: list, r: _Result, tag, error, sqlstate) -> None:
        rows = r.rows
        if tag and not rows:
            rows = P.rows_from_tag(tag) or 0
        out.append((EVENT, ("pg.result", {
            "tag": tag, "rows": rows, "bytes": r.nbytes,
            "duration_us": (self.clock() - r.start_ns) // 1000,
            "sqlstate": sqlstate, "error": error,
        })))

    # ================================================================================
    def _fatal(self, sqlstate: str, message: str, reason: str) -> list:
        out: list = []
        if self.phase == CLOSED:
            return out
        self.last_sqlstate = sqlstate
        self.end_reason = reason
        err = P.build_error_response(sqlstate, message, severity="FATAL")
        self.bytes_out += len(err)
        out.append((TO_CLIENT, err))
        out.append((CLOSE, reason))
        out += self.finish(reason)
        self.phase = CLOSED
        return out

    @property
    def terminated(self) -> bool:
        return self._terminated
