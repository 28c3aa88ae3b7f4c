"""The admin API for virtual keys: thin handlers over :class:`~tokyo_ia.security.keys.KeyService`.

::

    POST   /admin/keys               create; the only response that ever shows the key (201)
    GET    /admin/keys               list (?owner= &team= &include_revoked=true &limit= &offset=)
    GET    /admin/keys/{id}          one key
    PATCH  /admin/keys/{id}          change fields (JSON object of the fields to change)
    DELETE /admin/keys/{id}          revoke (the row stays, for the audit trail)
    POST   /admin/keys/{id}/rotate   revoke and issue a replacement with the same settings (201)

Only the master key or an admin-scoped key may call these; the check comes before routing, so
other callers learn nothing about which keys or routes exist. Responses carry the public view
of a key (:meth:`KeyRecord.to_dict`): never its digest, never a provider secret.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from ..errors import AuthenticationError, InvalidRequestError, NotFoundError, PermissionDeniedError
from ..security.keys import CREATABLE, KeyRecord, KeyService

if TYPE_CHECKING:
    from ..pipeline import RequestContext
    from .app import Reply, Request

PREFIX = "/admin/keys"
_LIST_PARAMS = ("owner", "team", "include_revoked", "limit", "offset")


def require_admin(ctx: RequestContext) -> None:
    """Fail unless the authenticated caller is the master key or an admin-scoped key."""
    principal = ctx.principal
    if principal is None:
        raise AuthenticationError(
            "the admin API needs the master key or an admin key; send 'Authorization: Bearer KEY'",
            code="missing_api_key",
        )
    if not principal.admin:
        raise PermissionDeniedError(
            f"the admin API needs the master key or an admin key; key '{principal.name}' is not one",
            code="admin_required",
        )


class AdminRoutes:
    """Dispatch for every path under ``/admin/keys``. ``ctx.principal`` must already be set."""

    def __init__(self, key_service: KeyService) -> None:
        self.keys = key_service

    @staticmethod
    def handles(path: str) -> bool:
        return path == PREFIX or path.startswith(PREFIX + "/")

    async def dispatch(self, method: str, path: str, request: Request, ctx: RequestContext) -> Reply:
        require_admin(ctx)
        parts = path[len(PREFIX) :].strip("/").split("/") if self.handles(path) else None
        if parts == [""]:
            if method == "POST":
                return await self.create(request)
            if method == "GET":
                return await self.list(request)
            raise _not_allowed(method, path, "GET, POST")
        if parts is not None and len(parts) == 1:
            key_id = parts[0]
            if method == "GET":
                return 200, _public(await self.keys.get(key_id))
            if method == "PATCH":
                return 200, _public(await self.keys.update(key_id, **await _object(request)))
            if method == "DELETE":
                return 200, _public(await self.keys.revoke(key_id))
            raise _not_allowed(method, path, "GET, PATCH, DELETE")
        if parts is not None and len(parts) == 2 and parts[1] == "rotate":
            if method != "POST":
                raise _not_allowed(method, path, "POST")
            plaintext, record = await self.keys.rotate(parts[0])
            return 201, _with_secret(plaintext, record)
        raise NotFoundError(
            f"no admin route {path}; see /admin/keys, /admin/keys/{{id}}, /admin/keys/{{id}}/rotate",
            code="unknown_route",
        )

    async def create(self, request: Request) -> Reply:
        body = await _object(request)
        unknown = sorted(set(body) - CREATABLE)
        if unknown:
            raise InvalidRequestError(
                f"{unknown[0]}: unknown field; use: {', '.join(sorted(CREATABLE))}",
                param=unknown[0],
                code="invalid_key_field",
            )
        if "name" not in body:
            raise InvalidRequestError(
                "name: required; give the key a name that says who or what uses it",
                param="name",
                code="invalid_key_field",
            )
        plaintext, record = await self.keys.create(**body)
        return 201, _with_secret(plaintext, record)

    async def list(self, request: Request) -> Reply:
        query = query_params(request)
        for name in query:
            if name not in _LIST_PARAMS:
                raise InvalidRequestError(
                    f"{name}: unknown query parameter; use: {', '.join(_LIST_PARAMS)}",
                    param=name,
                    code="invalid_query",
                )
        records = await self.keys.list(
            owner=query.get("owner"),
            team=query.get("team"),
            include_revoked=_bool_param(query, "include_revoked"),
            limit=_int_param(query, "limit", 100),
            offset=_int_param(query, "offset", 0),
        )
        return 200, {"object": "list", "data": [_public(r) for r in records]}


def query_params(request: Request) -> dict[str, str]:
    """The query string as a mapping (a repeated name keeps its last value)."""
    return dict(parse_qsl(request.scope.get("query_string", b"").decode("latin-1")))


def _public(record: KeyRecord) -> dict[str, Any]:
    return record.to_dict()


def _with_secret(plaintext: str, record: KeyRecord) -> dict[str, Any]:
    return {
        **record.to_dict(),
        "key": plaintext,
        "warning": "store this key now: it is shown only once and cannot be recovered",
    }


async def _object(request: Request) -> dict[str, Any]:
    body = await request.json()
    if not isinstance(body, dict):
        raise InvalidRequestError(
            "the request body must be a JSON object of key fields", param="body", code="invalid_json"
        )
    return body


def _int_param(query: dict[str, str], name: str, default: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    if not raw.isdigit():
        raise InvalidRequestError(f"{name}: must be a whole number (got {raw!r})", param=name)
    return int(raw)


def _bool_param(query: dict[str, str], name: str) -> bool:
    raw = query.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise InvalidRequestError(f"{name}: must be true or false (got {raw!r})", param=name)
    return raw in ("true", "1")


def _not_allowed(method: str, path: str, allowed: str) -> InvalidRequestError:
    # Imported here because app.py imports this module.
    from .app import MethodNotAllowedError

    return MethodNotAllowedError(f"{method} is not allowed on {path}; use {allowed}")
