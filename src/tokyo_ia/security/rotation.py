"""Provider keys rotated without a restart.

A provider whose ``api_key`` is written as ``${secret:NAME}`` or ``${file:/path}`` may get a
new key while the gateway runs: a secrets manager rotates it, or Kubernetes updates the
mounted secret. Every ``secrets.refresh_s`` seconds the :class:`CredentialRotator` reads those
keys again (in a worker thread: backends are blocking) and hands a changed one to its provider,
which uses it for every call from then on. A key that cannot be read keeps its current value,
with a warning naming the provider (never a value): an outage of the secrets manager must not
take down a gateway that holds working credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

from pydantic import SecretStr

from ..config import Credentials
from ..errors import ConfigError
from ..providers.base import Provider

log = logging.getLogger("tokyo_ia.secrets")


class CredentialRotator:
    def __init__(
        self, credentials: Credentials, providers: Mapping[str, Provider], interval_s: float
    ) -> None:
        self.credentials = credentials
        self.providers = providers
        self.interval_s = interval_s
        self.rotations = 0  # keys handed to a provider since start
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="tokyo-ia-key-rotation")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.rotate()

    async def rotate(self) -> list[str]:
        """Read every key again; the names of the providers that got a new one."""
        try:
            keys = await asyncio.to_thread(self.credentials.read_all)
        except ConfigError as exc:  # the backend's refresh itself failed
            log.warning("secrets: provider keys not read again, the current ones stay in use: %s", exc)
            return []
        rotated = []
        for name, value in keys.items():
            if isinstance(value, ConfigError):
                log.warning("secrets: not read again, the current key stays in use: %s", value)
                continue
            provider = self.providers[name]  # templates come from the same providers section
            current = provider.config.api_key
            if current is not None and current.get_secret_value() == value:
                continue
            try:
                provider.rotate_api_key(SecretStr(value))
            except ConfigError as exc:
                log.warning(
                    "secrets: providers.%s.api_key: the new value is not usable, keeping the current one: %s",
                    name,
                    exc,
                )
                continue
            self.rotations += 1
            rotated.append(name)
            log.info("secrets: providers.%s.api_key changed; calls use the new key from now on", name)
        return rotated
