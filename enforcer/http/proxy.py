"""asyncio shell around the sans-IO HTTP core: moves bytes, asks policy, records, injects secrets.

`serve_http(reader, writer, ctx)` serves one accepted client connection to its end. Requests
are handled in arrival order (pipelined requests wait in the parser, so responses keep their
order); each one is parsed strictly, recorded, decided, re-serialised with normalised framing
and sent over one upstream connection kept alive between requests.

Target options (ctx.target.options, from agent.yaml):
  credentials: {header, value_file, scheme}   brokered credential (enforcer/http/credentials.py)
  redact_headers: [names], redact_query: [names]   recorded as "[redacted]" on top of the defaults
  allow_connect: false          CONNECT is refused unless true
  max_header_bytes: 65536, max_line_bytes: 8192
  connect_timeout: 10, response_timeout: 120 (seconds until the upstream's response head)
  mask_max_body_bytes: 8 MiB    larger maskable responses are refused (never sent unmasked)
  discard_denied_body_bytes: 1 MiB   a denied request's body up to this is read and dropped to
                                keep the connection; larger ones close it
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import ssl
import time
import zlib
from typing import Any, Optional

from enforcer.context import ConnectionContext

from .credentials import BrokeredCredential, CredentialError, credential_for
from .protocol import (CHUNKED, LENGTH, NEED_DATA, NO_BODY, TUNNEL, UNTIL_CLOSE, DEFAULT_MAX_HEAD,
                       DEFAULT_MAX_LINE, Data, EndOfMessage, HttpReader, HttpWriter,
                       ProtocolError, Request, Response, find_header, forwardable_headers,
                       simple_response)
from .recording import Redactor

READ_SIZE = 64 * 1024
FLUSH_BYTES = 64 * 1024
DRAIN_ABOVE = 64 * 1024
DEFAULT_MASK_MAX = 8 * 1024 * 1024
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_MASKABLE_TYPES = ("application/json", "text/")

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


def _masker_of(masking: Any):
    """The masking layer's body hook, `mask_json_body(body, content_type) -> (body, counts)`."""
    if masking is None:
        return None
    hook = getattr(masking, "mask_json_body", None)
    return hook if callable(hook) else None


class _Upstream:
    __slots__ = ("reader", "writer", "parser", "out", "exchanges")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_head: int):
        self.reader = reader
        self.writer = writer
        self.parser = HttpReader("response", max_head=max_head)
        self.out = HttpWriter()
        self.exchanges = 0

    def close(self) -> None:
        try:
            self.writer.close()
        except (OSError, RuntimeError):
            pass


class _Refusal(Exception):
    """Answer the current request with this status and JSON body, and stop forwarding it."""

    def __init__(self, status: int, body: dict, close: bool = False):
        super().__init__(body.get("reason", ""))
        self.status = status
        self.body = body
        self.close = close


class HttpSession:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: ConnectionContext):
        self.ctx = ctx
        self.creader = reader
        self.cwriter = writer
        opts = ctx.target.options or {}
        self.max_head = int(opts.get("max_header_bytes", DEFAULT_MAX_HEAD))
        self.parser = HttpReader("request", max_head=self.max_head,
                                 max_line=int(opts.get("max_line_bytes", DEFAULT_MAX_LINE)))
        self.client_out = HttpWriter()
        self.redactor = Redactor(opts.get("redact_headers") or (), opts.get("redact_query") or ())
        self.allow_connect = bool(opts.get("allow_connect", False))
        self.connect_timeout = float(opts.get("connect_timeout", 10))
        self.response_timeout = float(opts.get("response_timeout", 120))
        self.mask_max = int(opts.get("mask_max_body_bytes", DEFAULT_MASK_MAX))
        self.discard_max = int(opts.get("discard_denied_body_bytes", 1024 * 1024))
        self.masker = _masker_of(ctx.masking)
        self.credential_error: Optional[str] = None
        try:
            self.credential: Optional[BrokeredCredential] = credential_for(opts)
        except CredentialError as exc:
            self.credential, self.credential_error = None, str(exc)
        if self.credential is not None:
            self.redactor.headers = self.redactor.headers | {self.credential.header_lower}
        tls = ctx.target.tls
        self.tls = tls if tls is not None and tls.mode in ("require", "verify-full") else None
        self.scheme = "https" if self.tls is not None else "http"
        self.upstream: Optional[_Upstream] = None
        self.requests = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.tunnel_bytes = [0, 0]

    # -- connection lifecycle ------------------------------------------------------------
    async def run(self) -> None:
        ctx = self.ctx
        started = time.monotonic_ns()
        ctx.emit("session.start", self._start_fields())
        reason, error = "closed", None
        try:
            reason, error = await self._serve()
        except (ConnectionError, OSError, ssl.SSLError) as exc:
            reason, error = "client_error", f"{type(exc).__name__}: {exc}"
        except asyncio.CancelledError:
            reason, error = "cancelled", None
            raise
        except Exception as exc:  # one bad connection must not take the listener down
            reason, error = "internal_error", f"{type(exc).__name__}: {exc}"
        finally:
            if self.upstream is not None:
                self.upstream.close()
            try:
                self.cwriter.close()
            except (OSError, RuntimeError):
                pass
            end = {"reason": reason, "duration_ns": time.monotonic_ns() - started,
                   "requests": self.requests, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                   "error": error}
            if self.tunnel_bytes != [0, 0]:
                end["x_tunnel_bytes_up"], end["x_tunnel_bytes_down"] = self.tunnel_bytes
            ctx.emit("session.end", end)

    def _start_fields(self) -> dict:
        ctx = self.ctx
        given = (ctx.extra or {}).get("session_start_fields")
        if given is not None:
            return given
        fields: dict = {"identity": ctx.identity, "target": ctx.target.name, "protocol": "http"}
        attribution = ctx.attribution
        if attribution is not None:
            fields["orig_dst"] = f"{attribution.orig_ip}:{attribution.orig_port}"
            fields["process"] = dataclasses.asdict(attribution.process)
        else:
            fields["orig_dst"] = f"{ctx.target.upstream_host}:{ctx.target.upstream_port}"
        return fields

    async def _serve(self) -> tuple[str, Optional[str]]:
        while True:
            try:
                event = await self._next_client_event()
            except ProtocolError as exc:
                await self._refuse_malformed(exc)
                return "client_protocol_error", exc.reason
            if type(event) is not Request:
                return "client_closed", None
            keep = await self._exchange(event)
            if not keep:
                return "closed", None

    async def _next_client_event(self):
        parser = self.parser
        while True:
            event = parser.next_event()
            if event is not NEED_DATA:
                return event
            data = await self.creader.read(READ_SIZE)
            self.bytes_in += len(data)
            parser.receive_data(data)

    def _to_client(self, data: bytes) -> None:
        if data:
            self.bytes_out += len(data)
            self.cwriter.write(data)

    async def _drain(self, writer: asyncio.StreamWriter) -> None:
        """Backpressure: wait only when the transport holds a backlog (an await per write is costly)."""
        if writer.transport.get_write_buffer_size() > DRAIN_ABOVE or writer.transport.is_closing():
            await writer.drain()

    async def _refuse_malformed(self, exc: ProtocolError) -> None:
        """A request Warden cannot interpret unambiguously: answer it and close."""
        self.requests += 1
        body = json.dumps({"error": "bad_request", "reason": exc.reason,
                           "request_id": f"{self.ctx.session_id}-{self.requests}"}).encode()
        self._to_client(simple_response(exc.status, body, keep_alive=False))
        self.ctx.emit("http.response", {"status": exc.status, "headers": {}, "body_bytes": len(body),
                                        "duration_ns": 0, "request_index": self.requests,
                                        "x_refused": "malformed_request", "x_error": exc.reason})
        await self._drain_client()

    async def _drain_client(self) -> None:
        try:
            await self._drain(self.cwriter)
        except (ConnectionError, OSError):
            pass

    # -- one request ---------------------------------------------------------------------
    async def _exchange(self, request: Request) -> bool:
        """Handle one request to its end; False when the client connection must close."""
        self.requests += 1
        index = self.requests
        started = time.monotonic_ns()
        ctx = self.ctx
        host = request.host or f"{ctx.target.upstream_host}:{ctx.target.upstream_port}"
        host_name, port = _split_host(host, ctx.target.upstream_port)
        ctx.emit("http.request", {
            "method": request.method, "scheme": self.scheme, "host": host_name, "port": port,
            "path": request.path if request.method != "CONNECT" else "",
            "query": self.redactor.query_for_record(request.query) if request.method != "CONNECT" else "",
            "headers": self.redactor.headers_for_record(request.headers),
            "body_bytes": request.content_length if request.framing != CHUNKED else None,
            "request_index": index})
        try:
            await self._decide(request, host, index)
            headers = self._upstream_headers(request)
            upstream = await self._upstream_for(request)
        except _Refusal as refusal:
            return await self._answer(request, refusal, index, started)
        return await self._forward(request, headers, upstream, index, started)

    async def _decide(self, request: Request, host: str, index: int) -> None:
        ctx = self.ctx
        request_id = f"{ctx.session_id}-{index}"
        if request.method == "CONNECT" and not self.allow_connect:
            raise _Refusal(405, {"error": "connect_not_allowed", "identity": ctx.identity,
                                 "action": "http:CONNECT", "request_id": request_id,
                                 "reason": f"CONNECT is not allowed for target {ctx.target.name!r}; "
                                           f"set allow_connect: true on the target to permit tunnels"})
        policy = ctx.policy
        if policy is None:
            return
        path = request.path if request.method != "CONNECT" else "/"
        try:
            decision = policy.decide_http(ctx.identity, ctx.identity_attrs, ctx.target.name,
                                          request.method, host, path,
                                          {n.lower(): v for n, v in request.headers}, approved=False)
            kind, action, policy_ids, reason = decision.kind, decision.action, decision.policy_ids, decision.reason
            resources = getattr(decision, "resources", ())
            if kind == "approval":
                if ctx.approvals is None:
                    kind, reason = "deny", "approval required but no approval service is configured"
                else:
                    final = await ctx.approvals.request_http(ctx, decision, request.method, host, path)
                    kind, policy_ids, reason = final.kind, final.policy_ids or policy_ids, final.reason
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken policy or approval service must not let requests through
            kind, action, policy_ids, resources = "deny", f"http:{request.method}", (), ()
            reason = f"policy evaluation failed: {type(exc).__name__}: {exc}"
        resource = resources[0] if resources else f"{host}{path}"
        ctx.emit("policy.decision", {"decision": kind, "policy_ids": list(policy_ids), "reason": reason,
                                     "identity": ctx.identity, "action": action, "resource": resource,
                                     "request_index": index})
        if kind != "allow":
            raise _Refusal(403, {"error": "forbidden", "identity": ctx.identity, "action": action,
                                 "resource": resource, "policy": list(policy_ids), "reason": reason,
                                 "request_id": request_id})

    def _upstream_headers(self, request: Request) -> list[tuple[str, str]]:
        headers = forwardable_headers(request.headers, request.connection_tokens)
        credential = self.credential
        if credential is not None or self.credential_error is not None:
            if credential is None:
                raise self._credential_refusal(self.credential_error)
            try:
                value = credential.value()
            except CredentialError as exc:
                raise self._credential_refusal(str(exc)) from None
            lname = credential.header_lower
            headers = [(n, v) for n, v in headers if n.lower() != lname]
            headers.append((credential.header, value))
        if self.masker is not None:
            # ask for an encoding the masker can read; gzip/deflate are still decoded if sent anyway
            headers = [(n, v) for n, v in headers if n.lower() != "accept-encoding"]
            headers.append(("Accept-Encoding", "identity"))
        if not request.host:
            headers.insert(0, ("Host", f"{self.ctx.target.upstream_host}:{self.ctx.target.upstream_port}"))
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

    async def _upstream_for(self, request: Request) -> _Upstream:
        upstream = self.upstream
        if upstream is not None and not upstream.writer.is_closing() and upstream.parser.at_message_start:
            return upstream
        if upstream is not None:
            upstream.close()
            self.upstream = None
        return await self._connect(request)

    async def _connect(self, request: Request) -> _Upstream:
        target = self.ctx.target
        ssl_context = server_name = None
        if self.tls is not None:
            ssl_context = _upstream_ssl_context(self.tls)
            server_name = self.tls.server_name or _split_host(request.host, 0)[0] or target.upstream_host
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    target.upstream_host, target.upstream_port, ssl=ssl_context,
                    server_hostname=server_name, limit=READ_SIZE)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            raise _Refusal(502, {"error": "upstream_unreachable", "target": target.name,
                                 "reason": f"cannot reach {target.upstream_host}:{target.upstream_port}: "
                                           f"{type(exc).__name__}: {exc}"}) from None
        self.upstream = _Upstream(reader, writer, self.max_head)
        return self.upstream

    async def _answer(self, request: Request, refusal: _Refusal, index: int, started: int) -> bool:
        """Warden answers instead of the upstream; the request's body (if any) is dropped."""
        keep = request.keep_alive and not refusal.close
        if request.framing == NO_BODY:
            self.parser.next_event()        # its EndOfMessage
        elif request.expect_continue:
            keep = False                    # the client has not sent the body; do not wait for it
        elif keep:
            keep = await self._discard_body()
        body = json.dumps(refusal.body).encode()
        self._to_client(simple_response(refusal.status, body, keep_alive=keep))
        await self._drain(self.cwriter)
        self.ctx.emit("http.response", {"status": refusal.status, "headers": {}, "body_bytes": len(body),
                                        "duration_ns": time.monotonic_ns() - started, "request_index": index,
                                        "x_refused": refusal.body.get("error")})
        return keep

    async def _discard_body(self) -> bool:
        dropped = 0
        try:
            while True:
                event = await self._next_client_event()
                if type(event) is EndOfMessage:
                    return True
                if type(event) is not Data:
                    return False
                dropped += len(event.data)
                if dropped > self.discard_max:
                    return False
        except ProtocolError:
            return False

    # -- forwarding ----------------------------------------------------------------------
    async def _forward(self, request: Request, headers: list, upstream: _Upstream, index: int,
                       started: int) -> bool:
        head = Request(request.method, request.target, headers, "1.1")
        retry_allowed = upstream.exchanges > 0 and request.framing == NO_BODY
        upstream.exchanges += 1
        upstream.parser.expect_response(request.method, upgrade=request.upgrade is not None)
        upstream.writer.write(upstream.out.send(head))
        body_task = None
        if request.framing == NO_BODY:
            self.parser.next_event()        # its EndOfMessage
            upstream.out.send(EndOfMessage())
        else:
            body_task = asyncio.ensure_future(self._forward_body(upstream))
            body_task.add_done_callback(lambda task: task.cancelled() or task.exception() is None
                                        or upstream.close())
        try:
            return await self._relay_response(request, upstream, index, started, body_task)
        except _UpstreamGone as gone:
            if gone.before_response and retry_allowed:
                # an idle keep-alive connection the upstream had closed: retry once on a new one
                upstream.close()
                self.upstream = None
                try:
                    upstream = await self._connect(request)
                except _Refusal as refusal:
                    return await self._answer_late(request, refusal, index, started)
                upstream.exchanges += 1
                upstream.parser.expect_response(request.method, upgrade=request.upgrade is not None)
                upstream.writer.write(upstream.out.send(head))
                try:
                    return await self._relay_response(request, upstream, index, started, None)
                except _UpstreamGone as again:
                    gone = again
            return await self._upstream_failed(request, gone, index, started, body_task)

    async def _forward_body(self, upstream: _Upstream) -> int:
        sent = 0
        out = upstream.out
        writer = upstream.writer
        while True:
            event = await self._next_client_event()
            if type(event) is Data:
                sent += len(event.data)
                writer.write(out.send(event))
                await self._drain(writer)
            elif type(event) is EndOfMessage:
                writer.write(out.send(event))
                return sent
            else:
                raise ProtocolError("client closed the connection inside a request body")

    async def _next_upstream_event(self, upstream: _Upstream):
        parser = upstream.parser
        while True:
            event = parser.next_event()
            if event is not NEED_DATA:
                return event
            data = await upstream.reader.read(READ_SIZE)
            parser.receive_data(data)

    async def _relay_response(self, request: Request, upstream: _Upstream, index: int, started: int,
                              body_task: Optional[asyncio.Future]) -> bool:
        client_http10 = request.version == "1.0"
        try:
            async with asyncio.timeout(self.response_timeout):
                while True:
                    event = await self._next_upstream_event(upstream)
                    if type(event) is not Response:
                        raise _UpstreamGone("the upstream closed the connection before responding", True)
                    if event.status >= 200 or event.status == 101:
                        break
                    if not client_http10:      # interim (100 Continue, 103): pass it on
                        self._to_client(self.client_out.send(
                            Response(event.status, forwardable_headers(event.headers, event.connection_tokens),
                                     event.reason)))
                        await self._drain(self.cwriter)
        except ProtocolError as exc:
            raise _UpstreamGone(exc.reason, False, malformed=True) from None
        except (ConnectionError, OSError) as exc:
            raise _UpstreamGone(f"{type(exc).__name__}: {exc}", True) from None
        except TimeoutError:
            raise _UpstreamGone(f"no response head within {self.response_timeout:g} s", False) from None
        response = event

        if response.framing == TUNNEL:
            return await self._start_tunnel(request, response, upstream, index, started)
        mask = self._mask_plan(request, response)
        if mask is not None:
            keep, body_bytes = await self._relay_masked(request, response, upstream, index, mask)
        else:
            keep, body_bytes = await self._relay_streaming(request, response, upstream, client_http10)
        self.ctx.emit("http.response", {
            "status": response.status, "headers": self.redactor.headers_for_record(response.headers),
            "body_bytes": body_bytes, "duration_ns": time.monotonic_ns() - started, "request_index": index})
        if body_task is not None:
            if not body_task.done():
                # the upstream answered before taking the whole body: the rest cannot be reused
                body_task.cancel()
                keep = False
                upstream.close()
                self.upstream = None
            elif body_task.exception() is not None:
                keep = False
        if not response.keep_alive and self.upstream is upstream:
            upstream.close()
            self.upstream = None
        return keep

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

    async def _relay_streaming(self, request: Request, response: Response, upstream: _Upstream,
                               client_http10: bool) -> tuple[bool, int]:
        framing = response.framing
        if framing == LENGTH:
            out_framing = LENGTH
        elif framing == NO_BODY:
            out_framing = NO_BODY
        else:
            out_framing = CHUNKED
        head, keep = self._client_head(request, response, out_framing, response.content_length)
        out = self.client_out
        pending = [out.send(head)]
        pending_size = 0
        body_bytes = 0
        parser = upstream.parser
        reader = upstream.reader
        cwriter = self.cwriter
        head_sent = False
        try:
            while True:
                event = parser.next_event()
                if event is NEED_DATA:
                    if pending:
                        self._to_client(b"".join(pending))
                        pending.clear()
                        pending_size = 0
                        head_sent = True
                        await self._drain(cwriter)
                    parser.receive_data(await reader.read(READ_SIZE))
                    continue
                kind = type(event)
                if kind is Data:
                    body_bytes += len(event.data)
                    chunk = out.send(event)
                    pending.append(chunk)
                    pending_size += len(chunk)
                    if pending_size >= FLUSH_BYTES:
                        self._to_client(b"".join(pending))
                        pending.clear()
                        pending_size = 0
                        head_sent = True
                        await self._drain(cwriter)
                elif kind is EndOfMessage:
                    pending.append(out.send(event))
                    break
                else:
                    raise ProtocolError("the upstream closed the connection inside a response", 502)
        except (ProtocolError, ConnectionError, OSError) as exc:
            if not head_sent:
                raise _UpstreamGone(getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}",
                                    False, malformed=isinstance(exc, ProtocolError)) from None
            # the head is out: the only honest signal left is an abrupt close
            upstream.close()
            self.upstream = None
            raise ConnectionAbortedError(f"upstream failed mid-response: {exc}") from None
        self._to_client(b"".join(pending))
        await self._drain(cwriter)
        return keep, body_bytes

    # -- masking -------------------------------------------------------------------------
    def _mask_plan(self, request: Request, response: Response) -> Optional[str]:
        """The content encoding to undo when this response's body must be masked, else None."""
        if self.masker is None or response.framing not in (LENGTH, CHUNKED, UNTIL_CLOSE):
            return None
        content_type = (find_header(response.headers, "content-type") or "").lower()
        if not any(t in content_type for t in _MASKABLE_TYPES) and "+json" not in content_type:
            return None
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

    async def _relay_masked(self, request: Request, response: Response, upstream: _Upstream, index: int,
                            encoding: str) -> tuple[bool, int]:
        parts, size = [], 0
        try:
            while True:
                event = await self._next_upstream_event(upstream)
                if type(event) is Data:
                    size += len(event.data)
                    if size > self.mask_max:
                        raise _UpstreamGone(f"the response exceeds mask_max_body_bytes ({self.mask_max}) "
                                            f"and is not sent unmasked", False, status=502,
                                            code="response_too_large_to_mask")
                    parts.append(event.data)
                elif type(event) is EndOfMessage:
                    break
                else:
                    raise ProtocolError("the upstream closed the connection inside a response", 502)
        except ProtocolError as exc:
            raise _UpstreamGone(exc.reason, False, malformed=True) from None
        except (ConnectionError, OSError) as exc:
            raise _UpstreamGone(f"{type(exc).__name__}: {exc}", False) from None
        body = b"".join(parts)
        headers = response.headers
        if encoding != "identity":
            try:
                body = _decode(body, encoding, self.mask_max)
            except (zlib.error, ValueError) as exc:
                raise _UpstreamGone(f"cannot decode the {encoding} response to mask it: {exc}", False,
                                    status=502, code="unmaskable_response") from None
            headers = [(n, v) for n, v in headers if n.lower() != "content-encoding"]
        content_type = find_header(headers, "content-type") or ""
        masked, counts = self.masker(body, content_type)
        total = _count(counts)
        if total:
            self.ctx.emit("mask.applied", {"method": "http.response_body", "fields": counts,
                                           "values_masked": total, "request_index": index})
        plain = Response(response.status, headers, response.reason, response.version,
                         connection_tokens=response.connection_tokens)
        head, keep = self._client_head(request, plain, LENGTH, len(masked))
        self._to_client(self.client_out.send(head) + masked)
        await self._drain(self.cwriter)
        return keep, len(masked)

    # -- tunnels (Upgrade, CONNECT) --------------------------------------------------------
    async def _start_tunnel(self, request: Request, response: Response, upstream: _Upstream,
                            index: int, started: int) -> bool:
        headers = forwardable_headers(response.headers, response.connection_tokens)
        if response.status == 101:
            headers += [("Connection", "upgrade"), ("Upgrade", find_header(response.headers, "upgrade") or "")]
        self._to_client(self.client_out.send(Response(response.status, headers, response.reason)))
        await self._drain(self.cwriter)
        self.ctx.emit("http.response", {
            "status": response.status, "headers": self.redactor.headers_for_record(response.headers),
            "body_bytes": 0, "duration_ns": time.monotonic_ns() - started, "request_index": index,
            "x_tunnel": request.upgrade or "connect"})
        self.parser.start_tunnel()
        self.upstream = None                # the connection now belongs to the tunnel
        try:
            await asyncio.gather(self._tunnel_pump(self._next_client_event, upstream.writer, 0),
                                 self._tunnel_pump(lambda: self._next_upstream_event(upstream), self.cwriter, 1))
        finally:
            upstream.close()
        return False

    async def _tunnel_pump(self, next_event, writer: asyncio.StreamWriter, direction: int) -> None:
        try:
            while True:
                event = await next_event()
                if type(event) is not Data:
                    break
                self.tunnel_bytes[direction] += len(event.data)
                if direction:
                    self._to_client(event.data)
                else:
                    writer.write(event.data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            try:
                if writer.can_write_eof():
                    writer.write_eof()
            except (OSError, RuntimeError):
                pass

    # -- failures --------------------------------------------------------------------------
    async def _upstream_failed(self, request: Request, gone: "_UpstreamGone", index: int, started: int,
                               body_task: Optional[asyncio.Future]) -> bool:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        status, code, reason = gone.status, gone.code, gone.reason
        if body_task is not None:
            if not body_task.done():
                body_task.cancel()
            elif not body_task.cancelled() and isinstance(body_task.exception(), ProtocolError):
                # the client's body was malformed: that, not the upstream, is the cause
                exc = body_task.exception()
                status, code, reason = exc.status, "bad_request", exc.reason
        refusal = _Refusal(status, {"error": code, "target": self.ctx.target.name, "reason": reason,
                                    "request_id": f"{self.ctx.session_id}-{index}"}, close=True)
        return await self._answer_late(request, refusal, index, started)

    async def _answer_late(self, request: Request, refusal: _Refusal, index: int, started: int) -> bool:
        """An error after the request was (partly) forwarded: answer it and close."""
        body = json.dumps(refusal.body).encode()
        self._to_client(simple_response(refusal.status, body, keep_alive=False))
        await self._drain_client()
        self.ctx.emit("http.response", {"status": refusal.status, "headers": {}, "body_bytes": len(body),
                                        "duration_ns": time.monotonic_ns() - started, "request_index": index,
                                        "x_refused": refusal.body.get("error"),
                                        "x_error": refusal.body.get("reason")})
        return False


class _UpstreamGone(Exception):
    def __init__(self, reason: str, before_response: bool, malformed: bool = False, status: int = 502,
                 code: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.before_response = before_response
        self.status = status
        self.code = code or ("bad_upstream_response" if malformed else "upstream_failed")


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


async def serve_http(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                     ctx: ConnectionContext) -> None:
    """Serve one client connection (keep-alive, pipelined requests) through policy to its end."""
    await HttpSession(client_reader, client_writer, ctx).run()
