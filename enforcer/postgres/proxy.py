"""asyncio shell around PostgresSession: moves bytes, runs TLS, asks policy, emits events.

`serve_postgres(reader, writer, ctx)` runs one accepted client connection to its end.
Target options (ctx.target.options): max_message_bytes (default 64 MiB), startup_timeout
(seconds, default 30), idle_timeout (seconds, default 0 = none).
"""
from __future__ import annotations

import asyncio
import ssl
import time
from collections import OrderedDict
from typing import Optional

from . import protocol as P
from .broker import BrokerFailure, authenticate_client, authenticate_upstream, is_loopback_peer
from .session import (CANCEL, CLOSE, CONNECT_UPSTREAM, DECIDE, DEFAULT_MAX_MESSAGE_BYTES, EVENT,
                      READY, REGISTER_CANCEL_KEY, START_CLIENT_TLS, TO_CLIENT, TO_SERVER,
                      DecisionRequest, PostgresSession, Verdict)

READ_SIZE = 256 * 1024
WRITE_HIGH_WATER = 512 * 1024

# client-facing cancel key -> (upstream host, port, upstream pid, upstream key); entries live as long
# as their session. Keys are random per session so one client cannot guess another's.
_cancel_keys: dict[tuple[int, bytes], tuple[str, int, int, bytes]] = {}


class _DecisionCache:
    """(policy object, identity, target, sql) -> verdicts for allow/deny outcomes (approvals never cached)."""

    def __init__(self, max_entries: int = 20000):
        self.max_entries = max_entries
        self._entries: OrderedDict = OrderedDict()

    def get(self, key):
        v = self._entries.get(key)
        if v is not None:
            self._entries.move_to_end(key)
        return v

    def put(self, key, value) -> None:
        self._entries[key] = value
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


decision_cache = _DecisionCache()


def _verdict_from(sd, final=None) -> Verdict:
    st = sd.statement
    d = final if final is not None else sd.decision
    allowed = d.kind == "allow"
    return Verdict(
        allowed=allowed, text=st.text, action=getattr(st, "action", None) or d.action,
        kind=st.kind, tables=tuple(st.tables or ()), functions=tuple(st.functions or ()),
        decision="allow" if allowed else "deny", policy_ids=tuple(d.policy_ids or ()),
        reason=d.reason or "")


async def decide(ctx, req: DecisionRequest) -> tuple[list[Verdict], bool]:
    """Policy decision for one Query/Parse, with approvals; fails closed on policy errors.
    Returns (verdicts, whether they came from the decision cache)."""
    policy = ctx.policy
    if policy is None:
        return [Verdict(True, req.sql, reason="no policy configured for this target")], False
    key = (id(policy), getattr(policy, "version", None), ctx.identity, ctx.target.name, req.sql)
    cached = decision_cache.get(key)
    if cached is not None:
        return cached, True
    try:
        decisions = policy.decide_sql(ctx.identity, ctx.identity_attrs, ctx.target.name, req.sql)
    except Exception as e:  # a broken policy must not let statements through
        return [Verdict(False, req.sql, action="pg:unknown", decision="deny",
                        reason=f"policy evaluation failed: {e}")], False
    verdicts = []
    needs_approval = False
    for sd in decisions:
        if sd.decision.kind == "approval":
            needs_approval = True
            if ctx.approvals is None:
                v = _verdict_from(sd)
                v.allowed, v.decision = False, "deny"
                v.reason = "approval required but no approval service is configured"
                verdicts.append(v)
            else:
                try:
                    final = await ctx.approvals.request(ctx, sd)
                    verdicts.append(_verdict_from(sd, final))
                except Exception as e:
                    v = _verdict_from(sd)
                    v.allowed, v.decision, v.reason = False, "deny", f"approval failed: {e}"
                    verdicts.append(v)
        else:
            verdicts.append(_verdict_from(sd))
    if not needs_approval:
        decision_cache.put(key, verdicts)
    return verdicts, False


def _upstream_ssl_context(tls, target_name: str) -> ssl.SSLContext:
    if tls.mode in ("verify-full", "verify-ca"):
        try:
            sslctx = ssl.create_default_context(cafile=tls.ca_file)
        except (OSError, ssl.SSLError) as e:
            raise UpstreamError("08006", f"Warden cannot load the CA bundle {tls.ca_file} for upstream {target_name}: "
                                         f"{e.strerror or e}; fix the target's tls.ca_file") from e
        sslctx.check_hostname = tls.mode == "verify-full"
        sslctx.verify_mode = ssl.CERT_REQUIRED
    else:
        # prefer/require: encryption without verification, as libpq's sslmode=require
        sslctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        sslctx.check_hostname = False
        sslctx.verify_mode = ssl.CERT_NONE
    return sslctx


def _start_fields(ctx) -> dict:
    """session.start fields the agent prepared (identity, target, redacted process record, ...);
    a minimal set when run without the agent (tests, benches)."""
    given = (ctx.extra or {}).get("session_start_fields")
    if given:
        return dict(given)
    fields = {"identity": ctx.identity, "target": ctx.target.name, "protocol": "postgres"}
    if ctx.host:
        fields["host"] = ctx.host
    if ctx.agent_id:
        fields["agent"] = ctx.agent_id
    if ctx.attribution is not None:
        fields["orig_dst"] = f"{ctx.attribution.orig_ip}:{ctx.attribution.orig_port}"
    return fields


class UpstreamError(Exception):
    def __init__(self, sqlstate: str, message: str):
        super().__init__(message)
        self.sqlstate = sqlstate


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx):
        self.ctx = ctx
        self.creader = reader
        self.cwriter = writer
        self.sreader: Optional[asyncio.StreamReader] = None
        self.swriter: Optional[asyncio.StreamWriter] = None
        opts = ctx.target.options or {}
        self.startup_timeout = float(opts.get("startup_timeout", 30))
        self.idle_timeout = float(opts.get("idle_timeout", 0) or 0)
        extra = ctx.extra or {}
        self.server_ssl: Optional[ssl.SSLContext] = extra.get("server_ssl_context")
        self.session = PostgresSession(
            identity=ctx.identity, target=ctx.target.name,
            max_message_bytes=int(opts.get("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES)),
            client_tls_available=self.server_ssl is not None, masking=ctx.masking,
            start_fields=_start_fields(ctx))
        self.closing = False
        self.last_activity = time.monotonic()
        self.server_task: Optional[asyncio.Task] = None
        self.registered_key: Optional[tuple[int, bytes]] = None

    # -- main ------------------------------------------------------------------------
    async def run(self) -> None:
        watchdog = asyncio.create_task(self._watchdog())
        reason = "client_closed"
        try:
            reason = await self._client_pump()
        except (ConnectionError, ssl.SSLError, OSError) as e:
            reason = f"client_error: {e.__class__.__name__}"
        finally:
            watchdog.cancel()
            if self.server_task is not None:
                if not self.server_task.done():
                    # let the server finish sending what the client is owed (e.g. after Terminate, nothing)
                    self.server_task.cancel()
                try:
                    server_reason = await self.server_task
                    if self.session.end_reason is None and server_reason:
                        reason = server_reason
                except (asyncio.CancelledError, Exception):
                    pass
            self._emit(self.session.finish(reason))
            if self.registered_key is not None:
                _cancel_keys.pop(self.registered_key, None)
            await self._close_writer(self.swriter)
            await self._close_writer(self.cwriter)

    async def _client_pump(self) -> str:
        session = self.session
        reader = self.creader
        while not self.closing:
            data = await reader.read(READ_SIZE)
            if not data:
                return "client_terminated" if session.terminated else "client_closed"
            self.last_activity = time.monotonic()
            await self._run_actions(session.feed_client(data))
            if session.terminated:
                return "client_terminated"
        return session.end_reason or "closed"

    async def _server_pump(self) -> str:
        session = self.session
        reader = self.sreader
        try:
            while not self.closing:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                await self._run_actions(session.feed_server(data))
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        if not self.closing:
            self.closing = True
            reason = "client_terminated" if session.terminated else "server_closed"
            session.end_reason = session.end_reason or reason
            # wake the client pump
            self.cwriter.close()
            return reason
        return session.end_reason

    async def _run_actions(self, actions: list) -> None:
        for kind, payload in actions:
            if kind == TO_SERVER:
                if self.swriter is not None:
                    self.swriter.write(payload)
            elif kind == TO_CLIENT:
                self.cwriter.write(payload)
            elif kind == EVENT:
                self.ctx.emit(payload[0], payload[1])
            elif kind == DECIDE:
                verdicts, cached = await decide(self.ctx, payload)
                await self._run_actions(self.session.resume(verdicts, cached))
            elif kind == CONNECT_UPSTREAM:
                await self._connect_upstream(payload)
            elif kind == START_CLIENT_TLS:
                await self._start_client_tls(payload)
            elif kind == REGISTER_CANCEL_KEY:
                cpid, ckey, spid, skey = payload
                self.registered_key = (cpid, ckey)
                _cancel_keys[(cpid, ckey)] = (self.ctx.target.upstream_host, self.ctx.target.upstream_port,
                                              spid, skey)
            elif kind == CANCEL:
                await self._forward_cancel(*payload)
            elif kind == CLOSE:
                self.closing = True
        if self.swriter is not None and self.swriter.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
            await self.swriter.drain()
        if self.cwriter.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
            await self.cwriter.drain()
        if self.closing:
            await self._drain_quietly(self.cwriter)

    # -- legs ------------------------------------------------------------------------
    async def _connect_upstream(self, startup: bytes) -> None:
        target = self.ctx.target
        login = None
        broker = (self.ctx.extra or {}).get("pg_broker")
        if broker is not None:
            # brokered credentials: check the client's token before any upstream connection exists
            secure = self.session.tls_client or is_loopback_peer(self.cwriter.get_extra_info("peername"))
            login = broker.login(self.session.startup_params, client_secure=secure)
            try:
                await authenticate_client(login, self.creader, self.cwriter, timeout=self.startup_timeout)
            except BrokerFailure as e:
                await self._run_actions(self.session.fatal(e.sqlstate, e.message, e.reason))
                return
            self._apply_token_identity(login.claims)
        try:
            self.sreader, self.swriter = await asyncio.wait_for(
                asyncio.open_connection(target.upstream_host, target.upstream_port), self.startup_timeout)
            await self._negotiate_upstream_tls()
        except UpstreamError as e:
            await self._run_actions(self.session.fatal(e.sqlstate, str(e), "upstream_failed"))
            return
        except (OSError, asyncio.TimeoutError) as e:
            await self._run_actions(self.session.fatal(
                "08006", f"Warden could not connect to upstream {target.name} at "
                         f"{target.upstream_host}:{target.upstream_port}: {e or e.__class__.__name__}",
                "upstream_connect_failed"))
            return
        if login is not None:
            try:
                server_bytes = await authenticate_upstream(login, self.sreader, self.swriter,
                                                           timeout=self.startup_timeout)
            except BrokerFailure as e:
                await self._run_actions(self.session.fatal(e.sqlstate, e.message, e.reason))
                return
            self.session.auth_method = f"brokered:{login.upstream_method}"
            self.session.start_fields.update(login.record_fields())
            # from AuthenticationOk on, the session carries on as if authentication had passed through
            actions = self.session.feed_server(server_bytes)
            self.server_task = asyncio.create_task(self._server_pump())
            await self._run_actions(actions)
            return
        self.swriter.write(startup)
        self.server_task = asyncio.create_task(self._server_pump())

    def _apply_token_identity(self, claims) -> None:
        """A validated service token may name a different identity than the process did."""
        reidentify = (self.ctx.extra or {}).get("reidentify")
        if not claims or reidentify is None:
            return
        identity, attrs, masking = reidentify(claims)
        self.ctx.identity, self.ctx.identity_attrs = identity, attrs
        self.session.identity = identity
        self.session.start_fields["identity"] = identity
        if masking is not None:
            self.ctx.masking = self.session.masking = masking

    async def _negotiate_upstream_tls(self) -> None:
        tls = self.ctx.target.tls
        mode = (tls.mode or "disable").lower()
        if mode == "disable":
            return
        if mode not in ("prefer", "require", "verify-full", "verify-ca"):
            raise UpstreamError("08006", f"unknown upstream TLS mode {tls.mode!r} for target "
                                         f"{self.ctx.target.name} (use disable, prefer, require or verify-full)")
        self.swriter.write(P.build_ssl_request())
        answer = await asyncio.wait_for(self.sreader.readexactly(1), self.startup_timeout)
        if answer == b"N":
            if mode == "prefer":
                return
            raise UpstreamError("08006", f"upstream {self.ctx.target.name} does not accept TLS but the target "
                                         f"requires tls mode {mode}")
        if answer != b"S":
            raise UpstreamError("08P01", f"upstream {self.ctx.target.name} answered SSLRequest with {answer!r}")
        sslctx = _upstream_ssl_context(tls, self.ctx.target.name)
        server_name = tls.server_name or self.ctx.target.upstream_host
        try:
            await asyncio.wait_for(self.swriter.start_tls(sslctx, server_hostname=server_name),
                                   self.startup_timeout)
        except ssl.SSLCertVerificationError as e:
            bundle = tls.ca_file or "the system CA store"
            raise UpstreamError("08006", f"Warden could not verify the TLS certificate of upstream "
                                         f"{self.ctx.target.name} ({server_name}) against CA file {bundle}: "
                                         f"{e.verify_message}; set the target's tls.ca_file to the CA bundle "
                                         f"that signed the server certificate (e.g. Amazon RDS's "
                                         f"global-bundle.pem)") from e
        except ssl.SSLError as e:
            raise UpstreamError("08006", f"TLS handshake with upstream {self.ctx.target.name} failed: {e}") from e
        self.session.tls_upstream = True

    async def _start_client_tls(self, how: str) -> None:
        if how == "direct":
            # the ClientHello bytes are already consumed from the stream; asyncio cannot replay them
            await self._run_actions(self.session.fatal(
                "08P01", "direct TLS negotiation is not supported by Warden yet; use sslnegotiation=postgres",
                "protocol_error"))
            return
        buffered = getattr(self.creader, "_buffer", b"")
        if buffered:
            await self._run_actions(self.session.fatal(
                "08P01", "received unencrypted data after SSL request", "tls_injection"))
            return
        await self.cwriter.drain()
        await asyncio.wait_for(self.cwriter.start_tls(self.server_ssl), self.startup_timeout)
        await self._run_actions(self.session.client_tls_established())

    async def _forward_cancel(self, pid: int, key: bytes) -> None:
        entry = _cancel_keys.get((pid, key))
        if entry is None:
            return      # like Postgres: unknown keys are ignored silently
        host, port, spid, skey = entry
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            w.write(P.build_cancel_request(spid, skey))
            await w.drain()
            await asyncio.wait_for(r.read(1), 10)   # the server closes after handling it
            w.close()
        except (OSError, asyncio.TimeoutError):
            pass

    # -- housekeeping ----------------------------------------------------------------
    async def _watchdog(self) -> None:
        started = time.monotonic()
        period = min(1.0, max(0.05, self.startup_timeout / 4))
        if self.idle_timeout:
            period = min(period, max(0.05, self.idle_timeout / 4))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            session = self.session
            if session.phase != READY and session.phase != "closed" and now - started > self.startup_timeout:
                await self._abort("08P01", f"startup did not complete within {self.startup_timeout:g} s "
                                           "(target option startup_timeout)", "startup_timeout")
                return
            if (self.idle_timeout and session.phase == READY and not session.waiting_for_decision
                    and now - self.last_activity > self.idle_timeout):
                await self._abort("57P05", f"terminating connection due to idle timeout of "
                                           f"{self.idle_timeout:g} s (target option idle_timeout)", "idle_timeout")
                return

    async def _abort(self, sqlstate: str, message: str, reason: str) -> None:
        await self._run_actions(self.session.fatal(sqlstate, message, reason))
        self.closing = True
        self.cwriter.close()
        if self.swriter is not None:
            self.swriter.close()

    def _emit(self, actions: list) -> None:
        for kind, payload in actions:
            if kind == EVENT:
                self.ctx.emit(payload[0], payload[1])

    @staticmethod
    async def _drain_quietly(writer) -> None:
        try:
            await writer.drain()
        except (ConnectionError, OSError, ssl.SSLError):
            pass

    @staticmethod
    async def _close_writer(writer) -> None:
        if writer is None:
            return
        try:
            if not writer.is_closing():
                await writer.drain()
                writer.close()
            await asyncio.wait_for(writer.wait_closed(), 2)
        except (ConnectionError, OSError, ssl.SSLError, asyncio.TimeoutError):
            pass


async def serve_postgres(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                         ctx) -> None:
    """Run one client connection through the Postgres enforcer until either side closes."""
    await _Connection(client_reader, client_writer, ctx).run()
