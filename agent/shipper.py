"""Ships spooled record batches to the collector, in order, exactly once in effect.

Each batch is POSTed to ``{collector}/v1/ingest`` with a short-lived EdDSA JWT signed by
the agent key. A batch leaves the spool only after the collector answered 200 (stored, or
an exact duplicate of what it has), so a lost acknowledgement just means the same batch is
sent again and the collector, which deduplicates by (agent, sequence range), keeps one copy.
Unreachable collector, 5xx, 401, 408 and 429: the same batch is retried with exponential
backoff and full jitter; nothing is dropped.

A batch the collector refuses for what it is stays in the spool (it is evidence) and is set
aside: 409 (it holds another batch for the same sequence range: a fork) raises an
``agent.alert`` ``batch_conflict``; 400, 413 and 422 (undecodable, too large, bad signature)
a ``batch_refused``. The batches after it are shipped meanwhile (so that the alerts reach
the collector), and it is offered again every ``park_retry`` seconds. Any other 4xx is
about the agent, not the batch (403: not this agent's key): ``batch_refused`` once, and the
batch is retried in order with backoff. An alert is raised once per batch and kind until a
batch is accepted again, so batches that carry only such alerts cannot feed a loop.
Errors of the spool itself (an OSError reading or acknowledging) raise ``shipper_error``
and are retried with backoff: the shipping loop never ends before it is stopped.
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
# answers that say the batch itself will not be taken as it is: set it aside, ship the rest
_REFUSED_BATCH = {400, 413, 422}
# answers that are worth the same request again later (auth/clock, overload)
_TRANSIENT = {401, 408, 429}


class EnrollmentError(RuntimeError):
    """The collector refused the enrollment; the message says why."""


class Shipper:
    def __init__(self, spool: Spool, collector_url: str, key: Ed25519PrivateKey,
                 agent_id: str, ca_file: str | None = None,
                 enrollment_token: str | None = None, state_dir: str = "/var/lib/warden",
                 backoff_initial: float = 0.5, backoff_max: float = 30.0,
                 idle_poll: float = 0.2, request_timeout: float = 30.0,
                 park_retry: float = 300.0, on_alert=None):
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
        self.park_retry = park_retry
        self.on_alert = on_alert        # callable(fields) recording an agent.alert
        self.sent_batches = 0
        self.failures = 0
        self.parked: dict[int, float] = {}     # frame no -> monotonic time of the next offer
        self._alerted: set[tuple] = set()       # (kind, frame no): once per set-aside batch
        self._alerted_kinds: set[str] = set()   # kinds raised since a batch was last accepted
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
        while not stop_event.is_set():
            try:
                client = self._new_client()
            except Exception as exc:         # e.g. the CA file unreadable: retried, never fatal
                self._shipping_failed(exc)
                await self._sleep_or_stop(stop_event, self._backoff(attempt))
                attempt += 1
                continue
            async with client:
                self._client = client
                await self._ship(client, stop_event)
            self._client = None

    async def _ship(self, client: httpx.AsyncClient, stop_event: asyncio.Event) -> None:
        attempt = 0
        while not stop_event.is_set():
            try:
                item = await asyncio.to_thread(self._next_pending)
                if item is None:
                    await self._sleep_or_stop(stop_event, self.idle_poll)
                    continue
                ref, data = item
                outcome, status, detail = await self._send(client, ref, data)
                if outcome == "ok":
                    await asyncio.to_thread(self.spool.ack, ref)
                    self.parked.pop(ref.frame_no, None)
                    self.sent_batches += 1
                    self._alerted = {key for key in self._alerted if key[1] != ref.frame_no}
                    self._alerted_kinds.clear()
                    attempt = 0
                    continue
                self.failures += 1
                if outcome in ("park", "agent"):
                    if outcome == "park":
                        self.parked[ref.frame_no] = time.monotonic() + self.park_retry
                    self._batch_alert(ref, data, status, detail)
                await self._sleep_or_stop(stop_event, self._backoff(attempt))
                attempt += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:      # the spool failing (OSError), or a bug: go on
                self._shipping_failed(exc)
                await self._sleep_or_stop(stop_event, self._backoff(attempt))
                attempt += 1

    def _shipping_failed(self, exc: Exception) -> None:
        self.failures += 1
        log.error("shipping failed: %s: %s; retrying", type(exc).__name__, exc,
                  exc_info=not isinstance(exc, OSError))
        self._alert(None, {
            "kind": "shipper_error", "severity": "error",
            "message": f"shipping records to {self.collector_url} failed "
                       f"({type(exc).__name__}: {exc}); retrying with backoff",
            "detail": {"error": f"{type(exc).__name__}: {exc}"}})

    def _next_pending(self):
        """The oldest unacknowledged frame not set aside (or whose next offer is due)."""
        now = time.monotonic()
        for ref in self.spool.pending_refs():
            due = self.parked.get(ref.frame_no)
            if due is not None and due > now:
                continue
            data = self.spool.read(ref)
            if data is None:
                continue          # acknowledged and deleted meanwhile
            return ref, data
        return None

    def _alert(self, key: tuple | None, fields: dict) -> None:
        """Record an agent.alert: once per key (a set-aside batch) for the whole run, and once
        per kind until a batch is accepted again (batches made of these alerts may be refused
        the same way: no loop)."""
        if key in self._alerted or fields["kind"] in self._alerted_kinds:
            return
        if key is not None:
            self._alerted.add(key)
        self._alerted_kinds.add(fields["kind"])
        if self.on_alert is None:
            return
        try:
            self.on_alert(fields)
        except Exception as exc:        # records full or closed: the log still says it
            log.error("could not record the alert %s: %s", fields["kind"], exc)

    def _batch_alert(self, ref, data: bytes, status: int, detail: str) -> None:
        seqs = _seq_range(data)
        what = f"batch {seqs}" if seqs else f"spool frame {ref.frame_no}"
        if status == 409:
            fields = {"kind": "batch_conflict", "severity": "critical",
                      "message": f"the collector holds a different batch for {what} (409: a fork "
                                 f"of the record chain); this batch stays in the spool, is offered "
                                 f"again every {self.park_retry:g} s, and later batches are "
                                 f"shipped meanwhile",
                      "detail": {"status": status, "frame": ref.frame_no, "collector": detail}}
            key = ("batch_conflict", ref.frame_no)
        else:
            parked = status in _REFUSED_BATCH
            fields = {"kind": "batch_refused", "severity": "critical" if parked else "error",
                      "message": f"the collector refused {what} with {status}: {detail}; "
                                 + ("it stays in the spool, is offered again every "
                                    f"{self.park_retry:g} s, and later batches are shipped meanwhile"
                                    if parked else "it stays in the spool and is retried with backoff"),
                      "detail": {"status": status, "frame": ref.frame_no, "collector": detail}}
            key = ("batch_refused", ref.frame_no) if parked else None
        if seqs:
            fields["detail"]["first_seq"], fields["detail"]["last_seq"] = seqs
        self._alert(key, fields)

    async def _send(self, client: httpx.AsyncClient, ref, data: bytes) -> tuple[str, int, str]:
        """("ok" | "retry" | "park" | "agent", HTTP status or 0, what the collector said)."""
        headers = {"Content-Type": "application/octet-stream",
                   "Authorization": f"Bearer {self.bearer_token()}"}
        try:
            response = await client.post(f"{self.collector_url}/v1/ingest", content=data,
                                         headers=headers)
        except httpx.HTTPError as exc:
            log.warning("collector %s unreachable (%s: %s); batch %d stays spooled",
                        self.collector_url, type(exc).__name__, exc, ref.frame_no)
            return "retry", 0, str(exc)
        status = response.status_code
        if status == 200:
            return "ok", status, ""
        detail = _detail(response)
        if status >= 500 or status in _TRANSIENT:
            level = logging.ERROR if status == 401 else logging.WARNING
            log.log(level, "collector answered %d for batch %d (%s); it stays spooled and is "
                           "retried%s", status, ref.frame_no, detail,
                    "; check the agent's enrollment and clock" if status == 401 else "")
            return "retry", status, detail
        if status == 409 or status in _REFUSED_BATCH:
            log.critical("collector refused batch %d with %d: %s - it stays in the spool, set "
                         "aside; later batches are shipped", ref.frame_no, status, detail)
            return "park", status, detail
        log.error("collector rejected batch %d with %d: %s - it stays spooled and is retried",
                  ref.frame_no, status, detail)
        return "agent", status, detail


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
        if isinstance(body, dict) and "detail" in body:
            return str(body["detail"])[:300]
    except ValueError:
        pass
    return response.text[:300]


def _seq_range(data: bytes):
    """(first seq, last seq) of a spooled batch, or None if it does not decode."""
    from records.batch import BatchFormatError, decode_batch
    try:
        batch = decode_batch(data)
    except (BatchFormatError, ValueError):
        return None
    return batch.first_seq, batch.last_seq
