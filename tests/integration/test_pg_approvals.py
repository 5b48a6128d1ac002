"""Approvals of statement executions with their parameters: psycopg runs a parameterized DELETE
(the extended protocol: Parse, then Bind with the value) through serve_postgres; each execution
waits for a human, who sees the statement and the value it binds.

Real parts: PostgreSQL started by tests/pg_harness.py, `warden-collector serve` with an enrolled
agent (the fixtures of test_http_approvals), enforcer.approvals.ApprovalClient, psycopg as the
workload and the `warden approvals` CLI as the approver.
"""
from __future__ import annotations

import threading

import pytest

from enforcer.approvals import ApprovalClient
from enforcer.policy.engine import PolicyEngine
from tests.integration.test_http_approvals import _cli, _pending, agent_token, collector  # noqa: F401 (fixtures)
from tests.pg_harness import EnforcerThread, PostgresServer, postgres_available

pytestmark = [pytest.mark.postgres,
              pytest.mark.skipif(not postgres_available(), reason="PostgreSQL 15 binaries or the postgres user missing")]

psycopg = pytest.importorskip("psycopg")

POLICY = """
@id("housekeeping")
permit (principal == Service::"test-svc", action in [Action::"pg:connect", Action::"pg:other"],
        resource == Target::"testdb");
@id("t-writes")
permit (principal == Service::"test-svc", action in [Action::"pg:select", Action::"pg:insert", Action::"pg:delete"],
        resource == Table::"testdb/public.t");
@id("deletes-need-approval")
@approval("required")
forbid (principal, action == Action::"pg:delete", resource == Table::"testdb/public.t")
unless { context.approved };
"""
DELETE = "DELETE FROM t WHERE id = $1"


@pytest.fixture(scope="module")
def pg():
    with PostgresServer() as server:
        server.create_table("t", "id int primary key")
        yield server


def _ids(pg) -> list[int]:
    out = pg.psql_local("SELECT string_agg(id::text, ',' ORDER BY id) FROM t", dbname="app")
    return [int(x) for x in out.strip().split(",") if x.strip()]


def _in_background(fn) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run():
        try:
            result["value"] = fn()
        except Exception as e:      # noqa: BLE001 - the test looks at what the client got
            result["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_each_execution_waits_for_an_approver_who_sees_its_parameters(pg, collector, agent_token):  # noqa: F811
    pg.psql_local("TRUNCATE t; INSERT INTO t VALUES (1), (2), (3)", dbname="app")
    approvals = ApprovalClient(collector["url"], agent_token, timeout_s=30)
    env = {"WARDEN_COLLECTOR": collector["url"], "WARDEN_TOKEN": collector["approver"]}
    with EnforcerThread((pg.host, pg.port), policy=PolicyEngine.from_text(POLICY), approvals=approvals) as enf:
        conn = psycopg.connect(enf.dsn(pg, user="alice"), autocommit=True)
        try:
            cur = conn.cursor()

            # id 1: held until approved; the approver saw the value
            thread, result = _in_background(lambda: cur.execute("DELETE FROM t WHERE id = %s", (1,)).rowcount)
            first = _pending(env, set())
            assert first["statement"] == f"{DELETE} -- parameters: $1 = '1'"
            listed = _cli("warden", "approvals", "list", env=env)
            assert first["id"] in listed and "$1 = '1'" in listed
            assert thread.is_alive()                       # still waiting for the approver
            _cli("warden", "approvals", "approve", first["id"], "--reason", "CHG-7", env=env)
            thread.join(40)
            assert result == {"value": 1}

            # the same prepared statement with id 2: asked again, and denied
            thread, result = _in_background(lambda: cur.execute("DELETE FROM t WHERE id = %s", (2,)).rowcount)
            second = _pending(env, {first["id"]})
            assert second["statement"] == f"{DELETE} -- parameters: $1 = '2'"
            _cli("warden", "approvals", "deny", second["id"], "--reason", "wrong customer", env=env)
            thread.join(40)
            err = result.get("error")
            assert isinstance(err, psycopg.errors.InsufficientPrivilege), result
            assert "wrong customer" in str(err)
            assert _ids(pg) == [2, 3]

            # inside a transaction a denied execution aborts it: COMMIT cannot keep the INSERT
            cur.execute("BEGIN")
            cur.execute("INSERT INTO t VALUES (%s)", (10,))
            thread, result = _in_background(lambda: cur.execute("DELETE FROM t WHERE id = %s", (3,)).rowcount)
            third = _pending(env, {first["id"], second["id"]})
            assert third["statement"].endswith("$1 = '3'")
            _cli("warden", "approvals", "deny", third["id"], "--reason", "no", env=env)
            thread.join(40)
            assert isinstance(result.get("error"), psycopg.errors.InsufficientPrivilege), result
            cur.execute("COMMIT")
            assert cur.statusmessage == "ROLLBACK"
            assert _ids(pg) == [2, 3]
            cur.execute("SELECT 1 FROM t")                 # the session goes on
        finally:
            conn.close()

        statements = [f for f in enf.sink.of_type("pg.statement") if f["text"] == DELETE]
        # psycopg sends a small int as binary int2: records and approvers read it by the Parse's
        # declared type
        assert [(f["params"], f["decision"]) for f in statements] == [
            (["1"], "allow"), (["2"], "deny"), (["3"], "deny")]
        requested = enf.sink.of_type("approval.requested")
        assert [f["summary"] for f in requested] == [f"{DELETE} -- parameters: $1 = '{i}'" for i in (1, 2, 3)]
        assert [f["statement_index"] for f in requested] == [f["statement_index"] for f in statements]
        decided = enf.sink.of_type("approval.decided")
        assert [(f["decision"], f["summary"]) for f in decided] == [
            ("approved", f"{DELETE} -- parameters: $1 = '1'"), ("denied", f"{DELETE} -- parameters: $1 = '2'"),
            ("denied", f"{DELETE} -- parameters: $1 = '3'")]


def test_grant_window_covers_the_same_value_only(pg, collector, agent_token):  # noqa: F811
    pg.psql_local("TRUNCATE t; INSERT INTO t VALUES (1), (2)", dbname="app")
    approvals = ApprovalClient(collector["url"], agent_token, timeout_s=30, grant_window_s=60)
    env = {"WARDEN_COLLECTOR": collector["url"], "WARDEN_TOKEN": collector["approver"]}
    seen = {a["id"] for a in _approvals(env)}
    with EnforcerThread((pg.host, pg.port), policy=PolicyEngine.from_text(POLICY), approvals=approvals) as enf:
        with psycopg.connect(enf.dsn(pg, user="alice"), autocommit=True) as conn:
            cur = conn.cursor()
            thread, result = _in_background(lambda: cur.execute("DELETE FROM t WHERE id = %s", (1,)).rowcount)
            first = _pending(env, seen)
            _cli("warden", "approvals", "approve", first["id"], "--reason", "CHG-8", env=env)
            thread.join(40)
            assert result == {"value": 1}
            # the exact repeat (same text, same value) goes through on that approval
            assert cur.execute("DELETE FROM t WHERE id = %s", (1,)).rowcount == 0
            # another value is asked about again
            thread, result = _in_background(lambda: cur.execute("DELETE FROM t WHERE id = %s", (2,)).rowcount)
            second = _pending(env, seen | {first["id"]})
            assert second["statement"].endswith("$1 = '2'")
            _cli("warden", "approvals", "approve", second["id"], "--reason", "CHG-9", env=env)
            thread.join(40)
            assert result == {"value": 1}
        reasons = [f["reason"] for f in enf.sink.of_type("pg.statement") if f["text"] == DELETE]
        assert reasons[0] == "approved by alice.approver: CHG-8"
        assert reasons[1].startswith(f"approval {first['id']} by alice.approver covers this repeat")
        assert reasons[2] == "approved by alice.approver: CHG-9"


def _approvals(env: dict) -> list:
    import json
    items = json.loads(_cli("warden", "approvals", "list", "--json", env=env))
    return items.get("items", items) if isinstance(items, dict) else items
