"""`policy check` and `policy test` as functions (the agent CLI wires them)."""
from __future__ import annotations

import io
import json
import os

from enforcer.policy.cli import cmd_check, cmd_test, parse_http

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "packaging", "policy.example.cedar")
GROUPS = {"payments": ["payments-api"]}


def test_check_ok():
    out = io.StringIO()
    assert cmd_check(EXAMPLE, out=out) == 0
    assert out.getvalue().startswith("OK: ")


def test_check_lists_each_problem_with_file_and_line(tmp_path):
    path = tmp_path / "p.cedar"
    path.write_text('@id("a")\npermit (principal, action == Action::"pg:select", resource) when { context.x };\n\n'
                    '@id("b")\npermit (principal, action == Action::"pg:select", resource) when { context.y };\n')
    out = io.StringIO()
    assert cmd_check(str(path), out=out) == 1
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"{path}:1: ") and lines[1].startswith(f"{path}:4: ")
    assert "2 problem(s)" in lines[-1]


def test_test_sql_prints_decision_action_resources_policies():
    out = io.StringIO()
    code = cmd_test(EXAMPLE, "payments-api", "payments-db",
                    sql="SELECT * FROM customers; DELETE FROM customers WHERE id = 1", groups=GROUPS, out=out)
    text = out.getvalue()
    assert code == 1
    assert "decision:  ALLOW" in text and "decision:  DENY" in text
    assert "action:    pg:delete" in text
    assert 'resources: Table::"payments-db/public.customers"' in text
    assert "policies:  never-delete-customers" in text


def test_test_json_and_exit_codes():
    out = io.StringIO()
    assert cmd_test(EXAMPLE, "payments-api", "payments-db", sql="SELECT 1", groups=GROUPS, as_json=True, out=out) == 0
    result = json.loads(out.getvalue())["results"][0]
    assert (result["decision"], result["policies"], result["kind"]) == ("allow", ["payments-read"], "SelectStmt")
    out = io.StringIO()
    assert cmd_test(EXAMPLE, "migrations", "payments-db", sql="CREATE INDEX ON payments (created_at)",
                    as_json=True, out=out) == 2
    assert json.loads(out.getvalue())["results"][0]["decision"] == "approval"


def test_test_http():
    out = io.StringIO()
    code = cmd_test(EXAMPLE, "payments-api", "card-api", http="POST https://api.cards.example/v2/refunds/9",
                    groups=GROUPS, as_json=True, out=out)
    result = json.loads(out.getvalue())["results"][0]
    assert code == 2 and result["action"] == "http:POST" and result["policies"] == ["refunds-need-approval"]


def test_test_input_errors(tmp_path):
    out = io.StringIO()
    assert cmd_test(EXAMPLE, "x", "db", out=out) == 3
    assert cmd_test(EXAMPLE, "x", "db", http="https://no-method", out=out) == 3
    broken = tmp_path / "b.cedar"
    broken.write_text("permit (principal, action, resource")
    assert cmd_test(str(broken), "x", "db", sql="SELECT 1", out=out) == 3


def test_parse_http():
    assert parse_http("get https://Api.example:8443/v1/x?y=1") == ("GET", "Api.example:8443", "/v1/x?y=1")
    assert parse_http("DELETE api.example") == ("DELETE", "api.example", "/")


# -- `warden-agent policy test` as a command: it must decide as the running agent would ----------

def agent_policy_test(tmp_path, *args: str) -> tuple[int, str]:
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "agent.cli", "policy", "test", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout + done.stderr


def write_config(tmp_path, groups: str) -> str:
    path = tmp_path / "agent.yaml"
    path.write_text(f"policy: {{path: {EXAMPLE}}}\nidentities:\n"
                    f"  - name: payments-api\n    match: {{systemd_unit: payments.service}}\n    groups: {groups}\n")
    return str(path)


def test_agent_command_takes_identity_groups_from_the_config(tmp_path):
    """The example policy permits `principal in Group::"payments"`: the dry run must know the group."""
    select = ["--identity", "payments-api", "--target", "payments-db", "--sql", "SELECT * FROM customers"]
    code, out = agent_policy_test(tmp_path, "--config", write_config(tmp_path, "[payments]"), *select)
    assert code == 0 and "ALLOW" in out.upper(), out
    code, out = agent_policy_test(tmp_path, "--config", write_config(tmp_path, "[auditors]"), *select)
    assert code == 1, out
    # --policy with an explicit config: the policy given, the config's groups
    code, out = agent_policy_test(tmp_path, "--policy", EXAMPLE, "--config", write_config(tmp_path, "[payments]"),
                                  *select)
    assert code == 0, out


def test_agent_command_input_errors_exit_3_with_a_message(tmp_path):
    base = ["--policy", EXAMPLE, "--config", write_config(tmp_path, "[payments]"), "--identity", "payments-api",
            "--target", "payments-db"]
    assert agent_policy_test(tmp_path, *base)[0] == 3                        # neither --sql nor --http
    code, out = agent_policy_test(tmp_path, *base, "--sql", "SELECT 1", "--attrs", "{team: x")
    assert code == 3 and "--attrs is not JSON" in out and "Traceback" not in out
    code, out = agent_policy_test(tmp_path, *base, "--sql", "SELECT 1", "--attrs", "[1]")
    assert code == 3 and "JSON object" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("identities:\n  - name: a\n    match: {shoe_size: 9}\n")
    code, out = agent_policy_test(tmp_path, "--config", str(bad), "--identity", "a", "--target", "t", "--sql", "SELECT 1")
    assert code == 3 and f"{bad}:3" in out
