"""Ships spooled record batches to the collector, in order, exactly once in effect.

Each batch is POSTed to ``{collector}/v1/ingest`` with a short-lived EdDSA JWT signed by
the agent key. A batch leaves the spool only after the collector answered 200 (or 409,
"already have it"), so a lost acknowledgement just means the same batch is sent again
and the collector, which deduplicates by (agent, sequence range), keeps one copy.
Failures are retried with exponential backoff and full jitter; nothing is dropped.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import random
import socket
import time
import uuid

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from records.signing import public_key_bytes
from records.spool import Spool

log = logging.getLogger("warden.shipper")

AUDIENCE = "warden-collector"
TOKEN_LIFETIME_S = 300
_ENROLLED_FILE = "enrolled.json"


class EnrollmentError(RuntimeError):
    """The collector refused the enrollment; the message says why."""


class Shipper:
    def __init__(self, spool: Spool, collector_url: str, key: Ed25519PrivateKey,
                 agent_id: str, ca_file: str | None = None,
                 enrollment_token: str | None = None, state_dir: str = "/var/lib/warden",
                 backoff_initial: float = 0.5, backoff_max: float = 30.0,
                 idle_poll: float = 0.2, request_timeout: float = 30.0):
        self.spool = spool
        self.collector_url = collector_url.rstrip("/")
        self.key = key
        self.agent_id = agent_id
        self.ca_file = ca_file
        self.enrollment_token = enrollment_token
        self.state_dir = state_dir
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.idle_poll = idle_poll
        self.request_timeout = request_timeout
        self.sent_batches = 0
        self.failures = 0
        self._client: httpx.AsyncClient | None = None

    # -- helpers -----------------------------------------------------------------------
    def bearer_token(self) -> str:
        now = int(time.time())
        claims = {"iss": self.agent_id, "sub": self.agent_id, "aud": AUDIENCE, "iat": now,
                  "exp": now + TOKEN_LIFETIME_S, "jti": uuid.uuid4().hex}
        return jwt.encode(claims, self.key, algorithm="EdDSA",
                          headers={"kid": self.agent_id})

    def _new_client(self) -> httpx.AsyncClient:
        verify = self.ca_file if self.ca_file else True
        return httpx.AsyncClient(verify=verify, timeout=self.request_timeout)

    def _backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.backoff_max, self.backoff_initial * 2 ** attempt))

    @staticmethod
    async def _sleep_or_stop(stop_event: asyncio.Event, seconds: float) -> None:
        try:
            await asyncio.wait_for(stop_event.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    # -- enrollment --------------------------------------------------------------------
    @property
    def enrolled(self) -> bool:
        return os.path.exists(os.path.join(self.state_dir, _ENROLLED_FILE))

    async def enroll(self) -> None:
        if self.enrolled:
            return
        if not self.enrollment_token:
            raise EnrollmentError("the agent is not enrolled and collector.enrollment has "
                                  "no token; create one with `warden-collector enroll "
                                  "create` and put it in agent.yaml")
        body = {"token": self.enrollment_token, "agent_id": self.agent_id,
                "public_key": base64.b64encode(public_key_bytes(self.key)).decode(),
                "hostname": socket.gethostname()}
        async with self._new_client() as client:
            response = await client.post(f"{self.collector_url}/v1/agents/enroll", json=body)
        if response.status_code >= 500:
            raise httpx.HTTPStatusError(f"collector error {response.status_code} while "
                                        f"enrolling", request=response.request,
                                        response=response)
        if response.status_code not in (200, 201):
            raise EnrollmentError(f"collector refused enrollment of {self.agent_id!r} "
                                  f"({response.status_code}): {response.text[:300]}")
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        record = {"agent_id": self.agent_id, "collector": self.collector_url,
                  "enrolled_at": int(time.time())}
        temp = os.path.join(self.state_dir, _ENROLLED_FILE + ".tmp")
        with open(temp, "w") as handle:
            json.dump(record, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, os.path.join(self.state_dir, _ENROLLED_FILE))
        log.info("enrolled agent %s with %s", self.agent_id, self.collector_url)

    # -- shipping ----------------------------------------------------------------------
    async def run(self, stop_event: asyncio.Event) -> None:
        attempt = 0
        while not stop_event.is_set() and self.enrollment_token and not self.enrolled:
            try:
                await self.enroll()
            except EnrollmentError as exc:
                log.error("%s", exc)
                attempt += 1
                await self._sleep_or_stop(stop_event, self._backoff(attempt))
            except (httpx.HTTPError, OSError) as exc:
                log.warning("enrollment with %s failed: %s; retrying", self.collector_url, exc)
                attempt += 1
                await self._sleep_or_stop(stop_event, self._backoff(attempt))
        attempt = 0
        async with self._new_client() as client:
            self._client = client
            while not stop_event.is_set():
                item = await asyncio.to_thread(self._next_pending)
                if item is None:
                    await self._sleep_or_stop(stop_event, self.idle_poll)
                    continue
                ref, data = item
                if await self._send(client, ref, data):
                    attempt = 0
                    await asyncio.to_thread(self.spool.ack, ref)
                    self.sent_batches += 1
                else:
                    self.failures += 1
                    await self._sleep_or_stop(stop_event, self._backoff(attempt))
                    attempt += 1
        self._client = None

    def _next_pending(self):
        for item in self.spool.pending():
            return item
        return None

    async def _send(self, client: httpx.AsyncClient, ref, data: bytes) -> bool:
        headers = {"Content-Type": "application/octet-stream",
                   "Authorization": f"Bearer {self.bearer_token()}"}
        try:
            response = await client.post(f"{self.collector_url}/v1/ingest", content=data,
                                         headers=headers)
        except httpx.HTTPError as exc:
            log.warning("collector %s unreachable (%s: %s); batch %d stays spooled",
                        self.collector_url, type(exc).__name__, exc, ref.frame_no)
            return False
        if response.status_code == 200 or response.status_code == 409:
            return True
        if response.status_code >= 500:
            log.warning("collector answered %d for batch %d; retrying",
                        response.status_code, ref.frame_no)
        else:
            log.error("collector rejected batch %d with %d: %s - it stays spooled and is "
                      "retried; check the agent's enrollment and clock",
                      ref.frame_no, response.status_code, response.text[:300])
        return False
