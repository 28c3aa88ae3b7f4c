"""An emulator of HashiCorp Vault's KV version 2 secrets engine (HTTP API).

Written from Vault's API reference ("KV secrets engine - version 2 (API)", and the HTTP API
overview for errors):

- ``GET /v1/{mount}/data/{path}[?version=N]`` with ``X-Vault-Token`` → 200
  ``{"request_id", "lease_id": "", "renewable": false, "lease_duration": 0,
  "data": {"data": {...}, "metadata": {"created_time", "custom_metadata", "deletion_time",
  "destroyed", "version"}}, "wrap_info": null, "warnings": null, "auth": null, "mount_type": "kv"}``;
- ``POST|PUT /v1/{mount}/data/{path}`` with ``{"data": {...}}`` → 200 with the new version's
  metadata as ``data``; ``DELETE /v1/{mount}/data/{path}`` soft-deletes the latest version → 204;
- errors are ``{"errors": [...]}``: a missing or unknown token, or a token whose policy does not
  cover the path → 403 ``["permission denied"]``; no secret at the path → 404 ``{"errors": []}``;
  a soft-deleted version → 404 whose ``data.metadata.deletion_time`` is set; an unknown mount →
  404 ``no handler for route``; a sealed Vault → 503 ``["Vault is sealed"]`` on every route
  except ``GET /v1/sys/seal-status``;
- ``X-Vault-Namespace`` selects a namespace: mounts created in a namespace are only seen there.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any

from aiohttp import web

from .base import Emulator

ROOT_TOKEN = "hvs.emulator-root-token"


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Version:
    data: dict[str, Any]
    created_time: str = field(default_factory=_now)
    deletion_time: str = ""
    destroyed: bool = False

    def metadata(self, number: int) -> dict[str, Any]:
        return {
            "created_time": self.created_time,
            "custom_metadata": None,
            "deletion_time": self.deletion_time,
            "destroyed": self.destroyed,
            "version": number,
        }


class VaultEmulator(Emulator):
    """``with VaultEmulator() as vault:``; ``vault.put("app/openai", {"value": "sk-..."})`` seeds it."""

    api_key = ROOT_TOKEN

    def __init__(self, port: int | None = None) -> None:
        super().__init__(port)
        self.sealed = False
        # (namespace, mount) → path → versions (version N is versions[N - 1])
        self.mounts: dict[tuple[str, str], dict[str, list[Version]]] = {("", "secret"): {}}
        # token → glob patterns of "{mount}/data/{path}" it may read and write
        self.tokens: dict[str, list[str]] = {ROOT_TOKEN: ["*"]}

    # -- seeding from tests -------------------------------------------------------------

    def put(self, path: str, data: dict[str, Any], *, mount: str = "secret", namespace: str = "") -> int:
        versions = self.mounts.setdefault((namespace, mount), {}).setdefault(path, [])
        versions.append(Version(dict(data)))
        return len(versions)

    def delete(self, path: str, *, mount: str = "secret", namespace: str = "") -> None:
        self.mounts[(namespace, mount)][path][-1].deletion_time = _now()

    def add_token(self, token: str, *patterns: str) -> None:
        self.tokens[token] = list(patterns)

    # -- HTTP ---------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/sys/seal-status", self.seal_status)
        app.router.add_route("GET", "/v1/{mount}/data/{path:.+}", self.read)
        app.router.add_route("POST", "/v1/{mount}/data/{path:.+}", self.write)
        app.router.add_route("PUT", "/v1/{mount}/data/{path:.+}", self.write)
        app.router.add_route("DELETE", "/v1/{mount}/data/{path:.+}", self.remove)
        return app

    async def seal_status(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"type": "shamir", "initialized": True, "sealed": self.sealed, "t": 1, "n": 1, "progress": 0}
        )

    def _lookup(self, request: web.Request) -> tuple[dict[str, list[Version]], str] | web.Response:
        """The mount's store and the path, or the error Vault would answer."""
        if self.sealed:
            return _errors(503, ["Vault is sealed"])
        mount, path = request.match_info["mount"], request.match_info["path"]
        token = request.headers.get("X-Vault-Token", "")
        patterns = self.tokens.get(token)
        if patterns is None or not any(fnmatchcase(f"{mount}/data/{path}", p) for p in patterns):
            return _errors(403, ["permission denied"])
        namespace = request.headers.get("X-Vault-Namespace", "").strip("/")
        store = self.mounts.get((namespace, mount))
        if store is None:
            return _errors(404, [f'no handler for route "{mount}/data/{path}". route entry not found.'])
        return store, path

    async def read(self, request: web.Request) -> web.Response:
        found = self._lookup(request)
        if isinstance(found, web.Response):
            return found
        store, path = found
        versions = store.get(path)
        if not versions:
            return _errors(404, [])
        number = int(request.query.get("version") or 0) or len(versions)
        if number > len(versions):
            return _errors(404, [])
        version = versions[number - 1]
        if version.deletion_time or version.destroyed:
            return web.json_response(
                _envelope({"data": None, "metadata": version.metadata(number)}), status=404
            )
        return web.json_response(_envelope({"data": version.data, "metadata": version.metadata(number)}))

    async def write(self, request: web.Request) -> web.Response:
        found = self._lookup(request)
        if isinstance(found, web.Response):
            return found
        store, path = found
        body = await request.json()
        if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
            return _errors(400, ["no data provided"])
        versions = store.setdefault(path, [])
        versions.append(Version(body["data"]))
        return web.json_response(_envelope(versions[-1].metadata(len(versions))))

    async def remove(self, request: web.Request) -> web.Response:
        found = self._lookup(request)
        if isinstance(found, web.Response):
            return found
        store, path = found
        if store.get(path):
            store[path][-1].deletion_time = _now()
        return web.Response(status=204)


def _envelope(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "request_id": str(uuid.uuid4()),
        "lease_id": "",
        "renewable": False,
        "lease_duration": 0,
        "data": data,
        "wrap_info": None,
        "warnings": None,
        "auth": None,
        "mount_type": "kv",
    }


def _errors(status: int, errors: list[str]) -> web.Response:
    return web.json_response({"errors": errors}, status=status)
