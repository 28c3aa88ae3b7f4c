"""Provider keys read again while the gateway runs (security/rotation.py, config.Credentials)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from tokyo_ia.config import parse_config
from tokyo_ia.providers import registry
from tokyo_ia.providers.http import HTTPProvider
from tokyo_ia.security.rotation import CredentialRotator


def _config(secrets_dir: Path, key_file: Path) -> dict[str, Any]:
    return {
        "secrets": {"backend": "file", "dir": str(secrets_dir), "refresh_s": 60},
        "providers": {
            "vaulted": {"kind": "openai", "api_key": "${secret:openai-key}"},
            "mounted": {"kind": "anthropic", "api_key": f"${{file:{key_file}}}"},
            "fixed": {"kind": "openai", "api_key": "sk-written-in-the-file"},
            "from-env": {"kind": "gemini", "api_key": "${env:ROTATION_TEST_KEY}"},
        },
        "models": {"m": [{"provider": "vaulted", "model": "gpt-4o-mini"}]},
    }


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Any]:
    monkeypatch.setenv("ROTATION_TEST_KEY", "env-key")
    (tmp_path / "openai-key").write_text("sk-one\n")
    key_file = tmp_path / "anthropic.key"
    key_file.write_text("ant-one")
    return tmp_path, key_file, parse_config(_config(tmp_path, key_file))


def _head(provider: Any) -> bytes:
    assert isinstance(provider, HTTPProvider)
    return provider._head


def test_only_keys_from_secrets_and_files_are_watched(setup: tuple[Path, Path, Any]) -> None:
    _, key_file, config = setup
    assert config.credentials.templates == {
        "vaulted": "${secret:openai-key}",
        "mounted": f"${{file:{key_file}}}",
    }
    assert parse_config({"providers": {"p": {"kind": "openai", "api_key": "x"}}}).credentials is None


async def test_a_changed_key_reaches_its_provider_and_nothing_else_changes(
    setup: tuple[Path, Path, Any],
) -> None:
    secrets_dir, key_file, config = setup
    providers = {name: registry.create(name, section) for name, section in config.providers.items()}
    rotator = CredentialRotator(config.credentials, providers, 60)
    assert await rotator.rotate() == []  # nothing changed yet
    assert b"authorization: Bearer sk-one\r\n" in _head(providers["vaulted"])

    (secrets_dir / "openai-key").write_text("sk-two")
    key_file.write_text("ant-two\n")
    assert sorted(await rotator.rotate()) == ["mounted", "vaulted"]
    assert b"authorization: Bearer sk-two\r\n" in _head(providers["vaulted"])
    assert b"sk-one" not in _head(providers["vaulted"])
    assert b"x-api-key: ant-two\r\n" in _head(providers["mounted"])
    assert providers["vaulted"].config.api_key.get_secret_value() == "sk-two"
    assert b"sk-written-in-the-file" in _head(providers["fixed"])
    assert rotator.rotations == 2
    assert await rotator.rotate() == []


async def test_an_unreadable_or_unusable_key_keeps_the_current_one(
    setup: tuple[Path, Path, Any], caplog: pytest.LogCaptureFixture
) -> None:
    secrets_dir, key_file, config = setup
    providers = {name: registry.create(name, section) for name, section in config.providers.items()}
    rotator = CredentialRotator(config.credentials, providers, 60)
    (secrets_dir / "openai-key").unlink()  # the secrets backend keeps the value it had
    key_file.unlink()  # a ${file:} reference has no such memory: the provider keeps its key
    with caplog.at_level(logging.WARNING, "tokyo_ia.secrets"):
        assert await rotator.rotate() == []
    assert "keeping the previous value of 'openai-key'" in caplog.text
    assert "not read again, the current key stays in use: providers.mounted.api_key" in caplog.text
    assert b"Bearer sk-one" in _head(providers["vaulted"])
    assert b"x-api-key: ant-one" in _head(providers["mounted"])

    (secrets_dir / "openai-key").write_text("sk-two\r\nx-injected: 1")  # not a header value
    caplog.clear()
    with caplog.at_level(logging.WARNING, "tokyo_ia.secrets"):
        assert await rotator.rotate() == []
    assert "providers.vaulted.api_key: the new value is not usable" in caplog.text
    assert "sk-two" not in caplog.text  # never a value in the logs
    assert b"Bearer sk-one" in _head(providers["vaulted"])
    assert providers["vaulted"].config.api_key.get_secret_value() == "sk-one"
