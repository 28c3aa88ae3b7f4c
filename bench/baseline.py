"""The practical floor for a Python gateway: raw ASGI + one aiohttp session, no pipeline.

It forwards the request body to ``$BENCH_UPSTREAM`` and the answer back (streams chunk by
chunk), nothing else. Served like the gateway: uvicorn, uvloop, httptools, no access log.
Run: ``BENCH_UPSTREAM=http://127.0.0.1:9000 python -m bench.baseline --port 9001``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import uvicorn

Message = dict[str, Any]
UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:9000")
session: aiohttp.ClientSession | None = None


async def app(
    scope: Message, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
) -> None:
    global session
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":  # startup: open the pool
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))
            await send({"type": "lifespan.startup.complete"})
        if session is not None:
            await session.close()
        return await send({"type": "lifespan.shutdown.complete"})
    if scope["path"] == "/health/ready":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        return await send({"type": "http.response.body", "body": b"ok"})
    body, more = b"", True
    while more:
        message = await receive()
        body, more = body + message.get("body", b""), message.get("more_body", False)
    assert session is not None
    async with session.post(
        UPSTREAM + scope["path"], data=body, headers={"content-type": "application/json"}
    ) as resp:
        content_type = resp.headers["content-type"]
        headers = [(b"content-type", content_type.encode())]
        if not content_type.startswith("text/event-stream"):
            data = await resp.read()
            headers.append((b"content-length", str(len(data)).encode()))
            await send({"type": "http.response.start", "status": resp.status, "headers": headers})
            return await send({"type": "http.response.body", "body": data})
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        async for chunk in resp.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.baseline")
    parser.add_argument("--port", type=int, default=9001)
    port = parser.parse_args().port
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )
