"""Approvals in the extended query protocol are per execution: a Parse of a statement that needs
approval goes to the server (parsing runs nothing), and each Bind of it is held, with the values
it binds shown to the approver. Bytes in, actions out, with the shell's real decider
(_Connection._decide_inline, proxy.decide) and Cedar; run with the C lane and without it."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from enforcer import approvals as A
from enforcer.context import ConnectionContext, TargetInfo
from enforcer.policy.engine import ALLOW, DENY, Decision, PolicyEngine
from enforcer.postgres import protocol as P
from enforcer.postgres import proxy
from enforcer.postgres import session as S
from enforcer.postgres.proxy import _Connection
from enforcer.postgres.session import PostgresSession
from records.schema import validate_fields
from tests.unit.test_pg_session import AUTH_DONE, STARTUP, Driver
from tests.unit.test_pg_session_masking import messages

POLICY = """
@id("housekeeping")
permit (principal == Service::"svc", action == Action::"pg:other", resource == Target::"db");
@id("deletes")
permit (principal == Service::"svc", action == Action::"pg:delete", resource == Table::"db/public.t");
@id("inserts")
permit (principal == Service::"svc", action == Action::"pg:insert", resource == Table::"db/public.t");
@id("reads")
permit (principal == Service::"svc", action == Action::"pg:select", resource == Table::"db/public.t");
@id("deletes-need-approval")
@approval("required")
forbid (principal, action == Action::"pg:delete", resource == Table::"db/public.t")
unless { context.approved };
"""
DELETE = "DELETE FROM t WHERE id = $1"
Z_IDLE = P.build_ready_for_query("I")
DELETED = P.BIND_COMPLETE + P.NO_DATA + P.build_command_complete("DELETE 1")


class Approvals:
    """The approval service: answers in order, and what it was asked (text, params, key, index)."""

    def __init__(self, *answers: str):
        self.answers = list(answers)
        self.asked = []

    async def request(self, ctx, sd, params=None, params_key=None, statement_index=None):
        self.asked.append((sd.statement.text, params, params_key, statement_index))
        kind = self.answers.pop(0)
        return Decision(kind, sd.decision.action, sd.decision.policy_ids,
                        "approved by bob: ok" if kind == ALLOW else "approval a1 denied by bob: no")


class Sink:
    def __init__(self):
        self.events = []

    def emit(self, event_type, fields, session_id=None):
        validate_fields(event_type, fields)
        self.events.append((event_type, fields))


class Held(Driver):
    """A session with the shell's decider; a DECIDE is kept (not answered) until `decide()`,
    which answers it with proxy.decide as the shell's _decide_slow does."""

    def __init__(self, approvals=None, masking=None):
        target = TargetInfo(name="db", protocol="postgres", upstream_host="127.0.0.2", upstream_port=5432)
        self.sink = Sink()
        self.ctx = ConnectionContext(session_id="s", identity="svc", identity_attrs={}, target=target,
                                     attribution=None, sink=self.sink, policy=PolicyEngine.from_text(POLICY),
                                     approvals=approvals, masking=masking)
        conn = object.__new__(_Connection)      # only the decision state, no sockets
        conn.ctx, conn._verdicts, conn._shape_verdicts, conn._verdicts_key = self.ctx, {}, {}, None
        conn.session = PostgresSession(identity="svc", target="db", random_bytes=lambda n: b"\x11" * n,
                                       decide=conn._decide_inline, masking=masking)
        super().__init__(conn.session)
        self.pending = None
        self.client(STARTUP)
        self.server(AUTH_DONE)
        self.reset()

    def on_decide(self, request, last: bool):
        assert last, "DECIDE is the last action"
        if getattr(request, "params", None) is None:
            # a Query or Parse: the shell answers at once unless an approval is needed
            self._run(self.s.resume(asyncio.run(proxy.decide(self.ctx, request))))
        else:
            assert self.s.waiting_for_decision
            self.pending = request

    def decide(self):
        req, self.pending = self.pending, None
        return self._run(self.s.resume(asyncio.run(proxy.decide(self.ctx, req))))

    def statements(self):
        return [f for t, f in self.events if t == "pg.statement"]


def execution(params, portal="", statement="") -> bytes:
    return P.build_bind(portal, statement, params) + P.build_describe("P", portal) + P.build_execute(portal, 0)


def test_parse_is_forwarded_and_the_bind_held_with_its_parameters(lane):
    approvals = Approvals(ALLOW)
    h = Held(approvals)
    parse = P.build_parse("", DELETE)
    h.client(parse + execution([b"1"]) + P.SYNC)
    # the Parse reached the server; the Bind and everything after it wait
    assert h.to_server == parse
    assert h.s.waiting_for_decision and h.statements() == []
    req = h.pending
    assert (req.sql, req.protocol, req.params, req.statement_index) == (DELETE, "extended", ["1"], 1)
    assert approvals.asked == []            # the Parse asked nobody
    # later input waits too; the server's answer to the Parse goes on to the client
    h.client(P.build_query("SELECT 1 FROM t"))
    h.server(P.PARSE_COMPLETE)
    assert h.to_server == parse and h.to_client == P.PARSE_COMPLETE
    h.decide()
    assert approvals.asked == [(DELETE, ["1"], req.params_key, 1)]
    assert h.to_server == parse + execution([b"1"]) + P.SYNC + P.build_query("SELECT 1 FROM t")
    (rec, query) = h.statements()
    assert (rec["text"], rec["params"], rec["decision"], rec["action"], rec["statement_index"]) == (
        DELETE, ["1"], "allow", "pg:delete", 1)
    assert rec["policy_ids"] == ["deletes-need-approval"] and rec["reason"] == "approved by bob: ok"
    assert (query["text"], query["decision"]) == ("SELECT 1 FROM t", "allow")
    h.server(DELETED + Z_IDLE)
    assert h.to_client == P.PARSE_COMPLETE + DELETED + Z_IDLE
    (result,) = [f for t, f in h.events if t == "pg.result"]
    assert (result["command_tag"], result["statement_index"]) == ("DELETE 1", 1)


def test_denied_execution_gets_42501_and_the_batch_is_discarded_until_sync(lane):
    h = Held(Approvals(DENY))
    parse = P.build_parse("", DELETE)
    h.client(parse + execution([b"7"]) + P.SYNC)
    h.decide()
    # the server itself raises the error in place of the Bind; Describe/Execute never go
    msgs = messages(h.to_server)
    assert [m[0] for m in msgs] == [b"P", b"P", b"B", b"E", b"S"]
    do = P.parse_parse(msgs[1][1]).query
    assert do.startswith("DO $warden$") and "ERRCODE = '42501'" in do and "deletes-need-approval" in do
    assert DELETE not in do and "denied by bob" in do
    err = P.build_error_response("42501", "permission denied by Warden")
    h.server(P.PARSE_COMPLETE + P.PARSE_COMPLETE + P.BIND_COMPLETE + err + Z_IDLE)
    # the client's own Parse is answered; our DO block's replies are swallowed
    assert h.to_client == P.PARSE_COMPLETE + err + Z_IDLE
    (rec,) = h.statements()
    assert (rec["params"], rec["decision"], rec["reason"]) == (["7"], "deny", "approval a1 denied by bob: no")
    assert [f["sqlstate"] for t, f in h.events if t == "pg.result"] == ["42501"]
    # the session goes on: the next batch is read and decided again
    h.reset()
    h.client(P.build_parse("", "SELECT id FROM t WHERE id = $1") + execution([b"1"]) + P.SYNC)
    assert h.to_server == P.build_parse("", "SELECT id FROM t WHERE id = $1") + execution([b"1"]) + P.SYNC


def test_denied_execution_inside_a_transaction_aborts_it(lane):
    h = Held(Approvals(DENY))
    h.client(P.build_query("BEGIN"))
    h.server(P.build_command_complete("BEGIN") + P.build_ready_for_query("T"))
    h.client(P.build_parse("", "INSERT INTO t VALUES ($1)") + execution([b"5"]) + P.SYNC)
    h.server(P.PARSE_COMPLETE + P.BIND_COMPLETE + P.NO_DATA + P.build_command_complete("INSERT 0 1")
             + P.build_ready_for_query("T"))
    h.reset()
    h.client(P.build_parse("", DELETE) + execution([b"5"]) + P.SYNC + P.build_query("COMMIT"))
    assert h.s.waiting_for_decision
    h.decide()
    # not an error made up by Warden: the DO block makes the server fail the transaction itself,
    # so the COMMIT that follows can only roll back (the server answers it with ROLLBACK)
    msgs = messages(h.to_server)
    assert [m[0] for m in msgs] == [b"P", b"P", b"B", b"E", b"S", b"Q"]
    assert P.parse_parse(msgs[1][1]).query.startswith("DO $warden$")
    assert P.parse_query(msgs[5][1]) == "COMMIT"
    err = P.build_error_response("42501", "permission denied by Warden")
    h.server(P.PARSE_COMPLETE + P.PARSE_COMPLETE + P.BIND_COMPLETE + err + P.build_ready_for_query("E"))
    assert h.s.transaction_status == "E"
    assert h.to_client == P.PARSE_COMPLETE + err + P.build_ready_for_query("E")
    h.server(P.build_command_complete("ROLLBACK") + Z_IDLE)
    assert [(f["text"], f["decision"]) for f in h.statements()] == [(DELETE, "deny"), ("COMMIT", "allow")]


def test_every_execution_of_a_named_statement_is_held_again(lane):
    approvals = Approvals(ALLOW, ALLOW, DENY)
    h = Held(approvals)
    h.client(P.build_parse("del", DELETE) + P.build_bind("", "del", [b"1"]) + P.build_execute() + P.SYNC)
    h.decide()
    h.server(P.PARSE_COMPLETE + P.BIND_COMPLETE + P.build_command_complete("DELETE 1") + Z_IDLE)
    # steady state: a later read of Bind/Execute/Sync only (what the C lane takes for allowed
    # statements) is held again, with its own value
    for value, answer in ((b"2", "allow"), (b"3", "deny")):
        h.reset()
        batch = P.build_bind("", "del", [value]) + P.build_execute() + P.SYNC
        h.client(batch)
        assert h.to_server == b"" and h.pending.params == [value.decode()]
        h.decide()
        if answer == "allow":
            assert h.to_server == batch
            h.server(P.BIND_COMPLETE + P.build_command_complete("DELETE 1") + Z_IDLE)
        else:
            assert b"DO $warden$" in h.to_server and value not in h.to_server.split(b"DO $warden$")[0]
        (rec,) = h.statements()
        assert (rec["statement_name"], rec["params"], rec["decision"]) == ("del", [value.decode()], answer)
    assert [a[1] for a in approvals.asked] == [["1"], ["2"], ["3"]]
    # the key of a grant differs with the value
    assert len({a[2] for a in approvals.asked}) == 3


def test_pipelined_executions_are_held_one_by_one(lane):
    approvals = Approvals(ALLOW, ALLOW)
    h = Held(approvals)
    parse = P.build_parse("del", DELETE)
    first = P.build_bind("", "del", [b"1"]) + P.build_execute()
    second = P.build_bind("", "del", [b"2"]) + P.build_execute()
    h.client(parse + first + second + P.SYNC)
    assert h.to_server == parse and h.pending.params == ["1"]
    h.decide()
    # the first execution went on; the second is held in its turn, before the Sync
    assert h.to_server == parse + first and h.pending.params == ["2"]
    h.decide()
    assert h.to_server == parse + first + second + P.SYNC
    assert [(f["params"], f["statement_index"]) for f in h.statements()] == [(["1"], 1), (["2"], 2)]
    h.server(P.PARSE_COMPLETE + P.BIND_COMPLETE + P.build_command_complete("DELETE 1")
             + P.BIND_COMPLETE + P.build_command_complete("DELETE 1") + Z_IDLE)
    assert [f["command_tag"] for t, f in h.events if t == "pg.result"] == ["DELETE 1", "DELETE 1"]


def test_first_of_pipelined_executions_denied_discards_the_rest(lane):
    approvals = Approvals(DENY)
    h = Held(approvals)
    parse = P.build_parse("del", DELETE)
    h.client(parse + P.build_bind("", "del", [b"1"]) + P.build_execute()
             + P.build_bind("", "del", [b"2"]) + P.build_execute() + P.SYNC)
    h.decide()
    assert h.pending is None and len(approvals.asked) == 1      # the second is never asked about
    assert [m[0] for m in messages(h.to_server)] == [b"P", b"P", b"B", b"E", b"S"]
    assert [(f["params"], f["decision"]) for f in h.statements()] == [(["1"], "deny")]
    err = P.build_error_response("42501", "permission denied by Warden")
    h.server(P.PARSE_COMPLETE + P.PARSE_COMPLETE + P.BIND_COMPLETE + err + Z_IDLE)
    assert h.to_client == P.PARSE_COMPLETE + err + Z_IDLE


def test_deny_and_no_approval_service_still_refuse_at_parse(lane):
    h = Held(Approvals())
    parse = P.build_parse("", "DELETE FROM other WHERE id = $1")     # no permit: denied
    h.client(parse + execution([b"1"]) + P.SYNC)
    assert h.pending is None and b"DELETE FROM other" not in h.to_server
    assert [f["decision"] for f in h.statements()] == ["deny"]
    # approval needed but nobody to ask: refused at once, at the Parse, as before
    h = Held(None)
    h.client(P.build_parse("", DELETE) + execution([b"1"]) + P.SYNC)
    assert h.pending is None and DELETE.encode() not in h.to_server
    (rec,) = h.statements()
    assert (rec["decision"], rec["reason"]) == ("deny", "approval required but no approval service is configured")


def test_simple_query_is_still_approved_as_its_text():
    approvals = Approvals(ALLOW)
    h = Held(approvals)
    h.client(P.build_query("DELETE FROM t WHERE id = 1"))
    assert approvals.asked == [("DELETE FROM t WHERE id = 1", None, None, None)]
    assert h.requests[-1].params is None and h.to_server == P.build_query("DELETE FROM t WHERE id = 1")


class Masker:
    """A masking layer that hides the digits of anything shaped like a card number."""

    def mask_text(self, text):
        masked = text.replace("4111111111111111", "****1111")
        return masked, int(masked != text)


def test_the_approver_sees_masked_parameters():
    approvals = Approvals(ALLOW)
    h = Held(approvals, masking=Masker())
    h.client(P.build_parse("", "DELETE FROM t WHERE card = $1") + execution([b"4111111111111111"]) + P.SYNC)
    assert h.pending.params == ["****1111"]
    # what tells two values apart is a digest of them as sent, never the value itself
    assert "4111111111111111" not in h.pending.params_key


# ---- approvals.grant_window: the statement text and the parameter values -----------------------
class Collector:
    """The collector's approvals API as httpx sees it: every approval is approved at once."""

    def __init__(self):
        self.created = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            body = json.loads(request.content)
            self.created.append(body)
            return httpx.Response(201, json={"id": f"a{len(self.created)}", "status": "approved",
                                             "decided_by": "bob", "reason": "CHG-1"})
        raise AssertionError(f"unexpected {request.method} {request.url}")


@pytest.fixture
def collector(monkeypatch):
    c = Collector()
    real = httpx.AsyncClient

    def client(**kw):
        kw.pop("verify", None)
        return real(transport=httpx.MockTransport(c.handler), **kw)
    monkeypatch.setattr(A.httpx, "AsyncClient", client)
    return c


def test_grant_window_covers_the_same_values_only(lane, collector):
    h = Held(A.ApprovalClient("http://127.0.0.1:9", lambda: "t", timeout_s=5, grant_window_s=60))
    h.client(P.build_parse("del", DELETE) + P.SYNC)
    h.server(P.PARSE_COMPLETE + Z_IDLE)
    decisions = []
    for value in (b"1", b"1", b"2", b"1"):
        h.reset()
        h.client(P.build_bind("", "del", [value]) + P.build_execute() + P.SYNC)
        h.decide()
        assert h.to_server == P.build_bind("", "del", [value]) + P.build_execute() + P.SYNC
        h.server(P.BIND_COMPLETE + P.build_command_complete("DELETE 1") + Z_IDLE)
        (rec,) = h.statements()
        decisions.append((rec["params"], rec["reason"]))
    # asked for id=1 and for id=2; the repeats of id=1 went through on the first approval
    assert [c["statement"] for c in collector.created] == [f"{DELETE} -- parameters: $1 = '1'",
                                                           f"{DELETE} -- parameters: $1 = '2'"]
    assert decisions[0] == (["1"], "approved by bob: CHG-1")
    assert decisions[1][0] == ["1"] and decisions[1][1].startswith("approval a1 by bob covers this repeat")
    assert decisions[2] == (["2"], "approved by bob: CHG-1")
    assert decisions[3][1].startswith("approval a1 by bob covers this repeat")
    requested = [f for t, f in h.sink.events if t == "approval.requested"]
    assert [(f["summary"], f["statement_index"]) for f in requested] == [
        (f"{DELETE} -- parameters: $1 = '1'", 1), (f"{DELETE} -- parameters: $1 = '2'", 3)]
    decided = [f for t, f in h.sink.events if t == "approval.decided"]
    assert [f["summary"] for f in decided] == [f"{DELETE} -- parameters: $1 = '1'",
                                               f"{DELETE} -- parameters: $1 = '2'"]


def test_a_grant_of_the_statement_text_does_not_cover_an_execution(collector):
    """A simple Query approved with its literal text is another key than an execution of the
    prepared statement, whatever it binds."""
    h = Held(A.ApprovalClient("http://127.0.0.1:9", lambda: "t", timeout_s=5, grant_window_s=60))
    h.client(P.build_query(DELETE))
    h.server(P.build_error_response("42P02", "there is no parameter $1") + Z_IDLE)
    h.client(P.build_parse("", DELETE) + execution([b"1"]) + P.SYNC)
    h.decide()
    assert [c["statement"] for c in collector.created] == [DELETE, f"{DELETE} -- parameters: $1 = '1'"]


def test_binary_parameters_are_shown_as_their_declared_type_reads_them(lane):
    """psycopg sends an int as binary int2: the approver and the records read 42."""
    approvals = Approvals(ALLOW)
    h = Held(approvals)
    h.client(P.build_parse("", "DELETE FROM t WHERE id = $1 AND note = $2 AND at = $3", [21, 25, 0])
             + P.build_bind("", "", [b"\x00\x2a", b"it's", b"\x00\x01"], param_formats=[1])
             + P.build_execute() + P.SYNC)
    assert h.pending.params == ["42", "it's", "\\x0001"]        # no declared type: as recorded
    h.decide()
    (rec,) = h.statements()
    assert rec["params"] == ["42", "it's", "\\x0001"]
    assert A.format_params(["42", "it's", None]) == "$1 = '42', $2 = 'it''s', $3 = NULL"
