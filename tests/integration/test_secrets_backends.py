"""Secrets backends against real servers on loopback: a Vault KV v2 emulator and moto's AWS server.

Also resolves ``${secret:...}`` in a YAML config end to end through ``tokyo_ia.config``.
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fakes.base import free_port
from tests.fakes.vault import ROOT_TOKEN, VaultEmulator
from tokyo_ia.config import load_config, parse_config
from tokyo_ia.errors import ConfigError
from tokyo_ia.security.secrets import (
    CachedBackend,
    ChainBackend,
    EnvBackend,
    SecretNotFoundError,
    SecretsSettings,
    build_backend,
)
from tokyo_ia.security.secrets_vault import VaultBackend

VALUE = "sk-integration-secret-9876"


# -- Vault ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vault_server() -> Iterator[VaultEmulator]:
    with VaultEmulator() as emu:
        yield emu


@pytest.fixture
def vault(vault_server: VaultEmulator) -> VaultEmulator:
    vault_server.reset()
    vault_server.sealed = False
    vault_server.mounts = {("", "secret"): {}}
    vault_server.tokens = {ROOT_TOKEN: ["*"]}
    return vault_server


def _vault_backend(emu: VaultEmulator, token: str = ROOT_TOKEN, **kw: Any) -> VaultBackend:
    return VaultBackend(emu.url, token, timeout_s=2, **kw)


def test_vault_reads_the_value_field_with_the_token(vault: VaultEmulator) -> None:
    vault.put("tokyo/openai", {"value": VALUE})
    assert _vault_backend(vault).get("tokyo/openai") == VALUE
    request = vault.requests[-1]
    assert (request.method, request.path) == ("GET", "/v1/secret/data/tokyo/openai")
    assert request.headers["X-Vault-Token"] == ROOT_TOKEN
    assert "X-Vault-Namespace" not in request.headers


def test_vault_picks_a_field_and_reads_the_latest_version(vault: VaultEmulator) -> None:
    vault.put("db", {"username": "app", "password": "old"})
    vault.put("db", {"username": "app", "password": VALUE, "port": 5432})
    backend = _vault_backend(vault)
    assert backend.get("db#password") == VALUE
    assert backend.get("db#port") == "5432"
    with pytest.raises(SecretNotFoundError) as info:
        backend.get("db#pasword")
    assert "has no field 'pasword' (its fields: password, port, username)" in str(info.value)
    assert VALUE not in str(info.value)


def test_vault_missing_secret_says_how_to_write_it(vault: VaultEmulator) -> None:
    with pytest.raises(
        SecretNotFoundError, match=r"nothing at secret/data/absent; write it with `vault kv put"
    ):
        _vault_backend(vault).get("absent")


def test_vault_deleted_latest_version_is_reported_as_deleted(vault: VaultEmulator) -> None:
    vault.put("gone", {"value": VALUE})
    vault.delete("gone")
    with pytest.raises(SecretNotFoundError, match="latest version at secret/data/gone is deleted"):
        _vault_backend(vault).get("gone")


@pytest.mark.parametrize("token", ["hvs.wrong-token", "hvs.limited-token"])
def test_vault_bad_token_or_policy_is_permission_denied(vault: VaultEmulator, token: str) -> None:
    vault.put("tokyo/openai", {"value": VALUE})
    vault.add_token("hvs.limited-token", "secret/data/other/*")
    with pytest.raises(ConfigError) as info:
        _vault_backend(vault, token).get("tokyo/openai")
    message = str(info.value)
    assert "Vault denied reading secret/data/tokyo/openai (permission denied)" in message
    assert "grants 'read' on secret/data/tokyo/openai" in message
    assert not isinstance(info.value, SecretNotFoundError)
    assert token not in message
    assert VALUE not in message


def test_vault_sealed_says_to_unseal(vault: VaultEmulator) -> None:
    vault.put("tokyo/openai", {"value": VALUE})
    vault.sealed = True
    with pytest.raises(ConfigError, match=r"is sealed or unavailable \(Vault is sealed\); unseal it"):
        _vault_backend(vault).get("tokyo/openai")


def test_vault_unreachable_names_the_address() -> None:
    addr = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match=r"Vault at http://127\.0\.0\.1:\d+ is unreachable .*VAULT_ADDR"):
        VaultBackend(addr, ROOT_TOKEN, timeout_s=2).get("tokyo/openai")


def test_vault_namespace_and_mount_select_where_to_read(vault: VaultEmulator) -> None:
    vault.put("tokyo/openai", {"value": VALUE}, mount="kv", namespace="team-a")
    backend = _vault_backend(vault, mount="kv", namespace="team-a")
    assert backend.get("tokyo/openai") == VALUE
    assert vault.requests[-1].path == "/v1/kv/data/tokyo/openai"
    assert vault.requests[-1].headers["X-Vault-Namespace"] == "team-a"
    with pytest.raises(SecretNotFoundError, match=r"no handler for route|nothing at kv/data"):
        _vault_backend(vault, mount="kv").get("tokyo/openai")


def test_vault_cache_refresh_picks_up_a_rotation_and_survives_a_seal(vault: VaultEmulator) -> None:
    vault.put("tokyo/openai", {"value": "v1"})
    cache = CachedBackend(_vault_backend(vault), ttl_s=0)
    assert cache.get("tokyo/openai") == "v1"
    vault.put("tokyo/openai", {"value": "v2"})
    assert cache.get("tokyo/openai") == "v1"
    cache.refresh()
    assert cache.get("tokyo/openai") == "v2"
    vault.sealed = True
    cache.refresh()
    assert cache.get("tokyo/openai") == "v2"


def test_vault_in_a_chain_falls_back_only_when_absent(vault: VaultEmulator) -> None:
    chain = ChainBackend([_vault_backend(vault), EnvBackend({"TOKYO_OPENAI": "from-env"})])
    assert chain.get("tokyo-openai") == "from-env"
    vault.sealed = True
    with pytest.raises(ConfigError, match="sealed"):
        chain.get("tokyo-openai")


def test_vault_emulator_answers_in_the_documented_shape(vault: VaultEmulator) -> None:
    """The emulator against the sample response of Vault's KV v2 API reference (read secret version)."""
    documented: dict[str, Any] = {
        "data": {
            "data": {"foo": "bar"},
            "metadata": {
                "created_time": "2018-03-22T02:24:06.945319214Z",
                "custom_metadata": {"owner": "jdoe"},
                "deletion_time": "",
                "destroyed": False,
                "version": 2,
            },
        }
    }
    import urllib.request

    for _ in range(2):
        body = json.dumps({"data": {"foo": "bar"}}).encode()
        put = urllib.request.Request(
            f"{vault.url}/v1/secret/data/my-secret",
            data=body,
            method="POST",
            headers={"X-Vault-Token": ROOT_TOKEN},
        )
        with urllib.request.urlopen(put, timeout=2) as resp:
            assert json.loads(resp.read())["data"]["version"] >= 1
    get = urllib.request.Request(
        f"{vault.url}/v1/secret/data/my-secret", headers={"X-Vault-Token": ROOT_TOKEN}
    )
    with urllib.request.urlopen(get, timeout=2) as resp:
        answer = json.loads(resp.read())
    assert answer["data"]["data"] == documented["data"]["data"]
    assert set(answer["data"]["metadata"]) == set(documented["data"]["metadata"])
    assert answer["data"]["metadata"]["version"] == 2
    assert {"request_id", "lease_id", "renewable", "lease_duration", "wrap_info", "warnings"} <= set(answer)


# -- AWS Secrets Manager (moto server) ------------------------------------------------


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    pytest.importorskip("boto3", reason="boto3 is the optional extra tokyo-ia[aws]")
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is a dev dependency")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws(moto_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """Dummy credentials only, no profile, no EC2 metadata: nothing may leave loopback."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    for var in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    boto3 = pytest.importorskip("boto3")
    return boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=moto_url)


def _aws_backend(moto_url: str) -> Any:
    settings = SecretsSettings.model_validate(
        {"backend": "aws", "aws": {"region": "us-east-1", "endpoint_url": moto_url, "timeout_s": 2}}
    )
    return build_backend(settings).inner


def _name() -> str:
    return f"tokyo/{uuid.uuid4().hex[:8]}"


def test_aws_reads_a_secret_string(aws: Any, moto_url: str) -> None:
    name = _name()
    aws.create_secret(Name=name, SecretString=VALUE)
    backend = _aws_backend(moto_url)
    assert backend.get(name) == VALUE
    assert VALUE not in repr(backend)


def test_aws_json_key_picks_one_value(aws: Any, moto_url: str) -> None:
    name = _name()
    aws.create_secret(Name=name, SecretString=json.dumps({"api_key": VALUE, "org": "o-1", "n": 3}))
    backend = _aws_backend(moto_url)
    assert backend.get(f"{name}#api_key") == VALUE
    assert backend.get(f"{name}#n") == "3"
    with pytest.raises(SecretNotFoundError) as info:
        backend.get(f"{name}#apikey")
    assert "has no key 'apikey' (its keys: api_key, n, org)" in str(info.value)
    assert VALUE not in str(info.value)


def test_aws_json_key_on_a_plain_secret_is_explained(aws: Any, moto_url: str) -> None:
    name = _name()
    aws.create_secret(Name=name, SecretString=VALUE)
    with pytest.raises(ConfigError, match="is not a JSON object, so '#key' cannot pick a key") as info:
        _aws_backend(moto_url).get(f"{name}#key")
    assert VALUE not in str(info.value)


def test_aws_binary_secret_is_explained(aws: Any, moto_url: str) -> None:
    name = _name()
    aws.create_secret(Name=name, SecretBinary=b"\x00\x01")
    with pytest.raises(ConfigError, match="holds a binary secret; store the value as SecretString"):
        _aws_backend(moto_url).get(name)


def test_aws_missing_secret_says_how_to_create_it(aws: Any, moto_url: str) -> None:
    with pytest.raises(SecretNotFoundError, match=r"no secret 'tokyo/absent' in us-east-1; create it with"):
        _aws_backend(moto_url).get("tokyo/absent")


def test_aws_unreachable_endpoint(aws: Any) -> None:
    with pytest.raises(ConfigError, match=r"http://127\.0\.0\.1:\d+ is unreachable"):
        _aws_backend(f"http://127.0.0.1:{free_port()}").get("tokyo/x")


def test_aws_requests_never_leave_loopback(aws: Any, moto_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name = _name()
    aws.create_secret(Name=name, SecretString=VALUE)
    seen: list[Any] = []
    guarded_connect, guarded_resolve = socket.socket.connect, socket.getaddrinfo

    def connect(self: socket.socket, address: Any) -> None:
        seen.append(address)
        return guarded_connect(self, address)

    def resolve(host: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(host)
        return guarded_resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    assert _aws_backend(moto_url).get(name) == VALUE
    port = int(moto_url.rsplit(":", 1)[1])
    assert seen, "the backend made no connection at all"
    for item in seen:
        host = item[0] if isinstance(item, tuple) else item
        assert host in ("127.0.0.1", "localhost"), f"non-loopback connection: {item!r}"
        if isinstance(item, tuple):
            assert item[1] == port


# -- end to end through the YAML config -----------------------------------------------


def test_yaml_secret_reference_from_the_secrets_directory(tmp_path: Path) -> None:
    """The default chain reads ``dir`` first, then the environment."""
    (tmp_path / "openai-key").write_text(f"{VALUE}\n")
    path = tmp_path / "tokyo-ia.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "secrets": {"dir": str(tmp_path)},
                "providers": {"openai": {"kind": "openai", "api_key": "${secret:openai-key}"}},
            }
        )
    )
    config = load_config(path)
    api_key = config.providers["openai"].api_key
    assert api_key is not None
    assert api_key.get_secret_value() == VALUE
    assert VALUE not in repr(config)


def test_yaml_secret_reference_resolved_from_vault(
    vault: VaultEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    vault.put("openai-key", {"value": VALUE})
    vault.put("anthropic", {"api_key": "sk-ant-test"})
    monkeypatch.setenv("TOKYO_TEST_VAULT_TOKEN", ROOT_TOKEN)
    text = f"""
secrets:
  backend: vault
  vault: {{addr: "{vault.url}", token: "${{env:TOKYO_TEST_VAULT_TOKEN}}", timeout_s: 2}}
providers:
  openai: {{kind: openai, api_key: "${{secret:openai-key}}"}}
  other: {{kind: openai, api_key: "${{secret:anthropic#api_key}}"}}
"""
    config = parse_config(yaml.safe_load(text))
    openai_key, other_key = config.providers["openai"].api_key, config.providers["other"].api_key
    assert openai_key is not None
    assert openai_key.get_secret_value() == VALUE
    assert other_key is not None
    assert other_key.get_secret_value() == "sk-ant-test"
    assert VALUE not in repr(config)
    assert ROOT_TOKEN not in repr(config)
    vault.sealed = True
    with pytest.raises(ConfigError, match=r"providers\.openai\.api_key: .*sealed") as info:
        parse_config(yaml.safe_load(text))
    assert ROOT_TOKEN not in str(info.value)
