"""Bypass attempts from inside a governed cgroup: each is governed or refused, and always recorded."""
from __future__ import annotations

import json
import sys

from tests.agentproc import AgentProcess
from tests.integration.test_agent_redirect import CLIENT, free_port, servers  # noqa: F401  (fixture)


def agent_for(cg, targets):
    return AgentProcess({"scope": {"cgroups": [cg.rel]}, "targets": targets,
                         "identities": [{"name": "suspect", "match": {"cgroup": cg.rel}}]})


BOUND_CLIENT = r"""
import json, os, socket, sys
s = socket.socket()
s.bind(("127.0.0.5", 0))            # pin a source address first, hoping to dodge the redirect
s.connect((sys.argv[1], int(sys.argv[2])))
f = s.makefile("rwb"); hello = f.readline().decode().strip()
print(json.dumps({"pid": os.getpid(), "hello": hello, "local": list(s.getsockname())}))
"""

FORK_CLIENT = r"""
import json, os, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
pid = os.fork()
if pid == 0:                          # the child inherits the governed connection and uses it
    f = s.makefile("rwb"); f.readline(); f.write(b"from-child\n"); f.flush()
    os._exit(0 if f.readline().strip() == b"from-child" else 1)
_, status = os.waitpid(pid, 0)
print(json.dumps({"parent": os.getpid(), "child": pid, "child_ok": status == 0}))
"""

HOLDER = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print("connected", flush=True)
time.sleep(60)
"""


def test_prebound_source_address_is_still_governed(test_cgroup, servers):
    server = servers("127.0.0.2")
    agent = agent_for(test_cgroup, [{"name": "db", "protocol": "tcp", "listen_port": free_port(),
                                     "match": {"cidr": "127.0.0.2/32", "port": server.port}}]).start()
    try:
        res = test_cgroup.run([sys.executable, "-c", BOUND_CLIENT, "127.0.0.2", str(server.port)])
        out = json.loads(res.stdout)
        assert out["local"][0] == "127.0.0.5"
        # the server never saw the client's own socket: it went through the enforcer
        assert not out["hello"].endswith(f"|{out['local'][1]}")
        start = agent.wait_for(lambda e: e["type"] == "session.start", what="session.start")
        assert start["f"]["process"]["pid"] == out["pid"] and start["f"]["identity"] == "suspect"
    finally:
        agent.stop()


def test_every_address_of_a_target_is_governed(test_cgroup, servers):
    port = free_port("::1")
    servers("::1", port)
    servers("127.0.0.1", port)
    # one database reachable on an IPv4 and an IPv6 address (as a hostname with A and AAAA records is);
    # the workload tries each form, including the IPv4-mapped IPv6 spelling
    agent = agent_for(test_cgroup, [{"name": "local", "protocol": "tcp", "listen_port": free_port(),
                                     "match": {"cidr": ["127.0.0.1/32", "::1/128"], "port": port}}]).start()
    try:
        for host, fam in (("::1", "6"), ("127.0.0.1", "4"), ("::ffff:127.0.0.1", "6")):
            out = json.loads(test_cgroup.run([sys.executable, "-c", CLIENT, host, str(port), fam]).stdout)
            assert out["echo"] == "ping"
        agent.wait_for(lambda e: len(agent.events("session.start")) >= 3, what="three governed sessions")
        dsts = sorted(e["f"]["orig_dst"] for e in agent.events("session.start"))
        assert dsts == sorted([f"::1:{port}", f"127.0.0.1:{port}", f"127.0.0.1:{port}"]), dsts
        agent.wait_for(lambda e: e["type"] == "conn.observed", timeout=10, what="inventory")
        ungoverned = [e for e in agent.events("conn.observed") if e["f"]["dst_port"] == port and not e["f"]["governed"]]
        assert ungoverned == []
    finally:
        agent.stop()


def test_child_forked_after_connect_is_attributed_to_the_connecting_process(test_cgroup, servers):
    server = servers("127.0.0.2")
    agent = agent_for(test_cgroup, [{"name": "db", "protocol": "tcp", "listen_port": free_port(),
                                     "match": {"cidr": "127.0.0.2/32", "port": server.port}}]).start()
    try:
        out = json.loads(test_cgroup.run([sys.executable, "-c", FORK_CLIENT, "127.0.0.2", str(server.port)]).stdout)
        assert out["child_ok"]
        start = agent.wait_for(lambda e: e["type"] == "session.start", what="session.start")
        assert start["f"]["process"]["pid"] == out["parent"]
        end = agent.wait_for(lambda e: e["type"] == "session.end", what="session.end")
        assert end["f"]["bytes_in"] == len(b"from-child\n")
    finally:
        agent.stop()


def test_connection_made_before_the_agent_started_is_reported(test_cgroup, servers):
    server = servers("127.0.0.2")
    holder = test_cgroup.popen([sys.executable, "-c", HOLDER, "127.0.0.2", str(server.port)],
                               stdout=__import__("subprocess").PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "connected"
        agent = agent_for(test_cgroup, [{"name": "db", "protocol": "tcp", "listen_port": free_port(),
                                         "match": {"cidr": "127.0.0.2/32", "port": server.port}}]).start()
        try:
            alert = agent.wait_for(lambda e: e["type"] == "agent.alert" and e["f"]["kind"] == "preexisting_connection",
                                   what="preexisting_connection alert")
            assert alert["f"]["detail"]["process"]["pid"] == holder.pid
            assert alert["f"]["detail"]["target"] == "db"
        finally:
            agent.stop()
    finally:
        holder.kill()
        holder.wait()
