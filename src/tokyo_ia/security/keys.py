"""Virtual API keys: issued, rotated and revoked at run time, stored in the database.

A key looks like ``sk-tia-<43 url-safe chars>`` (256 random bits), so it is recognisable in
logs and by secret scanners. It is shown once, when created or rotated; the database keeps
only its SHA-256. A plain, unsalted digest is enough here: the key is random and long, so no
dictionary or rainbow table applies, and lookup by digest keeps the check constant-time.

:class:`KeyService` is the only code that writes ``api_keys``. The hot path never calls it
directly: it asks a :class:`KeyCache` (see there for how fast revocation takes effect).
"""

from __future__ import annotations

import builtins
import re
import secrets
import unicodedata
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ..config import VIRTUAL_KEY_PREFIX
from ..errors import AuthenticationError, InvalidRequestError, NotFoundError
from ..store.models import ApiKey, utcnow
from .auth import Principal, digest

KEY_PREFIX = VIRTUAL_KEY_PREFIX  # defined with the config, which refuses it for the master key
_SECRET_BYTES = 32
_SHOWN_CHARS = 4
_MAX_KEY_LEN = 128

Listener = Callable[[str, str], Awaitable[None] | None]


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)


def looks_like_key(token: str) -> bool:
    """Whether ``token`` could be a virtual key at all; anything else never reaches the database."""
    return token.startswith(KEY_PREFIX) and len(token) <= _MAX_KEY_LEN


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key as callers see it: everything but the secret and its digest."""

    id: str
    name: str
    prefix: str
    last4: str
    owner: str | None
    team: str | None
    models: tuple[str, ...]
    admin: bool
    enabled: bool
    expires_at: datetime | None
    rpm: int | None
    tpm: int | None
    max_parallel: int | None
    metadata: dict[str, str]
    log_payloads: bool
    created_at: datetime
    updated_at: datetime
    revoked_at: datetime | None
    rotated_from: str | None

    @property
    def display(self) -> str:
        """Enough of the key to recognise it (``sk-tia-AbCd…wxYz``), never enough to use it."""
        return f"{self.prefix}…{self.last4}"

    def status(self, now: datetime | None = None) -> str:
        """``revoked``, ``expired``, ``disabled`` or ``active`` — the first that applies."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and (now or datetime.now(UTC)) >= self.expires_at:
            return "expired"
        return "active" if self.enabled else "disabled"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view for the admin API and ``--json`` CLI output."""
        return {
            "id": self.id,
            "object": "api_key",
            "name": self.name,
            "display": self.display,
            "status": self.status(),
            "owner": self.owner,
            "team": self.team,
            "models": list(self.models),
            "admin": self.admin,
            "enabled": self.enabled,
            "expires_at": _iso(self.expires_at),
            "rpm": self.rpm,
            "tpm": self.tpm,
            "max_parallel": self.max_parallel,
            "metadata": dict(self.metadata),
            "log_payloads": self.log_payloads,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "revoked_at": _iso(self.revoked_at),
            "rotated_from": self.rotated_from,
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def _record(row: ApiKey) -> KeyRecord:
    return KeyRecord(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        last4=row.last4,
        owner=row.owner,
        team=row.team,
        models=tuple(row.models),
        admin=row.admin,
        enabled=row.enabled,
        expires_at=row.expires_at,
        rpm=row.rpm,
        tpm=row.tpm,
        max_parallel=row.max_parallel,
        metadata=dict(row.meta),
        log_payloads=row.log_payloads,
        created_at=row.created_at,
        updated_at=row.updated_at,
        revoked_at=row.revoked_at,
        rotated_from=row.rotated_from,
    )


# ---------------------------------------------------------------------------------------
# Validation: every field a caller may set, checked in one place for the API, CLI and code.

_GLOB = re.compile(r"[A-Za-z0-9._:/@+=~*?!\[\]-]{1,256}")
_BRACKETS = re.compile(r"\[!?\]?[^\[\]]*\]")
_MAX_LIMIT = 1_000_000_000


def _bad(field_name: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"{field_name}: {message}", param=field_name, code="invalid_key_field")


def _text(field_name: str, value: Any, *, required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise _bad(field_name, "must be a non-empty string")
    if len(value) > 200:
        raise _bad(field_name, f"is {len(value)} characters long; use at most 200")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in value):
        raise _bad(field_name, "contains control or invisible formatting characters; remove them")
    return value


def _name(field_name: str, value: Any) -> str | None:
    return _text(field_name, value, required=True)


def _limit(field_name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_LIMIT:
        raise _bad(field_name, f"must be a whole number from 1 to {_MAX_LIMIT}, or null for no limit")
    return value


def _flag(field_name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(field_name, "must be true or false")
    return value


def _models(field_name: str, value: Any) -> list[str]:
    if not isinstance(value, list | tuple) or not value or len(value) > 256:
        raise _bad(field_name, 'must be a list of 1 to 256 model names or globs, e.g. ["gpt-4o*"]')
    for pattern in value:
        if not isinstance(pattern, str) or not _GLOB.fullmatch(pattern):
            raise _bad(
                field_name,
                f"{pattern!r} is not a model glob; use letters, digits, . _ : / @ + = ~ - "
                "and the wildcards * ? [...]",
            )
        rest = _BRACKETS.sub("", pattern)
        if "[" in rest or "]" in rest:
            raise _bad(field_name, f"{pattern!r} has an unbalanced '[' or ']'")
    return list(value)


def _expires(field_name: str, value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise _bad(
                field_name, f"{value!r} is not an ISO 8601 time such as 2030-01-31T00:00:00Z"
            ) from None
    if not isinstance(value, datetime):
        raise _bad(field_name, "must be an ISO 8601 time such as 2030-01-31T00:00:00Z, or null")
    # A time without a zone is read as UTC, never as the server's local time.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _metadata(field_name: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > 64:
        raise _bad(field_name, "must be an object of at most 64 string keys and string values")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str) or not 0 < len(k) <= 64 or len(v) > 1024:
            raise _bad(field_name, f"entry {k!r}: keys are 1-64 characters, values strings of at most 1024")
    return dict(value)


_VALIDATORS: dict[str, Callable[[str, Any], Any]] = {
    "name": _name,
    "owner": _text,
    "team": _text,
    "models": _models,
    "expires_at": _expires,
    "rpm": _limit,
    "tpm": _limit,
    "max_parallel": _limit,
    "metadata": _metadata,
    "admin": _flag,
    "enabled": _flag,
    "log_payloads": _flag,
}
UPDATABLE = frozenset(_VALIDATORS)
CREATABLE = UPDATABLE - {"enabled"}


def validate_fields(fields: Mapping[str, Any], allowed: frozenset[str]) -> dict[str, Any]:
    """Checked and normalised values; an unknown or bad field raises an error naming it."""
    out = {}
    for name, value in fields.items():
        if name not in allowed:
            raise _bad(name, f"unknown field; use: {', '.join(sorted(allowed))}")
        out[name] = _VALIDATORS[name](name, value)
    return out


# ---------------------------------------------------------------------------------------
# Authentication verdict, shared by the service and the cache


def principal_for(record: KeyRecord) -> Principal:
    return Principal(
        key_id=record.id,
        name=record.name,
        models=record.models,
        admin=record.admin,
        rpm=record.rpm,
        tpm=record.tpm,
        max_parallel=record.max_parallel,
        team=record.team,
        owner=record.owner,
        log_payloads=record.log_payloads,
        metadata=dict(record.metadata),
    )


def refusal(record: KeyRecord, now: datetime | None = None) -> AuthenticationError | None:
    """Why a known key may not be used now, as the error to raise; ``None`` if it may."""
    status = record.status(now)
    if status == "revoked":
        return AuthenticationError(
            f"this API key was revoked at {_iso(record.revoked_at)}; use its replacement or ask an "
            "administrator for a new key",
            code="key_revoked",
        )
    if status == "expired":
        return AuthenticationError(
            f"this API key expired at {_iso(record.expires_at)}; ask an administrator to extend it "
            "or to issue a new key",
            code="key_expired",
        )
    if status == "disabled":
        return AuthenticationError(
            "this API key is disabled; ask an administrator to enable it", code="key_disabled"
        )
    return None


def verdict(record: KeyRecord | None) -> Principal | None:
    """The caller behind ``record``; ``None`` for no record; raises :func:`refusal`'s error."""
    if record is None:
        return None
    error = refusal(record)
    if error is not None:
        raise error
    return principal_for(record)


# ---------------------------------------------------------------------------------------
# Service


class KeyService:
    """Create, read, change, rotate and revoke keys. Works the same on SQLite and PostgreSQL.

    Listeners registered with :meth:`on_change` are called with ``(key_id, key_hash)`` after
    every committed change, so this process's :class:`KeyCache` forgets the key at once (and,
    with Redis, every other replica's: see ``keysync.py``). A listener may be a coroutine
    function; the change's method returns once every listener has run.
    """

    def __init__(self, session_factory: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = session_factory
        self._listeners: builtins.list[Listener] = []

    def on_change(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def _changed(self, key_id: str, key_hash: str) -> None:
        for listener in self._listeners:
            result = listener(key_id, key_hash)
            if result is not None:
                await result

    async def create(
        self,
        name: str,
        owner: str | None = None,
        team: str | None = None,
        models: builtins.list[str] | tuple[str, ...] = ("*",),
        expires_at: datetime | str | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        max_parallel: int | None = None,
        metadata: dict[str, str] | None = None,
        admin: bool = False,
        log_payloads: bool = False,
    ) -> tuple[str, KeyRecord]:
        """A new key: ``(plaintext, record)``. The plaintext cannot be recovered afterwards."""
        given = {
            "name": name,
            "owner": owner,
            "team": team,
            "models": list(models) if isinstance(models, list | tuple) else models,
            "expires_at": expires_at,
            "rpm": rpm,
            "tpm": tpm,
            "max_parallel": max_parallel,
            "metadata": metadata,
            "admin": admin,
            "log_payloads": log_payloads,
        }
        values = validate_fields(given, CREATABLE)
        if values["expires_at"] is not None and values["expires_at"] <= datetime.now(UTC):
            raise _bad("expires_at", "is in the past; give a future time or null")
        plaintext = generate_key()
        async with self._sessions.begin() as session:
            row = _new_row(plaintext, values)
            session.add(row)
        return plaintext, _record(row)

    async def get(self, key_id: str) -> KeyRecord:
        async with self._sessions() as session:
            return _record(await _load(session, key_id))

    async def update(self, key_id: str, **fields: Any) -> KeyRecord:
        """Change some fields of a live key; a revoked key stays as it was."""
        if not fields:
            raise InvalidRequestError(
                f"nothing to update; give at least one of: {', '.join(sorted(UPDATABLE))}",
                code="invalid_key_field",
            )
        values = validate_fields(fields, UPDATABLE)
        async with self._sessions.begin() as session:
            row = await _load(session, key_id)
            if row.revoked_at is not None:
                raise InvalidRequestError(
                    f"key {key_id} is revoked and cannot change; create a new key",
                    param="id",
                    code="key_revoked",
                )
            for name, value in values.items():
                setattr(row, "meta" if name == "metadata" else name, value)
            row.updated_at = utcnow()
        await self._changed(row.id, row.key_hash)
        return _record(row)

    async def rotate(self, key_id: str) -> tuple[str, KeyRecord]:
        """Revoke the key and issue a replacement with the same settings: ``(plaintext, new)``.

        Atomic: of two concurrent rotations of one key, exactly one succeeds.
        """
        plaintext = generate_key()
        async with self._sessions.begin() as session:
            if not await _mark_revoked(session, key_id):
                await _load(session, key_id)  # NotFoundError if there is no such key
                raise InvalidRequestError(
                    f"key {key_id} is already revoked; create a new key instead",
                    param="id",
                    code="key_revoked",
                )
            old = await _load(session, key_id)
            values = {name: getattr(old, "meta" if name == "metadata" else name) for name in CREATABLE}
            new = _new_row(plaintext, values, enabled=old.enabled, rotated_from=old.id)
            session.add(new)
        await self._changed(old.id, old.key_hash)
        return plaintext, _record(new)

    async def revoke(self, key_id: str) -> KeyRecord:
        """Revoke for good. Revoking a revoked key changes nothing and is not an error."""
        async with self._sessions.begin() as session:
            await _mark_revoked(session, key_id)
            row = await _load(session, key_id)
        await self._changed(row.id, row.key_hash)
        return _record(row)

    async def lookup(self, key_hash: str) -> KeyRecord | None:
        """The key with this digest, whatever its status (callers apply :func:`refusal`)."""
        async with self._sessions() as session:
            row = (await session.execute(select(ApiKey).where(ApiKey.key_hash == key_hash))).scalar()
            return _record(row) if row is not None else None

    async def authenticate(self, plaintext: str) -> Principal | None:
        """The caller behind a key; ``None`` if no such key exists.

        A key that exists but is revoked, expired or disabled raises
        :class:`~tokyo_ia.errors.AuthenticationError` whose ``code`` says which
        (``key_revoked``, ``key_expired``, ``key_disabled``). Uncached: use :class:`KeyCache`
        on the hot path.
        """
        if not looks_like_key(plaintext):
            return None
        record = await self.lookup(digest(plaintext))
        return verdict(record)

    async def list(
        self,
        *,
        owner: str | None = None,
        team: str | None = None,
        include_revoked: bool = False,
        limit: int = 100,
        offset: int = 0,
    ) -> builtins.list[KeyRecord]:
        """Keys, oldest first; revoked keys only when asked for."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise _bad("limit", "must be a whole number from 1 to 1000")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise _bad("offset", "must be a whole number, 0 or more")
        query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id).limit(limit).offset(offset)
        if owner is not None:
            query = query.where(ApiKey.owner == owner)
        if team is not None:
            query = query.where(ApiKey.team == team)
        if not include_revoked:
            query = query.where(ApiKey.revoked_at.is_(None))
        async with self._sessions() as session:
            return [_record(row) for row in (await session.execute(query)).scalars()]

    async def count_active(self) -> int:
        """Keys that are neither revoked nor disabled (expiry is not considered)."""
        query = (
            select(func.count())
            .select_from(ApiKey)
            .where(ApiKey.revoked_at.is_(None), ApiKey.enabled.is_(True))
        )
        async with self._sessions() as session:
            return int((await session.execute(query)).scalar_one())


def _new_row(
    plaintext: str, values: Mapping[str, Any], *, enabled: bool = True, rotated_from: str | None = None
) -> ApiKey:
    now = utcnow()
    return ApiKey(
        id="key_" + secrets.token_hex(8),
        key_hash=digest(plaintext),
        prefix=plaintext[: len(KEY_PREFIX) + _SHOWN_CHARS],
        last4=plaintext[-_SHOWN_CHARS:],
        name=values["name"],
        owner=values.get("owner"),
        team=values.get("team"),
        models=list(values.get("models") or ["*"]),
        admin=bool(values.get("admin", False)),
        enabled=enabled,
        expires_at=values.get("expires_at"),
        rpm=values.get("rpm"),
        tpm=values.get("tpm"),
        max_parallel=values.get("max_parallel"),
        meta=dict(values.get("metadata") or {}),
        log_payloads=bool(values.get("log_payloads", False)),
        created_at=now,
        updated_at=now,
        rotated_from=rotated_from,
    )


async def _load(session: AsyncSession, key_id: str) -> ApiKey:
    row = await session.get(ApiKey, key_id) if isinstance(key_id, str) and len(key_id) <= 32 else None
    if row is None:
        raise NotFoundError(f"no API key with id {key_id!r}; list keys to find its id", param="id")
    return row


async def _mark_revoked(session: AsyncSession, key_id: str) -> bool:
    """Revoke in one conditional UPDATE, so concurrent revocations and rotations cannot both win."""
    now = utcnow()
    result = await session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return cast("CursorResult[Any]", result).rowcount == 1
