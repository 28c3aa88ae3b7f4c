"""Authentication of callers and model permissions.

Keys are looked up by their SHA-256 digest, so the lookup never compares secrets byte by byte
(no timing side channel) and the process holds no plaintext key after start-up. With no master
key and no keys configured the gateway is open (the embedded default, loopback only).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from ..config import AuthConfig
from ..errors import AuthenticationError, PermissionDeniedError

if TYPE_CHECKING:
    from .keycache import KeyCache


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a key's identity (never the key itself) and what it may use."""

    key_id: str
    name: str
    models: tuple[str, ...] = ("*",)
    admin: bool = False
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    team: str | None = None
    owner: str | None = None
    log_payloads: bool = False
    metadata: dict[str, str] = field(default_factory=dict)

    def may_use(self, model: str) -> bool:
        if self.admin or "*" in self.models:
            return True
        return any(fnmatchcase(model, pattern) for pattern in self.models)


ANONYMOUS = Principal(key_id="anonymous", name="anonymous", models=("*",))


class Authenticator:
    """Static keys (config) first, then virtual keys (database, through the key cache)."""

    def __init__(self, config: AuthConfig, virtual: KeyCache | None = None) -> None:
        self.open = not config.enabled
        self._virtual = virtual
        self._keys: dict[str, Principal] = {}
        if config.master_key is not None:
            self._keys[digest(config.master_key.get_secret_value())] = Principal(
                key_id="master", name="master", admin=True
            )
        for static in config.keys:
            d = digest(static.key.get_secret_value())
            self._keys[d] = Principal(
                key_id=f"static:{static.name}",
                name=static.name,
                models=tuple(static.models),
                rpm=static.rpm,
                tpm=static.tpm,
                max_parallel=static.max_parallel,
            )

    async def authenticate(self, token: str | None) -> Principal:
        if self.open:
            return ANONYMOUS
        if not token:
            raise AuthenticationError(
                "no API key given; send 'Authorization: Bearer YOUR_KEY' or 'x-api-key: YOUR_KEY'",
                code="missing_api_key",
            )
        key_hash = digest(token)
        principal = self._keys.get(key_hash)
        if principal is None and self._virtual is not None:
            principal = await self._virtual.authenticate(token, key_hash)  # raises if revoked/expired
        if principal is None:
            raise AuthenticationError(
                "the API key is not valid; check it, or ask an administrator for a new one"
            )
        return principal

    @staticmethod
    def authorize_model(principal: Principal, model: str) -> None:
        if not principal.may_use(model):
            raise PermissionDeniedError(
                f"this API key may not use model '{model}'; it may use: {', '.join(principal.models)}",
                param="model",
                code="model_not_allowed",
            )
