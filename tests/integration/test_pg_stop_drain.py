"""When the agent stops (its `stopping` event set), Postgres sessions are not cut mid-statement or
mid-transaction: each ends at its next idle point with FATAL 57P01, as at a server shutdown, and
is recorded with reason agent_stopping. A session the stop could not wait for (cancelled) is told
the same and recorded the same. Real psycopg clients, real PostgreSQL 15."""
import asyncio
import threading
import time

import pytest

from tests.pg_harness import EnforcerThread, PostgresServer, postgres_available

pytestmark = [pytest.mark.postgres,
              pytest.mark.skipif(not postgres_available(), reason="PostgreSQL 15 binaries or the postgres user missing")]

psycopg = pytest.importorskip("psycopg")


@pytest.fixture(scope="module")
def pg():
    with PostgresServer() as server:
        server.create_table("drained", "id int primary key, note text")
        yield server


def set_stopping(enforcer, event):
    enforcer.loop.call_soon_threadsafe(event.set)


def ended(enforcer, count, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ends = enforcer.sink.of_type("session.end")
        if len(ends) >= count:
            return ends
        time.sleep(0.02)
    raise AssertionError(f"{len(enforcer.sink.of_type('session.end'))} sessions ended, not {count}")


def shut_down(conn) -> str:
    """The SQLSTATE a connection's next statement meets (the FATAL the enforcer sent)."""
    with pytest.raises(psycopg.OperationalError) as info:
        conn.execute("SELECT 1")
    return getattr(info.value, "sqlstate", None) or str(info.value)


def test_sessions_end_at_their_next_idle_point_and_transactions_finish(pg):
    event = asyncio.Event()
    with EnforcerThread((pg.host, pg.port), stopping=event) as enforcer:
        idle = psycopg.connect(enforcer.dsn(pg), autocommit=True)
        in_tx = psycopg.connect(enforcer.dsn(pg))
        busy = psycopg.connect(enforcer.dsn(pg), autocommit=True)
        try:
            idle.execute("SELECT 1")
            in_tx.execute("INSERT INTO drained VALUES (1, 'inside a transaction at the stop')")
            slow: dict = {}
            runner = threading.Thread(target=lambda: slow.update(
                rows=busy.execute("SELECT pg_sleep(0.8), 'finished'").fetchall()))
            runner.start()
            time.sleep(0.2)                       # the slow statement is running
            set_stopping(enforcer, event)
            (first,) = ended(enforcer, 1)         # the idle session goes at once
            assert first["reason"] == "agent_stopping" and first["sqlstate"] == "57P01"
            assert shut_down(idle) == "57P01"
            # the transaction is left to finish, and what it did is committed
            in_tx.execute("INSERT INTO drained VALUES (2, 'after the stop began')")
            in_tx.commit()
            runner.join(5)
            assert slow["rows"] == [("", "finished")]      # the running statement got its result
            ends = ended(enforcer, 3)
            assert [e["reason"] for e in ends] == ["agent_stopping"] * 3
            assert shut_down(in_tx) == "57P01" and shut_down(busy) == "57P01"
        finally:
            for conn in (idle, in_tx, busy):
                conn.close()
    with psycopg.connect(pg.dsn()) as direct:
        assert direct.execute("SELECT id FROM drained ORDER BY id").fetchall() == [(1,), (2,)]


def test_a_session_the_stop_cannot_wait_for_is_told_and_recorded(pg):
    """Cancelled (agent.stop_drain ran out) in the middle of a transaction: the client gets
    57P01, the record says agent_stopping, and the server rolls the transaction back."""
    event = asyncio.Event()
    enforcer = EnforcerThread((pg.host, pg.port), stopping=event).start()
    conn = psycopg.connect(enforcer.dsn(pg))
    try:
        conn.execute("INSERT INTO drained VALUES (3, 'never committed')")
        set_stopping(enforcer, event)
        time.sleep(0.2)
        assert enforcer.sink.of_type("session.end") == []       # waiting for the transaction
        enforcer.stop()                                          # cancels every session
        (end,) = ended(enforcer, 1)
        assert (end["reason"], end["sqlstate"]) == ("agent_stopping", "57P01")
        assert shut_down(conn) == "57P01"
    finally:
        conn.close()
    with psycopg.connect(pg.dsn()) as direct:
        assert direct.execute("SELECT count(*) FROM drained WHERE id = 3").fetchone() == (0,)


def test_without_a_stop_a_cancelled_session_is_recorded_as_cancelled(pg):
    enforcer = EnforcerThread((pg.host, pg.port)).start()
    conn = psycopg.connect(enforcer.dsn(pg), autocommit=True)
    try:
        conn.execute("SELECT 1")
        enforcer.stop()
        (end,) = ended(enforcer, 1)
        assert end["reason"] == "cancelled"
    finally:
        conn.close()
