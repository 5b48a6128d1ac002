"""Target option durable_before_forward on an HTTP target, with the real RecordWriter: a request
reaches the upstream only once its records are fsync'd in the spool; if they cannot be in time,
the client gets a 503 saying so and the upstream never sees the request."""
from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from tests.gated_records import GatedWriter
from tests.integration.test_http_proxy import Enforcer, _RawUpstream


@pytest.fixture()
def enforcer():
    e = Enforcer()
    yield e
    e.close()


class CountingUpstream:
    """An HTTP/1.1 keep-alive server answering every request `200 ok`, keeping the paths seen."""

    def __init__(self):
        self.paths: list[str] = []

    async def handle(self, reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.paths.append(head.split(b" ", 2)[1].decode())
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


@pytest.mark.parametrize("durable", [True, False])
def test_a_request_reaches_the_upstream_only_after_its_records_are_stored(enforcer, tmp_path, durable):
    records = GatedWriter(tmp_path)
    upstream = CountingUpstream()
    try:
        with _RawUpstream(enforcer, upstream.handle) as port:
            enforcer.configure(port, options={"durable_before_forward": True} if durable else {})
            enforcer.sink = records.writer           # its connections record with the real writer
            with httpx.Client(base_url=enforcer.url, timeout=20) as client:
                assert client.get("/first").text == "ok"
                records.writer.flush()
                records.gate.clear()                 # the disk stops taking batches
                answers = []
                sent = threading.Thread(target=lambda: answers.append(client.get("/held")), daemon=True)
                sent.start()
                time.sleep(0.8)
                if durable:
                    assert upstream.paths == ["/first"] and not answers
                    assert "/held" not in [f["path"] for f in records.stored("http.request")]
                else:
                    assert upstream.paths == ["/first", "/held"]
                records.gate.set()
                sent.join(10)
                assert answers and answers[0].status_code == 200
                assert upstream.paths == ["/first", "/held"]
                records.writer.flush()
                assert "/held" in [f["path"] for f in records.stored("http.request")]
                assert client.post("/after", content=b"x" * 1000).status_code == 200   # a body follows too
            assert upstream.paths[-1] == "/after"
    finally:
        records.close()


def test_a_record_that_cannot_be_stored_in_time_gets_503_and_the_upstream_sees_nothing(enforcer, tmp_path):
    records = GatedWriter(tmp_path)
    upstream = CountingUpstream()
    try:
        with _RawUpstream(enforcer, upstream.handle) as port:
            enforcer.configure(port, options={"durable_before_forward": True, "durable_timeout": 0.5})
            enforcer.sink = records.writer
            with httpx.Client(base_url=enforcer.url, timeout=20) as client:
                assert client.get("/first").status_code == 200
                records.writer.flush()
                records.gate.clear()
                refused = client.get("/never")
                assert refused.status_code == 503
                body = refused.json()
                assert body["error"] == "records_not_durable" and "durable_before_forward" in body["reason"]
                assert refused.headers.get("connection") == "close"
            records.gate.set()
            assert upstream.paths == ["/first"]
    finally:
        records.close()
