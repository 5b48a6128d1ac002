"""Column rules follow a value however the statement names it: aliases, expressions, subqueries,
CTEs, whole rows, EXECUTE of a prepared statement, FETCH from a cursor, and qualified rules
without a catalog. Bytes in, bytes out, through the session's masking point."""
import json

from enforcer.masking import catalog_from_rows
from enforcer.masking.sources import OWN_LABEL, WHOLE_ROW, Expanded, align, result_sources
from enforcer.postgres import protocol as P
from tests.unit.test_pg_session import Driver
from tests.unit.test_pg_session_masking import masked_driver, messages, rows

SSN = b"123-45-6789"
MASKED = b"***-**-6789"
CUSTOMERS_OID = 16384
Z_IDLE = P.build_ready_for_query("I")


def text_field(name, table_oid=0, attnum=0):
    return P.FieldDescription(name, table_oid, attnum, 25, -1, -1, 0)


def int_field(name, table_oid=0, attnum=0):
    return P.FieldDescription(name, table_oid, attnum, 23, 4, -1, 0)


def driver(rules: list, catalog=None) -> Driver:
    return masked_driver({"rules": rules}, catalog)


def simple(d: Driver, sql: str, fields, values) -> list:
    d.reset()
    d.client(P.build_query(sql))
    assert d.to_server == P.build_query(sql)
    d.server(P.build_row_description(fields) + P.build_data_row(values)
             + P.build_command_complete("SELECT 1") + Z_IDLE)
    return rows(d.to_client)


LABEL_RULE = [{"name": "ssn", "column": "ssn", "strategy": "partial"}]
QUALIFIED_RULE = [{"name": "ssn", "column": "public.customers.ssn", "strategy": "partial"}]


# -- the statement reader --------------------------------------------------------------------

def sources_of(sql, nfields):
    return align(result_sources(sql), nfields)


def test_alias_expression_and_plain_columns():
    got = sources_of("SELECT c.ssn AS x, upper(ssn), id FROM customers c", 3)
    assert got == (frozenset({("customers", "ssn")}), frozenset({("customers", "ssn")}),
                   frozenset({("customers", "id")}))


def test_subquery_and_cte_columns_carry_their_sources():
    assert sources_of("SELECT y FROM (SELECT ssn AS x FROM customers) s(y)", 1) == (
        frozenset({("customers", "ssn")}),)
    assert sources_of("WITH w AS (SELECT ssn x FROM customers) SELECT w.x AS z FROM w", 1) == (
        frozenset({("customers", "ssn")}),)
    assert sources_of("SELECT x FROM (SELECT ssn AS x FROM customers) s UNION SELECT 'a'", 1) == (
        frozenset({("customers", "ssn")}),)


def test_stars_expand_to_the_row_description_count():
    own = frozenset({("customers", OWN_LABEL)})       # each column is the one its label names
    got = sources_of("SELECT ssn AS x, * FROM customers", 4)
    assert got == (frozenset({("customers", "ssn")}), own, own, own)
    # a star over a subquery is that subquery's columns, in order
    got = sources_of("SELECT * FROM (SELECT id, ssn AS x FROM customers) s, orders", 4)
    assert got[:2] == (frozenset({("customers", "id")}), frozenset({("customers", "ssn")}))
    assert got[2:] == (frozenset({("orders", OWN_LABEL)}),) * 2
    # a column of a subquery's star is the table's column of that name
    assert sources_of("SELECT upper(ssn) AS y FROM (SELECT * FROM customers) s", 1) == (
        frozenset({("customers", "ssn"), (None, "ssn")}),)


def test_using_join_under_a_star_is_masked_as_a_whole():
    # USING merges columns, so positions are not the items' order: every column gets every source
    got = sources_of("SELECT * FROM (SELECT id, ssn AS x FROM customers) s JOIN orders USING (id)", 3)
    assert all(("customers", "ssn") in g for g in got)


def test_whole_rows_and_count():
    assert (("customers", WHOLE_ROW)) in sources_of("SELECT row_to_json(c) FROM customers c", 1)[0]
    assert (("customers", WHOLE_ROW)) in sources_of("SELECT to_json(c.*) FROM customers c", 1)[0]
    assert sources_of("SELECT count(ssn) FROM customers", 1) == (frozenset(),)


def test_returning_and_correlated_subqueries():
    assert sources_of("UPDATE customers SET a = 1 RETURNING ssn AS z", 1) == (frozenset({("customers", "ssn")}),)
    got = sources_of("SELECT o.id, (SELECT c.ssn FROM customers c WHERE c.id = o.cid) FROM orders o", 2)
    assert got == (frozenset({("orders", "id")}), frozenset({("customers", "ssn")}))


def test_unknown_statements_and_mismatched_counts_have_no_sources():
    assert result_sources("EXPLAIN SELECT ssn FROM customers") is None
    assert result_sources("SELEC oops") is None
    assert result_sources("SELECT 1; SELECT 2") is None
    assert align(result_sources("SELECT a, b FROM t"), 3) is None       # never guess positions
    assert isinstance(result_sources("SELECT * FROM t")[0], Expanded)


# -- through the session ---------------------------------------------------------------------

def test_alias_of_a_masked_column_is_masked_without_a_catalog():
    d = driver(LABEL_RULE)
    assert simple(d, "SELECT ssn AS x FROM customers", [text_field("x", CUSTOMERS_OID, 2)], [SSN]) == [[MASKED]]


def test_expressions_of_a_masked_column_are_masked():
    d = driver(LABEL_RULE)
    assert simple(d, "SELECT ssn || '' FROM customers", [text_field("?column?")], [SSN]) == [[MASKED]]
    assert simple(d, "SELECT lower(ssn) AS v FROM customers", [text_field("v")], [SSN]) == [[MASKED]]
    # a non-text expression of it cannot carry a masked value: NULL (the rule's on_binary)
    assert simple(d, "SELECT length(ssn) FROM customers", [int_field("length")], [b"11"]) == [[None]]


def test_columns_that_only_filter_on_a_masked_column_stay_clear():
    d = driver(LABEL_RULE)
    assert simple(d, "SELECT id FROM customers WHERE ssn = '1'", [int_field("id", CUSTOMERS_OID, 1)],
                  [b"7"]) == [[b"7"]]
    assert simple(d, "SELECT count(ssn) FROM customers", [int_field("count")], [b"3"]) == [[b"3"]]


def test_subquery_alias_and_whole_row_are_masked():
    d = driver(LABEL_RULE)
    assert simple(d, "SELECT y FROM (SELECT ssn AS y FROM customers) s", [text_field("y", CUSTOMERS_OID, 2)],
                  [SSN]) == [[MASKED]]
    # a whole row as text cannot be masked by key: masked whole
    got = simple(d, "SELECT c::text FROM customers c", [text_field("c")], [b"(1,123-45-6789)"])
    assert SSN not in got[0][0]


def test_whole_row_json_is_masked_by_key_and_keeps_its_document():
    d = driver(LABEL_RULE + [{"name": "scan", "scan_all_text": True, "detectors": ["email"]}])
    json_field = P.FieldDescription("row_to_json", 0, 0, 114, -1, -1, 0)
    got = simple(d, "SELECT row_to_json(c) FROM customers c", [json_field],
                 [b'{"id":1,"ssn":"123-45-6789","note":"mail jane@example.com"}'])
    doc = json.loads(got[0][0])
    assert doc["id"] == 1 and doc["ssn"] == MASKED.decode() and "jane@example.com" not in doc["note"]
    # a row of a table without that column is left as it is
    got = simple(d, "SELECT json_agg(o) FROM orders o", [json_field], [b'[{"id":1,"total":3}]'])
    assert got == [[b'[{"id":1,"total":3}]']]
    # not JSON after all: it cannot be masked by key, so it is not sent
    assert simple(d, "SELECT row_to_json(c) FROM customers c", [json_field], [b"oops"]) == [[None]]


def test_qualified_rule_without_catalog_masks_by_the_statement_tables():
    """Before, a schema.table.column rule matched nothing without the catalog (values went out clear)."""
    d = driver(QUALIFIED_RULE)
    assert simple(d, "SELECT ssn FROM customers", [text_field("ssn", CUSTOMERS_OID, 2)], [SSN]) == [[MASKED]]
    assert simple(d, "SELECT c.ssn AS x FROM public.customers c", [text_field("x", CUSTOMERS_OID, 2)],
                  [SSN]) == [[MASKED]]
    three = [int_field("id", CUSTOMERS_OID, 1), text_field("ssn", CUSTOMERS_OID, 2), text_field("name", CUSTOMERS_OID, 3)]
    assert simple(d, "SELECT * FROM customers", three, [b"1", SSN, b"Ann"]) == [[b"1", MASKED, b"Ann"]]
    # the same column name in another table is another column
    assert simple(d, "SELECT ssn FROM suppliers", [text_field("ssn", 16500, 2)], [SSN]) == [[SSN]]


def test_catalog_names_the_column_behind_an_alias():
    catalog = catalog_from_rows([(CUSTOMERS_OID, 2, "public", "customers", "ssn")])
    d = driver(LABEL_RULE, catalog=catalog)
    # the text is not even needed: the catalog says which column this is
    d.reset()
    d.client(P.build_query("SELECT ssn AS x FROM customers"))
    d.server(P.build_row_description([text_field("x", CUSTOMERS_OID, 2)]) + P.build_data_row([SSN])
             + P.build_command_complete("SELECT 1") + Z_IDLE)
    assert rows(d.to_client) == [[MASKED]]


def test_sql_execute_is_masked_as_the_prepared_statement():
    d = driver(LABEL_RULE)
    d.client(P.build_query("PREPARE q AS SELECT ssn AS x FROM customers WHERE id = $1"))
    d.server(P.build_command_complete("PREPARE") + Z_IDLE)
    assert simple(d, "EXECUTE q(1)", [text_field("x", CUSTOMERS_OID, 2)], [SSN]) == [[MASKED]]
    # re-prepared under the same name: the new meaning counts
    d.client(P.build_query("DEALLOCATE q"))
    d.server(P.build_command_complete("DEALLOCATE") + Z_IDLE)
    d.client(P.build_query("PREPARE q AS SELECT name AS x FROM customers WHERE id = $1"))
    d.server(P.build_command_complete("PREPARE") + Z_IDLE)
    assert simple(d, "EXECUTE q(1)", [text_field("x", CUSTOMERS_OID, 3)], [b"Ann"]) == [[b"Ann"]]


def test_fetch_from_a_cursor_is_masked_as_its_query():
    d = driver(LABEL_RULE)
    d.client(P.build_query("BEGIN"))
    d.server(P.build_command_complete("BEGIN") + P.build_ready_for_query("T"))
    d.client(P.build_query("DECLARE cur CURSOR FOR SELECT ssn AS x FROM customers"))
    d.server(P.build_command_complete("DECLARE CURSOR") + P.build_ready_for_query("T"))
    assert simple(d, "FETCH 10 FROM cur", [text_field("x", CUSTOMERS_OID, 2)], [SSN]) == [[MASKED]]


def test_extended_protocol_alias_is_masked():
    d = driver(LABEL_RULE)
    d.client(P.build_parse("s1", "SELECT ssn AS x FROM customers WHERE id = $1") + P.build_describe("S", "s1")
             + P.SYNC)
    d.server(P.PARSE_COMPLETE + P.build_parameter_description([23])
             + P.build_row_description([text_field("x", CUSTOMERS_OID, 2)]) + Z_IDLE)
    d.reset()
    d.client(P.build_bind("", "s1", [b"1"]) + P.build_execute() + P.SYNC)
    d.server(P.BIND_COMPLETE + P.build_data_row([SSN]) + P.build_command_complete("SELECT 1") + Z_IDLE)
    assert rows(d.to_client) == [[MASKED]]


# -- robustness: the reader follows any tree the parser gives without failing ---------------------

CORPUS = [
    "SELECT c.ssn AS x, upper(ssn), id, c.*, (SELECT ssn FROM t) s, row_to_json(c) FROM customers c",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT n, ssn FROM r, customers",
    "SELECT * FROM (SELECT id, ssn AS x FROM customers) s JOIN orders o USING (id) NATURAL JOIN z",
    "SELECT a.*, b.x, lateral_s.* FROM a, LATERAL (SELECT a.ssn AS y) lateral_s, b",
    "INSERT INTO t (a) SELECT ssn FROM customers ON CONFLICT DO NOTHING RETURNING *, a AS b",
    "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = s.ssn",
    "SELECT * FROM unnest(ARRAY[1,2]) WITH ORDINALITY AS u(v, n), generate_series(1, 3) g",
    "SELECT x FROM xmltable('/r' PASSING '<r/>' COLUMNS x text PATH 'x') AS xt",
    "SELECT json_agg(o ORDER BY o.id) FILTER (WHERE o.ssn IS NOT NULL) FROM orders o GROUP BY ROLLUP (o.a)",
    "VALUES (1, (SELECT ssn FROM customers LIMIT 1)) UNION SELECT 2, 'x' ORDER BY 1",
    "DECLARE c SCROLL CURSOR WITH HOLD FOR SELECT ssn FROM customers TABLESAMPLE SYSTEM (10)",
    "PREPARE p (int) AS SELECT ssn FROM customers WHERE id = $1",
    "SELECT (c).ssn, (row(1, 2)).f1, c.ssn[1], ARRAY(SELECT ssn FROM customers) FROM customers c",
]


def test_mutated_statements_never_break_the_reader():
    import random

    from enforcer.masking.sources import _Reader, _TooDeep
    rng = random.Random(1234)
    followed = 0
    for i in range(3000):
        text = rng.choice(CORPUS)
        for _ in range(rng.randint(0, 3)):
            a, b = sorted(rng.randrange(len(text) + 1) for _ in range(2))
            op = rng.randrange(3)
            text = text[:a] + text[b:] if op == 0 else text[:a] + text[a:b] * 2 + text[b:] if op == 1 \
                else text[:a] + rng.choice(["*", ",", "(", ")", " AS q", " ssn", "."]) + text[a:]
        try:
            entries = _Reader(lambda kind, name: CORPUS[0]).text(text)
        except _TooDeep:
            continue
        if entries is not None:
            followed += 1
            for n in (0, 1, 5, 40):
                got = align(entries, n)
                assert got is None or len(got) == n
    assert followed > 300        # most mutations still parse: the walk really ran on them


# -- COPY (query) TO STDOUT ------------------------------------------------------------------------

def copy_out(d: Driver, sql: str, ncols: int, lines: list) -> list:
    d.reset()
    d.client(P.build_query(sql))
    d.server(P.build_copy_out_response(0, [0] * ncols) + b"".join(P.build_copy_data(x) for x in lines)
             + P.build_copy_done() + P.build_command_complete(f"COPY {len(lines)}") + Z_IDLE)
    return messages(d.to_client)


def test_copy_of_a_query_is_masked_by_the_columns_it_reads():
    """Before, COPY (query) TO was refused whenever column rules were in force."""
    d = driver(QUALIFIED_RULE)
    got = copy_out(d, "COPY (SELECT id, ssn AS tax_id FROM customers) TO STDOUT", 2, [b"1\t123-45-6789\n"])
    assert (b"d", b"1\t***-**-6789\n") in got
    got = copy_out(d, "COPY (SELECT upper(ssn), id FROM customers) TO STDOUT (FORMAT csv)", 2, [b"123-45-6789,1\n"])
    assert (b"d", b'"***-**-6789",1\n') in got


def test_copy_of_a_table_star_query_is_still_refused():
    # no RowDescription names the columns of a table's `*`: which field is ssn is unknown
    d = driver(QUALIFIED_RULE)
    got = copy_out(d, "COPY (SELECT * FROM customers) TO STDOUT", 2, [b"1\t123-45-6789\n"])
    assert not any(t == b"d" for t, _ in got)
    assert any(t == b"E" for t, _ in got)


def test_catalog_reads_views_through_their_definitions():
    rows = [(16384, 1, "public", "customers", "id"), (16384, 2, "public", "customers", "ssn"),
            (16390, 1, "public", "customer_view", "id"), (16390, 2, "public", "customer_view", "tax_id"),
            (16390, 3, "public", "customer_view", "loud"), (16395, 1, "public", "nested", "t")]
    views = [(16390, " SELECT customers.id,\n    customers.ssn AS tax_id,\n    upper(customers.ssn) AS loud\n"
                     "   FROM customers;"),
             (16395, " SELECT customer_view.tax_id AS t\n   FROM customer_view;")]
    catalog = catalog_from_rows(rows, views)
    assert catalog(16390, 2) == "public.customer_view.tax_id"
    assert catalog.sources(16390, 2) == frozenset({("customers", "ssn")})
    assert catalog.sources(16390, 3) == frozenset({("customers", "ssn")})
    assert catalog.sources(16395, 1) == frozenset({("customers", "ssn")})      # a view over a view
    assert catalog.sources(16384, 2) is None                                   # a table's own column
    d = driver(QUALIFIED_RULE, catalog=catalog)
    fields = [int_field("id", 16390, 1), text_field("tax_id", 16390, 2), text_field("loud", 16390, 3)]
    assert simple(d, "SELECT * FROM customer_view", fields, [b"1", SSN, SSN]) == [[b"1", MASKED, MASKED]]
    assert simple(d, "SELECT t AS x FROM nested", [text_field("x", 16395, 1)], [SSN]) == [[MASKED]]


FUNCTIONS = [("public", "get_ssn", "SELECT ssn FROM customers WHERE id = $1"),
             ("public", "tax_id", "SELECT 1; SELECT reverse(c.ssn) FROM customers c WHERE c.id = $1"),
             ("public", "via_other", "SELECT public.get_ssn($1)"),
             ("public", "customer_row", "SELECT * FROM customers WHERE id = $1"),
             ("public", "looping", "SELECT looping($1)"),
             ("public", "unreadable", "SELEC nonsense")]


def function_sources(sql, nfields):
    return align(result_sources(sql, None, catalog_from_rows([], [], FUNCTIONS).function_bodies), nfields)


def test_sql_functions_from_the_catalog_carry_what_their_bodies_return():
    ssn = frozenset({("customers", "ssn")})
    assert function_sources("SELECT get_ssn(7) AS x", 1) == (ssn,)
    assert function_sources("SELECT public.tax_id(id) FROM orders", 1) == (ssn | {("orders", "id")},)
    assert function_sources("SELECT via_other(1)", 1) == (ssn,)                     # a function calling one
    assert function_sources("SELECT t FROM get_ssn(1) AS t", 1) == (ssn,)           # in FROM
    assert function_sources("SELECT customer_row(1)", 1) == (frozenset({("customers", WHOLE_ROW)}),)
    assert function_sources("SELECT unreadable(1)", 1) == (frozenset({(None, WHOLE_ROW)}),)
    assert function_sources("SELECT looping(1)", 1) is None          # too deep: unknown, as before
    assert function_sources("SELECT lower('a'), count(get_ssn(1))", 2) == (frozenset(), frozenset())
    assert sources_of("SELECT get_ssn(7) AS x", 1) == (frozenset(),)              # no catalog: opaque


def plpgsql(name: str, body: str, args: str = "p_id integer", returns: str = "text") -> tuple:
    """A FUNCTIONS_QUERY row of a PL/pgSQL function: its definition as pg_get_functiondef prints it."""
    return ("public", name, f"CREATE OR REPLACE FUNCTION public.{name}({args})\n RETURNS {returns}\n"
                            f" LANGUAGE plpgsql\nAS $function$\n{body}\n$function$\n", "plpgsql")


PLPGSQL = [
    plpgsql("ssn_into", "DECLARE v text;\nBEGIN\n  SELECT ssn INTO v FROM customers WHERE id = p_id;\n"
                        "  CREATE TEMP TABLE IF NOT EXISTS scratch (a int);\n  RETURN upper(v);\nEND"),
    plpgsql("has_ssn", "BEGIN\n  RETURN EXISTS (SELECT 1 FROM customers WHERE id = p_id AND ssn IS NOT NULL);\nEND",
            returns="boolean"),
    plpgsql("ssn_checked", "DECLARE v text;\nBEGIN\n  v := (SELECT c.ssn FROM customers c WHERE c.id = p_id);\n"
                           "  RETURN v IS NOT NULL;\nEND", returns="boolean"),
    plpgsql("emails", "DECLARE r record; acc text := '';\nBEGIN\n"
                      "  FOR r IN SELECT email FROM users LOOP acc := acc || r.email; END LOOP;\n"
                      "  RETURN acc;\nEND"),
    plpgsql("rows_of", "BEGIN\n  RETURN QUERY SELECT name FROM people WHERE id = p_id;\nEND",
            returns="SETOF text"),
    plpgsql("touched", "DECLARE v text;\nBEGIN\n  UPDATE customers SET seen = now() WHERE id = p_id "
                         "RETURNING ssn INTO v;\n  RETURN v;\nEND"),
    plpgsql("constant", "BEGIN\n  RETURN 'id ' || p_id;\nEND"),
    plpgsql("calls_sql", "BEGIN\n  RETURN public.get_ssn(p_id);\nEND"),
    plpgsql("cursor", "DECLARE c CURSOR FOR SELECT ssn FROM customers; v text;\nBEGIN\n"
                      "  OPEN c; FETCH c INTO v; CLOSE c;\n  RETURN v;\nEND"),
    plpgsql("dynamic", "DECLARE v text;\nBEGIN\n  EXECUTE 'SELECT name FROM people WHERE id = $1' INTO v USING p_id;\n"
                       "  RETURN v;\nEND"),
    plpgsql("dynamic_query", "BEGIN\n  RETURN QUERY EXECUTE 'SELECT name FROM people';\nEND", returns="SETOF text"),
    plpgsql("open_dynamic", "DECLARE c refcursor; v text;\nBEGIN\n  OPEN c FOR EXECUTE 'SELECT 1'; FETCH c INTO v;\n"
                            "  RETURN v;\nEND"),
    plpgsql("broken", "BEGIN\n  RETURN QUERY SELECT 1;\nEND"),       # RETURN QUERY in a non-SETOF function
]


def plpgsql_sources(sql, nfields):
    return align(result_sources(sql, None, catalog_from_rows([], [], FUNCTIONS + PLPGSQL).function_bodies), nfields)


def test_plpgsql_functions_carry_everything_their_bodies_read():
    ssn = frozenset({("customers", "ssn")})
    assert plpgsql_sources("SELECT ssn_into(7)", 1) == (ssn,)                 # SELECT INTO, then upper(v)
    assert plpgsql_sources("SELECT ssn_checked(7)", 1) == (ssn,)              # an assignment from a subquery
    assert plpgsql_sources("SELECT touched(7)", 1) == (ssn,)                # UPDATE ... RETURNING INTO
    assert plpgsql_sources("SELECT cursor(7)", 1) == (ssn,)                   # a cursor declared in DECLARE
    assert plpgsql_sources("SELECT calls_sql(7)", 1) == (ssn,)                # through a SQL function
    assert plpgsql_sources("SELECT emails()", 1) == (frozenset({("users", "email")}),)
    assert plpgsql_sources("SELECT x FROM rows_of(1) AS x", 1) == (frozenset({("people", "name")}),)
    # only what the body's queries return: a WHERE column alone (has_ssn reads 1) is not a value
    assert plpgsql_sources("SELECT has_ssn(7)", 1) == (frozenset(),)
    # arguments and constants carry nothing of a table; variables are not tables
    assert plpgsql_sources("SELECT constant(7)", 1) == (frozenset(),)
    # a call also carries its arguments, as any function's does
    order_id = frozenset({("orders", "id")})
    assert plpgsql_sources("SELECT public.ssn_into(id), constant(id) FROM orders", 2) == (ssn | order_id, order_id)


def test_plpgsql_bodies_the_reader_cannot_follow_may_return_anything():
    anything = (frozenset({(None, WHOLE_ROW)}),)
    for name in ("dynamic", "dynamic_query", "open_dynamic", "broken"):
        assert plpgsql_sources(f"SELECT {name}(1)", 1) == anything, name
    # the catalog hands PL/pgSQL definitions out marked as such; SQL bodies stay plain text
    catalog = catalog_from_rows([], [], FUNCTIONS + PLPGSQL)
    assert type(catalog.function_bodies("ssn_into")[0]).__name__ == "PlpgsqlDefinition"
    assert type(catalog.function_bodies("public.get_ssn")[0]) is str
    assert plpgsql_sources("SELECT ssn_into(7)", 1) != sources_of("SELECT ssn_into(7)", 1)   # no catalog: opaque


def test_a_plpgsql_function_returning_a_masked_column_is_masked_through_the_catalog():
    rows = [(16384, 1, "public", "customers", "id"), (16384, 2, "public", "customers", "ssn")]
    d = driver(QUALIFIED_RULE, catalog=catalog_from_rows(rows, [], FUNCTIONS + PLPGSQL))
    assert simple(d, "SELECT ssn_into(1) AS x", [text_field("x")], [SSN]) == [[MASKED]]
    assert simple(d, "SELECT constant(1)", [text_field("constant")], [b"id 1"]) == [[b"id 1"]]


def test_a_function_returning_a_masked_column_is_masked_through_the_catalog():
    rows = [(16384, 1, "public", "customers", "id"), (16384, 2, "public", "customers", "ssn")]
    d = driver(QUALIFIED_RULE, catalog=catalog_from_rows(rows, [], FUNCTIONS))
    assert simple(d, "SELECT get_ssn(1) AS x", [text_field("x")], [SSN]) == [[MASKED]]
    assert simple(d, "SELECT tax_id(1)", [text_field("tax_id")], [b"9876-54-321"]) != [[b"9876-54-321"]]
    assert simple(d, "SELECT length(name) FROM customers", [int_field("length")], [b"8"]) == [[b"8"]]
