"""The composition root: builds every stage from a :class:`~tokyo_ia.config.Config`.

One ``Gateway`` per worker process. :meth:`start` runs inside the event loop (it opens the
upstream connection pools); :meth:`close` drains and closes them on shutdown.
"""

from __future__ import annotations

import asyncio
import logging

from .config import Config
from .pipeline import Pipeline
from .providers import registry
from .providers.base import Provider
from .routing.catalog import Catalog
from .security.auth import Authenticator

log = logging.getLogger("tokyo_ia")


class Gateway:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.providers: dict[str, Provider] = {
            name: registry.create(name, section) for name, section in config.providers.items()
        }
        self.catalog = Catalog(config.models, self.providers)
        self.authenticator = Authenticator(config.auth)
        self.pipeline = Pipeline(self.authenticator, self.catalog)
        self.ready = False

    async def start(self) -> None:
        await asyncio.gather(*(p.start() for p in self.providers.values()))
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        results = await asyncio.gather(
            *(p.close() for p in self.providers.values()), return_exceptions=True
        )
        for provider, result in zip(self.providers.values(), results, strict=True):
            if isinstance(result, BaseException):
                log.warning("closing provider %s failed: %s", provider.name, result)
