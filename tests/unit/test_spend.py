"""Spend reports without a database: parameters, rendering, and the ledger entry of a request."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from tokyo_ia.accounting.ledger import SpendEntry, cached_tokens, spend_entry
from tokyo_ia.accounting.pricing import PriceTable
from tokyo_ia.accounting.spend import (
    SpendQuery,
    SpendRow,
    money,
    parse_params,
    parse_time,
    render_csv,
    render_table,
    report_document,
)
from tokyo_ia.config import AuthConfig
from tokyo_ia.errors import InvalidRequestError
from tokyo_ia.pipeline import Pipeline, RequestContext
from tokyo_ia.providers.demo import DemoConfig, DemoProvider
from tokyo_ia.resilience.admission import Admission
from tokyo_ia.resilience.ratelimit import Limits, MemoryRateLimiter
from tokyo_ia.routing.catalog import Catalog, Deployment
from tokyo_ia.security.auth import Authenticator, Principal

ROWS = [
    SpendRow("gpt-4o-mini", 1001, 1, 1000, 20, Decimal("0.0000750000")),
    SpendRow("=HYPERLINK(evil)", 2, 0, 7, 40, Decimal("12.5")),
    SpendRow(None, 3, 3, 0, 0, Decimal(0)),
]


# -- parameters ---------------------------------------------------------------------------


def test_params_default_to_json_by_model() -> None:
    assert parse_params({}) == (SpendQuery(by="model"), "json")


def test_params_parse_window_filters_and_format() -> None:
    query, fmt = parse_params(
        {"by": "day", "since": "2030-01-01", "until": "2030-01-31", "team": "research", "format": "csv"}
    )
    assert fmt == "csv"
    assert query == SpendQuery(
        by="day",
        since=datetime(2030, 1, 1, tzinfo=UTC),
        until=datetime(2030, 2, 1, tzinfo=UTC),  # a bare until date includes that day
        team="research",
    )


@pytest.mark.parametrize(
    ("params", "param", "message"),
    [
        ({"by": "week"}, "by", "by: must be one of key, team, model, day (got 'week')"),
        ({"format": "xml"}, "format", "format: must be one of json, csv (got 'xml')"),
        ({"group": "model"}, "group", "group: unknown query parameter; use: by, since, until, key, team"),
        ({"since": "yesterday"}, "since", "since: 'yesterday' is not a date; use YYYY-MM-DD"),
        ({"since": "2030-02-01", "until": "2030-01-31"}, "until", "is not after since"),
    ],
)
def test_bad_params_name_the_param_and_the_fix(params: dict[str, str], param: str, message: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_params(params)
    assert info.value.param == param
    assert info.value.status == 400
    assert message in info.value.message


def test_times_are_utc() -> None:
    assert parse_time("2030-01-02T03:04:05Z", "since") == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert parse_time("2030-01-02T12:00:00+09:00", "since") == datetime(2030, 1, 2, 3, tzinfo=UTC)
    assert parse_time("2030-01-02T03:04:05", "until", end=True) == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


# -- rendering ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "text"),
    [("0.0000750000", "0.000075"), ("12.5000000000", "12.5"), ("1E+1", "10"), ("0E-10", "0"), ("3", "3")],
)
def test_money_is_plain_exact_digits(amount: str, text: str) -> None:
    assert money(Decimal(amount)) == text


def test_csv_is_exact_and_never_a_formula() -> None:
    text = render_csv(ROWS, "model")
    assert text.endswith("\r\n")
    rows = list(csv.reader(io.StringIO(text)))
    assert rows == [
        ["model", "requests", "errors", "tokens_in", "tokens_out", "cost_usd"],
        ["gpt-4o-mini", "1001", "1", "1000", "20", "0.000075"],
        ["'=HYPERLINK(evil)", "2", "0", "7", "40", "12.5"],
        ["", "3", "3", "0", "0", "0"],
    ]
    assert render_csv([], "key") == "key_id,requests,errors,tokens_in,tokens_out,cost_usd\r\n"


def test_table_aligns_numbers_and_adds_a_total() -> None:
    lines = render_table(ROWS, "team").splitlines()
    assert lines[0].split() == [
        "TEAM",
        "REQUESTS",
        "ERRORS",
        "TOKENS",
        "IN",
        "TOKENS",
        "OUT",
        "COST",
        "(USD)",
    ]
    assert lines[1].split() == ["gpt-4o-mini", "1001", "1", "1000", "20", "0.000075"]
    assert lines[3].split() == ["-", "3", "3", "0", "0", "0.000000"]
    assert lines[4].split() == ["TOTAL", "1006", "4", "1007", "60", "12.500075"]
    assert len({len(line) for line in lines}) == 1  # right-aligned to one width
    assert render_table([], "model") == "no spend recorded for this selection"


def test_json_document() -> None:
    query = SpendQuery(by="model", since=datetime(2030, 1, 1, tzinfo=UTC), key="key_1")
    doc = report_document(ROWS[:1], query)
    assert doc == {
        "object": "spend_report",
        "by": "model",
        "since": "2030-01-01T00:00:00+00:00",
        "until": None,
        "filters": {"key": "key_1"},
        "data": [
            {
                "group": "gpt-4o-mini",
                "requests": 1001,
                "errors": 1,
                "tokens_in": 1000,
                "tokens_out": 20,
                "cost_usd": "0.000075",
            }
        ],
        "total": {"requests": 1001, "errors": 1, "tokens_in": 1000, "tokens_out": 20, "cost_usd": "0.000075"},
    }


# -- the entry of one request -------------------------------------------------------------

USAGE = {
    "prompt_tokens": 1234,
    "completion_tokens": 567,
    "prompt_tokens_details": {"cached_tokens": 1024},
}


def context(**overrides: Any) -> RequestContext:
    provider = DemoProvider("up", DemoConfig(kind="demo"))
    ctx = RequestContext("req-1", None, route="/v1/chat/completions", model="fast")
    ctx.principal = Principal(key_id="key_abc", name="svc", team="research")
    ctx.deployment = Deployment("fast", provider, "gpt-4o-mini-2024-07-18", 1.0, 0)
    ctx.usage = USAGE
    ctx.attempts = 2
    ctx.cache = "miss"
    for name, value in overrides.items():
        setattr(ctx, name, value)
    return ctx


def test_an_entry_carries_the_request_and_the_exact_price_table_cost() -> None:
    cost = PriceTable.load().cost("gpt-4o-mini-2024-07-18", USAGE)
    assert cost == (210 * Decimal("0.15") + 1024 * Decimal("0.075") + 567 * Decimal("0.60")) / 1_000_000
    ctx = context(cost_usd=float(cost))  # the pipeline carries a float; the writer makes it exact
    entry = spend_entry(ctx, 200, 0.0123456)
    assert entry == SpendEntry(
        request_id="req-1",
        route="/v1/chat/completions",
        status=200,
        latency_ms=12.346,
        key_id="key_abc",
        team="research",
        model="fast",
        provider="up",
        upstream_model="gpt-4o-mini-2024-07-18",
        tokens_in=1234,
        tokens_out=567,
        cached_tokens=1024,
        cost_usd=float(cost),
        cache_status="miss",
        attempts=2,
        created_at=entry.created_at,
    )


def test_an_entry_of_a_failed_request() -> None:
    entry = spend_entry(context(usage=None, deployment=None, cache=None, principal=None), 404, 0.001)
    assert (entry.tokens_in, entry.tokens_out, entry.cached_tokens, entry.cost_usd) == (0, 0, None, 0)
    assert (entry.provider, entry.key_id, entry.team, entry.status) == (None, None, None, 404)


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({}, None),
        ({"prompt_tokens_details": None}, None),
        ({"prompt_tokens_details": {"audio_tokens": 3}}, None),
        ({"prompt_tokens_details": {"cached_tokens": 0}}, 0),
        ({"prompt_tokens_details": {"cached_tokens": "9"}}, 0),
    ],
)
def test_cached_tokens(usage: dict[str, Any], expected: int | None) -> None:
    assert cached_tokens(usage) == expected


class Ledger:
    def __init__(self) -> None:
        self.entries: list[SpendEntry] = []

    def record(self, entry: SpendEntry) -> None:
        self.entries.append(entry)


def test_the_pipeline_writes_a_row_per_model_request_only() -> None:
    ledger = Ledger()
    admission = Admission(MemoryRateLimiter(), Limits(None, None, None))
    pipeline = Pipeline(Authenticator(AuthConfig()), Catalog({}, {}), admission, ledger=ledger)  # type: ignore[arg-type]
    pipeline.record(context(), 200)
    pipeline.record(context(model="unknown", deployment=None, usage=None), 404)
    pipeline.record(context(route="/v1/models", model=None), 200)  # no model: not spend
    pipeline.record(context(route="/admin/keys", model=None), 200)
    assert [(e.model, e.status) for e in ledger.entries] == [("fast", 200), ("unknown", 404)]
