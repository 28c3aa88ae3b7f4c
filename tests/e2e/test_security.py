"""Authentication, key scopes, the admin API and shared rate limits, as a client sees them."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
import redis

from tests.support import GatewayProcess, sdk_client

MASTER = "master-" + uuid.uuid4().hex
APP_KEY = "app-" + uuid.uuid4().hex
USER = [{"role": "user", "content": "hello"}]
REDIS_URL = os.environ.get("TOKYO_IA_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _config(**extra: Any) -> dict[str, Any]:
    return {
        "auth": {
            "master_key": MASTER,
            "keys": [{"key": APP_KEY, "name": "app", "models": ["demo"]}],
        },
        "providers": {"demo": {"kind": "demo"}},
        "models": {
            "demo": [{"provider": "demo", "model": "demo"}],
            "other": [{"provider": "demo", "model": "demo"}],
        },
        **extra,
    }


@pytest.fixture(scope="module")
def gw() -> Iterator[GatewayProcess]:
    with GatewayProcess(_config()) as gateway:
        yield gateway


def sdk(gw: GatewayProcess, key: str) -> openai.OpenAI:
    client: openai.OpenAI = sdk_client(gw.url, key)
    return client


def test_missing_unknown_and_valid_keys(gw: GatewayProcess) -> None:
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "demo", "messages": USER})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "missing_api_key"
    with pytest.raises(openai.AuthenticationError):
        sdk(gw, "sk-tia-forged" + "x" * 40).chat.completions.create(model="demo", messages=USER)  # type: ignore[arg-type]
    reply = sdk(gw, APP_KEY).chat.completions.create(model="demo", messages=USER)  # type: ignore[arg-type]
    assert reply.choices[0].message.content
    r = httpx.post(
        gw.url + "/v1/chat/completions",
        headers={"x-api-key": APP_KEY},
        json={"model": "demo", "messages": USER},
    )
    assert r.status_code == 200


def test_model_outside_the_key_scope_is_403(gw: GatewayProcess) -> None:
    with pytest.raises(openai.PermissionDeniedError, match="may not use model 'other'"):
        sdk(gw, APP_KEY).chat.completions.create(model="other", messages=USER)  # type: ignore[arg-type]
    assert [m.id for m in sdk(gw, APP_KEY).models.list()] == ["demo"]


def test_admin_api_needs_an_admin_key(gw: GatewayProcess) -> None:
    r = httpx.get(gw.url + "/admin/keys", headers={"authorization": f"Bearer {APP_KEY}"})
    assert r.status_code == 403
    r = httpx.get(gw.url + "/admin/keys")
    assert r.status_code == 401


def test_virtual_key_lifecycle_through_the_admin_api(gw: GatewayProcess) -> None:
    admin = {"authorization": f"Bearer {MASTER}"}
    r = httpx.post(gw.url + "/admin/keys", headers=admin, json={"name": "svc", "models": ["demo"]})
    assert r.status_code == 201, r.text
    created = r.json()
    key = created["key"]
    assert key.startswith("sk-tia-")
    assert "hash" not in str(created).lower() or "key_hash" not in created
    assert sdk(gw, key).chat.completions.create(model="demo", messages=USER)  # type: ignore[arg-type]
    listed = httpx.get(gw.url + "/admin/keys", headers=admin).json()
    assert key not in str(listed)
    r = httpx.post(gw.url + f"/admin/keys/{created['id']}/rotate", headers=admin)
    assert r.status_code == 201
    new_key = r.json()["key"]
    with pytest.raises(openai.AuthenticationError) as info:
        sdk(gw, key).chat.completions.create(model="demo", messages=USER)  # type: ignore[arg-type]
    assert info.value.code == "key_revoked"
    assert sdk(gw, new_key).chat.completions.create(model="demo", messages=USER)  # type: ignore[arg-type]
    new_id = r.json()["id"]
    assert httpx.delete(gw.url + f"/admin/keys/{new_id}", headers=admin).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        sdk(gw, new_key).chat.completions.create(model="demo", messages=USER)  # type: ignore[arg-type]


def test_expired_key_is_refused(gw: GatewayProcess) -> None:
    admin = {"authorization": f"Bearer {MASTER}"}
    r = httpx.post(
        gw.url + "/admin/keys", headers=admin, json={"name": "old", "expires_at": "2001-01-01T00:00:00Z"}
    )
    if r.status_code == 400:  # creating an already-expired key may be refused outright
        assert "expires_at" in r.text
        return
    with pytest.raises(openai.AuthenticationError) as info:
        sdk(gw, r.json()["key"]).chat.completions.create(model="demo", messages=USER)  # type: ignore[arg-type]
    assert info.value.code == "key_expired"


def _redis_or_skip() -> None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except (redis.RedisError, OSError) as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"Redis not reachable at {REDIS_URL}: {exc} (CI=true)")
        pytest.skip(f"!!! Redis not reachable at {REDIS_URL}: {exc}")


def test_two_gateways_share_one_redis_rate_limit() -> None:
    _redis_or_skip()
    name = "shared-" + uuid.uuid4().hex[:8]
    key = "k-" + uuid.uuid4().hex
    config = _config(redis={"url": REDIS_URL})
    config["auth"]["keys"] = [{"key": key, "name": name, "models": ["*"], "rpm": 6}]
    with GatewayProcess(config) as a, GatewayProcess(config) as b:

        def call(gw: GatewayProcess) -> httpx.Response:
            return httpx.post(
                gw.url + "/v1/chat/completions",
                headers={"authorization": f"Bearer {key}"},
                json={"model": "demo", "messages": USER},
                timeout=10,
            )

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(call, [a, b] * 6))
    ok = [r for r in responses if r.status_code == 200]
    limited = [r for r in responses if r.status_code == 429]
    assert len(ok) == 6, [r.status_code for r in responses]
    assert len(limited) == 6
    assert {r.headers.get("x-tokyo-ia-provider") for r in ok} == {"demo"}
    for r in limited:
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["x-ratelimit-limit-requests"] == "6"
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert name in r.json()["error"]["message"]
    assert ok[0].headers["x-ratelimit-limit-requests"] == "6"
