"""A real HTTP server on loopback, in a background thread, for provider emulators.

Each emulator is an aiohttp ``web.Application`` built by a subclass; the server runs in its
own thread and event loop, so it serves sync tests, async tests and gateway subprocesses
alike. Requests are recorded for assertions; streams that the client abandoned are counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any, Self

from aiohttp import web


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


@dataclass
class EmulatorState:
    requests: list[Recorded] = field(default_factory=list)
    streams_started: int = 0
    streams_completed: int = 0
    streams_cancelled: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    fault: int | None = None
    """When set, every model request is answered with this HTTP error status (outage drills)."""

    def bump(self, name: str) -> int:
        self.counters[name] = self.counters.get(name, 0) + 1
        return self.counters[name]


class Emulator:
    """Start with ``with Emulator() as emu:``; ``emu.url`` is its base URL."""

    api_key = "test-key"

    def __init__(self, port: int | None = None, *, ssl_context: ssl.SSLContext | None = None) -> None:
        """``ssl_context``: serve HTTPS with it (the URL becomes ``https://``)."""
        self.port = port or free_port()
        self.ssl_context = ssl_context
        self.state = EmulatorState()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def build_app(self) -> web.Application:
        raise NotImplementedError

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        raw = await request.read()
        body: Any = raw
        with contextlib.suppress(ValueError):
            body = await request.json() if raw else None
        self.state.requests.append(
            Recorded(request.method, request.path, dict(request.query), dict(request.headers), body)
        )
        return await handler(request)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        app = self.build_app()
        app.middlewares.append(self._record)
        self._runner = web.AppRunner(
            app, handle_signals=False, handler_cancellation=True, shutdown_timeout=0.5
        )
        loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ssl_context)
        loop.run_until_complete(site.start())
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self._runner.cleanup())
        loop.close()

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("emulator did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        self.state = EmulatorState()

    @property
    def requests(self) -> list[Recorded]:
        return self.state.requests

    async def sse(self, request: web.Request, events: Any, *, named: bool = False) -> web.StreamResponse:
        """Write ``events`` ((event, data-string) pairs or data strings) as an SSE body.

        Counts streams started, completed and cancelled (client went away).
        """
        resp = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        self.state.streams_started += 1
        try:
            async for item in _aiter(events):
                if isinstance(item, tuple):
                    name, data = item
                    await resp.write(f"event: {name}\ndata: {data}\n\n".encode())
                else:
                    await resp.write(f"data: {item}\n\n".encode())
            await resp.write_eof()
            self.state.streams_completed += 1
        except (asyncio.CancelledError, ConnectionResetError):
            self.state.streams_cancelled += 1
            raise
        return resp


async def _aiter(events: Any) -> Any:
    if hasattr(events, "__aiter__"):
        async for item in events:
            yield item
    else:
        for item in events:
            yield item
