"""Human approvals: agents create them and wait; approvers decide with a reason.
State lives only in the database, so any replica can answer a long-poll."""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import uuid

import httpx
from sqlalchemy import Connection, func, select, update

from collector.storage.schema import approvals
from collector.timeparse import format_ns, now_ns

log = logging.getLogger("warden.collector.approvals")
DECISIONS = {"approve": "approved", "deny": "denied"}


class ApprovalError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def approval_dict(row) -> dict:
    return {
        "id": row.id, "agent_id": row.agent_id, "identity": row.identity, "target": row.target,
        "statement": row.statement, "session_id": row.session_id, "status": row.status,
        "created": format_ns(row.created_ns), "created_ns": row.created_ns,
        "expires": format_ns(row.expires_ns), "expires_ns": row.expires_ns,
        "decided": format_ns(row.decided_ns), "decided_by": row.decided_by, "reason": row.reason,
    }


def create_approval(connection: Connection, *, agent_id: str, identity: str | None, target: str | None,
                    statement: str | None, session_id: str | None, timeout_ns: int) -> dict:
    now = now_ns()
    approval_id = uuid.uuid4().hex
    connection.execute(approvals.insert().values(
        id=approval_id, agent_id=agent_id, identity=identity, target=target, statement=statement,
        session_id=session_id, status="pending", created_ns=now, expires_ns=now + timeout_ns))
    return get_approval(connection, approval_id)


def expire_due(connection: Connection) -> int:
    result = connection.execute(update(approvals).where(
        approvals.c.status == "pending", approvals.c.expires_ns <= now_ns()).values(
        status="expired", decided_ns=now_ns(), reason="no decision before the timeout"))
    return result.rowcount


def get_approval(connection: Connection, approval_id: str) -> dict | None:
    row = connection.execute(select(approvals).where(approvals.c.id == approval_id)).first()
    if row is None:
        return None
    item = approval_dict(row)
    if item["status"] == "pending" and row.expires_ns <= now_ns():
        item["status"] = "expired"  # the next write makes it durable
    return item


def list_approvals(connection: Connection, status: str | None = None, limit: int = 200) -> list[dict]:
    query = select(approvals).order_by(approvals.c.created_ns.desc()).limit(min(limit, 1000))
    if status:
        query = query.where(approvals.c.status == status)
    return [approval_dict(r) for r in connection.execute(query)]


def pending_count(connection: Connection) -> int:
    return connection.execute(select(func.count()).select_from(approvals).where(
        approvals.c.status == "pending", approvals.c.expires_ns > now_ns())).scalar_one()


def decide(connection: Connection, approval_id: str, *, decision: str, reason: str, decided_by: str) -> dict:
    if decision not in DECISIONS:
        raise ApprovalError(400, "decision must be 'approve' or 'deny'")
    if not reason or not reason.strip():
        raise ApprovalError(400, "a reason is required")
    expire_due(connection)
    result = connection.execute(update(approvals).where(
        approvals.c.id == approval_id, approvals.c.status == "pending").values(
        status=DECISIONS[decision], decided_ns=now_ns(), decided_by=decided_by, reason=reason.strip()))
    if result.rowcount != 1:
        current = get_approval(connection, approval_id)
        if current is None:
            raise ApprovalError(404, f"no approval {approval_id}")
        raise ApprovalError(409, f"approval {approval_id} is already {current['status']}"
                                 + (f" by {current['decided_by']}" if current["decided_by"] else ""))
    return get_approval(connection, approval_id)


def notify_webhook(url: str | None, secret: str | None, approval: dict) -> None:
    """POST the new approval to a chat bridge, signed with HMAC-SHA256 of the body
    (header X-Warden-Signature: sha256=HEX). Runs in a thread; failures are logged."""
    if not url:
        return
    body = json.dumps({"event": "approval.created", "approval": approval}, sort_keys=True).encode()
    headers = {"Content-Type": "application/json"}
    if secret:
        headers["X-Warden-Signature"] = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()

    def send():
        try:
            httpx.post(url, content=body, headers=headers, timeout=5).raise_for_status()
        except httpx.HTTPError as exc:
            log.warning("approval webhook to %s failed: %s", url, exc)

    threading.Thread(target=send, name="approval-webhook", daemon=True).start()
