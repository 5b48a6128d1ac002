"""asyncio shell around the sans-IO HTTP core: moves bytes, asks policy, records, injects secrets.

`serve_http(reader, writer, ctx)` serves one accepted client connection to its end. It takes
over the stream's transport and drives the session from protocol callbacks: each read is fed
straight to the sans-IO parser and every event it yields is handled in the same call, so a
request costs no coroutine switch (the stream-based version spent most of its time in them).
Only slow, rare steps run as tasks: connecting upstream, waiting for an approval.

Requests are handled in arrival order (pipelined requests wait in the parser, so responses
keep their order); each one is parsed strictly, recorded, decided, re-serialised with
normalised framing and sent over one upstream connection kept alive between requests.
Backpressure goes both ways: a full upstream send buffer pauses reading from the client, a
full client send buffer pauses reading from the upstream.

Target options (ctx.target.options, from agent.yaml):
  credentials: {header, value_file, scheme}   brokered credential (enforcer/http/credentials.py)
  redact_headers: [names], redact_query: [names]   recorded as "[redacted]" on top of the defaults
  allow_connect: false          CONNECT is refused unless true
  max_header_bytes: 65536, max_line_bytes: 8192
  connect_timeout: 10, response_timeout: 120 (seconds from the end of the request body until the
                                upstream's response head; past it the client gets a 504)
  mask_max_body_bytes: 8 MiB    larger maskable responses are refused (never sent unmasked); which
                                responses are maskable is the masking layer's call (http_body_kind)
  discard_denied_body_bytes: 1 MiB   a denied request's body up to this is read and dropped to
                                keep the connection; larger ones close it
  client_tls: refuse | intercept | sni   what to do with a workload that speaks TLS (HTTPS) to
                                the target; with client_tls_hostname, client_tls_names and
                                client_hello_timeout (see "workload TLS" below serve_http)
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import ssl
import time
import zlib
from typing import Any, Optional

from enforcer.context import STOPPING_POLL_S, ConnectionContext, UpstreamTLS, agent_stopping, cancelled_reason

from ..durable import DEFAULT_DURABLE_TIMEOUT, not_forwarded, records_durable
from ..masking.engine import http_body_kind
from ..masking.pgrow import MaskingRefused
from ..policy.cachekeys import cache_base
from ..relay import relay
from ..tlslayer import TlsServerTransport
from .clienttls import HTTP_ALPNS, leaf_context, name_allowed
from .credentials import BrokeredCredential, CredentialError, credential_for
from .protocol import (CHUNKED, LENGTH, NEED_DATA, NO_BODY, TUNNEL, UNTIL_CLOSE, DEFAULT_MAX_HEAD,
                       DEFAULT_MAX_LINE, Data, EndOfMessage, HttpReader, HttpWriter,
                       ProtocolError, Request, Response, find_header, forwardable_headers,
                       simple_response)
from .recording import Redactor
from .tlshello import ClientHello, ClientHelloReader, TlsHelloError, looks_like_tls

DEFAULT_MASK_MAX = 8 * 1024 * 1024
# bytes a client may have pipelined behind the request in progress before reading pauses
PIPELINE_BUFFER = 256 * 1024
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# per-session caches of what a repeated head turns into (see HttpReader's memo)
_MEMO_ENTRIES = 64
_DECISIONS_MAX = 256          # per session: paths with ids in them must not grow it without bound

# session phases
_IDLE = 0        # waiting for the next request head
_WAITING = 1     # a task is connecting upstream or waiting for an approval
_ACTIVE = 2      # the request is upstream; its body (if any) and the response are relayed
_DISCARD = 3     # a refused request's body is read and dropped before answering
_TUNNEL = 4      # after 101 or CONNECT: opaque bytes both ways
_ENDED = 5

_ssl_contexts: dict[tuple, ssl.SSLContext] = {}


def _upstream_ssl_context(tls) -> ssl.SSLContext:
    """One context per (mode, CA file): loading a CA bundle costs milliseconds."""
    key = (tls.mode, tls.ca_file)
    found = _ssl_contexts.get(key)
    if found is not None:
        return found
    if tls.mode == "verify-full":
        context = ssl.create_default_context(cafile=tls.ca_file)
    else:
        # require: encrypted but unverified, like libpq's sslmode=require
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    _ssl_contexts[key] = context
    return context


def _split_host(host: str, default_port: int) -> tuple[str, int]:
    if host.startswith("["):
        end = host.find("]")
        name, rest = host[1:end], host[end + 1:]
        return name, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else default_port
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        return name, int(port)
    return host, default_port


def _memo_put(memo: dict, key, value) -> None:
    if len(memo) >= _MEMO_ENTRIES:
        memo.clear()
    memo[key] = value


def _masker_of(masking: Any) -> tuple:
    """(the masking layer's body hook `mask_json_body(body, content_type) -> (body, counts)`, its
    `http_body_kind(content_type)` saying which bodies the hook reads), or (None, None) when the
    layer masks no HTTP body (e.g. only Postgres column rules apply): responses then stream."""
    if masking is None or not getattr(masking, "masks_http_bodies", True):
        return None, None
    hook = getattr(masking, "mask_json_body", None)
    if not callable(hook):
        return None, None
    kind = getattr(masking, "http_body_kind", None)
    return hook, kind if callable(kind) else http_body_kind


def _content_type(headers: list[tuple[str, str]]) -> Optional[str]:
    """The response's Content-Type for masking: None when absent, "" (unknown) when the upstream
    sent several that differ, since a client may go by any of them."""
    found = None
    for name, value in headers:
        if len(name) == 12 and name.lower() == "content-type":
            if found is None:
                found = value
            elif found.lower() != value.lower():
                return ""
    return found


class _Refusal(Exception):
    """Answer the current request with this status and JSON body, and stop forwarding it."""

    def __init__(self, status: int, body: dict, close: bool = False):
        super().__init__(body.get("reason", ""))
        self.status = status
        self.body = body
        self.close = close


class _UpstreamGone(Exception):
    def __init__(self, reason: str, before_response: bool, malformed: bool = False, status: int = 502,
                 code: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.before_response = before_response
        self.status = status
        self.code = code or ("bad_upstream_response" if malformed else "upstream_failed")


class _Upstream(asyncio.Protocol):
    """One upstream connection: its parser and writer; its callbacks go to the owning session."""

    def __init__(self, session: "HttpSession", max_head: int, tls_name: Optional[str] = None):
        self.session = session
        self.tls_name = tls_name         # the TLS server name it was opened (and verified) for
        self.transport: Optional[asyncio.Transport] = None
        self.parser = HttpReader("response", max_head=max_head)
        self.out = HttpWriter()
        self.exchanges = 0
        self.closed = False
        self.eof = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.session._upstream_data(self, data)

    def eof_received(self) -> bool:
        self.session._upstream_data(self, b"")
        # a tunnel may still carry bytes the other way; otherwise let the transport close
        return self.session.phase == _TUNNEL and not self.closed

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.closed = True
        self.session._upstream_lost(self, exc)

    def pause_writing(self) -> None:
        self.session._pause_client("upstream")

    def resume_writing(self) -> None:
        self.session._resume_client("upstream")

    def usable(self) -> bool:
        return not self.closed and not self.eof and not self.transport.is_closing() \
            and self.parser.at_message_start and not self.parser.buffered

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()


class _Exchange:
    """One request and its response, while in flight."""

    __slots__ = ("request", "index", "started", "host", "path", "head", "upstream", "body_done",
                 "response", "client_keep", "mask", "mask_type", "parts", "size", "head_sent", "body_bytes",
                 "deadline", "retry_allowed", "retried", "refusal", "discarded")

    def __init__(self, request: Request, index: int, started: int, host: str, path: str):
        self.request = request
        self.index = index
        self.started = started
        self.host = host
        self.path = path
        self.head = b""                  # the normalised head sent upstream
        self.upstream: Optional[_Upstream] = None
        self.body_done = False           # the client's request (body included) is fully read
        self.response: Optional[Response] = None
        self.client_keep = False
        self.mask: Optional[str] = None  # content encoding to undo when the body is masked
        self.mask_type: Optional[str] = None   # the Content-Type the masker reads it as
        self.parts: list[bytes] = []
        self.size = 0
        self.head_sent = False           # the response head went to the client: no error answer now
        self.body_bytes = 0
        self.deadline = 0.0              # loop time by which the response head must have come (0:
                                         # not yet running; it starts when the request is all upstream)
        self.retry_allowed = False
        self.retried = False
        self.refusal: Optional[_Refusal] = None
        self.discarded = 0


class HttpSession(asyncio.Protocol):
    """One client connection, as the protocol of its transport."""

    def __init__(self, transport: asyncio.Transport, ctx: ConnectionContext, loop: asyncio.AbstractEventLoop,
                 client_tls: Optional[dict] = None):
        self.ctx = ctx
        self.loop = loop
        self.transport = transport
        opts = ctx.target.options or {}
        self.max_head = int(opts.get("max_header_bytes", DEFAULT_MAX_HEAD))
        self.parser = HttpReader("request", max_head=self.max_head,
                                 max_line=int(opts.get("max_line_bytes", DEFAULT_MAX_LINE)))
        self.client_out = HttpWriter()
        self.allow_connect = bool(opts.get("allow_connect", False))
        self.connect_timeout = float(opts.get("connect_timeout", 10))
        self.response_timeout = float(opts.get("response_timeout", 120))
        # durable_before_forward: a request goes upstream only once its records are in the spool
        self.durable_first = bool(opts.get("durable_before_forward"))
        self.durable_timeout = float(opts.get("durable_timeout", DEFAULT_DURABLE_TIMEOUT))
        self.mask_max = int(opts.get("mask_max_body_bytes", DEFAULT_MASK_MAX))
        self.discard_max = int(opts.get("discard_denied_body_bytes", 1024 * 1024))
        self.masker, self.mask_kind = _masker_of(ctx.masking)
        self.policy = ctx.policy
        self.credential_error: Optional[str] = None
        try:
            self.credential: Optional[BrokeredCredential] = credential_for(opts)
        except CredentialError as exc:
            self.credential, self.credential_error = None, str(exc)
        redact_headers = list(opts.get("redact_headers") or ())
        if self.credential is not None:
            redact_headers.append(self.credential.header)     # the injected secret is never recorded
        self.redactor = Redactor(redact_headers, opts.get("redact_query") or ())
        tls = ctx.target.tls
        self.tls = tls if tls is not None and tls.mode in ("require", "verify-full") else None
        self.default_host = f"{ctx.target.upstream_host}:{ctx.target.upstream_port}"
        # intercepted workload TLS (see _serve_client_tls): {"sni", "name", "version", "alpn"}
        self.client_tls = client_tls
        self.client_sni: Optional[str] = None
        if client_tls is not None:
            self.client_sni = client_tls.get("sni")
            name = client_tls["name"]
            # the workload asked for HTTPS, so the upstream is spoken to over TLS, verified
            # unless the target explicitly says `require`; its name is the one the client asked for
            self.tls = UpstreamTLS("require" if tls is not None and tls.mode == "require" else "verify-full",
                                   tls.ca_file if tls is not None else None, name)
            port = ctx.target.upstream_port
            self.default_host = name if port == 443 else f"{name}:{port}"
        self.scheme = "https" if self.tls is not None else "http"
        # the names this target is about (agent: match.hostname, or client_tls_names when set):
        # without an explicit server name each request's Host, which must be one of them, is the
        # upstream's TLS server name
        self.tls_names = [str(n) for n in opts.get("client_tls_names") or ()]
        self.tls_default_name = _first_exact(self.tls_names) or ctx.target.upstream_host
        # a repeated head (same bytes) gives the same record fields and the same normalised
        # bytes; these per-session caches skip rebuilding them (keyed by Request/Response.head_key)
        self._request_records: dict = {}
        self._upstream_heads: dict = {}
        self._client_heads: dict = {}
        self._response_records: dict = {}
        # allow/deny answers by (method, host, path) while cache_base (policy, version,
        # principal, target, hour) stays what it was; never approvals or evaluation errors
        self._decisions: dict = {}
        self._decisions_key: Optional[tuple] = None
        self._decisions_memo = False    # the policy reads no headers: answers can be remembered
        self.phase = _IDLE
        self.exchange: Optional[_Exchange] = None
        self.upstream: Optional[_Upstream] = None
        self.tunnel: Optional[_Upstream] = None
        self.tunnel_open = [False, False]          # client->upstream, upstream->client still open
        self.paused_for: set[str] = set()
        self.client_blocked = False                # the client's send buffer is full
        self.paused_upstream: Optional[_Upstream] = None   # not read while the client is blocked
        self.tasks: set[asyncio.Task] = set()
        # one lazily re-armed timer per session watches response deadlines (a timer per request
        # would cost more than parsing it)
        self.deadline_timer: Optional[asyncio.TimerHandle] = None
        self.done: asyncio.Future = loop.create_future()
        self.started = time.monotonic_ns()
        self.requests = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.tunnel_bytes = [0, 0]

    # -- connection lifecycle ------------------------------------------------------------
    def start(self, buffered: bytes, eof: bool) -> None:
        fields = _start_fields_of(self.ctx)
        if self.client_tls is not None:
            fields = dict(fields, **_client_tls_fields("intercept", self.client_tls))
        self.ctx.emit("session.start", fields)
        if buffered:
            self.data_received(buffered)
        if eof and self.phase != _ENDED:
            self.eof_received()
        if self.phase != _ENDED and not self.paused_for:
            try:
                if not self.transport.is_reading():
                    self.transport.resume_reading()
            except (AttributeError, RuntimeError):
                pass

    def _end(self, reason: str, error: Optional[str] = None) -> None:
        """Close both sides (queued bytes still go out) and record how the session ended."""
        if self.phase == _ENDED:
            return
        self.phase = _ENDED
        exchange = self.exchange
        if self.deadline_timer is not None:
            self.deadline_timer.cancel()
        for task in list(self.tasks):
            task.cancel()
        for upstream in (self.upstream, self.tunnel, exchange.upstream if exchange else None):
            if upstream is not None:
                upstream.close()
        try:
            self.transport.close()
        except (OSError, RuntimeError):
            pass
        end = {"reason": reason, "duration_ns": time.monotonic_ns() - self.started,
               "requests": self.requests, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
               "error": error}
        if self.tunnel_bytes != [0, 0]:
            end["x_tunnel_bytes_up"], end["x_tunnel_bytes_down"] = self.tunnel_bytes
        self.ctx.emit("session.end", end)
        if not self.done.done():
            self.done.set_result(None)

    def idle(self) -> bool:
        """Between requests: nothing read of the next one, nothing owed to the client."""
        return (self.phase == _IDLE and self.exchange is None and not self.tasks and self.tunnel is None
                and self.parser.at_message_start and not self.parser.buffered)

    def _fail_internally(self, exc: BaseException) -> None:
        # one bad connection must not take the listener down; it is closed and recorded
        self._end("internal_error", f"{type(exc).__name__}: {exc}")

    # -- client transport callbacks --------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.parser.receive_data(data)
        try:
            self._pump_client()
        except Exception as exc:
            self._fail_internally(exc)

    def eof_received(self) -> bool:
        self.parser.receive_data(b"")
        try:
            self._pump_client()
        except Exception as exc:
            self._fail_internally(exc)
        return True                  # keep our side open: a response may still be going out

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.phase == _TUNNEL:
            self._end("closed")
        elif exc is not None:
            self._end("client_error", f"{type(exc).__name__}: {exc}")
        else:
            self._end("client_closed")

    def pause_writing(self) -> None:
        # the client is not reading: stop reading what would be sent to it, and its input
        self.client_blocked = True
        self._pause_upstream(self._relaying_upstream())
        self._pause_client("client_backlog")

    def resume_writing(self) -> None:
        self.client_blocked = False
        upstream, self.paused_upstream = self.paused_upstream, None
        if upstream is not None and not upstream.closed:
            upstream.transport.resume_reading()
        self._resume_client("client_backlog")

    def _pause_upstream(self, upstream: Optional[_Upstream]) -> None:
        if upstream is not None and upstream is not self.paused_upstream and not upstream.closed:
            upstream.transport.pause_reading()
            self.paused_upstream = upstream

    def _relaying_upstream(self) -> Optional[_Upstream]:
        if self.phase == _TUNNEL:
            return self.tunnel
        exchange = self.exchange
        return exchange.upstream if exchange is not None else None

    def _pause_client(self, reason: str) -> None:
        if self.phase == _ENDED:
            return
        if not self.paused_for:
            self.transport.pause_reading()
        self.paused_for.add(reason)

    def _resume_client(self, reason: str) -> None:
        paused = self.paused_for
        if reason in paused:
            paused.discard(reason)
            if not paused and self.phase != _ENDED:
                self.transport.resume_reading()

    def _to_client(self, data: bytes) -> None:
        if data and self.phase != _ENDED:
            self.bytes_out += len(data)
            self.transport.write(data)

    def _spawn(self, coro) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._fail_internally(task.exception())

    # -- client input ----------------------------------------------------------------------
    def _pump_client(self) -> None:
        """Handle every client event the current phase can take; the rest waits in the parser."""
        parser = self.parser
        while True:
            phase = self.phase
            if phase == _IDLE:
                try:
                    event = parser.next_event()
                except ProtocolError as exc:
                    self._refuse_malformed(exc)
                    return
                if event is NEED_DATA:
                    if self.paused_for:
                        self._resume_client("pipeline")     # what was pipelined is consumed
                    return
                if type(event) is Request:
                    self._begin(event)
                    continue
                self._end("client_closed")
                return
            if phase == _ACTIVE:
                exchange = self.exchange
                if exchange.body_done:
                    break
                try:
                    event = parser.next_event()
                except ProtocolError as exc:
                    self._client_body_failed(exchange, exc)
                    return
                if event is NEED_DATA:
                    if self.paused_for:
                        self._resume_client("pipeline")
                    return
                kind = type(event)
                upstream = exchange.upstream
                if kind is Data or kind is EndOfMessage:
                    if not upstream.closed:
                        upstream.transport.write(upstream.out.send(event))
                    if kind is EndOfMessage:
                        exchange.body_done = True
                        if exchange.response is None:
                            self._start_response_clock(exchange)
                    elif exchange.deadline:
                        exchange.deadline = 0.0     # the body is coming: the clock waits for its end
                else:
                    self._client_body_failed(exchange, ProtocolError(
                        "client closed the connection inside a request body"))
                    return
                continue
            if phase == _DISCARD:
                if not self._discard_step():
                    if self.phase == _DISCARD and self.paused_for:
                        self._resume_client("pipeline")
                    return
                continue
            if phase == _TUNNEL:
                self._pump_tunnel_up()
                return
            break
        # _WAITING, or _ACTIVE with the request complete: pipelined bytes wait; bound them
        if phase != _ENDED and parser.buffered > PIPELINE_BUFFER:
            self._pause_client("pipeline")

    def _refuse_before_policy(self, exchange: _Exchange, fields: dict, status: int, error: str, reason: str,
                              action: Optional[str] = None) -> None:
        """A request Warden itself refuses before asking the policy: recorded with that refusal as
        its decision (no policy ids), so every http.request says what became of it."""
        ctx = self.ctx
        action = action or f"http:{exchange.request.method}"
        fields.update({"decision": "deny", "policy_ids": [], "reason": reason, "action": action,
                       "resource": f"{exchange.host}{exchange.path}"})
        ctx.emit("http.request", fields)
        answer = {"error": error, "identity": ctx.identity, "request_id": f"{ctx.session_id}-{exchange.index}",
                  "reason": reason}
        if action == "http:CONNECT":
            answer["action"] = action
        self._refuse(exchange, _Refusal(status, answer))

    def _refuse_malformed(self, exc: ProtocolError) -> None:
        """A request Warden cannot interpret unambiguously: answer it and close."""
        self.requests += 1
        body = json.dumps({"error": "bad_request", "reason": exc.reason,
                           "request_id": f"{self.ctx.session_id}-{self.requests}"}).encode()
        self._to_client(simple_response(exc.status, body, keep_alive=False))
        self.ctx.emit("http.response", {"status": exc.status, "headers": {}, "body_bytes": len(body),
                                        "duration_ns": 0, "request_index": self.requests,
                                        "x_refused": "malformed_request", "x_error": exc.reason})
        self._end("client_protocol_error", exc.reason)

    # -- one request -----------------------------------------------------------------------
    def _begin(self, request: Request) -> None:
        self.requests += 1
        index = self.requests
        ctx = self.ctx
        host = request.host or self.default_host
        connect = request.method == "CONNECT"
        path = "/" if connect else request.path
        exchange = self.exchange = _Exchange(request, index, time.monotonic_ns(), host, path)
        key = request.head_key
        template = self._request_records.get(key) if key is not None else None
        if template is None:
            host_name, port = _split_host(host, ctx.target.upstream_port)
            template = {
                "method": request.method, "scheme": self.scheme, "host": host_name, "port": port,
                "path": "" if connect else path,
                "query": "" if connect else self.redactor.query_for_record(request.query),
                "headers": self.redactor.headers_for_record(request.headers),
                "body_bytes": request.content_length if request.framing != CHUNKED else None}
            if key is not None:
                _memo_put(self._request_records, key, template)
        fields = template.copy()         # its nested headers map is shared: records are never changed
        fields["request_index"] = index
        if self.client_sni is not None and not connect and _host_name(host) != self.client_sni:
            # the leaf and the upstream's certificate were for the SNI: another Host would be
            # served under a name nobody verified (domain fronting)
            self._refuse_before_policy(exchange, fields, 421, "misdirected_request",
                                       f"Host {host!r} does not match the TLS server name {self.client_sni!r}")
            return
        if request.host and self.tls is not None and not self.tls.server_name and self.tls_names \
                and not name_allowed(_host_name(host), self.tls_names):
            # the upstream's TLS is opened and verified for the request's Host: only for the
            # names this target is about
            self._refuse_before_policy(
                exchange, fields, 421, "misdirected_request",
                f"Host {host!r} is not one of the names of target {ctx.target.name!r} "
                f"({', '.join(self.tls_names)}); add it to the target's match.hostname "
                f"(or client_tls_names) to reach it over TLS")
            return
        if connect and not self.allow_connect:
            self._refuse_before_policy(exchange, fields, 405, "connect_not_allowed",
                                       f"CONNECT is not allowed for target {ctx.target.name!r}; "
                                       f"set allow_connect: true on the target to permit tunnels",
                                       action="http:CONNECT")
            return
        (kind, action, policy_ids, reason, _, decision), recorded = self._decision(request, host, path)
        resource = recorded["resource"]
        # the decision is recorded on the request itself (one event, not two); one held for
        # approval says "approval" here and gets its own policy.decision once decided
        fields.update(recorded)
        ctx.emit("http.request", fields)
        if kind == "approval":
            self._wait()
            self._spawn(self._await_approval(exchange, decision, resource))
            return
        self._decided(exchange, kind, action, policy_ids, reason, resource)

    def _decision(self, request: Request, host: str, path: str) -> tuple:
        """(_decide's answer, the fields it adds to the request's record), from this session's
        memo when the policy reads no headers."""
        policy = self.policy
        if policy is not None:
            base = cache_base(self.ctx, policy)
            if base != self._decisions_key:
                # a new policy version may read headers where the old one did not
                self._decisions_key = base
                self._decisions = {}
                self._decisions_memo = not _wants_headers(policy)
            if self._decisions_memo:
                key = (request.method, host, path)
                found = self._decisions.get(key)
                if found is None:
                    answer = _decide(self.ctx, request.method, host, path, None)
                    found = (answer, _decision_fields(answer, host, path))
                    kind, decision = answer[0], answer[5]
                    if decision is not None and kind in ("allow", "deny"):
                        if len(self._decisions) >= _DECISIONS_MAX:
                            self._decisions = {}
                        self._decisions[key] = found
                return found
        answer = _decide(self.ctx, request.method, host, path, request.headers)
        return answer, _decision_fields(answer, host, path)

    def _wait(self) -> None:
        self.phase = _WAITING
        self._pause_client("wait")

    def _unwait(self) -> None:
        """After a task's step: take client input again."""
        self._resume_client("wait")
        if self.phase != _ENDED:
            self._pump_client()

    async def _await_approval(self, exchange: _Exchange, decision, resource: str) -> None:
        request = exchange.request
        kind, policy_ids, reason = await _approve(
            self.ctx, decision, request.method, exchange.host, exchange.path, query=request.query,
            shown_query=self.redactor.query_for_record(request.query),
            has_body=request.framing not in (NO_BODY, TUNNEL) and not (
                request.framing == LENGTH and request.content_length == 0))
        if self.phase == _ENDED:
            return
        ctx = self.ctx
        ctx.emit("policy.decision", {"decision": kind, "policy_ids": list(policy_ids), "reason": reason,
                                     "identity": ctx.identity, "action": decision.action, "resource": resource,
                                     "request_index": exchange.index})
        self._decided(exchange, kind, decision.action, policy_ids, reason, resource)
        self._unwait()

    def _decided(self, exchange: _Exchange, kind: str, action: str, policy_ids, reason: str, resource: str) -> None:
        ctx = self.ctx
        if kind != "allow":
            self._refuse(exchange, _Refusal(403, {
                "error": "forbidden", "identity": ctx.identity, "action": action, "resource": resource,
                "policy": list(policy_ids), "reason": reason, "request_id": f"{ctx.session_id}-{exchange.index}"}))
            return
        try:
            exchange.head = self._upstream_head(exchange.request)
        except _Refusal as refusal:
            self._refuse(exchange, refusal)
            return
        if self.durable_first:
            self._wait()
            self._spawn(self._forward_once_recorded(exchange))
            return
        self._forward(exchange)

    def _forward(self, exchange: _Exchange) -> bool:
        """Send the request on the open upstream (True), or connect one first (False: a task
        sends it and takes client input again)."""
        upstream = self.upstream
        if upstream is not None and upstream.usable() and upstream.tls_name == self._tls_name(exchange.request):
            self._send(exchange, upstream)
            return True
        if upstream is not None:
            upstream.close()
            self.upstream = None
        self._wait()
        self._spawn(self._connect_and_send(exchange))
        return False

    async def _forward_once_recorded(self, exchange: _Exchange) -> None:
        error = await records_durable(self.ctx, self.durable_timeout)
        if self.phase == _ENDED:
            return
        if error is not None:
            self._refuse(exchange, _Refusal(503, {
                "error": "records_not_durable", "target": self.ctx.target.name,
                "reason": not_forwarded("request upstream", error)},
                close=True))
            self._unwait()
            return
        if self._forward(exchange):
            self._unwait()

    async def _connect_and_send(self, exchange: _Exchange) -> None:
        try:
            upstream = await self._connect(exchange.request)
        except _Refusal as refusal:
            if self.phase == _ENDED:
                return
            if exchange.retried:
                self._answer_late(exchange, refusal)
            else:
                self._refuse(exchange, refusal)
            self._unwait()
            return
        if self.phase == _ENDED:
            upstream.close()
            return
        self.upstream = upstream
        self._send(exchange, upstream)
        self._unwait()

    async def _connect(self, request: Request) -> _Upstream:
        target = self.ctx.target
        ssl_context = None
        server_name = self._tls_name(request)
        if self.tls is not None:
            ssl_context = _upstream_ssl_context(self.tls)
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, upstream = await self.loop.create_connection(
                    lambda: _Upstream(self, self.max_head, server_name), target.upstream_host,
                    target.upstream_port, ssl=ssl_context, server_hostname=server_name)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            raise _Refusal(502, {"error": "upstream_unreachable", "target": target.name,
                                 "reason": f"cannot reach {target.upstream_host}:{target.upstream_port}: "
                                           f"{type(exc).__name__}: {exc}; check that the upstream is up and "
                                           f"the target's upstream address in agent.yaml"}) from None
        return upstream

    def _tls_name(self, request: Request) -> Optional[str]:
        """The upstream's TLS server name (SNI and verification) for this request: the one the
        configuration (or the intercepted client's SNI) sets, else the request's Host (checked in
        _begin to be one of the target's names), else the target's first name or address."""
        tls = self.tls
        if tls is None:
            return None
        if tls.server_name:
            return tls.server_name
        return _host_name(request.host) if request.host else self.tls_default_name

    def _upstream_head(self, request: Request) -> bytes:
        """The normalised request head sent upstream (hop-by-hop fields dropped, secrets injected)."""
        secret = None
        credential = self.credential
        if credential is not None or self.credential_error is not None:
            if credential is None:
                raise self._credential_refusal(self.credential_error)
            try:
                secret = credential.value()
            except CredentialError as exc:
                raise self._credential_refusal(str(exc)) from None
        key = (request.head_key, secret)
        head = self._upstream_heads.get(key) if key[0] is not None else None
        if head is None:
            head = HttpWriter().send(Request(request.method, request.target,
                                             self._upstream_headers(request, secret), "1.1"))
            if key[0] is not None:
                _memo_put(self._upstream_heads, key, head)
        return head

    def _upstream_headers(self, request: Request, secret: Optional[str]) -> list[tuple[str, str]]:
        headers = forwardable_headers(request.headers, request.connection_tokens)
        credential = self.credential
        if credential is not None:
            lname = credential.header_lower
            headers = [(n, v) for n, v in headers if n.lower() != lname]
            headers.append((credential.header, secret))
        if self.masker is not None:
            # ask for an encoding the masker can read; gzip/deflate are still decoded if sent anyway
            headers = [(n, v) for n, v in headers if n.lower() != "accept-encoding"]
            headers.append(("Accept-Encoding", "identity"))
        if not request.host:
            headers.insert(0, ("Host", self.default_host))
        if request.framing == LENGTH:
            headers.append(("Content-Length", str(request.content_length)))
        elif request.framing == CHUNKED:
            headers.append(("Transfer-Encoding", "chunked"))
        elif request.method in _BODY_METHODS:
            headers.append(("Content-Length", "0"))
        if request.upgrade is not None:
            headers.append(("Connection", "upgrade"))
            headers.append(("Upgrade", request.upgrade))
        return headers

    def _credential_refusal(self, reason: Optional[str]) -> _Refusal:
        return _Refusal(502, {"error": "credential_unavailable", "target": self.ctx.target.name,
                              "reason": f"brokered credential unavailable: {reason}"})

    def _send(self, exchange: _Exchange, upstream: _Upstream) -> None:
        """Put the request head upstream; its body follows as the client sends it."""
        request = exchange.request
        exchange.upstream = upstream
        exchange.retry_allowed = upstream.exchanges > 0 and request.framing == NO_BODY
        upstream.exchanges += 1
        upstream.parser.expect_response(request.method, upgrade=request.upgrade is not None)
        upstream.transport.write(exchange.head)
        upstream.out.chunked = request.framing == CHUNKED     # the head said so
        if self.client_blocked:
            self._pause_upstream(upstream)
        self.phase = _ACTIVE
        if request.framing == NO_BODY and not exchange.body_done:
            self.parser.next_event()        # its EndOfMessage (the head had no body framing to close)
            exchange.body_done = True
        if exchange.body_done or request.expect_continue:
            # with Expect: 100-continue the upstream owes an answer (its 100 or the final response)
            # before any body; the clock stops when either comes and restarts at the body's end
            self._start_response_clock(exchange)
        # else: it starts when the client's body has all gone upstream (_pump_client)

    def _start_response_clock(self, exchange: _Exchange) -> None:
        """The whole request is upstream: its response head is due within response_timeout."""
        exchange.deadline = self.loop.time() + self.response_timeout
        if self.deadline_timer is None:
            self.deadline_timer = self.loop.call_at(exchange.deadline, self._check_deadline)

    # -- refusals --------------------------------------------------------------------------
    def _refuse(self, exchange: _Exchange, refusal: _Refusal) -> None:
        """Warden answers instead of the upstream; the request's body (if any) is dropped."""
        request = exchange.request
        keep = request.keep_alive and not refusal.close
        if request.framing == NO_BODY:
            self.parser.next_event()        # its EndOfMessage
        elif request.expect_continue:
            keep = False                    # the client has not sent the body; do not wait for it
        elif keep:
            exchange.refusal = refusal
            self.phase = _DISCARD
            return
        self._answer(exchange, refusal, keep)

    def _discard_step(self) -> bool:
        """Drop one event of a refused request's body; False when nothing more can be done now."""
        exchange = self.exchange
        try:
            event = self.parser.next_event()
        except ProtocolError:
            self._answer(exchange, exchange.refusal, False)
            return False
        if event is NEED_DATA:
            return False
        kind = type(event)
        if kind is EndOfMessage:
            self._answer(exchange, exchange.refusal, True)
            return True
        if kind is Data:
            exchange.discarded += len(event.data)
            if exchange.discarded <= self.discard_max:
                return True
        self._answer(exchange, exchange.refusal, False)
        return False

    def _answer(self, exchange: _Exchange, refusal: _Refusal, keep: bool, late: bool = False) -> None:
        """Send Warden's answer; `late`: the request was (partly) forwarded, the reason is recorded."""
        body = json.dumps(refusal.body).encode()
        self._to_client(simple_response(refusal.status, body, keep_alive=keep))
        record = {"status": refusal.status, "headers": {}, "body_bytes": len(body),
                  "duration_ns": time.monotonic_ns() - exchange.started,
                  "request_index": exchange.index, "x_refused": refusal.body.get("error")}
        if late:
            record["x_error"] = refusal.body.get("reason")
        self.ctx.emit("http.response", record)
        self.exchange = None
        if keep:
            self.phase = _IDLE
        else:
            self._end("closed")

    def _answer_late(self, exchange: _Exchange, refusal: _Refusal) -> None:
        """An error after the request was (partly) forwarded: answer it and close."""
        self._answer(exchange, refusal, False, late=True)

    def _client_body_failed(self, exchange: _Exchange, exc: ProtocolError) -> None:
        """The client's body was malformed or cut: the upstream must never see it complete."""
        self._drop_upstream(exchange)
        if exchange.head_sent:
            self._end("client_error", f"ProtocolError: {exc.reason}")
            return
        self._answer_late(exchange, _Refusal(exc.status, {
            "error": "bad_request", "target": self.ctx.target.name, "reason": exc.reason,
            "request_id": f"{self.ctx.session_id}-{exchange.index}"}, close=True))

    def _drop_upstream(self, exchange: _Exchange) -> None:
        upstream = exchange.upstream
        self._resume_client("upstream")     # a closed connection never says resume_writing
        if upstream is not None:
            upstream.close()
            if self.upstream is upstream:
                self.upstream = None

    # -- upstream input ----------------------------------------------------------------------
    def _upstream_data(self, upstream: _Upstream, data: bytes) -> None:
        if not data:
            if upstream.eof:
                return
            upstream.eof = True
        upstream.parser.receive_data(data)
        try:
            if self.phase == _TUNNEL:
                if upstream is self.tunnel:
                    self._pump_tunnel_down()
                return
            exchange = self.exchange
            if exchange is None or exchange.upstream is not upstream or self.phase != _ACTIVE:
                # bytes (or a close) from a connection with no request outstanding: never pair
                # them with a later request
                upstream.close()
                if self.upstream is upstream:
                    self.upstream = None
                return
            self._pump_upstream(exchange)
        except Exception as exc:
            self._fail_internally(exc)

    def _upstream_lost(self, upstream: _Upstream, exc: Optional[Exception]) -> None:
        if self.upstream is upstream:
            self.upstream = None
        if self.phase == _ENDED:
            return
        if not upstream.eof:
            # a reset without FIN: the parser decides what the missing bytes mean
            self._upstream_data(upstream, b"")
        elif self.phase == _TUNNEL and upstream is self.tunnel:
            self.tunnel_open = [False, False]
            self._end("closed")

    def _check_deadline(self) -> None:
        self.deadline_timer = None
        exchange = self.exchange
        if exchange is None or exchange.response is not None or self.phase != _ACTIVE or not exchange.deadline:
            return                  # (a deadline not yet running is armed when the request is all sent)
        if exchange.deadline > self.loop.time():
            self.deadline_timer = self.loop.call_at(exchange.deadline, self._check_deadline)
            return
        try:
            self._upstream_failed(exchange, _UpstreamGone(
                f"no response head within {self.response_timeout:g} s of the end of the request; raise "
                f"the target's response_timeout if the upstream is this slow", False,
                status=504, code="upstream_timeout"))
        except Exception as exc:
            self._fail_internally(exc)

    def _pump_upstream(self, exchange: _Exchange) -> None:
        upstream = exchange.upstream
        parser = upstream.parser
        out = self.client_out
        pending: list[bytes] = []
        head_pending = False
        try:
            while True:
                event = parser.next_event()
                if event is NEED_DATA:
                    break
                kind = type(event)
                if exchange.response is None:
                    if kind is not Response:
                        raise _UpstreamGone("the upstream closed the connection before responding", True)
                    if event.status < 200 and event.status != 101:
                        if event.status == 100 and not exchange.body_done:
                            exchange.deadline = 0.0     # the client's turn: the clock waits for the body
                        if exchange.request.version != "1.0":    # interim (100 Continue, 103): pass it on
                            pending.append(out.send(Response(
                                event.status, forwardable_headers(event.headers, event.connection_tokens),
                                event.reason)))
                        continue
                    exchange.response = event
                    if event.framing == TUNNEL:
                        self._start_tunnel(exchange, event, pending)
                        return
                    if self.masker is not None:
                        exchange.mask = self._mask_plan(exchange, event)
                        if exchange.mask is not None:
                            continue
                    pending.append(self._client_head_bytes(exchange, event))
                    head_pending = True
                    continue
                if kind is Data:
                    if exchange.mask is not None:
                        exchange.size += len(event.data)
                        if exchange.size > self.mask_max:
                            raise _UpstreamGone(f"the response exceeds mask_max_body_bytes ({self.mask_max}) "
                                                f"and is not sent unmasked", False, status=502,
                                                code="response_too_large_to_mask")
                        exchange.parts.append(event.data)
                    else:
                        data = event.data
                        exchange.body_bytes += len(data)
                        pending.append(out.send(event) if out.chunked else data)
                elif kind is EndOfMessage:
                    if exchange.mask is not None:
                        pending.append(self._masked_message(exchange))
                        head_pending = True
                    elif out.chunked:
                        pending.append(out.send(event))
                    self._to_client(b"".join(pending))
                    self._finish(exchange)
                    return
                else:
                    raise ProtocolError("the upstream closed the connection inside a response", 502)
        except ProtocolError as exc:
            self._upstream_failed(exchange, _UpstreamGone(exc.reason, False, malformed=True))
            return
        except _UpstreamGone as gone:
            self._upstream_failed(exchange, gone)
            return
        if pending:
            self._to_client(b"".join(pending) if len(pending) > 1 else pending[0])
            if head_pending:
                exchange.head_sent = True

    def _client_head_bytes(self, exchange: _Exchange, response: Response) -> bytes:
        """The normalised response head for the client; sets the body framing and keep-alive."""
        request = exchange.request
        key = (response.head_key, request.keep_alive, request.version, request.method == "HEAD")
        found = self._client_heads.get(key) if key[0] is not None else None
        if found is None:
            framing = response.framing
            head, keep = self._client_head(request, response,
                                           framing if framing == LENGTH or framing == NO_BODY else CHUNKED,
                                           response.content_length)
            out = HttpWriter()
            found = (out.send(head), out.chunked, keep)
            if key[0] is not None:
                _memo_put(self._client_heads, key, found)
        head, self.client_out.chunked, exchange.client_keep = found
        return head

    def _client_head(self, request: Request, response: Response, framing: str,
                     length: Optional[int]) -> tuple[Response, bool]:
        """Response head for the client and whether the client connection stays open."""
        headers = forwardable_headers(response.headers, response.connection_tokens)
        keep = request.keep_alive
        if framing == LENGTH:
            headers.append(("Content-Length", str(length)))
        elif framing == NO_BODY:
            if request.method == "HEAD" or response.status == 304:
                upstream_length = find_header(response.headers, "content-length")
                if upstream_length is not None:
                    headers.append(("Content-Length", upstream_length))
            elif response.status != 204:
                headers.append(("Content-Length", "0"))
        elif request.version == "1.1":
            headers.append(("Transfer-Encoding", "chunked"))
        else:
            keep = False                    # HTTP/1.0 client: the end of the body is the close
        if not keep:
            headers.append(("Connection", "close"))
        elif request.version == "1.0":
            headers.append(("Connection", "keep-alive"))
        return Response(response.status, headers, response.reason), keep

    def _finish(self, exchange: _Exchange) -> None:
        """The response is complete: record it, then take the next request or close."""
        response = exchange.response
        key = response.head_key
        headers = self._response_records.get(key) if key is not None else None
        if headers is None:
            headers = self.redactor.headers_for_record(response.headers)
            if key is not None:
                _memo_put(self._response_records, key, headers)
        self.ctx.emit("http.response", {
            "status": response.status, "headers": headers, "body_bytes": exchange.body_bytes,
            "duration_ns": time.monotonic_ns() - exchange.started, "request_index": exchange.index})
        keep = exchange.client_keep
        upstream = exchange.upstream
        if not exchange.body_done:
            # the upstream answered before taking the whole body: the rest cannot be reused
            keep = False
            upstream.close()
        elif not response.keep_alive or upstream.parser.buffered:
            # closing, or bytes beyond the response: this connection cannot carry another request
            upstream.close()
        if upstream.closed and self.upstream is upstream:
            self.upstream = None
        self.exchange = None
        if not keep:
            self._end("closed")
            return
        self.phase = _IDLE
        if self.paused_for:
            self._resume_client("pipeline")
        self._pump_client()         # a pipelined request, or the client's close, may be waiting

    def _upstream_failed(self, exchange: _Exchange, gone: _UpstreamGone) -> None:
        self._drop_upstream(exchange)
        if gone.before_response and exchange.retry_allowed and not exchange.retried:
            # an idle keep-alive connection the upstream had closed: retry once on a new one
            exchange.retried = True
            exchange.upstream = None
            self._wait()
            self._spawn(self._connect_and_send(exchange))
            return
        if exchange.head_sent:
            # the head is out: the only honest signal left is an abrupt close
            self._end("client_error", f"ConnectionAbortedError: upstream failed mid-response: {gone.reason}")
            return
        self._answer_late(exchange, _Refusal(gone.status, {
            "error": gone.code, "target": self.ctx.target.name, "reason": gone.reason,
            "request_id": f"{self.ctx.session_id}-{exchange.index}"}, close=True))

    # -- masking -------------------------------------------------------------------------
    def _mask_plan(self, exchange: _Exchange, response: Response) -> Optional[str]:
        """The content encoding to undo when this response's body must be masked, else None.
        Which bodies are masked is the masking layer's call (`http_body_kind`), a response without
        a Content-Type included: it could be anything a client sniffs as text."""
        if response.framing not in (LENGTH, CHUNKED, UNTIL_CLOSE):
            return None
        content_type = _content_type(response.headers)
        if self.mask_kind(content_type) is None:
            return None
        exchange.mask_type = content_type if content_type is not None else ""
        encoding = (find_header(response.headers, "content-encoding") or "identity").strip().lower()
        if encoding not in ("identity", "gzip", "x-gzip", "deflate"):
            raise _UpstreamGone(f"the response is {encoding}-encoded, which Warden cannot decode to mask it; "
                                f"the upstream should honour Accept-Encoding: identity", False,
                                status=502, code="unmaskable_response")
        if response.framing == LENGTH and response.content_length > self.mask_max:
            raise _UpstreamGone(f"a {response.content_length}-byte response exceeds mask_max_body_bytes "
                                f"({self.mask_max}) and is not sent unmasked", False,
                                status=502, code="response_too_large_to_mask")
        return encoding

    def _masked_message(self, exchange: _Exchange) -> bytes:
        """The whole masked response (head and body) once the upstream's body is complete."""
        response = exchange.response
        body = b"".join(exchange.parts)
        exchange.parts = []
        headers = response.headers
        if exchange.mask != "identity":
            try:
                body = _decode(body, exchange.mask, self.mask_max)
            except (zlib.error, ValueError) as exc:
                raise _UpstreamGone(f"cannot decode the {exchange.mask} response to mask it: {exc}", False,
                                    status=502, code="unmaskable_response") from None
            headers = [(n, v) for n, v in headers if n.lower() != "content-encoding"]
        try:
            masked, counts = self.masker(body, exchange.mask_type)
        except MaskingRefused as exc:
            raise _UpstreamGone(str(exc), False, status=502, code="unmaskable_response") from None
        total = _count(counts)
        if total:
            self.ctx.emit("mask.applied", {"method": "http.response_body", "fields": counts,
                                           "values_masked": total, "request_index": exchange.index})
        plain = Response(response.status, headers, response.reason, response.version,
                         connection_tokens=response.connection_tokens)
        head, exchange.client_keep = self._client_head(exchange.request, plain, LENGTH, len(masked))
        exchange.body_bytes = len(masked)
        return self.client_out.send(head) + masked

    # -- tunnels (Upgrade, CONNECT) --------------------------------------------------------
    def _start_tunnel(self, exchange: _Exchange, response: Response, pending: list) -> None:
        headers = forwardable_headers(response.headers, response.connection_tokens)
        if response.status == 101:
            headers += [("Connection", "upgrade"), ("Upgrade", find_header(response.headers, "upgrade") or "")]
        pending.append(self.client_out.send(Response(response.status, headers, response.reason)))
        self._to_client(b"".join(pending))
        self.ctx.emit("http.response", {
            "status": response.status, "headers": self.redactor.headers_for_record(response.headers),
            "body_bytes": 0, "duration_ns": time.monotonic_ns() - exchange.started,
            "request_index": exchange.index, "x_tunnel": exchange.request.upgrade or "connect"})
        self.parser.start_tunnel()
        self.tunnel = exchange.upstream     # the connection now belongs to the tunnel
        if self.upstream is exchange.upstream:
            self.upstream = None
        self.exchange = None
        self.phase = _TUNNEL
        self.tunnel_open = [True, True]
        self._resume_client("pipeline")
        self._pump_tunnel_up()
        if self.phase == _TUNNEL:
            self._pump_tunnel_down()

    def _pump_tunnel_up(self) -> None:
        parser, upstream = self.parser, self.tunnel
        while self.tunnel_open[0]:
            event = parser.next_event()
            if event is NEED_DATA:
                return
            if type(event) is Data:
                self.tunnel_bytes[0] += len(event.data)
                if not upstream.closed:
                    upstream.transport.write(event.data)
                continue
            self.tunnel_open[0] = False
            self._half_close(upstream.transport if not upstream.closed else None)

    def _pump_tunnel_down(self) -> None:
        parser = self.tunnel.parser
        while self.tunnel_open[1]:
            try:
                event = parser.next_event()
            except ProtocolError:
                event = None
            if event is NEED_DATA:
                return
            if type(event) is Data:
                self.tunnel_bytes[1] += len(event.data)
                self._to_client(event.data)
                continue
            self.tunnel_open[1] = False
            self._half_close(self.transport)

    def _half_close(self, transport: Optional[asyncio.Transport]) -> None:
        """One direction of a tunnel ended: pass the FIN on; when both have, the session ends."""
        if not any(self.tunnel_open):
            self._end("closed")
            return
        try:
            if transport is not None and transport.can_write_eof():
                transport.write_eof()
        except (OSError, RuntimeError):
            pass


def _decode(body: bytes, encoding: str, limit: int) -> bytes:
    wbits = 16 + zlib.MAX_WBITS if encoding in ("gzip", "x-gzip") else zlib.MAX_WBITS
    decoder = zlib.decompressobj(wbits)
    out = decoder.decompress(body, limit + 1)
    if len(out) > limit or decoder.unconsumed_tail:
        raise ValueError(f"decoded body exceeds mask_max_body_bytes ({limit})")
    return out


def _count(counts: Any) -> int:
    if isinstance(counts, int):
        return counts
    if isinstance(counts, dict):
        return sum(v for v in counts.values() if isinstance(v, int))
    return 0


def _decide(ctx: ConnectionContext, method: str, host: str, path: str,
            headers: Optional[list[tuple[str, str]]]) -> tuple[str, str, Any, str, Any, Any]:
    """The policy's answer for one request (or TLS stream, as CONNECT), without waiting.

    Returns (kind, action, policy ids, reason, resources, decision); kind "approval" only
    when an approval service can be asked (then `decision` goes to _approve).
    """
    policy = ctx.policy
    if policy is None:
        return "allow", f"http:{method}", (), "", (), None
    try:
        decision = policy.decide_http(
            ctx.identity, ctx.identity_attrs, ctx.target.name, method, host, path,
            # the header context only when the engine uses it (building it costs per request)
            {n.lower(): v for n, v in headers} if headers and _wants_headers(policy) else None,
            approved=False)
        kind = decision.kind
    except Exception as exc:  # a broken policy must not let requests through
        return "deny", f"http:{method}", (), (f"policy evaluation failed: {type(exc).__name__}: {exc}; "
                                              f"check the agent log and the policy files"), (), None
    resources = getattr(decision, "resources", ())
    if kind == "approval" and ctx.approvals is None:
        return "deny", decision.action, decision.policy_ids, (
            "approval required but no approval service is configured; the agent needs a collector "
            "(collector.url in agent.yaml) to ask approvers"), resources, None
    return kind, decision.action, decision.policy_ids, decision.reason, resources, decision


def _decision_fields(answer: tuple, host: str, path: str) -> dict:
    """What a _decide answer adds to the http.request record (shared by the records of every
    request the session memo answers alike: records are never changed)."""
    kind, action, policy_ids, reason, resources, _ = answer
    return {"decision": kind, "policy_ids": list(policy_ids), "reason": reason, "action": action,
            "resource": resources[0] if resources else f"{host}{path}"}


def _wants_headers(policy) -> bool:
    engine = getattr(policy, "engine", policy)      # a PolicyStore delegates to its current engine
    return bool(getattr(engine, "context_headers", True))


async def _approve(ctx: ConnectionContext, decision, method: str, host: str, path: str,
                   **request) -> tuple[str, Any, str]:
    """Ask the approval service about a decision of kind "approval": (kind, policy ids, reason).
    `request`: query, shown_query, has_body (ApprovalClient.request_http)."""
    try:
        final = await ctx.approvals.request_http(ctx, decision, method, host, path, **request)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a broken approval service must not let requests through
        return "deny", decision.policy_ids, f"approval failed: {type(exc).__name__}: {exc}"
    return final.kind, final.policy_ids or decision.policy_ids, final.reason


async def serve_http(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                     ctx: ConnectionContext) -> None:
    """Serve one client connection (keep-alive, pipelined requests) through policy to its end.

    The stream's transport is taken over by an HttpSession protocol; bytes the stream had
    already read are fed to it first. Returns when the session has ended. A connection that
    starts with a TLS record is served per the target's `client_tls` option instead (see
    _serve_client_tls).
    """
    loop = asyncio.get_running_loop()
    transport = client_writer.transport
    buffered, eof = _stream_leftover(client_reader)
    if not buffered and not eof:
        # HTTP and TLS clients speak first: their first byte says which one this is
        try:
            first = await client_reader.read(_FIRST_READ)
        except (ConnectionError, OSError) as exc:
            ctx.emit("session.start", _start_fields_of(ctx))
            ctx.emit("session.end", {"reason": "client_error", "duration_ns": 0, "requests": 0, "bytes_in": 0,
                                     "bytes_out": 0, "error": f"{type(exc).__name__}: {exc}"})
            client_writer.close()
            return
        if looks_like_tls(first):
            await _serve_client_tls(client_reader, client_writer, ctx, first)
            return
        rest, eof = _stream_leftover(client_reader)
        buffered, eof = first + rest, eof or not first
    elif looks_like_tls(buffered):
        # the StreamReader still holds these bytes: the TLS path reads them through it
        await _serve_client_tls(client_reader, client_writer, ctx, b"")
        return
    session = HttpSession(transport, ctx, loop)
    transport.set_protocol(session)
    await _run_session(session, buffered, eof)


async def _run_session(session: HttpSession, buffered: bytes, eof: bool) -> None:
    # while the agent stops, a session is closed at its next idle point (between requests); one
    # it cannot wait for is cut
    stopping: Optional[asyncio.Event] = agent_stopping(session.ctx)
    try:
        session.start(buffered, eof)
        if stopping is None:
            await session.done
        else:
            await _serve_until_stop(session, stopping)
    except asyncio.CancelledError:
        session._end(cancelled_reason(session.ctx))
        raise
    except Exception as exc:
        session._fail_internally(exc)


async def _serve_until_stop(session: HttpSession, stopping: asyncio.Event) -> None:
    stop_wait = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait((session.done, stop_wait), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop_wait.cancel()
    while not session.done.done():
        if session.idle():
            session._end("agent_stopping")
            return
        await asyncio.sleep(STOPPING_POLL_S)


def _stream_leftover(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """What the stream read but nobody consumed yet (StreamReader keeps it in _buffer/_eof)."""
    return bytes(getattr(reader, "_buffer", b"")), bool(getattr(reader, "_eof", False))


# -- workload TLS (target option client_tls) -------------------------------------------------
#
#   client_tls: refuse (default)   a connection starting with a TLS record is closed unanswered
#               intercept          TLS is terminated with a leaf for the SNI issued by the agent's
#                                  local CA (ctx.extra["local_ca"]; workloads must trust its
#                                  ca.crt), then served as HTTP like any other connection; the
#                                  upstream is spoken to over TLS (verified with tls.ca_file or
#                                  the system store unless tls mode is `require`)
#               sni                the ClientHello's SNI is judged by policy (action http:CONNECT,
#                                  Endpoint <target>/<sni>/), then the TLS bytes are relayed as
#                                  they are, counted but not decrypted
#   client_tls_hostname: name      the name used when the client sends no SNI (default: tls.server_name,
#                                  then the first exact client_tls_names entry, then the upstream address)
#   client_tls_names: [names]      intercept: SNI names (exact or *.suffix) leaves may be issued
#                                  for; others are refused. Also the Hosts upstream TLS is opened
#                                  for when no server name is set (others get 421); the agent sets
#                                  it to match.hostname unless given
#   client_hello_timeout: 10       seconds for the ClientHello and for the TLS handshake

CLIENT_TLS_MODES = ("intercept", "sni", "refuse")
_FIRST_READ = 64 * 1024


def _start_fields_of(ctx: ConnectionContext) -> dict:
    given = (ctx.extra or {}).get("session_start_fields")
    if given is not None:
        return dict(given)
    fields: dict = {"identity": ctx.identity, "target": ctx.target.name, "protocol": "http"}
    attribution = ctx.attribution
    if attribution is not None:
        fields["orig_dst"] = f"{attribution.orig_ip}:{attribution.orig_port}"
        fields["process"] = dataclasses.asdict(attribution.process)
    else:
        fields["orig_dst"] = f"{ctx.target.upstream_host}:{ctx.target.upstream_port}"
    return fields


def _client_tls_fields(mode: str, info: dict) -> dict:
    fields = {"tls_client": mode != "refuse", "x_client_tls": mode, "x_sni": info.get("sni")}
    for key in ("version", "alpn"):
        if info.get(key):
            fields[f"x_tls_{key}"] = info[key]
    if info.get("offered_alpn"):
        fields["x_tls_alpn_offered"] = list(info["offered_alpn"])
    return fields


def _host_name(host: str) -> str:
    return _split_host(host, 0)[0].lower().rstrip(".")


def _first_exact(names) -> Optional[str]:
    """The first name of a names list that is not a `*.suffix` pattern."""
    return next((str(n).lower().rstrip(".") for n in names or () if not str(n).startswith("*")), None)


class _TlsFront:
    """Records one connection served at the TLS level (refused, relayed, or failed before HTTP)."""

    def __init__(self, ctx: ConnectionContext, mode: str):
        self.ctx = ctx
        self.mode = mode
        self.started = time.monotonic_ns()
        self.info: dict = {}
        self.start_sent = False
        self.requests = 0

    def start(self) -> None:
        if not self.start_sent:
            self.start_sent = True
            self.ctx.emit("session.start", dict(_start_fields_of(self.ctx), **_client_tls_fields(self.mode, self.info)))

    def request(self, hello: ClientHello, name: str) -> None:
        """The TLS connection as one request: method TLS, host the server name."""
        self.requests = 1
        self.ctx.emit("http.request", {
            "method": "TLS", "scheme": "https", "host": name, "port": self.ctx.target.upstream_port,
            "path": "", "query": "", "headers": {}, "body_bytes": None, "request_index": 1,
            "x_sni": hello.server_name, "x_alpn": list(hello.alpn_protocols)})

    def end(self, reason: str, error: Optional[str], bytes_in: int, bytes_out: int = 0,
            tunnel: Optional[list] = None) -> None:
        self.start()
        fields = {"reason": reason, "duration_ns": time.monotonic_ns() - self.started,
                  "requests": self.requests, "bytes_in": bytes_in, "bytes_out": bytes_out, "error": error}
        if tunnel is not None:
            fields["x_tunnel_bytes_up"], fields["x_tunnel_bytes_down"] = tunnel
        self.ctx.emit("session.end", fields)


async def _serve_client_tls(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                            ctx: ConnectionContext, consumed: bytes) -> None:
    """A connection whose first byte is a TLS record: read its ClientHello, then serve it per
    the target's client_tls mode. `consumed`: bytes already taken from the stream."""
    opts = ctx.target.options or {}
    mode = str(opts.get("client_tls", "refuse")).lower()
    front = _TlsFront(ctx, mode if mode in CLIENT_TLS_MODES else "refuse")
    hello_reader = ClientHelloReader()
    timeout = float(opts.get("client_hello_timeout", 10))
    try:
        async with asyncio.timeout(timeout):
            hello = hello_reader.feed(consumed)
            while hello is None:
                chunk = await client_reader.read(_FIRST_READ)
                if not chunk:
                    raise TlsHelloError("the client closed the connection inside its ClientHello")
                consumed += chunk
                hello = hello_reader.feed(chunk)
    except TlsHelloError as exc:
        client_writer.close()
        front.end("client_tls_malformed", f"not a valid TLS ClientHello: {exc}", len(consumed))
        return
    except TimeoutError:
        client_writer.close()
        front.end("client_timeout", f"no complete TLS ClientHello within {timeout:g} s", len(consumed))
        return
    except (ConnectionError, OSError) as exc:
        client_writer.close()
        front.end("client_error", f"{type(exc).__name__}: {exc}", len(consumed))
        return
    tls = ctx.target.tls
    name = hello.server_name or str(opts.get("client_tls_hostname") or
                                    (tls.server_name if tls is not None else None) or
                                    _first_exact(opts.get("client_tls_names")) or
                                    ctx.target.upstream_host).lower().rstrip(".")
    front.info = {"sni": hello.server_name, "offered_alpn": hello.alpn_protocols}
    if mode not in CLIENT_TLS_MODES or mode == "refuse":
        client_writer.close()
        front.start()
        front.request(hello, name)
        why = (f"unknown client_tls value {opts.get('client_tls')!r} (use intercept, sni or refuse)"
               if mode not in CLIENT_TLS_MODES else
               f"the workload started TLS (server name {hello.server_name!r}) and target "
               f"{ctx.target.name!r} has client_tls: refuse; set client_tls: intercept or sni to serve HTTPS")
        front.end("client_tls_refused", why, len(consumed))
        return
    if mode == "sni":
        await _relay_by_sni(client_reader, client_writer, ctx, front, hello, name, consumed)
        return
    await _intercept(client_reader, client_writer, ctx, front, hello, name, consumed, timeout)


async def _relay_by_sni(client_reader, client_writer, ctx: ConnectionContext, front: _TlsFront,
                        hello: ClientHello, name: str, consumed: bytes) -> None:
    front.start()
    front.request(hello, name)
    try:
        kind, action, policy_ids, reason, resource = await _decide_tls(ctx, name)
    except asyncio.CancelledError:
        client_writer.close()
        front.end(cancelled_reason(ctx), None, len(consumed))
        raise
    ctx.emit("policy.decision", {"decision": kind, "policy_ids": list(policy_ids), "reason": reason,
                                 "identity": ctx.identity, "action": action, "resource": resource,
                                 "request_index": 1})
    if kind != "allow":
        client_writer.close()         # nothing to answer in: the client's TLS expects the server's
        front.end("denied", f"{action} to {name!r} denied: {reason}", len(consumed))
        return
    target = ctx.target
    opts = target.options or {}
    try:
        upstream_reader, upstream_writer = await asyncio.wait_for(
            asyncio.open_connection(target.upstream_host, target.upstream_port),
            float(opts.get("connect_timeout", 10)))
    except (OSError, TimeoutError) as exc:
        client_writer.close()
        front.end("upstream_unreachable", f"cannot reach {target.upstream_host}:{target.upstream_port}: "
                                          f"{type(exc).__name__}: {exc}; check that the upstream is up and "
                                          f"the target's upstream address in agent.yaml", len(consumed))
        return
    counts = [0, 0]
    try:
        reason, error = await relay(client_reader, client_writer, upstream_reader, upstream_writer,
                                    counts, first=consumed)
    except asyncio.CancelledError:
        front.end(cancelled_reason(ctx), None, counts[0], counts[1], counts)
        raise
    front.end(reason, error, counts[0], counts[1], counts)


async def _decide_tls(ctx: ConnectionContext, name: str) -> tuple[str, str, list, str, str]:
    """(decision, action, policy ids, reason, resource) for opening a TLS stream to `name`."""
    kind, action, policy_ids, reason, resources, decision = _decide(ctx, "CONNECT", name, "/", None)
    if kind == "approval":
        kind, policy_ids, reason = await _approve(ctx, decision, "CONNECT", name, "/")
    return kind, action, list(policy_ids), reason, resources[0] if resources else f"{name}/"


async def _intercept(client_reader, client_writer, ctx: ConnectionContext, front: _TlsFront,
                     hello: ClientHello, name: str, consumed: bytes, timeout: float) -> None:
    opts = ctx.target.options or {}
    local_ca = (ctx.extra or {}).get("local_ca")
    refusal = None
    if local_ca is None:
        refusal = ("client_tls: intercept needs the agent's local CA, which is not available; "
                   "check the agent log for why <state_dir>/ca could not be loaded")
    elif opts.get("client_tls_names") and not name_allowed(name, opts["client_tls_names"]):
        refusal = (f"TLS server name {name!r} is not in client_tls_names of target {ctx.target.name!r}; "
                   f"add it there to intercept it")
    if refusal is not None:
        client_writer.close()
        front.start()
        front.request(hello, name)
        front.end("client_tls_refused", refusal, len(consumed))
        return
    try:
        server_context = await leaf_context(local_ca, name)
    except asyncio.CancelledError:
        client_writer.close()
        front.end(cancelled_reason(ctx), None, len(consumed))
        raise
    except Exception as exc:  # noqa: BLE001 - the CA's failure closes this connection, not the listener
        client_writer.close()
        front.end("internal_error", f"cannot issue a leaf for {name!r}: {type(exc).__name__}: {exc}",
                  len(consumed))
        return
    loop = asyncio.get_running_loop()
    transport = client_writer.transport
    leftover, eof = _stream_leftover(client_reader)
    tls = TlsServerTransport(transport, server_context, loop, accepted_alpn=HTTP_ALPNS)
    transport.set_protocol(tls.raw_protocol)
    try:
        if not transport.is_reading():
            transport.resume_reading()     # the stream may have paused it while buffering
    except (AttributeError, RuntimeError):
        pass
    tls.feed(consumed + leftover)
    if eof:
        tls.raw_protocol.eof_received()
    try:
        async with asyncio.timeout(timeout):
            await tls.handshake
    except asyncio.CancelledError:
        tls.abort()
        front.end(cancelled_reason(ctx), None, len(consumed) + len(leftover))
        raise
    except (ssl.SSLError, ssl.CertificateError, OSError, TimeoutError) as exc:
        tls.abort()
        reason = f"no TLS handshake within {timeout:g} s" if isinstance(exc, TimeoutError) else \
            f"{type(exc).__name__}: {exc}"
        front.end("tls_handshake_failed", reason, len(consumed) + len(leftover))
        return
    info = {"sni": hello.server_name, "name": name, "version": tls.version, "alpn": tls.alpn,
            "offered_alpn": hello.alpn_protocols}
    session = HttpSession(tls, ctx, loop, client_tls=info)
    tls.set_protocol(session)
    await _run_session(session, b"", False)
