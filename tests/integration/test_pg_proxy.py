"""Real clients through serve_postgres against a real PostgreSQL 15 (no BPF: a loopback listener)."""
import asyncio
import os
import subprocess
import time
from types import SimpleNamespace

import pytest

from records.schema import validate_fields
from tests.pg_harness import EnforcerThread, PostgresServer, cancel_a_long_query, postgres_available

pytestmark = [pytest.mark.postgres,
              pytest.mark.skipif(not postgres_available(), reason="PostgreSQL 15 binaries or the postgres user missing")]

psycopg = pytest.importorskip("psycopg")
asyncpg = pytest.importorskip("asyncpg")


class DenyDeletes:
    """A small policy implementing the decide_sql interface: DELETE on any table is denied."""

    def decide_sql(self, identity, identity_attrs, target, sql, approved=False):
        from pglast import parser

        try:
            parts = parser.split(sql) or ([sql] if sql.strip() else [])
        except Exception:
            parts = [sql]
        out = []
        for text in parts:
            verb = text.strip().split(None, 1)[0].lower() if text.strip() else ""
            denied = verb == "delete"
            stmt = SimpleNamespace(action=f"pg:{verb}", kind=verb, tables=(), functions=(), has_where=None,
                                   fingerprint=text, text=text, parse_error=None)
            decision = SimpleNamespace(kind="deny" if denied else "allow", action=f"pg:{verb}",
                                       policy_ids=("no-deletes",) if denied else ("allow-all",),
                                       reason="deletes are not allowed" if denied else "")
            out.append(SimpleNamespace(statement=stmt, decision=decision))
        return out


@pytest.fixture(scope="module")
def pg():
    with PostgresServer() as server:
        server.create_table("items", "id int primary key, name text, email text")
        yield server


@pytest.fixture(scope="module")
def enforcer(pg):
    with EnforcerThread((pg.host, pg.port), policy=DenyDeletes()) as enf:
        yield enf


def wait_for_session_end(sink, count, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(sink.of_type("session.end")) >= count:
            return
        time.sleep(0.02)
    raise AssertionError("session.end not recorded")


def session_events(sink, sid):
    return [(t, f) for t, f, s in list(sink.events) if s == sid]


def new_events(sink, before, event_type):
    """The fields of every `event_type` event of the sessions not in `before`."""
    return [f for t, f, s in list(sink.events) if t == event_type and s not in before]


def last_session(sink, before):
    sids = sink.sessions()
    new = [s for s in sids if s not in before]
    assert new, "no new session recorded"
    return new[-1]


def run_psql(enf, pg, user, *args, input=None):
    env = dict(os.environ, PGPASSWORD={"alice": "alice-pw", "bob": "bob-pw"}.get(user, ""), PGCONNECT_TIMEOUT="5")
    return subprocess.run([pg.bin("psql"), "-h", enf.host, "-p", str(enf.port), "-U", user, "-d", "app",
                           "-X", "-v", "ON_ERROR_STOP=0", *args], input=input, capture_output=True, text=True,
                          timeout=60, env=env)


# ---- psql ------------------------------------------------------------------------------
def test_psql_script_copy_and_notices(enforcer, pg, tmp_path):
    csv = tmp_path / "rows.csv"
    csv.write_text("100,a,a@x\n101,b,b@x\n")
    out_csv = tmp_path / "out.csv"
    script = f"""
INSERT INTO items VALUES (1, 'one', 'one@x'), (2, 'two', 'two@x');
SELECT count(*) AS n FROM items; SELECT 'multi' AS m;
DO $$ BEGIN RAISE NOTICE 'hello from plpgsql'; END $$;
\\copy items FROM '{csv}' WITH (FORMAT csv)
\\copy (SELECT id FROM items ORDER BY id) TO '{out_csv}' WITH (FORMAT csv)
DELETE FROM items WHERE id = 100;
SELECT count(*) AS after_delete FROM items;
"""
    before = set(enforcer.sink.sessions())
    r = run_psql(enforcer, pg, "alice", "-f", "-", input=script)
    assert "hello from plpgsql" in r.stderr
    assert "multi" in r.stdout
    assert out_csv.read_text().split() == ["1", "2", "100", "101"]
    assert "42501" in r.stderr or "permission denied by Warden" in r.stderr
    assert 'identity "test-svc"' in r.stderr and "pg:delete" in r.stderr and "no-deletes" in r.stderr
    assert "4" in r.stdout.split("after_delete")[1]          # the denied DELETE did not run
    sid = last_session(enforcer.sink, before)
    wait_for_session_end(enforcer.sink, len(before) + 1)
    ev = session_events(enforcer.sink, sid)
    statements = [f for t, f in ev if t == "pg.statement"]
    texts = [f["text"] for f in statements]
    assert texts[0].startswith("INSERT INTO items")
    assert "SELECT count(*) AS n FROM items" in texts and "SELECT 'multi' AS m" in texts
    assert any(" ".join(t.split()).startswith("COPY items FROM STDIN") for t in texts)
    denied = [f for f in statements if f["decision"] == "deny"]
    assert [f["text"] for f in denied] == ["DELETE FROM items WHERE id = 100"]
    results = [f for t, f in ev if t == "pg.result"]
    assert ("COPY 2", 2) in [(f["command_tag"], f["rows"]) for f in results]
    assert "42501" in [f["sqlstate"] for f in results]
    assert ev[0][0] == "session.start" and ev[-1][0] == "session.end"
    assert ev[0][1]["auth_method"] == "scram-sha-256"
    pg.psql_local("DELETE FROM items WHERE id >= 100", dbname="app")


def test_denied_delete_inside_transaction_aborts_it(enforcer, pg):
    script = """
BEGIN;
INSERT INTO items VALUES (50, 'tx', 'tx@x');
DELETE FROM items WHERE id = 1;
COMMIT;
SELECT count(*) AS fifty FROM items WHERE id = 50;
"""
    r = run_psql(enforcer, pg, "bob", "-f", "-", input=script)
    assert "permission denied by Warden" in r.stderr
    assert "ROLLBACK" in r.stdout                    # COMMIT of an aborted transaction rolls back
    assert pg.psql_local("SELECT count(*) FROM items WHERE id = 50", dbname="app").strip() == "0"
    assert pg.psql_local("SELECT count(*) FROM items WHERE id = 1", dbname="app").strip() == "1"


# ---- psycopg 3 ---------------------------------------------------------------------------
def test_psycopg_extended_deny_outside_and_inside_transaction(enforcer, pg):
    with psycopg.connect(enforcer.dsn(pg, user="alice"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as exc:
            conn.execute("DELETE FROM items WHERE id = %s", (1,))
        assert "no-deletes" in str(exc.value)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("SELECT count(*) FROM items WHERE id = %s", (1,)).fetchone() == (1,)
    with psycopg.connect(enforcer.dsn(pg, user="alice")) as conn:
        conn.execute("INSERT INTO items VALUES (%s, %s, %s)", (60, "x", "y"))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM items WHERE id = %s", (1,))
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.commit()                                  # server turns this into ROLLBACK
    assert pg.psql_local("SELECT count(*) FROM items WHERE id = 60", dbname="app").strip() == "0"


def test_psycopg_pipeline_copy_binary_cursor(enforcer, pg):
    with psycopg.connect(enforcer.dsn(pg, user="bob"), autocommit=True) as conn:
        with conn.pipeline():
            cur1 = conn.execute("SELECT %s::int + 1", (1,))
            cur2 = conn.execute("SELECT %s::text", ("two",))
            cur3 = conn.execute("SELECT generate_series(1, %s)", (3,))
        assert cur1.fetchone() == (2,) and cur2.fetchone() == ("two",) and len(cur3.fetchall()) == 3
        conn.execute("CREATE TEMP TABLE c (a int, b text)")
        with conn.cursor().copy("COPY c FROM STDIN") as cp:
            for i in range(500):
                cp.write_row((i, f"r{i}"))
        assert conn.execute("SELECT count(*) FROM c").fetchone() == (500,)
        with conn.cursor().copy("COPY c TO STDOUT") as cp:
            assert len(list(cp.rows())) == 500
        bcur = conn.cursor(binary=True)
        assert bcur.execute("SELECT %s::bigint, 'x'::bytea, now()::date", (2**40,)).fetchone()[:2] == (2**40, b"x")
    with psycopg.connect(enforcer.dsn(pg, user="carol")) as conn:
        with conn.cursor(name="srv") as cur:
            cur.itersize = 100
            cur.execute("SELECT generate_series(1, 1000)")
            assert sum(r[0] for r in cur) == 500500


def test_psycopg_cancel_reaches_upstream(enforcer, pg):
    with psycopg.connect(enforcer.dsn(pg, user="alice")) as conn:
        assert cancel_a_long_query(conn, 0.5) < 10
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_psql_large_objects_go_through_the_fast_path_decided_as_sql(enforcer, pg, tmp_path):
    """psql's \\lo_import, \\lo_export and \\lo_unlink use libpq's lo_* calls (protocol
    FunctionCall of the built-in large-object functions): decided as the SQL calls they are,
    forwarded as sent, recorded; the file comes back byte for byte."""
    src, back = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(os.urandom(70_000))                 # several lowrite chunks
    before = set(enforcer.sink.sessions())
    r = run_psql(enforcer, pg, "alice", "-c", f"\\lo_import {src}")
    assert r.returncode == 0 and r.stdout.startswith("lo_import "), r.stderr
    oid = int(r.stdout.split()[1])
    r = run_psql(enforcer, pg, "alice", "-c", f"\\lo_export {oid} {back}")
    assert r.returncode == 0, r.stderr
    assert back.read_bytes() == src.read_bytes()
    r = run_psql(enforcer, pg, "alice", "-c", f"\\lo_unlink {oid}")
    assert r.returncode == 0 and "lo_unlink" in r.stdout, r.stderr
    wait_for_session_end(enforcer.sink, len(before) + 3)
    calls = [f for f in new_events(enforcer.sink, before, "pg.statement") if f["protocol"] == "fastpath"]
    names = {f["text"].split("(")[0].removeprefix("SELECT pg_catalog.") for f in calls}
    assert {"lo_open", "lowrite", "loread", "lo_close", "lo_unlink"} <= names and names & {"lo_creat", "lo_create"}
    assert all(f["decision"] == "allow" for f in calls)
    written = [f["params"][1] for f in calls if "lowrite" in f["text"]]
    assert sum(int(p.strip("[] bytes")) for p in written) == 70_000
    assert not [f for f in new_events(enforcer.sink, before, "pg.result") if f["sqlstate"]]


# ---- asyncpg -----------------------------------------------------------------------------
def test_asyncpg_prepared_copy_and_timeout(enforcer, pg):
    async def main():
        conn = await asyncpg.connect(host=enforcer.host, port=enforcer.port, user="alice", password="alice-pw",
                                     database="app", timeout=10)
        try:
            stmt = await conn.prepare("SELECT $1::int * 2, $2::text")
            for i in range(5):
                assert tuple(await stmt.fetchrow(i, "t")) == (i * 2, "t")
            await conn.execute("CREATE TEMP TABLE r (a int, b text, c double precision)")
            await conn.copy_records_to_table("r", records=[(i, f"n{i}", i / 2) for i in range(300)])
            assert await conn.fetchval("SELECT count(*) FROM r") == 300
            with pytest.raises(asyncio.TimeoutError):
                await conn.fetchval("SELECT pg_sleep(20)", timeout=0.5)
            assert await conn.fetchval("SELECT 41 + 1") == 42
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await conn.execute("DELETE FROM r WHERE a = $1", 1)
            assert await conn.fetchval("SELECT count(*) FROM r") == 300
        finally:
            await conn.close()

    asyncio.run(main())


def test_binary_parameters_are_recorded_as_the_server_prints_them(enforcer, pg):
    """asyncpg sends every parameter in binary, typed by the server's ParameterDescription;
    psycopg sends an int in binary, typed in its Parse: the records read both as Postgres would
    print them (an auditor searching for customer 42 finds "42", not "\\x0000002a")."""
    import datetime
    import uuid
    before = set(enforcer.sink.sessions())
    some_uuid = uuid.UUID("12345678-1234-5678-1234-567812345678")

    async def main():
        conn = await asyncpg.connect(host=enforcer.host, port=enforcer.port, user="alice", password="alice-pw",
                                     database="app", timeout=10)
        try:
            row = await conn.fetchrow("SELECT $1::int8 + $2::int4 AS n, $3::text AS t, $4::bool AS b, "
                                      "$5::uuid AS u, $6::float8 AS f, $7::date AS d, $8::bytea AS x",
                                      9007199254740993, -7, "zoë", True, some_uuid, 1.5,
                                      datetime.date(2026, 11, 30), b"\x00\x01")
            assert row["n"] == 9007199254740986 and row["t"] == "zoë"
            stmt = await conn.prepare("SELECT $1::int4 * 2")
            assert [await stmt.fetchval(i) for i in (20, 21)] == [40, 42]
        finally:
            await conn.close()

    asyncio.run(main())
    with psycopg.connect(enforcer.dsn(pg, user="alice"), autocommit=True) as conn:
        assert conn.execute("SELECT %s + 1", (41,)).fetchone() == (42,)
    wait_for_session_end(enforcer.sink, len(before) + 2)
    params = [f["params"] for f in new_events(enforcer.sink, before, "pg.statement") if f.get("params")]
    assert params == [
        ["9007199254740993", "-7", "zoë", "true", str(some_uuid), "1.5", "2026-11-30", "\\x0001"],
        ["20"], ["21"], ["41"]]


# ---- pgbench -----------------------------------------------------------------------------
def test_pgbench_init_and_runs(enforcer, pg):
    env = dict(os.environ, PGPASSWORD="alice-pw")
    base = [pg.bin("pgbench"), "-h", enforcer.host, "-p", str(enforcer.port), "-U", "alice"]
    subprocess.run(base + ["-i", "-s", "1", "-q", "app"], check=True, capture_output=True, env=env, timeout=120)
    for mode in ("simple", "extended", "prepared"):
        r = subprocess.run(base + ["-M", mode, "-c", "2", "-t", "30", "app"], capture_output=True, text=True,
                           env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "number of transactions actually processed: 60/60" in r.stdout
        assert "number of failed transactions: 0" in r.stdout


# ---- recording -----------------------------------------------------------------------------
def test_recorded_events_match_client_actions(enforcer, pg):
    before = set(enforcer.sink.sessions())
    with psycopg.connect(enforcer.dsn(pg, user="carol", application_name="rec-test"), autocommit=True) as conn:
        conn.execute("SELECT %s::text AS v", ("first",))
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1 / %s::text::int", ("0",))
        conn.execute("SELECT generate_series(1, 7)")
    wait_for_session_end(enforcer.sink, len(before) + 1)
    sid = last_session(enforcer.sink, before)
    ev = session_events(enforcer.sink, sid)
    assert [t for t, _ in ev] == ["session.start"] + ["pg.statement", "pg.result"] * 3 + ["session.end"]
    for event_type, fields in ev:
        validate_fields(event_type, fields)
    start = ev[0][1]
    assert (start["auth_user"], start["application_name"], start["identity"], start["auth_method"]) == \
        ("carol", "rec-test", "test-svc", "trust")
    stmts = [f for t, f in ev if t == "pg.statement"]
    assert [(f["text"], f["params"], f["protocol"]) for f in stmts] == [
        ("SELECT $1::text AS v", ["first"], "extended"), ("SELECT 1 / $1::text::int", ["0"], "extended"),
        ("SELECT generate_series(1, 7)", None, "simple")]
    results = [f for t, f in ev if t == "pg.result"]
    assert [(r["command_tag"], r["rows"], r["sqlstate"]) for r in results] == [("SELECT 1", 1, None), (None, 0, "22012"),
                                                                      ("SELECT 7", 7, None)]
    end = ev[-1][1]
    assert end["statements"] == 3 and end["sqlstate"] == "22012" and end["reason"] == "client_terminated"


class RecordRefusingSink:
    """A sink that cannot take the record of one statement, as the writer when the spool is
    full and its backlog at the cap (RecordBacklogFull)."""

    def __init__(self):
        from tests.pg_harness import ListSink
        self.inner = ListSink()

    def emit(self, event_type, fields, session_id=None):
        if event_type == "pg.statement" and "refuse-me" in (fields.get("text") or ""):
            raise RuntimeError("record backlog reached 2000000 events while the spool is full; "
                               "end the session (no evidence, no access)")
        self.inner.emit(event_type, fields, session_id)


def test_a_statement_that_cannot_be_recorded_never_reaches_the_server(pg):
    with EnforcerThread((pg.host, pg.port), sink=RecordRefusingSink(), policy=DenyDeletes()) as enf:
        with psycopg.connect(enf.dsn(pg, user="alice"), autocommit=True) as conn:
            conn.execute("SELECT 1")
            with pytest.raises(psycopg.OperationalError, match="no evidence, no access"):
                conn.execute("INSERT INTO items VALUES (9001, 'refuse-me', 'x@example.com')")
    with psycopg.connect(f"host={pg.host} port={pg.port} dbname=app user=alice password=alice-pw") as direct:
        assert direct.execute("SELECT count(*) FROM items WHERE id = 9001").fetchone()[0] == 0


@pytest.mark.parametrize("use_uvloop", [False, True])
def test_idle_timeout_ends_idle_sessions_and_spares_busy_ones(pg, use_uvloop):
    """Target option idle_timeout: a session with no client traffic for that long is ended with
    FATAL 57P05 and recorded so; one that keeps sending statements is not."""
    import psycopg
    with EnforcerThread((pg.host, pg.port), options={"idle_timeout": 0.6}, use_uvloop=use_uvloop) as enf:
        def connect():
            return psycopg.connect(host=enf.host, port=enf.port, user="alice", password="alice-pw",
                                   dbname="app", sslmode="disable", autocommit=True)
        with connect() as busy, connect() as idle:
            idle.execute("SELECT 1")
            for _ in range(9):         # 1.8 s of statements 0.2 s apart
                assert busy.execute("SELECT 2").fetchone() == (2,)
                time.sleep(0.2)
            with pytest.raises(psycopg.OperationalError) as exc:
                idle.execute("SELECT 3")
            assert "idle timeout" in str(exc.value)
            assert busy.execute("SELECT 4").fetchone() == (4,)
            # a statement running longer than the timeout is not idleness
            assert busy.execute("SELECT pg_sleep(1.5), 5").fetchone() == ("", 5)
        deadline = time.monotonic() + 5
        while len(enf.sink.of_type("session.end")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        reasons = sorted(f["reason"] for f in enf.sink.of_type("session.end"))
        assert reasons[-1] == "idle_timeout" and reasons.count("idle_timeout") == 1, reasons


def test_pg_connect_is_decided_before_the_upstream_is_reached(pg):
    """pg:connect: an identity the policy does not let connect to the target gets FATAL 42501 at
    startup, before any upstream connection, and session.end says why."""
    import psycopg

    from enforcer.policy.engine import PolicyEngine
    reads = ('@id("reads")\npermit (principal, action == Action::"pg:select", resource);\n')
    connect = ('@id("connect-testdb")\npermit (principal == Service::"test-svc", action == Action::"pg:connect", '
               'resource == Target::"testdb");\n')
    for policy_text, allowed in ((reads + connect, True), (reads, False)):
        engine = PolicyEngine.from_text(policy_text)
        with EnforcerThread((pg.host, pg.port), policy=engine) as enf:
            dsn = dict(host=enf.host, port=enf.port, user="alice", password="alice-pw", dbname="app",
                       sslmode="disable", autocommit=True)
            if allowed:
                with psycopg.connect(**dsn) as conn:
                    assert conn.execute("SELECT 7").fetchone() == (7,)
                continue
            with pytest.raises(psycopg.OperationalError) as exc:
                psycopg.connect(**dsn)
            assert "pg:connect" in str(exc.value) and "test-svc" in str(exc.value)
            deadline = time.monotonic() + 5
            while not enf.sink.of_type("session.end") and time.monotonic() < deadline:
                time.sleep(0.05)
            [end] = enf.sink.of_type("session.end")
            assert end["reason"] == "connect_denied" and end["sqlstate"] == "42501" and "pg:connect" in end["error"]
