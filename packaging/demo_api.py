"""The demo's partner API: a small ASGI app (run under uvicorn) that returns customer records
with card numbers, so the demo can show HTTP policy and response masking."""
from __future__ import annotations

import json

CUSTOMERS = {
    1: {"id": 1, "name": "Ada Lovelace", "card_number": "4111 1111 1111 1111", "email": "ada@example.com"},
    2: {"id": 2, "name": "Alan Turing", "card_number": "5500 0055 5555 5559", "email": "alan@example.org"},
}


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    while (await receive()).get("more_body"):
        pass
    parts = scope["path"].strip("/").split("/")
    status, payload = 404, {"error": "not found"}
    if len(parts) == 3 and parts[:2] == ["v1", "customers"] and parts[2].isdigit():
        customer = CUSTOMERS.get(int(parts[2]))
        if customer is not None:
            status, payload = 200, customer
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
