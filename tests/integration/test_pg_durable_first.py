"""Target option durable_before_forward, against a real PostgreSQL 15 with the real RecordWriter:
a statement reaches the database only once its record is fsync'd in the spool, so a killed
agent never leaves a statement that ran without its record."""
from __future__ import annotations

import threading
import time

import pytest

from tests.gated_records import GatedWriter
from tests.pg_harness import EnforcerThread, PostgresServer, postgres_available

pytestmark = [pytest.mark.postgres,
              pytest.mark.skipif(not postgres_available(), reason="PostgreSQL 15 binaries or the postgres user missing")]

psycopg = pytest.importorskip("psycopg")


@pytest.fixture(scope="module")
def pg():
    with PostgresServer() as server:
        server.create_table("ledger", "id int primary key, note text")
        yield server


def direct_count(pg, note: str) -> int:
    with psycopg.connect(pg.dsn(user="alice")) as direct:
        return direct.execute("SELECT count(*) FROM ledger WHERE note = %s", (note,)).fetchone()[0]


@pytest.mark.parametrize("durable", [True, False])
@pytest.mark.parametrize("use_uvloop", [False, True])
def test_a_statement_reaches_the_database_only_after_its_record_is_stored(pg, tmp_path, durable, use_uvloop):
    records = GatedWriter(tmp_path)
    note = f"durable-{durable}-{use_uvloop}"
    row_id = 10 + 2 * durable + use_uvloop
    options = {"durable_before_forward": True} if durable else {}
    try:
        with EnforcerThread((pg.host, pg.port), sink=records.writer, options=options, use_uvloop=use_uvloop) as enf:
            with psycopg.connect(enf.dsn(pg, user="alice"), autocommit=True) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
                records.writer.flush()
                records.gate.clear()                 # the disk stops taking batches
                done = threading.Event()
                errors = []

                def insert():
                    try:
                        conn.execute("INSERT INTO ledger VALUES (%s, %s)", (row_id, note))
                    except Exception as exc:       # surfaced below
                        errors.append(exc)
                    done.set()
                threading.Thread(target=insert, daemon=True).start()
                time.sleep(0.8)
                if durable:
                    # held: not at the database, not in the spool, the client still waiting
                    assert not done.is_set()
                    assert direct_count(pg, note) == 0
                    assert not any(note in t or "INSERT" in t for t in records.stored_texts())
                else:
                    # the default: forwarded at once, recorded within spool.flush_interval
                    assert done.wait(5) and not errors and direct_count(pg, note) == 1
                records.gate.set()
                assert done.wait(10) and not errors, errors
                assert direct_count(pg, note) == 1
                records.writer.flush()
                assert any(t.startswith("INSERT INTO ledger") for t in records.stored_texts())
                # the session goes on as usual: extended protocol, a pipeline, a transaction
                with conn.pipeline():
                    conn.execute("SELECT %s::int", (5,))
                    cur = conn.execute("SELECT count(*) FROM ledger WHERE note = %s", (note,))
                assert cur.fetchone() == (1,)
                with conn.transaction():
                    conn.execute("UPDATE ledger SET note = note WHERE note = %s", (note,))
    finally:
        records.close()


def test_a_record_that_cannot_be_stored_in_time_ends_the_session_with_53100_and_nothing_runs(pg, tmp_path):
    records = GatedWriter(tmp_path)
    try:
        with EnforcerThread((pg.host, pg.port), sink=records.writer,
                            options={"durable_before_forward": True, "durable_timeout": 0.5}) as enf:
            with psycopg.connect(enf.dsn(pg, user="alice"), autocommit=True) as conn:
                conn.execute("SELECT 1")
                records.writer.flush()
                records.gate.clear()
                with pytest.raises(psycopg.OperationalError) as exc:
                    conn.execute("INSERT INTO ledger VALUES (3, 'never-stored')")
                assert exc.value.sqlstate == "53100"
                assert "did not forward" in str(exc.value) and "durable_before_forward" in str(exc.value)
            assert direct_count(pg, "never-stored") == 0
            records.gate.set()
    finally:
        records.close()


def test_without_a_record_writer_such_a_target_forwards_nothing(pg):
    """A sink with no durable store cannot satisfy the option: the session is refused rather
    than run unrecorded (fail closed)."""
    with EnforcerThread((pg.host, pg.port), options={"durable_before_forward": True}) as enf:
        with pytest.raises(psycopg.OperationalError) as exc:
            psycopg.connect(enf.dsn(pg, user="alice"), autocommit=True)
        assert "no record writer" in str(exc.value)
