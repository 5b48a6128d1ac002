"""Collector outage: events written while the ingest endpoint is down all arrive exactly
once after it returns, including batches whose acknowledgement was lost."""

import asyncio
import base64
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.shipper import Shipper
from records.batch import decode_batch
from records.signing import public_key_bytes, public_key_from_bytes
from records.spool import Spool
from records.verifier import verify_batches
from records.writer import RecordWriter

OUTAGE_S = float(os.environ.get("WARDEN_TEST_OUTAGE_S", "6"))
AGENT = "agent-outage"


class Collector:
    """Stores batches as received, deduplicated by (agent, first_seq, last_seq)."""

    def __init__(self):
        self.batches = {}          # (agent, first, last) -> bytes
        self.duplicates = 0
        self.drop_responses = 0    # store, then hang up without answering
        self.keys = {}
        self.lock = threading.Lock()
        self.server = None
        self.port = 0

    def start(self):
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/agents/enroll":
                    request = json.loads(body)
                    if request["token"] != "one-time-token":
                        return self.answer(403, {"error": "bad enrollment token"})
                    collector.keys[request["agent_id"]] = base64.b64decode(
                        request["public_key"])
                    return self.answer(200, {"enrolled": True})
                token = self.headers["Authorization"].removeprefix("Bearer ")
                agent = jwt.decode(token, options={"verify_signature": False})["sub"]
                key = collector.keys.get(agent)
                if key is None:
                    return self.answer(401, {"error": "unknown agent"})
                claims = jwt.decode(token, public_key_from_bytes(key), algorithms=["EdDSA"],
                                    audience="warden-collector")
                assert claims["iss"] == agent
                assert self.headers["Content-Type"] == "application/octet-stream"
                batch = decode_batch(body)
                range_key = (batch.agent_id, batch.first_seq, batch.last_seq)
                with collector.lock:
                    duplicate = range_key in collector.batches
                    if duplicate:
                        collector.duplicates += 1
                    else:
                        collector.batches[range_key] = body
                    drop = collector.drop_responses > 0
                    if drop:
                        collector.drop_responses -= 1
                if drop:
                    self.close_connection = True
                    return                    # the acknowledgement is lost
                self.answer(200, {"accepted": True, "duplicate": duplicate,
                                  "last_seq": batch.last_seq})

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def seqs(self):
        with self.lock:
            return sorted(seq for (_, first, last) in self.batches
                          for seq in range(first, last + 1))


@pytest.mark.timeout(120)
def test_outage_then_everything_arrives_exactly_once(tmp_path):
    key = Ed25519PrivateKey.generate()
    collector = Collector()
    collector.start()
    spool = Spool(str(tmp_path / "spool"))
    writer = RecordWriter(AGENT, key, str(tmp_path / "state"), spool,
                          batch_max_events=20, batch_max_delay=0.05)
    shipper = Shipper(spool, f"http://127.0.0.1:{collector.port}", key, AGENT,
                      enrollment_token="one-time-token", state_dir=str(tmp_path / "state"),
                      backoff_initial=0.1, backoff_max=1.0, idle_poll=0.05)
    total = 0

    async def emit_for(seconds, per_tick=10):
        nonlocal total
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            for _ in range(per_tick):
                total += 1
                writer.emit("pg.statement", {"text": f"SELECT {total}", "kind": "select"},
                            session_id="0190a0b0-0000-7000-8000-00000000abcd")
            await asyncio.sleep(0.05)

    async def scenario():
        stop = asyncio.Event()
        task = asyncio.create_task(shipper.run(stop))
        await emit_for(1.0)
        await asyncio.to_thread(collector.stop)          # outage begins
        await emit_for(OUTAGE_S)
        backlog = spool.pending_count
        collector.drop_responses = 3                      # first answers after it returns
        await asyncio.to_thread(collector.start)          # same port
        await emit_for(1.0)
        await asyncio.to_thread(writer.flush)
        for _ in range(400):
            if spool.pending_count == 0 and len(collector.seqs()) == total:
                break
            await asyncio.sleep(0.05)
        stop.set()
        await task
        return backlog

    try:
        backlog = asyncio.run(scenario())
    finally:
        writer.close()
        collector.stop()
        spool.close()

    assert shipper.enrolled and collector.keys[AGENT] == public_key_bytes(key)
    assert backlog > 0                                   # events piled up during the outage
    assert shipper.failures > 0
    assert collector.duplicates >= 3                     # retried after lost acks ...
    assert collector.seqs() == list(range(1, total + 1))  # ... yet stored exactly once
    stored = [collector.batches[k] for k in sorted(collector.batches, key=lambda k: k[1])]
    report = verify_batches(stored, {AGENT: collector.keys[AGENT]})
    assert report.ok, report.problems
    assert report.events_checked == total
    assert spool.pending_count == 0


# ------------------------------------------------------------------------------------------
# The real collector: what it refuses stays in the spool, is alerted, and is not hammered
# ------------------------------------------------------------------------------------------
def _counter(url: str, name: str, **labels) -> float:
    import httpx
    want = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def _alerts_at(collector, token: str) -> list[dict]:
    import httpx
    got = httpx.get(collector.url + "/v1/events", params={"type": "agent.alert", "limit": 1000},
                    headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
    return [item["fields"] for item in got["items"]]


def _ship_for(shipper, seconds: float, until=None):
    async def scenario():
        stop = asyncio.Event()
        task = asyncio.create_task(shipper.run(stop))
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end and not (until and until()):
            assert not task.done(), task.exception() if task.done() else None
            await asyncio.sleep(0.05)
        stop.set()
        await task

    asyncio.run(scenario())


@pytest.mark.timeout(120)
def test_a_conflicting_batch_stays_spooled_is_alerted_and_not_retried_in_a_loop(tmp_path):
    """Bug fix: the collector's 409 (it holds a different batch for the same sequence range: a
    fork of the chain) was taken as an acknowledgement, and the forked batch deleted."""
    from tests.collectorproc import CollectorProcess
    collector = CollectorProcess().start()
    try:
        key = Ed25519PrivateKey.generate()
        shipper_state = str(tmp_path / "shipper")
        # the agent's first life: seq 1..3 reach the collector
        spool_a = Spool(str(tmp_path / "a" / "spool"))
        writer_a = RecordWriter(AGENT, key, str(tmp_path / "a" / "state"), spool_a, batch_max_events=3)
        for n in range(3):
            writer_a.emit("pg.statement", {"text": f"SELECT {n}"})
        writer_a.close()
        first = Shipper(spool_a, collector.url, key, AGENT, enrollment_token=collector.enrollment(),
                        state_dir=shipper_state, backoff_initial=0.05, backoff_max=0.2, idle_poll=0.05)
        _ship_for(first, 30, until=lambda: spool_a.pending_count == 0)
        assert spool_a.pending_count == 0 and first.sent_batches == 1
        # its chain head lost: the same key numbers different events 1..3 again (a fork)
        spool_b = Spool(str(tmp_path / "b" / "spool"))
        writer_b = RecordWriter(AGENT, key, str(tmp_path / "b" / "state"), spool_b, batch_max_events=3,
                                batch_max_delay=0.05)
        for n in range(3):
            writer_b.emit("pg.statement", {"text": f"DELETE FROM customers -- {n}"})
        writer_b.emit("pg.statement", {"text": "SELECT 4"})
        writer_b.flush()
        forked = next(ref for ref, _ in spool_b.pending())
        shipper = Shipper(spool_b, collector.url, key, AGENT, state_dir=shipper_state,
                          backoff_initial=0.05, backoff_max=0.2, idle_poll=0.05)
        shipper.park_retry = 60
        shipper.on_alert = lambda fields: writer_b.emit("agent.alert", fields)
        rejected_before = _counter(collector.url, "warden_collector_ingest_batches_total", result="rejected")
        auditor = collector.token("auditor", "test")
        _ship_for(shipper, 4, until=lambda: any(a.get("kind") == "batch_conflict"
                                               for a in _alerts_at(collector, auditor)))
        _ship_for(shipper, 1.5)                  # and a while longer: no retry loop on the 409
        # the forked batch is still in the spool, set aside; the ones after it were shipped
        assert [ref.frame_no for ref, _ in spool_b.pending()] == [forked.frame_no]
        rejected = _counter(collector.url, "warden_collector_ingest_batches_total", result="rejected")
        assert rejected - rejected_before == 1
        conflict = [a for a in _alerts_at(collector, auditor) if a.get("kind") == "batch_conflict"]
        assert len(conflict) == 1 and conflict[0]["severity"] == "critical"
        assert conflict[0]["detail"]["status"] == 409
        assert (conflict[0]["detail"]["first_seq"], conflict[0]["detail"]["last_seq"]) == (1, 3)
        writer_b.close()
        spool_a.close()
        spool_b.close()
    finally:
        collector.cleanup()


@pytest.mark.timeout(120)
def test_a_batch_the_collector_refuses_stays_spooled_and_is_alerted(tmp_path):
    """A 4xx other than 401/408/409/429 was logged and retried silently for ever."""
    from tests.collectorproc import CollectorProcess
    collector = CollectorProcess().start()
    try:
        key = Ed25519PrivateKey.generate()
        spool = Spool(str(tmp_path / "spool"))
        writer = RecordWriter(AGENT, key, str(tmp_path / "state"), spool, batch_max_delay=0.05)
        writer.emit("pg.statement", {"text": "SELECT 1"})
        writer.flush()
        bad = spool.append(b"\x28\xb5\x2f\xfd not a batch")      # undecodable: 400
        writer.emit("pg.statement", {"text": "SELECT 2"})
        writer.flush()
        shipper = Shipper(spool, collector.url, key, AGENT, enrollment_token=collector.enrollment(),
                          state_dir=str(tmp_path / "shipper"), backoff_initial=0.05, backoff_max=0.2,
                          idle_poll=0.05)
        shipper.park_retry = 60
        shipper.on_alert = lambda fields: writer.emit("agent.alert", fields)
        auditor = collector.token("auditor", "test")
        _ship_for(shipper, 10, until=lambda: any(a.get("kind") == "batch_refused"
                                                for a in _alerts_at(collector, auditor)))
        assert [ref.frame_no for ref, _ in spool.pending()] == [bad.frame_no]
        refused = [a for a in _alerts_at(collector, auditor) if a.get("kind") == "batch_refused"]
        assert len(refused) == 1 and refused[0]["detail"]["status"] == 400
        assert refused[0]["detail"]["frame"] == bad.frame_no
        writer.close()
        spool.close()
    finally:
        collector.cleanup()


@pytest.mark.timeout(60)
def test_a_spool_error_does_not_end_the_shipper(tmp_path, monkeypatch):
    """Bug fix: an OSError acknowledging a batch (the ack file's fsync) ended the shipper task;
    the daemon swallowed the exception at stop and nothing was shipped any more."""
    import errno
    key = Ed25519PrivateKey.generate()
    collector = Collector()
    collector.start()
    spool = Spool(str(tmp_path / "spool"))
    writer = RecordWriter(AGENT, key, str(tmp_path / "state"), spool, batch_max_events=5)
    for n in range(15):
        writer.emit("pg.statement", {"text": f"SELECT {n}"})
    writer.flush()
    real_fsync, failures = os.fsync, {"left": 1}

    def fsync(fd):         # the ack marker's fsync fails once (EIO), nothing else
        if failures["left"] and os.readlink(f"/proc/self/fd/{fd}").endswith("/spool/acked.tmp"):
            failures["left"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    raised = []
    shipper = Shipper(spool, f"http://127.0.0.1:{collector.port}", key, AGENT,
                      enrollment_token="one-time-token", state_dir=str(tmp_path / "state"),
                      backoff_initial=0.05, backoff_max=0.2, idle_poll=0.05)
    shipper.on_alert = raised.append
    try:
        _ship_for(shipper, 20, until=lambda: spool.pending_count == 0)
    finally:
        writer.close()
        collector.stop()
        spool.close()
    assert failures["left"] == 0 and spool.pending_count == 0
    assert collector.seqs() == list(range(1, 16))
    assert [a["kind"] for a in raised] == ["shipper_error"] and "Input/output error" in raised[0]["message"]
