"""The Postgres shell's hold for durable_before_forward, after the hand-over: server bytes wait
for their records in order, a later hold gets its own time, an answer about bytes already
released changes nothing, and a hold nobody answers ends the session with 53100."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from enforcer.postgres import protocol as P
from enforcer.postgres.proxy import _Connection
from enforcer.postgres.session import PostgresSession


class Transport:
    def __init__(self):
        self.written: list[bytes] = []
        self.paused = False

    def write(self, data):
        self.written.append(bytes(data))

    def writelines(self, parts):
        self.written.extend(bytes(p) for p in parts)

    def is_closing(self):
        return False

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False


def held_connection(timeout: float):
    """A connection after the hand-over holding only what the hold uses; its writer's answers
    are the callbacks in `asked`, answered by the test."""
    asked: list = []
    events: list = []
    session = PostgresSession(identity="svc", target="db")
    session.feed_client(P.build_startup_message({"user": "alice", "database": "app"}))
    session.feed_server(P.build_authentication_ok() + P.build_ready_for_query("I"))
    conn = object.__new__(_Connection)
    conn.ctx = SimpleNamespace(when_durable=asked.append, emit=lambda t, f: events.append(t))
    conn.session = session
    conn.durable_first, conn.durable_timeout = True, timeout
    conn._held_for_records, conn._held_total, conn._released_total = [], 0, 0
    conn._records_timer, conn._records_failed, conn._finish_after_release = None, False, None
    conn.swriter, conn.cwriter = SimpleNamespace(transport=Transport()), SimpleNamespace(transport=Transport())
    conn._paused = ({}, {})
    conn._done = asyncio.get_running_loop().create_future()
    conn.closing = False
    return conn, asked, events


async def settle():
    for _ in range(3):
        await asyncio.sleep(0)


def test_held_bytes_go_in_order_and_a_later_hold_gets_its_own_time():
    async def run():
        conn, asked, _ = held_connection(timeout=0.3)
        conn._write([b"Q1"], [b"to-client"])
        assert conn.cwriter.transport.written == [b"to-client"]         # the client's side is not held
        conn._write([b"Q2", b"Q3"], [])
        assert conn.swriter.transport.written == [] and conn.cwriter.transport.paused
        await asyncio.sleep(0.25)
        asked[0](None)                                                   # Q1's records are stored
        await settle()
        assert conn.swriter.transport.written == [b"Q1"] and conn.cwriter.transport.paused
        await asyncio.sleep(0.2)          # past Q1's deadline: Q2 and Q3 were given time anew
        assert not conn._done.done()
        asked[0](None)                    # a repeated answer about Q1 changes nothing
        asked[1](None)
        await settle()
        assert conn.swriter.transport.written == [b"Q1", b"Q2", b"Q3"]
        assert not conn.cwriter.transport.paused and not conn._done.done()
    asyncio.run(run())


def test_a_hold_nobody_answers_ends_the_session_with_53100_and_forwards_nothing():
    async def run():
        conn, asked, events = held_connection(timeout=0.2)
        conn._write([b"Q1"], [])
        assert await asyncio.wait_for(conn._done, 2) == "records_not_durable"
        assert conn.swriter.transport.written == []
        messages, _ = P.split_messages(b"".join(conn.cwriter.transport.written))
        assert messages[-1][0] == b"E" and P.parse_error_fields(messages[-1][1])["C"] == "53100"
        assert "session.end" in events
        asked[0](None)                    # too late: still nothing forwarded
        await settle()
        assert conn.swriter.transport.written == []
    asyncio.run(run())


def test_a_writer_error_ends_the_session_at_once():
    from records.writer import RecordsNotDurable

    async def run():
        conn, asked, _ = held_connection(timeout=5)
        conn._write([b"Q1"], [])
        asked[0](RecordsNotDurable("the spool failed"))
        assert await asyncio.wait_for(conn._done, 2) == "records_not_durable"
        assert conn.swriter.transport.written == []
        assert b"the spool failed" in b"".join(conn.cwriter.transport.written)
    asyncio.run(run())
