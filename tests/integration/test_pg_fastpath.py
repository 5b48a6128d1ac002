"""Fast-path function calls (protocol FunctionCall) of any function, from libpq's own PQfn through
serve_postgres to a real PostgreSQL 15: with the target's catalog (read with the agent's
FUNCTION_OIDS_QUERY) a call is decided by the Cedar engine as the SQL call it is, recorded, and
runs; without it, or denied, the server itself refuses it with 42501."""
import pytest

from enforcer.masking import CATALOG_QUERY, FUNCTION_OIDS_QUERY, FUNCTIONS_QUERY, VIEWS_QUERY, catalog_from_rows
from tests.libpq import Libpq
from tests.pg_harness import EnforcerThread, PostgresServer, postgres_available

pytestmark = [pytest.mark.postgres,
              pytest.mark.skipif(not postgres_available(), reason="PostgreSQL 15 binaries or the postgres user missing")]

psycopg = pytest.importorskip("psycopg")

POLICY = """
@id("connect")
permit (principal == Service::"test-svc", action == Action::"pg:connect", resource == Target::"testdb");
@id("reads")
permit (principal == Service::"test-svc", action == Action::"pg:select", resource in Target::"testdb");
"""


@pytest.fixture(scope="module")
def pg():
    with PostgresServer() as server:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("CREATE FUNCTION public.add_one(i int4) RETURNS int4 LANGUAGE sql AS 'SELECT i + 1'")
        yield server


def catalog_of(pg):
    with psycopg.connect(pg.dsn()) as conn:
        return catalog_from_rows(*(conn.execute(q).fetchall()
                                   for q in (CATALOG_QUERY, VIEWS_QUERY, FUNCTIONS_QUERY, FUNCTION_OIDS_QUERY)))


def oid_of(pg, signature: str) -> int:
    with psycopg.connect(pg.dsn()) as conn:
        return conn.execute("SELECT %s::regprocedure::oid::int8", (signature,)).fetchone()[0]


def statements(enforcer):
    return [f for f in enforcer.sink.of_type("pg.statement") if f["protocol"] == "fastpath"]


def test_a_call_the_catalog_names_is_decided_as_sql_recorded_and_runs(pg):
    from enforcer.policy.engine import PolicyEngine

    catalog = catalog_of(pg)
    add_one, read_file = oid_of(pg, "public.add_one(int4)"), oid_of(pg, "pg_catalog.pg_read_file(text)")
    assert catalog.function_by_oid(add_one) == ("public", "add_one", (23,), 23)
    assert catalog.function_by_oid(read_file) == ("pg_catalog", "pg_read_file", (25,), 25)
    with EnforcerThread((pg.host, pg.port), policy=PolicyEngine.from_text(POLICY),
                        function_by_oid=catalog.function_by_oid) as enforcer:
        client = Libpq(enforcer.dsn(pg))
        try:
            assert client.call_int(add_one, 41) == (42, None)
            # a dangerous built-in: action pg:function, which this policy does not permit
            assert client.call_int(read_file, 0) == (None, "42501")
            assert client.call_int(add_one, 1) == (2, None)      # the session goes on
        finally:
            client.close()
        allowed, denied, again = statements(enforcer)
        assert (allowed["text"], allowed["params"], allowed["action"], allowed["decision"], allowed["policy_ids"]) == (
            'SELECT "public"."add_one"($1)', ["41"], "pg:select", "allow", ["reads"])
        assert (denied["text"], denied["action"], denied["decision"]) == (
            'SELECT "pg_catalog"."pg_read_file"($1)', "pg:function", "deny")
        results = enforcer.sink.of_type("pg.result")
        by_index = {r["statement_index"]: r for r in results}
        assert (by_index[allowed["statement_index"]]["bytes"], by_index[allowed["statement_index"]]["sqlstate"]) == (
            4, None)
        assert by_index[denied["statement_index"]]["sqlstate"] == "42501"


def test_without_a_catalog_the_call_is_refused_by_the_server_itself(pg):
    from enforcer.policy.engine import PolicyEngine

    add_one = oid_of(pg, "public.add_one(int4)")
    with EnforcerThread((pg.host, pg.port), policy=PolicyEngine.from_text(POLICY)) as enforcer:
        client = Libpq(enforcer.dsn(pg))
        try:
            assert client.call_int(add_one, 41) == (None, "42501")
            assert client.call_int(add_one, 41) == (None, "42501")
        finally:
            client.close()
        (st, _) = statements(enforcer)
        assert (st["text"], st["decision"]) == (f"<FunctionCall of function OID {add_one}>", "deny")
        assert "policy cannot see" in st["reason"]


def test_the_server_sees_the_call_as_sent(pg):
    """What reaches the server is the client's FunctionCall itself, not a rewrite: a call of a
    function that raises shows the function's own error."""
    from enforcer.policy.engine import PolicyEngine

    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("CREATE FUNCTION public.fail_with(i int4) RETURNS int4 LANGUAGE plpgsql AS "
                     "$$BEGIN RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'failed with ' || i; END$$")
    catalog = catalog_of(pg)
    fail_with = oid_of(pg, "public.fail_with(int4)")
    with EnforcerThread((pg.host, pg.port), policy=PolicyEngine.from_text(POLICY),
                        function_by_oid=catalog.function_by_oid) as enforcer:
        client = Libpq(enforcer.dsn(pg))
        try:
            assert client.call_int(fail_with, 7) == (None, "P0001")
        finally:
            client.close()
        (st,) = statements(enforcer)
        (res,) = [r for r in enforcer.sink.of_type("pg.result") if r["statement_index"] == st["statement_index"]]
        assert (res["sqlstate"], res["error"]) == ("P0001", "failed with 7")
