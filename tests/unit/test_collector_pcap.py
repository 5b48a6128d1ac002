"""`warden pcap`: a recorded session as a synthetic capture, read back with scapy and,
when installed, dissected by tshark as PostgreSQL / HTTP."""
import shutil
import subprocess
import time

import pytest
from scapy.layers.inet import IP, TCP
from scapy.utils import rdpcap

from collector.client_cli import replay_steps
from collector.pcap import write_session_pcap
from collector.simulate import SimulatedAgent
from tests.unit.test_collector_retention import Env
from collector.config import CollectorConfig


@pytest.fixture
def env(tmp_path):
    env = Env(CollectorConfig(state_dir=str(tmp_path / "state"), db=f"sqlite:///{tmp_path}/c.db"))
    yield env
    env.close()


def _stored(env, agent, evs):
    env.ingest(agent, evs)
    auditor = env.headers("auditor")
    sid = evs[0]["sid"]
    session = env.client.get(f"/v1/sessions/{sid}", headers=auditor).json()
    items = env.client.get(f"/v1/sessions/{sid}/events", headers=auditor).json()["items"]
    return session, items


def _postgres_session(agent):
    sid, ts = "pg-session-1", time.time_ns()
    step = iter(range(1, 100))

    def at():
        return ts + next(step) * 1_000_000
    evs = [agent.event("session.start", {"identity": "billing", "target": "crm", "protocol": "postgres",
                                         "orig_dst": "127.0.0.2:5432", "client": "127.0.0.1:51234",
                                         "auth_user": "app", "database": "crm"}, sid, ts)]
    evs.append(agent.event("pg.statement", {"text": "SELECT email FROM public.customers WHERE id = 1",
                                            "params": [], "protocol": "simple", "tables": ["public.customers"],
                                            "statement_index": 1}, sid, at()))
    evs.append(agent.event("policy.decision", {"decision": "allow", "policy_ids": ["read-crm"],
                                               "statement_index": 1}, sid, at()))
    evs.append(agent.event("pg.result", {"command_tag": "SELECT 1", "rows": 1, "statement_index": 1}, sid, at()))
    evs.append(agent.event("mask.applied", {"rules": {"email": 1}, "columns": {"email": 1}, "values_masked": 1,
                                            "rows": 1, "statement_index": 1}, sid, at()))
    evs.append(agent.event("pg.statement", {"text": "UPDATE public.customers SET email = $1 WHERE id = $2",
                                            "params": ["***", "7"], "protocol": "extended", "statement_name": "s1",
                                            "tables": ["public.customers"], "statement_index": 2}, sid, at()))
    evs.append(agent.event("policy.decision", {"decision": "deny", "policy_ids": ["no-writes"],
                                               "reason": "writes need approval", "statement_index": 2}, sid, at()))
    evs.append(agent.event("pg.result", {"sqlstate": "42501", "error": "denied by policy no-writes",
                                         "statement_index": 2}, sid, at()))
    evs.append(agent.event("session.end", {"reason": "client closed"}, sid, at()))
    return evs


def test_postgres_session_as_pcap(env, tmp_path):
    agent = SimulatedAgent("pcap-agent")
    env.enroll(agent)
    session, items = _stored(env, agent, _postgres_session(agent))
    path = tmp_path / "s.pcap"
    summary = write_session_pcap(str(path), session, items)
    assert summary["protocol"] == "postgres" and summary["statements"] == 2 and "decode_as" not in summary

    packets = rdpcap(str(path))
    assert packets[0][TCP].flags == "S" and packets[1][TCP].flags == "SA"
    assert (packets[0][IP].src, packets[0][TCP].sport, packets[0][IP].dst, packets[0][TCP].dport) == \
        ("127.0.0.1", 51234, "127.0.0.2", 5432)
    client = b"".join(bytes(p[TCP].payload) for p in packets if p[TCP].dport == 5432)
    server = b"".join(bytes(p[TCP].payload) for p in packets if p[TCP].sport == 5432)
    assert b"Q\x00\x00\x00" in client and b"SELECT email FROM public.customers WHERE id = 1\x00" in client
    assert b"P\x00" in client and b"s1\x00UPDATE public.customers" in client and b"\x00\x00\x00\x03***" in client
    assert b"C\x00\x00\x00\rSELECT 1\x00" in server and b"C42501\x00Mdenied by policy no-writes\x00" in server
    # seq numbers are continuous per direction (Wireshark reassembles without complaint)
    data = [p for p in packets if p[TCP].dport == 5432 and len(p[TCP].payload)]
    for first, second in zip(data, data[1:]):
        assert second[TCP].seq == first[TCP].seq + len(first[TCP].payload)

    if shutil.which("tshark") is None:
        pytest.skip("tshark not installed: dissection not checked (apt-get install tshark)")
    fields = subprocess.run(["tshark", "-r", str(path), "-Y", "pgsql", "-T", "fields", "-e", "pgsql.query",
                             "-e", "pgsql.tag", "-e", "pgsql.code"],
                            capture_output=True, text=True, timeout=30, check=True).stdout
    assert "SELECT email FROM public.customers WHERE id = 1" in fields
    assert "UPDATE public.customers SET email = $1 WHERE id = $2" in fields
    assert "SELECT 1" in fields and "42501" in fields


def test_http_session_as_pcap_and_replay_steps(env, tmp_path):
    agent = SimulatedAgent("pcap-http")
    env.enroll(agent)
    sid, ts = "http-session-1", time.time_ns()
    evs = [agent.event("session.start", {"identity": "etl", "target": "billing-api", "protocol": "http",
                                         "orig_dst": "127.0.0.3:8080"}, sid, ts),
           agent.event("http.request", {"method": "GET", "host": "billing.internal", "path": "/v1/invoices",
                                        "query": "limit=5", "headers": {"authorization": "[REDACTED]",
                                                                        "content-length": "0"},
                                        "request_index": 1, "decision": "allow", "policy_ids": ["p"],
                                        "reason": "permitted by p", "action": "http:GET"}, sid, ts + 1000),
           agent.event("http.response", {"status": 200, "headers": {"content-type": "application/json"},
                                         "body_bytes": 512, "request_index": 1}, sid, ts + 3000),
           agent.event("mask.applied", {"method": "http.response_body", "fields": {"card": 2},
                                        "values_masked": 2, "request_index": 1}, sid, ts + 4000),
           agent.event("session.end", {}, sid, ts + 5000)]
    session, items = _stored(env, agent, evs)
    path = tmp_path / "h.pcap"
    summary = write_session_pcap(str(path), session, items)
    assert summary["protocol"] == "http" and summary["server"] == "127.0.0.3:8080"
    payload = b"".join(bytes(p[TCP].payload) for p in rdpcap(str(path)))
    assert b"GET /v1/invoices?limit=5 HTTP/1.1\r\nHost: billing.internal\r\n" in payload
    assert b"HTTP/1.1 200 OK\r\n" in payload and b"X-Warden-Body-Bytes: 512" in payload

    steps = replay_steps(items)
    request = [s for s in steps if s["step"] == "HTTP"][0]
    assert request["decision"] == "allow" and request["result"].startswith("200")
    assert request["policies"] == ["p"] and "reason: permitted by p" in request["detail"]
    assert request["masking"] == ["2 value(s) masked: card=2"]

    if shutil.which("tshark") is None:
        pytest.skip("tshark not installed: dissection not checked (apt-get install tshark)")
    fields = subprocess.run(["tshark", "-r", str(path), "-Y", "http", "-T", "fields", "-e", "http.request.uri",
                             "-e", "http.response.code"], capture_output=True, text=True, timeout=30,
                            check=True).stdout
    assert "/v1/invoices?limit=5" in fields and "200" in fields


def test_replay_groups_decision_result_and_masking_per_statement(env):
    agent = SimulatedAgent("replay-agent")
    env.enroll(agent)
    _, items = _stored(env, agent, _postgres_session(agent))
    steps = [s for s in replay_steps(items) if s["step"] == "SQL"]
    assert [(s["decision"], s["result"]) for s in steps] == [
        ("allow", "SELECT 1 rows=1"), ("deny", "ERROR 42501 denied by policy no-writes")]
    assert steps[0]["masking"] == ["1 value(s) masked in 1 row(s): email=1 (rules email=1)"]
    assert steps[1]["policies"] == ["no-writes"] and "writes need approval" in steps[1]["detail"]
