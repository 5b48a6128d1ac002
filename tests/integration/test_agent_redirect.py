"""The agent core end to end on the real kernel: redirect, attribution, exemption, inventory,
fail-closed and bypass, and clean detachment — with real sockets on loopback only."""
from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from agent.bpfmgr import PROGRAMS, BpfManager, TargetRule, attached_programs, ours
from agent.bpfmgr import _prog_id as bpfmgr_prog_id
from tests.agentproc import AgentProcess


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class WhoServer:
    """A real TCP server that tells each client which peer address it sees, then echoes."""

    def __init__(self, host: str, port: int = 0):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.peers: list[tuple] = []
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, peer = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.peers.append(peer)
            threading.Thread(target=self._client, args=(conn, peer), daemon=True).start()

    def _client(self, conn, peer):
        with conn:
            conn.sendall(f"peer={peer[0]}|{peer[1]}\n".encode())
            try:
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:
                pass

    def close(self):
        self._stop = True
        self.sock.close()
        self.thread.join(timeout=2)


CLIENT = r"""
import json, os, socket, sys
host, port, family = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fam = socket.AF_INET6 if family == "6" else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.settimeout(5)
try:
    s.connect((host, port))
except OSError as exc:
    print(json.dumps({"pid": os.getpid(), "error": exc.errno, "errname": type(exc).__name__}))
    sys.exit(0)
f = s.makefile("rwb")
hello = f.readline().decode().strip()
f.write(b"ping\n"); f.flush()
echo = f.readline().decode().strip()
print(json.dumps({"pid": os.getpid(), "hello": hello, "echo": echo, "local": list(s.getsockname()[:2]),
                  "remote": list(s.getpeername()[:2]), "exe": os.path.realpath(sys.executable), "uid": os.getuid()}))
"""


def run_client(cg, host, port, family="4"):
    res = cg.run([sys.executable, "-c", CLIENT, host, str(port), family], timeout=20)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def agent_config(cg, targets):
    return {"scope": {"cgroups": [cg.rel]}, "targets": targets,
            "identities": [{"name": "test-client", "match": {"cgroup": cg.rel, "comm": "python*"}}]}


@pytest.fixture
def servers():
    made = []

    def make(host, port=0):
        s = WhoServer(host, port)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


def no_programs_of_ours(path):
    return ours(attached_programs(path)) == []


def start_run(mgr, rules):
    """What an agent run does with its programs before it serves: load, targets, attach (which
    takes over and reads back what an earlier run's programs left)."""
    mgr.load()
    mgr.set_targets(rules)
    mgr.attach()
    return mgr


def test_ipv4_redirect_attribution_and_exemption(test_cgroup, servers):
    server = servers("127.0.0.2")
    listen = free_port()
    # the agent itself runs inside the governed cgroup: its upstream connection must not loop back
    agent = AgentProcess(agent_config(test_cgroup, [
        {"name": "db", "protocol": "tcp", "match": {"cidr": "127.0.0.2/32", "port": server.port},
         "listen_port": listen}]), cgroup=test_cgroup).start()
    try:
        out = run_client(test_cgroup, "127.0.0.2", server.port)
        # the connect was rewritten in the kernel: the client needed no configuration
        assert out["echo"] == "ping"
        # getpeername() reports what the client asked for: the redirect is invisible to it
        assert out["remote"] == ["127.0.0.2", server.port]
        # the server sees the relay (the agent's upstream socket), not the client's port: it went through us
        assert len(server.peers) == 1
        session = agent.wait_for(lambda e: e["type"] == "session.start", what="session.start")
        f = session["f"]
        assert f["orig_dst"] == f"127.0.0.2:{server.port}"
        assert f["identity"] == "test-client"
        proc = f["process"]
        assert proc["pid"] == out["pid"] and proc["tgid"] == out["pid"]
        assert proc["uid"] == out["uid"] == os.getuid()
        assert os.path.realpath(proc["exe"]) == out["exe"]
        assert proc["cgroup"] == test_cgroup.rel
        assert f["client"].endswith(f":{out['local'][1]}")
        end = agent.wait_for(lambda e: e["type"] == "session.end", what="session.end")
        assert end["sid"] == session["sid"] and end["f"]["bytes_in"] == 5 and end["f"]["bytes_out"] > 5
    finally:
        assert agent.stop() == 0
    assert no_programs_of_ours(test_cgroup.path)


def test_ipv6_and_ipv4_mapped_targets(test_cgroup, servers):
    v6 = servers("::1")
    v4 = servers("127.0.0.2")
    agent = AgentProcess(agent_config(test_cgroup, [
        {"name": "v6db", "protocol": "tcp", "match": {"cidr": "::1/128", "port": v6.port}, "listen_port": free_port()},
        {"name": "v4db", "protocol": "tcp", "match": {"cidr": "127.0.0.0/24", "port": v4.port},
         "listen_port": free_port()},
    ])).start()
    try:
        out6 = run_client(test_cgroup, "::1", v6.port, family="6")
        assert out6["echo"] == "ping" and out6["remote"] == ["::1", v6.port]
        out_mapped = run_client(test_cgroup, "::ffff:127.0.0.2", v4.port, family="6")
        assert out_mapped["echo"] == "ping" and out_mapped["remote"] == ["::ffff:127.0.0.2", v4.port]
        starts = agent.wait_for(lambda e: e["type"] == "session.start" and e["f"]["target"] == "v4db", what="mapped")
        assert starts["f"]["orig_dst"] == f"127.0.0.2:{v4.port}"
        assert starts["f"]["process"]["pid"] == out_mapped["pid"]
        s6 = agent.wait_for(lambda e: e["type"] == "session.start" and e["f"]["target"] == "v6db", what="v6")
        assert s6["f"]["orig_dst"] == f"::1:{v6.port}" and s6["f"]["process"]["pid"] == out6["pid"]
        # both servers were reached through the relay, whose upstream is the agent's own socket
        assert len(v6.peers) == 1 and len(v4.peers) == 1
    finally:
        agent.stop()


def test_ungoverned_connect_is_observed_not_redirected(test_cgroup, servers):
    governed = servers("127.0.0.2")
    other = servers("127.0.0.3")
    agent = AgentProcess(agent_config(test_cgroup, [
        {"name": "db", "protocol": "tcp", "match": {"cidr": "127.0.0.2/32", "port": governed.port},
         "listen_port": free_port()}])).start()
    try:
        out = run_client(test_cgroup, "127.0.0.3", other.port)
        # the server saw the client's own source port: nothing in between
        assert other.peers[0][1] == out["local"][1]
        assert out["hello"] == f"peer=127.0.0.1|{out['local'][1]}" or out["hello"].endswith(f"|{out['local'][1]}")
        observed = agent.wait_for(lambda e: e["type"] == "conn.observed" and e["f"]["dst_port"] == other.port,
                                  timeout=15, what="conn.observed")
        f = observed["f"]
        assert f["dst_ip"] == "127.0.0.3" and f["governed"] == 0 and f["redirected"] == 0
        assert f["attempts"] == 1 and f["established"] == 1
        assert f["process"]["tgid"] == out["pid"] and f["process"]["cgroup"] == test_cgroup.rel
        assert agent.events("session.start") == []
    finally:
        agent.stop()


def test_refuse_after_crash_then_restart_sweeps(test_cgroup, servers):
    server = servers("127.0.0.2")
    listen = free_port()
    agent = AgentProcess(agent_config(test_cgroup, [
        {"name": "db", "protocol": "tcp", "match": {"cidr": "127.0.0.2/32", "port": server.port},
         "listen_port": listen, "on_enforcer_down": "refuse"}])).start()
    agent.kill9()
    # programs stay attached after a crash: governed connects fail closed, never go direct
    assert len(ours(attached_programs(test_cgroup.path))) == len(PROGRAMS)
    out = run_client(test_cgroup, "127.0.0.2", server.port)
    assert out.get("errname") == "ConnectionRefusedError", out
    assert server.peers == []
    # a restart removes the stale attachments and serves again
    agent.start()
    try:
        assert len(ours(attached_programs(test_cgroup.path))) == len(PROGRAMS)
        assert run_client(test_cgroup, "127.0.0.2", server.port)["echo"] == "ping"
    finally:
        assert agent.stop() == 0
    assert no_programs_of_ours(test_cgroup.path)


def test_a_restart_attaches_its_programs_before_it_removes_the_stale_ones(test_cgroup, monkeypatch):
    """Bug fix (found by the agent_kill9_durable scenario): the restarted agent removed the
    crashed run's programs first and attached its own a few ms later; a connect in between went
    straight to the database, unrecorded. Now the stale programs are removed only once the new
    ones are attached, and only those."""
    from agent import bpfmgr
    crashed = BpfManager([test_cgroup.path])      # stands for the run that was kill -9'ed
    crashed.load()
    crashed.attach()
    restarted = BpfManager([test_cgroup.path])
    restarted.load()
    at_sweep = []
    real_sweep = bpfmgr.sweep_stale

    def sweep(path, keep=(), **kw):
        at_sweep.append({p["id"] for p in ours(attached_programs(path))})
        return real_sweep(path, keep, **kw)
    monkeypatch.setattr(bpfmgr, "sweep_stale", sweep)
    try:
        restarted.attach()
        new = {bpfmgr._prog_id(fn.fd) for fn in restarted.funcs.values()}
        old = {bpfmgr._prog_id(fn.fd) for fn in crashed.funcs.values()}
        assert len(new) == len(old) == len(PROGRAMS) and not new & old
        assert at_sweep == [new | old]          # both sets attached when the stale ones went
        assert {p["id"] for p in ours(attached_programs(test_cgroup.path))} == new
    finally:
        restarted.detach()
        crashed.detach()                          # its attachments are gone already: no error
    assert no_programs_of_ours(test_cgroup.path)


def test_a_handover_leaves_the_programs_for_the_next_run_which_takes_them_over(test_cgroup, servers):
    """`warden-agent restart` (SIGUSR2): a planned restart with no moment of direct access. The
    stopping run leaves its programs attached (governed connects are refused, never direct),
    says so in agent.stop, exits 75 (the unit starts it again), and the next run takes them
    over as expected, not as a crash's leftovers. A plain SIGTERM still detaches everything."""
    from agent.daemon import EXIT_HANDOVER, HANDOVER_FILE
    server = servers("127.0.0.2")
    agent = AgentProcess(agent_config(test_cgroup, [
        {"name": "db", "protocol": "tcp", "match": {"cidr": "127.0.0.2/32", "port": server.port},
         "listen_port": free_port(), "on_enforcer_down": "refuse"}])).start()
    handover = os.path.join(agent.config["agent"]["state_dir"], HANDOVER_FILE)
    try:
        assert run_client(test_cgroup, "127.0.0.2", server.port)["echo"] == "ping"
        first = {p["id"] for p in ours(attached_programs(test_cgroup.path))}
        cli = subprocess.run([sys.executable, "-m", "agent.cli", "restart", "--pid", str(agent.proc.pid)],
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert "programs attached" in cli.stdout
        assert agent.proc.wait(10) == EXIT_HANDOVER
        stop = agent.events("agent.stop")[-1]["f"]
        assert stop["reason"] == "handover" and stop["programs_left"] == len(PROGRAMS)
        # still attached while no agent runs: refused, and nothing reached the server
        assert {p["id"] for p in ours(attached_programs(test_cgroup.path))} == first
        with open(handover) as f:
            assert {p["prog_id"] for p in json.load(f)["programs"]} == first
        peers = len(server.peers)
        out = run_client(test_cgroup, "127.0.0.2", server.port)
        assert out.get("errname") == "ConnectionRefusedError", out
        assert len(server.peers) == peers
        agent.start()
        start = agent.events("agent.start")[-1]["f"]
        assert start["bpf"]["taken_over"] == len(PROGRAMS)
        now = {p["id"] for p in ours(attached_programs(test_cgroup.path))}
        assert len(now) == len(PROGRAMS) and not now & first
        assert not os.path.exists(handover)
        assert "took over from the previous run" in agent.stderr()
        assert "removed stale" not in agent.stderr()
        assert run_client(test_cgroup, "127.0.0.2", server.port)["echo"] == "ping"
        assert len(agent.events("session.start")) == 2
    finally:
        code = agent.stop()
    assert code == 0 and agent.events("agent.stop")[-1]["f"]["reason"] == "signal"
    assert no_programs_of_ours(test_cgroup.path)


@pytest.mark.parametrize("stop", ["handover", "kill9"])
def test_under_the_descriptor_store_a_connect_made_while_no_agent_runs_waits_and_is_served(
        test_cgroup, servers, tmp_path, stop):
    """Under systemd (FileDescriptorStoreMax) the listening sockets are kept by the service
    manager across a restart, planned or after a crash: a governed connect made while no agent
    runs completes in the kernel, waits in the backlog, and the next run serves it, attributed
    from the map of the programs that redirected it, instead of it being refused."""
    from tests.fdstore import FdStore
    server = servers("127.0.0.2")
    store = FdStore(str(tmp_path))
    listen = free_port()
    agent = AgentProcess(agent_config(test_cgroup, [
        {"name": "db", "protocol": "tcp", "match": {"cidr": "127.0.0.2/32", "port": server.port},
         "listen_port": listen}]), fd_store=store).start()
    try:
        assert f"listen-v4-{listen}" in store.names()
        assert agent.events("agent.start")[-1]["f"]["listeners_passed"] == 0
        if stop == "handover":
            assert agent.hand_over() == 75
        else:
            agent.kill9()
        # no agent runs: the client connects now and waits for an answer
        waiting = test_cgroup.popen([sys.executable, "-c", CLIENT, "127.0.0.2", str(server.port), "4"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        assert waiting.poll() is None and server.peers == []
        agent.start()
        out, err = waiting.communicate(timeout=20)
        got = json.loads(out.strip().splitlines()[-1])
        assert got.get("echo") == "ping", (got, err)
        assert got["remote"] == ["127.0.0.2", server.port]
        assert len(server.peers) == 1 and server.peers[0][1] != got["local"][1]      # through the agent
        assert agent.events("agent.start")[-1]["f"]["listeners_passed"] >= 1
        session = agent.wait_for(lambda e: e["type"] == "session.start", what="session.start")["f"]
        assert session["process"]["pid"] == got["pid"] and session["identity"] == "test-client"
        assert not agent.events("agent.alert")         # nothing closed as unattributed
    finally:
        assert agent.stop() == 0
        store.close()
    assert no_programs_of_ours(test_cgroup.path)


def test_restart_waits_for_the_supervisor_to_bring_the_next_run_up(test_cgroup, servers):
    """`warden-agent restart` against a supervisor that, as the unit (RestartForceExitStatus=75),
    starts the agent again when it exits 75: it returns once the new run is active, and says
    which pid handed over to which; a supervisor that gives up makes it fail."""
    import io

    from agent.cli import restart_agent
    server = servers("127.0.0.2")
    agent = AgentProcess(agent_config(test_cgroup, [
        {"name": "db", "protocol": "tcp", "match": {"cidr": "127.0.0.2/32", "port": server.port},
         "listen_port": free_port()}])).start()
    unit = {"pid": agent.proc.pid, "state": "active", "exit": None}

    def supervise(restart: bool):
        unit["exit"] = agent.proc.wait()
        unit.update(pid=0, state="activating" if restart else "failed")
        if restart and unit["exit"] == 75:
            agent.start()
            unit.update(pid=agent.proc.pid, state="active")

    try:
        first = agent.proc.pid
        supervisor = threading.Thread(target=supervise, args=(True,))
        supervisor.start()
        said = io.StringIO()
        assert restart_agent(first, status=lambda: (unit["pid"], unit["state"]), timeout=60, out=said) == 0
        supervisor.join(30)
        assert unit["exit"] == 75 and agent.proc.pid != first
        assert f"handed over from pid {first} to pid {agent.proc.pid}" in said.getvalue()
        assert run_client(test_cgroup, "127.0.0.2", server.port)["echo"] == "ping"
        # the next one is not brought back: the command fails instead of waiting forever
        supervisor = threading.Thread(target=supervise, args=(False,))
        supervisor.start()
        assert restart_agent(agent.proc.pid, status=lambda: (unit["pid"], unit["state"]), timeout=60,
                             out=io.StringIO()) == 1
        supervisor.join(30)
        agent.start()               # the programs left attached are taken over
    finally:
        assert agent.stop() == 0
    assert no_programs_of_ours(test_cgroup.path)


def test_on_stop_hold_refuses_until_the_agent_runs_and_release_opens_the_direct_path(test_cgroup, servers):
    """`agent.on_stop: hold`: a plain stop leaves the programs attached, so governed connects are
    refused while no agent runs; `warden-agent check` says so, and `warden-agent release`
    detaches them (package removal runs it). Release never touches a running agent's own."""
    server = servers("127.0.0.2")
    config = agent_config(test_cgroup, [
        {"name": "db", "protocol": "tcp", "match": {"cidr": "127.0.0.2/32", "port": server.port},
         "listen_port": free_port()}])
    config["agent"] = {"on_stop": "hold"}
    agent = AgentProcess(config).start()

    def cli(*argv):
        return subprocess.run([sys.executable, "-m", "agent.cli", *argv, "--config", agent.config_path],
                              capture_output=True, text=True, timeout=120)
    try:
        # a running agent's programs are its own: release keeps them and it goes on governing
        released = cli("release")
        assert released.returncode == 0 and "6 attachment(s) belong to a running agent" in released.stdout
        assert run_client(test_cgroup, "127.0.0.2", server.port)["echo"] == "ping"
        assert len(server.peers) == 1 and agent.wait_for(lambda e: e["type"] == "session.start")
        assert "left by a stopped agent" not in cli("check").stdout
        assert agent.stop() == 0
        stop = agent.events("agent.stop")[-1]["f"]
        assert stop["reason"] == "signal" and stop["programs_left"] == len(PROGRAMS)
        assert len(ours(attached_programs(test_cgroup.path))) == len(PROGRAMS)
        refused = run_client(test_cgroup, "127.0.0.2", server.port)
        assert refused.get("errname") == "ConnectionRefusedError" and len(server.peers) == 1
        check = cli("check")
        assert f"scope cgroup {test_cgroup.rel}: {len(PROGRAMS)} Warden program attachment(s) left by a " \
               f"stopped agent" in check.stdout and check.returncode == 1
        released = cli("release")
        assert released.returncode == 0, released.stderr
        assert f"detached {len(PROGRAMS)} program attachment(s)" in released.stdout
        assert no_programs_of_ours(test_cgroup.path)
        direct = run_client(test_cgroup, "127.0.0.2", server.port)
        assert direct["echo"] == "ping" and server.peers[-1][1] == direct["local"][1]
        assert "nothing was left attached" in cli("release").stdout
    finally:
        agent.stop()
        if not no_programs_of_ours(test_cgroup.path):
            cli("release")
    assert no_programs_of_ours(test_cgroup.path)


def test_a_handover_list_is_honoured_on_a_cgroup_that_left_the_scope(test_cgroup, tmp_path):
    """Programs a handed-over run left on a cgroup the next config no longer governs would
    refuse that cgroup's governed connects for good: the next run takes them off too."""
    from tests.bpfenv import ScratchCgroup
    other = ScratchCgroup()
    handover = str(tmp_path / "handover.json")
    try:
        leaving = BpfManager([other.path])
        leaving.load()
        leaving.attach()
        assert leaving.hand_over(handover) == len(PROGRAMS)
        assert len(ours(attached_programs(other.path))) == len(PROGRAMS)
        assert oct(os.stat(handover).st_mode & 0o777) == "0o600"
        nxt = BpfManager([test_cgroup.path])
        nxt.load()
        try:
            nxt.attach(handover)
            assert nxt.taken_over == len(PROGRAMS)
            assert no_programs_of_ours(other.path)
            assert len(ours(attached_programs(test_cgroup.path))) == len(PROGRAMS)
            assert not os.path.exists(handover)
        finally:
            nxt.detach()
    finally:
        other.cleanup()            # sweeps whatever a failure midway left there
    assert no_programs_of_ours(test_cgroup.path)


def test_what_the_programs_report_while_no_agent_reads_is_read_back_by_the_next_run(test_cgroup, servers):
    """While no agent runs, its programs go on reporting into their own ring buffer (here: a
    connect that went direct under `bypass`, and one refused at the closed listener); the
    next run reads those back before the old programs and their maps are gone."""
    from agent.bpfmgr import EV_ATTEMPT, EV_ESTABLISHED
    bypassed = servers("127.0.0.2")
    refused = servers("127.0.0.3")
    dead_port = free_port()
    rules = [TargetRule(7, ipaddress.ip_network("127.0.0.2/32"), bypassed.port, dead_port, "bypass"),
             TargetRule(8, ipaddress.ip_network("127.0.0.3/32"), refused.port, dead_port, "refuse")]
    gone = start_run(BpfManager([test_cgroup.path]), rules)     # a run that no longer reads its events
    nxt = BpfManager([test_cgroup.path])
    try:
        direct = run_client(test_cgroup, "127.0.0.2", bypassed.port)
        assert direct["echo"] == "ping" and bypassed.peers[0][1] == direct["local"][1]
        denied = run_client(test_cgroup, "127.0.0.3", refused.port)
        assert denied.get("errname") == "ConnectionRefusedError" and refused.peers == []
        start_run(nxt, rules)
        got = [(kind, cap.tgid, cap.target_id, cap.bypass, cap.redirected) for kind, cap in nxt.recovered]
        assert got.index((EV_ATTEMPT, direct["pid"], 7, True, False)) < got.index(
            (EV_ATTEMPT, denied["pid"], 8, False, True))                      # in the order they happened
        # an outcome names its attempt by socket cookie only, and comes after it
        cookie = next(cap.cookie for kind, cap in nxt.recovered if kind == EV_ATTEMPT and cap.tgid == direct["pid"])
        kinds = [(kind, cap.cookie) for kind, cap in nxt.recovered]
        assert kinds.index((EV_ATTEMPT, cookie)) < kinds.index((EV_ESTABLISHED, cookie))
        stamps = [cap.ktime_ns for kind, cap in nxt.recovered if kind == EV_ATTEMPT]
        assert stamps == sorted(stamps) and 0 < time.monotonic_ns() - stamps[0] < 60e9
        assert {p["id"] for p in ours(attached_programs(test_cgroup.path))} == {
            bpfmgr_prog_id(fn.fd) for fn in nxt.funcs.values()}
    finally:
        nxt.detach()
        gone.detach()
    assert no_programs_of_ours(test_cgroup.path)


# many connects from one process in the governed cgroup: how many were refused
RING_FILLER = r"""
import socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
refused = 0
for _ in range(count):
    s = socket.socket()
    try:
        s.connect((host, port))
    except ConnectionRefusedError:
        refused += 1
    finally:
        s.close()
print(refused)
"""
RING_FILLING_CONNECTS = 8000     # two events each: about 16,000 for a ring that holds about 10,900


def fill_the_ring(cg, host, port, count=RING_FILLING_CONNECTS) -> None:
    res = cg.run([sys.executable, "-c", RING_FILLER, host, str(port), str(count)], timeout=120)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.strip()) == count          # every one refused at the closed listener


def test_events_the_ring_has_no_room_for_are_counted_and_read_back_once(test_cgroup):
    """While no agent reads it, the ring fills up after some thousands of connects. The programs
    count every event they could not report, and the next run reads back the count no run has
    recorded: every event is either read back or counted, and none twice."""
    from agent.bpfmgr import EV_ATTEMPT
    dead_port = free_port()
    rules = [TargetRule(8, ipaddress.ip_network("127.0.0.3/32"), 5999, dead_port, "refuse")]
    gone = start_run(BpfManager([test_cgroup.path]), rules)     # a run that no longer reads its events
    nxt = BpfManager([test_cgroup.path])
    try:
        assert gone.ring_drops() == (0, 0)
        fill_the_ring(test_cgroup, "127.0.0.3", 5999)
        dropped, recorded = gone.ring_drops()
        assert recorded == 0 and dropped > 1000
        gone.mark_drops_recorded(dropped - 123)     # that run had recorded all but the last 123
        start_run(nxt, rules)
        assert nxt.recovered_drops == 123
        attempts = sum(1 for kind, _cap in nxt.recovered if kind == EV_ATTEMPT)
        assert 0 < attempts < RING_FILLING_CONNECTS
        # an attempt and its outcome per connect: each one read back or counted
        assert len(nxt.recovered) + dropped == 2 * RING_FILLING_CONNECTS
        assert nxt.ring_drops() == (0, 0)           # this run's own counter starts afresh
    finally:
        nxt.detach()
        gone.detach()
    assert no_programs_of_ours(test_cgroup.path)


def test_a_full_ring_between_two_runs_is_on_record_as_an_alert(test_cgroup):
    """The agent records what its programs could not report while it was away (here: a
    handover, then more connects than the ring holds) as one agent.alert with their count."""
    dead_port = free_port()
    agent = AgentProcess(agent_config(test_cgroup, [
        {"name": "db", "protocol": "tcp", "match": {"cidr": "127.0.0.3/32", "port": 5999},
         "listen_port": dead_port}])).start()
    try:
        assert agent.hand_over() == 75
        fill_the_ring(test_cgroup, "127.0.0.3", 5999)
        agent.start()
        recovered = agent.events("agent.start")[-1]["f"]["bpf"]["recovered_events"]
        alert = agent.wait_for(lambda e: e["type"] == "agent.alert" and e["f"]["kind"] == "bpf_events_dropped",
                               what="the bpf_events_dropped alert")["f"]
        assert alert["severity"] == "error" and alert["detail"]["during"] == "agent_down"
        assert recovered + alert["detail"]["dropped"] == 2 * RING_FILLING_CONNECTS
        assert f"{alert['detail']['dropped']} connection events" in alert["message"]
    finally:
        assert agent.stop() == 0
    assert len([e for e in agent.events("agent.alert") if e["f"]["kind"] == "bpf_events_dropped"]) == 1
    assert no_programs_of_ours(test_cgroup.path)


def test_a_bypass_while_the_agent_restarts_is_recorded_with_when_it_happened(test_cgroup, servers):
    """Under `on_enforcer_down: bypass` a connect made between two agent runs goes direct; the
    next run records it as agent.bypass (reason agent_down, the time it connected, its
    process and identity) and counts it in the connection inventory."""
    server = servers("127.0.0.2")
    agent = AgentProcess(agent_config(test_cgroup, [
        {"name": "db", "protocol": "tcp", "match": {"cidr": "127.0.0.2/32", "port": server.port},
         "listen_port": free_port(), "on_enforcer_down": "bypass"}])).start()
    try:
        assert agent.hand_over() == 75
        before = time.time_ns()
        out = run_client(test_cgroup, "127.0.0.2", server.port)
        assert out["echo"] == "ping" and server.peers[-1][1] == out["local"][1]     # direct
        after = time.time_ns()
        time.sleep(0.3)
        agent.start()
        assert agent.events("agent.start")[-1]["f"]["bpf"]["recovered_events"] >= 2
        bypass = agent.wait_for(lambda e: e["type"] == "agent.bypass", what="agent.bypass")["f"]
        assert bypass["reason"] == "agent_down" and bypass["target"] == "db"
        assert bypass["orig_dst"] == f"127.0.0.2:{server.port}"
        assert bypass["identity"] == "test-client" and bypass["process"]["pid"] == out["pid"]
        assert before - 50_000_000 <= bypass["connected_ns"] <= after + 50_000_000
        seen = agent.wait_for(lambda e: e["type"] == "conn.observed" and e["f"]["bypassed"], timeout=15,
                              what="conn.observed")["f"]
        assert seen["attempts"] == 1 and seen["established"] == 1 and seen["target"] == "db"
        assert before - 50_000_000 <= seen["first_ns"] <= after + 50_000_000
    finally:
        assert agent.stop() == 0
    assert no_programs_of_ours(test_cgroup.path)


def test_bypass_when_enforcer_down(test_cgroup, servers):
    """With on_enforcer_down: bypass and no listener, the connect goes direct and is reported as a bypass."""
    server = servers("127.0.0.2")
    dead_port = free_port()
    mgr = BpfManager([test_cgroup.path])
    mgr.load()
    events = []
    try:
        mgr.set_targets([TargetRule(7, ipaddress.ip_network("127.0.0.2/32"), server.port, dead_port, "bypass")])
        mgr.attach()
        mgr.start_events(lambda kind, cap: events.append((kind, cap)))
        out = run_client(test_cgroup, "127.0.0.2", server.port)
        assert out["echo"] == "ping"
        assert server.peers[0][1] == out["local"][1]      # direct: the server saw the client itself
        deadline = time.time() + 5
        while time.time() < deadline and not any(k == 1 for k, _ in events):
            time.sleep(0.05)
        attempt = [c for k, c in events if k == 1][0]
        assert attempt.governed and attempt.bypass and not attempt.redirected
        assert attempt.target_id == 7 and attempt.tgid == out["pid"]
    finally:
        mgr.detach()
    assert no_programs_of_ours(test_cgroup.path)
