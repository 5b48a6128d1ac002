"""Fuzz targets for enforcer.postgres.session (the sans-IO Postgres core), both directions.

Properties checked on every input:
- nothing but actions comes out: no exception escapes the session (the protocol-error path
  is internal: it answers with an ErrorResponse and a CLOSE action);
- bounded work (a per-input alarm);
- every CLOSE for a protocol error is preceded by a FATAL ErrorResponse to the client
  carrying a valid SQLSTATE (08P01 for malformed input);
- what is forwarded is always well framed: the bytes sent upstream (after startup) and to
  the client split into complete messages of known types, with nothing left over;
- after CLOSE the session forwards nothing more.
"""
from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from enforcer.postgres import fastpath
from enforcer.postgres import protocol as P
from enforcer.postgres import session as S
from tests.fuzz.common import PropertyViolation, Stats, mutate, run_one, split_points, timed

# FunctionCall ('F') is forwarded only for a call policy can see (a built-in large-object function,
# enforcer/postgres/fastpath.py) that it allowed; any other is refused (a DO block raising 42501 goes instead)
CLIENT_TYPES = frozenset(b"QPBDECSHdcfXF")
SERVER_TYPES = frozenset(b"RSKZTDCIsnt12 3AENGHWdcv")
# 42501: startup parameters refused (settings that would bypass policy), before any upstream exists
PROTOCOL_ERROR_STATES = {"08P01", "0A000", "28000", "57P05", "08006", "42501"}


# -- seeds ------------------------------------------------------------------------------------
def client_seeds() -> list[bytes]:
    """Valid client message sequences (after authentication) built with the protocol builders."""
    q = P.build_query
    seeds = [
        q("SELECT 1"),
        q("SELECT * FROM customers WHERE id = 7; UPDATE t SET a = 1"),
        P.build_parse("", "SELECT $1::int", [23]) + P.build_bind("", "", [b"42"]) + P.build_describe("P", "")
        + P.build_execute("", 0) + P.build_sync(),
        P.build_parse("s1", "SELECT name FROM customers WHERE id = $1") + P.build_sync()
        + P.build_bind("p1", "s1", [b"1"], [1], [0]) + P.build_execute("p1", 10) + P.build_flush()
        + P.build_close("P", "p1") + P.build_sync(),
        q("COPY t FROM STDIN") + P.build_copy_data(b"1\tx\n") + P.build_copy_done(),
        q("COPY t FROM STDIN") + P.build_copy_fail("client gave up"),
        P.build_function_call(1598, [b"\x00\x00\x00\x01", None], [1]),      # refused, never forwarded
        P.build_function_call(952, [b"\x00\x00\x40\x01", b"\x00\x04\x00\x00"], [1]),  # lo_open: decided
        q("BEGIN") + P.build_function_call(1598, []) + q("COMMIT"),
        q("DEALLOCATE s1; PREPARE s1 AS SELECT 1") + P.build_bind("", "s1", []) + P.build_execute("", 0)
        + P.build_sync(),
        P.build_parse("s1", "SELECT 1") + P.build_parse("s1", "SELECT 2") + P.build_bind("", "s1", [])
        + P.build_execute("", 0) + P.build_sync() + q("DISCARD ALL"),
        q("BEGIN") + q("SELECT 2") + q("COMMIT") + P.build_terminate(),
        q(""),
    ]
    return seeds


def startup_seeds() -> list[bytes]:
    return [
        P.build_startup_message({"user": "alice", "database": "app", "application_name": "fuzz"}),
        P.build_ssl_request() + P.build_startup_message({"user": "bob"}),
        P.build_gssenc_request(),
        P.build_cancel_request(1234, b"\x01\x02\x03\x04"),
        P.build_startup_message({"user": "carol", "_pq_.x": "1"}, P.PROTOCOL_3_2),
        P.build_startup_message({"user": "dave", "database": "app", "client_encoding": "UTF8", "DateStyle": "ISO",
                                 "TimeZone": "UTC", "options": "-c statement_timeout=5s --lock_timeout=1s"}),
        P.build_startup_message({"user": "eve", "options": "-c r\\ole=admin", "search_path": "evil"}),  # refused
    ]


def server_seeds() -> list[bytes]:
    rd = P.build_row_description([P.FieldDescription("id", 0, 0, 23, 4, -1, 0),
                                  P.FieldDescription("name", 0, 0, 25, -1, -1, 0)])
    seeds = [
        rd + P.build_data_row([b"1", b"alice"]) + P.build_data_row([None, b""]) + P.build_command_complete("SELECT 2")
        + P.build_ready_for_query("I"),
        P.build_parse_complete() + P.build_bind_complete() + P.build_no_data() + P.build_command_complete("UPDATE 3")
        + P.build_ready_for_query("T"),
        P.build_error_response("42P01", "relation does not exist") + P.build_ready_for_query("E"),
        P.build_notice_response({"S": "NOTICE", "C": "00000", "M": "hi"}) + P.build_parameter_status("TimeZone", "UTC")
        + P.build_notification(7, "chan", "payload") + P.build_empty_query_response() + P.build_ready_for_query("I"),
        P.build_copy_in_response(0, [0, 0]) + P.build_command_complete("COPY 1") + P.build_ready_for_query("I"),
        P.build_copy_out_response(0, [0]) + P.build_copy_data(b"1\n") + P.build_copy_done()
        + P.build_command_complete("COPY 1") + P.build_ready_for_query("I"),
        P.build_portal_suspended() + P.build_function_call_response(b"\x00\x00\x00\x01") + P.build_ready_for_query("I"),
    ]
    return seeds


def auth_server_seeds() -> list[bytes]:
    return [
        P.build_authentication_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])
        + P.build_authentication_sasl_continue(b"r=abc,s=c2FsdA==,i=4096"),
        P.build_authentication_md5(b"salt"),
        P.build_authentication_ok() + P.build_parameter_status("server_version", "15.4")
        + P.build_backend_key_data(4242, b"\x00\x01\x02\x03") + P.build_ready_for_query("I"),
        P.build_error_response("28P01", "password authentication failed", severity="FATAL"),
    ]


def boundaries_of(data: bytes, typed: bool = True) -> list[int]:
    """Offsets of the length fields of the messages in a well-formed stream."""
    out, pos = [], 0
    while pos + 5 <= len(data):
        if not typed:
            out.append(pos)
            pos += max(8, int.from_bytes(data[pos:pos + 4], "big"))
            typed = True
            continue
        out.append(pos + 1)
        pos += 1 + int.from_bytes(data[pos + 1:pos + 5], "big")
    return out


# -- the harness --------------------------------------------------------------------------------
class Driver:
    """Runs one PostgresSession like the proxy does and checks every action it returns."""

    def __init__(self, deny_every: int = 0, inline: bool = False):
        # inline: the session decides through `decide` as under the proxy (with the proxy's
        # reuse of one verdict per text, so the C lane sees record templates); else DECIDE actions
        self.session = S.PostgresSession(identity="fuzz", target="db", max_message_bytes=1 << 20,
                                         decide=self._decide if inline else None)
        self._memo: dict = {}
        self.to_server = bytearray()
        self.to_client = bytearray()
        self.closed = False
        self.upstream = False
        self.decisions = 0
        self.deny_every = deny_every
        self.startup_answers = bytearray()

    def run(self, actions: list) -> None:
        i = 0
        while i < len(actions):
            kind, payload = actions[i]
            if self.closed and kind in (S.TO_SERVER, S.TO_CLIENT):
                raise PropertyViolation(f"bytes forwarded after CLOSE: {kind} {payload[:40]!r}")
            if kind == S.TO_SERVER:
                if not self.upstream:
                    raise PropertyViolation("bytes for the server before the upstream was opened")
                self.to_server += payload
            elif kind == S.TO_CLIENT:
                if payload in (b"N", b"S") and not self.upstream:
                    self.startup_answers += payload     # one-byte answers to SSLRequest/GSSENCRequest
                else:
                    self.to_client += payload
            elif kind == S.CONNECT_UPSTREAM:
                try:
                    pkt = P.parse_startup_packet(payload)
                except P.ProtocolError as exc:
                    raise PropertyViolation(f"an invalid startup packet was forwarded: {exc}") from exc
                if pkt.kind != "startup" or "user" not in pkt.params:
                    raise PropertyViolation(f"forwarded startup packet of kind {pkt.kind}")
                self.upstream = True
            elif kind == S.DECIDE:
                actions[i + 1:i + 1] = self.session.resume(self._verdicts(payload.sql))
            elif kind == S.CLOSE:
                if payload != "cancel_request":
                    self._check_error_before_close()
                self.closed = True
            elif kind == S.START_CLIENT_TLS:
                raise PropertyViolation("TLS started although the session was told none is available")
            i += 1

    def _verdicts(self, sql: str) -> list:
        self.decisions += 1
        allowed = not (self.deny_every and self.decisions % self.deny_every == 0)
        return [S.Verdict(allowed, sql)]

    def _decide(self, sql: str) -> list:
        if sql not in self._memo:
            self._memo[sql] = self._verdicts(sql)
        return self._memo[sql]

    def _check_error_before_close(self) -> None:
        msgs, rest = P.split_messages(bytes(self.to_client))
        if rest or not msgs or msgs[-1][0] != b"E":
            raise PropertyViolation(f"CLOSE without a final ErrorResponse to the client: {bytes(self.to_client[-60:])!r}")
        fields = P.parse_error_fields(msgs[-1][1])
        if fields.get("S") != "FATAL" or len(fields.get("C", "")) != 5 or not fields.get("M"):
            raise PropertyViolation(f"closing ErrorResponse is not protocol-correct: {fields}")
        if fields["C"] not in PROTOCOL_ERROR_STATES:
            raise PropertyViolation(f"protocol error closed with unexpected SQLSTATE {fields['C']}")

    def check_framing(self) -> None:
        for name, stream, types in (("server", self.to_server, CLIENT_TYPES), ("client", self.to_client, None)):
            data = bytes(stream)
            msgs, rest = P.split_messages(data)
            if rest:
                raise PropertyViolation(f"a partial message was forwarded to the {name}: {rest[:40]!r}")
            if types is not None:
                bad = [t for t, _ in msgs if t[0] not in types]
                if bad:
                    raise PropertyViolation(f"message types {bad[:3]} forwarded to the server")
                for t, body in msgs:
                    if t == b"F":
                        call = P.parse_function_call(body)
                        if fastpath.known_call(call.function_oid, len(call.args)) is None:
                            raise PropertyViolation(f"a FunctionCall of OID {call.function_oid} reached the server")

    # the session brought to READY with a normal handshake
    def handshake(self) -> None:
        self.run(self.session.feed_client(P.build_startup_message({"user": "alice", "database": "app"})))
        self.run(self.session.feed_server(P.build_authentication_ok() + P.build_backend_key_data(7, b"abcd")
                                          + P.build_ready_for_query("I")))
        if self.session.phase != S.READY:
            raise PropertyViolation(f"handshake did not reach READY: {self.session.phase}")
        self.to_client.clear()      # the handshake's own output is checked by check_framing in its run


def fuzz_client_bytes(chunks: list[bytes], ready: bool = True, deny_every: int = 0, inline: bool = False) -> bool:
    """Client bytes into a session (READY, or from the very first byte). True if it was closed."""
    d = Driver(deny_every, inline)
    if ready:
        d.handshake()
    for chunk in chunks:
        d.run(d.session.feed_client(chunk))
        if d.closed:
            break
    if not d.closed and d.upstream:
        # let the server answer something so the session's bookkeeping runs on replies too
        d.run(d.session.feed_server(P.build_ready_for_query("I")))
    d.run(d.session.finish("fuzz_end"))
    d.check_framing()
    return d.closed


def fuzz_server_bytes(chunks: list[bytes], ready: bool = True) -> bool:
    """Server bytes into a session that sent a query (READY) or is authenticating."""
    d = Driver()
    if ready:
        d.handshake()
        d.run(d.session.feed_client(P.build_query("SELECT 1") + P.build_parse("s", "SELECT $1")
                                    + P.build_bind("", "s", [b"1"]) + P.build_execute("", 0) + P.build_sync()))
    else:
        d.run(d.session.feed_client(P.build_startup_message({"user": "alice", "database": "app"})))
    for chunk in chunks:
        d.run(d.session.feed_server(chunk))
        if d.closed:
            break
    if not d.closed:
        d.run(d.session.feed_client(P.build_query("SELECT 2")))
    d.run(d.session.finish("fuzz_end"))
    d.check_framing()
    return d.closed


# -- mutation targets (fast, seeded) -----------------------------------------------------------------
def mutation_target(name: str, n: int, seed: int) -> Stats:
    rng = random.Random(seed)
    stats = Stats(name)
    if name == "pg_client_mutated":
        corpus = client_seeds()
        startups = startup_seeds()
    elif name == "pg_server_mutated":
        corpus = server_seeds()
        startups = auth_server_seeds()
    else:
        raise ValueError(name)
    with timed(stats):
        for _ in range(n):
            ready = rng.random() < 0.75
            if ready:
                base = rng.choice(corpus)
                if rng.random() < 0.3:
                    base += rng.choice(corpus)
                data = mutate(rng, base, boundaries_of(base), corpus=corpus)
            else:
                base = rng.choice(startups)
                data = mutate(rng, base, boundaries_of(base, typed=name != "pg_client_mutated"), corpus=startups)
            chunks = split_points(rng, data)
            if name == "pg_client_mutated":
                run_one(stats, lambda c: fuzz_client_bytes(c, ready, deny_every=rng.choice((0, 2)),
                                                           inline=rng.random() < 0.5), chunks)
            else:
                run_one(stats, lambda c: fuzz_server_bytes(c, ready), chunks)
    return stats


# -- Hypothesis targets: message sequences generated from the builders, then damaged ---------------------
_text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=40)
_name = st.sampled_from(["", "s1", "p1", "x"])
_param = st.one_of(st.none(), st.binary(max_size=12))


@st.composite
def client_message(draw):
    kind = draw(st.sampled_from("QPBDESHCdcfFX"))
    if kind == "Q":
        return P.build_query(draw(_text))
    if kind == "P":
        return P.build_parse(draw(_name), draw(_text), draw(st.lists(st.integers(0, 3000), max_size=3)))
    if kind == "B":
        params = draw(st.lists(_param, max_size=4))
        return P.build_bind(draw(_name), draw(_name), params, draw(st.lists(st.integers(0, 1), max_size=2)),
                            draw(st.lists(st.integers(0, 1), max_size=2)))
    if kind == "D":
        return P.build_describe(draw(st.sampled_from("SP")), draw(_name))
    if kind == "E":
        return P.build_execute(draw(_name), draw(st.integers(0, 100)))
    if kind == "S":
        return P.build_sync()
    if kind == "H":
        return P.build_flush()
    if kind == "C":
        return P.build_close(draw(st.sampled_from("SP")), draw(_name))
    if kind == "d":
        return P.build_copy_data(draw(st.binary(max_size=20)))
    if kind == "c":
        return P.build_copy_done()
    if kind == "f":
        return P.build_copy_fail(draw(_text))
    if kind == "F":
        oid = draw(st.one_of(st.integers(0, 5000), st.sampled_from([952, 953, 954, 955, 964, 3170])))
        return P.build_function_call(oid, draw(st.lists(_param, max_size=3)))
    return P.build_terminate()


@st.composite
def server_message(draw):
    kind = draw(st.sampled_from("TDCZE12nsIAKSN"))
    if kind == "T":
        n = draw(st.integers(0, 3))
        return P.build_row_description([P.FieldDescription(f"c{i}", 0, 0, 25, -1, -1, 0) for i in range(n)])
    if kind == "D":
        return P.build_data_row(draw(st.lists(_param, max_size=3)))
    if kind == "C":
        return P.build_command_complete(draw(st.sampled_from(["SELECT 1", "UPDATE 0", "INSERT 0 5", "COPY 3", ""])))
    if kind == "Z":
        return P.build_ready_for_query(draw(st.sampled_from("ITE")))
    if kind == "E":
        return P.build_error_response(draw(st.sampled_from(["42501", "57P01", "XX000"])), draw(_text) or "x",
                                      severity=draw(st.sampled_from(["ERROR", "FATAL"])))
    if kind == "1":
        return P.build_parse_complete()
    if kind == "2":
        return P.build_bind_complete()
    if kind == "n":
        return P.build_no_data()
    if kind == "s":
        return P.build_portal_suspended()
    if kind == "I":
        return P.build_empty_query_response()
    if kind == "A":
        return P.build_notification(draw(st.integers(0, 99)), draw(_name), draw(_text))
    if kind == "K":
        return P.build_backend_key_data(draw(st.integers(0, 2**31 - 1)), draw(st.binary(min_size=4, max_size=8)))
    if kind == "S":
        return P.build_parameter_status(draw(_name) or "a", draw(_name))
    return P.build_notice_response({"S": "NOTICE", "C": "00000", "M": draw(_text) or "n"})


@st.composite
def damaged(draw, message_strategy):
    data = b"".join(draw(st.lists(message_strategy, min_size=1, max_size=8)))
    if draw(st.booleans()):
        seed = draw(st.integers(0, 2**32 - 1))
        data = mutate(random.Random(seed), data, boundaries_of(data))
    cut = draw(st.lists(st.integers(0, max(0, len(data))), max_size=4))
    points = sorted(set(cut))
    chunks, prev = [], 0
    for p in points:
        chunks.append(data[prev:p])
        prev = p
    chunks.append(data[prev:])
    return [c for c in chunks if c] or [b""]


def hypothesis_target(name: str, n: int) -> Stats:
    stats = Stats(name)
    strategy = damaged(client_message() if name == "pg_client_generated" else server_message())
    if name == "pg_client_generated":
        # half the inputs decided inline, as under the proxy (which half: by the number of reads)
        def fn(chunks):
            return fuzz_client_bytes(chunks, inline=len(chunks) % 2 == 0)
    else:
        fn = fuzz_server_bytes

    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def body(chunks):
        run_one(stats, fn, chunks)

    with timed(stats):
        body()
    return stats


# -- stateful: interleavings of client messages, decisions and server replies ------------------------------
class PgSessionMachine(RuleBasedStateMachine):
    """A model server answers exactly what the session forwards; invariants hold after every step."""

    def __init__(self):
        super().__init__()
        self.d = Driver()
        self.seen = 0                  # bytes of to_server the model server has consumed
        self.replies: list[bytes] = []
        self.in_error = False          # the server skips extended messages after an error until Sync
        self.client_batches = 0        # Sync + Query sent by the client
        self.denied_texts: list[str] = []
        self.n = 0
        self.client_discarding = False   # a denied Parse: the rest up to Sync is skipped

    @initialize()
    def connect(self):
        self.d.handshake()
        self.d.to_server.clear()

    def _send(self, data: bytes, deny: bool = False) -> None:
        self.d.deny_every = 1 if deny else 0
        self.d.run(self.d.session.feed_client(data))
        self._model_server()

    def _model_server(self) -> None:
        msgs, _ = P.split_messages(bytes(self.d.to_server[self.seen:]))
        self.seen = len(self.d.to_server)
        for t, body in msgs:
            t = t.decode()
            if t == "S":
                self.in_error = False
                self.replies.append(P.build_ready_for_query("I"))
            elif t == "Q":
                sql = P.parse_query(body)
                if sql.startswith("DO $warden"):
                    self.replies.append(P.build_error_response("42501", "denied") + P.build_ready_for_query("I"))
                else:
                    self.replies.append(P.build_command_complete("SELECT 1") + P.build_ready_for_query("I"))
            elif self.in_error:
                continue
            elif t == "P":
                self.pending_do = P.parse_parse(body).query.startswith("DO $warden")
                self.replies.append(P.build_parse_complete())
            elif t == "B":
                self.replies.append(P.build_bind_complete())
            elif t == "E":
                if getattr(self, "pending_do", False):
                    self.replies.append(P.build_error_response("42501", "denied"))
                    self.in_error = True
                    self.pending_do = False
                else:
                    self.replies.append(P.build_data_row([b"1"]) + P.build_command_complete("SELECT 1"))

    @rule(deny=st.booleans())
    def query(self, deny):
        self.n += 1
        sql = f"SELECT {self.n} AS q{self.n}"
        if deny:
            self.denied_texts.append(sql)
        if not self.client_discarding:
            # like the server, the session discards a Query sent after an extended-protocol error until Sync
            self.client_batches += 1
        self._send(P.build_query(sql), deny)

    @rule(deny=st.booleans(), named=st.booleans())
    def parse_bind_execute(self, deny, named):
        self.n += 1
        sql = f"SELECT {self.n} AS e{self.n}"
        if deny:
            self.denied_texts.append(sql)
        name = f"st{self.n}" if named else ""
        self.client_discarding = self.client_discarding or deny
        self._send(P.build_parse(name, sql) + P.build_bind("", name, []) + P.build_execute("", 0), deny)

    @rule()
    def sync(self):
        self.client_batches += 1
        self.client_discarding = False
        self._send(P.build_sync())

    @rule()
    def flush(self):
        self._send(P.build_flush())

    @precondition(lambda self: self.replies)
    @rule(count=st.integers(1, 5), split=st.integers(0, 40))
    def server_replies(self, count, split):
        data = b"".join(self.replies[:count])
        del self.replies[:count]
        for chunk in (data[:split], data[split:]) if 0 < split < len(data) else (data,):
            self.d.run(self.d.session.feed_server(chunk))

    @invariant()
    def never_closed(self):
        assert not self.d.closed and self.d.session.phase == S.READY, self.d.session.end_reason

    @invariant()
    def well_framed(self):
        self.d.check_framing()

    @invariant()
    def denied_sql_never_reaches_server(self):
        sent = bytes(self.d.to_server)
        for text in self.denied_texts:
            assert text.encode() not in sent, f"denied statement forwarded: {text}"

    @invariant()
    def quiescent_bookkeeping(self):
        if self.replies or self.d.session.waiting_for_decision:
            return
        msgs, _ = P.split_messages(bytes(self.d.to_client))
        ready = sum(1 for t, _ in msgs if t == b"Z")
        # every Sync and Query is answered to the client exactly once, denied or not
        assert ready == self.client_batches, f"{ready} ReadyForQuery for {self.client_batches} Sync/Query"
        if not self.in_error:
            # every statement the server answered has had its result recorded
            assert not self.d.session._results, f"{len(self.d.session._results)} results never recorded"


def stateful_target(name: str, runs: int, steps: int = 40) -> Stats:
    """`runs` Hypothesis-generated programs of up to `steps` rules; inputs = client/server feeds made."""
    import unittest
    stats = Stats(name)
    PgSessionMachine.TestCase.settings = settings(
        max_examples=runs, stateful_step_count=steps, deadline=None, database=None, derandomize=True,
        suppress_health_check=list(HealthCheck))
    fed = {"n": 0}
    real_run = Driver.run

    def counting_run(self, actions):
        fed["n"] += 1
        return real_run(self, actions)

    Driver.run = counting_run
    try:
        with timed(stats):
            result = unittest.TestResult()
            PgSessionMachine.TestCase("runTest").run(result)
    finally:
        Driver.run = real_run
    for _case, trace in result.errors + result.failures:
        last = trace.strip().splitlines()[-1]
        stats.record_failure("violation" if ("AssertionError" in last or "PropertyViolation" in last) else "crash",
                             "stateful program (see trace)", Exception(last))
    stats.inputs = fed["n"]
    return stats
