from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.openai import OpenAIEmulator
from tests.support import GatewayProcess, close_sdk_clients, openai_provider


@pytest.fixture(autouse=True)
def _close_sdk_clients() -> Iterator[None]:
    yield
    close_sdk_clients()


@pytest.fixture(scope="module")
def emu_gateway(openai_emu: OpenAIEmulator) -> Iterator[GatewayProcess]:
    """A gateway (subprocess) routing public models to the OpenAI emulator and the demo model."""
    config = {
        "providers": {
            "up": openai_provider(openai_emu.url, timeout_s=2),
            "backup": openai_provider(openai_emu.url),
            "demo": {"kind": "demo"},
        },
        "models": {
            "gpt-emu": [{"provider": "up", "model": "gpt-4o-mini"}],
            "failover": [
                {"provider": "up", "model": "error-503"},
                {"provider": "backup", "model": "gpt-4o-mini"},
            ],
            "all-down": [
                {"provider": "up", "model": "error-503"},
                {"provider": "backup", "model": "error-500"},
            ],
            "no-failover-400": [
                {"provider": "up", "model": "error-400"},
                {"provider": "backup", "model": "gpt-4o-mini"},
            ],
            "slow": [{"provider": "up", "model": "slow-5000"}],
            "flaky": [{"provider": "up", "model": "flaky-1"}],
            "trickle": [{"provider": "up", "model": "trickle"}],
            "drop": [{"provider": "up", "model": "drop"}],
            "demo": [{"provider": "demo", "model": "demo"}],
            **{f"err-{s}": [{"provider": "up", "model": f"error-{s}"}] for s in (400, 401, 429, 500)},
        },
        "server": {"max_body_bytes": 65536},
    }
    with GatewayProcess(config) as gw:
        yield gw
