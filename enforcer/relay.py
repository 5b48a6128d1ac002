"""Opaque TCP relay for `protocol: tcp` targets: bytes both ways, recorded as a session.

Protocol-aware targets (postgres, http) go through their enforcers instead; this relay is
only for TCP services Warden does not parse, where attribution and byte counts are the record.
"""
from __future__ import annotations

import asyncio
import time

from enforcer.context import ConnectionContext

CHUNK = 64 * 1024


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: list) -> None:
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            counter[0] += len(data)
            writer.write(data)
            await writer.drain()        # backpressure: never buffer more than one chunk per side
    finally:
        try:
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, RuntimeError):
            pass


async def serve_tcp(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                    ctx: ConnectionContext) -> None:
    started = time.monotonic_ns()
    ctx.emit("session.start", ctx.extra.get("session_start_fields", {}))
    reason, error = "closed", None
    up_in, up_out = [0], [0]
    try:
        up_reader, up_writer = await asyncio.wait_for(
            asyncio.open_connection(ctx.target.upstream_host, ctx.target.upstream_port), timeout=10)
    except (OSError, asyncio.TimeoutError) as exc:
        reason, error = "upstream_unreachable", f"{type(exc).__name__}: {exc}"
        client_writer.close()
    else:
        try:
            await asyncio.gather(_pump(client_reader, up_writer, up_in), _pump(up_reader, client_writer, up_out))
        except (ConnectionError, OSError) as exc:
            reason, error = "reset", str(exc)
        finally:
            up_writer.close()
            client_writer.close()
    ctx.emit("session.end", {"reason": reason, "error": error,
                             "duration_ns": time.monotonic_ns() - started,
                             "bytes_in": up_in[0], "bytes_out": up_out[0]})
