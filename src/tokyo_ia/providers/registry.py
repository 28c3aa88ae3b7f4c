"""The explicit registry of provider kinds.

Adding a provider means writing one module with a :class:`~tokyo_ia.providers.base.Provider`
subclass and listing it in ``_KINDS`` below; nothing else in the code base changes.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any

from ..config import ProviderConfig
from ..errors import ConfigError
from .base import Provider

# kind -> "module:Class", imported on first use so unused SDK-free modules cost nothing.
_KINDS: dict[str, str] = {
    "openai": "tokyo_ia.providers.openai:OpenAIProvider",
    "demo": "tokyo_ia.providers.demo:DemoProvider",
    "gemini": "tokyo_ia.providers.gemini:GeminiProvider",
    "anthropic": "tokyo_ia.providers.anthropic:AnthropicProvider",
}


def register(kind: str, target: str) -> None:
    """Register an extra provider kind as ``"package.module:Class"`` (for plugins)."""
    _KINDS[kind] = target


def kinds() -> list[str]:
    return sorted(_KINDS)


def provider_class(kind: str, where: str = "kind") -> type[Provider]:
    target = _KINDS.get(kind)
    if target is None:
        raise ConfigError(f"{where}: unknown provider kind '{kind}'; use one of: {', '.join(kinds())}")
    module_name, _, attr = target.partition(":")
    cls: type[Provider] = getattr(importlib.import_module(module_name), attr)
    assert issubclass(cls, Provider)
    return cls


def settings_model_for(kind: str, where: str = "kind") -> type[ProviderConfig]:
    return provider_class(kind, where).settings_model


def create(name: str, config: ProviderConfig) -> Provider:
    return provider_class(config.kind, f"providers.{name}.kind")(name, config)


def embedded_defaults(env: Mapping[str, str]) -> Iterator[tuple[str, dict[str, Any], dict[str, str]]]:
    """(provider name, config section, {public model: upstream model}) per available kind."""
    for kind in _KINDS:
        found = provider_class(kind).embedded_default(env)
        if found is not None:
            section, models = found
            yield kind, {"kind": kind, **section}, models
