"""Secrets backends without any server: env, files, chains, the cache, settings and the factory."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.support import FakeClock
from tokyo_ia.errors import ConfigError
from tokyo_ia.security.secrets import (
    CachedBackend,
    ChainBackend,
    EnvBackend,
    FileBackend,
    SecretNotFoundError,
    SecretsBackend,
    SecretsSettings,
    build_backend,
    env_name,
    refresh_periodically,
)
from tokyo_ia.security.secrets_vault import VaultBackend, split_name

VALUE = "sk-very-secret-value-4242"
TOKEN = "hvs.never-show-this-token"


class Scripted:
    """A backend whose answers a test sets; counts calls to prove what the cache does."""

    def __init__(self, values: dict[str, str] | None = None) -> None:
        self.values = dict(values or {})
        self.calls: list[str] = []
        self.refreshes = 0
        self.fail: ConfigError | None = None

    def get(self, name: str) -> str:
        self.calls.append(name)
        if self.fail is not None:
            raise self.fail
        if name not in self.values:
            raise SecretNotFoundError(name, "scripted", f"script {name}")
        return self.values[name]

    def refresh(self) -> None:
        self.refreshes += 1


# -- env ------------------------------------------------------------------------------


def test_env_name_upper_cases_and_replaces_dashes_and_dots() -> None:
    assert env_name("openai-key") == "OPENAI_KEY"
    assert env_name("db.main-password") == "DB_MAIN_PASSWORD"


def test_env_backend_reads_the_mapped_variable() -> None:
    backend = EnvBackend({"OPENAI_KEY": VALUE, "EMPTY_ONE": ""})
    assert backend.get("openai-key") == VALUE
    with pytest.raises(SecretNotFoundError, match="set the environment variable EMPTY_ONE"):
        backend.get("empty-one")
    with pytest.raises(SecretNotFoundError, match=r"secret 'absent' not found in the env secrets backend"):
        backend.get("absent")


def test_env_backend_reads_the_live_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = EnvBackend()
    monkeypatch.setenv("TOKYO_TEST_SECRET", "first")
    assert backend.get("tokyo-test-secret") == "first"
    monkeypatch.setenv("TOKYO_TEST_SECRET", "second")
    assert backend.get("tokyo-test-secret") == "second"
    assert isinstance(backend, SecretsBackend)


# -- files ----------------------------------------------------------------------------


def test_file_backend_reads_one_file_per_secret(tmp_path: Path) -> None:
    (tmp_path / "openai-key").write_text(f"{VALUE}\n")
    (tmp_path / "team").mkdir()
    (tmp_path / "team" / "db").write_text("pw")
    backend = FileBackend(tmp_path)
    assert backend.get("openai-key") == VALUE
    assert backend.get("team/db") == "pw"


def test_file_backend_missing_and_empty_files_are_not_found(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    backend = FileBackend(tmp_path)
    with pytest.raises(SecretNotFoundError, match=f"put it in the file {tmp_path / 'absent'}"):
        backend.get("absent")
    with pytest.raises(SecretNotFoundError, match="is empty; write the secret into it"):
        backend.get("empty")


@pytest.mark.parametrize("name", ["../etc/passwd", "/etc/passwd", "a/../../b", "", "."])
def test_file_backend_never_leaves_its_directory(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="is not a valid file name"):
        FileBackend(tmp_path).get(name)


def test_file_backend_unreadable_entry_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    with pytest.raises(ConfigError, match=r"file secrets backend\): cannot read .*adir"):
        FileBackend(tmp_path).get("adir")


# -- chain ----------------------------------------------------------------------------


def test_chain_first_backend_that_has_it_wins() -> None:
    first, second = Scripted({"a": "from-first"}), Scripted({"a": "from-second", "b": "only-second"})
    chain = ChainBackend([first, second])
    assert chain.get("a") == "from-first"
    assert second.calls == []
    assert chain.get("b") == "only-second"
    assert first.calls == ["a", "b"]


def test_chain_missing_everywhere_lists_every_fix(tmp_path: Path) -> None:
    chain = ChainBackend([FileBackend(tmp_path), EnvBackend({})])
    with pytest.raises(SecretNotFoundError) as info:
        chain.get("openai-key")
    message = str(info.value)
    assert "chain (file, env)" in message
    assert f"put it in the file {tmp_path / 'openai-key'}" in message
    assert "or set the environment variable OPENAI_KEY" in message


def test_chain_stops_at_an_error_that_is_not_absence() -> None:
    broken, fallback = Scripted(), Scripted({"a": "fallback"})
    broken.fail = ConfigError("secret 'a' (vault secrets backend): Vault is sealed; unseal it")
    with pytest.raises(ConfigError, match="sealed"):
        ChainBackend([broken, fallback]).get("a")
    assert fallback.calls == []


def test_chain_needs_a_backend_and_refreshes_them_all() -> None:
    with pytest.raises(ConfigError, match="lists no backend"):
        ChainBackend([])
    a, b = Scripted(), Scripted()
    ChainBackend([a, b]).refresh()
    assert (a.refreshes, b.refreshes) == (1, 1)


# -- cache ----------------------------------------------------------------------------


def test_cache_reads_once_within_the_ttl_then_again() -> None:
    inner, clock = Scripted({"k": "v1"}), FakeClock()
    cache = CachedBackend(inner, ttl_s=300, clock=clock)
    assert cache.get("k") == "v1"
    inner.values["k"] = "v2"
    clock.now += 299
    assert cache.get("k") == "v1"
    clock.now += 2
    assert cache.get("k") == "v2"
    assert inner.calls == ["k", "k"]
    assert cache.names == ["k"]


def test_cache_without_ttl_keeps_values_until_refresh() -> None:
    inner, clock = Scripted({"k": "v1", "other": "o"}), FakeClock()
    cache = CachedBackend(inner, ttl_s=0, clock=clock)
    assert cache.get("k") == "v1"
    inner.values["k"] = "rotated"
    clock.now += 10**6
    assert cache.get("k") == "v1"
    cache.refresh()
    assert inner.refreshes == 1
    assert cache.get("k") == "rotated"
    assert inner.calls == ["k", "k"]  # refresh re-reads only what was read before


def test_cache_keeps_the_old_value_when_a_reread_fails(caplog: pytest.LogCaptureFixture) -> None:
    inner, clock = Scripted({"k": VALUE}), FakeClock()
    cache = CachedBackend(inner, ttl_s=1, clock=clock)
    assert cache.get("k") == VALUE
    inner.fail = ConfigError("secret 'k' (vault secrets backend): Vault at x is sealed; unseal it")
    with caplog.at_level(logging.WARNING, logger="tokyo_ia.secrets"):
        cache.refresh()
        clock.now += 5
        assert cache.get("k") == VALUE
    assert "keeping the previous value of 'k'" in caplog.text
    assert VALUE not in caplog.text


def test_cache_raises_when_nothing_is_known_yet() -> None:
    inner = Scripted()
    with pytest.raises(SecretNotFoundError):
        CachedBackend(inner).get("absent")
    assert CachedBackend(inner).names == []


async def test_refresh_periodically_runs_in_a_thread_and_survives_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Failing(Scripted):
        def refresh(self) -> None:
            super().refresh()
            raise ConfigError("secret 'x' (vault secrets backend): unreachable; check addr")

    backend = Failing()
    with caplog.at_level(logging.WARNING, logger="tokyo_ia.secrets"):
        task = asyncio.create_task(refresh_periodically(backend, 0.005))
        for _ in range(400):
            if backend.refreshes >= 3:
                break
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert backend.refreshes >= 3
    assert "periodic refresh failed" in caplog.text


# -- secrets never shown --------------------------------------------------------------


def test_values_and_tokens_never_appear_in_repr_or_str(tmp_path: Path) -> None:
    (tmp_path / "k").write_text(VALUE)
    cache = CachedBackend(ChainBackend([FileBackend(tmp_path), EnvBackend({})]))
    assert cache.get("k") == VALUE
    vault = VaultBackend("http://127.0.0.1:1", TOKEN)
    settings = SecretsSettings.model_validate({"backend": "vault", "vault": {"token": TOKEN}})
    for thing in (cache, vault, settings, settings.vault, cache.inner):
        assert VALUE not in repr(thing)
        assert VALUE not in str(thing)
        assert TOKEN not in repr(thing)
        assert TOKEN not in str(thing)
    assert "cached=1" in repr(cache)


# -- settings and factory -------------------------------------------------------------


def test_settings_defaults_match_the_embedded_default() -> None:
    settings = SecretsSettings()
    assert settings.backend == "chain"
    assert settings.chain == ["file", "env"]
    assert settings.dir == "/run/secrets"
    assert settings.refresh_s == 300
    backend = build_backend(settings)
    assert isinstance(backend.inner, ChainBackend)
    assert [type(b) for b in backend.inner.backends] == [FileBackend, EnvBackend]


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"dirr": "/x"}, "dirr"),
        ({"vault": {"adress": "http://x"}}, "vault.adress"),
        ({"aws": {"regoin": "us-east-1"}}, "aws.regoin"),
        ({"backend": "gcp"}, "backend"),
        ({"chain": ["file", "keychain"]}, "chain.1"),
        ({"refresh_s": -1}, "refresh_s"),
    ],
)
def test_settings_reject_unknown_keys_and_values(data: dict[str, object], where: str) -> None:
    with pytest.raises(ValidationError) as info:
        SecretsSettings.model_validate(data)
    assert where in {".".join(str(p) for p in e["loc"]) for e in info.value.errors()}


def test_settings_reject_an_empty_chain() -> None:
    with pytest.raises(ValidationError, match="lists no backend"):
        SecretsSettings.model_validate({"backend": "chain", "chain": []})


def test_single_backends_are_not_wrapped_in_a_chain(tmp_path: Path) -> None:
    backend = build_backend(SecretsSettings(backend="file", dir=str(tmp_path), refresh_s=5))
    assert isinstance(backend.inner, FileBackend)
    assert backend.ttl_s == 5
    env = build_backend(SecretsSettings(backend="env"), environ={"OPENAI_KEY": VALUE})
    assert env.get("openai-key") == VALUE


def test_vault_settings_fall_back_to_vault_variables() -> None:
    environ = {"VAULT_ADDR": "http://127.0.0.1:8200/", "VAULT_TOKEN": TOKEN, "VAULT_NAMESPACE": "team-a"}
    backend = build_backend(SecretsSettings(backend="vault"), environ=environ).inner
    assert isinstance(backend, VaultBackend)
    assert (backend.addr, backend.namespace, backend.mount) == ("http://127.0.0.1:8200", "team-a", "secret")


@pytest.mark.parametrize(
    ("vault", "environ", "message"),
    [
        ({}, {"VAULT_TOKEN": TOKEN}, r"secrets\.vault\.addr: not set; .* export VAULT_ADDR"),
        ({"addr": "http://127.0.0.1:8200"}, {}, r"secrets\.vault\.token: not set; export VAULT_TOKEN"),
        ({"addr": "vault:8200", "token": TOKEN}, {}, r"secrets\.vault\.addr: 'vault:8200' is not a URL"),
        ({"addr": "https://v:8200", "token": TOKEN, "ca_cert": "/nope.pem"}, {}, r"secrets\.vault\.ca_cert"),
    ],
)
def test_vault_settings_errors_name_the_key_and_fix(
    vault: dict[str, str], environ: dict[str, str], message: str
) -> None:
    settings = SecretsSettings.model_validate({"backend": "vault", "vault": vault})
    with pytest.raises(ConfigError, match=message) as info:
        build_backend(settings, environ=environ)
    assert TOKEN not in str(info.value)


def test_vault_names_split_into_path_and_field() -> None:
    assert split_name("app/openai") == ("app/openai", "value")
    assert split_name("/app/db/#password") == ("app/db", "password")


def test_aws_backend_without_boto3_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(ConfigError, match=r"needs boto3.*pip install 'tokyo-ia\[aws\]'"):
        build_backend(SecretsSettings.model_validate({"backend": "aws", "aws": {"region": "us-east-1"}}))


def test_aws_backend_without_region_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("boto3", reason="boto3 is the optional extra tokyo-ia[aws]")
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # else boto3 asks the EC2 metadata service
    with pytest.raises(ConfigError, match=r"secrets\.aws\.region: not set; .* export AWS_REGION"):
        build_backend(SecretsSettings(backend="aws"))
