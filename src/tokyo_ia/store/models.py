"""Table definitions: dumb storage, no behaviour (STYLE.md #6).

The same models serve SQLite and PostgreSQL. Two portability choices matter to callers:

- every timestamp is a timezone-aware UTC ``datetime`` in Python, whatever the backend stores
  (SQLite keeps naive text, so :class:`UTCDateTime` puts the zone back on the way out);
- JSON columns are ``JSONB`` on PostgreSQL (indexable, compact) and ``JSON`` text on SQLite.

Schema changes go through a new Alembic revision in ``migrations/versions``; a test checks that
these models and the migrations describe the same schema.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Index, Integer, String, TypeDecorator, false, true
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: JSON for both backends; binary JSON where the backend has it.
JSONType = JSON().with_variant(postgresql.JSONB(), "postgresql")
#: 64-bit ids on PostgreSQL; SQLite only autoincrements a plain INTEGER PRIMARY KEY.
BigIntId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A ``TIMESTAMP WITH TIME ZONE`` that always round-trips as an aware UTC datetime.

    Naive values written by callers are taken to be UTC rather than local time, so a replica's
    time zone setting can never shift an expiry.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    """A virtual API key. Only the SHA-256 of the key is stored, never the key itself."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    last4: Mapped[str] = mapped_column(String(4))
    name: Mapped[str] = mapped_column(String(200))
    owner: Mapped[str | None] = mapped_column(String(200))
    team: Mapped[str | None] = mapped_column(String(200))
    models: Mapped[list[str]] = mapped_column(JSONType)
    admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    enabled: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    rpm: Mapped[int | None] = mapped_column(Integer)
    tpm: Mapped[int | None] = mapped_column(Integer)
    max_parallel: Mapped[int | None] = mapped_column(Integer)
    # "metadata" is reserved on declarative classes, hence the attribute name.
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType)
    log_payloads: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    rotated_from: Mapped[str | None] = mapped_column(String(32))

    __table_args__ = (
        Index("ix_api_keys_owner", "owner"),
        Index("ix_api_keys_team", "team"),
        Index("ix_api_keys_created_at", "created_at"),
    )


class AuditEntry(Base):
    """One line of the tamper-evident audit trail: ``hash`` chains over ``prev_hash``.

    Written in batches by the audit writer (security/audit.py), never on the hot path.
    """

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    ts: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    actor_key_id: Mapped[str | None] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    route: Mapped[str | None] = mapped_column(String(256))
    model: Mapped[str | None] = mapped_column(String(256))
    status: Mapped[int | None] = mapped_column(Integer)
    tokens_in: Mapped[int | None] = mapped_column(Integer)
    tokens_out: Mapped[int | None] = mapped_column(Integer)
    client_ip: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    prev_hash: Mapped[str | None] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))

    __table_args__ = (
        Index("ix_audit_log_ts", "ts"),
        Index("ix_audit_log_actor_key_id", "actor_key_id"),
    )
