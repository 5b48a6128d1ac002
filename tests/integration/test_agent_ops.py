"""Operating the agent: `warden-agent check`, hot reload of policy and config (a bad file is
refused and the previous one keeps deciding), all through the real agent and a real PostgreSQL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.agentproc import AgentProcess
from tests.pg_harness import PostgresServer, free_port, postgres_available

BIN = Path(sys.executable).parent

ALLOW_SELECT = """
@id("reads")
permit (principal == Service::"ops-test", action in [Action::"pg:connect", Action::"pg:select"], resource);
"""
ONLY_CONNECT = """
@id("connect-only")
permit (principal == Service::"ops-test", action == Action::"pg:connect", resource);
"""


def test_check_lists_every_problem_with_file_and_line(tmp_path):
    bad = tmp_path / "agent.yaml"
    bad.write_text("scope:\n  cgroups: [/definitely-not-a-cgroup-xyz]\ntargets:\n  - name: db\n"
                   "    protocol: mysql\n    match: {cidr: 127.0.0.0/33, port: 5432}\n")
    res = subprocess.run([str(BIN / "warden-agent"), "check", "--config", str(bad)], capture_output=True, text=True)
    assert res.returncode == 1
    assert f"{bad}:5: protocol must be one of" in res.stdout
    assert f"{bad}:6: '127.0.0.0/33' is not a CIDR" in res.stdout
    assert "problem(s) found" in res.stdout


def test_check_passes_on_a_good_host_and_config(tmp_path, bpf_required):
    good = tmp_path / "agent.yaml"
    good.write_text("scope:\n  cgroups: [/]\ntargets: []\n")
    res = subprocess.run([str(BIN / "warden-agent"), "check", "--config", str(good)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout
    for fact in ("cgroup2 mounted", "BCC importable", "kernel headers available", "config", "all checks passed"):
        assert fact in res.stdout


@pytest.fixture(scope="module")
def pg():
    if not postgres_available():
        pytest.skip("PostgreSQL 15 is not installed (make setup installs it)")
    with PostgresServer() as server:
        yield server


def test_reload_refuses_bad_policy_and_config_and_applies_good_ones(test_cgroup, pg):
    work = tempfile.mkdtemp(prefix="warden-ops-")
    policy = Path(work, "policy.cedar")
    policy.write_text(ALLOW_SELECT)
    agent = AgentProcess({
        "scope": {"cgroups": [test_cgroup.rel]},
        "targets": [{"name": "db", "protocol": "postgres", "match": {"cidr": f"{pg.host}/32", "port": pg.port},
                     "listen_port": free_port()}],
        "identities": [{"name": "ops-test", "match": {"cgroup": test_cgroup.rel}}],
        "policy": {"path": str(policy)},
    }, workdir=work).start()
    psql = [pg.bin("psql"), "-h", pg.host, "-p", str(pg.port), "-U", "alice", "-d", "app", "-qAt", "-c", "SELECT 41 + 1"]
    env = {**os.environ, "PGPASSWORD": "alice-pw"}

    def select_ok() -> bool:
        res = test_cgroup.run(psql, env=env)
        return res.returncode == 0 and res.stdout.strip() == "42"

    try:
        assert select_ok()
        [start] = agent.events("agent.start")       # a reboot between two starts shows in boot_id
        with open("/proc/sys/kernel/random/boot_id") as f:
            assert start["f"]["boot_id"] == f.read().strip()
        # a broken policy file is refused with file:line; the old policy keeps deciding
        policy.write_text(ALLOW_SELECT + "\npermit (principal, action == Action::\"pg:nope\", resource);\n")
        agent.proc.send_signal(signal.SIGHUP)
        rejected = agent.wait_for(lambda e: e["type"] == "agent.policy_rejected", timeout=15, what="policy_rejected")
        assert rejected["f"]["file"].endswith("policy.cedar") and rejected["f"]["line"] >= 1
        assert select_ok()
        # a broken agent.yaml is refused too, and the agent keeps running
        config_text = Path(agent.config_path).read_text()
        Path(agent.config_path).write_text(config_text + "\nspool:\n  on_full: drop\n")
        agent.proc.send_signal(signal.SIGHUP)
        bad_config = agent.wait_for(lambda e: e["type"] == "agent.config_rejected", timeout=15, what="config_rejected")
        assert any("on_full" in p for p in bad_config["f"]["problems"])
        assert agent.proc.poll() is None and select_ok()
        Path(agent.config_path).write_text(config_text)
        # a valid policy that no longer permits SELECT takes effect on file change alone
        policy.write_text(ONLY_CONNECT)
        agent.wait_for(lambda e: e["type"] == "agent.reloaded" and e["f"]["what"] == "policy", timeout=20,
                       what="policy reload")
        deadline = time.time() + 10
        while select_ok() and time.time() < deadline:
            time.sleep(0.3)
        denied = test_cgroup.run(psql, env=env)
        assert denied.returncode != 0 and "pg:select" in denied.stderr, denied.stderr
    finally:
        assert agent.stop() == 0


def test_reload_applies_masking_and_names_what_needs_a_restart(test_cgroup, pg):
    """SIGHUP: new masking rules apply to the next session; a change the running agent cannot
    take (here the spool) is named in a restart_required alert and the running value stays."""
    import yaml
    pg.psql_local("CREATE TABLE IF NOT EXISTS reload_people (email text); TRUNCATE reload_people; "
                  "INSERT INTO reload_people VALUES ('ada@example.com'); ALTER TABLE reload_people OWNER TO alice",
                  dbname="app")
    agent = AgentProcess({
        "scope": {"cgroups": [test_cgroup.rel]},
        "targets": [{"name": "db", "protocol": "postgres", "match": {"cidr": f"{pg.host}/32", "port": pg.port},
                     "listen_port": free_port()}],
        "identities": [{"name": "ops-test", "match": {"cgroup": test_cgroup.rel}}],
    }).start()
    psql = [pg.bin("psql"), "-h", pg.host, "-p", str(pg.port), "-U", "alice", "-d", "app", "-qAt", "-c",
            "SELECT email FROM reload_people"]
    env = {**os.environ, "PGPASSWORD": "alice-pw"}
    try:
        before = test_cgroup.run(psql, env=env)
        assert before.returncode == 0 and before.stdout.strip() == "ada@example.com", before.stderr
        config = yaml.safe_load(Path(agent.config_path).read_text())
        config["masking"] = {"rules": [{"column": "email", "strategy": "email"}]}
        config["spool"] = {"max_bytes": "2GiB"}
        Path(agent.config_path).write_text(yaml.safe_dump(config))
        agent.proc.send_signal(signal.SIGHUP)
        reloaded = agent.wait_for(lambda e: e["type"] == "agent.reloaded" and e["f"]["what"] == "config",
                                  timeout=15, what="config reload")
        assert reloaded["f"]["detail"]["masking_rules"] == 1
        alert = agent.wait_for(lambda e: e["type"] == "agent.alert" and e["f"].get("kind") == "restart_required",
                               timeout=15, what="restart_required")
        assert alert["f"]["detail"]["sections"] == ["spool"]
        after = test_cgroup.run(psql, env=env)
        assert after.returncode == 0, after.stderr
        masked = after.stdout.strip()
        assert masked != "ada@example.com" and masked.endswith("@example.com"), masked
    finally:
        assert agent.stop() == 0
