"""asyncio shell around PostgresSession: moves bytes, runs TLS, asks policy, emits events.

`serve_postgres(reader, writer, ctx)` runs one accepted client connection to its end.
Startup (TLS, authentication, brokered login) runs on the asyncio streams. Once the session is
ready for queries, both legs are handed to small asyncio Protocols (`transport.set_protocol`):
received bytes go straight into the session and its output is written at once, with no
coroutine or stream buffer per read — the per-transaction cost that matters for throughput.
Backpressure: a leg whose write buffer is full pauses reading on the other leg.
Target options (ctx.target.options): max_message_bytes (default 64 MiB), startup_timeout
(seconds, default 30), idle_timeout (seconds, default 0 = none).
Client TLS: after an SSLRequest, asyncio's start_tls; with PostgreSQL 17 direct SSL (the
ClientHello comes first, already read by the time it is recognised) the shared memory-BIO layer
(enforcer/tlslayer.py), which is fed the bytes already read. Both then carry on with the same
session, whose startup continues inside TLS.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from collections import OrderedDict
from typing import Optional

from ..context import STOPPING_POLL_S, agent_stopping, cancelled_reason
from ..durable import DEFAULT_DURABLE_TIMEOUT, not_forwarded, records_durable, timed_out, wait_for_records
from ..policy.cachekeys import base_guard, cache_base
from ..sqlclass import mentions_execute, reusable_by_shape, single_statement_text, statement_shape
from ..tlslayer import TlsServerTransport
from . import protocol as P
from . import native
from .broker import BrokerFailure, authenticate_client, authenticate_upstream, is_loopback_peer
from .session import (CANCEL, CLOSE, CONNECT_UPSTREAM, DECIDE, DEFAULT_MAX_MESSAGE_BYTES, EVENT,
                      CLOSED, READY, REGISTER_CANCEL_KEY, START_CLIENT_TLS, TO_CLIENT, TO_SERVER,
                      DecisionRequest, PostgresSession, Verdict)

# _Connection._apply for reads that produced only records and bytes (the steady state), and the
# legs' data_received that runs it without a Python frame, in C when built (enforcer/postgres/native.py)
_apply_steady = native.lanes.apply_steady if native.lanes is not None else None
_Reader = native.lanes.Reader if native.lanes is not None else None


def _not_steady(actions: list) -> bool:
    return False

READ_SIZE = 256 * 1024
WRITE_HIGH_WATER = 512 * 1024
# PostgreSQL 17 requires this ALPN on direct SSL connections (and libpq sends it)
POSTGRES_ALPN = "postgresql"

# The agent is stopping (ctx.extra["agent_stopping"] set): a session leaves at its next idle point
# (no statement running, no transaction open) with the FATAL PostgreSQL sends at a shutdown, which
# drivers and pools answer by connecting again; one the agent cannot wait for gets it too.
STOPPING_SQLSTATE = "57P01"
STOPPING_MESSAGE = ("terminating connection because the Warden agent is stopping (a restart or an upgrade); "
                    "connect again")

log = logging.getLogger("warden.postgres")

# client-facing cancel key -> (upstream host, port, upstream pid, upstream key); entries live as long
# as their session. Keys are random per session so one client cannot guess another's.
_cancel_keys: dict[tuple[int, bytes], tuple[str, int, int, bytes]] = {}


class _DecisionCache:
    """Verdicts for allow/deny outcomes (approvals are never cached), keyed by the policy object
    and version, the principal (identity and attributes), the target, the hour and either the
    exact text or the statement's shape."""

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
    executes = getattr(st, "executes", None)
    return Verdict(
        allowed=allowed, text=st.text, action=getattr(st, "action", None) or d.action,
        kind=st.kind, tables=tuple(st.tables or ()), functions=tuple(st.functions or ()),
        decision="allow" if allowed else "deny", policy_ids=tuple(d.policy_ids or ()),
        reason=d.reason or "",
        prepared={"name": st.prepared_name, "text": executes} if executes is not None else None)


# how decide_now found its verdicts
DECIDED, CACHED_TEXT, CACHED_SHAPE = "decided", "text", "shape"


_UNKNOWN = object()


def decide_now(ctx, sql: str, base: Optional[tuple] = None, shape=_UNKNOWN, prepared: Optional[dict] = None):
    """The synchronous part of `decide`: (verdicts, how) when no approval is needed (how is
    DECIDED, CACHED_TEXT or CACHED_SHAPE), else (None, decisions) for `decide` to ask the
    approval service. A new text of a known shape (`WHERE id = 42` after `WHERE id = 41`) is
    decided like it without asking the policy engine. `base` (cache_base) and `shape`
    (statement_shape of the text): when the caller already has them. `prepared`: the session's
    prepared statements (name -> text), what an EXECUTE in the text runs."""
    policy = ctx.policy
    if policy is None:
        return [Verdict(True, sql, reason="no policy configured for this target")], DECIDED
    if mentions_execute(sql):
        return _decide_execute(ctx, policy, sql, prepared)
    base = base or cache_base(ctx, policy)    # callers that computed it pass it in
    cached = decision_cache.get((*base, sql))
    if cached is not None:
        return cached, CACHED_TEXT
    if shape is _UNKNOWN:
        shape = statement_shape(sql)
    if shape is not None:
        template = decision_cache.get((*base, None, shape))
        if template is not None:
            return [template.with_text(single_statement_text(sql))], CACHED_SHAPE
    verdicts, decisions = _policy_verdicts(ctx, policy, sql)
    if verdicts is None:
        return None, decisions              # an approval is needed
    if decisions is None:
        return verdicts, DECIDED            # the policy failed: denied, and never cached
    decision_cache.put((*base, sql), verdicts)
    if shape is not None and len(decisions) == 1 and reusable_by_shape(decisions[0].statement):
        decision_cache.put((*base, None, shape), verdicts[0])
    return verdicts, DECIDED


def _decide_execute(ctx, policy, sql: str, prepared: Optional[dict]):
    """decide_now for a text that may run a prepared statement: decided as what the session's
    statement of that name is now (unknown: pg:other), never from or into a memo, since the same
    text runs something else once the name is prepared again."""
    new_classifier = getattr(policy, "new_session_classifier", None)
    classifier = new_classifier(prepared) if prepared and new_classifier is not None else None
    verdicts, decisions = _policy_verdicts(ctx, policy, sql, classifier)
    return (None, decisions) if verdicts is None else (verdicts, DECIDED)


def _policy_verdicts(ctx, policy, sql: str, classifier=None):
    """The policy engine's answer for `sql`: (verdicts, decisions) when no approval is needed,
    (None, decisions) when one is; (deny verdict, None) when the policy fails (fail closed)."""
    try:
        if classifier is not None:
            decisions = policy.decide_sql(ctx.identity, ctx.identity_attrs, ctx.target.name, sql,
                                          classifier=classifier)
        else:
            decisions = policy.decide_sql(ctx.identity, ctx.identity_attrs, ctx.target.name, sql)
    except Exception as e:  # a broken policy must not let statements through
        return [Verdict(False, sql, action="pg:unknown", decision="deny",
                        reason=f"policy evaluation failed: {e}")], None
    if any(sd.decision.kind == "approval" for sd in decisions):
        return None, decisions
    return [_verdict_from(sd) for sd in decisions], decisions


async def decide(ctx, req: DecisionRequest) -> list[Verdict]:
    """Policy decision for one Query, Parse or held execution (Bind), with approvals; fails
    closed on policy errors."""
    verdicts, extra = decide_now(ctx, req.sql, prepared=req.prepared)
    if verdicts is not None:
        return verdicts
    # a protocol Parse runs nothing: the approver is asked for each execution instead, which
    # comes with the values it binds (req.params)
    at_parse = req.protocol == "extended" and req.params is None
    # an approval is needed: never cached, each statement asks again
    verdicts = []
    for sd in extra:
        if sd.decision.kind == "approval":
            if ctx.approvals is None:
                v = _verdict_from(sd)
                v.allowed, v.decision = False, "deny"
                v.reason = "approval required but no approval service is configured"
                verdicts.append(v)
            elif at_parse:
                v = _verdict_from(sd)          # not allowed: only a Parse may take "approval"
                v.decision = "approval"
                verdicts.append(v)
            else:
                try:
                    if req.params is None:
                        final = await ctx.approvals.request(ctx, sd)
                    else:
                        final = await ctx.approvals.request(ctx, sd, params=req.params, params_key=req.params_key,
                                                            statement_index=req.statement_index)
                    verdicts.append(_verdict_from(sd, final))
                except Exception as e:
                    v = _verdict_from(sd)
                    v.allowed, v.decision, v.reason = False, "deny", f"approval failed: {e}"
                    verdicts.append(v)
        else:
            verdicts.append(_verdict_from(sd))
    return verdicts


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


def _record_tls(session, leg: str, stream, **facts) -> None:
    """The negotiated TLS of one leg into session.start's `tls` ({"client": ..., "upstream": ...}):
    an auditor asks which protocol version and cipher protected the data, not only whether."""
    ssl_object = stream.get_extra_info("ssl_object")
    if ssl_object is None:
        return
    cipher = ssl_object.cipher()
    tls = session.start_fields.setdefault("tls", {})
    tls[leg] = {"version": ssl_object.version(), "cipher": cipher[0] if cipher else None, **facts}


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


class _Leg(asyncio.Protocol):
    """One leg (client or server side) after the hand-over: callbacks go to the connection."""

    def __init__(self, conn: "_Connection", client: bool):
        self.conn = conn
        self.client = client
        self.lost: asyncio.Future = asyncio.get_running_loop().create_future()
        # data_received is the connection's own reader: the transports call it with one
        # Python frame fewer per read (none at all for the C Reader's steady reads)
        self.data_received = conn._reader(client)

    def eof_received(self):
        self.conn._on_eof(self.client, None)
        return False

    def connection_lost(self, exc) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self.conn._on_eof(self.client, exc)

    def pause_writing(self) -> None:
        # this leg cannot take more: stop reading what would be written to it
        self.conn._pause_reading(not self.client, "backpressure")

    def resume_writing(self) -> None:
        self.conn._resume_reading(not self.client, "backpressure")


def _take_buffered(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """What a StreamReader holds that nobody read yet, and whether it saw EOF."""
    buf = getattr(reader, "_buffer", None)
    data = bytes(buf) if buf else b""
    if buf:
        buf.clear()
    return data, reader.at_eof() or bool(getattr(reader, "_eof", False))


class UpstreamError(Exception):
    def __init__(self, sqlstate: str, message: str):
        super().__init__(message)
        self.sqlstate = sqlstate


class _Connection:
    durable_first = False      # durable_before_forward (set per target in __init__)

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
        self.stopping: Optional[asyncio.Event] = agent_stopping(ctx)
        self.session = PostgresSession(
            identity=ctx.identity, target=ctx.target.name,
            max_message_bytes=int(opts.get("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES)),
            client_tls_available=self.server_ssl is not None, masking=ctx.masking,
            start_fields=_start_fields(ctx), decide=self._decide_inline,
            function_by_oid=extra.get("pg_function_by_oid"))
        self.closing = False
        self.started = time.monotonic()            # the startup timeout counts from here
        self.last_activity = self.started
        self.client_reads = 0                      # the watchdog turns changes into last_activity
        self._steady_reads = None                  # the client leg's C Reader counts the reads it takes
        self.server_task: Optional[asyncio.Task] = None
        self.registered_key: Optional[tuple[int, bytes]] = None
        # hand-over to protocols: the server pump stops reading once the session is ready
        self._handoff: asyncio.Future = asyncio.get_running_loop().create_future()
        self.fast = False
        self._done: Optional[asyncio.Future] = None
        if ctx.extra is not None:
            # the approvals client tells a waiting user where the approval is, right away
            ctx.extra["notify_client"] = self._notify_client
        self._cleg: Optional[_Leg] = None
        self._sleg: Optional[_Leg] = None
        self._paused = ({}, {})                    # (server leg, client leg): reasons reading is paused
        # per-connection decision cache in front of the shared one: sql -> verdicts, valid for
        # one shared-cache key prefix (policy, version, principal, target, hour)
        self._verdicts: dict = {}           # statement text -> verdicts, for this principal/policy/hour
        self._shape_verdicts: dict = {}     # statement shape -> verdict template, likewise
        self._verdicts_key = None
        self._client_detached = False              # a failed direct-SSL handshake left no client stream
        # durable_before_forward: bytes for the server wait until every record emitted before
        # them is in the spool (a statement never runs unrecorded, even if the agent is killed)
        self.durable_first = bool(opts.get("durable_before_forward"))
        self.durable_timeout = float(opts.get("durable_timeout", DEFAULT_DURABLE_TIMEOUT))
        self._held_for_records: list = []          # server bytes waiting for their records
        self._held_total = 0                       # bytes objects ever held / released
        self._released_total = 0
        self._records_timer = None
        self._records_failed = False               # nothing more is forwarded: the session ends
        self._finish_after_release: Optional[str] = None

    # -- main ------------------------------------------------------------------------
    async def run(self) -> None:
        watchdog = asyncio.create_task(self._watchdog())
        reason = "client_closed"
        try:
            reason = await self._client_pump()
        except (ConnectionError, ssl.SSLError, OSError) as e:
            reason = f"client_error: {e.__class__.__name__}"
        except asyncio.CancelledError:
            # the agent ended the session (its stop could not wait for it): say so, to the client too
            reason = cancelled_reason(self.ctx)
            if reason == "agent_stopping":
                self._tell_client_stopping()
            raise
        finally:
            watchdog.cancel()
            if self.fast:
                pass            # the server pump ended at the hand-over
            elif self.server_task is not None:
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
            if self.fast:
                await self._close_fast()
            else:
                await self._close_writer(self.swriter)
                if not self._client_detached:
                    await self._close_writer(self.cwriter)

    async def _client_pump(self) -> str:
        session = self.session
        while not self.closing:
            if self._handoff.done():
                return await self._fast_phase()
            # self.creader, not a local: direct SSL replaces it with the decrypted stream
            data = await self._read_client(self.creader)
            if data is None:
                continue         # woken for the hand-over
            if not data:
                return "client_terminated" if session.terminated else "client_closed"
            self.client_reads += 1
            if (self.server_ssl is None and self.client_reads == 1
                    and data[0] == P.TLS_HANDSHAKE_BYTE):
                self._refuse_direct_tls()
                break
            await self._run_actions(session.feed_client(data))
            if session.terminated:
                return "client_terminated"
        return session.end_reason or "closed"

    async def _read_client(self, reader) -> Optional[bytes]:
        """A stream read during startup that also wakes up (None) when the server pump hands over."""
        if self.server_task is None:
            return await reader.read(READ_SIZE)
        read = asyncio.ensure_future(reader.read(READ_SIZE))
        await asyncio.wait((read, self._handoff), return_when=asyncio.FIRST_COMPLETED)
        if read.done():
            return read.result()
        read.cancel()            # nothing is lost: unread bytes stay in the reader's buffer
        try:
            return await read
        except asyncio.CancelledError:
            if read.cancelled():
                return None
            raise

    async def _server_pump(self) -> Optional[str]:
        session = self.session
        reader = self.sreader
        try:
            while not self.closing:
                if session.phase == READY:
                    # the client pump takes both legs over; unread bytes stay in the reader
                    self._handoff.set_result(True)
                    return None
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
            if self.durable_first and kind in (TO_SERVER, CONNECT_UPSTREAM) and not await self._records_durable():
                continue
            if kind == TO_SERVER:
                if self.swriter is not None:
                    self.swriter.write(payload)
            elif kind == TO_CLIENT:
                self.cwriter.write(payload)
            elif kind == EVENT:
                self.ctx.emit(payload[0], payload[1])
            elif kind == DECIDE:
                verdicts = await decide(self.ctx, payload)
                await self._run_actions(self.session.resume(verdicts))
            elif kind == CONNECT_UPSTREAM:
                await self._connect_upstream(payload)
            elif kind == START_CLIENT_TLS:
                await self._start_client_tls(payload)
            elif kind == REGISTER_CANCEL_KEY:
                self._register_cancel_key(payload)
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

    # -- durable_before_forward ----------------------------------------------------------
    async def _records_durable(self) -> bool:
        """Before the stream phase writes to the server: True once the records are stored; False
        (the session ended with 53100, nothing forwarded) if they cannot be in time."""
        if self._records_failed:
            return False
        error = await records_durable(self.ctx, self.durable_timeout)
        if error is None:
            return True
        self._records_failed = True
        await self._abort("53100", not_forwarded("statement to the database", error), "records_not_durable")
        return False

    def _hold_for_records(self, parts: list) -> None:
        """Fast phase: hold server bytes (and the client's next reads) until the records emitted
        before them are stored; then _records_stored writes them in order."""
        if self._records_failed:
            return
        self._held_for_records.extend(parts)
        self._held_total += len(parts)
        upto = self._held_total
        self._pause_reading(True, "records")
        if self._records_timer is None:
            self._arm_records_timer()
        wait_for_records(self.ctx, lambda error: self._records_stored(upto, error))

    def _records_stored(self, upto: int, error) -> None:
        if self._done is None or self._done.done() or self._records_failed or upto <= self._released_total:
            return      # over, or about bytes already released (a late timer or answer)
        if error is not None:
            self._records_failed = True
            self._held_for_records.clear()
            self._cancel_records_timer()
            message = not_forwarded("statement to the database", error)
            self._apply(self.session.fatal("53100", message, "records_not_durable"))
            self._finish("records_not_durable")
            return
        count = upto - self._released_total
        parts = self._held_for_records[:count]
        del self._held_for_records[:count]
        self._released_total = upto
        transport = self.swriter.transport
        if not transport.is_closing():
            transport.writelines(parts)
        self._cancel_records_timer()
        if not self._held_for_records:
            if self._finish_after_release is not None:
                self._finish(self._finish_after_release)
                return
            self._resume_reading(True, "records")
        else:           # what is still held gets its own time from now
            self._arm_records_timer()

    def _arm_records_timer(self) -> None:
        """What is held now must be released within durable_timeout, or the session ends."""
        upto = self._held_total
        self._records_timer = asyncio.get_running_loop().call_later(
            self.durable_timeout, lambda: self._records_stored(upto, timed_out(self.durable_timeout)))

    def _cancel_records_timer(self) -> None:
        if self._records_timer is not None:
            self._records_timer.cancel()
            self._records_timer = None

    def _register_cancel_key(self, keys: tuple) -> None:
        """Map the client-facing cancel key to the upstream's, for CancelRequests on other connections."""
        cpid, ckey, spid, skey = keys
        self.registered_key = (cpid, ckey)
        target = self.ctx.target
        _cancel_keys[(cpid, ckey)] = (target.upstream_host, target.upstream_port, spid, skey)

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
        refusal = self._connect_refusal()
        if refusal is not None:
            await self._run_actions(self.session.fatal("42501", refusal, "connect_denied"))
            return
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

    def _connect_refusal(self) -> Optional[str]:
        """pg:connect on the target, decided before any upstream connection exists (after a
        service token may have renamed the identity): the refusal's message, or None to go on.
        A refusal is recorded by session.end (reason connect_denied, the message as error)."""
        ctx = self.ctx
        decide_connect = getattr(ctx.policy, "decide_connect", None)
        if decide_connect is None:
            return None
        try:
            decision = decide_connect(ctx.identity, ctx.identity_attrs, ctx.target.name)
        except Exception as exc:  # noqa: BLE001 - a broken policy must not let connections through
            reason = f"policy evaluation failed: {type(exc).__name__}: {exc}"
        else:
            if decision.kind == "allow":
                return None
            reason = decision.reason
        return (f"Warden: identity {ctx.identity!r} may not connect to target {ctx.target.name!r} "
                f"(action pg:connect; {reason}); a policy must permit Action::\"pg:connect\" on "
                f"Target::\"{ctx.target.name}\" for this identity")

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
                                         f"{self.ctx.target.name} (use disable, prefer, require, verify-ca or verify-full)")
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
        _record_tls(self.session, "upstream", self.swriter, mode=mode, server_name=server_name)

    async def _start_client_tls(self, how: str) -> None:
        if how == "direct":
            await self._start_direct_tls()
            return
        buffered = getattr(self.creader, "_buffer", b"")
        if buffered:
            await self._run_actions(self.session.fatal(
                "08P01", "received unencrypted data after SSL request", "tls_injection"))
            return
        # the client sends its ClientHello as soon as it reads 'S': stop reading now, or a loop turn
        # before start_tls takes the transport over could put it in the stream's buffer, where the
        # handshake never sees it (it then stalls until the startup timeout)
        self.cwriter.transport.pause_reading()
        await self.cwriter.drain()
        await asyncio.wait_for(self.cwriter.start_tls(self.server_ssl), self.startup_timeout)
        _record_tls(self.session, "client", self.cwriter)
        await self._run_actions(self.session.client_tls_established())

    def _refuse_direct_tls(self) -> None:
        """A direct SSL ClientHello on a target whose client TLS is refused: close without a word,
        as PostgreSQL does when SSL is off (a plaintext ErrorResponse would only confuse the
        client's TLS stack); the record says why."""
        message = ("direct SSL (sslnegotiation=direct) refused: client TLS is not enabled on Warden target "
                   f"{self.ctx.target.name}")
        log.warning("%s", message)
        self._close_silently("08P01", message, "client_tls_refused")

    def _close_silently(self, sqlstate: str, message: str, reason: str) -> None:
        """End the session with a record of why, writing nothing to a client that could not read it."""
        self.closing = True
        session = self.session
        session.start_fields["x_client_tls_error"] = message
        session.last_sqlstate = sqlstate
        session.end_reason = reason
        self._emit(session.finish(reason))
        self.cwriter.transport.abort()

    async def _start_direct_tls(self) -> None:
        """PostgreSQL 17 direct SSL: terminate TLS over the ClientHello the session already holds,
        require ALPN "postgresql", then go on with the startup inside TLS."""
        session = self.session
        # the session keeps what it could not parse as a startup packet: the ClientHello and
        # whatever arrived with it; from here on it only sees decrypted bytes
        first = session._cbuf
        session._cbuf = b""
        session.bytes_in -= len(first)
        leftover, eof = _take_buffered(self.creader)
        raw = self.cwriter.transport
        loop = asyncio.get_running_loop()
        # any ALPN outcome completes the handshake: a client without "postgresql" is answered
        # below with an ErrorResponse it can read, inside TLS
        tls = TlsServerTransport(raw, self.server_ssl, loop)
        raw.set_protocol(tls.raw_protocol)
        if not raw.is_reading():
            raw.resume_reading()           # the stream may have paused it while buffering
        tls.feed(first + leftover)
        if eof:
            tls.raw_protocol.eof_received()
        # ends a little before the watchdog's startup timeout would, so a stalled handshake is
        # recorded as such and nothing is written in plaintext to a client expecting TLS records
        remaining = self.started + self.startup_timeout - time.monotonic()
        try:
            async with asyncio.timeout(max(0.0, remaining - min(0.05, self.startup_timeout / 10))):
                await tls.handshake
        except (ssl.SSLError, ssl.CertificateError, OSError, TimeoutError) as e:
            detail = (f"no TLS handshake within the startup timeout of {self.startup_timeout:g} s"
                      if isinstance(e, TimeoutError) else f"{e.__class__.__name__}: {e}")
            message = f"direct SSL handshake with the client failed: {detail}"
            log.warning("target %s: %s", self.ctx.target.name, message)
            tls.abort()
            # the raw stream's protocol was replaced: its close would never be reported
            self._client_detached = True
            self._close_silently("08P01", message, "tls_handshake_failed")
            return
        # the decrypted side as streams, so startup (and the broker) runs as after an SSLRequest
        reader = asyncio.StreamReader(limit=READ_SIZE, loop=loop)
        stream_protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        stream_protocol.connection_made(tls)
        tls.set_protocol(stream_protocol)
        self.creader = reader
        self.cwriter = asyncio.StreamWriter(tls, stream_protocol, reader, loop)
        tls.resume_reading()               # delivers what was decrypted with the handshake
        if tls.is_closing():
            reader.feed_eof()              # the client left before the stream was attached
        session.start_fields["x_tls_negotiation"] = "direct"
        session.start_fields["x_tls_alpn"] = tls.alpn
        _record_tls(session, "client", tls)
        if tls.alpn != POSTGRES_ALPN:
            offered = "no ALPN" if tls.alpn is None else f"ALPN {tls.alpn!r}"
            message = (f"direct SSL connection without ALPN protocol {POSTGRES_ALPN!r} refused "
                       f"(the client negotiated {offered}); PostgreSQL 17 requires it")
            log.warning("target %s: %s", self.ctx.target.name, message)
            session.start_fields["x_client_tls_error"] = message
            await self._run_actions(session.fatal("08P01", message, "direct_tls_without_alpn"))
            return
        await self._run_actions(session.client_tls_established())

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
        period = min(1.0, max(0.05, self.startup_timeout / 4))
        if self.idle_timeout:
            period = min(period, max(0.05, self.idle_timeout / 4))
        seen_reads = self._client_read_count()
        # one wait on the agent's stop for the connection's life (not a task per tick)
        stop_wait = asyncio.ensure_future(self.stopping.wait()) if self.stopping is not None else None
        try:
            await self._watch(period, seen_reads, stop_wait)
        finally:
            if stop_wait is not None:
                stop_wait.cancel()

    async def _watch(self, period: float, seen_reads: int, stop_wait: Optional[asyncio.Future]) -> None:
        started = self.started
        while True:
            if stop_wait is None:
                await asyncio.sleep(period)
            elif stop_wait.done():
                await asyncio.sleep(STOPPING_POLL_S)     # stopping: look for the next idle point
            else:
                await asyncio.wait((stop_wait,), timeout=period)
            now = time.monotonic()
            reads = self._client_read_count()
            session = self.session
            # a statement the server is still running (a long query, a long result stream) is
            # activity too: idle means the client owes the next move, as PostgreSQL's
            # idle_session_timeout
            if reads != seen_reads or session._results:
                seen_reads = reads
                self.last_activity = now
            if session.phase != READY and session.phase != CLOSED and now - started > self.startup_timeout:
                await self._abort("08P01", f"startup did not complete within {self.startup_timeout:g} s "
                                           "(target option startup_timeout)", "startup_timeout")
                return
            if (self.idle_timeout and session.phase == READY and not session.waiting_for_decision
                    and now - self.last_activity > self.idle_timeout):
                await self._abort("57P05", f"terminating connection due to idle timeout of "
                                           f"{self.idle_timeout:g} s (target option idle_timeout)", "idle_timeout")
                return
            if stop_wait is not None and stop_wait.done() and self._may_leave_now():
                await self._abort(STOPPING_SQLSTATE, STOPPING_MESSAGE, "agent_stopping")
                return

    def _may_leave_now(self) -> bool:
        """Idle for a stop: nothing running or owed, no transaction open, no decision pending (a
        session still starting up never gets further)."""
        session = self.session
        return session.phase != READY or session.at_rest

    def _tell_client_stopping(self) -> None:
        """Best effort on a cancelled session: the FATAL and the end reason, without waiting."""
        session = self.session
        if session.phase == CLOSED:
            return
        try:
            actions = session.fatal(STOPPING_SQLSTATE, STOPPING_MESSAGE, "agent_stopping")
            if self.fast:
                self._apply(actions)
            else:
                for kind, payload in actions:
                    if kind == TO_CLIENT and not self.cwriter.is_closing():
                        self.cwriter.write(payload)
                    elif kind == EVENT:
                        self._emit([(kind, payload)])
        except Exception:       # the session is going anyway; its end is recorded in run()
            log.debug("could not tell the client the agent is stopping", exc_info=True)

    async def _abort(self, sqlstate: str, message: str, reason: str) -> None:
        if self.fast:
            self._apply(self.session.fatal(sqlstate, message, reason))
            self._finish(reason)
            return
        await self._run_actions(self.session.fatal(sqlstate, message, reason))
        self.closing = True
        self.cwriter.close()
        if self.swriter is not None:
            self.swriter.close()

    # -- after the hand-over: protocol callbacks --------------------------------------
    async def _fast_phase(self) -> str:
        """Move both legs from the streams to protocols and run until the connection ends."""
        loop = asyncio.get_running_loop()
        self.fast = True
        self._done = loop.create_future()
        ct, st = self.cwriter.transport, self.swriter.transport
        cdata, ceof = _take_buffered(self.creader)
        sdata, seof = _take_buffered(self.sreader)
        # a leg that already failed or closed under the stream gets no more callbacks
        ceof = ceof or ct.is_closing() or self.creader.exception() is not None
        seof = seof or st.is_closing() or self.sreader.exception() is not None
        # _apply for reads that produced only records and bytes, in C when built; False: not such a read
        self._apply_steady = (functools.partial(_apply_steady, self.ctx.emit, st, ct)
                              if _apply_steady is not None and not self.durable_first else _not_steady)
        self._cleg, self._sleg = _Leg(self, True), _Leg(self, False)
        for transport, leg, reader, writer in ((ct, self._cleg, self.creader, self.cwriter),
                                                (st, self._sleg, self.sreader, self.swriter)):
            write_paused = bool(getattr(writer._protocol, "_paused", False))
            transport.set_protocol(leg)
            transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
            if getattr(reader, "_paused", False):
                reader._paused = False
                transport.resume_reading()
            if write_paused:
                self._pause_reading(not leg.client, "backpressure")
        if sdata:
            self._sleg.data_received(sdata)
        if cdata:
            self._cleg.data_received(cdata)
        if seof:
            self._on_eof(False, None)
        if ceof:
            self._on_eof(True, None)
        return await self._done

    def _reader(self, client: bool):
        """A leg's data_received: the C Reader, which does a steady session's reads itself and
        hands the others to _on_client_data / _on_server_data, or those handlers themselves.
        The C lanes exist exactly when the Reader does, so a read reaching a handler is one they
        declined: the handlers feed the session's Python loops directly."""
        handler = self._on_client_data if client else self._on_server_data
        if _Reader is None or self.durable_first:      # the C Reader writes to the server itself
            return handler
        reader = _Reader(self.session, client, self._done, self.ctx.emit, self.swriter.transport,
                         self.cwriter.transport, handler, self._client_rest if client else self._server_rest,
                         self._fail)
        if client:
            self._steady_reads = reader
        return reader

    def _client_read_count(self) -> int:
        steady = self._steady_reads
        return self.client_reads + (steady.reads if steady is not None else 0)

    def _on_client_data(self, data: bytes) -> None:
        if self._done.done():
            return
        self.client_reads += 1
        try:
            actions = self.session.feed_client_python(data)
            applied = not actions or self._apply_steady(actions)
        except Exception as e:  # surfaced by run() as with the stream pumps
            self._fail(e)
            return
        self._client_rest(actions, applied)

    def _client_rest(self, actions: list, applied: bool) -> None:
        """A client read after its feed: what the steady apply did not do goes through _apply,
        and a Terminate ends the connection."""
        try:
            if not applied:
                self._apply(actions)
            if self.session.terminated:
                if self.durable_first and self._held_for_records:   # what came before it goes first
                    self._finish_after_release = "client_terminated"
                else:
                    self._finish("client_terminated")
        except Exception as e:
            self._fail(e)

    def _on_server_data(self, data: bytes) -> None:
        if self._done.done():
            return
        try:
            actions = self.session.feed_server_python(data)
            applied = not actions or self._apply_steady(actions)
        except Exception as e:
            self._fail(e)
            return
        self._server_rest(actions, applied)

    def _server_rest(self, actions: list, applied: bool) -> None:
        try:
            if not applied:
                self._apply(actions)
        except Exception as e:
            self._fail(e)

    def _on_eof(self, client: bool, exc) -> None:
        if self._done is None or self._done.done():
            return
        session = self.session
        if client:
            if exc is not None:
                reason = f"client_error: {exc.__class__.__name__}"
            else:
                reason = "client_terminated" if session.terminated else "client_closed"
        else:
            reason = "client_terminated" if session.terminated else "server_closed"
            session.end_reason = session.end_reason or reason
        self._finish(reason)

    def _apply(self, actions: list) -> None:
        """Run a session's actions synchronously; writes are collected and issued once per leg.
        Events are recorded as they come, before the writes: a statement whose record cannot be
        taken (RecordBacklogFull) must not reach the server."""
        to_server: list = []
        to_client: list = []
        emit = self.ctx.emit
        close = False
        done = 0
        for kind, payload in actions:
            done += 1
            if kind == EVENT:
                emit(payload[0], payload[1])
            elif kind == TO_SERVER:
                to_server.append(payload)
            elif kind == TO_CLIENT:
                to_client.append(payload)
            elif kind == DECIDE:
                # the session decided what it could (_decide_inline): this statement needs an
                # approval, so hold the client until it is answered
                self._write(to_server, to_client)
                self._pause_reading(True, "decision")
                asyncio.get_running_loop().create_task(self._decide_slow(payload, actions[done:]))
                return
            elif kind == CLOSE:
                close = True
            elif kind == REGISTER_CANCEL_KEY:
                self._register_cancel_key(payload)
            else:
                raise RuntimeError(f"session action {kind} after the hand-over")
        self._write(to_server, to_client)
        if close:
            self.closing = True
            self._finish(self.session.end_reason or "closed")

    def _write(self, to_server: list, to_client: list) -> None:
        if to_server and self.durable_first:
            self._hold_for_records(to_server)
            to_server = []
        if to_server:
            t = self.swriter.transport
            if not t.is_closing():
                t.write(to_server[0]) if len(to_server) == 1 else t.writelines(to_server)
        if to_client:
            t = self.cwriter.transport
            if not t.is_closing():
                t.write(to_client[0]) if len(to_client) == 1 else t.writelines(to_client)

    def _notify_client(self, message: str) -> None:
        """An asynchronous NoticeResponse: allowed at any point of the protocol, shown by psql at once."""
        transport = self.cwriter.transport
        if not transport.is_closing():
            transport.write(P.build_notice_response({"S": "NOTICE", "V": "NOTICE", "C": "00000", "M": message}))

    def _decide_inline(self, sql: str, prepared: Optional[dict] = None) -> Optional[list]:
        """The session's synchronous decision (PostgresSession.decide), without awaiting: a dict
        lookup for a statement this connection saw before, else the shared cache or the policy
        itself; None when an approval is needed. `prepared`: the session's prepared statements,
        given with a text that may EXECUTE one (such texts are never memoized, so the lookup
        below never answers for them)."""
        ctx = self.ctx
        policy = ctx.policy
        base = None
        if prepared is not None:
            return decide_now(ctx, sql, prepared=prepared)[0]
        if policy is not None:
            # the shared cache's key prefix; a change of it (new policy, principal, hour)
            # empties this connection's own verdicts
            base = cache_base(ctx, policy)
            if base != self._verdicts_key:
                self._verdicts_key = base
                self._verdicts = {}
                self._shape_verdicts = {}
                # the C lane answers from the shape memo while ctx still holds what `base` was made of
                self.session.shape_memo = (*base_guard(ctx, policy, base), self._shape_verdicts)
            hit = self._verdicts.get(sql)
            if hit is not None:
                return hit
            # (an EXECUTE text is never a memo or shape template: decide_now decides it anew)
            # a new text of a shape this connection has decided: no shared-cache lookups
            # (their keys hash the whole principal each time)
            shape = statement_shape(sql)
            template = self._shape_verdicts.get(shape) if shape is not None else None
            if template is not None:
                return [template.with_text(single_statement_text(sql))]
            verdicts, how = decide_now(ctx, sql, base, shape)
        else:
            verdicts, how = decide_now(ctx, sql)
        if verdicts is None:
            return None
        if policy is not None:
            if how == CACHED_TEXT:
                # this exact text was seen twice: worth keeping for this connection
                if len(self._verdicts) >= 1000:
                    self._verdicts = {}
                self._verdicts[sql] = verdicts
            elif shape is not None:
                # decide_now keeps a shape's verdict only when every text of it decides alike
                template = decision_cache.get((*base, None, shape))
                if template is not None:
                    if len(self._shape_verdicts) >= 1000:
                        self._shape_verdicts.clear()        # the shape memo's dict too
                    self._shape_verdicts[shape] = template
        return verdicts

    async def _decide_slow(self, req: DecisionRequest, rest: list) -> None:
        try:
            verdicts = await decide(self.ctx, req)
            if self._done.done():
                return
            self._apply(self.session.resume(verdicts) + rest)
            if not self.session.waiting_for_decision:
                self._resume_reading(True, "decision")
        except Exception as e:
            self._fail(e)

    def _pause_reading(self, client: bool, reason: str) -> None:
        reasons = self._paused[client]
        if not reasons:
            leg = self.cwriter if client else self.swriter
            if not leg.transport.is_closing():
                leg.transport.pause_reading()
        reasons[reason] = True

    def _resume_reading(self, client: bool, reason: str) -> None:
        reasons = self._paused[client]
        if reasons.pop(reason, None) and not reasons:
            leg = self.cwriter if client else self.swriter
            if not leg.transport.is_closing():
                leg.transport.resume_reading()

    def _finish(self, reason: str) -> None:
        if self._done is not None and not self._done.done():
            self.closing = True
            self._done.set_result(reason)

    def _fail(self, exc: Exception) -> None:
        if self._done is not None and not self._done.done():
            self.closing = True
            # the client is told why its session ends (e.g. its statements can no longer be
            # recorded) instead of seeing the connection drop
            transport = self.cwriter.transport
            if not transport.is_closing():
                transport.write(P.build_error_response(
                    "58000", f"Warden ended this session: {exc}", severity="FATAL"))
            self._done.set_exception(exc)

    async def _close_fast(self) -> None:
        """Close both legs (buffered writes are flushed first) and wait, bounded, until they are gone."""
        waits = []
        for writer, leg in ((self.swriter, self._sleg), (self.cwriter, self._cleg)):
            if writer is not None:
                writer.transport.close()
                if leg is not None:
                    waits.append(leg.lost)
        if waits:
            try:
                await asyncio.wait_for(asyncio.gather(*waits), 2)
            except (asyncio.TimeoutError, ConnectionError, OSError):
                pass

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
