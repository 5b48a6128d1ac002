"""Brokered credentials through the real agent: a workload in a governed cgroup presents a
service token instead of a database password; the agent validates it, logs in upstream with the
secret it holds, and the token's claims name the identity that policy and records see."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.agentproc import AgentProcess
from tests.integration.test_pg_brokered import AUD, ISS, credentials, jwks, make_token, pg, secret_file, signing_key  # noqa: F401
from tests.pg_harness import free_port

POLICY = """
@id("etl-reads")
permit (principal == Service::"etl", action in [Action::"pg:connect", Action::"pg:select"], resource);
"""


def test_token_login_names_the_identity(test_cgroup, pg, tmp_path, jwks, signing_key):  # noqa: F811
    Path(tmp_path, "policy.cedar").write_text(POLICY)
    agent = AgentProcess({
        "scope": {"cgroups": [test_cgroup.rel]},
        "targets": [{"name": "customers-db", "protocol": "postgres",
                     "match": {"cidr": f"{pg.host}/32", "port": pg.port}, "listen_port": free_port(),
                     "credentials": credentials("alice", secret_file(tmp_path, "alice-pw"), jwks)}],
        # the process alone would be unknown; the token's subject makes it "etl"
        "identities": [{"name": "etl", "match": {"claim": {"sub": "etl-job"}}}],
        "policy": {"path": str(Path(tmp_path, "policy.cedar"))},
    }).start()
    psql = [pg.bin("psql"), "-h", pg.host, "-p", str(pg.port), "-U", "whoever", "-d", "app", "-qAt",
            "-c", "SELECT current_user"]
    try:
        ok = test_cgroup.run(psql, env={**os.environ, "PGPASSWORD": make_token(signing_key)})
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.strip() == "alice"            # logged in upstream as the brokered role
        start = agent.wait_for(lambda e: e["type"] == "session.start" and e["f"].get("credentials") == "brokered",
                               what="brokered session.start")
        assert start["f"]["identity"] == "etl" and start["f"]["token"]["sub"] == "etl-job"
        # the role the session ran as, not the name the workload typed
        assert (start["f"]["auth_user"], start["f"]["brokered_user"], start["f"]["client_user"]) == \
            ("alice", "alice", "whoever")
        assert "alice-pw" not in Path(agent.event_log).read_text()

        expired = test_cgroup.run(psql, env={**os.environ, "PGPASSWORD": make_token(signing_key, exp=1, iat=0)})
        assert expired.returncode != 0 and "invalid service token" in expired.stderr, expired.stderr
    finally:
        assert agent.stop() == 0
