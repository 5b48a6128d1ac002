"""The aiohttp client through the HTTP enforcer: methods, streamed upload, keep-alive reuse."""
from __future__ import annotations

import asyncio

import aiohttp

from tests.integration.test_http_proxy import enforcer, upstream  # noqa: F401  (fixtures)
from tests.waiting import wait_for


def test_aiohttp_methods_streamed_upload_and_reuse(upstream, enforcer):  # noqa: F811
    enforcer.configure(upstream)

    async def body_chunks():
        for _ in range(64):
            yield b"y" * 16384             # sent chunked: aiohttp does not know the length up front

    async def run():
        connector = aiohttp.TCPConnector(limit=1)          # one connection, reused for every request
        async with aiohttp.ClientSession(enforcer.url, connector=connector, headers={"Host": "api"}) as session:
            out = []
            for method, kwargs in (("GET", {"params": {"a": "1"}}), ("POST", {"data": body_chunks()}),
                                   ("PUT", {"json": {"k": "v"}}), ("DELETE", {})):
                async with session.request(method, "/echo", **kwargs) as resp:
                    out.append((resp.status, await resp.json()))
            return out

    results = asyncio.run(run())
    assert [status for status, _ in results] == [200, 200, 200, 200]
    assert [body["method"] for _, body in results] == ["GET", "POST", "PUT", "DELETE"]
    assert results[1][1]["body_len"] == 64 * 16384
    assert wait_for(lambda: enforcer.sink.of("session.end"))
    assert len(enforcer.sink.of("session.start")) == 1
    assert [r["method"] for r in enforcer.sink.of("http.request")] == ["GET", "POST", "PUT", "DELETE"]
