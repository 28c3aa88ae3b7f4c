"""The spend ledger writer: one row per finished model request, table ``spend_ledger``.

The pipeline calls :meth:`SpendLedger.record` once a request is answered; rows reach the
database in batches from a background task and are drained on shutdown (the machinery and its
guarantees are :class:`~tokyo_ia.store.batch.BatchWriter`'s). Reports over the rows are
accounting/spend.py.

Cost is what the pipeline charged (``RequestContext.cost_usd``, from the price table), stored
as an exact :class:`~decimal.Decimal`: the float the pipeline carries holds at most a dozen
significant digits of a Decimal product, which ``repr`` gives back digit for digit. Such
conversions and clean-ups happen in the background writer, not in :func:`spend_entry`, which
runs on the request path (a few microseconds).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, insert

from ..store.batch import BatchWriter, cut_text, slices, sqlite_datetime, sqlite_insert
from ..store.models import USD_SCALE, SpendRecord, utcnow

if TYPE_CHECKING:
    from ..pipeline import RequestContext

_TABLE = cast(Table, SpendRecord.__table__)
_COLUMNS = (
    "created_at",
    "request_id",
    "key_id",
    "team",
    "model",
    "provider",
    "upstream_model",
    "route",
    "tokens_in",
    "tokens_out",
    "cached_tokens",
    "cost_usd",
    "latency_ms",
    "status",
    "cache_status",
    "attempts",
)
# Core INSERT on the table (not the ORM-enabled one): no per-row ORM book-keeping.
_INSERT_SPEND = insert(_TABLE)
_SQLITE_INSERT = sqlite_insert(_TABLE, _COLUMNS)
log = logging.getLogger("tokyo_ia.accounting")

_ZERO = Decimal(0)
_USD_UNIT = Decimal(1).scaleb(-USD_SCALE)  # the USD column type rounds to this on the way in
_INT32_MAX = 2**31 - 1
_MAX_USD = Decimal(10**8)  # per row; the columns hold about 9.2e8 (SQLite) and 1e10 (PostgreSQL)


@dataclass(slots=True)
class SpendEntry:
    """One finished model request. ``model`` is the public name, ``upstream_model`` the billed one."""

    request_id: str
    route: str
    status: int
    latency_ms: float
    key_id: str | None = None
    team: str | None = None
    model: str | None = None
    provider: str | None = None
    upstream_model: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    cached_tokens: int | None = None
    cost_usd: Decimal | float = _ZERO
    """A float is stored as the Decimal its ``repr`` spells."""
    cache_status: str | None = None
    """``hit``, ``miss``, ``coalesced``, or None when the response cache was not consulted."""
    attempts: int = 0
    created_at: datetime = field(default_factory=utcnow)


def _count(value: Any) -> int:
    if isinstance(value, int) and value > 0:
        return value if value <= _INT32_MAX else _INT32_MAX
    return 0


def cached_tokens(usage: Mapping[str, Any]) -> int | None:
    """``prompt_tokens_details.cached_tokens`` of OpenAI-shaped usage, None when not reported."""
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, dict) or "cached_tokens" not in details:
        return None
    return _count(details["cached_tokens"])


def spend_entry(ctx: RequestContext, status: int, elapsed_s: float) -> SpendEntry:
    """The ledger row of a request that finished with ``status`` after ``elapsed_s`` seconds."""
    usage = ctx.usage or {}
    principal, deployment = ctx.principal, ctx.deployment
    return SpendEntry(
        request_id=ctx.request_id,
        route=ctx.route,
        status=status,
        latency_ms=round(elapsed_s * 1000, 3),
        key_id=principal.key_id if principal is not None else None,
        team=principal.team if principal is not None else None,
        model=ctx.model,
        provider=deployment.provider.name if deployment is not None else None,
        upstream_model=deployment.model if deployment is not None else None,
        tokens_in=usage.get("prompt_tokens") or 0,
        tokens_out=usage.get("completion_tokens") or 0,
        cached_tokens=cached_tokens(usage),
        cost_usd=ctx.cost_usd or _ZERO,
        cache_status=ctx.cache,
        attempts=ctx.attempts,
    )


def _money(value: Decimal | float) -> Decimal:
    exact = Decimal(repr(value)) if isinstance(value, float) else value
    # Nothing a request can cost is near the limit; a value past it would fail its batch forever.
    return exact if exact.is_finite() and abs(exact) < _MAX_USD else _ZERO


def _values(entry: SpendEntry, sqlite: bool) -> tuple[Any, ...]:
    """The row in :data:`_COLUMNS` order. On SQLite, as SQLAlchemy's column types would bind it
    (time as text, money as an integer count of 1e-10 USD): it goes straight to ``executemany``."""
    cost = _money(entry.cost_usd)
    created_at = entry.created_at
    return (
        sqlite_datetime(created_at) if sqlite else created_at,
        cut_text(entry.request_id, 128),
        cut_text(entry.key_id, 128),
        cut_text(entry.team, 200),
        cut_text(entry.model, 256),
        cut_text(entry.provider, 128),
        cut_text(entry.upstream_model, 256),
        cut_text(entry.route, 256),
        _count(entry.tokens_in),
        _count(entry.tokens_out),
        None if entry.cached_tokens is None else _count(entry.cached_tokens),
        int(cost.quantize(_USD_UNIT).scaleb(USD_SCALE)) if sqlite else cost,
        float(entry.latency_ms),
        entry.status,
        cut_text(entry.cache_status, 16),
        _count(entry.attempts),
    )


class SpendLedger(BatchWriter[SpendEntry]):
    """Queues :class:`SpendEntry` rows and inserts them in batches, one transaction each.

    Dropped entries (queue full while the database is down) are counted in ``dropped`` and
    logged; unlike the audit trail, the ledger does not write a row about them.
    """

    label = "spend ledger"
    logger = log

    async def write(self, items: list[SpendEntry]) -> None:
        async with self.sessions() as session, session.begin():
            conn = await session.connection()
            sqlite = conn.dialect.name == "sqlite"
            async for part in slices(items):
                if sqlite:  # the lean path (store/batch.py)
                    await conn.exec_driver_sql(_SQLITE_INSERT, [_values(e, True) for e in part])
                else:
                    rows = [dict(zip(_COLUMNS, _values(e, False), strict=True)) for e in part]
                    await conn.execute(_INSERT_SPEND, rows)
