"""Provider cases for the conformance suite (tests/e2e/test_conformance.py).

Every provider kind adds one :class:`ProviderCase`. The suite starts the case's emulator,
a gateway subprocess whose config routes public models to it, and drives the gateway with
the official ``openai`` SDK. Emulators follow shared conventions for the upstream model name:

- ``chat``            a normal model: the reply contains the last user message's text;
- ``error-<status>``  the provider's own error body and status (429 with retry-after);
- ``slow-<ms>``       waits before answering;
- ``drop``            streams a little, then cuts the connection;
- tools offered with a forcing ``tool_choice`` → one call of the named/first tool with
  arguments ``{"location": "Paris"}``.

A provider that lacks a feature lists it in ``opt_outs`` with the reason (documented in
docs/providers.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.anthropic import AnthropicEmulator
from tests.fakes.base import Emulator
from tests.fakes.gemini import GeminiEmulator
from tests.fakes.openai import OpenAIEmulator


@dataclass
class ProviderCase:
    kind: str
    emulator: Callable[[], Emulator] | None
    provider_config: Callable[[str | None], dict[str, Any]]
    chat_model: str = "chat"
    embed_model: str = "embed"
    opt_outs: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.kind


CASES: list[ProviderCase] = [
    ProviderCase(
        kind="openai",
        emulator=OpenAIEmulator,
        provider_config=lambda url: {"kind": "openai", "base_url": f"{url}/v1", "api_key": "test-key"},
    ),
    ProviderCase(
        kind="demo",
        emulator=None,
        provider_config=lambda url: {"kind": "demo"},
        chat_model="demo",
        embed_model="demo-embedding",
        opt_outs={
            "errors": "the demo model never fails except with '-fail' models",
            "drop": "the demo model has no connection to drop",
        },
    ),
    ProviderCase(
        kind="anthropic",
        emulator=AnthropicEmulator,
        provider_config=lambda url: {"kind": "anthropic", "base_url": url, "api_key": "test-key"},
        opt_outs={"embeddings": "Anthropic has no embeddings API"},
    ),
    ProviderCase(
        kind="gemini",
        emulator=GeminiEmulator,
        provider_config=lambda url: {"kind": "gemini", "base_url": url, "api_key": "test-key"},
    ),
]
