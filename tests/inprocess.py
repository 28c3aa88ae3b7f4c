"""The whole gateway in the test's own process, behind httpx's ASGI transport.

No socket between the test and the app, so a test can hand the app objects (an in-memory
span exporter) and read its state (``app.gateway.metrics``) directly; upstreams are still
real servers (the emulators) or the ``demo`` provider.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from tokyo_ia.config import parse_config
from tokyo_ia.observability.tracing import Tracer
from tokyo_ia.server.app import GatewayApp
from tokyo_ia.store.db import upgrade

_template: Path | None = None


async def _database(directory: Path) -> str:
    """A fresh SQLite database at the newest schema (migrated once, then copied: faster)."""
    global _template
    if _template is None:
        folder = tempfile.mkdtemp(prefix="tokyo-ia-schema-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        await upgrade(f"sqlite+aiosqlite:///{folder}/template.db")
        _template = Path(folder) / "template.db"
    path = directory / "gateway.db"
    shutil.copyfile(_template, path)
    return f"sqlite+aiosqlite:///{path}"


@contextlib.asynccontextmanager
async def in_process(
    config: dict[str, Any], directory: Path, *, tracer: Tracer | None = None
) -> AsyncIterator[tuple[GatewayApp, httpx.AsyncClient]]:
    """Start a gateway for ``config`` (its database in ``directory``) and a client for it."""
    app = GatewayApp(parse_config({"store": {"url": await _database(directory)}, **config}), tracer=tracer)
    await app.gateway.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            yield app, client
    finally:
        await app.gateway.close()
