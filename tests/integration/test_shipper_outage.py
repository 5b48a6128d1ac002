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
