"""HTTP enforcer: a strict sans-IO HTTP/1.1 core (protocol) and its asyncio shell (proxy.serve_http)."""
