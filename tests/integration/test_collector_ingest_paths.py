"""The fast ingest paths store exactly what the plain one would, on SQLite and on a real
PostgreSQL: multi-row INSERTs (SQLite) and binary COPY (PostgreSQL) of the index rows,
batches ingested by worker processes, the skipped lookups for a batch that continues
the chain, and the index dropped by migration 4. Refusals and chain problems stay the
same through the worker processes."""
from __future__ import annotations

import json

import pytest
from sqlalchemy import select, text

import collector.ingest as ingest
from collector.indexer import EVENT_COLUMNS, TABLE_COLUMNS, build_index
from collector.ingest import IngestRejected, ingest_batch
from collector.queries import list_events, list_sessions, session_events
from collector.simulate import SimulatedAgent
from collector.storage.engine import Store
from collector.storage.schema import MIGRATIONS, agents, event_tables, events, schema_migrations, sessions
from records.batch import decode_batch, encode_batch
from records.signing import public_key_bytes
from tests.pg_harness import collector_pg_url_fixture, fresh_postgres_database

T0 = 1_714_530_900 * 10**9


pg_url = pytest.fixture(scope="module", name="pg_url")(collector_pg_url_fixture)


@pytest.fixture(params=["sqlite", "postgresql"])
def make_store(request, tmp_path):
    """make_store(name) -> a migrated, empty Store on the parametrized backend."""
    made = []

    def make(name: str) -> Store:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path / name}.db"
        else:
            url = fresh_postgres_database(request.getfixturevalue("pg_url"), name)
        store = Store(url)
        store.migrate()
        made.append(store)
        return store

    yield make
    ingest.shutdown_ingest_workers()
    for store in made:
        store.dispose()


@pytest.fixture
def workers(monkeypatch):
    """Route every batch, however small, through one ingest worker process."""
    monkeypatch.setattr(ingest, "_OFFLOAD_MIN_BYTES", 0)
    ingest.set_ingest_workers(1)
    yield
    ingest.set_ingest_workers(None)


def enroll(store: Store, agent: SimulatedAgent) -> None:
    with store.write() as c:
        c.execute(agents.insert().values(agent_id=agent.agent_id, public_key=public_key_bytes(agent.key),
                                         hostname=agent.hostname, enrolled_ns=1, last_seq=0, batches=0,
                                         events=0, chain_ok=True, problem_count=0))


def workload(agent: SimulatedAgent) -> list[bytes]:
    """Sessions spanning batches, many tables (one qualified, one not, one odd), and a
    decision on each statement: three batches."""
    batches, pending = [], []
    for n in range(30):
        _, evs = agent.session(identity=f"svc-{n % 3}", target="crm", start_ns=T0 + n * 10**9,
                               statements=[(f"SELECT * FROM public.t{n % 7}", [f"public.t{n % 7}"]),
                                           ("SELECT 1 FROM orders, \"Public\".Odd", ["orders", '"Public".Odd']),
                                           ("SELECT now()", [])],
                               decision="deny" if n % 5 == 0 else "allow")
        pending += evs
        if n in (9, 19, 29):
            cut = len(pending) - 4 if n != 29 else len(pending)  # leave sessions open across batches
            batches.append(agent.batch_bytes(pending[:cut]))
            pending = pending[cut:]
    return batches


def snapshot(store: Store) -> dict:
    """Everything a query can show, in a backend-neutral form."""
    with store.read() as c:
        rows = [tuple(r) for r in c.execute(select(*[events.c[n] for n in EVENT_COLUMNS if n != "batch_id"])
                                            .order_by(events.c.agent_id, events.c.seq))]
        tables = [tuple(r) for r in c.execute(select(*[event_tables.c[n] for n in TABLE_COLUMNS])
                                              .order_by(event_tables.c.agent_id, event_tables.c.seq,
                                                        event_tables.c.table_name))]
        session_rows = [tuple(r) for r in c.execute(select(sessions).order_by(sessions.c.sid))]
        window = dict(since=T0, until=T0 + 40 * 10**9, limit=1000)
        queries = {
            "qualified": list_events(c, table="public.t3", **window).as_dict(),
            "unqualified": list_events(c, table="T3", **window).as_dict(),
            "odd": list_events(c, table='"Public".Odd', **window).as_dict(),
            "identity": list_events(c, identity="svc-1", **window).as_dict(),
            "type": list_events(c, event_type="pg.*", **window).as_dict(),
            "sessions": list_sessions(c, table="public.t3", **window).as_dict(),
            "denied": list_sessions(c, decision="deny", limit=1000).as_dict(),
            "one_session": session_events(c, session_rows[0][0]).as_dict(),
        }
    return {"events": rows, "tables": tables, "sessions": session_rows,
            "queries": json.loads(json.dumps(queries, default=str))}


def expected_index(agent_id: str, hostname: str, raws: list[bytes]) -> tuple[list, list]:
    """What the plain path stores: build_index's rows, inserted one by one."""
    known: dict = {}
    event_rows, table_rows = [], []
    for raw in raws:
        index = build_index(agent_id, hostname, 0, decode_batch(raw).events, known)
        event_rows += [tuple(v for n, v in zip(EVENT_COLUMNS, row) if n != "batch_id") for row in index.event_rows]
        table_rows += [tuple(r) for r in index.table_rows]
    return event_rows, sorted(table_rows)


def test_bulk_insert_stores_what_build_index_produced(make_store):
    store = make_store("plain")
    agent = SimulatedAgent("paths-agent", hostname="app-1")
    enroll(store, agent)
    raws = workload(agent)
    for raw in raws:
        assert ingest_batch(store, agent.agent_id, raw).problems == []
    got = snapshot(store)
    want_events, want_tables = expected_index(agent.agent_id, agent.hostname, raws)
    assert got["events"] == want_events
    assert sorted(got["tables"]) == want_tables
    q = got["queries"]
    assert q["qualified"]["count"] and q["unqualified"]["count"] == q["qualified"]["count"]
    assert q["odd"]["count"] == 30 and all(len(e["tables"]) == 2 for e in q["odd"]["items"])
    assert all(e["identity"] == "svc-1" for e in q["identity"]["items"]) and q["identity"]["count"]
    assert {e["type"] for e in q["type"]["items"]} == {"pg.statement", "pg.result"}
    assert q["denied"]["count"] == 6
    assert {s["event_count"] for s in q["sessions"]["items"]} == {8}


def test_worker_processes_store_the_same_as_inline(make_store, workers):
    inline, pooled = make_store("inline_store"), make_store("pooled_store")
    agent = SimulatedAgent("paths-agent", hostname="app-1")
    raws = workload(agent)
    for store in (inline, pooled):
        enroll(store, agent)
    ingest.set_ingest_workers(0)
    for raw in raws:
        ingest_batch(inline, agent.agent_id, raw)
    ingest.set_ingest_workers(1)
    for raw in raws:
        ingest_batch(pooled, agent.agent_id, raw)
    assert ingest.ingest_worker_pids(), "the batches did not go through a worker process"
    assert snapshot(pooled) == snapshot(inline)


def test_sqlite_and_postgresql_answer_queries_alike(tmp_path, pg_url):
    agent = SimulatedAgent("paths-agent", hostname="app-1")
    raws = workload(agent)
    stores = [Store(f"sqlite:///{tmp_path}/alike.db"), Store(pg_url)]
    try:
        snapshots = []
        for store in stores:
            store.migrate()
            with store.write() as c:
                c.execute(text("DELETE FROM event_tables")), c.execute(text("DELETE FROM events"))
                c.execute(text("DELETE FROM sessions")), c.execute(text("DELETE FROM batches"))
                c.execute(text("DELETE FROM agents"))
            enroll(store, agent)
            for raw in raws:
                ingest_batch(store, agent.agent_id, raw)
            snapshots.append(snapshot(store))
        assert snapshots[0] == snapshots[1]
    finally:
        for store in stores:
            store.dispose()


def test_refusals_and_chain_problems_through_a_worker(make_store, workers):
    store = make_store("problems")
    agent = SimulatedAgent("paths-agent")
    enroll(store, agent)
    _, first = agent.session(identity="svc", target="db", statements=[("SELECT 1", [])])
    _, second = agent.session(identity="svc", target="db", statements=[("SELECT 2", [])])
    _, third = agent.session(identity="svc", target="db", statements=[("SELECT 3", [])])
    raw_first = agent.batch_bytes(first)
    assert ingest_batch(store, agent.agent_id, raw_first).problems == []

    forged = decode_batch(agent.batch_bytes(second))
    forged.events[1]["f"]["text"] = "SELECT 'nothing to see'"
    with pytest.raises(IngestRejected) as refused:
        ingest_batch(store, agent.agent_id, encode_batch(forged))
    assert refused.value.status == 422 and "modified" in refused.value.detail
    with pytest.raises(IngestRejected) as wrong_agent:
        ingest_batch(store, "someone-else", raw_first)
    assert wrong_agent.value.status == 403
    with pytest.raises(IngestRejected) as garbage:
        ingest_batch(store, agent.agent_id, b"\x28\xb5\x2f\xfd" + bytes(64))
    assert garbage.value.status == 400

    again = ingest_batch(store, agent.agent_id, raw_first)  # a retry: acknowledged, stored once
    assert again.duplicate and again.events == 0
    gap = ingest_batch(store, agent.agent_id, agent.batch_bytes(third))  # `second` never arrived
    assert [p["kind"] for p in gap.problems] == ["missing"]
    late = ingest_batch(store, agent.agent_id, agent.batch_bytes(second))  # ...until now
    assert late.problems == []
    with store.read() as c:
        seqs = list(c.execute(select(events.c.seq).order_by(events.c.seq)).scalars())
        chain_ok = c.execute(select(agents.c.chain_ok)).scalar_one()
    assert seqs == list(range(1, agent.seq + 1)) and not chain_ok


def test_migration_4_drops_the_indexes_and_queries_still_answer(tmp_path):
    url = f"sqlite:///{tmp_path}/old.db"
    store = Store(url)
    try:
        with store.write() as c:  # a database as version 3 left it
            schema_migrations.create(c)
            for version, name, step in MIGRATIONS[:3]:
                step(c)
                c.execute(schema_migrations.insert().values(version=version, name=name, applied_ns=1))
            c.exec_driver_sql("CREATE INDEX ix_event_tables_name_ts ON event_tables (table_name, ts)")
            c.exec_driver_sql("CREATE INDEX ix_events_type_ts ON events (type, ts)")
        agent = SimulatedAgent("old-agent")
        enroll(store, agent)
        for raw in workload(agent):
            ingest_batch(store, agent.agent_id, raw)
        before = snapshot(store)["queries"]
        assert store.migrate() == [v for v, _, _ in MIGRATIONS[3:]]  # 4 and those after it (5: sessions' "how")
        with store.read() as c:
            names = set(c.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'index'").scalars())
        assert not {"ix_event_tables_name_ts", "ix_events_type_ts"} & names
        assert "ix_event_tables_base_ts" in names
        assert snapshot(store)["queries"] == before
    finally:
        store.dispose()


def test_session_lookup_beyond_one_chunk(make_store):
    """More sessions in one batch than one IN list / array holds on SQLite (500)."""
    store = make_store("many_sessions")
    agent = SimulatedAgent("wide-agent")
    enroll(store, agent)
    opened = [agent.event("session.start", {"identity": f"svc-{n}", "target": "db"}, f"s{n:04d}", T0 + n)
              for n in range(1200)]
    ingest_batch(store, agent.agent_id, agent.batch_bytes(opened))
    later = [agent.event("pg.statement", {"text": "SELECT 1", "tables": ["t"]}, f"s{n:04d}", T0 + 5000 + n)
             for n in range(1200)]
    ingest_batch(store, agent.agent_id, agent.batch_bytes(later))
    with store.read() as c:
        identities = dict(c.execute(select(events.c.sid, events.c.identity)
                                    .where(events.c.type == "pg.statement")).all())
        counts = set(c.execute(select(sessions.c.event_count)).scalars())
    assert identities == {f"s{n:04d}": f"svc-{n}" for n in range(1200)} and counts == {2}


def test_a_killed_worker_costs_no_batch(make_store, workers):
    import os
    import signal
    import time

    store = make_store("killed")
    agent = SimulatedAgent("paths-agent")
    enroll(store, agent)
    raws = workload(agent)
    ingest_batch(store, agent.agent_id, raws[0])
    for pid in ingest.ingest_worker_pids():
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    assert ingest_batch(store, agent.agent_id, raws[1]).problems == []  # stored in this process
    assert ingest_batch(store, agent.agent_id, raws[2]).problems == []  # by a fresh worker
    assert ingest.ingest_worker_pids()
    with store.read() as c:
        assert c.execute(select(agents.c.last_seq)).scalar_one() == agent.seq


def test_workers_leave_when_the_server_is_killed(tmp_path):
    """A collector killed with -9 shuts nothing down: its ingest workers must not linger (with
    the database open) as orphans."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys, time; from collector import ingest; "
            "print(' '.join(map(str, ingest.start_ingest_workers())), flush=True); time.sleep(120)")
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    try:
        pids = [int(p) for p in server.stdout.readline().split()]
        assert pids and all(_running(pid) for pid in pids)
    finally:
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if _running(pid)], "ingest workers outlived the killed server"


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever adopted it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_odd_field_types_are_stored_as_text(make_store):
    """An agent's fields are free-form: non-string host/protocol must not break the COPY."""
    store = make_store("odd_types")
    agent = SimulatedAgent("odd-agent")
    enroll(store, agent)
    start = agent.event("session.start", {"identity": {"name": "svc"}, "target": 7, "host": 12, "protocol": 5},
                        "odd", T0)
    assert ingest_batch(store, agent.agent_id, agent.batch_bytes([start])).problems == []
    with store.read() as c:
        row = c.execute(select(sessions.c.identity, sessions.c.target, sessions.c.host, sessions.c.protocol)).one()
    assert tuple(row) == ("svc", "7", "12", "5")
