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
from records.signing import public_key_bytes


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
        result) per statement, end."""
        sid = uuid.uuid4().hex
        ts = start_ns if start_ns is not None else time.time_ns()
        out = [self.event("session.start", {
            "identity": identity, "target": target, "host": self.hostname, "protocol": "postgres",
            "process": {"pid": pid, "exe": exe, "cmdline": [exe, "-c", "…"], "uid": 1000, "user": "billing",
                        "unit": unit}, "dst": "127.0.0.2:5432", "auth_user": "app"}, sid, ts)]
        for text, tables in statements:
            ts += step_ns
            kind = text.split()[0].lower()
            out.append(self.event("pg.statement", {"text": text, "params": [], "kind": kind, "tables": tables,
                                                    "functions": [], "decision": decision, "policy_ids": ["p1"]},
                                  sid, ts))
            ts += step_ns
            out.append(self.event("pg.result", {"command_tag": f"{kind.upper()} 1", "rows": 1, "bytes": 64},
                                  sid, ts))
        ts += step_ns
        out.append(self.event("session.end", {"reason": "client closed"}, sid, ts))
        return sid, out
