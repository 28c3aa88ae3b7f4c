"""Spend reports over the ledger: requests, errors, tokens and dollars by key, team, model or day.

Used by ``tokyo-ia spend`` (accounting/spend_cli.py) and ``GET /admin/spend``. Aggregation runs
in SQL on both backends (the ledger's indexes lead with the grouped column, then
``created_at``); a report has one row per group, so its size is bounded by the number of keys,
teams, models or days, never by the number of requests.

Days are UTC calendar days. ``since`` is inclusive and ``until`` exclusive, except that a bare
date given as ``until`` includes that whole day (``--since 2025-01-01 --until 2025-01-31`` is
January). Money stays an exact :class:`~decimal.Decimal`: JSON carries it as a decimal string,
CSV as plain digits; only the table rounds (to 6 places).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, String, case, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ..errors import InvalidRequestError
from ..store.models import SpendRecord

GROUPS = ("key", "team", "model", "day")
#: Output formats of the admin API; the CLI adds ``table``.
FORMATS = ("json", "csv")
PARAMS = ("by", "since", "until", "key", "team", "model", "format")
_HEADERS = {"key": "key_id", "team": "team", "model": "model", "day": "day"}
_FIELDS = ("requests", "errors", "tokens_in", "tokens_out", "cost_usd")
#: Cells a spreadsheet would run as a formula (CSV injection); such group names get a "'".
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True, slots=True)
class SpendQuery:
    """What to report: the grouping, a ``[since, until)`` window (UTC) and optional filters."""

    by: str = "model"
    since: datetime | None = None
    until: datetime | None = None
    key: str | None = None
    team: str | None = None
    model: str | None = None


@dataclass(frozen=True, slots=True)
class SpendRow:
    """One group's totals. ``group`` is None for requests without one (e.g. no team)."""

    group: str | None
    requests: int
    errors: int
    tokens_in: int
    tokens_out: int
    cost_usd: Decimal

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "requests": self.requests,
            "errors": self.errors,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "cost_usd": money(self.cost_usd),
        }


def money(amount: Decimal) -> str:
    """An exact amount as plain digits, without exponent or trailing zeros (``0.0000105``)."""
    text = format(amount.normalize(), "f")
    return "0" if text in ("-0", "0") else text


# -- parameters ---------------------------------------------------------------------------


def parse_time(text: str, name: str, *, end: bool = False) -> datetime:
    """``YYYY-MM-DD`` or an ISO 8601 time (UTC unless it says otherwise).

    With ``end``, a bare date means the end of that day (the next midnight), so the day is in.
    """
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return start + timedelta(days=1) if end else start
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise _bad(
            name, f"{text!r} is not a date; use YYYY-MM-DD or an ISO 8601 time like 2025-01-31T12:00:00Z"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def check_window(since: datetime | None, until: datetime | None) -> None:
    if since is not None and until is not None and until <= since:
        raise _bad(
            "until", f"{until.isoformat()} is not after since ({since.isoformat()}); swap or widen them"
        )


def parse_params(params: Mapping[str, str]) -> tuple[SpendQuery, str]:
    """The query and output format of ``GET /admin/spend?by=&since=&until=&key=&team=&model=&format=``."""
    for name in params:
        if name not in PARAMS:
            raise _bad(name, f"unknown query parameter; use: {', '.join(PARAMS)}")
    by = params.get("by", "model")
    if by not in GROUPS:
        raise _bad("by", f"must be one of {', '.join(GROUPS)} (got {by!r})")
    fmt = params.get("format", "json")
    if fmt not in FORMATS:
        raise _bad("format", f"must be one of {', '.join(FORMATS)} (got {fmt!r})")
    since = parse_time(params["since"], "since") if params.get("since") else None
    until = parse_time(params["until"], "until", end=True) if params.get("until") else None
    check_window(since, until)
    filters = {name: params.get(name) or None for name in ("key", "team", "model")}
    return SpendQuery(by=by, since=since, until=until, **filters), fmt


def _bad(name: str, why: str) -> InvalidRequestError:
    return InvalidRequestError(f"{name}: {why}", param=name, code="invalid_query")


# -- the query ----------------------------------------------------------------------------


def _group(by: str, dialect: str) -> ColumnElement[Any]:
    if by != "day":
        return SpendRecord.__table__.c[_HEADERS[by]]
    if dialect == "postgresql":
        # Literal constants: bound parameters would make GROUP BY differ from the SELECT list.
        utc = func.timezone(literal_column("'UTC'"), SpendRecord.created_at)
        return func.to_char(utc, literal_column("'YYYY-MM-DD'"), type_=String)
    return func.date(SpendRecord.created_at, type_=String)  # SQLite stores UTC text


async def spend_report(sessions: async_sessionmaker[AsyncSession], query: SpendQuery) -> list[SpendRow]:
    """One row per group: by day in date order, otherwise the most expensive first."""
    async with sessions() as session:
        dialect = (await session.connection()).dialect.name
        group = _group(query.by, dialect).label("grp")
        statement = select(
            group,
            func.count().label("requests"),
            func.sum(case((SpendRecord.status >= 400, 1), else_=0)).label("errors"),
            func.sum(SpendRecord.tokens_in).label("tokens_in"),
            func.sum(SpendRecord.tokens_out).label("tokens_out"),
            func.sum(SpendRecord.cost_usd).label("cost_usd"),
        ).group_by(group)
        for condition in _conditions(query):
            statement = statement.where(condition)
        result = await session.execute(statement)
        rows = [
            SpendRow(
                group=r.grp,
                requests=int(r.requests),
                errors=int(r.errors or 0),
                tokens_in=int(r.tokens_in or 0),
                tokens_out=int(r.tokens_out or 0),
                cost_usd=r.cost_usd if r.cost_usd is not None else Decimal(0),
            )
            for r in result
        ]
    if query.by == "day":
        return sorted(rows, key=lambda r: r.group or "")
    return sorted(rows, key=lambda r: (-r.cost_usd, -r.requests, r.group is None, r.group or ""))


def _conditions(query: SpendQuery) -> list[ColumnElement[bool]]:
    conditions = []
    if query.since is not None:
        conditions.append(SpendRecord.created_at >= query.since)
    if query.until is not None:
        conditions.append(SpendRecord.created_at < query.until)
    if query.key is not None:
        conditions.append(SpendRecord.key_id == query.key)
    if query.team is not None:
        conditions.append(SpendRecord.team == query.team)
    if query.model is not None:
        conditions.append(SpendRecord.model == query.model)
    return conditions


def total(rows: Sequence[SpendRow]) -> SpendRow:
    """All groups added up (``group`` None)."""
    return SpendRow(
        group=None,
        requests=sum(r.requests for r in rows),
        errors=sum(r.errors for r in rows),
        tokens_in=sum(r.tokens_in for r in rows),
        tokens_out=sum(r.tokens_out for r in rows),
        cost_usd=sum((r.cost_usd for r in rows), Decimal(0)),
    )


# -- rendering ----------------------------------------------------------------------------


def report_document(rows: Sequence[SpendRow], query: SpendQuery) -> dict[str, Any]:
    """The JSON body of ``/admin/spend`` and of ``tokyo-ia spend --format json``."""
    return {
        "object": "spend_report",
        "by": query.by,
        "since": query.since.isoformat() if query.since else None,
        "until": query.until.isoformat() if query.until else None,
        "filters": {name: getattr(query, name) for name in ("key", "team", "model") if getattr(query, name)},
        "data": [r.to_dict() for r in rows],
        "total": {k: v for k, v in total(rows).to_dict().items() if k != "group"},
    }


def render_csv(rows: Sequence[SpendRow], by: str) -> str:
    """A header line (the group column is named after ``by``), then one line per group."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow((_HEADERS[by], *_FIELDS))
    for r in rows:
        group = r.group or ""
        if group.startswith(_FORMULA_START):
            group = "'" + group
        writer.writerow((group, r.requests, r.errors, r.tokens_in, r.tokens_out, money(r.cost_usd)))
    return out.getvalue()


def _printable(value: str | None) -> str:
    # Control characters could rewrite the terminal; a group name is data, not markup.
    return "-" if value is None else "".join(c if c.isprintable() else "?" for c in value)


def render_table(rows: Sequence[SpendRow], by: str) -> str:
    """Aligned columns for a terminal, numbers right-aligned, then a TOTAL line."""
    if not rows:
        return "no spend recorded for this selection"
    header = (_HEADERS[by].upper(), "REQUESTS", "ERRORS", "TOKENS IN", "TOKENS OUT", "COST (USD)")
    lines = [header]
    for label, r in [*((_printable(r.group), r) for r in rows), ("TOTAL", total(rows))]:
        cost = f"{r.cost_usd:.6f}"
        lines.append((label, str(r.requests), str(r.errors), str(r.tokens_in), str(r.tokens_out), cost))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    )
