"""Verification recomputes the index from the evidence as ingest derived it (a real SQLite file,
real records/ batches and keys): untampered stores pass whatever the batch boundaries, late
session.starts and late decisions; edited derived data fails; and each batch is checked with the
key its agent had for that batch's sequence numbers across key rotations."""
from __future__ import annotations

import base64
import random
import time
import uuid

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select, text, update

from collector import retention
from collector.auth import create_enrollment_token
from collector.config import CollectorConfig
from collector.ingest import AgentKeyConflict, enroll_agent, ingest_batch
from collector.integrity import verify_store
from collector.simulate import SimulatedAgent
from collector.storage.engine import Store
from collector.storage.schema import MIGRATIONS, agent_keys, agents, schema_migrations
from tests.unit.test_collector_retention import Env

DAY_NS = 86400 * 10**9


@pytest.fixture
def env(tmp_path):
    env = Env(CollectorConfig(state_dir=str(tmp_path / "state"), db=f"sqlite:///{tmp_path}/c.db", ingest_workers=0))
    yield env
    env.close()


def check(env: Env, **kwargs) -> dict:
    with env.store.read() as c:
        return verify_store(c, checkpoint_key=env.keys.public_key, **kwargs)


def workload(agent: SimulatedAgent, rng: random.Random, sessions: int = 20, start_ns: int | None = None,
             step_ns: int = 1000, late_starts: bool = True) -> list[dict]:
    """Interleaved Postgres and HTTP sessions as the enforcers record them, plus: sessions whose
    session.start is sealed after some of their events, requests held for approval or decided
    by a later policy.decision (SNI-only), events without a session."""
    now = start_ns if start_ns is not None else time.time_ns()
    out, live, opened = [], [], 0

    def emit(kind, fields, sid=None):
        nonlocal now
        now += step_ns
        out.append(agent.event(kind, fields, sid, now))

    while opened < sessions or live:
        roll = rng.random()
        if opened < sessions and (roll < 0.2 or not live):
            s = {"sid": uuid.uuid4().hex, "protocol": rng.choice(["postgres", "http"]), "n": 0, "held": [],
                 "late": late_starts and rng.random() < 0.15, "identity": rng.choice(["svc", "etl", "billing"])}
            s["started"] = not s["late"]
            if s["started"]:
                emit("session.start", {"identity": s["identity"], "target": "db", "protocol": s["protocol"],
                                       "host": "h1", "auth_user": "app", "database": "d", "tls_client": False},
                     s["sid"])
            live.append(s)
            opened += 1
            continue
        if roll < 0.25:
            emit("agent.heartbeat", {"version": "1", "uptime_s": 1})
            continue
        s = rng.choice(live)
        sid = s["sid"]
        if not s["started"] and rng.random() < 0.3:
            emit("session.start", {"identity": s["identity"], "target": "db", "protocol": s["protocol"]}, sid)
            s["started"] = True
        elif rng.random() < 0.12 and not s["held"] and s["started"]:
            emit("session.end", {"reason": rng.choice(["client_terminated", "error"]), "error": None,
                                 "sqlstate": rng.choice([None, "57P01"])}, sid)
            live.remove(s)
        elif s["protocol"] == "postgres":
            s["n"] += 1
            emit("pg.statement", {"text": f"SELECT {s['n']}", "tables": rng.choice([[], ["public.t"], ["a", "b"]]),
                                  "decision": rng.choice(["allow", "allow", "deny"]), "statement_index": s["n"],
                                  "policy_ids": ["p"]}, sid)
            emit("pg.result", {"command_tag": "SELECT 1", "rows": 1, "statement_index": s["n"]}, sid)
        elif s["held"] and rng.random() < 0.5:
            index = s["held"].pop(0)
            emit("approval.decided", {"approval_id": f"a{index}", "decision": "approved", "approver": "x"}, sid)
            emit("policy.decision", {"decision": rng.choice(["allow", "deny", "approval"]), "request_index": index},
                 sid)
        else:
            s["n"] += 1
            decision = rng.choice(["allow", "deny", "approval", None])
            fields = {"method": "GET", "host": "api", "path": f"/{s['n']}", "request_index": s["n"]}
            if decision is not None:
                fields["decision"] = decision
            emit("http.request", fields, sid)
            if decision == "approval":
                emit("approval.requested", {"approval_id": f"a{s['n']}", "request_index": s["n"]}, sid)
                s["held"].append(s["n"])
            elif decision is None and rng.random() < 0.6:
                emit("policy.decision", {"decision": rng.choice(["allow", "deny"]), "request_index": s["n"]}, sid)
            elif decision is None:
                s["held"].append(s["n"])
            else:
                emit("http.response", {"status": 200, "request_index": s["n"]}, sid)
    return out


def cut(events: list[dict], rng: random.Random) -> list[list[dict]]:
    batches, current = [], []
    for event in events:
        current.append(event)
        if rng.random() < 0.15:
            batches.append(current)
            current = []
    return batches + [current] if current else batches


def load(env: Env, seed: int, **kwargs) -> SimulatedAgent:
    rng = random.Random(seed)
    agent = SimulatedAgent(f"agent-{seed}")
    env.enroll(agent)
    for batch in cut(workload(agent, rng, **kwargs), rng):
        env.ingest(agent, batch)
    return agent


@pytest.mark.parametrize("seed", range(6))
def test_untampered_stores_pass_whatever_the_batching(env, seed):
    load(env, seed)
    report = check(env)
    assert report["ok"], report["problems"][:5]
    # a window of the history (sessions may begin before it and end after it) passes too
    with env.store.read() as c:
        starts = sorted(c.execute(text("SELECT first_ts FROM batches")).scalars())
    for since, until in ((starts[len(starts) // 3], None), (None, starts[len(starts) // 2]),
                         (starts[len(starts) // 4], starts[3 * len(starts) // 4])):
        report = check(env, since_ns=since, until_ns=until)
        assert report["ok"], (since, until, report["problems"][:5])


@pytest.mark.parametrize("seed", range(3))
def test_verification_after_retention_passes(env, seed):
    rng = random.Random(seed)
    agent = SimulatedAgent("aged")
    env.enroll(agent)
    # 400-odd events over 30 days: retention at 20 days cuts through open sessions
    for batch in cut(workload(agent, rng, start_ns=time.time_ns() - 30 * DAY_NS, step_ns=30 * DAY_NS // 400,
                              late_starts=False), rng):
        env.ingest(agent, batch)
    purged = retention.purge(env.store, env.keys.private_key, days=20, actor="test")
    assert purged["batches"] > 0
    report = check(env)
    assert report["ok"] and report["agents"][0]["checkpoint"]["signature_ok"], report["problems"][:5]


TAMPERS = {
    "identity": "UPDATE events SET identity = 'x' WHERE seq = (SELECT min(seq) FROM events WHERE identity IS NOT NULL "
                "AND type = 'pg.statement')",
    "identity of a row a late session.start filled": (
        "UPDATE events SET identity = NULL WHERE seq = (SELECT min(e.seq) FROM events e JOIN events s ON s.sid = e.sid "
        "AND s.type = 'session.start' AND s.seq > e.seq)"),
    "decision a later batch settled": (
        "UPDATE events SET decision = 'approval' WHERE seq = (SELECT min(seq) FROM events WHERE type = 'http.request' "
        "AND decision IS NOT NULL AND decision != 'approval' AND json_extract(fields, '$.decision') IS NULL)"),
    "decision of an open request": (
        "UPDATE events SET decision = 'allow' WHERE seq = (SELECT min(seq) FROM events WHERE type = 'http.request' "
        "AND (decision IS NULL OR decision = 'approval'))"),
    "summary": "UPDATE events SET summary = 'x' WHERE seq = 3",
    "batch_id": "UPDATE events SET batch_id = batch_id + 1 WHERE seq = 2",
    "tables touched": "DELETE FROM event_tables WHERE rowid = (SELECT min(rowid) FROM event_tables)",
    "session identity": "UPDATE sessions SET identity = 'x' WHERE sid = (SELECT min(sid) FROM sessions)",
    "session counts": "UPDATE sessions SET request_count = request_count + 1 "
                      "WHERE sid = (SELECT min(sid) FROM sessions)",
    "session end": "UPDATE sessions SET end_reason = 'x', end_ns = 1 WHERE sid = (SELECT min(sid) FROM sessions)",
    "session how": "UPDATE sessions SET tls_client = 1 "
                   "WHERE sid = (SELECT min(sid) FROM sessions WHERE tls_client = 0)",
}


@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_edited_derived_data_fails(env, name):
    load(env, 1, sessions=40)
    assert check(env)["ok"]
    with env.store.write() as c:
        assert c.execute(text(TAMPERS[name])).rowcount == 1
    report = check(env)
    mismatches = [p for p in report["problems"] if p["kind"] in ("index_mismatch", "index_missing")]
    assert not report["ok"] and mismatches, name
    assert all(p["seq"] is not None and p["batch_id"] is not None for p in mismatches)


# --- key history ------------------------------------------------------------------------------

def rotation_token(env: Env, agent_id: str) -> str:
    with env.store.write() as c:
        return create_enrollment_token(c, 3600, agent_id=agent_id, rotate=True, created_by="cli:admin")


def rotate(env: Env, agent: SimulatedAgent, key: Ed25519PrivateKey) -> None:
    agent.key = key
    answer = env.client.post("/v1/agents/enroll", json=agent.enroll_body(rotation_token(env, agent.agent_id)))
    assert answer.status_code == 200, answer.text


def post(env: Env, agent: SimulatedAgent, raw: bytes):
    return env.client.post("/v1/ingest", content=raw, headers=agent.headers())


def statements(agent: SimulatedAgent, n: int) -> bytes:
    return agent.batch_bytes(agent.session(identity="svc", target="db", statements=[(f"SELECT {n}", [])])[1])


def test_rotation_ranges_retries_and_refusals(env):
    agent = SimulatedAgent("rot", hostname="old-host")
    env.enroll(agent)
    first = statements(agent, 1)
    assert post(env, agent, first).status_code == 200
    undelivered = statements(agent, 2)          # signed by key 1, not delivered before the rotation
    rotate(env, agent, Ed25519PrivateKey.generate())
    rotate(env, agent, Ed25519PrivateKey.generate())   # rotated again before the new key signed anything
    key3 = agent.key
    # a lost acknowledgement: the stored key-1 batch sent again is a duplicate, acknowledged
    retry = post(env, agent, first)
    assert retry.status_code == 200 and retry.json()["duplicate"] is True
    assert post(env, agent, undelivered).status_code == 200
    boundary = agent.seq + 1
    assert post(env, agent, statements(agent, 3)).status_code == 200
    # a batch of the current key for numbers before its range (the agent's chain went back) is refused
    rewound = SimulatedAgent("rot", key=key3)
    rewound.seq = boundary - 3   # overlaps what key 1 signed
    refused = post(env, rewound, statements(rewound, 9))
    assert refused.status_code == 422 and f"took over at seq {boundary}" in refused.json()["detail"]
    with env.store.read() as c:
        keys = c.execute(select(agent_keys.c.valid_from_seq, agent_keys.c.valid_to_seq, agent_keys.c.rotation,
                                agent_keys.c.hostname, agent_keys.c.replaced_ns.is_(None))
                         .where(agent_keys.c.agent_id == "rot").order_by(agent_keys.c.id)).all()
        assert c.execute(select(agents.c.key_from_seq).where(agents.c.agent_id == "rot")).scalar_one() == boundary
    assert [tuple(k) for k in keys] == [(1, boundary - 1, False, "old-host", False),
                                        (None, None, True, "old-host", False),   # never signed a batch
                                        (boundary, None, True, "old-host", True)]
    report = check(env)
    assert report["ok"] and report["agents"][0]["events_checked"] == 3 * 4, report["problems"]


def test_rotated_in_key_must_start_after_everything_stored(env):
    agent = SimulatedAgent("rot2")
    env.enroll(agent)
    for n in range(2):
        assert post(env, agent, statements(agent, n)).status_code == 200
    rotate(env, agent, Ed25519PrivateKey.generate())
    agent.seq = 2   # the new key signs numbers the old one already used
    refused = post(env, agent, statements(agent, 5))
    assert refused.status_code == 422 and "must start after everything the previous key signed" in \
        refused.json()["detail"]
    assert check(env)["ok"]


def test_an_edited_enrolled_key_is_reported(env):
    agent = SimulatedAgent("edited")
    env.enroll(agent)
    assert post(env, agent, statements(agent, 1)).status_code == 200
    intruder = SimulatedAgent("edited")
    with env.store.write() as c:   # someone with database access swaps in their own key
        c.execute(update(agents).where(agents.c.agent_id == "edited").values(
            public_key=base64.b64decode(intruder.public_key_b64)))
    report = check(env)
    assert not report["ok"] and [p["kind"] for p in report["problems"]] == ["key_mismatch"]


def test_enroll_agent_outcomes(env):
    agent = SimulatedAgent("direct")

    def token(**kwargs):
        with env.store.write() as c:
            return create_enrollment_token(c, 3600, **kwargs)

    def enroll(key_agent, **kwargs):
        return enroll_agent(env.store, token=token(**kwargs), agent_id="direct",
                            public_key_b64=key_agent.public_key_b64, hostname="h")

    assert enroll(agent) == "enrolled"
    assert enroll(agent) == "unchanged"
    other = SimulatedAgent("direct")
    with pytest.raises(AgentKeyConflict):
        enroll(other, agent_id="direct")
    assert enroll(other, agent_id="direct", rotate=True) == "rotated"
    with pytest.raises(ValueError):
        token(rotate=True)


def test_migration_records_each_enrolled_key(tmp_path):
    """A database from before key history: every enrolled agent's key becomes valid from seq 1."""
    url = f"sqlite:///{tmp_path}/old.db"
    store = Store(url)
    agent = SimulatedAgent("before")
    try:
        with store.write() as c:
            schema_migrations.create(c)
            for version, name, step in MIGRATIONS[:5]:
                step(c)
                c.execute(schema_migrations.insert().values(version=version, name=name, applied_ns=1))
            c.exec_driver_sql("ALTER TABLE agents DROP COLUMN key_from_seq")
            c.execute(text("INSERT INTO agents (agent_id, public_key, hostname, enrolled_ns, last_seq, batches, "
                           "events, chain_ok, problem_count) VALUES ('before', :k, 'h', 5, 0, 0, 0, 1, 0)"),
                      {"k": base64.b64decode(agent.public_key_b64)})
        assert store.migrate() == [v for v, _, _ in MIGRATIONS[5:]]
        with store.read() as c:
            row = c.execute(select(agent_keys)).one()
            assert (row.agent_id, row.valid_from_seq, row.enrolled_ns, row.hostname, row.rotation) == \
                ("before", 1, 5, "h", False)
            assert c.execute(select(agents.c.key_from_seq)).scalar_one() == 1
        ingest_batch(store, "before", statements(agent, 1))
        with store.read() as c:
            assert verify_store(c)["ok"]
    finally:
        store.dispose()


def test_retention_across_a_rotation_checks_each_batch_with_its_key(env):
    """A purge that covers batches of two keys verifies each with the key of its range: no
    problems are written into the checkpoint, and verify passes after it."""
    rng = random.Random(11)
    agent = SimulatedAgent("aged-rotated")
    env.enroll(agent)
    start = time.time_ns() - 30 * DAY_NS
    for batch in cut(workload(agent, rng, sessions=8, start_ns=start, step_ns=DAY_NS // 100, late_starts=False), rng):
        env.ingest(agent, batch)
    rotate(env, agent, Ed25519PrivateKey.generate())
    for batch in cut(workload(agent, rng, sessions=8, start_ns=start + 10 * DAY_NS, step_ns=DAY_NS // 100,
                              late_starts=False), rng):
        env.ingest(agent, batch)
    purged = retention.purge(env.store, env.keys.private_key, days=5, actor="test")
    assert purged["batches"] > 0
    report = check(env)
    checkpoint = report["agents"][0]["checkpoint"]
    assert checkpoint["problems_in_purged_range"] == 0 and checkpoint["signature_ok"], checkpoint
    assert report["ok"], report["problems"][:5]
