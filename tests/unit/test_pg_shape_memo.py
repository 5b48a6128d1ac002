"""The shell's shape memo (proxy._Connection._decide_inline), which the C client lane reads to
answer a simple Query of a shape the shell decided without calling it: the same records as the
shell's own answer, and never an answer once the policy, its version, the principal or the hour
changed. Bytes in, actions out, with the shell's real decider and Cedar, on both lanes."""
from __future__ import annotations

from enforcer.policy.engine import PolicyEngine
from tests.unit.test_pg_sql_execute import READ_CUSTOMERS, READS, Setup

SELECT = "SELECT name FROM customers WHERE id = {}"
READ_CUSTOMERS_AS_APP = """
@id("read-customers")
permit (principal == Service::"svc", action == Action::"pg:select", resource == Table::"db/public.customers")
when { principal has user && principal.user == "app" };
"""


def counted(s: Setup) -> list:
    """The texts the session asks its decider (the shell) from now on."""
    session = s.d.s
    asked: list = []
    inner = session.decide

    def decide(sql, **kw):
        asked.append(sql)
        return inner(sql, **kw)
    session.decide = decide
    return asked


def read(s: Setup, i: int) -> dict:
    return s.execute(SELECT.format(i))


def test_known_shapes_are_answered_from_the_memo_with_the_shells_records(lane):
    s = Setup(READS + READ_CUSTOMERS)
    first, second = read(s, 1), read(s, 2)        # decided; the shape's template is kept
    asked = counted(s)
    third = read(s, 3)
    assert asked == ([] if lane else [SELECT.format(3)])
    assert third["text"] == SELECT.format(3) and third["statement_index"] == 3
    for rec in (second, third):
        assert (rec["action"], rec["tables"], rec["decision"], rec["policy_ids"]) == (
            "pg:select", ["public.customers"], "allow", ["read-customers"])
    assert {k: v for k, v in third.items() if k not in ("text", "statement_index")} == {
        k: v for k, v in second.items() if k not in ("text", "statement_index")}
    # the text as the shell records it: no surrounding blanks, no trailing semicolons
    assert s.execute("  " + SELECT.format(4) + " ;;\n")["text"] == SELECT.format(4)


def test_a_reloaded_policy_is_applied_to_a_shape_the_memo_allowed(lane):
    s = Setup(READS + READ_CUSTOMERS)
    read(s, 1), read(s, 2)
    s.reload(READS)                               # customers are no longer readable
    rec = read(s, 3)
    assert (rec["decision"], rec["policy_ids"]) == ("deny", [])
    assert SELECT.format(3).encode() not in s.d.to_server and b"permission denied by Warden" in s.d.to_server


class _Store:
    """A policy whose rules are replaced in place, as the agent's PolicyStore reloads: the object
    stays, its version changes."""

    def __init__(self, text: str):
        self.engine, self.version = PolicyEngine.from_text(text), 1

    def replace(self, text: str) -> None:
        self.engine, self.version = PolicyEngine.from_text(text), self.version + 1

    def __getattr__(self, name):
        return getattr(self.engine, name)


def test_a_policy_reloaded_in_place_is_applied_to_a_shape_the_memo_allowed(lane):
    s = Setup(READS)
    s.ctx.policy = store = _Store(READS + READ_CUSTOMERS)
    read(s, 1), read(s, 2)
    store.replace(READS)
    assert read(s, 3)["decision"] == "deny"


def test_another_principal_is_decided_again(lane):
    """Brokered login replaces the identity's attributes: the memo made for the workload's
    process attributes must not answer for the token's principal."""
    s = Setup(READS + READ_CUSTOMERS_AS_APP)
    s.ctx.identity_attrs = {"user": "app"}
    read(s, 1), read(s, 2)
    asked = counted(s)
    s.ctx.identity_attrs = {"user": "intruder"}
    rec = read(s, 3)
    assert asked == [SELECT.format(3)] * len(asked) and asked
    assert rec["decision"] == "deny"


def test_the_next_hour_is_decided_again(lane, monkeypatch):
    """Policies may depend on the hour: at its end the memo stops answering (C reads the wall
    clock against the hour the memo was made in)."""
    s = Setup(READS + READ_CUSTOMERS)
    read(s, 1), read(s, 2)
    session = s.d.s
    memo = session.shape_memo
    assert memo is not None and memo[6]
    session.shape_memo = memo[:5] + (memo[5] - 3600 * 24 * 365,) + memo[6:]     # its hour is long past
    asked = counted(s)
    assert read(s, 3)["decision"] == "allow"
    assert asked and asked[0] == SELECT.format(3)
