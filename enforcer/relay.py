"""Opaque byte relay: `protocol: tcp` targets, and TLS streams relayed by SNI (enforcer/http).

Protocol-aware targets (postgres, http) go through their enforcers instead; this relay is
for bytes Warden does not parse, where attribution and byte counts are the record.
"""
from __future__ import annotations

import asyncio
import time
from typing import Optional

from enforcer.context import ConnectionContext, cancelled_reason

CHUNK = 64 * 1024


_SIDES = ("client", "upstream")     # pumps[i] reads from _SIDES[i] and writes to the other


class _PumpFailed(Exception):
    """A pump's connection error, with whether it came from reading its source or writing
    to its peer (the record says which side went away)."""

    def __init__(self, writing: bool, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.writing = writing


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counts: list, index: int) -> None:
    try:
        while True:
            writing = False
            data = await reader.read(CHUNK)
            if not data:
                break
            counts[index] += len(data)
            writing = True
            writer.write(data)
            await writer.drain()        # backpressure: never buffer more than one chunk per side
    except ConnectionError as exc:
        raise _PumpFailed(writing, exc) from exc
    finally:
        try:
            if not writer.is_closing() and writer.can_write_eof():
                writer.write_eof()
        except (OSError, RuntimeError):
            pass


def _outcome(pumps: list) -> tuple[str, Optional[str]]:
    """The end reason once both pumps ended or one failed (the other would wait forever on a
    peer that keeps quiet). A connection error after the other direction had ended normally
    is the end of a finished exchange, not a reset: e.g. a client that closes right after
    its last response resets the connection when the server's TLS close_notify reaches it."""
    for index, task in enumerate(pumps):
        if not task.done() or task.cancelled() or task.exception() is None:
            continue
        exc = task.exception()
        if not isinstance(exc, _PumpFailed):
            return "reset", f"{type(exc).__name__}: {exc}"
        source, peer = _SIDES[index], _SIDES[1 - index]
        other = pumps[1 - index]
        other_ended = other.done() and not other.cancelled() and other.exception() is None
        if exc.writing:
            if other_ended:
                return "closed", (f"the {peer} had closed its side and went away before the last bytes "
                                  f"from the {source} reached it ({exc})")
            return "reset", f"the {peer} went away before bytes from the {source} reached it ({exc})"
        if other_ended:
            return "closed", f"the {source} reset the connection after the {peer} had closed its side ({exc})"
        return "reset", f"the {source} reset the connection ({exc})"
    return "closed", None


async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                upstream_reader: asyncio.StreamReader, upstream_writer: asyncio.StreamWriter,
                counts: list, first: bytes = b"") -> tuple[str, Optional[str]]:
    """Relay both ways until both directions end; `counts` = [client->upstream, upstream->client].

    `first` (bytes already read from the client) goes upstream before the relay starts.
    Closes both writers. Returns the session's end reason and error.
    """
    if first:
        counts[0] += len(first)
        upstream_writer.write(first)
    pumps = [asyncio.ensure_future(_pump(client_reader, upstream_writer, counts, 0)),
             asyncio.ensure_future(_pump(upstream_reader, client_writer, counts, 1))]
    reason, error = "closed", None
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
        reason, error = _outcome(pumps)
    finally:
        upstream_writer.close()
        client_writer.close()
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
    return reason, error


async def serve_tcp(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                    ctx: ConnectionContext) -> None:
    started = time.monotonic_ns()
    ctx.emit("session.start", ctx.extra.get("session_start_fields", {}))
    counts = [0, 0]
    try:
        reason, error = await _connect_and_relay(client_reader, client_writer, ctx, counts)
    except asyncio.CancelledError:
        # cut by the agent's stop (or the host's): the session's end is on record all the same
        client_writer.close()
        _end(ctx, started, cancelled_reason(ctx), None, counts)
        raise
    _end(ctx, started, reason, error, counts)


async def _connect_and_relay(client_reader, client_writer, ctx: ConnectionContext,
                             counts: list) -> tuple[str, Optional[str]]:
    target = ctx.target
    try:
        up_reader, up_writer = await asyncio.wait_for(
            asyncio.open_connection(target.upstream_host, target.upstream_port), timeout=10)
    except (OSError, asyncio.TimeoutError) as exc:
        client_writer.close()
        return "upstream_unreachable", (
            f"cannot reach {target.upstream_host}:{target.upstream_port} for target {target.name!r} "
            f"({type(exc).__name__}: {exc}); check that the service is up and the target's upstream "
            f"address in agent.yaml")
    return await relay(client_reader, client_writer, up_reader, up_writer, counts)


def _end(ctx: ConnectionContext, started: int, reason: str, error: Optional[str], counts: list) -> None:
    ctx.emit("session.end", {"reason": reason, "error": error,
                             "duration_ns": time.monotonic_ns() - started,
                             "bytes_in": counts[0], "bytes_out": counts[1]})
