"""Retention on a real SQLite file (the same checks run on PostgreSQL in
tests/integration/test_collector_postgres.py): purge, verification restarting from the
signed checkpoint, the purge in the access log, and a tampered checkpoint reported."""
import time
import warnings

import pytest
from sqlalchemy import delete, select, update

warnings.filterwarnings("ignore", category=DeprecationWarning)
from fastapi.testclient import TestClient  # noqa: E402

from collector.app import create_app  # noqa: E402
from collector.auth import create_enrollment_token, mint_api_token  # noqa: E402
from collector.cli import main as collector_main  # noqa: E402
from collector.config import CollectorConfig  # noqa: E402
from collector.simulate import SimulatedAgent  # noqa: E402
from collector.storage.schema import checkpoints  # noqa: E402

DAY_NS = 86400 * 10**9


class Env:
    def __init__(self, config: CollectorConfig):
        self.config = config
        self.app = create_app(config)
        self.client = TestClient(self.app)
        self.store, self.keys = self.app.state.store, self.app.state.keys

    def headers(self, role: str, subject: str | None = None) -> dict:
        with self.store.write() as c:
            token = mint_api_token(c, self.keys, role=role, subject=subject or f"{role}-person", ttl_s=3600,
                                   issuer=self.config.tokens.issuer, audience=self.config.tokens.audience)
        return {"Authorization": f"Bearer {token}"}

    def enroll(self, agent: SimulatedAgent) -> None:
        with self.store.write() as c:
            enrollment = create_enrollment_token(c, 3600)
        assert self.client.post("/v1/agents/enroll", json=agent.enroll_body(enrollment)).status_code == 200

    def ingest(self, agent: SimulatedAgent, evs: list[dict]) -> dict:
        answer = self.client.post("/v1/ingest", content=agent.batch_bytes(evs), headers=agent.headers())
        assert answer.status_code == 200, answer.text
        return answer.json()

    def close(self) -> None:
        self.client.close()
        self.store.dispose()


def exercise_retention(env: Env, agent_id: str) -> None:
    """Shared by both backends."""
    auditor, admin = env.headers("auditor"), env.headers("admin", "alice-admin")
    agent = SimulatedAgent(agent_id, hostname="app-1")
    env.enroll(agent)
    now = time.time_ns()
    old_sids = []
    for age_days in (45, 40, 35):  # three old batches, one session each
        sid, evs = agent.session(identity="billing", target="crm", start_ns=now - age_days * DAY_NS,
                                 statements=[("SELECT * FROM public.customers", ["public.customers"])])
        env.ingest(agent, evs)
        old_sids.append(sid)
    old_last_seq = agent.seq
    recent_sid, recent = agent.session(identity="billing", target="crm", start_ns=now - DAY_NS,
                                       statements=[("SELECT * FROM public.customers", ["public.customers"])])
    env.ingest(agent, recent)

    # Auditors may not purge; admins may.
    assert env.client.post("/v1/retention/run", params={"days": 30}, headers=auditor).status_code == 403
    answer = env.client.post("/v1/retention/run", params={"days": 30}, headers=admin)
    assert answer.status_code == 200, answer.text
    purged = [a for a in answer.json()["agents"] if a["agent_id"] == agent_id]
    assert purged == [{"agent_id": agent_id, "batches": 3, "events": old_last_seq, "sessions": 3,
                       "first_seq": 1, "last_seq": old_last_seq, "problems": 0}]
    # A second run finds nothing more to purge for this agent.
    again = env.client.post("/v1/retention/run", params={"days": 30}, headers=admin).json()
    assert [a for a in again["agents"] if a["agent_id"] == agent_id] == []

    sessions = env.client.get("/v1/sessions", params={"identity": "billing"}, headers=auditor).json()["items"]
    assert [s["id"] for s in sessions if s["agent_id"] == agent_id] == [recent_sid]
    assert env.client.get(f"/v1/sessions/{old_sids[0]}", headers=auditor).status_code == 404
    found = env.client.get("/v1/events", params={"table": "public.customers", "agent": agent_id},
                           headers=auditor).json()["items"]
    assert {e["sid"] for e in found} == {recent_sid}

    # What remains verifies, restarting from the signed checkpoint.
    report = env.client.get("/v1/verify", params={"agent": agent_id}, headers=auditor).json()
    assert report["ok"], report["problems"]
    agent_report = report["agents"][0]
    assert agent_report["checkpoint"]["seq"] == old_last_seq and agent_report["checkpoint"]["signature_ok"]
    assert agent_report["events_checked"] == len(recent)

    # New evidence after the purge still chains on.
    _, later = agent.session(identity="billing", target="crm", start_ns=now,
                             statements=[("SELECT 1", [])])
    env.ingest(agent, later)
    assert env.client.get("/v1/verify", params={"agent": agent_id}, headers=auditor).json()["ok"]

    # The purge is in the access log: who, and which range.
    log = env.client.get("/v1/access-log", headers=admin).json()["items"]
    purge_rows = [r for r in log if r["method"] == "PURGE" and agent_id in (r["query"] or "")]
    assert len(purge_rows) == 1 and purge_rows[0]["subject"] == "alice-admin"
    assert f'"seq": "1..{old_last_seq}"' in purge_rows[0]["query"]

    # Tampering with the checkpoint (moving it past deleted evidence) is reported.
    with env.store.write() as c:
        c.execute(update(checkpoints).where(checkpoints.c.agent_id == agent_id).values(seq=checkpoints.c.seq + 1))
    report = env.client.get("/v1/verify", params={"agent": agent_id}, headers=auditor).json()
    assert not report["ok"]
    assert [p["kind"] for p in report["problems"]] == ["checkpoint_invalid"]
    assert report["agents"][0]["checkpoint"]["signature_ok"] is False

    # Deleting the checkpoint makes verification start at genesis again: the purge shows as missing.
    with env.store.write() as c:
        c.execute(delete(checkpoints).where(checkpoints.c.agent_id == agent_id))
    report = env.client.get("/v1/verify", params={"agent": agent_id}, headers=auditor).json()
    assert not report["ok"] and report["problems"][0]["kind"] == "missing"
    assert report["problems"][0]["seq"] == 1


@pytest.fixture
def sqlite_env(tmp_path):
    env = Env(CollectorConfig(state_dir=str(tmp_path / "state"), db=f"sqlite:///{tmp_path}/c.db"))
    yield env
    env.close()


def test_retention_on_sqlite(sqlite_env):
    exercise_retention(sqlite_env, "ret-agent")


def test_retention_cli_and_config(tmp_path, capsys):
    config = tmp_path / "collector.yaml"
    db = tmp_path / "c.db"
    config.write_text(f"db: sqlite:///{db}\nstate_dir: {tmp_path / 'state'}\nretention:\n  days: 7\n"
                      "  interval: 10m\n")
    env = Env(CollectorConfig(state_dir=str(tmp_path / "state"), db=f"sqlite:///{db}"))
    try:
        agent = SimulatedAgent("cli-agent")
        env.enroll(agent)
        _, evs = agent.session(identity="svc", target="db", start_ns=time.time_ns() - 10 * DAY_NS,
                               statements=[("SELECT 1", [])])
        env.ingest(agent, evs)
        assert collector_main(["retention", "run", "--config", str(config), "--actor", "bob"]) == 0
        assert "1 batch(es)" in capsys.readouterr().out
        with env.store.read() as c:
            row = c.execute(select(checkpoints)).one()
        assert row.actor == "cli:bob" and row.seq == len(evs)
        # The CLI signed with the same state-dir key the server verifies with.
        report = env.client.get("/v1/verify", headers=env.headers("auditor")).json()
        assert report["ok"] and report["agents"][0]["checkpoint"]["signature_ok"]
        assert collector_main(["retention", "run", "--db", f"sqlite:///{db}",
                               "--state-dir", str(tmp_path / "state")]) == 2  # no period configured
    finally:
        env.close()


def test_serve_runs_retention_periodically(tmp_path):
    db, state = f"sqlite:///{tmp_path}/c.db", str(tmp_path / "state")
    loader = Env(CollectorConfig(state_dir=state, db=db))
    agent = SimulatedAgent("sched-agent")
    try:
        loader.enroll(agent)
        _, evs = agent.session(identity="svc", target="db", start_ns=time.time_ns() - 40 * DAY_NS,
                               statements=[("SELECT 1", [])])
        loader.ingest(agent, evs)
    finally:
        loader.close()
    config = CollectorConfig(state_dir=state, db=db, retention_days=30, retention_interval="1h")
    app = create_app(config)
    with TestClient(app):  # runs the lifespan: the scheduled purge starts with the server
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with app.state.store.read() as c:
                row = c.execute(select(checkpoints)).first()
            if row is not None:
                break
            time.sleep(0.05)
    app.state.store.dispose()
    assert row is not None and row.actor == "retention (scheduled)" and row.seq == len(evs)
