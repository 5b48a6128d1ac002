"""HTTP through the real agent: curl in a governed cgroup, transparently redirected to the HTTP
enforcer, decided by a Cedar policy, with a JSON field masked, and every request recorded."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from tests.agentproc import AgentProcess
from tests.integration.test_http_proxy import CARD, _free_port, _stop, _uvicorn

POLICY = """
@id("reporting-reads-partner-api")
permit (principal == Service::"reporting", action == Action::"http:GET", resource in Target::"partner-api");
"""


@pytest.fixture
def api():
    port = _free_port("127.0.0.2")
    proc = _uvicorn("127.0.0.2", port)
    yield port
    _stop(proc)


def test_curl_through_agent_policy_masking_and_records(test_cgroup, api):
    workdir = tempfile.mkdtemp(prefix="warden-agent-http-")
    Path(workdir, "policy.cedar").write_text(POLICY)
    agent = AgentProcess({
        "scope": {"cgroups": [test_cgroup.rel]},
        "targets": [{"name": "partner-api", "protocol": "http",
                     "match": {"cidr": "127.0.0.2/32", "port": api}, "listen_port": _free_port("127.0.0.1")}],
        "identities": [{"name": "reporting", "match": {"cgroup": test_cgroup.rel}}],
        "policy": {"path": str(Path(workdir, "policy.cedar"))},
        "masking": {"rules": [{"name": "cards", "json_key": "card", "strategy": "partial"}]},
    }, workdir=workdir).start()
    try:
        got = test_cgroup.run(["curl", "-sS", "--max-time", "10", f"http://127.0.0.2:{api}/json"])
        assert got.returncode == 0, got.stderr
        body = json.loads(got.stdout)
        assert body["name"] == "Ada" and body["id"] == 7
        assert body["card"] != CARD and body["card"].endswith("1111")

        denied = test_cgroup.run(["curl", "-sS", "--max-time", "10", "-X", "DELETE", "-w", "\n%{http_code}",
                                  f"http://127.0.0.2:{api}/customers/7"])
        payload, status = denied.stdout.rsplit("\n", 1)
        assert status == "403"
        refusal = json.loads(payload)
        assert "reporting" in json.dumps(refusal) and "http:DELETE" in json.dumps(refusal)

        seen = test_cgroup.run(["curl", "-sS", "--max-time", "10", f"http://127.0.0.2:{api}/seen"])
        assert "DELETE /customers/7" not in seen.stdout          # the denied request never left the host

        requests = agent.wait_for(lambda e: e["type"] == "http.request" and e["f"].get("method") == "DELETE",
                                  what="http.request DELETE")
        assert requests["f"]["decision"] == "deny" and requests["f"]["action"] == "http:DELETE"
        start = [e for e in agent.events("session.start") if e["sid"] == requests["sid"]][0]
        assert start["f"]["identity"] == "reporting" and start["f"]["process"]["comm"] == "curl"
        masked = agent.wait_for(lambda e: e["type"] == "mask.applied", what="mask.applied")
        assert CARD not in json.dumps(masked)
        assert not any(CARD in json.dumps(e) for e in agent.events())
    finally:
        assert agent.stop() == 0


from tests.integration.test_http_proxy import tls_upstream  # noqa: E402,F401  (uvicorn with TLS on 127.0.0.3)


def test_https_workload_intercepted_with_the_agent_ca(test_cgroup, tls_upstream, tmp_path):  # noqa: F811
    """curl speaks HTTPS to a governed API; the agent terminates it with its own CA (which curl trusts),
    decides, masks and records the request, and re-originates TLS verified against the API's CA."""
    import subprocess as sp
    import sys
    port, upstream_ca = tls_upstream
    Path(tmp_path, "policy.cedar").write_text(POLICY)
    agent = AgentProcess({
        "scope": {"cgroups": [test_cgroup.rel]},
        "targets": [{"name": "partner-api", "protocol": "http", "listen_port": _free_port("127.0.0.1"),
                     "match": {"cidr": "127.0.0.3/32", "hostname": [], "port": port},
                     "client_tls": "intercept", "client_tls_names": ["api.test"],
                     "upstream_tls": {"mode": "verify-full", "ca": upstream_ca}}],
        "identities": [{"name": "reporting", "match": {"cgroup": test_cgroup.rel}}],
        "policy": {"path": str(Path(tmp_path, "policy.cedar"))},
        "masking": {"rules": [{"name": "cards", "json_key": "card", "strategy": "partial"}]},
    })
    agent_ca = tmp_path / "agent-ca.crt"
    agent_ca.write_text(sp.run([str(Path(sys.executable).parent / "warden-agent"), "ca", "--config",
                                agent.config_path], capture_output=True, text=True, check=True).stdout)
    agent.start()
    try:
        got = test_cgroup.run(["curl", "-sS", "--max-time", "10", "--cacert", str(agent_ca),
                               "--resolve", f"api.test:{port}:127.0.0.3", f"https://api.test:{port}/json"])
        assert got.returncode == 0, got.stderr
        body = json.loads(got.stdout)
        assert body["name"] == "Ada" and body["card"] != CARD and body["card"].endswith("1111")
        request = agent.wait_for(lambda e: e["type"] == "http.request" and e["f"].get("path") == "/json",
                                 what="http.request")
        assert request["f"]["host"].startswith("api.test")
        # a name this target does not cover gets no certificate
        other = test_cgroup.run(["curl", "-sS", "--max-time", "10", "--cacert", str(agent_ca),
                                 "--resolve", f"evil.test:{port}:127.0.0.3", f"https://evil.test:{port}/json"])
        assert other.returncode != 0
    finally:
        assert agent.stop() == 0


def test_brokered_credential_from_agent_config_reaches_the_api(test_cgroup, api, tmp_path):
    """`credentials:` on an http target in agent.yaml: the agent injects the secret, the workload
    never holds it, and the record has it redacted."""
    secret = tmp_path / "partner-token"
    secret.write_text("agent-held-secret\n")
    Path(tmp_path, "policy.cedar").write_text(POLICY)
    agent = AgentProcess({
        "scope": {"cgroups": [test_cgroup.rel]},
        "targets": [{"name": "partner-api", "protocol": "http",
                     "match": {"cidr": "127.0.0.2/32", "port": api}, "listen_port": _free_port("127.0.0.1"),
                     "credentials": {"header": "Authorization", "scheme": "Bearer", "value_file": str(secret)}}],
        "identities": [{"name": "reporting", "match": {"cgroup": test_cgroup.rel}}],
        "policy": {"path": str(Path(tmp_path, "policy.cedar"))},
    }, workdir=str(tmp_path)).start()
    try:
        got = test_cgroup.run(["curl", "-sS", "--max-time", "10", "-H", "Authorization: Bearer workload-guess",
                               f"http://127.0.0.2:{api}/echo"])
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout)["headers"]["authorization"] == "Bearer agent-held-secret"
        request = agent.wait_for(lambda e: e["type"] == "http.request", what="http.request")
        assert request["f"]["headers"]["authorization"] == "[redacted]"
        assert "agent-held-secret" not in json.dumps(agent.events())
    finally:
        assert agent.stop() == 0
