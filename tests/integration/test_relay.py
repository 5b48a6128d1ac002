"""The opaque relay (protocol: tcp targets, TLS streams relayed by SNI) over real loopback
sockets: byte counts, and the end reason it records when a side closes or resets."""
from __future__ import annotations

import asyncio
import socket
import struct

from enforcer.relay import relay


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Rig:
    """client socket -> relay (on 127.0.0.1) -> upstream server (on 127.0.0.2)."""

    def __init__(self, upstream_handler):
        self.upstream_handler = upstream_handler
        self.result: asyncio.Future = None
        self.counts = [0, 0]

    async def start(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        self.result = loop.create_future()
        self.upstream = await asyncio.start_server(self.upstream_handler, "127.0.0.2", 0)
        upstream_port = self.upstream.sockets[0].getsockname()[1]

        async def handle(client_reader, client_writer):
            up_reader, up_writer = await asyncio.open_connection("127.0.0.2", upstream_port)
            try:
                self.result.set_result(await relay(client_reader, client_writer, up_reader, up_writer,
                                                   self.counts))
            except Exception as exc:  # noqa: BLE001 - surfaced by the test
                self.result.set_exception(exc)

        self.front = await asyncio.start_server(handle, "127.0.0.1", 0)
        client = socket.socket()
        client.setblocking(False)
        await loop.sock_connect(client, self.front.sockets[0].getsockname())
        return client

    async def outcome(self) -> tuple:
        try:
            return await asyncio.wait_for(self.result, 10)
        finally:
            self.front.close()
            self.upstream.close()


def test_both_sides_closing_is_a_clean_close_with_counts():
    async def upstream(reader, writer):
        data = await reader.read()              # until the client's EOF
        writer.write(data.upper())
        await writer.drain()
        writer.close()

    async def main():
        rig = _Rig(upstream)
        client = await rig.start()
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(client, b"hello relay")
        client.shutdown(socket.SHUT_WR)
        received = b""
        while True:
            chunk = await loop.sock_recv(client, 1024)
            if not chunk:
                break
            received += chunk
        client.close()
        return received, await rig.outcome(), rig.counts

    received, outcome, counts = asyncio.run(main())
    assert received == b"HELLO RELAY"
    assert outcome == ("closed", None)
    assert counts == [11, 11]


def test_a_client_gone_after_its_own_close_ends_the_session_as_closed():
    """The client sent EOF and then went away (RST); the upstream's late bytes cannot reach it.
    That is how a TLS client that closes right after its last response ends a session, when the
    server's close_notify arrives after it closed: a finished exchange, recorded as closed."""
    client_done = None
    go = None

    async def upstream(reader, writer):
        await reader.read()                     # the client's EOF has come through the relay
        client_done.set()
        await go.wait()
        for _ in range(50):                     # late bytes; the first write to the gone client fails
            writer.write(b"late bytes from the upstream")
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.close()

    async def main():
        nonlocal client_done, go
        client_done, go = asyncio.Event(), asyncio.Event()
        rig = _Rig(upstream)
        client = await rig.start()
        await asyncio.get_running_loop().sock_sendall(client, b"request")
        client.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(client_done.wait(), 10)
        _reset(client)
        await asyncio.sleep(0.05)
        go.set()
        return await rig.outcome()

    reason, error = asyncio.run(main())
    assert reason == "closed"
    assert error.startswith("the client had closed its side and went away before the last bytes "
                            "from the upstream reached it")


def test_a_client_reset_mid_stream_is_recorded_as_a_reset():
    seen = None

    async def upstream(reader, writer):
        await reader.readexactly(7)
        seen.set()
        await reader.read()                     # stays quiet: the relay must not wait for it

    async def main():
        nonlocal seen
        seen = asyncio.Event()
        rig = _Rig(upstream)
        client = await rig.start()
        await asyncio.get_running_loop().sock_sendall(client, b"request")
        await asyncio.wait_for(seen.wait(), 10)
        _reset(client)
        return await rig.outcome()

    reason, error = asyncio.run(main())
    assert reason == "reset"
    assert error.startswith("the client reset the connection (ConnectionResetError")


def test_a_tcp_session_cut_by_an_agent_stop_still_records_its_end():
    """serve_tcp cancelled mid-relay (the agent's stop drain ran out): session.end is recorded,
    with reason agent_stopping and the bytes relayed so far; without a stop, `cancelled`."""
    from enforcer.context import ConnectionContext, TargetInfo
    from enforcer.relay import serve_tcp

    class Sink:
        def __init__(self):
            self.events = []

        def emit(self, event_type, fields, session_id=None):
            self.events.append((event_type, fields))

    async def echo(reader, writer):
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def run(stop: bool):
        loop = asyncio.get_running_loop()
        upstream = await asyncio.start_server(echo, "127.0.0.2", 0)
        sink, stopping, tasks = Sink(), asyncio.Event(), []
        target = TargetInfo("db", "tcp", "127.0.0.2", upstream.sockets[0].getsockname()[1])

        async def handle(reader, writer):
            tasks.append(asyncio.current_task())
            await serve_tcp(reader, writer, ConnectionContext("s1", "svc", {}, target, None, sink,
                                                              extra={"agent_stopping": stopping}))

        front = await asyncio.start_server(handle, "127.0.0.1", 0)
        client = socket.socket()
        client.setblocking(False)
        await loop.sock_connect(client, front.sockets[0].getsockname())
        await loop.sock_sendall(client, b"ping")
        assert await loop.sock_recv(client, 100) == b"ping"
        if stop:
            stopping.set()
        tasks[0].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert await loop.sock_recv(client, 100) == b""          # the client's side is closed
        client.close()
        front.close()
        upstream.close()
        return [f for t, f in sink.events if t == "session.end"]

    (end,) = asyncio.run(run(stop=True))
    assert (end["reason"], end["bytes_in"], end["bytes_out"]) == ("agent_stopping", 4, 4)
    (end,) = asyncio.run(run(stop=False))
    assert end["reason"] == "cancelled"
