"""Workload TLS on the HTTP enforcer's listener: leaf contexts and names for interception.

The ClientHello has already been read from the client stream (to learn the SNI) when either
mode starts, and asyncio's start_tls cannot replay bytes already read, on the stdlib loop or
uvloop. So interception runs the shared TLS layer (enforcer/tlslayer.py, `TlsServerTransport`)
under the HttpSession, serving ALPN `HTTP_ALPNS` only; sni mode relays the TLS bytes with
enforcer/relay.py.
"""
from __future__ import annotations

import asyncio
import ipaddress
import ssl
import time
import weakref

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
