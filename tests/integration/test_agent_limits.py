"""Per-target limits through the real agent: max_connections refuses the connection past the
limit in the client's own protocol (Postgres 53300) and records who was refused; a slot that
frees up is usable again."""
from __future__ import annotations

import os
import subprocess
import time

from tests.agentproc import AgentProcess
from tests.integration.test_agent_ops import pg  # noqa: F401  (module-scoped real PostgreSQL)
from tests.pg_harness import free_port


def test_max_connections_refuses_past_the_limit_and_frees_slots(test_cgroup, pg):  # noqa: F811
    agent = AgentProcess({
        "scope": {"cgroups": [test_cgroup.rel]},
        "targets": [{"name": "db", "protocol": "postgres", "match": {"cidr": f"{pg.host}/32", "port": pg.port},
                     "listen_port": free_port(), "max_connections": 2}],
        "identities": [{"name": "limited-svc", "match": {"cgroup": test_cgroup.rel}}],
    }).start()
    env = {**os.environ, "PGPASSWORD": "alice-pw", "PGCONNECT_TIMEOUT": "10"}
    dsn = f"host={pg.host} port={pg.port} user=alice dbname=app sslmode=disable"
    holders = []
    try:
        # two sessions that stay open for a while
        for _ in range(2):
            holders.append(test_cgroup.popen([pg.bin("psql"), dsn, "-qAt", "-c", "SELECT pg_sleep(4)"], env=env,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        agent.wait_for(lambda e: e["type"] == "pg.statement" and "pg_sleep" in e["f"].get("text", "")
                       and len([x for x in agent.events("pg.statement") if "pg_sleep" in x["f"]["text"]]) >= 2,
                       timeout=15, what="two pg_sleep statements")
        refused = test_cgroup.run([pg.bin("psql"), dsn, "-qAt", "-c", "SELECT 1"], env=env)
        assert refused.returncode != 0
        assert "max_connections" in refused.stderr and "'db'" in refused.stderr, refused.stderr
        alert = agent.wait_for(lambda e: e["type"] == "agent.alert" and e["f"].get("kind") == "connection_limit",
                               what="connection_limit alert")
        assert alert["f"]["detail"]["identity"] == "limited-svc" and alert["f"]["detail"]["limit"] == 2
        assert alert["f"]["detail"]["process"]["comm"] == "psql"
        for holder in holders:
            assert holder.wait(20) == 0
        # the slots are free again
        deadline = time.monotonic() + 10
        while True:
            again = test_cgroup.run([pg.bin("psql"), dsn, "-qAt", "-c", "SELECT 1"], env=env)
            if again.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert again.returncode == 0 and again.stdout.strip() == "1", again.stderr
    finally:
        for holder in holders:
            if holder.poll() is None:
                holder.kill()
                holder.wait(10)
        assert agent.stop() == 0
