"""Table definitions: dumb storage, no behaviour (STYLE.md #6).

The same models serve SQLite and PostgreSQL. Two portability choices matter to callers:

- every timestamp is a timezone-aware UTC ``datetime`` in Python, whatever the backend stores
  (SQLite keeps naive text, so :class:`UTCDateTime` puts the zone back on the way out);
- JSON columns are ``JSONB`` on PostgreSQL (indexable, compact) and ``JSON`` text on SQLite;
- money is an exact :class:`~decimal.Decimal` (:class:`USD`), summed exactly by both backends.

Schema changes go through a new Alembic revision in ``migrations/versions``; a test checks that
these models and the migrations describe the same schema.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    Numeric,
    String,
    TypeDecorator,
    false,
    true,
)
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


#: Money keeps 10 decimal places: a ten-thousandth of a cent per million tokens is exact.
USD_SCALE = 10
_USD_UNIT = Decimal(1).scaleb(-USD_SCALE)


class USD(TypeDecorator[Decimal]):
    """An exact amount of US dollars: ``NUMERIC(20, 10)`` on PostgreSQL; on SQLite an integer
    count of 1e-10 USD, because SQLite keeps NUMERIC as a binary float and sums it as one.

    Values are rounded half-even to 10 places on the way in. SQL ``SUM`` over the column comes
    back as an exact ``Decimal`` on both backends (SQLite raises rather than wraps past about
    9.2e8 USD in one sum).
    """

    impl = Numeric(20, USD_SCALE)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(BigInteger())
        return dialect.type_descriptor(Numeric(20, USD_SCALE))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        exact = Decimal(value).quantize(_USD_UNIT)
        return int(exact.scaleb(USD_SCALE)) if dialect.name == "sqlite" else exact

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return Decimal(int(value)).scaleb(-USD_SCALE)
        return Decimal(value)


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


class SpendRecord(Base):
    """One finished model request in the spend ledger: who, what, how much, how it went.

    Written in batches by the spend ledger (accounting/ledger.py), never on the hot path;
    reported by accounting/spend.py. ``model`` is the public name the client asked for,
    ``upstream_model`` what the provider billed.
    """

    __tablename__ = "spend_ledger"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    request_id: Mapped[str] = mapped_column(String(128))
    key_id: Mapped[str | None] = mapped_column(String(128))
    team: Mapped[str | None] = mapped_column(String(200))
    model: Mapped[str | None] = mapped_column(String(256))
    provider: Mapped[str | None] = mapped_column(String(128))
    upstream_model: Mapped[str | None] = mapped_column(String(256))
    route: Mapped[str] = mapped_column(String(256))
    tokens_in: Mapped[int] = mapped_column(Integer)
    tokens_out: Mapped[int] = mapped_column(Integer)
    cached_tokens: Mapped[int | None] = mapped_column(Integer)
    cost_usd: Mapped[Decimal] = mapped_column(USD)
    latency_ms: Mapped[float] = mapped_column(Float)
    status: Mapped[int] = mapped_column(Integer)
    cache_status: Mapped[str | None] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)

    __table_args__ = (
        Index("ix_spend_ledger_created_at", "created_at"),
        Index("ix_spend_ledger_key_id_created_at", "key_id", "created_at"),
        Index("ix_spend_ledger_team_created_at", "team", "created_at"),
        Index("ix_spend_ledger_model_created_at", "model", "created_at"),
    )
