"""A stand-in for an agent's record writer and shipper: seals chained events, signs
batches with records/, and mints the agent's EdDSA tokens. Used by the collector's
tests, its benchmark and demos; the real agent has its own shipper."""
from __future__ import annotations

import base64
import time
import uuid

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from collector.auth import mint_agent_token
from records.batch import build_batch, encode_batch
from records.codec import GENESIS_HASH, seal_event
from records.schema import validate_fields
from records.signing import public_key_bytes

# How enforcer/sqlclass.py classifies a statement by its verb: kind is pglast's node name,
# action what policy decides on; and the command tag Postgres answers it with.
_STATEMENTS = {
    "SELECT": ("SelectStmt", "pg:select", "SELECT 1"),
    "INSERT": ("InsertStmt", "pg:insert", "INSERT 0 1"),
    "UPDATE": ("UpdateStmt", "pg:update", "UPDATE 1"),
    "DELETE": ("DeleteStmt", "pg:delete", "DELETE 1"),
}


class SimulatedAgent:
    def __init__(self, agent_id: str, key: Ed25519PrivateKey | None = None, hostname: str = "host-1"):
        self.agent_id, self.hostname = agent_id, hostname
        self.key = key or Ed25519PrivateKey.generate()
        self.seq, self.prev = 0, GENESIS_HASH

    @property
    def public_key_b64(self) -> str:
        return base64.b64encode(public_key_bytes(self.key)).decode()

    def enroll_body(self, token: str) -> dict:
        return {"token": token, "agent_id": self.agent_id, "public_key": self.public_key_b64,
                "hostname": self.hostname}

    def token(self, lifetime_s: int = 240) -> str:
        return mint_agent_token(self.key, self.agent_id, lifetime_s)

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token()}", "Content-Type": "application/octet-stream"}

    def event(self, event_type: str, fields: dict, sid: str | None = None, ts: int | None = None) -> dict:
        validate_fields(event_type, fields)   # as the agent's record writer does: no made-up names
        self.seq += 1
        sealed = seal_event(self.agent_id, self.seq, ts if ts is not None else time.time_ns(), sid,
                            event_type, fields, self.prev)
        self.prev = sealed["hash"]
        return sealed

    def batch_bytes(self, events: list[dict]) -> bytes:
        return encode_batch(build_batch(self.agent_id, events, self.key))

    def session(self, *, identity: str, target: str, statements: list[tuple[str, list[str]]],
                start_ns: int | None = None, step_ns: int = 1_000_000, decision: str = "allow",
                pid: int = 4242, exe: str = "/usr/bin/psql", unit: str = "billing.service") -> tuple[str, list[dict]]:
        """A Postgres session as an agent records it: start, (statement with its decision,
        result) per statement, end. Statements must start with a verb in _STATEMENTS."""
        sid = uuid.uuid4().hex
        ts = start_ns if start_ns is not None else time.time_ns()
        # the fields agent/daemon.py prepares (process as agent/procinfo.as_record) and the
        # Postgres session adds
        out = [self.event("session.start", {
            "identity": identity, "target": target, "protocol": "postgres", "orig_dst": "127.0.0.2:5432",
            "process": {"pid": pid, "tgid": pid, "uid": 1000, "gid": 1000, "user": "billing",
                        "comm": exe.rsplit("/", 1)[-1][:15], "exe": exe, "cmdline": [exe, "-c", "…"],
                        "cgroup": f"/system.slice/{unit}", "cgroup_id": 1, "unit": unit, "container": "",
                        "start_time": ts / 1e9},
            "client": f"127.0.0.1:{40000 + pid % 20000}", "host": self.hostname, "agent": self.agent_id,
            "database": "app", "auth_user": "app", "application_name": "psql", "tls_client": False,
            "tls_upstream": False, "auth_method": "scram-sha-256"}, sid, ts)]
        for index, (text, tables) in enumerate(statements, start=1):
            kind, action, tag = _STATEMENTS[text.split()[0].upper()]
            allowed = decision == "allow"
            ts += step_ns
            out.append(self.event("pg.statement", {
                "text": text, "params": None, "protocol": "simple", "statement_name": None,
                "statement_index": index, "kind": kind, "action": action, "tables": tables, "functions": [],
                "decision": decision, "policy_ids": ["p1"],
                "reason": "permitted by p1" if allowed else "forbidden by p1"}, sid, ts))
            ts += step_ns
            # a denied statement never runs: the server raises Warden's refusal instead
            error = None if allowed else (f'permission denied by Warden: identity "{identity}" may not perform '
                                          f'{action} on target "{target}" (policy: p1)')
            out.append(self.event("pg.result", {
                "command_tag": tag if allowed else None, "rows": 1 if allowed else 0, "bytes": 64,
                "duration_ns": step_ns, "sqlstate": None if allowed else "42501", "error": error,
                "statement_index": index}, sid, ts))
        ts += step_ns
        out.append(self.event("session.end", {
            "reason": "client_terminated", "duration_ns": ts - out[0]["ts"], "statements": len(statements),
            "requests": 0, "bytes_in": 0, "bytes_out": 0, "error": None, "sqlstate": None}, sid, ts))
        return sid, out
