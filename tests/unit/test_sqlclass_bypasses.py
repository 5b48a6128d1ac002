"""Policy bypasses found by an audit of the SQL classifier, each closed and pinned here:
EXPLAIN's last ANALYZE option, settings that make the server lex differently, dangerous
functions that run SQL text, WHERE clauses that only look restrictive, and upserts / MERGE /
cursors that the example policy refused although they are bounded."""
from __future__ import annotations

import os

import pytest

from enforcer.policy import ALLOW, DENY, PolicyEngine
from enforcer.sqlclass import ClassificationCache, classify_sql

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "packaging", "policy.example.cedar")
GROUPS = {"payments": ["payments-api"], "reporting": ["reporting-nightly", "reporting-dashboard"]}
ATTRS = {"unit": "payments-api.service", "user": "payments"}
DB = "payments-db"


@pytest.fixture(scope="module")
def engine():
    # 02:00 UTC: inside the reporting job's window
    return PolicyEngine.from_files(EXAMPLE, groups=GROUPS, clock=lambda: 1_700_000_000 // 86400 * 86400 + 7200.0)


def decide(engine, sql, identity="payments-api"):
    return [r.decision for r in engine.decide_sql(identity, ATTRS, DB, sql)]


def one(sql):
    (statement,) = classify_sql(sql)
    return statement


# -- 1. EXPLAIN: Postgres takes the last ANALYZE option --------------------------------------
@pytest.mark.parametrize("sql", [
    "EXPLAIN (ANALYZE FALSE, ANALYZE TRUE) DELETE FROM customers",
    "EXPLAIN (ANALYZE off, ANALYZE on) DELETE FROM customers",
    "EXPLAIN (ANALYZE 0, ANALYZE 1) DELETE FROM customers",
    "EXPLAIN (ANALYZE false, ANALYZE) DELETE FROM customers",
    "EXPLAIN (ANALYZE false, VERBOSE, ANALYZE true, BUFFERS) DELETE FROM customers",
    "EXPLAIN (ANALYZE 'maybe') DELETE FROM customers",     # not a boolean: never a certain "no"
])
def test_explain_whose_last_analyze_option_may_run_is_the_statement(sql):
    s = one(sql)
    assert (s.kind, s.action, s.tables_written, s.has_where) == (
        "ExplainStmt", "pg:delete", ("public.customers",), False)


@pytest.mark.parametrize("sql", [
    "EXPLAIN (ANALYZE TRUE, ANALYZE FALSE) DELETE FROM customers",
    "EXPLAIN (ANALYZE, ANALYZE off) DELETE FROM customers",
    "EXPLAIN (ANALYZE 0) DELETE FROM customers",
    "EXPLAIN (VERBOSE) DELETE FROM customers",
])
def test_explain_that_certainly_does_not_analyze_only_reads(sql):
    s = one(sql)
    assert (s.action, s.tables_written) == ("pg:select", ())


def test_explain_analyze_false_then_true_is_decided_as_the_delete(engine):
    (decision,) = decide(engine, "EXPLAIN (ANALYZE FALSE, ANALYZE TRUE) DELETE FROM customers")
    assert (decision.kind, decision.action) == (DENY, "pg:delete")
    assert "never-delete-customers" in decision.policy_ids


# -- 2. settings that change how the server reads later statements ---------------------------
LEXER_CHANGES = [
    "SET standard_conforming_strings = off",
    "SET standard_conforming_strings TO 'off'",
    "SET LOCAL standard_conforming_strings TO off",
    "SET SESSION standard_conforming_strings = false",
    "SET standard_conforming_strings = 0",
    'SET "Standard_Conforming_Strings" = off',            # setting names are case-insensitive
    "SET standard_conforming_strings TO DEFAULT",
    "RESET standard_conforming_strings",
    "SET NAMES 'SJIS'",
    "SET client_encoding = 'Shift_JIS'",
    "SET client_encoding TO gbk",
    "SET client_encoding = 'BIG5'",
    "ALTER DATABASE payments SET standard_conforming_strings = off",
    "ALTER ROLE payments_svc SET standard_conforming_strings TO off",
    "ALTER ROLE payments_svc SET client_encoding = 'GB18030'",
    "ALTER SYSTEM SET standard_conforming_strings = off",
    "UPDATE pg_settings SET setting = 'off' WHERE name = 'standard_conforming_strings'",
    "UPDATE pg_catalog.pg_settings SET setting = 'admin' WHERE name = 'role'",
]
ROLE_CHANGES = [
    "SET ROLE admin", "SET LOCAL ROLE admin", "RESET ROLE", "SET ROLE NONE",
    "SET SESSION AUTHORIZATION postgres", "SET SESSION AUTHORIZATION DEFAULT",
    "SET search_path = evil, public", "SET LOCAL search_path TO evil", "SET SCHEMA 'evil'",
    "RESET search_path",
]
ORDINARY_SETTINGS = [
    "SET standard_conforming_strings = on", "SET standard_conforming_strings TO 'on'",
    "SET LOCAL standard_conforming_strings = true", "SET standard_conforming_strings = 1",
    "SET client_encoding = 'UTF8'", "SET NAMES 'utf-8'", "SET client_encoding TO DEFAULT",
    "RESET client_encoding", "SET client_encoding = 'LATIN1'", "RESET ALL",
    "SET application_name = 'payments'", "SET statement_timeout = 5000",
    # these only choose between an error or a warning and the same reading of the text
    "SET escape_string_warning = off", "SET backslash_quote = on",
]


@pytest.mark.parametrize("sql", LEXER_CHANGES + ROLE_CHANGES)
def test_settings_that_change_what_later_statements_mean_are_set_role(sql):
    assert one(sql).action == "pg:set_role"


@pytest.mark.parametrize("sql", ORDINARY_SETTINGS)
def test_ordinary_settings_stay_housekeeping(sql):
    assert (one(sql).action, one(sql).kind) == ("pg:other", "VariableSetStmt")


def test_set_config_of_standard_conforming_strings_is_a_dangerous_function():
    s = one("SELECT set_config('standard_conforming_strings', 'off', false)")
    assert (s.action, s.dangerous_functions) == ("pg:function", ("set_config",))


def test_standard_conforming_strings_off_is_denied_by_the_example_policy(engine):
    # the classifier reads this as one SELECT: with the setting off, the server would run a DELETE
    (select,) = classify_sql("SELECT 'x\\', ' ; DELETE FROM customers; --'")
    assert (select.action, select.tables) == ("pg:select", ())
    denied, _ = decide(engine, "SET standard_conforming_strings = off; SELECT 'x\\', ' ; DELETE FROM customers; --'")
    assert (denied.kind, denied.action, denied.policy_ids) == (DENY, "pg:set_role", ("no-role-or-privilege-changes",))
    for sql in ("SET LOCAL standard_conforming_strings TO off", "RESET standard_conforming_strings",
                "SET NAMES 'SJIS'", "UPDATE pg_settings SET setting = 'off' WHERE name = 'standard_conforming_strings'"):
        (decision,) = decide(engine, sql)
        assert (decision.kind, decision.policy_ids) == (DENY, ("no-role-or-privilege-changes",)), sql
    (allowed,) = decide(engine, "SET standard_conforming_strings = on")
    assert (allowed.kind, allowed.policy_ids) == (ALLOW, ("session-housekeeping",))


# -- 3. dangerous functions: SQL text, large objects, logical decoding ------------------------
SQL_TEXT_CALLS = [
    ("SELECT database_to_xml_and_xmlschema(true, true, '')", "database_to_xml_and_xmlschema"),
    ("SELECT database_to_xmlschema(true, true, '')", "database_to_xmlschema"),
    ("SELECT schema_to_xml_and_xmlschema('public', true, true, '')", "schema_to_xml_and_xmlschema"),
    ("SELECT query_to_xml_and_xmlschema('SELECT * FROM customers', true, true, '')", "query_to_xml_and_xmlschema"),
    ("SELECT * FROM ts_stat('SELECT to_tsvector(name) FROM customers')", "ts_stat"),
    ("SELECT ts_rewrite('a'::tsquery, 'SELECT t, s FROM customers')", "ts_rewrite"),
    ("SELECT * FROM crosstab('SELECT id, k, v FROM customers') AS ct(id int, a text)", "crosstab"),
    ("SELECT * FROM crosstab3('SELECT id, k, v FROM customers')", "crosstab3"),
    ("SELECT * FROM connectby('customers', 'id', 'parent', '1', 0) AS t(id int, p int, l int)", "connectby"),
    ("SELECT pg_background_launch('DELETE FROM customers')", "pg_background_launch"),
    ("SELECT * FROM pg_background_result(42) AS (r text)", "pg_background_result"),
    ("SELECT dblink('dbname=payments', 'SELECT * FROM customers')", "dblink"),
    ("SELECT cron.schedule('* * * * *', 'DELETE FROM customers')", "cron.schedule"),
    ("SELECT * FROM pgr_dijkstra('SELECT id, source, target, cost FROM customers', 1, 2)", "pgr_dijkstra"),
]
OTHER_DANGEROUS_CALLS = [
    ("SELECT lo_get(16401)", "lo_get"),
    ("SELECT lo_put(16401, 0, 'x')", "lo_put"),
    ("SELECT lo_from_bytea(0, 'secret')", "lo_from_bytea"),
    ("SELECT lo_import('/etc/passwd')", "lo_import"),
    ("SELECT lo_export(16401, '/tmp/x')", "lo_export"),
    ("SELECT lo_unlink(16401)", "lo_unlink"),
    ("SELECT * FROM pg_logical_slot_get_changes('s', NULL, NULL)", "pg_logical_slot_get_changes"),
    ("SELECT * FROM pg_logical_slot_peek_changes('s', NULL, NULL)", "pg_logical_slot_peek_changes"),
    ("SELECT * FROM pg_logical_slot_get_binary_changes('s', NULL, NULL)", "pg_logical_slot_get_binary_changes"),
    ("SELECT * FROM pg_logical_slot_peek_binary_changes('s', NULL, NULL)", "pg_logical_slot_peek_binary_changes"),
    ("SELECT pg_replication_slot_advance('s', '0/16B3748')", "pg_replication_slot_advance"),
    ("SELECT pg_create_logical_replication_slot('s', 'test_decoding')", "pg_create_logical_replication_slot"),
    ("SELECT * FROM pg_ls_replslotdir('s')", "pg_ls_replslotdir"),
]


DANGEROUS_CALLS = SQL_TEXT_CALLS + OTHER_DANGEROUS_CALLS


@pytest.mark.parametrize("sql,name", DANGEROUS_CALLS, ids=[n for _, n in DANGEROUS_CALLS])
def test_dangerous_functions_are_pg_function(sql, name):
    s = one(sql)
    assert s.action == "pg:function" and name in s.dangerous_functions


@pytest.mark.parametrize("sql,name", SQL_TEXT_CALLS, ids=[n for _, n in SQL_TEXT_CALLS])
def test_sql_given_as_a_string_is_never_a_plain_select(sql, name, engine):
    assert one(sql).action != "pg:select"
    (decision,) = decide(engine, sql)
    assert decision.kind == DENY and "no-dangerous-functions" in decision.policy_ids


# -- 4. has_where: only a WHERE that looks at the target's rows counts -------------------------
UNRESTRICTED = [
    "DELETE FROM sessions WHERE EXISTS (SELECT 1)",
    "DELETE FROM sessions WHERE (SELECT true)",
    "DELETE FROM sessions WHERE $1",
    "DELETE FROM sessions WHERE id = id",
    "DELETE FROM sessions s WHERE s.id = s.id",
    "DELETE FROM sessions WHERE (id = id)::boolean",
    "DELETE FROM sessions WHERE id = 1 OR 1 = 1",
    "DELETE FROM sessions WHERE id = $1 OR true",
    "DELETE FROM sessions WHERE true AND $1",
    "DELETE FROM sessions WHERE NOT (id = id)",
    "DELETE FROM sessions WHERE id IN (SELECT id)",
    "DELETE FROM sessions WHERE id = (SELECT sessions.id)",
    "DELETE FROM sessions WHERE EXISTS (SELECT 1 FROM users WHERE users.banned)",
    "DELETE FROM sessions WHERE EXISTS (SELECT 1 FROM users sessions WHERE sessions.id = 1)",
    "DELETE FROM sessions s USING users u WHERE u.banned",
    "UPDATE sessions SET note = 'x' WHERE EXISTS (SELECT 1) AND (SELECT true)",
    "UPDATE sessions SET note = 'x' WHERE $1 = $2",
    "DELETE FROM sessions WHERE 1 = 1",
    "DELETE FROM sessions WHERE true",
    "DELETE FROM sessions",
]
RESTRICTED = [
    "DELETE FROM sessions WHERE id = $1",
    "DELETE FROM sessions WHERE id = 1",
    "DELETE FROM sessions WHERE $1 = id",
    "DELETE FROM sessions WHERE expires_at < now()",
    "DELETE FROM sessions WHERE id = ANY($1)",
    "DELETE FROM sessions WHERE id IN (1, 2, 3)",
    "DELETE FROM sessions WHERE id BETWEEN 1 AND 10",
    "DELETE FROM sessions WHERE id IN (SELECT session_id FROM expired)",
    "DELETE FROM sessions WHERE id IN (SELECT id FROM expired UNION SELECT id FROM revoked)",
    "DELETE FROM sessions s USING users u WHERE s.user_id = u.id AND u.banned",
    "DELETE FROM sessions WHERE EXISTS (SELECT 1 FROM users u WHERE u.id = sessions.user_id AND u.banned)",
    "DELETE FROM sessions s WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.id = s.user_id)",
    "DELETE FROM sessions WHERE revoked",
    "DELETE FROM sessions WHERE revoked IS TRUE",
    "DELETE FROM sessions WHERE user_id IS NULL",
    "DELETE FROM sessions WHERE id = 1 OR id = 2",
    "DELETE FROM sessions WHERE lower(token) = $1",
    "DELETE FROM sessions WHERE (user_id, device) = ($1, $2)",
    "DELETE FROM sessions WHERE created_at = updated_at",
    "DELETE FROM sessions WHERE true AND id = $1",
    "UPDATE sessions SET note = $1 WHERE CURRENT OF c",
    "UPDATE accounts a SET limit_cents = r.l FROM risk r WHERE r.id = a.id",
]


@pytest.mark.parametrize("sql", UNRESTRICTED)
def test_where_that_does_not_compare_a_target_column_does_not_count(sql):
    assert one(sql).has_where is False


@pytest.mark.parametrize("sql", RESTRICTED)
def test_where_comparing_a_target_column_counts(sql):
    assert one(sql).has_where is True


@pytest.mark.parametrize("sql", UNRESTRICTED[:4])
def test_example_policy_denies_the_fake_where(engine, sql):
    (decision,) = decide(engine, sql)
    assert (decision.kind, decision.policy_ids) == (DENY, ("no-unbounded-writes",))


@pytest.mark.parametrize("sql", UNRESTRICTED + RESTRICTED)
def test_shape_reuse_keeps_has_where(sql):
    # texts of one shape differ only in constants: has_where never reads one
    cache = ClassificationCache()
    cache.classify(sql)
    other = sql.replace("1", "7").replace("'x'", "'y'")
    assert list(cache.classify(other)) == classify_sql(other)


# -- 5. upserts, MERGE and cursors under the example policy -----------------------------------
def test_on_conflict_do_update_is_restricted_to_the_conflicting_row(engine):
    sql = ("INSERT INTO payments (id, amount_cents) VALUES ($1, $2) "
           "ON CONFLICT (id) DO UPDATE SET amount_cents = excluded.amount_cents")
    s = one(sql)
    assert (s.action, s.has_where) == ("pg:update", True)
    (decision,) = decide(engine, sql)
    assert (decision.kind, decision.policy_ids) == (ALLOW, ("payments-write-own-tables",))
    assert one("INSERT INTO payments VALUES (1) ON CONFLICT DO NOTHING").has_where is None
    # the upsert does not vouch for an unbounded DELETE next to it
    hidden = one("WITH d AS (DELETE FROM sessions RETURNING id) "
                 "INSERT INTO payments VALUES (1) ON CONFLICT (id) DO UPDATE SET id = 2")
    assert (hidden.action, hidden.has_where) == ("pg:delete", False)


def test_merge_matched_is_restricted_by_an_on_condition_naming_the_target(engine):
    sql = ("MERGE INTO ledger_entries l USING payments p ON l.payment_id = p.id "
           "WHEN MATCHED THEN UPDATE SET amount_cents = p.amount_cents "
           "WHEN NOT MATCHED THEN INSERT (payment_id, amount_cents) VALUES (p.id, p.amount_cents)")
    assert one(sql).has_where is True
    (decision,) = decide(engine, sql)
    assert decision.kind == ALLOW and "payments-write-own-tables" in decision.policy_ids
    assert one("MERGE INTO sessions s USING expired e ON s.id = e.id WHEN MATCHED THEN DELETE").has_where is True
    assert one("MERGE INTO sessions s USING expired e ON s.id = e.id "
               "WHEN MATCHED AND e.hard THEN DELETE WHEN MATCHED THEN UPDATE SET note = 'x'").has_where is True


@pytest.mark.parametrize("sql", [
    "MERGE INTO sessions s USING expired e ON true WHEN MATCHED THEN DELETE",
    "MERGE INTO sessions s USING expired e ON e.id = 1 WHEN MATCHED THEN UPDATE SET note = 'x'",
    "MERGE INTO sessions s USING expired e ON s.id = s.id WHEN MATCHED THEN DELETE",
    # NOT MATCHED BY SOURCE changes the rows the ON condition did not pair: only AND restricts
    "MERGE INTO sessions s USING expired e ON s.id = e.id WHEN NOT MATCHED BY SOURCE THEN DELETE",
])
def test_merge_without_a_target_restriction_is_unbounded(engine, sql):
    assert one(sql).has_where is False
    (decision,) = decide(engine, sql)
    assert (decision.kind, decision.policy_ids) == (DENY, ("no-unbounded-writes",))


def test_merge_not_matched_by_source_with_its_own_condition_is_restricted():
    assert one("MERGE INTO sessions s USING expired e ON s.id = e.id "
               "WHEN NOT MATCHED BY SOURCE AND s.expires_at < now() THEN DELETE").has_where is True


def test_cursor_statements_classify_and_server_side_cursors_work_under_the_example(engine):
    declare = one('DECLARE "c1" CURSOR WITHOUT HOLD FOR SELECT * FROM customers')
    assert (declare.kind, declare.action, declare.tables) == ("DeclareCursorStmt", "pg:select", ("public.customers",))
    moves = ('FETCH FORWARD 100 FROM "c1"', 'MOVE 1 IN "c1"', 'CLOSE "c1"', "CLOSE ALL")
    assert [(one(q).kind, one(q).action) for q in moves] == \
        [("FetchStmt", "pg:other")] * 2 + [("ClosePortalStmt", "pg:other")] * 2
    # what psycopg sends for a named (server-side) cursor
    session = ['BEGIN', 'DECLARE "c1" CURSOR WITHOUT HOLD FOR SELECT * FROM customers WHERE id > 100',
               'FETCH FORWARD 100 FROM "c1"', 'MOVE 1 IN "c1"', 'CLOSE "c1"', 'COMMIT']
    for identity in ("payments-api", "reporting-dashboard"):
        for sql in session:
            (decision,) = decide(engine, sql, identity)
            assert decision.kind == ALLOW, (identity, sql, decision.reason)
    # a cursor does not launder what it runs
    (denied,) = decide(engine, 'DECLARE "c2" CURSOR FOR SELECT * FROM accounts FOR UPDATE', "reporting-dashboard")
    assert (denied.kind, denied.policy_ids) == (DENY, ("reporting-no-row-locks",))
