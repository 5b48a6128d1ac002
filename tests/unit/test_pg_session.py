"""The sans-IO Postgres session: byte strings in, actions out."""
import pytest

from enforcer.postgres import protocol as P
from enforcer.postgres import session as S
from enforcer.postgres.session import PostgresSession, Verdict


class Driver:
    """Feeds a session and splits its actions; DECIDE is answered by `decider(request) -> [Verdict]`."""

    def __init__(self, session=None, decider=None, **kw):
        self.s = session or PostgresSession(identity="svc-a", target="db1", random_bytes=lambda n: b"\x11" * n, **kw)
        self.decider = decider or (lambda req: [Verdict(True, req.sql)])
        self.requests = []
        self.reset()

    def reset(self):
        self.to_server = b""
        self.to_client = b""
        self.events = []
        self.other = []

    def _run(self, actions):
        for i, (kind, payload) in enumerate(actions):
            if kind == S.TO_SERVER:
                self.to_server += payload
            elif kind == S.TO_CLIENT:
                self.to_client += payload
            elif kind == S.EVENT:
                self.events.append(payload)
            elif kind == S.DECIDE:
                self.requests.append(payload)
                self.on_decide(payload, last=i == len(actions) - 1)
            else:
                self.other.append((kind, payload))
        return self

    def on_decide(self, request, last: bool):
        """A DECIDE: answered at once by the decider."""
        self._run(self.s.resume(self.decider(request)))

    def client(self, data):
        self._run(self.s.feed_client(data))
        return self

    def server(self, data):
        self._run(self.s.feed_server(data))
        return self

    def event_types(self):
        return [t for t, _ in self.events]


STARTUP = P.build_startup_message({"user": "alice", "database": "app", "application_name": "t"})
AUTH_DONE = (P.build_authentication_ok() + P.build_parameter_status("server_version", "15")
             + P.build_backend_key_data(4242, b"\xde\xad\xbe\xef") + P.build_ready_for_query("I"))


def ready_driver(**kw) -> Driver:
    d = Driver(**kw)
    d.client(STARTUP)
    d.server(AUTH_DONE)
    d.reset()
    return d


# ---- startup ---------------------------------------------------------------------------
def test_startup_connects_upstream_with_original_bytes_and_emits_session_start():
    d = Driver()
    d.client(STARTUP)
    assert d.other == [(S.CONNECT_UPSTREAM, STARTUP)]
    assert d.s.phase == S.AUTH
    d.server(AUTH_DONE)
    assert d.s.phase == S.READY
    # BackendKeyData is replaced by our own key; the server's key is registered for cancel forwarding
    assert P.build_backend_key_data(4242, b"\xde\xad\xbe\xef") not in d.to_client
    cpid, ckey = d.s.client_key
    assert P.build_backend_key_data(cpid, ckey) in d.to_client
    assert (S.REGISTER_CANCEL_KEY, (cpid, ckey, 4242, b"\xde\xad\xbe\xef")) in d.other
    assert d.to_client.endswith(P.build_ready_for_query("I"))
    start = [f for t, f in d.events if t == "session.start"][0]
    assert (start["auth_user"], start["database"], start["application_name"], start["auth_method"]) == ("alice", "app", "t", "trust")


def test_ssl_request_without_tls_answers_n_then_accepts_plain_startup():
    d = Driver()
    d.client(P.build_ssl_request())
    assert d.to_client == b"N"
    d.client(STARTUP)
    assert d.other == [(S.CONNECT_UPSTREAM, STARTUP)]


def test_ssl_request_with_tls_answers_s_and_starts_handshake():
    d = Driver(client_tls_available=True)
    d.client(P.build_ssl_request())
    assert d.to_client == b"S"
    assert d.other == [(S.START_CLIENT_TLS, "sslrequest")]
    d.other.clear()
    d._run(d.s.client_tls_established())
    d.client(STARTUP)
    assert d.other == [(S.CONNECT_UPSTREAM, STARTUP)]
    d.server(AUTH_DONE)
    assert [f for t, f in d.events if t == "session.start"][0]["tls_client"] is True


def test_bytes_after_ssl_request_before_handshake_are_rejected():
    d = Driver(client_tls_available=True)
    d.client(P.build_ssl_request() + STARTUP)          # same packet: injection attempt
    assert b"S" != d.to_client[:1]
    assert P.parse_error_fields(d.to_client[5:])["C"] == "08P01"
    assert (S.CLOSE, "tls_injection") in d.other
    d2 = Driver(client_tls_available=True)
    d2.client(P.build_ssl_request())
    d2.client(STARTUP)                                 # arrives while the handshake should be running
    assert P.parse_error_fields(d2.to_client[6:])["C"] == "08P01"


def test_direct_ssl_first_byte():
    client_hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"
    d = Driver(client_tls_available=True)
    d.client(client_hello)
    assert d.other == [(S.START_CLIENT_TLS, "direct")]
    d2 = Driver()
    d2.client(client_hello)
    assert P.parse_error_fields(d2.to_client[5:])["C"] == "08P01"
    assert (S.CLOSE, "protocol_error") in d2.other


def test_gssenc_request_answered_n():
    d = Driver()
    d.client(P.build_gssenc_request() + STARTUP)
    assert d.to_client == b"N"
    assert d.other == [(S.CONNECT_UPSTREAM, STARTUP)]


def test_cancel_request_becomes_cancel_action():
    d = Driver()
    d.client(P.build_cancel_request(77, b"\x01\x02\x03\x04"))
    assert d.other[0] == (S.CANCEL, (77, b"\x01\x02\x03\x04"))
    assert d.other[1][0] == S.CLOSE
    assert d.to_server == b""


def test_protocol_3_2_negotiated_down():
    d = Driver()
    d.client(P.build_startup_message({"user": "alice", "_pq_.compress": "on"}, P.PROTOCOL_3_2))
    assert d.to_client == P.build_negotiate_protocol_version(0, ["_pq_.compress"])
    kind, startup = d.other[0]
    assert kind == S.CONNECT_UPSTREAM
    pkt = P.parse_startup_packet(startup)
    assert (pkt.major, pkt.minor, pkt.params) == (3, 0, {"user": "alice"})


def test_unsupported_major_version_and_missing_user():
    d = Driver()
    d.client(P.build_startup_message({"user": "a"}, 2 << 16))
    assert P.parse_error_fields(d.to_client[5:])["C"] == "0A000"
    d = Driver()
    d.client(P.build_startup_message({"database": "a"}))
    assert P.parse_error_fields(d.to_client[5:])["C"] == "28000"


def test_startup_split_across_reads():
    d = Driver()
    for i in range(len(STARTUP)):
        d.client(STARTUP[i:i + 1])
    assert d.other == [(S.CONNECT_UPSTREAM, STARTUP)]


# ---- authentication pass-through -------------------------------------------------------
def test_scram_plus_stripped_and_sasl_exchange_forwarded_unchanged():
    d = Driver()
    d.client(STARTUP)
    d.server(P.build_authentication_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]))
    assert d.to_client == P.build_authentication_sasl(["SCRAM-SHA-256"])
    init = P.build_sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=nonce")
    d.client(init)
    assert d.to_server == init
    cont = P.build_authentication_sasl_continue(b"r=nonce2,s=salt,i=4096")
    d.server(cont)
    assert d.to_client.endswith(cont)
    d.client(P.build_sasl_response(b"c=biws,r=nonce2,p=proof"))
    d.server(P.build_authentication_sasl_final(b"v=sig") + AUTH_DONE)
    assert [f for t, f in d.events if t == "session.start"][0]["auth_method"] == "scram-sha-256"


def test_scram_channel_binding_flag_y_after_stripping_plus_gets_a_clear_error():
    d = Driver()
    d.client(STARTUP)
    d.server(P.build_authentication_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]))
    d.reset()
    d.client(P.build_sasl_initial_response("SCRAM-SHA-256", b"y,,n=,r=nonce"))
    assert d.to_server == b""
    err = P.parse_error_fields(d.to_client[5:])
    assert err["C"] == "28000" and "channel_binding=disable" in err["M"]
    assert (S.CLOSE, "auth_channel_binding") in d.other


def test_md5_and_cleartext_forwarded():
    for req, method in ((P.build_authentication_md5(b"salt"), "md5"), (P.build_authentication_cleartext(), "password")):
        d = Driver()
        d.client(STARTUP)
        d.server(req)
        assert d.to_client == req
        d.client(P.build_password("x"))
        assert d.to_server == P.build_password("x")
        d.server(AUTH_DONE)
        assert [f for t, f in d.events if t == "session.start"][0]["auth_method"] == method


def test_auth_failure_forwarded_and_recorded():
    d = Driver()
    d.client(STARTUP)
    err = P.build_error_response("28P01", 'password authentication failed for user "alice"', severity="FATAL")
    d.server(P.build_authentication_md5(b"salt"))
    d.client(P.build_password("bad"))
    d.server(err)
    assert d.to_client.endswith(err)
    d._run(d.s.finish("server_closed"))
    assert d.event_types() == ["session.start", "session.end"]
    assert d.events[1][1]["sqlstate"] == "28P01"


def test_query_before_authentication_is_a_protocol_violation():
    d = Driver()
    d.client(STARTUP)
    d.client(P.build_query("select 1"))
    assert d.to_server == b""
    assert P.parse_error_fields(d.to_client[5:])["C"] == "08P01"


# ---- simple query ----------------------------------------------------------------------
def test_simple_query_forwarded_as_original_bytes_and_recorded():
    d = ready_driver()
    q = P.build_query("select 1")
    d.client(q)
    assert d.to_server == q
    d.server(P.build_row_description([P.FieldDescription("?column?", 0, 0, 23, 4, -1, 0)])
             + P.build_data_row([b"1"]) + P.build_command_complete("SELECT 1") + P.build_ready_for_query("I"))
    # the statement's record carries its decision: no separate policy.decision event
    assert d.event_types() == ["pg.statement", "pg.result"]
    st, res = d.events[0][1], d.events[1][1]
    assert (st["text"], st["protocol"], st["decision"], st["statement_index"]) == ("select 1", "simple", "allow", 1)
    assert (res["command_tag"], res["rows"], res["sqlstate"], res["statement_index"]) == ("SELECT 1", 1, None, 1)


def deny_deletes(req):
    out = []
    for part in [p.strip() for p in req.sql.split(";") if p.strip()]:
        denied = part.lower().startswith("delete")
        out.append(Verdict(not denied, part, action="pg:delete" if denied else "pg:select",
                           decision="deny" if denied else "allow",
                           policy_ids=("no-deletes",) if denied else ()))
    return out


def test_denied_simple_query_is_replaced_by_server_side_raise():
    d = ready_driver(decider=deny_deletes)
    d.client(P.build_query("select 1; delete from t"))
    sql = P.parse_query(d.to_server[5:])
    assert "delete from t" not in sql
    assert sql.startswith("DO $warden$") and "ERRCODE = '42501'" in sql
    assert 'identity "svc-a"' in sql and "pg:delete" in sql and "no-deletes" in sql
    err = P.build_error_response("42501", "permission denied by Warden")
    d.server(err + P.build_ready_for_query("I"))
    assert d.to_client == err + P.build_ready_for_query("I")
    decisions = [f["decision"] for t, f in d.events if t == "pg.statement"]
    assert decisions == ["allow", "deny"]
    assert [f["sqlstate"] for t, f in d.events if t == "pg.result"] == ["42501"]


def test_denial_message_quoting_is_safe():
    v = Verdict(False, "x", action="pg:delete", reason="it's $warden$ \\ bad")
    sql = S.denial_do_block(S.denial_message("o'brien", "db", v))
    tag = sql.split(" ", 2)[1][:sql.split(" ", 2)[1].index("$", 1) + 1]
    assert sql.count(tag) == 2          # the body cannot close the dollar quote early
    assert "o''brien" in sql and "it''s" in sql and "\\\\" in sql


def test_client_input_is_held_while_a_decision_is_pending():
    d = ready_driver()
    actions = d.s.feed_client(P.build_query("select 1") + P.build_query("select 2"))
    assert [k for k, _ in actions] == [S.DECIDE]
    assert d.s.feed_client(P.build_query("select 3")) == []
    rest = d.s.resume([Verdict(True, "select 1")])
    assert rest[-1][0] == S.DECIDE and rest[-1][1].sql == "select 2"
    assert (S.TO_SERVER, P.build_query("select 1")) in rest


# ---- extended protocol -----------------------------------------------------------------
def extended_batch(sql, params=(b"1",), name=""):
    return (P.build_parse(name, sql) + P.build_bind("", name, list(params)) + P.build_describe("P", "")
            + P.build_execute("", 0) + P.build_sync())


def test_extended_allowed_forwards_original_bytes_and_records_params():
    d = ready_driver()
    batch = extended_batch("select $1")
    d.client(batch)
    assert d.to_server == batch
    d.server(P.PARSE_COMPLETE + P.BIND_COMPLETE + P.build_row_description([P.FieldDescription("x", 0, 0, 25, -1, -1, 0)])
             + P.build_data_row([b"1"]) + P.build_command_complete("SELECT 1") + P.build_ready_for_query("I"))
    assert d.to_client.startswith(P.PARSE_COMPLETE + P.BIND_COMPLETE)
    st = [f for t, f in d.events if t == "pg.statement"][0]
    assert (st["text"], st["params"], st["protocol"], st["statement_name"]) == ("select $1", ["1"], "extended", "")


def test_extended_denied_parse_injects_raise_and_discards_until_sync():
    d = ready_driver(decider=deny_deletes)
    d.client(extended_batch("delete from t where id = $1"))
    msgs, rest = P.split_messages(d.to_server)
    assert rest == b""
    assert [m[0] for m in msgs] == [b"P", b"B", b"E", b"S"]       # client's Bind/Describe/Execute discarded
    assert "delete from t" not in P.parse_parse(msgs[0][1]).query
    assert P.parse_parse(msgs[0][1]).query.startswith("DO $warden$")
    # server answers our injected Parse/Bind, then raises, then ReadyForQuery
    err = P.build_error_response("42501", "permission denied by Warden")
    d.server(P.PARSE_COMPLETE + P.BIND_COMPLETE + err + P.build_ready_for_query("I"))
    assert d.to_client == err + P.build_ready_for_query("I")     # replies to injected messages swallowed
    st = [f for t, f in d.events if t == "pg.statement"]
    assert [(f["decision"], f["policy_ids"]) for f in st] == [("deny", ["no-deletes"])]
    # the session is usable afterwards
    d.reset()
    d.client(extended_batch("select $1"))
    assert d.to_server == extended_batch("select $1")


def test_denied_parse_inside_pipeline_keeps_earlier_replies():
    d = ready_driver(decider=deny_deletes)
    allowed = extended_batch("select $1")
    d.client(allowed[:-5] + extended_batch("delete from t")[:-5] + P.build_sync() + extended_batch("select $1"))
    msgs, _ = P.split_messages(d.to_server)
    assert [m[0] for m in msgs] == [b"P", b"B", b"D", b"E", b"P", b"B", b"E", b"S", b"P", b"B", b"D", b"E", b"S"]
    err = P.build_error_response("42501", "denied")
    first = (P.PARSE_COMPLETE + P.BIND_COMPLETE + P.NO_DATA + P.build_command_complete("SELECT 1"))
    d.server(first + P.PARSE_COMPLETE + P.BIND_COMPLETE + err + P.build_ready_for_query("T"))
    assert d.to_client == first + err + P.build_ready_for_query("T")
    second = P.PARSE_COMPLETE + P.BIND_COMPLETE + P.NO_DATA + P.build_command_complete("SELECT 1") + P.build_ready_for_query("I")
    d.server(second)
    assert d.to_client.endswith(second)


def test_named_statement_decided_once_and_reused():
    calls = []

    def decider(req):
        calls.append(req.sql)
        return [Verdict(True, req.sql, action="pg:select")]

    d = ready_driver(decider=decider)
    d.client(P.build_parse("s1", "select $1") + P.build_sync())
    for i in range(3):
        d.client(P.build_bind("", "s1", [str(i).encode()]) + P.build_execute() + P.build_sync())
    assert calls == ["select $1"]
    params = [f["params"] for t, f in d.events if t == "pg.statement"]
    assert params == [["0"], ["1"], ["2"]]
    assert all(f["action"] == "pg:select" for t, f in d.events if t == "pg.statement")


def test_error_skips_remaining_results_of_batch():
    d = ready_driver()
    d.client(extended_batch("select $1")[:-5] + extended_batch("select $1"))
    err = P.build_error_response("22P02", "bad input")
    d.server(P.PARSE_COMPLETE + P.BIND_COMPLETE + err + P.build_ready_for_query("I"))
    results = [f for t, f in d.events if t == "pg.result"]
    assert [r["sqlstate"] for r in results] == ["22P02", None]
    assert "not executed" in results[1]["error"]


# ---- COPY, notices, function calls -----------------------------------------------------
def test_copy_in_and_out_forwarded():
    d = ready_driver()
    d.client(P.build_query("copy t from stdin"))
    d.server(P.build_copy_in_response(0, [0]))
    data = P.build_copy_data(b"1\n") + P.build_copy_data(b"2\n") + P.build_copy_done()
    d.client(data)
    assert d.to_server.endswith(data)
    d.server(P.build_command_complete("COPY 2") + P.build_ready_for_query("I"))
    d.client(P.build_query("copy t to stdout"))
    out = (P.build_copy_out_response(0, [0]) + P.build_copy_data(b"1\n") + P.build_copy_done()
           + P.build_command_complete("COPY 1") + P.build_ready_for_query("I"))
    d.server(out)
    assert d.to_client.endswith(out)
    assert [(f["command_tag"], f["rows"]) for t, f in d.events if t == "pg.result"] == [("COPY 2", 2), ("COPY 1", 1)]


def test_async_messages_pass_through():
    d = ready_driver()
    msgs = (P.build_notice_response({"S": "NOTICE", "C": "00000", "M": "x"}) + P.build_notification(1, "c", "p")
            + P.build_parameter_status("TimeZone", "UTC"))
    d.server(msgs)
    assert d.to_client == msgs


def test_copy_fail_and_flush_forwarded_function_call_refused():
    d = ready_driver()
    m = P.build_flush() + P.build_copy_fail("x")
    d.client(P.build_function_call(1598, [], []) + m)
    # the fast-path FunctionCall never reaches the server: a DO block raising 42501 goes in its
    # place (tests/unit/test_pg_session_hardening.py), the rest is forwarded as it came
    sent = P.split_messages(d.to_server)[0]
    assert [t for t, _ in sent] == [b"Q", b"H", b"f"]
    assert P.parse_query(sent[0][1]).startswith("DO $warden$")
    assert d.to_server.endswith(m)


# ---- limits and malformed input --------------------------------------------------------
def test_oversize_message_gets_08p01_and_close():
    d = ready_driver(max_message_bytes=1024)
    d.client(P.build_query("x" * 2000)[:100])
    assert d.to_server == b""
    err = P.parse_error_fields(d.to_client[5:])
    assert err["C"] == "08P01" and "max_message_bytes" in err["M"]
    assert (S.CLOSE, "message_too_large") in d.other
    assert d.events[-1][0] == "session.end"
    # the record says why, in the words the client got
    assert d.events[-1][1]["error"] == err["M"] and d.events[-1][1]["sqlstate"] == "08P01"


def test_session_end_has_no_error_when_the_session_was_not_ended_by_warden():
    d = ready_driver()
    d._run(d.s.finish("client_terminated"))
    assert d.events[-1][0] == "session.end" and d.events[-1][1]["error"] is None


def test_unknown_message_type_and_bad_length():
    d = ready_driver()
    d.client(b"?\x00\x00\x00\x04")
    assert P.parse_error_fields(d.to_client[5:])["C"] == "08P01"
    d = ready_driver()
    d.client(b"Q\x00\x00\x00\x01")
    assert P.parse_error_fields(d.to_client[5:])["C"] == "08P01"


def test_messages_split_at_every_byte_are_reassembled():
    d = ready_driver()
    batch = extended_batch("select $1") + P.build_query("select 2")
    for i in range(len(batch)):
        d.client(batch[i:i + 1])
    assert d.to_server == batch


# ---- masking point ---------------------------------------------------------------------
class MaskEmail:
    def plan_for(self, fields, text=None, lookup=None):
        idx = [i for i, f in enumerate(fields) if f.name == "email"]
        return _Plan(idx) if idx else None


class _Plan:
    def __init__(self, idx):
        self.idx = idx

    def mask_data_row(self, payload):
        values = P.parse_data_row(payload)
        for i in self.idx:
            if values[i] is not None:
                values[i] = b"***"
        return P.build_data_row_body(values)


def test_masking_plan_applies_to_data_rows_and_unmasked_rows_are_untouched():
    d = ready_driver(masking=MaskEmail())
    rd = P.build_row_description([P.FieldDescription("id", 1, 1, 23, 4, -1, 0), P.FieldDescription("email", 1, 2, 25, -1, -1, 0)])
    d.server(rd + P.build_data_row([b"1", b"a@x"]) + P.build_command_complete("SELECT 1"))
    assert d.to_client == rd + P.build_data_row([b"1", b"***"]) + P.build_command_complete("SELECT 1")
    rd2 = P.build_row_description([P.FieldDescription("id", 1, 1, 23, 4, -1, 0)])
    plain = rd2 + P.build_data_row([b"1"]) + P.build_command_complete("SELECT 1")
    d.reset()
    d.server(plain)
    assert d.to_client == plain


def test_verdict_with_text_copies_every_other_field():
    """with_text replaces dataclasses.replace on the decision path: a field added to Verdict
    later must be carried over too."""
    import dataclasses
    values = {f.name: (f"v-{f.name}" if f.type in ("str", "Optional[str]") else (f.name,) if f.type == "tuple"
                       else False) for f in dataclasses.fields(Verdict)}
    original = Verdict(**values)
    copy = original.with_text("select 2")
    assert copy.text == "select 2"
    assert {k: v for k, v in dataclasses.asdict(copy).items() if k != "text"} == \
        {k: v for k, v in dataclasses.asdict(original).items() if k != "text"}


def _verdicts_denying_forbidden(sql):
    if "forbidden" in sql:
        return [Verdict(False, sql, action="pg:delete", kind="delete", decision="deny", policy_ids=("no",),
                        reason="denied")]
    return [Verdict(True, sql, action="pg:select", kind="select", policy_ids=("yes",))]


INLINE_STREAM = (P.build_query("SELECT 1") + P.build_query("DELETE FROM forbidden")
                 + P.build_parse("s", "SELECT $1::int") + P.build_bind("", "s", [b"7"]) + P.build_execute("", 0)
                 + P.SYNC + P.build_parse("", "DELETE FROM forbidden") + P.build_bind("", "")
                 + P.build_execute("", 0) + P.SYNC + P.build_query("SELECT 2"))


@pytest.mark.parametrize("cut", [None, 9, 40, 77])
def test_inline_decisions_give_what_decide_round_trips_give(cut):
    """A session given `decide` answers statements itself and goes on with the same read; the
    bytes, denials and records are those of DECIDE actions answered by the shell."""
    round_trips = ready_driver(decider=lambda req: _verdicts_denying_forbidden(req.sql))
    inline = ready_driver(decide=_verdicts_denying_forbidden)
    for d in (round_trips, inline):
        if cut is None:
            d.client(INLINE_STREAM)
        else:
            d.client(INLINE_STREAM[:cut]).client(INLINE_STREAM[cut:])
    assert len(round_trips.requests) == 5 and inline.requests == []
    assert inline.to_server == round_trips.to_server
    assert inline.to_client == round_trips.to_client
    assert inline.events == round_trips.events
    assert b"DELETE FROM forbidden" not in inline.to_server and b"42501" in inline.to_server
    assert [f["decision"] for t, f in inline.events if t == "pg.statement"] == ["allow", "deny", "allow", "deny",
                                                                                  "allow"]


def test_inline_decider_without_an_answer_asks_with_decide_and_holds_the_rest():
    held = ready_driver(decide=lambda sql: None if "approve" in sql else [Verdict(True, sql)],
                        decider=lambda req: [Verdict(True, req.sql)])
    held.client(P.build_query("SELECT 1") + P.build_query("DELETE approve") + P.build_query("SELECT 2"))
    assert [r.sql for r in held.requests] == ["DELETE approve"]
    assert held.to_server == (P.build_query("SELECT 1") + P.build_query("DELETE approve")
                              + P.build_query("SELECT 2"))
    assert [f["statement_index"] for _, f in held.events] == [1, 2, 3]


def test_at_rest_only_when_the_client_owes_the_next_move_with_nothing_open(lane):
    """What a stopping agent waits for before it ends a session (57P01)."""
    d = ready_driver()
    assert d.s.at_rest
    d.client(P.build_query("SELECT 1"))
    assert not d.s.at_rest                                   # running: its answer is owed
    d.server(P.build_row_description([]) + P.build_command_complete("SELECT 0") + P.build_ready_for_query("I"))
    assert d.s.at_rest
    d.client(P.build_query("BEGIN"))
    d.server(P.build_command_complete("BEGIN") + P.build_ready_for_query("T"))
    assert not d.s.at_rest                                   # a transaction is open
    d.client(P.build_query("COMMIT"))
    d.server(P.build_command_complete("COMMIT") + P.build_ready_for_query("I"))
    assert d.s.at_rest
    d.client(P.build_parse("", "SELECT 1", []) + P.build_bind("", "", [], []) + P.build_execute("", 0))
    assert not d.s.at_rest                                   # extended protocol before its Sync
