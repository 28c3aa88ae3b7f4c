"""The ASGI lifespan of a worker: start-up leaves the heap frozen and young collections rare."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

from tests.inprocess import _database
from tokyo_ia.config import parse_config
from tokyo_ia.server.app import GC_YOUNG_THRESHOLD, GatewayApp


async def test_start_up_freezes_its_heap_and_sets_the_young_threshold(tmp_path: Path) -> None:
    app = GatewayApp(parse_config({"store": {"url": await _database(tmp_path)}}))
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    sent: list[dict[str, Any]] = []
    answered = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        answered.set()

    before = gc.get_threshold()
    try:
        await inbox.put({"type": "lifespan.startup"})
        task = asyncio.ensure_future(app({"type": "lifespan"}, inbox.get, send))
        await asyncio.wait_for(answered.wait(), 30)
        assert sent == [{"type": "lifespan.startup.complete"}]
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *before[1:])
        await inbox.put({"type": "lifespan.shutdown"})
        await task
        assert sent[-1] == {"type": "lifespan.shutdown.complete"}
    finally:
        gc.unfreeze()  # this is the test runner's heap: give it back as it was
        gc.set_threshold(*before)
