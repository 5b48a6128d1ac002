"""PostgreSQL v3 protocol enforcer: sans-IO core (protocol, session) and asyncio shell (proxy)."""
