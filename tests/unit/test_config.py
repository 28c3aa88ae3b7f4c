from __future__ import annotations

from pathlib import Path

import pytest

from tokyo_ia.config import default_config, load_config, parse_config
from tokyo_ia.errors import ConfigError


def test_defaults_follow_the_contract() -> None:
    config = parse_config({})
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8080
    assert config.server.max_body_bytes == 4 * 1024 * 1024
    assert config.store.url == "sqlite+aiosqlite:///./tokyo-ia.db"
    assert config.redis.url is None
    assert config.cache is None
    assert not config.auth.enabled


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"server\.prot: unknown key"):
        parse_config({"server": {"prot": 1}})


def test_unknown_provider_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"providers\.local\.base_ur: unknown key"):
        parse_config({"providers": {"local": {"kind": "openai", "base_ur": "http://x"}}})


def test_unknown_kind_lists_known_kinds() -> None:
    with pytest.raises(
        ConfigError, match=r"providers\.x\.kind: unknown provider kind 'nope'; use one of: .*demo"
    ):
        parse_config({"providers": {"x": {"kind": "nope"}}})


def test_bad_value_names_key_and_value() -> None:
    with pytest.raises(ConfigError, match=r"server\.port: .*65535.*got 70000"):
        parse_config({"server": {"port": 70000}})


def test_model_must_reference_a_configured_provider() -> None:
    with pytest.raises(ConfigError, match=r"models\.m\[0\]\.provider: 'ghost' is not a configured provider"):
        parse_config(
            {"providers": {"demo": {"kind": "demo"}}, "models": {"m": [{"provider": "ghost", "model": "x"}]}}
        )


def test_missing_env_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKYO_TEST_MISSING", raising=False)
    with pytest.raises(
        ConfigError, match=r"providers\.o\.api_key: environment variable TOKYO_TEST_MISSING is not set"
    ):
        parse_config({"providers": {"o": {"kind": "openai", "api_key": "${env:TOKYO_TEST_MISSING}"}}})


def test_env_default_and_file_references(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("from-file\n")
    monkeypatch.setenv("TOKYO_TEST_URL", "http://127.0.0.1:9/v1")
    config = parse_config(
        {
            "server": {"host": "${env:TOKYO_TEST_HOST:-127.0.0.2}"},
            "providers": {
                "o": {"kind": "openai", "api_key": f"${{file:{secret}}}", "base_url": "${env:TOKYO_TEST_URL}"}
            },
        }
    )
    assert config.server.host == "127.0.0.2"
    provider = config.providers["o"]
    assert provider.api_key is not None
    assert provider.api_key.get_secret_value() == "from-file"
    assert provider.base_url == "http://127.0.0.1:9/v1"
    assert "from-file" not in repr(config)


def test_secret_reference_reads_secrets_dir(tmp_path: Path) -> None:
    (tmp_path / "openai-key").write_text("s3cret")
    config = parse_config({"secrets": {"dir": str(tmp_path)}, "auth": {"master_key": "${secret:openai-key}"}})
    assert config.auth.master_key is not None
    assert config.auth.master_key.get_secret_value() == "s3cret"


def test_missing_file_and_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_embedded_default_adds_providers_with_keys() -> None:
    plain = default_config({})
    assert list(plain.providers) == ["demo"]
    assert "demo" in plain.models
    with_openai = default_config({"OPENAI_API_KEY": "sk-test"})
    assert "openai" in with_openai.providers
    assert with_openai.models["gpt-4o-mini"][0].provider == "openai"


def test_demo_settings_are_typed() -> None:
    config = parse_config({"providers": {"d": {"kind": "demo", "latency_ms": 5}}})
    assert config.providers["d"].kind == "demo"
    with pytest.raises(ConfigError, match=r"providers\.d\.latency_ms"):
        parse_config({"providers": {"d": {"kind": "demo", "latency_ms": -1}}})


def test_a_master_key_shaped_like_a_virtual_key_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError, match="master_key must not start with 'sk-tia-'") as info:
        parse_config({"auth": {"master_key": "sk-tia-secret-value"}})
    assert "secret-value" not in str(info.value)


def test_admin_port_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"admin_port must differ from server\.port"):
        parse_config({"server": {"port": 9000, "admin_port": 9000}})
    with pytest.raises(ConfigError, match=r"admin_host needs server\.admin_port"):
        parse_config({"server": {"admin_host": "127.0.0.1"}})
    server = parse_config({"server": {"admin_port": 9090, "metrics_token": "t"}}).server
    assert server.max_header_bytes == 16 * 1024
    assert server.metrics_token is not None and server.metrics_token.get_secret_value() == "t"
