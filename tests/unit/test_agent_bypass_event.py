"""agent.bypass: a connect that went around a stopped enforcer is recorded with the process
and the identity its sessions would have had."""
import asyncio
import os
import sys

from agent.bpfmgr import FLAG_BYPASS, FLAG_GOVERNED, Capture
from agent.config import IdentityRule
from agent.daemon import Agent
from agent.identity import IdentityResolver
from agent.inventory import Inventory


def test_bypass_event_names_the_process_and_its_identity():
    agent = object.__new__(Agent)          # the event path alone: no BPF, no listeners
    agent.identities = IdentityResolver([IdentityRule("nightly-etl", {"exe": os.path.realpath(sys.executable)})])
    agent.targets_by_id = {}
    agent.stats = {"bypassed": 0}
    agent.inventory = Inventory(agent._describe_capture, agent._target_name)
    seen = []
    agent.emit = lambda event_type, fields: seen.append((event_type, fields))
    agent._loop = asyncio.new_event_loop()
    try:
        me = os.getpid()
        agent._on_bpf_event(1, Capture(cookie=1, cgroup_id=0, ktime_ns=1, orig_ip="127.0.0.2", orig_port=5432,
                                       target_id=3, tgid=me, pid=me, uid=os.getuid(), gid=os.getgid(), family=4,
                                       flags=FLAG_GOVERNED | FLAG_BYPASS, comm="python3"))
        agent._loop.run_until_complete(asyncio.sleep(0))
    finally:
        agent._loop.close()
    [(event_type, fields)] = seen
    assert event_type == "agent.bypass" and agent.stats["bypassed"] == 1
    assert fields["identity"] == "nightly-etl" and fields["orig_dst"] == "127.0.0.2:5432"
    assert fields["process"]["pid"] == me and fields["process"]["exe"] == os.path.realpath(sys.executable)
