"""Workload TLS on the HTTP enforcer's listener: termination (intercept) and opaque relay (sni).

The ClientHello has already been read from the client stream (to learn the SNI) when either
mode starts, and asyncio's start_tls cannot replay bytes already read, on the stdlib loop or
uvloop. So interception runs the shared TLS layer (enforcer/tlslayer.py, `TlsServerTransport`)
under the HttpSession, serving ALPN `HTTP_ALPNS` only.
"""
from __future__ import annotations

import asyncio
import ipaddress
import ssl
import time
import weakref
from typing import Optional

RELAY_CHUNK = 64 * 1024
HTTP_ALPN = "http/1.1"
# what an intercepted client may negotiate: HTTP/1.1 or no ALPN at all. The agent's leaf
# contexts also list "postgresql" (shared with the Postgres enforcer); it is not served here.
HTTP_ALPNS = (None, HTTP_ALPN)
# leaf contexts are asked of the LocalCA again after this long, so its renewal takes effect
_LEAF_REFRESH_S = 3600.0
_LEAF_CACHE_MAX = 1024

_leaf_contexts: "weakref.WeakKeyDictionary[object, dict[str, tuple[ssl.SSLContext, float]]]" = \
    weakref.WeakKeyDictionary()


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


async def leaf_context(local_ca, name: str) -> ssl.SSLContext:
    """A server context presenting the LocalCA's leaf for `name` (a host name or an IP).

    Issuing (key generation, files) runs in a thread; contexts are cached per CA and name.
    """
    per_ca = _leaf_contexts.setdefault(local_ca, {})
    found = per_ca.get(name)
    now = time.monotonic()
    if found is not None and now - found[1] < _LEAF_REFRESH_S:
        return found[0]
    hostnames, ips = ([], [name]) if is_ip(name) else ([name], [])
    context = await asyncio.to_thread(local_ca.server_context_for, hostnames, ips)
    if len(per_ca) >= _LEAF_CACHE_MAX:
        per_ca.clear()
    per_ca[name] = (context, now)
    return context


def name_allowed(name: str, patterns) -> bool:
    """`patterns`: exact names or `*.suffix` (one label, as in certificates)."""
    for pattern in patterns:
        pattern = str(pattern).lower().rstrip(".")
        if pattern.startswith("*."):
            head, dot, rest = name.partition(".")
            if dot and head and rest == pattern[2:]:
                return True
        elif name == pattern:
            return True
    return False


# -- sni mode: the TLS stream relayed untouched --------------------------------------------

async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: list, index: int) -> None:
    try:
        while True:
            data = await reader.read(RELAY_CHUNK)
            if not data:
                break
            counter[index] += len(data)
            writer.write(data)
            await writer.drain()     # backpressure: at most one chunk in flight per direction
    finally:
        try:
            if not writer.is_closing() and writer.can_write_eof():
                writer.write_eof()
        except (OSError, RuntimeError):
            pass


async def relay_opaque(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                       upstream_reader: asyncio.StreamReader, upstream_writer: asyncio.StreamWriter,
                       first: bytes, counts: list) -> tuple[str, Optional[str]]:
    """Relay both ways until both directions end; `counts` = [client->upstream, upstream->client].

    `first` (the ClientHello and whatever came with it) goes upstream before the relay starts.
    Returns the session's end reason and error.
    """
    counts[0] += len(first)
    upstream_writer.write(first)
    pumps = [asyncio.ensure_future(_pump(client_reader, upstream_writer, counts, 0)),
             asyncio.ensure_future(_pump(upstream_reader, client_writer, counts, 1))]
    reason, error = "closed", None
    try:
        done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            exc = task.exception()
            if exc is not None:
                # one side failed: the other would wait forever on a peer that keeps quiet
                reason, error = "reset", f"{type(exc).__name__}: {exc}"
                break
    finally:
        upstream_writer.close()
        client_writer.close()
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
    return reason, error
