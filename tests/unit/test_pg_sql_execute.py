"""SQL EXECUTE is decided and recorded as the prepared statement the session holds under its name
(SQL PREPARE and protocol Parse share one namespace); a name the session does not know stays
pg:other. Bytes in, actions out, with the shell's real decider (memos included) and Cedar."""
from __future__ import annotations

import asyncio

import pytest

from enforcer.context import ConnectionContext, TargetInfo
from enforcer.policy.engine import ALLOW, DENY, Decision, PolicyEngine
from enforcer.postgres import protocol as P
from enforcer.postgres import proxy
from enforcer.postgres.proxy import _Connection
from enforcer.postgres.session import PostgresSession
from enforcer.sqlclass import SqlClassifier, classify_sql, mentions_execute
from tests.unit.test_pg_session import AUTH_DONE, STARTUP, Driver

READS = """
@id("read-orders")
permit (principal == Service::"svc", action == Action::"pg:select", resource == Table::"db/public.orders");
@id("housekeeping")
permit (principal == Service::"svc", action == Action::"pg:other", resource == Target::"db");
"""
READ_CUSTOMERS = """
@id("read-customers")
permit (principal == Service::"svc", action == Action::"pg:select", resource == Table::"db/public.customers");
"""
CUSTOMERS_NEED_APPROVAL = READ_CUSTOMERS + """
@id("customers-approved")
@approval("required")
forbid (principal, action == Action::"pg:select", resource == Table::"db/public.customers")
unless { context.approved };
"""

Z = P.build_ready_for_query("I")


class _Approvals:
    """The approval service's answer for every request, and what it was asked."""

    def __init__(self, answer: str):
        self.answer = answer
        self.asked = []

    async def request(self, ctx, sd, **execution):
        self.asked.append(sd.statement)
        return Decision(self.answer, sd.decision.action, ("approver",), "")


class Setup:
    """A session whose decider is the shell's (_Connection._decide_inline and, for DECIDE, proxy.decide)."""

    def __init__(self, policy_text: str, approvals=None):
        target = TargetInfo(name="db", protocol="postgres", upstream_host="127.0.0.2", upstream_port=5432)
        self.ctx = ConnectionContext(session_id="s", identity="svc", identity_attrs={}, target=target,
                                     attribution=None, sink=None, policy=PolicyEngine.from_text(policy_text),
                                     approvals=approvals)
        conn = object.__new__(_Connection)      # only the decision state, no sockets
        conn.ctx, conn._verdicts, conn._shape_verdicts, conn._verdicts_key = self.ctx, {}, {}, None
        session = conn.session = PostgresSession(identity="svc", target="db", random_bytes=lambda n: b"\x11" * n,
                                                 decide=conn._decide_inline)
        self.d = Driver(session=session, decider=lambda req: asyncio.run(proxy.decide(self.ctx, req)))
        self.d.client(STARTUP)
        self.d.server(AUTH_DONE)
        self.d.reset()

    def reload(self, policy_text: str) -> None:
        self.ctx.policy = PolicyEngine.from_text(policy_text)

    def query(self, sql: str, reply: bytes) -> dict:
        """A simple Query and the server's reply; the (last) pg.statement record."""
        self.d.reset()
        self.d.client(P.build_query(sql))
        records = [f for t, f in self.d.events if t == "pg.statement"]
        self.d.server(reply + Z)
        return records[-1]

    def prepare(self, sql: str) -> dict:
        return self.query(sql, P.build_command_complete("PREPARE"))

    def execute(self, sql: str) -> dict:
        return self.query(sql, P.build_data_row([b"1"]) + P.build_command_complete("SELECT 1"))


def test_execute_is_decided_and_recorded_as_the_prepared_select(lane):
    s = Setup(READS + READ_CUSTOMERS)
    prep = s.prepare("PREPARE q (int) AS SELECT name FROM customers WHERE id = $1")
    assert (prep["action"], prep["tables"], prep["decision"]) == ("pg:select", ["public.customers"], "allow")
    for _ in range(3):       # again and again: no memo answers with another meaning
        rec = s.execute("EXECUTE q(5)")
        assert rec["text"] == "EXECUTE q(5)"
        assert (rec["kind"], rec["action"], rec["tables"], rec["decision"], rec["policy_ids"]) == (
            "SelectStmt", "pg:select", ["public.customers"], "allow", ["read-customers"])
        assert rec["prepared"] == {"name": "q", "text": "PREPARE q (int) AS SELECT name FROM customers WHERE id = $1"}
        assert s.d.to_server == P.build_query("EXECUTE q(5)")


def test_execute_is_denied_by_the_table_policy_of_what_it_runs(lane):
    s = Setup(READS + READ_CUSTOMERS)
    s.prepare("PREPARE q AS SELECT * FROM customers")
    s.reload(READS)         # customers no longer readable; pg:other still is
    rec = s.execute("EXECUTE q")
    assert (rec["action"], rec["tables"], rec["decision"]) == ("pg:select", ["public.customers"], "deny")
    assert b"EXECUTE q" not in s.d.to_server and b"permission denied by Warden" in s.d.to_server
    # the same statement prepared under a name the session does not hold: pg:other, as before
    rec = s.execute("EXECUTE other")
    assert (rec["kind"], rec["action"], rec["tables"], rec["decision"]) == ("ExecuteStmt", "pg:other", [], "allow")
    assert "prepared" not in rec


def test_execute_of_a_statement_parsed_with_the_protocol(lane):
    s = Setup(READS)
    s.d.client(P.build_parse("s1", "SELECT id FROM orders WHERE id = $1", [23]) + P.SYNC)
    s.d.server(P.PARSE_COMPLETE + Z)
    rec = s.execute("EXECUTE s1(7)")
    assert (rec["kind"], rec["action"], rec["tables"], rec["decision"]) == (
        "SelectStmt", "pg:select", ["public.orders"], "allow")
    assert rec["prepared"] == {"name": "s1", "text": "SELECT id FROM orders WHERE id = $1"}
    # Close of the statement: the name is unknown again
    s.d.client(P.build_close("S", "s1") + P.SYNC)
    s.d.server(P.build_close_complete() + Z)
    rec = s.execute("EXECUTE s1(7)")
    assert (rec["action"], rec["tables"]) == ("pg:other", [])


def test_prepare_again_under_the_name_changes_the_decision(lane):
    approvals = _Approvals(DENY)
    s = Setup(READS + CUSTOMERS_NEED_APPROVAL, approvals)
    s.prepare("PREPARE q (int) AS SELECT * FROM orders WHERE id = $1")
    for _ in range(2):
        rec = s.execute("EXECUTE q(1)")
        assert (rec["tables"], rec["decision"]) == (["public.orders"], "allow")
    assert not s.d.requests
    s.query("DEALLOCATE q", P.build_command_complete("DEALLOCATE"))
    approvals.answer = ALLOW
    s.prepare("PREPARE q (int) AS SELECT * FROM customers WHERE id = $1")     # approved
    assert len(approvals.asked) == 1
    # the same text now runs another statement: decided anew, through the approval path
    approvals.answer = DENY
    rec = s.execute("EXECUTE q(1)")
    assert [r.prepared for r in s.d.requests][-1] == {
        "q": "PREPARE q (int) AS SELECT * FROM customers WHERE id = $1"}
    assert approvals.asked[-1].text == "EXECUTE q(1)" and approvals.asked[-1].tables == ("public.customers",)
    assert (rec["tables"], rec["decision"]) == (["public.customers"], "deny")
    assert b"permission denied by Warden" in s.d.to_server
    approvals.answer = ALLOW
    rec = s.execute("EXECUTE q(1)")
    assert (rec["tables"], rec["decision"]) == (["public.customers"], "allow")
    assert s.d.to_server == P.build_query("EXECUTE q(1)")


@pytest.mark.parametrize("forget,tag", [("DEALLOCATE q", "DEALLOCATE"), ("DEALLOCATE ALL", "DEALLOCATE ALL"),
                                        ("DISCARD ALL", "DISCARD ALL")])
def test_deallocated_name_is_unknown_again(forget, tag, lane):
    s = Setup(READS + READ_CUSTOMERS)
    s.prepare("PREPARE q AS SELECT * FROM customers")
    assert s.execute("EXECUTE q")["action"] == "pg:select"
    s.query(forget, P.build_command_complete(tag))
    rec = s.execute("EXECUTE q")
    assert (rec["kind"], rec["action"], rec["tables"]) == ("ExecuteStmt", "pg:other", [])


def test_unknown_name_stays_pg_other_and_fails_closed():
    s = Setup(READS.replace('@id("housekeeping")', '@id("unused")').replace("pg:other", "pg:ddl"))
    rec = s.execute("EXECUTE nothing(1)")
    assert (rec["kind"], rec["action"], rec["decision"]) == ("ExecuteStmt", "pg:other", "deny")


def test_denied_prepare_leaves_no_name_to_execute():
    s = Setup(READS)
    assert s.prepare("PREPARE q AS SELECT * FROM customers")["decision"] == "deny"
    rec = s.execute("EXECUTE q")
    assert (rec["action"], rec["tables"]) == ("pg:other", [])


def test_parse_of_execute_in_the_extended_protocol(lane):
    s = Setup(READS + READ_CUSTOMERS)
    s.prepare("PREPARE q (int) AS SELECT * FROM customers WHERE id = $1")
    s.d.reset()
    s.d.client(P.build_parse("", "EXECUTE q($1)", [23]) + P.build_bind("", "", [b"3"]) + P.build_execute() + P.SYNC)
    (rec,) = [f for t, f in s.d.events if t == "pg.statement"]
    assert (rec["text"], rec["kind"], rec["action"], rec["tables"], rec["decision"], rec["params"]) == (
        "EXECUTE q($1)", "SelectStmt", "pg:select", ["public.customers"], "allow", ["3"])
    assert rec["prepared"]["name"] == "q"
    s.d.server(P.PARSE_COMPLETE + P.BIND_COMPLETE + P.build_data_row([b"1"]) + P.build_command_complete("SELECT 1") + Z)
    # denied once the policy no longer lets it read customers: the Parse never reaches the server
    s.reload(READS)
    s.d.reset()
    s.d.client(P.build_parse("e", "EXECUTE q(1)") + P.build_bind("", "e") + P.build_execute() + P.SYNC)
    (rec,) = [f for t, f in s.d.events if t == "pg.statement"]
    assert (rec["action"], rec["tables"], rec["decision"], rec["statement_name"]) == (
        "pg:select", ["public.customers"], "deny", "e")
    assert b"EXECUTE q" not in s.d.to_server


def test_a_parsed_execute_is_decided_again_once_its_name_is_prepared_again(lane):
    """A named Parse of `EXECUTE q` was decided as what q was then; bound after q was deallocated
    and prepared as another statement, it runs that one: each Bind is decided anew (never by the
    C lane), here denied, then held for approval."""
    approvals = _Approvals(DENY)
    s = Setup(READS + CUSTOMERS_NEED_APPROVAL, approvals)
    s.prepare("PREPARE q AS SELECT * FROM orders")
    s.d.reset()
    s.d.client(P.build_parse("e", "EXECUTE q") + P.SYNC)
    s.d.server(P.PARSE_COMPLETE + Z)
    run = P.build_bind("", "e") + P.build_execute() + P.SYNC
    answer = P.BIND_COMPLETE + P.build_data_row([b"1"]) + P.build_command_complete("SELECT 1") + Z
    for _ in range(2):       # the second Bind would be the C lane's, with a record template
        s.d.reset()
        s.d.client(run)
        s.d.server(answer)
        (rec,) = [f for t, f in s.d.events if t == "pg.statement"]
        assert (rec["tables"], rec["decision"]) == (["public.orders"], "allow")
    assert not approvals.asked
    s.query("DEALLOCATE q", P.build_command_complete("DEALLOCATE"))
    approvals.answer = ALLOW
    s.prepare("PREPARE q AS SELECT * FROM customers")          # approved once, as a PREPARE
    assert len(approvals.asked) == 1
    approvals.answer = DENY
    s.d.reset()
    s.d.client(run)
    (rec,) = [f for t, f in s.d.events if t == "pg.statement"]
    assert (rec["tables"], rec["decision"], rec["reason"]) == (["public.customers"], "deny", "")
    assert rec["prepared"] == {"name": "q", "text": "PREPARE q AS SELECT * FROM customers"}
    assert len(approvals.asked) == 2 and approvals.asked[-1].tables == ("public.customers",)
    assert b"permission denied by Warden" in s.d.to_server and P.build_bind("", "e") not in s.d.to_server
    s.d.server(P.PARSE_COMPLETE + P.BIND_COMPLETE
               + P.build_error_response("42501", "permission denied by Warden") + Z)
    approvals.answer = ALLOW
    s.d.reset()
    s.d.client(run)
    (rec,) = [f for t, f in s.d.events if t == "pg.statement"]
    assert (rec["tables"], rec["decision"]) == (["public.customers"], "allow")
    assert s.d.to_server == run


def test_execute_parameters_are_decided_too():
    s = Setup(READS)
    s.prepare("PREPARE q (text) AS SELECT * FROM orders WHERE note = $1")
    rec = s.execute("EXECUTE q(pg_read_file('/etc/passwd'))")
    assert (rec["action"], rec["decision"], rec["functions"]) == ("pg:function", "deny", ["pg_read_file"])


def test_explain_analyze_and_create_table_as_execute_are_not_weaker_than_before():
    s = Setup(READS + READ_CUSTOMERS)
    s.prepare("PREPARE q AS SELECT * FROM customers")
    rec = s.query("EXPLAIN ANALYZE EXECUTE q", P.build_command_complete("EXPLAIN"))
    assert (rec["kind"], rec["action"]) == ("ExplainStmt", "pg:other")
    rec = s.query("CREATE TABLE copy AS EXECUTE q", P.build_command_complete("SELECT 1"))
    assert (rec["action"], rec["tables"], rec["decision"]) == ("pg:ddl", ["public.copy"], "deny")


def test_no_session_no_resolution():
    """`warden-agent policy test --sql` and any caller without a session: pg:other."""
    engine = PolicyEngine.from_text(READS + READ_CUSTOMERS)
    (sd,) = engine.decide_sql("svc", {}, "db", "EXECUTE q(1)")
    assert (sd.statement.action, sd.statement.kind) == ("pg:other", "ExecuteStmt")
    # a session's answer is never taken from (or left in) the engine's message cache
    known = {"q": "SELECT * FROM customers"}
    (sd,) = engine.decide_sql("svc", {}, "db", "EXECUTE q(1)", classifier=engine.new_session_classifier(known))
    assert (sd.statement.action, sd.statement.tables, sd.decision.kind) == ("pg:select", ("public.customers",), ALLOW)
    (sd,) = engine.decide_sql("svc", {}, "db", "EXECUTE q(1)")
    assert sd.statement.action == "pg:other"


def test_shared_decision_cache_never_keeps_an_execute():
    s = Setup(READS + READ_CUSTOMERS)
    for sql in ("EXECUTE q(1)", "EXECUTE q(2)", "execute q(1)"):
        proxy.decide_now(s.ctx, sql)
        proxy.decide_now(s.ctx, sql, prepared={"q": "SELECT 1 FROM customers"})
        assert not [k for k in proxy.decision_cache._entries if sql in k or any(
            isinstance(part, str) and mentions_execute(part) for part in k)]


def test_classifier_follows_the_message_in_order():
    known = {"q": "SELECT * FROM customers"}
    statements = SqlClassifier(known=known).classify("DEALLOCATE q; EXECUTE q")
    assert statements[1].action == "pg:other"
    statements = SqlClassifier(known=known).classify("DEALLOCATE ALL; PREPARE q AS DELETE FROM t; EXECUTE q")
    assert (statements[2].action, statements[2].kind, statements[2].tables) == ("pg:delete", "DeleteStmt", ("public.t",))
    assert classify_sql("EXECUTE q")[0].action == "pg:other"
