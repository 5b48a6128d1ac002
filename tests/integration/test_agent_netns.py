"""A governed database on a second "host": a network namespace this test creates, joined by a
veth pair built through netlink (pyroute2). The workload's connect to the namespace's address is
redirected to the enforcer, whose own upstream connection crosses the veth pair."""
from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from agent.hostfacts import VethNamespace, interfaces
from tests.agentproc import AgentProcess
from tests.integration.test_agent_redirect import CLIENT

# addresses exist only inside what this test creates: the veth pair and its namespace
HOST_IP, NS_IP = "10.213.77.1", "10.213.77.2"

SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    c.sendall(f"peer={peer[0]}|{peer[1]}\n".encode())
    data = c.recv(100)
    c.sendall(data)
    c.close()
"""


@pytest.fixture
def remote_host(bpf_required):
    ns = VethNamespace(f"wt{uuid.uuid4().hex[:6]}", HOST_IP, NS_IP)
    server = subprocess.Popen(ns.exec_argv([sys.executable, "-c", SERVER, NS_IP, "5432"]),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        yield ns
    finally:
        server.kill()
        server.wait()
        ns.remove()


def test_redirect_to_a_database_in_another_namespace(test_cgroup, remote_host):
    assert any(f"{HOST_IP}/30" in i.addresses for i in interfaces())     # host facts through netlink
    agent = AgentProcess({
        "scope": {"cgroups": [test_cgroup.rel]},
        "targets": [{"name": "remote-db", "protocol": "tcp", "match": {"cidr": f"{NS_IP}/32", "port": 5432},
                     "listen_port": 15990}],
        "identities": [{"name": "netns-client", "match": {"cgroup": test_cgroup.rel}}],
    }).start()
    try:
        res = test_cgroup.run([sys.executable, "-c", CLIENT, NS_IP, "5432", "4"], timeout=20)
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert out["echo"] == "ping" and out["remote"] == [NS_IP, 5432]
        # the server saw the enforcer's upstream connection arriving over the veth pair
        assert out["hello"].startswith(f"peer={HOST_IP}|") and not out["hello"].endswith(f"|{out['local'][1]}")
        start = agent.wait_for(lambda e: e["type"] == "session.start", what="session.start")
        assert start["f"]["orig_dst"] == f"{NS_IP}:5432" and start["f"]["identity"] == "netns-client"
    finally:
        assert agent.stop() == 0


def test_agent_refuses_a_target_that_captures_its_collector(tmp_path, test_cgroup):
    from pathlib import Path
    cfg = tmp_path / "agent.yaml"
    # scope is this test's own cgroup: even if the refusal regressed, nothing else would be governed
    cfg.write_text(f"collector: {{url: 'http://127.0.0.1:8443'}}\nscope: {{cgroups: [{test_cgroup.rel}]}}\n"
                   "targets:\n  - name: greedy\n    match: {cidr: 127.0.0.0/8, port: 8443}\n")
    res = subprocess.run([str(Path(sys.executable).parent / "warden-agent"), "run", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "would capture the collector's own traffic" in res.stderr
