"""The /admin/keys routes over a real KeyService on a temporary SQLite database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tokyo_ia.errors import (
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
)
from tokyo_ia.pipeline import RequestContext
from tokyo_ia.security.auth import Principal, digest
from tokyo_ia.security.keys import KeyService
from tokyo_ia.server.admin import AdminRoutes
from tokyo_ia.server.app import Request
from tokyo_ia.store import create_engine, session_factory, upgrade

MASTER = Principal(key_id="master", name="master", admin=True)
APP = Principal(key_id="static:app", name="app")


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[KeyService]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'admin.db'}"
    await upgrade(url)
    engine = create_engine(url)
    yield KeyService(session_factory(engine))
    await engine.dispose()


@pytest.fixture
def admin(service: KeyService) -> AdminRoutes:
    return AdminRoutes(service)


def _request(body: Any = None, query: str = "") -> Request:
    raw = b"" if body is None else orjson.dumps(body)
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    scope = {"type": "http", "headers": [], "query_string": query.encode()}
    return Request(scope, receive, max_body=1 << 20)


async def _call(
    admin: AdminRoutes,
    method: str,
    path: str,
    body: Any = None,
    *,
    query: str = "",
    who: Principal | None = MASTER,
) -> tuple[int, Any]:
    ctx = RequestContext(request_id="test", api_key=None, principal=who)
    reply = await admin.dispatch(method, path, _request(body, query), ctx)
    assert isinstance(reply, tuple)
    return reply


ROUTES = [
    ("POST", "/admin/keys", {"name": "x"}),
    ("GET", "/admin/keys", None),
    ("GET", "/admin/keys/key_1", None),
    ("PATCH", "/admin/keys/key_1", {"rpm": 1}),
    ("DELETE", "/admin/keys/key_1", None),
    ("POST", "/admin/keys/key_1/rotate", None),
    ("GET", "/admin/keys/nope/nope/nope", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_non_admin_callers_are_refused_before_anything_happens(
    admin: AdminRoutes, service: KeyService, method: str, path: str, body: Any
) -> None:
    with pytest.raises(PermissionDeniedError, match="master key or an admin key") as info:
        await _call(admin, method, path, body, who=APP)
    assert info.value.status == 403
    with pytest.raises(AuthenticationError):
        await _call(admin, method, path, body, who=None)
    assert await service.list(include_revoked=True) == []


async def test_an_admin_scoped_virtual_key_may_manage_keys(admin: AdminRoutes, service: KeyService) -> None:
    plaintext, _ = await service.create("ops", admin=True)
    ops = await service.authenticate(plaintext)
    assert ops is not None
    assert ops.admin
    status, body = await _call(admin, "POST", "/admin/keys", {"name": "made-by-ops"}, who=ops)
    assert status == 201
    assert body["name"] == "made-by-ops"
    plain_user, _ = await service.create("user")
    user = await service.authenticate(plain_user)
    with pytest.raises(PermissionDeniedError):
        await _call(admin, "GET", "/admin/keys", who=user)


async def test_key_life_cycle_over_the_api(admin: AdminRoutes, service: KeyService) -> None:
    status, created = await _call(
        admin,
        "POST",
        "/admin/keys",
        {"name": "bot", "models": ["gpt-*"], "rpm": 10, "expires_at": "2099-01-01T00:00:00Z"},
    )
    assert status == 201
    assert created["key"].startswith("sk-tia-")
    assert "warning" in created
    key_id, plaintext = created["id"], created["key"]
    assert created["expires_at"] == "2099-01-01T00:00:00Z"
    assert created["status"] == "active"

    status, listing = await _call(admin, "GET", "/admin/keys")
    assert status == 200
    assert [k["id"] for k in listing["data"]] == [key_id]
    status, one = await _call(admin, "GET", f"/admin/keys/{key_id}/")
    assert one["models"] == ["gpt-*"]
    assert "key" not in one

    status, patched = await _call(admin, "PATCH", f"/admin/keys/{key_id}", {"rpm": None, "team": "t"})
    assert (status, patched["rpm"], patched["team"]) == (200, None, "t")

    status, rotated = await _call(admin, "POST", f"/admin/keys/{key_id}/rotate")
    assert status == 201
    assert rotated["rotated_from"] == key_id
    assert rotated["key"] != plaintext
    status, revoked = await _call(admin, "DELETE", f"/admin/keys/{rotated['id']}")
    assert (status, revoked["status"]) == (200, "revoked")

    _, active = await _call(admin, "GET", "/admin/keys")
    assert active["data"] == []
    _, everything = await _call(admin, "GET", "/admin/keys", query="include_revoked=true&limit=10")
    assert len(everything["data"]) == 2
    _, filtered = await _call(admin, "GET", "/admin/keys", query="include_revoked=1&team=t")
    assert [k["id"] for k in filtered["data"]] == [key_id, rotated["id"]]


async def test_responses_never_carry_a_secret_or_its_digest(admin: AdminRoutes) -> None:
    _, created = await _call(admin, "POST", "/admin/keys", {"name": "a"})
    secret, key_id = created["key"], created["id"]
    replies = [
        await _call(admin, "GET", "/admin/keys"),
        await _call(admin, "GET", f"/admin/keys/{key_id}"),
        await _call(admin, "PATCH", f"/admin/keys/{key_id}", {"rpm": 5}),
        await _call(admin, "DELETE", f"/admin/keys/{key_id}"),
    ]
    text = orjson.dumps([body for _, body in replies]).decode() + orjson.dumps(created).decode()
    assert digest(secret) not in text
    assert "key_hash" not in text
    assert secret not in orjson.dumps([body for _, body in replies]).decode()


@pytest.mark.parametrize(
    ("method", "path", "body", "query", "error", "match"),
    [
        (
            "POST",
            "/admin/keys",
            {"name": "a", "key_hash": "0" * 64},
            "",
            InvalidRequestError,
            "^key_hash: unknown",
        ),
        (
            "POST",
            "/admin/keys",
            {"name": "a", "enabled": False},
            "",
            InvalidRequestError,
            "^enabled: unknown",
        ),
        ("POST", "/admin/keys", {"rpm": 5}, "", InvalidRequestError, "^name: required"),
        ("POST", "/admin/keys", {"name": "a", "rpm": -5}, "", InvalidRequestError, "^rpm: "),
        ("POST", "/admin/keys", ["name"], "", InvalidRequestError, "JSON object"),
        ("POST", "/admin/keys", None, "", InvalidRequestError, "body is empty"),
        ("PATCH", "/admin/keys/key_nope", {"rpm": 5}, "", NotFoundError, "no API key"),
        ("GET", "/admin/keys", None, "limit=abc", InvalidRequestError, "^limit: "),
        ("GET", "/admin/keys", None, "limit=5000", InvalidRequestError, "^limit: "),
        ("GET", "/admin/keys", None, "sort=name", InvalidRequestError, "^sort: unknown"),
        ("PUT", "/admin/keys", None, "", InvalidRequestError, "PUT is not allowed"),
        ("GET", "/admin/keys/key_1/rotate", None, "", InvalidRequestError, "GET is not allowed"),
        ("GET", "/admin/keysets", None, "", NotFoundError, "no admin route"),
        ("GET", "/admin/keys/a/b", None, "", NotFoundError, "no admin route"),
    ],
)
async def test_bad_calls_get_precise_errors(
    admin: AdminRoutes, method: str, path: str, body: Any, query: str, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        await _call(admin, method, path, body, query=query)


async def test_method_not_allowed_is_a_405(admin: AdminRoutes) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await _call(admin, "PUT", "/admin/keys/key_1")
    assert info.value.status == 405


def test_handles_only_its_own_paths() -> None:
    assert AdminRoutes.handles("/admin/keys")
    assert AdminRoutes.handles("/admin/keys/key_1/rotate")
    assert not AdminRoutes.handles("/admin/keysets")
    assert not AdminRoutes.handles("/admin/health")
