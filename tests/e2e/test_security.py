"""Authentication, the admin API, revocation and limits across replicas, audited payloads.

The attacks (missing, forged, revoked or expired keys, scopes, injections, oversized input,
leaks) are listed and tried in ``test_attacks.py``.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fakes.base import free_port
from tests.support import REDIS_URL, GatewayProcess, require_redis, sdk_client

MASTER = "master-" + uuid.uuid4().hex
APP_KEY = "app-" + uuid.uuid4().hex
USER = [{"role": "user", "content": "hello"}]


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


def test_a_key_by_bearer_or_x_api_key(gw: GatewayProcess) -> None:
    reply = sdk(gw, APP_KEY).chat.completions.create(model="demo", messages=USER)  # type: ignore[arg-type]
    assert reply.choices[0].message.content
    r = httpx.post(
        gw.url + "/v1/chat/completions",
        headers={"x-api-key": APP_KEY},
        json={"model": "demo", "messages": USER},
    )
    assert r.status_code == 200


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


def test_two_gateways_share_one_redis_rate_limit() -> None:
    require_redis()
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


def test_a_revocation_reaches_every_replica_through_redis(tmp_path: Path) -> None:
    """Two gateways, one database, one Redis; keys cached for 300 s: the revocation made on
    gateway A is in force on gateway B at once, because A announced it (security/keysync.py)."""
    require_redis()
    config = _config(redis={"url": REDIS_URL}, store={"url": f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"})
    config["auth"]["key_cache_ttl_s"] = 300
    with GatewayProcess(config) as a, GatewayProcess(config) as b:
        admin = {"authorization": f"Bearer {MASTER}"}
        created = httpx.post(a.url + "/admin/keys", headers=admin, json={"name": "svc"}).json()

        def call_b() -> httpx.Response:
            return httpx.post(
                b.url + "/v1/chat/completions",
                headers={"authorization": f"Bearer {created['key']}"},
                json={"model": "demo", "messages": USER},
            )

        assert call_b().status_code == 200  # B now trusts the key for 300 s...
        assert httpx.delete(a.url + f"/admin/keys/{created['id']}", headers=admin).status_code == 200
        deadline = time.monotonic() + 10
        while (r := call_b()).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (r.status_code, r.json()["error"]["code"]) == (401, "key_revoked")  # ...unless told


def test_an_admin_port_with_two_workers() -> None:
    """server.admin_port: each worker serves both sockets; /admin and /metrics only on the admin one."""
    admin_port = free_port()
    with GatewayProcess(_config(server={"workers": 2, "admin_port": admin_port})) as gw:
        admin_url = f"http://127.0.0.1:{admin_port}"
        master = {"authorization": f"Bearer {MASTER}"}
        assert f"admin: /admin/* and /metrics only on http://127.0.0.1:{admin_port}" in gw.log
        for _ in range(4):  # new connections, spread over the workers
            assert httpx.get(admin_url + "/metrics").status_code == 200
            assert httpx.get(admin_url + "/admin/keys", headers=master).status_code == 200
            assert httpx.get(admin_url + "/v1/models", headers=master).status_code == 404
            assert httpx.get(gw.url + "/metrics").status_code == 404
            assert httpx.get(gw.url + "/admin/keys", headers=master).status_code == 404
            assert httpx.get(gw.url + "/v1/models", headers=master).status_code == 200


def _audit_rows(db: Path) -> list[tuple[str | None, dict[str, Any]]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT actor_key_id, detail FROM audit_log WHERE action = 'request'").fetchall()
    return [(key_id, json.loads(detail or "{}")) for key_id, detail in rows]


def test_prompts_are_audited_only_for_keys_with_log_payloads() -> None:
    """A key created with log_payloads has its prompts and answers (cut to audit.max_payload_bytes)
    in the audit trail; any other key's prompt appears nowhere: not in the database, not in logs."""
    marker = uuid.uuid4().hex
    kept, hidden = f"keep-{marker}", f"hide-{marker}"
    with GatewayProcess(_config(audit={"max_payload_bytes": 300, "flush_interval_s": 0.05})) as gw:
        admin = {"authorization": f"Bearer {MASTER}"}
        logged = httpx.post(gw.url + "/admin/keys", headers=admin, json={"name": "l", "log_payloads": True})
        quiet = httpx.post(gw.url + "/admin/keys", headers=admin, json={"name": "q"})
        loud, silent = sdk(gw, logged.json()["key"]), sdk(gw, quiet.json()["key"])
        loud.chat.completions.create(model="demo", messages=[{"role": "user", "content": kept}])
        text = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in loud.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": kept + "-stream"}], stream=True
            )
            if chunk.choices
        )
        assert kept in text
        loud.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x" * 1000}])
        silent.chat.completions.create(model="demo", messages=[{"role": "user", "content": hidden}])
        silent.embeddings.create(model="demo", input=hidden)
    db = gw.dir / "tokyo-ia.db"
    rows = _audit_rows(db)
    payloads = [d["payload"] for key_id, d in rows if key_id == logged.json()["id"]]
    assert len(payloads) == 3
    assert kept in payloads[0]["request"] and f"You said: {kept}" in payloads[0]["response"]
    assert kept + "-stream" in payloads[1]["request"] and kept in payloads[1]["response"]
    assert payloads[2]["truncated"] is True and len(payloads[2]["request"].encode()) <= 300
    assert [d for key_id, d in rows if key_id == quiet.json()["id"] and "payload" in d] == []
    assert hidden.encode() not in db.read_bytes()
    assert hidden not in gw.log
