"""Client TLS through the real agent: psql with sslmode=verify-full trusts the agent's local CA
(printed by `warden-agent ca`) and gets a certificate for the address it connected to."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.agentproc import AgentProcess
from tests.integration.test_agent_ops import pg  # noqa: F401  (module-scoped real PostgreSQL)
from tests.pg_harness import free_port

BIN = Path(sys.executable).parent


def test_verify_full_against_the_agent_ca(test_cgroup, pg, tmp_path):  # noqa: F811
    agent = AgentProcess({
        "scope": {"cgroups": [test_cgroup.rel]},
        "targets": [{"name": "db", "protocol": "postgres", "match": {"cidr": f"{pg.host}/32", "port": pg.port},
                     "listen_port": free_port()}],
    })
    ca_pem = subprocess.run([str(BIN / "warden-agent"), "ca", "--config", agent.config_path],
                            capture_output=True, text=True, check=True).stdout
    assert "BEGIN CERTIFICATE" in ca_pem
    root = tmp_path / "agent-ca.crt"
    root.write_text(ca_pem)
    agent.start()
    try:
        res = test_cgroup.run([pg.bin("psql"), f"host={pg.host} port={pg.port} user=alice dbname=app "
                               f"sslmode=verify-full sslrootcert={root} channel_binding=disable",
                               "-qAt", "-c", "SELECT 1"], env={**os.environ, "PGPASSWORD": "alice-pw"})
        assert res.returncode == 0 and res.stdout.strip() == "1", res.stderr
        start = agent.wait_for(lambda e: e["type"] == "session.start", what="session.start")
        assert start["f"]["tls_client"] is True
    finally:
        assert agent.stop() == 0
