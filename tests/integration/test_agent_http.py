"""HTTP through the real agent: curl in a governed cgroup, transparently redirected to the HTTP
enforcer, decided by a Cedar policy, with a JSON field masked, and every request recorded."""
from __future__ import annotations

import ipaddress
import json
import tempfile
from pathlib import Path

import pytest

from tests.agentproc import AgentProcess
from tests.integration.test_http_proxy import CARD, SniTlsServer, _free_port, _stop, _uvicorn

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


def _loopback_names_from_etc_hosts() -> list[str]:
    """Names /etc/hosts maps to 127.0.0.0/8, when the resolver reads that file before DNS: the agent
    resolves match.hostname, and a test must not send a query off the host."""
    try:
        nss = Path("/etc/nsswitch.conf").read_text()
        hosts = Path("/etc/hosts").read_text()
    except OSError:
        return []
    sources = next((line.split(":", 1)[1].split() for line in nss.splitlines() if line.startswith("hosts:")), [])
    if not sources or sources[0] != "files":
        return []
    names: list[str] = []
    for line in hosts.splitlines():
        fields = line.split("#", 1)[0].split()
        try:
            loopback = len(fields) > 1 and ipaddress.ip_address(fields[0]) in ipaddress.ip_network("127.0.0.0/8")
        except ValueError:
            continue
        names += [n for n in fields[1:] if loopback and n not in names]
    return names


def test_upstream_tls_of_a_two_name_target_names_each_requests_host(test_cgroup, tmp_path):
    """match.hostname [a, b] with verify-full: a request for b is sent with SNI b and verified as b,
    not as the target's first name."""
    names = _loopback_names_from_etc_hosts()[:2]
    if len(names) < 2:
        pytest.skip("needs two names /etc/hosts maps to loopback (read before DNS) for match.hostname")
    first, second = names
    server = SniTlsServer(tmp_path, names)
    Path(tmp_path, "policy.cedar").write_text(POLICY)
    agent = AgentProcess({
        "scope": {"cgroups": [test_cgroup.rel]},
        "targets": [{"name": "partner-api", "protocol": "http", "listen_port": _free_port("127.0.0.1"),
                     "match": {"cidr": "127.0.0.3/32", "hostname": names, "port": server.port},
                     "upstream_tls": {"mode": "verify-full", "ca": server.ca}}],
        "identities": [{"name": "reporting", "match": {"cgroup": test_cgroup.rel}}],
        "policy": {"path": str(Path(tmp_path, "policy.cedar"))},
    }, workdir=str(tmp_path)).start()
    try:
        answers = {}
        for name in (second, first):
            got = test_cgroup.run(["curl", "-sS", "--max-time", "10", "-H", f"Host: {name}:{server.port}",
                                   f"http://127.0.0.3:{server.port}/"])
            assert got.returncode == 0, got.stderr
            answers[name] = json.loads(got.stdout)
        assert answers[second]["sni"] == second and answers[first]["sni"] == first
        request = agent.wait_for(lambda e: e["type"] == "http.request", what="http.request")
        assert request["f"]["scheme"] == "https" and request["f"]["host"] == second
    finally:
        assert agent.stop() == 0
        server.close()
