"""What an attacker would try against one real gateway, and what they get. One test per attack.

The gateway runs as ``tokyo-ia serve`` (at debug log level, so a leak into any log line would
show) with a master key, a static key limited to the ``demo`` model, an admin port and a
metrics token, and an upstream (the OpenAI emulator) whose credentials come from
``${env:...}``. Other attack-shaped tests live next to the feature they guard:
``test_security.py`` (revocation across replicas, rotation, prompts kept only for
``log_payloads`` keys) and ``tests/integration/test_keys.py`` (key field validation).

=========================================  =================================================
attack                                     expected result
=========================================  =================================================
no key                                     401 ``missing_api_key``
forged key with the ``sk-tia-`` prefix     401 ``invalid_api_key`` (one cached DB lookup)
revoked / disabled key                     401 ``key_revoked`` / ``key_disabled``
expired key                                401 ``key_expired``
model outside the key's scope              403 ``model_not_allowed``; ``/v1/models`` hides it
non-admin key on the admin API             403 ``admin_required``; no key: 401
master key shaped like a virtual key       refused at start-up (config error, key not echoed)
/admin and /metrics on the public port     404 ``unknown_route``; /metrics without token: 401
SQL-injection-shaped names, keys and ids   stored verbatim / 401 / 404; table intact
oversized body                             413 ``request_too_large`` (declared or chunked)
oversized headers                          431 ``headers_too_large``; a flood is cut off early
malformed UTF-8 / lone surrogate in body   400 ``invalid_json``
header injection (CR, LF, NUL, TAB)        400 ``invalid_http`` from the HTTP parser, or 400 ``invalid_header``
timing of key comparison                   SHA-256 digest lookup; metrics token by
                                           ``hmac.compare_digest`` (structural check)
secrets in logs, errors, /admin, /metrics  the provider keys appear nowhere
=========================================  =================================================
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.fakes.base import free_port
from tests.fakes.openai import OpenAIEmulator
from tests.support import GatewayProcess

MASTER = "master-" + uuid.uuid4().hex
APP_KEY = "app-" + uuid.uuid4().hex
METRICS_TOKEN = "metrics-" + uuid.uuid4().hex
UPSTREAM_SECRET = "sk-upstream-" + uuid.uuid4().hex
WRONG_SECRET = "sk-wrong-" + uuid.uuid4().hex
USER = [{"role": "user", "content": "hello"}]
CHAT = {"model": "demo", "messages": USER}


class Gateway:
    def __init__(self, process: GatewayProcess, admin_port: int) -> None:
        self.process = process
        self.url = process.url
        self.admin_url = f"http://127.0.0.1:{admin_port}"

    def chat(self, key: str | None, body: Any = CHAT, **headers: str) -> httpx.Response:
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        return httpx.post(self.url + "/v1/chat/completions", json=body, headers=headers, timeout=10)

    def admin(self, method: str, path: str, key: str = MASTER, **options: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}"}
        return httpx.request(method, self.admin_url + path, headers=headers, timeout=10, **options)

    def new_key(self, **fields: Any) -> dict[str, Any]:
        r = self.admin("POST", "/admin/keys", json={"name": "k", **fields})
        assert r.status_code == 201, r.text
        created: dict[str, Any] = r.json()
        return created


@pytest.fixture(scope="module")
def upstream() -> Iterator[OpenAIEmulator]:
    emu = OpenAIEmulator()
    emu.api_key = UPSTREAM_SECRET
    with emu:
        yield emu


@pytest.fixture(scope="module")
def gw(upstream: OpenAIEmulator) -> Iterator[Gateway]:
    admin_port = free_port()
    up = {"kind": "openai", "base_url": upstream.url + "/v1"}
    config = {
        "server": {"max_body_bytes": 65536, "admin_port": admin_port, "metrics_token": METRICS_TOKEN},
        "auth": {"master_key": MASTER, "keys": [{"key": APP_KEY, "name": "app", "models": ["demo"]}]},
        "providers": {
            "demo": {"kind": "demo"},
            "up": {**up, "api_key": "${env:UPSTREAM_KEY}"},
            "wrong": {**up, "api_key": "${env:WRONG_UPSTREAM_KEY}", "max_retries": 0},
        },
        "models": {
            "demo": [{"provider": "demo", "model": "demo"}],
            "gpt-up": [{"provider": "up", "model": "gpt-4o-mini"}],
            "gpt-wrong": [{"provider": "wrong", "model": "gpt-4o-mini"}],
        },
    }
    env = {"UPSTREAM_KEY": UPSTREAM_SECRET, "WRONG_UPSTREAM_KEY": WRONG_SECRET}
    with GatewayProcess(config, env=env, args=["--log-level", "debug"]) as process:
        yield Gateway(process, admin_port)


def _code(r: httpx.Response) -> str:
    code: str = r.json()["error"]["code"]
    return code


def test_missing_key(gw: Gateway) -> None:
    """No key at all, on the API and on the admin API."""
    r = gw.chat(None)
    assert r.status_code == 401
    assert _code(r) == "missing_api_key"
    assert "Authorization: Bearer" in r.json()["error"]["message"]
    assert httpx.get(gw.admin_url + "/admin/keys").status_code == 401


def test_forged_key_with_the_virtual_prefix(gw: Gateway) -> None:
    """A made-up key that looks like a virtual key, and one that does not."""
    for forged in ("sk-tia-" + "A" * 43, "sk-tia-" + uuid.uuid4().hex, "Bearer", "x" * 10_000):
        r = gw.chat(forged)
        assert r.status_code == 401, forged[:20]
        assert _code(r) == "invalid_api_key"


def test_revoked_and_disabled_keys(gw: Gateway) -> None:
    """A key that worked, then was revoked; another disabled by an administrator."""
    revoked, disabled = gw.new_key(), gw.new_key()
    for created in (revoked, disabled):
        assert gw.chat(created["key"]).status_code == 200
    assert gw.admin("DELETE", f"/admin/keys/{revoked['id']}").status_code == 200
    assert gw.admin("PATCH", f"/admin/keys/{disabled['id']}", json={"enabled": False}).status_code == 200
    r = gw.chat(revoked["key"])
    assert (r.status_code, _code(r)) == (401, "key_revoked")
    r = gw.chat(disabled["key"])
    assert (r.status_code, _code(r)) == (401, "key_disabled")


def test_expired_key(gw: Gateway) -> None:
    """A key whose expiry passed (creating an already-expired key is refused outright)."""
    r = gw.admin("POST", "/admin/keys", json={"name": "old", "expires_at": "2001-01-01T00:00:00Z"})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "expires_at")
    created = gw.new_key(expires_at="2099-01-01T00:00:00Z")
    assert gw.chat(created["key"]).status_code == 200
    r = gw.admin("PATCH", f"/admin/keys/{created['id']}", json={"expires_at": "2001-01-01T00:00:00Z"})
    assert r.status_code == 200
    r = gw.chat(created["key"])
    assert (r.status_code, _code(r)) == (401, "key_expired")


def test_model_outside_the_key_scope(gw: Gateway) -> None:
    """A key allowed only ``demo`` asks for another model, and lists models."""
    r = gw.chat(APP_KEY, {"model": "gpt-up", "messages": USER})
    assert (r.status_code, _code(r)) == (403, "model_not_allowed")
    assert r.json()["error"]["param"] == "model"
    scoped = gw.new_key(models=["demo"])
    r = gw.chat(scoped["key"], {"model": "gpt-up", "messages": USER})
    assert r.status_code == 403
    models = httpx.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {APP_KEY}"}).json()
    assert [m["id"] for m in models["data"]] == ["demo"]


def test_non_admin_key_on_the_admin_api(gw: Gateway) -> None:
    """A valid, non-admin key (static or virtual) calls the admin API."""
    virtual = gw.new_key()
    for key in (APP_KEY, virtual["key"]):
        r = gw.admin("GET", "/admin/keys", key=key)
        assert (r.status_code, _code(r)) == (403, "admin_required")
        r = gw.admin("POST", "/admin/keys", key=key, json={"name": "mine", "admin": True})
        assert r.status_code == 403


def test_master_key_shaped_like_a_virtual_key(tmp_path: Path) -> None:
    """An operator sets a master key with the virtual-key prefix: the gateway refuses to start."""
    master = "sk-tia-" + uuid.uuid4().hex
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"auth": {"master_key": master}}))
    done = subprocess.run(
        [sys.executable, "-m", "tokyo_ia", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "master_key must not start with 'sk-tia-'" in done.stderr
    assert master not in done.stdout + done.stderr


def test_admin_and_metrics_on_the_public_port(gw: Gateway) -> None:
    """The admin API and /metrics are looked for on the public port, or without the token."""
    master = {"authorization": f"Bearer {MASTER}"}
    for path in ("/admin/keys", "/admin/health", "/metrics"):
        r = httpx.get(gw.url + path, headers=master)
        assert (r.status_code, _code(r)) == (404, "unknown_route"), path
    assert httpx.get(gw.admin_url + "/v1/models", headers=master).status_code == 404
    for headers in ({}, master, {"authorization": "Bearer " + METRICS_TOKEN[:-1]}):
        assert httpx.get(gw.admin_url + "/metrics", headers=headers).status_code == 401
    ok = httpx.get(gw.admin_url + "/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"})
    assert ok.status_code == 200
    assert "tokyo_ia_requests_total" in ok.text


def test_sql_injection_shaped_names_keys_and_ids(gw: Gateway) -> None:
    """SQL in a key's name and owner, in a key value, in a key id and in a list filter."""
    evil = "x'); DROP TABLE api_keys; --"
    created = gw.new_key(name=evil, owner="' OR '1'='1")
    assert created["name"] == evil
    assert gw.admin("GET", f"/admin/keys/{created['id']}").json()["owner"] == "' OR '1'='1"
    r = gw.chat("sk-tia-' OR '1'='1' --")
    assert (r.status_code, _code(r)) == (401, "invalid_api_key")
    r = gw.admin("GET", "/admin/keys/key_' OR '1'='1")
    assert (r.status_code, _code(r)) == (404, "not_found")
    r = gw.admin("GET", "/admin/keys", params={"owner": "x' OR 1=1 --"})
    assert r.json()["data"] == []
    listed = gw.admin("GET", "/admin/keys", params={"limit": 1000}).json()["data"]
    assert evil in [k["name"] for k in listed]
    assert gw.chat(created["key"]).status_code == 200  # the table is intact


def test_oversized_body(gw: Gateway) -> None:
    """A body over server.max_body_bytes, declared in content-length or sent chunked."""
    big = {"model": "demo", "messages": [{"role": "user", "content": "x" * 70_000}]}
    r = gw.chat(APP_KEY, big)
    assert (r.status_code, _code(r)) == (413, "request_too_large")
    assert "max_body_bytes" in r.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "demo", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}]}'

    r = httpx.post(
        gw.url + "/v1/chat/completions",
        content=chunks(),
        headers={"authorization": f"Bearer {APP_KEY}", "content-type": "application/json"},
    )
    assert (r.status_code, _code(r)) == (413, "request_too_large")


def _raw(port: int, data: bytes, *, read: int = 4096) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)  # the gateway may answer and close before reading everything
        return sock.recv(read)


def test_oversized_headers(gw: Gateway) -> None:
    """Headers over server.max_header_bytes (16 KiB): a few big ones, and an endless flood."""
    r = httpx.get(gw.url + "/v1/models", headers={"x-padding": "a" * 17_000})
    assert (r.status_code, _code(r)) == (431, "headers_too_large")
    assert "max_header_bytes" in r.json()["error"]["message"]
    flood = b"GET /v1/models HTTP/1.1\r\nhost: x\r\n" + b"".join(
        b"x-h%d: %s\r\n" % (i, b"a" * 8000) for i in range(2000)
    )
    reply = _raw(gw.process.port, flood)  # 16 MB that never end: cut off long before
    assert reply.startswith(b"HTTP/1.1 431 ")
    assert b"headers_too_large" in reply


def test_malformed_utf8_body(gw: Gateway) -> None:
    """Bytes that are not UTF-8, and a JSON escape of a lone UTF-16 surrogate."""
    for body in (
        b'{"model": "demo", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        b'{"model": "demo", "messages": [{"role": "user", "content": "\\ud800"}]}',
    ):
        r = httpx.post(
            gw.url + "/v1/chat/completions",
            content=body,
            headers={"authorization": f"Bearer {APP_KEY}", "content-type": "application/json"},
        )
        assert (r.status_code, _code(r)) == (400, "invalid_json")


def test_header_injection(gw: Gateway) -> None:
    """CR, LF, NUL and TAB smuggled into headers the gateway reads or echoes (x-request-id)."""
    request = b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-request-id: %s\r\n\r\n"
    for value in (b"abc\rdef", b"abc\ndef", b"abc\x00def", b"abc\x1bdef", b"abc\r\n def"):
        reply = _raw(gw.process.port, request % value)
        assert reply.startswith(b"HTTP/1.1 400 "), value  # refused by the HTTP parser itself
        assert b'"code":"invalid_http"' in reply and b"connection: close" in reply
        assert b"def" not in reply
    reply = _raw(gw.process.port, request % b"abc\r\nx-evil: 1")  # CRLF just starts a new header
    assert reply.startswith(b"HTTP/1.1 401 ")
    assert b"x-evil" not in reply
    for header in ("x-request-id", "authorization", "traceparent", "x-api-key"):
        r = gw.chat(None, **{header: "abc\tdef"})
        assert (r.status_code, _code(r)) == (400, "invalid_header"), header
        assert r.json()["error"]["param"] == header
        assert "\t" not in r.headers["x-request-id"]
    r = gw.chat(APP_KEY, **{"x-request-id": "<script>alert(1)</script>"})
    assert r.status_code == 200
    assert "script" not in r.headers["x-request-id"]  # not echoed: a fresh id instead


def test_key_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Timing: keys are never compared byte by byte (a structural check, not a stopwatch).

    Static keys and the master key are found by their SHA-256 in a dict; virtual keys by their
    SHA-256 in the database (the plaintext never reaches a query); the metrics token is
    checked with ``hmac.compare_digest``.
    """
    import asyncio
    import hmac

    from tokyo_ia.config import parse_config
    from tokyo_ia.security import auth
    from tokyo_ia.security.keycache import KeyCache
    from tokyo_ia.server.app import GatewayApp

    config = parse_config({"auth": {"master_key": MASTER, "keys": [{"key": APP_KEY, "name": "app"}]}})
    looked_up: list[str] = []

    class Service:
        def on_change(self, listener: object) -> None:
            pass

        async def lookup(self, key_hash: str) -> None:
            looked_up.append(key_hash)

    authenticator = auth.Authenticator(config.auth, virtual=KeyCache(Service()))  # type: ignore[arg-type]
    assert all(len(d) == 64 and d not in (MASTER, APP_KEY) for d in authenticator._keys)
    assert asyncio.run(authenticator.authenticate(MASTER)).key_id == "master"
    forged = "sk-tia-" + "B" * 43
    with pytest.raises(Exception, match="not valid"):
        asyncio.run(authenticator.authenticate(forged))
    assert looked_up == [auth.digest(forged)]

    compared: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    app = GatewayApp(parse_config({"server": {"metrics_token": METRICS_TOKEN}}))
    ctx = type("Ctx", (), {"api_key": "guess"})()
    with pytest.raises(Exception, match="metrics token"):
        asyncio.run(app.metrics(None, ctx))  # type: ignore[arg-type]
    assert compared == [(auth.digest("guess"), auth.digest(METRICS_TOKEN))]


def test_secrets_absent_from_logs_errors_admin_and_metrics(gw: Gateway) -> None:
    """Provider keys from ${env:...} must never show: not in logs, error bodies, /admin, /metrics."""
    ok = gw.chat(APP_KEY, {"model": "demo", "messages": USER})
    assert ok.status_code == 200
    seen = [ok.text, str(ok.headers)]
    master = {"authorization": f"Bearer {MASTER}"}
    r = httpx.post(
        gw.url + "/v1/chat/completions", headers=master, json={"model": "gpt-up", "messages": USER}
    )
    assert r.status_code == 200, r.text  # the right upstream key was used...
    r = httpx.post(
        gw.url + "/v1/chat/completions", headers=master, json={"model": "gpt-wrong", "messages": USER}
    )
    assert r.status_code in (502, 503), r.text  # ...a wrong one is refused (or its circuit opened)
    seen += [r.text, str(r.headers)]
    for path in ("/admin/keys", "/admin/health", "/admin/cache"):
        seen.append(gw.admin("GET", path).text)
    seen.append(
        httpx.get(gw.admin_url + "/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"}).text
    )
    seen.append(gw.process.log)
    everything = "\n".join(seen)
    for secret in (UPSTREAM_SECRET, WRONG_SECRET, MASTER, METRICS_TOKEN):
        assert secret not in everything
