"""Just-in-time approvals: hold a statement or request until a human at the collector decides.

The enforcer asks when the policy answers "approval"; this client creates the approval at
the collector (authenticated as the agent), tells the client where to approve it, long-polls
for the decision up to `approvals.timeout`, and records every step. No answer, a denial or an
unreachable collector all end in a deny that says which of them it was.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Optional

import httpx

from enforcer.policy.engine import Decision

log = logging.getLogger("warden.approvals")

POLL_SLICE_S = 25.0      # one long-poll; the collector caps a single wait itself


def format_params(params: list) -> str:
    """A Bind's parameters as the approver reads them: $1 = '42', $2 = NULL."""
    return ", ".join(f"${i} = " + ("NULL" if v is None else "'" + str(v).replace("'", "''") + "'")
                     for i, v in enumerate(params, 1)) or "none"


class ApprovalClient:
    def __init__(self, collector_url: str, token_source: Callable[[], str], timeout_s: float = 300.0,
                 ca_file: Optional[str] = None, grant_window_s: float = 0.0):
        self.url = collector_url.rstrip("/")
        self.token_source = token_source
        self.timeout_s = timeout_s
        self.grant_window_s = grant_window_s
        self._verify = ca_file if ca_file else True
        # (identity, target, exact statement or request line) -> (expiry (monotonic), approval id,
        # approver): a repeat within approvals.grant_window is allowed on that approval and its
        # record says which. Exact, because the approver approved those values: a fingerprint
        # would let `WHERE id = 1` cover every other id.
        self._grants: dict[tuple, tuple[float, str, str]] = {}

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token_source()}"}

    def _granted(self, key: tuple) -> Optional[tuple[str, str]]:
        """(approval id, approver) of an approval of this statement still within the grant window."""
        grant = self._grants.get(key)
        if grant is None:
            return None
        if grant[0] < time.monotonic():
            del self._grants[key]
            return None
        return grant[1], grant[2]

    async def request(self, ctx, statement_decision, params: Optional[list] = None,
                      params_key: Optional[str] = None, statement_index: Optional[int] = None) -> Decision:
        """For a Postgres statement whose policy decision is "approval". `params`: one execution
        (Bind) of a prepared statement, its parameters as recorded (masked), shown to the
        approver; `params_key` identifies the values as sent, so a grant covers only them."""
        statement, decision = statement_decision.statement, statement_decision.decision
        line = text = statement.text
        executes = getattr(statement, "executes", None)
        if executes is not None:
            # an SQL EXECUTE: the approver sees what it runs, and a grant covers only that
            line = f"{statement.text} -- prepared statement {statement.prepared_name}: {executes}"
            text = line
        if ctx.masking is not None and hasattr(ctx.masking, "mask_text"):
            text, _count = ctx.masking.mask_text(text)
        key: tuple = (ctx.identity, ctx.target.name, line)
        if params is not None:
            # the approver approves these values, not the statement with any values
            text += " -- parameters: " + format_params(params)
            key += ("params", params_key if params_key is not None else tuple(params))
        resource = ",".join(statement.tables) or ctx.target.name
        return await self._ask(ctx, decision, text, resource, key=key, statement_index=statement_index)

    async def request_http(self, ctx, decision: Decision, method: str, host: str, path: str,
                           query: str = "", shown_query: Optional[str] = None, has_body: bool = False) -> Decision:
        """For an HTTP request whose policy decision is "approval". The approver sees the query
        as recorded (`shown_query`, after redact_query); a request with a body is never covered
        by an earlier grant, since no approver saw that body."""
        shown = query if shown_query is None else shown_query
        summary = f"{method} {host}{path}" + (f"?{shown}" if shown else "")
        line = f"{method} {host}{path}" + (f"?{query}" if query else "")
        key = None if has_body else (ctx.identity, ctx.target.name, line)
        return await self._ask(ctx, decision, summary, f"{host}{path}", key=key)

    async def _ask(self, ctx, decision: Decision, summary: str, resource: str, key: Optional[tuple],
                   statement_index: Optional[int] = None) -> Decision:
        granted = self._granted(key) if self.grant_window_s > 0 and key is not None else None
        if granted is not None:
            return Decision("allow", decision.action, decision.policy_ids,
                            f"approval {granted[0]} by {granted[1]} covers this repeat "
                            f"(within approvals.grant_window of {self.grant_window_s:g} s)", decision.resources)
        started = time.monotonic()
        try:
            async with httpx.AsyncClient(verify=self._verify, timeout=10.0) as client:
                resp = await client.post(f"{self.url}/v1/approvals", headers=self._headers(), json={
                    "identity": ctx.identity, "target": ctx.target.name, "statement": summary,
                    "session_id": ctx.session_id, "timeout_s": self.timeout_s})
                if resp.status_code >= 300:
                    return self._unavailable(ctx, decision, f"the collector refused the approval request "
                                                           f"({resp.status_code}: {resp.text[:200]})")
                approval = resp.json()
                approval_id = approval["id"]
                requested = {"approval_id": approval_id, "identity": ctx.identity, "action": decision.action,
                             "resource": resource, "summary": summary, "timeout_s": self.timeout_s}
                if statement_index is not None:
                    requested["statement_index"] = statement_index    # the execution it holds
                ctx.emit("approval.requested", requested)
                notify = ctx.extra.get("notify_client")
                if notify is not None:
                    notify(f"Warden: this needs an approval ({decision.action} on {resource}). "
                           f"Approval id {approval_id}; an approver runs: "
                           f"warden approvals approve {approval_id} --reason \"...\". Waiting up to "
                           f"{int(self.timeout_s)} s.")
                deadline = started + self.timeout_s
                while approval.get("status") == "pending":
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    wait = min(POLL_SLICE_S, remaining)
                    try:
                        resp = await client.get(f"{self.url}/v1/approvals/{approval_id}", headers=self._headers(),
                                                params={"wait": f"{wait:.1f}"}, timeout=wait + 10)
                    except httpx.HTTPError as exc:
                        log.warning("approval %s: poll failed (%s), retrying", approval_id, exc)
                        await asyncio.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
                        continue
                    if resp.status_code == 200:
                        approval = resp.json()
        except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
            return self._unavailable(ctx, decision, f"the collector could not be reached ({exc})")

        status = approval.get("status")
        latency = int((time.monotonic() - started) * 1e9)
        if status in ("approved", "denied"):
            approver, why = approval.get("decided_by"), approval.get("reason")
            ctx.emit("approval.decided", {"approval_id": approval_id, "decision": status,
                                          "approver": approver, "reason": why, "latency_ns": latency,
                                          "summary": summary})
            if status == "denied":
                return Decision("deny", decision.action, decision.policy_ids,
                                f"approval {approval_id} denied by {approver}: {why}", decision.resources)
            if self.grant_window_s > 0 and key is not None:
                self._grants[key] = (time.monotonic() + self.grant_window_s, approval_id, approver)
            return Decision("allow", decision.action, decision.policy_ids,
                            f"approved by {approver}: {why}", decision.resources)
        ctx.emit("approval.expired", {"approval_id": approval_id, "timeout_s": self.timeout_s, "summary": summary})
        return Decision("deny", decision.action, decision.policy_ids,
                        f"approval {approval_id} was not decided within {int(self.timeout_s)} s "
                        f"(approvals.timeout); retry once an approver is available", decision.resources)

    def _unavailable(self, ctx, decision: Decision, why: str) -> Decision:
        log.error("approval needed but %s; check collector.url and the agent's access to the collector", why)
        ctx.emit("agent.alert", {"kind": "approval_unavailable", "severity": "error", "message": why})
        return Decision("deny", decision.action, decision.policy_ids,
                        f"approval required but {why}; it was denied", decision.resources)
