"""Enrollment against the real `warden-collector serve` (127.0.0.1, SQLite in a temp dir): an
enrolled agent id keeps its key (no takeover with any enrollment token), an admin-created rotation
token replaces it with the old key kept for the sequence numbers it signed (so `warden verify`
stays intact across the rotation), and the agent's own shipper still enrolls the first time."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3

import httpx
import pytest

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.shipper import EnrollmentError, Shipper
from collector.simulate import SimulatedAgent
from records.signing import public_key_bytes
from tests.collectorproc import CollectorProcess, cli

T0 = 1_714_530_900 * 10**9  # 2024-05-01T02:35:00Z


@pytest.fixture
def collector():
    process = CollectorProcess().start()
    try:
        yield process
    finally:
        process.cleanup()


def enroll(collector: CollectorProcess, agent: SimulatedAgent, token: str) -> httpx.Response:
    return httpx.post(f"{collector.url}/v1/agents/enroll", json=agent.enroll_body(token), timeout=10)


def ship(collector: CollectorProcess, agent: SimulatedAgent, raw: bytes) -> httpx.Response:
    """POST one batch authenticated with the agent's current key."""
    return httpx.post(f"{collector.url}/v1/ingest", content=raw, headers=agent.headers(), timeout=30)


def session_batch(agent: SimulatedAgent, n: int) -> bytes:
    _, events = agent.session(identity="billing", target="crm", start_ns=T0 + n * 10**9,
                              statements=[(f"SELECT {n} FROM public.customers", ["public.customers"])])
    return agent.batch_bytes(events)


def verify(collector: CollectorProcess, auditor: str, *args: str):
    result = cli("warden", "verify", "--json", *args, env=collector.cli_env(auditor), check=False)
    return result.returncode, json.loads(result.stdout)


def agents(collector: CollectorProcess, auditor: str) -> dict:
    listed = json.loads(cli("warden", "agents", "--json", env=collector.cli_env(auditor)).stdout)
    return {item["agent_id"]: item for item in listed}


def db_path(collector: CollectorProcess) -> str:
    return os.path.join(collector.work, "state", "collector.db")


def test_enrolled_agent_id_cannot_be_taken_over(collector):
    auditor = collector.token("auditor", "carol")
    genuine = SimulatedAgent("web-1", hostname="web-1.internal")
    assert enroll(collector, genuine, collector.enrollment()).status_code == 200
    for n in range(2):
        assert ship(collector, genuine, session_batch(genuine, n)).status_code == 200

    # Anyone holding an unused enrollment token, bound to no agent or to this one without
    # --rotate, cannot put their key on web-1.
    mallory = SimulatedAgent("web-1", hostname="attacker")
    unbound = collector.enrollment()
    bound = cli("warden-collector", "enroll", "create", "--config", collector.config, "--agent", "web-1")
    assert "already enrolled" in bound.stderr and "--rotate" in bound.stderr
    for token in (unbound, bound.stdout.strip()):
        refused = enroll(collector, mallory, token)
        assert refused.status_code == 409, refused.text
        assert "already enrolled with another key" in refused.json()["detail"]
        assert "warden-collector enroll create --agent web-1 --rotate" in refused.json()["detail"]
    # Nothing was consumed: the unbound token still enrolls a new agent id, the bound one
    # re-enrolls web-1 with its own key (which changes nothing).
    assert enroll(collector, SimulatedAgent("web-2"), unbound).status_code == 200
    assert enroll(collector, genuine, bound.stdout.strip()).status_code == 200

    # The attacker's key is not web-1's: its token and batches are refused...
    forged = mallory.batch_bytes(mallory.session(identity="billing", target="crm",
                                                 statements=[("SELECT 42", [])])[1])
    assert ship(collector, mallory, forged).status_code == 401
    # ...and the genuine agent goes on, its evidence intact.
    assert ship(collector, genuine, session_batch(genuine, 2)).status_code == 200
    code, report = verify(collector, auditor, "--agent", "web-1")
    assert code == 0 and report["ok"] is True, report["problems"]
    listed = agents(collector, auditor)["web-1"]
    assert listed["hostname"] == "web-1.internal" and listed["key_rotations"] == 0
    assert [key["key_id"] for key in listed["keys"]] == [_key_id(genuine)]

    # A token created for one agent id does not enroll another.
    bound = cli("warden-collector", "enroll", "create", "--config", collector.config, "--agent", "db-7").stdout.strip()
    wrong = enroll(collector, SimulatedAgent("db-8"), bound)
    assert wrong.status_code == 403 and "created for agent 'db-7'" in wrong.json()["detail"]
    assert enroll(collector, SimulatedAgent("db-7"), bound).status_code == 200


def test_admin_rotation_keeps_earlier_evidence_verifiable(collector):
    auditor = collector.token("auditor", "carol")
    admin = collector.token("admin", "root")
    old_key = Ed25519PrivateKey.generate()
    agent = SimulatedAgent("web-1", key=old_key, hostname="web-1.internal")
    assert enroll(collector, agent, collector.enrollment()).status_code == 200
    for n in range(3):
        assert ship(collector, agent, session_batch(agent, n)).status_code == 200
    # Batches the agent signed with its old key but had not delivered when the key was rotated
    # (its spool, agent.stop at shutdown).
    undelivered = [session_batch(agent, n) for n in (3, 4)]

    # Rotation flags are checked before anything is created.
    no_agent = cli("warden-collector", "enroll", "create", "--config", collector.config, "--rotate", check=False)
    assert no_agent.returncode == 2 and "--rotate needs --agent" in no_agent.stderr
    unknown = cli("warden-collector", "enroll", "create", "--config", collector.config, "--agent", "web-9",
                  "--rotate", check=False)
    assert unknown.returncode == 1 and "no agent 'web-9' is enrolled" in unknown.stderr
    created = json.loads(cli("warden-collector", "enroll", "create", "--config", collector.config, "--agent",
                             "web-1", "--rotate", "--actor", "alice", "--json").stdout)
    assert (created["agent_id"], created["rotate"], created["created_by"]) == ("web-1", True, "cli:alice")
    with sqlite3.connect(db_path(collector)) as db:
        row = db.execute("SELECT agent_id, rotate, created_by, used_ns FROM tokens WHERE kind = 'enroll' "
                         "AND agent_id = 'web-1'").fetchone()
    assert row == ("web-1", 1, "cli:alice", None)

    new_key = Ed25519PrivateKey.generate()
    agent.key = new_key   # the agent's new key (a new agent.key file); its chain goes on
    rotated = enroll(collector, agent, created["token"])
    assert rotated.status_code == 200, rotated.text
    assert enroll(collector, agent, created["token"]).status_code == 401   # used once

    # The old key no longer authenticates anyone as web-1.
    stale = SimulatedAgent("web-1", key=old_key)
    assert ship(collector, stale, undelivered[0]).status_code == 401
    # The agent (authenticated by its new key) delivers what its old key signed, then its new batches.
    for raw in undelivered:
        answer = ship(collector, agent, raw)
        assert answer.status_code == 200 and answer.json()["accepted"], answer.text
    boundary = agent.seq + 1
    for n in range(5, 7):
        assert ship(collector, agent, session_batch(agent, n)).status_code == 200
    # Once the new key has signed, a batch signed by the old key for later numbers is refused.
    old_signer = SimulatedAgent("web-1", key=old_key)
    old_signer.seq, old_signer.prev = agent.seq, agent.prev
    late_forgery = session_batch(old_signer, 7)
    refused = ship(collector, agent, late_forgery)
    assert refused.status_code == 422 and "not what the agent signed" in refused.json()["detail"]

    # Every stored batch verifies with the key of its range: nothing is reported across the rotation.
    code, report = verify(collector, auditor)
    assert code == 0 and report["ok"] is True, report["problems"]
    assert report["agents"][0]["batches_checked"] == 7
    plain = cli("warden", "verify", "--agent", "web-1", env=collector.cli_env(auditor))
    assert "intact" in plain.stdout

    listed = agents(collector, auditor)["web-1"]
    assert listed["key_rotations"] == 1
    first, second = listed["keys"]
    assert (first["key_id"], first["valid_from_seq"], first["valid_to_seq"], first["current"]) == \
        (_key_id_of(old_key), 1, boundary - 1, False)
    assert first["replaced"] is not None and first["rotation"] is False
    assert (second["key_id"], second["valid_from_seq"], second["valid_to_seq"], second["current"]) == \
        (_key_id_of(new_key), boundary, None, True)
    assert second["rotation"] is True and second["token_created_by"] == "cli:alice"
    # The rotation is an audit fact in the access log too (admins).
    log = httpx.get(f"{collector.url}/v1/access-log", headers={"Authorization": f"Bearer {admin}"}).json()["items"]
    rotations = [json.loads(item["query"]) for item in log if item["method"] == "ROTATE"]
    assert len(rotations) == 1 and rotations[0]["agent"] == "web-1" and rotations[0]["token_created_by"] == "cli:alice"
    assert rotations[0]["previous_key_id"] == _key_id_of(old_key) and rotations[0]["key_id"] == _key_id_of(new_key)

    # Editing the stored evidence of the old key's range is still found, with that batch named.
    with sqlite3.connect(db_path(collector)) as db:
        batch_id, raw = db.execute("SELECT id, raw FROM batches ORDER BY first_seq LIMIT 1").fetchone()
        db.execute("UPDATE batches SET raw = ? WHERE id = ?", (raw[:-8] + b"\x00" * 8, batch_id))
    code, report = verify(collector, auditor)
    assert code == 1 and report["problems"][0]["batch_id"] == batch_id


def test_the_agent_shipper_enrolls_the_first_time(collector, tmp_path):
    auditor = collector.token("auditor", "carol")
    key = Ed25519PrivateKey.generate()
    shipper = Shipper(spool=None, collector_url=collector.url, key=key, agent_id="host-a",
                      enrollment_token=collector.enrollment(), state_dir=str(tmp_path / "shipper"))
    asyncio.run(shipper.enroll())
    assert shipper.enrolled
    listed = agents(collector, auditor)["host-a"]
    assert listed["keys"][0]["key_id"] == _key_id_of(key) and listed["keys"][0]["valid_from_seq"] == 1
    # what the shipper sends is accepted with the enrolled key
    agent = SimulatedAgent("host-a", key=key)
    _, events = agent.session(identity="svc", target="db", statements=[("SELECT 1", [])])
    answer = httpx.post(f"{collector.url}/v1/ingest", content=agent.batch_bytes(events), timeout=30,
                        headers={"Authorization": f"Bearer {shipper.bearer_token()}",
                                 "Content-Type": "application/octet-stream"})
    assert answer.status_code == 200 and answer.json()["accepted"]

    # Enrollment state lost, same key, a new token: enrolled again, nothing changes.
    again = Shipper(spool=None, collector_url=collector.url, key=key, agent_id="host-a",
                    enrollment_token=collector.enrollment(), state_dir=str(tmp_path / "again"))
    asyncio.run(again.enroll())
    assert again.enrolled and agents(collector, auditor)["host-a"]["key_rotations"] == 0

    # A reinstalled host with a new key and the same agent id is told how to proceed.
    reinstalled = Shipper(spool=None, collector_url=collector.url, key=Ed25519PrivateKey.generate(),
                          agent_id="host-a", enrollment_token=collector.enrollment(),
                          state_dir=str(tmp_path / "reinstalled"))
    with pytest.raises(EnrollmentError) as refused:
        asyncio.run(reinstalled.enroll())
    assert "(409)" in str(refused.value) and "--agent host-a --rotate" in str(refused.value)
    assert not reinstalled.enrolled
    code, report = verify(collector, auditor, "--agent", "host-a")
    assert code == 0 and report["ok"] is True


def _key_id_of(key: Ed25519PrivateKey) -> str:
    return hashlib.sha256(public_key_bytes(key)).hexdigest()


def _key_id(agent: SimulatedAgent) -> str:
    return _key_id_of(agent.key)
