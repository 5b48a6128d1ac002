"""Forged, replayed, rewritten, oversize and malformed input at the collector, and hostile query
parameters: each is refused or neutral, and nothing of it is stored (issue 10, item 5)."""
from __future__ import annotations

import os

import msgpack
import zstandard
from sqlalchemy import text

from collector.app import MAX_BATCH_BYTES
from collector.simulate import SimulatedAgent
from records.batch import decode_batch, encode_batch
from tests.unit.test_collector_api import env  # noqa: F401  (the in-process collector fixture)


def stored(env) -> tuple[int, int]:  # noqa: F811
    with env.store.read() as c:
        return (c.execute(text("SELECT count(*) FROM batches")).scalar_one(),
                c.execute(text("SELECT count(*) FROM events")).scalar_one())


def test_token_of_an_agent_that_never_enrolled_is_refused(env):  # noqa: F811
    stranger = SimulatedAgent("never-enrolled")
    _, evs = stranger.session(identity="svc", target="db", statements=[("SELECT 1", [])])
    answer = env.client.post("/v1/ingest", content=stranger.batch_bytes(evs), headers=stranger.headers())
    assert answer.status_code == 401
    assert stored(env) == (0, 0)


def test_rewritten_event_in_a_signed_batch_is_refused(env):  # noqa: F811
    agent = SimulatedAgent("agent-rw")
    env.enroll(agent)
    _, evs = agent.session(identity="svc", target="db", statements=[("SELECT * FROM customers", [])])
    batch = decode_batch(agent.batch_bytes(evs))
    for event in batch.events:
        if event["type"] == "pg.statement":
            event["f"]["text"] = "SELECT 1"        # hide what was really read; keep the signature
    answer = env.client.post("/v1/ingest", content=encode_batch(batch), headers=agent.headers())
    assert answer.status_code == 422
    assert stored(env) == (0, 0)


def test_replayed_batches_are_neutral(env):  # noqa: F811
    agent = SimulatedAgent("agent-rp")
    env.enroll(agent)
    _, first = agent.session(identity="svc", target="db", statements=[("SELECT 1", [])])
    raw_first = agent.batch_bytes(first)
    assert env.client.post("/v1/ingest", content=raw_first, headers=agent.headers()).status_code == 200
    _, second = agent.session(identity="svc", target="db", statements=[("SELECT 2", [])])
    assert env.client.post("/v1/ingest", content=agent.batch_bytes(second), headers=agent.headers()).status_code == 200
    before = stored(env)
    # an old batch sent again after newer ones: acknowledged as a duplicate, stored once
    again = env.client.post("/v1/ingest", content=raw_first, headers=agent.headers())
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert stored(env) == before


def test_oversize_bodies_are_refused_unread(env):  # noqa: F811
    agent = SimulatedAgent("agent-big")
    env.enroll(agent)
    body = os.urandom(1024) * (MAX_BATCH_BYTES // 1024 + 1)
    answer = env.client.post("/v1/ingest", content=body, headers=agent.headers())
    assert answer.status_code == 413

    def chunks():          # no Content-Length: the limit holds while streaming
        for _ in range(MAX_BATCH_BYTES // 65536 + 2):
            yield b"\0" * 65536
    answer = env.client.post("/v1/ingest", content=chunks(), headers=agent.headers())
    assert answer.status_code == 413
    assert stored(env) == (0, 0)


def test_malformed_msgpack_and_zstd_are_refused(env):  # noqa: F811
    agent = SimulatedAgent("agent-mal")
    env.enroll(agent)
    zc = zstandard.ZstdCompressor()
    bodies = {
        "random bytes": os.urandom(300),
        "empty": b"",
        "zstd magic then garbage": b"\x28\xb5\x2f\xfd" + os.urandom(64),
        "zstd of invalid msgpack": zc.compress(b"\xc1\xc1\xc1"),
        "zstd of a msgpack list": zc.compress(msgpack.packb([1, 2, 3])),
        "zstd of a map without a header": zc.compress(msgpack.packb({"events": []})),
        "truncated batch": agent.batch_bytes(agent.session(identity="s", target="d",
                                                           statements=[("SELECT 1", [])])[1])[:-20],
    }
    for name, body in bodies.items():
        answer = env.client.post("/v1/ingest", content=body, headers=agent.headers())
        assert answer.status_code in (400, 422), (name, answer.status_code, answer.text)
    assert stored(env) == (0, 0)


def test_hostile_query_parameters_are_neutral(env):  # noqa: F811
    agent = SimulatedAgent("agent-q")
    env.enroll(agent)
    _, evs = agent.session(identity="svc", target="db", statements=[("SELECT * FROM customers", [])])
    assert env.client.post("/v1/ingest", content=agent.batch_bytes(evs), headers=agent.headers()).status_code == 200
    before = stored(env)
    for params in ({"table": "customers' OR '1'='1"}, {"identity": "x\"; DROP TABLE events; --"},
                   {"table": "%"}, {"identity": "' UNION SELECT * FROM tokens --"}):
        answer = env.client.get("/v1/events", params=params, headers=env.auditor)
        assert answer.status_code == 200, params
        body = answer.json()
        items = body.get("events", body.get("items", body)) if isinstance(body, dict) else body
        assert items == [], (params, items)
    for bad_time in ("yesterday; DROP TABLE events", "9" * 40):
        answer = env.client.get("/v1/events", params={"since": bad_time}, headers=env.auditor)
        assert answer.status_code in (400, 422), bad_time
    assert stored(env) == before                    # nothing was dropped or altered


def test_path_traversal_is_neutral(env):  # noqa: F811
    for path in ("/v1/sessions/..%2F..%2Fetc%2Fpasswd", "/v1/sessions/%2e%2e/agents",
                 "/v1/sessions/../../../../etc/passwd", "/v1/approvals/..%2Fverify"):
        answer = env.client.get(path, headers=env.auditor)
        assert answer.status_code in (400, 404), (path, answer.status_code)
        assert "root:" not in answer.text
