"""SQL EXECUTE through the enforcer against a real PostgreSQL: decided and recorded as the statement
prepared under its name (psycopg: a Parse of EXECUTE; asyncpg's execute: a simple Query)."""
import asyncio

import pytest

from enforcer.policy.store import PolicyStore
from records.schema import validate_fields
from tests.pg_harness import EnforcerThread, PostgresServer, postgres_available

pytestmark = [pytest.mark.postgres,
              pytest.mark.skipif(not postgres_available(), reason="PostgreSQL 15 binaries or the postgres user missing")]

psycopg = pytest.importorskip("psycopg")
asyncpg = pytest.importorskip("asyncpg")

BASE = """
@id("connect")
permit (principal == Service::"test-svc", action == Action::"pg:connect", resource == Target::"testdb");
@id("housekeeping")
permit (principal == Service::"test-svc", action == Action::"pg:other", resource == Target::"testdb");
@id("read-orders")
permit (principal == Service::"test-svc", action == Action::"pg:select", resource == Table::"testdb/public.orders");
"""
CUSTOMERS = """
@id("read-customers")
permit (principal == Service::"test-svc", action == Action::"pg:select", resource == Table::"testdb/public.customers");
"""


@pytest.fixture(scope="module")
def pg():
    with PostgresServer() as server:
        server.create_table("orders", "id int primary key, item text")
        server.create_table("customers", "id int primary key, name text")
        server.psql_local("INSERT INTO orders VALUES (1, 'lamp'); INSERT INTO customers VALUES (1, 'Ada')", dbname="app")
        yield server


@pytest.fixture
def policy(tmp_path):
    """A policy file and its store; `policy.write(text)` reloads it, as the agent does."""
    path = tmp_path / "policy.cedar"
    path.write_text(BASE + CUSTOMERS)
    store = PolicyStore(str(path))

    def write(text):
        path.write_text(text)
        assert store.reload()
    store.write = write
    return store


@pytest.fixture
def enforcer(pg, policy):
    with EnforcerThread((pg.host, pg.port), policy=policy) as enf:
        yield enf


def statements(enf, text):
    found = [f for f in enf.sink.of_type("pg.statement") if f["text"] == text]
    for f in found:
        validate_fields("pg.statement", f)
    return found


def test_psycopg_execute_is_decided_as_the_prepared_statement(enforcer, pg, policy):
    with psycopg.connect(enforcer.dsn(pg), autocommit=True) as conn:
        conn.execute("PREPARE o (int) AS SELECT item FROM orders WHERE id = $1")
        conn.execute("PREPARE c (int) AS SELECT name FROM customers WHERE id = $1")
        # binary results: psycopg sends Parse/Bind/Execute, and the Parse of EXECUTE is decided
        # (a utility statement takes no $n parameters, so the arguments are literals)
        assert conn.execute("EXECUTE o(1)", binary=True).fetchall() == [("lamp",)]
        assert conn.execute("EXECUTE c(1)", binary=True).fetchall() == [("Ada",)]
        (rec,) = statements(enforcer, "EXECUTE c(1)")
        assert (rec["kind"], rec["action"], rec["tables"], rec["decision"], rec["protocol"], rec["params"]) == (
            "SelectStmt", "pg:select", ["public.customers"], "allow", "extended", [])
        assert rec["prepared"] == {"name": "c", "text": "PREPARE c (int) AS SELECT name FROM customers WHERE id = $1"}

        policy.write(BASE)      # customers may no longer be read; pg:other still may
        assert conn.execute("EXECUTE o(1)", binary=True).fetchall() == [("lamp",)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pg:select"):
            conn.execute("EXECUTE c(1)", binary=True)
        denied = statements(enforcer, "EXECUTE c(1)")[-1]
        assert (denied["tables"], denied["decision"], denied["protocol"]) == (["public.customers"], "deny", "extended")
        assert [r["tables"] for r in statements(enforcer, "EXECUTE o(1)")] == [["public.orders"]] * 2


def test_simple_query_execute_follows_prepare_and_deallocate(enforcer, pg, policy):
    async def run():
        conn = await asyncpg.connect(host=enforcer.host, port=enforcer.port, user="alice", password="alice-pw",
                                     database="app")
        try:
            await conn.execute("PREPARE c (int) AS SELECT name FROM customers WHERE id = $1")
            assert await conn.execute("EXECUTE c(1)") == "SELECT 1"
            policy.write(BASE)
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError, match="pg:select"):
                await conn.execute("EXECUTE c(1)")
            # the name now holds a statement on orders: the same text is allowed
            await conn.execute("DEALLOCATE c")
            await conn.execute("PREPARE c (int) AS SELECT item FROM orders WHERE id = $1")
            assert await conn.execute("EXECUTE c(1)") == "SELECT 1"
            await conn.execute("DEALLOCATE ALL")
            with pytest.raises(asyncpg.exceptions.InvalidSQLStatementNameError):
                await conn.execute("EXECUTE c(1)")
        finally:
            await conn.close()
    asyncio.run(run())
    recs = statements(enforcer, "EXECUTE c(1)")
    assert [(r["action"], r["tables"], r["decision"], r["protocol"]) for r in recs] == [
        ("pg:select", ["public.customers"], "allow", "simple"),
        ("pg:select", ["public.customers"], "deny", "simple"),
        ("pg:select", ["public.orders"], "allow", "simple"),
        ("pg:other", [], "allow", "simple"),
    ]
    assert [r.get("prepared", {}).get("text") for r in recs] == [
        "PREPARE c (int) AS SELECT name FROM customers WHERE id = $1",
        "PREPARE c (int) AS SELECT name FROM customers WHERE id = $1",
        "PREPARE c (int) AS SELECT item FROM orders WHERE id = $1", None]
