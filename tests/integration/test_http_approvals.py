"""An HTTP request held for a human: policy says approval, the real collector holds it, the
`warden approvals` CLI decides it, and serve_http then forwards it or answers 403 with the reason.

Real parts: `warden-collector serve` on 127.0.0.1 (SQLite), an agent enrolled with it (the
shipper's enrollment and bearer tokens), enforcer.approvals.ApprovalClient, the uvicorn upstream
of test_http_proxy on 127.0.0.2, httpx as the workload and the `warden` CLI as the approver.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from enforcer.approvals import ApprovalClient
from enforcer.policy.engine import PolicyEngine
from tests.integration.test_http_proxy import Enforcer, _free_port, upstream  # noqa: F401 (fixture)

BIN = Path(sys.executable).parent

POLICY = """
@id("billing-read")
permit(principal == Service::"billing", action in Action::"http:read", resource in Target::"api");

@id("billing-refunds")
permit(principal == Service::"billing", action == Action::"http:POST", resource in Endpoint::"api/api/refunds");

@id("refunds-need-approval")
@approval("required")
forbid(principal, action == Action::"http:POST", resource in Endpoint::"api/api/refunds")
unless { context.approved };
"""


def _cli(*args: str, env: dict | None = None) -> str:
    done = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "250", **(env or {})})
    assert done.returncode == 0, f"{args} -> {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def collector():
    work = tempfile.mkdtemp(prefix="warden-http-approvals-")
    port = _free_port("127.0.0.1")
    config = Path(work, "collector.yaml")
    config.write_text(f"state_dir: {work}/state\nlisten: 127.0.0.1:{port}\n")
    proc = subprocess.Popen([str(BIN / "warden-collector"), "serve", "--config", str(config),
                             "--listen", f"127.0.0.1:{port}", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the collector did not start"
            time.sleep(0.1)
        enrollment = _cli("warden-collector", "enroll", "create", "--config", str(config)).strip().split()[-1]
        approver = _cli("warden-collector", "token", "create", "--config", str(config), "--role", "approver",
                        "--subject", "alice.approver").strip().split()[-1]
        yield {"url": url, "enrollment": enrollment, "approver": approver, "work": work}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def agent_token(collector):
    """Enroll an agent the way the daemon does; its shipper mints the bearer tokens."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.shipper import Shipper
    from records.spool import Spool
    spool = Spool(os.path.join(collector["work"], "spool"))
    shipper = Shipper(spool, collector["url"], Ed25519PrivateKey.generate(), "http-approvals-agent",
                      enrollment_token=collector["enrollment"], state_dir=os.path.join(collector["work"], "shipper"))
    asyncio.run(shipper.enroll())
    yield shipper.bearer_token
    spool.close()


@pytest.fixture(scope="module")
def enforcer():
    e = Enforcer()
    yield e
    e.close()


def _pending(env: dict, seen: set, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = json.loads(_cli("warden", "approvals", "list", "--json", env=env))
        items = items.get("items", items) if isinstance(items, dict) else items
        pending = [a for a in items if a["status"] == "pending" and a["id"] not in seen]
        if pending:
            return pending[0]
        time.sleep(0.2)
    raise AssertionError("no pending approval appeared at the collector")


def _post_in_background(url: str, body: bytes, path: str = "/refunds") -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run():
        with httpx.Client(base_url=url, headers={"Host": "api"}, timeout=40) as client:
            result["response"] = client.post(path, content=body)
            result["after"] = client.get("/seen").json()     # the same connection goes on
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_held_request_runs_when_approved_and_gets_403_when_denied(upstream, enforcer, collector,  # noqa: F811
                                                                  agent_token):
    approvals = ApprovalClient(collector["url"], agent_token, timeout_s=30)
    enforcer.configure(upstream, policy=PolicyEngine.from_text(POLICY), approvals=approvals)
    env = {"WARDEN_COLLECTOR": collector["url"], "WARDEN_TOKEN": collector["approver"]}

    # approved: the request waits for the approver, then reaches the upstream with its body
    thread, result = _post_in_background(enforcer.url, b'{"order": 1, "amount": 5}')
    first = _pending(env, set())
    assert first["identity"] == "billing" and first["statement"] == "POST api/refunds"
    assert "response" not in result                      # still held
    _cli("warden", "approvals", "approve", first["id"], "--reason", "ticket CHG-77", env=env)
    thread.join(30)
    approved = result["response"]
    assert approved.status_code == 200, approved.text
    assert approved.json()["method"] == "POST" and approved.json()["body_len"] == 25
    assert "POST /refunds" in result["after"]

    # denied: 403 naming the policy and the approver's reason; the upstream never sees it
    enforcer.sink.clear()
    thread, result = _post_in_background(enforcer.url, b'{"order": 2, "amount": 5000}')
    second = _pending(env, {first["id"]})
    _cli("warden", "approvals", "deny", second["id"], "--reason", "not during the freeze", env=env)
    thread.join(30)
    denied = result["response"]
    assert denied.status_code == 403
    body = denied.json()
    assert body["identity"] == "billing" and body["action"] == "http:POST"
    assert body["policy"] == ["refunds-need-approval"]
    assert "not during the freeze" in body["reason"] and "alice.approver" in body["reason"]
    assert result["after"].count("POST /refunds") == 1   # only the approved one got through

    # the request is recorded as held; the approval's outcome is its own policy.decision
    held = [r for r in enforcer.sink.of("http.request") if r["method"] == "POST"]
    assert held and all(r["decision"] == "approval" for r in held)
    decisions = enforcer.sink.of("policy.decision")
    assert decisions[0]["decision"] == "deny" and "not during the freeze" in decisions[0]["reason"]
    decided = enforcer.sink.of("approval.decided")
    assert decided and decided[0]["decision"] == "denied" and decided[0]["approver"] == "alice.approver"


def test_grant_window_covers_repeats_and_names_the_approval(upstream, enforcer, collector,  # noqa: F811
                                                            agent_token):
    """approvals.grant_window: the same request line again within the window goes through on the
    earlier approval, and its record names that approval and its approver. What the approver did
    not see is asked again: another query, or any body. After the window a new approval is needed."""
    approvals = ApprovalClient(collector["url"], agent_token, timeout_s=30, grant_window_s=12)
    enforcer.configure(upstream, policy=PolicyEngine.from_text(POLICY), approvals=approvals)
    env = {"WARDEN_COLLECTOR": collector["url"], "WARDEN_TOKEN": collector["approver"]}
    seen = {a["id"] for a in (lambda j: j.get("items", j) if isinstance(j, dict) else j)(
        json.loads(_cli("warden", "approvals", "list", "--json", env=env)))}

    thread, result = _post_in_background(enforcer.url, b"", "/refunds?order=3")
    first = _pending(env, seen)
    assert first["statement"] == "POST api/refunds?order=3"          # the approver sees the query
    _cli("warden", "approvals", "approve", first["id"], "--reason", "ticket CHG-78", env=env)
    thread.join(30)
    assert result["response"].status_code == 200
    granted_at = time.monotonic()

    enforcer.sink.clear()
    with httpx.Client(base_url=enforcer.url, headers={"Host": "api"}, timeout=20) as client:
        again = client.post("/refunds?order=3")
    assert again.status_code == 200 and time.monotonic() - granted_at < 12
    assert enforcer.sink.of("approval.requested") == []           # no new approval was asked for
    reasons = [d["reason"] for d in enforcer.sink.of("policy.decision")]
    assert reasons and first["id"] in reasons[-1] and "alice.approver" in reasons[-1], reasons
    assert "grant_window" in reasons[-1]

    # within the window still, but not what was approved: asked again, and denied here
    asked = {first["id"]}
    for path, body in (("/refunds?order=4", b""), ("/refunds?order=3", b'{"amount": 5000}')):
        thread, result = _post_in_background(enforcer.url, body, path)
        other = _pending(env, seen | asked)
        asked.add(other["id"])
        _cli("warden", "approvals", "deny", other["id"], "--reason", "not approved", env=env)
        thread.join(30)
        assert result["response"].status_code == 403, path
    assert time.monotonic() - granted_at < 12, "the window ended before the repeats were tried"

    time.sleep(max(0.0, 12.2 - (time.monotonic() - granted_at)))
    thread, result = _post_in_background(enforcer.url, b"", "/refunds?order=3")
    later = _pending(env, seen | asked)                          # the window is over: asked again
    _cli("warden", "approvals", "deny", later["id"], "--reason", "once was enough", env=env)
    thread.join(30)
    assert result["response"].status_code == 403


PG_POLICY = """
@id("billing-writes")
permit(principal == Service::"billing", action, resource in Target::"db");

@id("deletes-need-approval")
@approval("required")
forbid(principal, action == Action::"pg:delete", resource in Target::"db") unless { context.approved };
"""


class _Recorded(list):
    def emit(self, event_type, fields, session_id=None):
        self.append((event_type, dict(fields)))


def test_grant_window_covers_only_the_statement_the_approver_saw(collector, agent_token):
    """A grant covers a repeat of the same text: `WHERE id = 1` approved does not cover `id = 2`,
    although both have one fingerprint."""
    from enforcer.context import ConnectionContext, TargetInfo
    engine = PolicyEngine.from_text(PG_POLICY)
    approvals = ApprovalClient(collector["url"], agent_token, timeout_s=30, grant_window_s=30)
    env = {"WARDEN_COLLECTOR": collector["url"], "WARDEN_TOKEN": collector["approver"]}
    seen = {a["id"] for a in (lambda j: j.get("items", j) if isinstance(j, dict) else j)(
        json.loads(_cli("warden", "approvals", "list", "--json", env=env)))}
    sink = _Recorded()
    ctx = ConnectionContext(session_id="s-grant", identity="billing", identity_attrs={},
                            target=TargetInfo("db", "postgres", "127.0.0.2", 5432), attribution=None, sink=sink)

    def ask(sql: str):
        [item] = engine.decide_sql("billing", {}, "db", sql)
        assert item.decision.kind == "approval"
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(d=asyncio.run(approvals.request(ctx, item))))
        thread.start()
        return thread, result

    thread, result = ask("DELETE FROM invoices WHERE id = 1")
    first = _pending(env, seen)
    assert first["statement"] == "DELETE FROM invoices WHERE id = 1"
    _cli("warden", "approvals", "approve", first["id"], "--reason", "CHG-1", env=env)
    thread.join(30)
    assert result["d"].kind == "allow"

    thread, result = ask("DELETE FROM invoices WHERE id = 1")          # the same text: covered
    thread.join(30)
    assert result["d"].kind == "allow" and first["id"] in result["d"].reason

    thread, result = ask("DELETE FROM invoices WHERE id = 2")          # same fingerprint, other row
    other = _pending(env, seen | {first["id"]})
    assert other["statement"] == "DELETE FROM invoices WHERE id = 2"
    _cli("warden", "approvals", "deny", other["id"], "--reason", "not that one", env=env)
    thread.join(30)
    assert result["d"].kind == "deny"
    assert [f["approval_id"] for t, f in sink if t == "approval.requested"] == [first["id"], other["id"]]
