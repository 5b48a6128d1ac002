"""The bulk ingest path: sessions spanning batches, a session.start that arrives late,
overlapping batches (first copy kept, problem flagged), all on a real SQLite file."""
import time

import pytest
from sqlalchemy import select

from collector.config import CollectorConfig
from collector.simulate import SimulatedAgent
from collector.storage.schema import events, sessions
from tests.unit.test_collector_retention import Env


@pytest.fixture
def env(tmp_path):
    env = Env(CollectorConfig(state_dir=str(tmp_path / "state"), db=f"sqlite:///{tmp_path}/c.db"))
    yield env
    env.close()


def test_session_spanning_batches_and_late_start(env):
    agent = SimulatedAgent("bulk-agent")
    env.enroll(agent)
    sid, evs = agent.session(identity="billing", target="crm", statements=[("SELECT 1 FROM public.t", ["public.t"])])
    env.ingest(agent, evs[:2])   # start + statement
    env.ingest(agent, evs[2:])   # result, end: inherit identity from the stored session
    with env.store.read() as c:
        row = c.execute(select(sessions).where(sessions.c.sid == sid)).one()
        identities = set(c.execute(select(events.c.identity).where(events.c.sid == sid)).scalars())
    assert (row.event_count, row.statement_count, row.identity) == (4, 1, "billing") and row.end_ns is not None
    assert identities == {"billing"}

    # A statement stored before its session.start (recorded out of order by a writer).
    late = "late-session"
    now = time.time_ns()
    statement = agent.event("pg.statement", {"text": "SELECT 2", "tables": []}, late, now)
    env.ingest(agent, [statement])
    start = agent.event("session.start", {"identity": "reports", "target": "crm", "protocol": "postgres"}, late, now - 1)
    env.ingest(agent, [start])
    with env.store.read() as c:
        row = c.execute(select(sessions).where(sessions.c.sid == late)).one()
        identities = list(c.execute(select(events.c.identity).where(events.c.sid == late)).scalars())
    assert (row.identity, row.event_count, row.statement_count, row.start_ns) == ("reports", 2, 1, now - 1)
    assert identities == ["reports", "reports"]
    assert env.client.get("/v1/verify", headers=env.headers("auditor")).json()["ok"]


def test_overlapping_batch_keeps_first_copy_and_is_flagged(env):
    agent = SimulatedAgent("overlap-agent")
    env.enroll(agent)
    _, evs = agent.session(identity="svc", target="db", statements=[("SELECT 1", [])])
    env.ingest(agent, evs[:3])
    answer = env.ingest(agent, evs[1:])  # seq 2..5, of which 2..3 are stored already
    assert answer["problems"] and answer["last_seq"] == len(evs)
    with env.store.read() as c:
        seqs = list(c.execute(select(events.c.seq).where(events.c.agent_id == "overlap-agent")
                              .order_by(events.c.seq)).scalars())
        batch_ids = dict(c.execute(select(events.c.seq, events.c.batch_id)
                                   .where(events.c.agent_id == "overlap-agent")).all())
    assert seqs == list(range(1, len(evs) + 1))
    assert batch_ids[2] == batch_ids[1] != batch_ids[4]  # 2 stays indexed from the first batch
    agents = env.client.get("/v1/agents", headers=env.headers("auditor")).json()["items"]
    assert agents[0]["chain_ok"] is False
