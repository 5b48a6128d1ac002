"""agent → enforcer → spool → collector → query, with every part real:

a real PostgreSQL on 127.0.0.2, the real `warden-collector serve` on SQLite, the real
`warden-agent run` governing a test cgroup, psql as the workload, and the `warden` CLI
answering "who touched public.customers, how, from which process" and verifying the chain.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.agentproc import AgentProcess
from tests.collectorproc import CollectorProcess, cli
from tests.pg_harness import PostgresServer, free_port, postgres_available

POLICY = """
@id("housekeeping")
permit (principal, action == Action::"pg:other", resource)
when { ["TransactionStmt", "VariableSetStmt", "VariableShowStmt"].contains(context.statement_kind) };

@id("billing-connect")
permit (principal == Service::"billing", action == Action::"pg:connect", resource == Target::"customers-db");

@id("billing-reads")
permit (principal == Service::"billing", action == Action::"pg:select", resource in Target::"customers-db");

@id("customer-updates-need-approval")
@approval("required")
forbid (principal, action == Action::"pg:update", resource in Target::"customers-db")
unless { context.approved };

@id("billing-updates-with-where")
permit (principal == Service::"billing", action in [Action::"pg:update", Action::"pg:delete"],
        resource in Target::"customers-db")
when { context.has_where };
"""


@pytest.fixture
def collector():
    proc = CollectorProcess().start()
    try:
        yield {"url": proc.url, "enroll": proc.enrollment(), "auditor": proc.token("auditor", "e2e-auditor"),
               "config": proc.config}
    finally:
        proc.cleanup()


@pytest.fixture
def database():
    if not postgres_available():
        pytest.skip("PostgreSQL 15 is not installed (make setup installs it)")
    with PostgresServer() as pg:
        pg.psql_local("CREATE TABLE customers (id int PRIMARY KEY, name text, ssn text);"
                      "INSERT INTO customers SELECT g, 'customer ' || g, '123-45-' || lpad(g::text, 4, '0') "
                      "FROM generate_series(1, 50) g;"
                      "GRANT ALL ON customers TO alice;", dbname="app")
        yield pg


def test_agent_to_collector_to_query(test_cgroup, collector, database):
    workdir = tempfile.mkdtemp(prefix="warden-e2e-agent-")
    agent = _agent_for(test_cgroup, collector, database, workdir, agent_id="e2e-agent")
    try:
        psql = database.bin("psql")
        env = {**os.environ, "PGPASSWORD": "alice-pw"}
        ok = test_cgroup.run([psql, "-h", database.host, "-p", str(database.port), "-U", "alice", "-d", "app",
                              "-v", "ON_ERROR_STOP=1", "-qAt", "-c", "SELECT count(*) FROM customers WHERE id <= 10"],
                             env=env)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.strip() == "10"
        denied = test_cgroup.run([psql, "-h", database.host, "-p", str(database.port), "-U", "alice", "-d", "app",
                                  "-qAt", "-c", "DELETE FROM customers"], env=env)
        assert denied.returncode != 0
        assert "42501" in denied.stderr or "denied" in denied.stderr.lower(), denied.stderr
        # the DELETE never reached the server
        assert database.psql_local("SELECT count(*) FROM customers", dbname="app").strip() == "50"

        token_env = {"WARDEN_COLLECTOR": collector["url"], "WARDEN_TOKEN": collector["auditor"]}
        deadline = time.time() + 60
        sessions = []
        while time.time() < deadline:
            res = cli("warden", "sessions", "list", "--table", "public.customers", "--json", env=token_env,
                      check=False)
            if res.returncode == 0:
                sessions = json.loads(res.stdout)
                sessions = sessions.get("sessions", sessions) if isinstance(sessions, dict) else sessions
                if len(sessions) >= 2:
                    break
            time.sleep(0.5)
        assert len(sessions) >= 2, f"sessions at the collector: {sessions}"
        assert {s.get("identity") for s in sessions} == {"billing"}

        events = json.loads(cli("warden", "events", "--table", "public.customers", "--json", env=token_env).stdout)
        events = events.get("events", events) if isinstance(events, dict) else events
        texts = json.dumps(events)
        assert "SELECT count(*) FROM customers" in texts
        assert "DELETE FROM customers" in texts

        verify = cli("warden", "verify", "--json", env=token_env, check=False)
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        assert agent.stop() == 0
        if os.environ.get("WARDEN_KEEP_E2E") is None:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print("agent workdir kept:", workdir)


def _agent_for(test_cgroup, collector, database, workdir, approvals_timeout="20s", agent_id="e2e-approvals"):
    policy = Path(workdir, "policy.cedar")
    policy.write_text(POLICY)
    return AgentProcess({
        "agent": {"id": agent_id, "heartbeat_interval": "2s"},
        "collector": {"url": collector["url"], "enrollment": collector["enroll"]},
        "scope": {"cgroups": [test_cgroup.rel]},
        # the approval runs also check durable_before_forward through the real agent: an
        # approved statement goes to the database only once its records are in the spool
        "targets": [{"name": "customers-db", "protocol": "postgres",
                     "match": {"cidr": f"{database.host}/32", "port": database.port},
                     "listen_port": free_port(), "durable_before_forward": True}],
        "identities": [{"name": "billing", "match": {"cgroup": test_cgroup.rel}}],
        "policy": {"path": str(policy)},
        "approvals": {"timeout": approvals_timeout},
    }, workdir=workdir).start()


def _wait_pending(collector, env, seen=()):
    deadline = time.time() + 30
    while time.time() < deadline:
        res = cli("warden", "approvals", "list", "--json", env=env, check=False)
        if res.returncode == 0:
            items = json.loads(res.stdout)
            items = items.get("items", items) if isinstance(items, dict) else items
            pending = [a for a in items if a["status"] == "pending" and a["id"] not in seen]
            if pending:
                return pending[0]
        time.sleep(0.3)
    raise AssertionError("no pending approval appeared at the collector")


def test_approval_granted_and_denied_through_the_cli(test_cgroup, collector, database):
    workdir = tempfile.mkdtemp(prefix="warden-e2e-agent-")
    approver = cli("warden-collector", "token", "create", "--config", collector["config"], "--role", "approver",
                   "--subject", "alice.approver").stdout.strip().split()[-1]
    env = {"WARDEN_COLLECTOR": collector["url"], "WARDEN_TOKEN": approver}
    agent = _agent_for(test_cgroup, collector, database, workdir)
    psql = [database.bin("psql"), "-h", database.host, "-p", str(database.port), "-U", "alice", "-d", "app", "-qAt"]
    pg_env = {**os.environ, "PGPASSWORD": "alice-pw"}
    try:
        # granted: the UPDATE waits for a human, then runs
        waiting = test_cgroup.popen(psql + ["-c", "UPDATE customers SET name = 'renamed' WHERE id = 7"],
                                    env=pg_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = _wait_pending(collector, env)
        assert "UPDATE customers" in first["statement"] and first["identity"] == "billing"
        cli("warden", "approvals", "approve", first["id"], "--reason", "ticket CHG-1234", env=env)
        out, err = waiting.communicate(timeout=30)
        assert waiting.returncode == 0, err
        # psql showed the approval id and the command to approve it while it waited
        assert f"warden approvals approve {first['id']}" in err and "NOTICE" in err, err
        assert database.psql_local("SELECT name FROM customers WHERE id = 7", dbname="app").strip() == "renamed"

        # denied: 42501 with the approver's reason, and the row is untouched
        waiting = test_cgroup.popen(psql + ["-c", "UPDATE customers SET name = 'nope' WHERE id = 8"],
                                    env=pg_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        second = _wait_pending(collector, env, seen={first["id"]})
        cli("warden", "approvals", "deny", second["id"], "--reason", "not during freeze", env=env)
        out, err = waiting.communicate(timeout=30)
        assert waiting.returncode != 0 and "not during freeze" in err, err
        assert database.psql_local("SELECT name FROM customers WHERE id = 8", dbname="app").strip() == "customer 8"

        decided = agent.wait_for(lambda e: e["type"] == "approval.decided" and e["f"]["decision"] == "denied",
                                 what="approval.decided")
        assert decided["f"]["approver"] == "alice.approver"
        granted = [e for e in agent.events("approval.decided") if e["f"]["decision"] == "approved"]
        assert granted and granted[0]["f"]["reason"] == "ticket CHG-1234"
    finally:
        agent.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_approval_times_out(test_cgroup, collector, database):
    workdir = tempfile.mkdtemp(prefix="warden-e2e-agent-")
    agent = _agent_for(test_cgroup, collector, database, workdir, approvals_timeout="2s")
    try:
        res = test_cgroup.run([database.bin("psql"), "-h", database.host, "-p", str(database.port), "-U", "alice",
                               "-d", "app", "-qAt", "-c", "UPDATE customers SET name = 'late' WHERE id = 9"],
                              env={**os.environ, "PGPASSWORD": "alice-pw"}, timeout=30)
        assert res.returncode != 0 and "not decided within" in res.stderr, res.stderr
        agent.wait_for(lambda e: e["type"] == "approval.expired", what="approval.expired")
        assert database.psql_local("SELECT name FROM customers WHERE id = 9", dbname="app").strip() == "customer 9"
    finally:
        agent.stop()
        shutil.rmtree(workdir, ignore_errors=True)
