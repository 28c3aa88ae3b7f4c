"""The spend ledger on real SQLite and real PostgreSQL: batched writes, exact money, draining,
outages, the reports (by key, team, model and day) and the ``tokyo-ia spend`` command."""

from __future__ import annotations

import argparse
import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.support import Outage
from tokyo_ia.accounting.ledger import SpendEntry, SpendLedger
from tokyo_ia.accounting.spend import SpendQuery, SpendRow, parse_time, spend_report
from tokyo_ia.accounting.spend_cli import add_commands
from tokyo_ia.store.models import SpendRecord

Sessions = async_sessionmaker[AsyncSession]
PRICE = Decimal("0.000000075")  # one cached gpt-4o-mini input token: 0.075 USD per million


def entry(i: int = 0, **overrides: Any) -> SpendEntry:
    fields: dict[str, Any] = {
        "request_id": f"req-{i}",
        "route": "/v1/chat/completions",
        "status": 200,
        "latency_ms": 12.5,
        "key_id": f"key_{i % 2}",
        "team": "research" if i % 2 else None,
        "model": "gpt-4o-mini",
        "provider": "openai",
        "upstream_model": "gpt-4o-mini-2024-07-18",
        "tokens_in": 10,
        "tokens_out": 20,
        "cost_usd": Decimal("0.0000135"),
        "attempts": 1,
    }
    fields.update(overrides)
    return SpendEntry(**fields)


async def stored(sessions: Sessions) -> list[SpendRecord]:
    async with sessions() as session:
        return list(await session.scalars(select(SpendRecord).order_by(SpendRecord.id)))


async def count(sessions: Sessions) -> int:
    async with sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(SpendRecord)) or 0)


# -- writing ------------------------------------------------------------------------------


async def test_entries_are_written_in_batches_and_round_trip_exactly(sessions: Sessions) -> None:
    ledger = SpendLedger(sessions, batch_size=3, flush_interval_s=60)
    at = datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    ledger.record(entry(0, created_at=at, cached_tokens=4, cache_status="miss", cost_usd=PRICE))
    ledger.record(entry(1, model="m" * 300, cost_usd=Decimal("123456.0123456789")))
    ledger.record(entry(2, cost_usd=float(Decimal("0.0002113950"))))  # as the pipeline carries it
    ledger.record(entry(3, cost_usd=Decimal("1e12")))  # nonsense: stored as 0, never a failed batch
    for i in range(4, 7):
        ledger.record(entry(i))
    assert await count(sessions) == 0  # record() never writes
    ledger.start()  # a full batch waits: everything is written now, not after 60 s
    for _ in range(500):
        if ledger.items_written == 7:
            break
        await asyncio.sleep(0.02)
    assert ledger.batches_written == 1  # 7 waiting, more than a batch: the backlog goes at once
    await ledger.close()
    ledger.record(entry(99))  # after close: refused and counted
    assert (ledger.dropped, ledger.pending) == (1, 0)

    rows = await stored(sessions)
    assert len(rows) == 7
    first = rows[0]
    assert (first.created_at, first.request_id, first.key_id, first.team) == (at, "req-0", "key_0", None)
    assert (first.cached_tokens, first.cache_status, first.attempts, first.latency_ms) == (4, "miss", 1, 12.5)
    assert first.cost_usd == PRICE and isinstance(first.cost_usd, Decimal)
    assert rows[1].model == "m" * 256  # cut to the column, never a failed batch
    assert rows[1].cost_usd == Decimal("123456.0123456789")
    assert rows[1].team == "research" and rows[2].cached_tokens is None
    assert rows[2].cost_usd == Decimal("0.000211395")  # exact again
    assert rows[3].cost_usd == 0


async def test_an_outage_keeps_entries_and_a_full_queue_drops_the_oldest(sessions: Sessions) -> None:
    outage = Outage(sessions)
    ledger = SpendLedger(outage, batch_size=3, max_queue=5)  # type: ignore[arg-type]
    for i in range(5):
        ledger.record(entry(i))
    assert not await ledger.flush()
    ledger.record(entry(5))  # full: entry 0 goes
    assert (ledger.dropped, ledger.pending) == (1, 5)
    outage.up = True
    assert await ledger.flush()
    # No marker row for the drop (unlike the audit trail): only the entries themselves.
    assert [r.request_id for r in await stored(sessions)] == [f"req-{i}" for i in range(1, 6)]
    await ledger.close()


# -- reports ------------------------------------------------------------------------------


async def fill(sessions: Sessions) -> None:
    """Two days across a UTC midnight, two keys, one team, two models, some errors."""
    ledger = SpendLedger(sessions, batch_size=500)
    day1, day2 = datetime(2030, 3, 1, 23, 59, 59, tzinfo=UTC), datetime(2030, 3, 2, 0, 0, 1, tzinfo=UTC)
    for i in range(1000):  # 1000 × 0.075 USD per million tokens: exact, not 7.499999e-05
        ledger.record(entry(i, created_at=day1, cost_usd=PRICE, tokens_in=1, tokens_out=0))
    ledger.record(entry(1, created_at=day2, model="claude", cost_usd=Decimal("0.5"), tokens_in=7))
    ledger.record(entry(3, created_at=day2, model="claude", status=502, cost_usd=Decimal(0), tokens_in=0))
    ledger.record(entry(2, created_at=day2, status=429, cost_usd=Decimal(0), tokens_in=0, tokens_out=0))
    await ledger.close()


def as_tuples(rows: list[SpendRow]) -> list[tuple[Any, ...]]:
    return [(r.group, r.requests, r.errors, r.tokens_in, r.tokens_out, r.cost_usd) for r in rows]


async def test_report_by_model_key_team_and_day(sessions: Sessions) -> None:
    await fill(sessions)
    by_model = await spend_report(sessions, SpendQuery(by="model"))
    assert as_tuples(by_model) == [
        ("claude", 2, 1, 7, 40, Decimal("0.5")),
        ("gpt-4o-mini", 1001, 1, 1000, 0, Decimal("0.000075")),
    ]
    by_key = await spend_report(sessions, SpendQuery(by="key"))
    assert as_tuples(by_key) == [
        ("key_1", 502, 1, 507, 40, Decimal("0.5000375")),
        ("key_0", 501, 1, 500, 0, Decimal("0.0000375")),
    ]
    by_team = await spend_report(sessions, SpendQuery(by="team"))
    assert [(r.group, r.requests) for r in by_team] == [("research", 502), (None, 501)]
    by_day = await spend_report(sessions, SpendQuery(by="day"))
    assert as_tuples(by_day) == [
        ("2030-03-01", 1000, 0, 1000, 0, Decimal("0.000075")),
        ("2030-03-02", 3, 2, 7, 40, Decimal("0.5")),
    ]


async def test_report_window_and_filters(sessions: Sessions) -> None:
    await fill(sessions)
    since = parse_time("2030-03-02", "since")
    day2 = await spend_report(sessions, SpendQuery(by="model", since=since))
    assert [(r.group, r.requests) for r in day2] == [("claude", 2), ("gpt-4o-mini", 1)]
    until = parse_time("2030-03-01", "until", end=True)  # a bare date: that whole day
    day1 = await spend_report(sessions, SpendQuery(by="day", until=until))
    assert [r.group for r in day1] == ["2030-03-01"]
    only = await spend_report(sessions, SpendQuery(by="day", key="key_1", model="claude"))
    assert as_tuples(only) == [("2030-03-02", 2, 1, 7, 40, Decimal("0.5"))]
    assert await spend_report(sessions, SpendQuery(by="team", team="nobody")) == []


# -- the command --------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="tokyo-ia")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = int(args.func(args))
    out, err = capsys.readouterr()
    return code, out, err


async def test_spend_command_formats(
    sessions: Sessions, db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await fill(sessions)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"store": {"url": db_url}}))

    def cli(*argv: str) -> tuple[int, str, str]:
        return run_cli(capsys, "spend", "--config", str(config), *argv)

    code, out, _ = await asyncio.to_thread(cli, "--by", "model")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["MODEL", "REQUESTS", "ERRORS"]
    assert lines[1].split() == ["claude", "2", "1", "7", "40", "0.500000"]
    assert lines[-1].split() == ["TOTAL", "1003", "2", "1007", "40", "0.500075"]

    code, out, _ = await asyncio.to_thread(cli, "--by", "day", "--format", "csv", "--since", "2030-03-02")
    assert out.splitlines() == [
        "day,requests,errors,tokens_in,tokens_out,cost_usd",
        "2030-03-02,3,2,7,40,0.5",
    ]

    code, out, _ = await asyncio.to_thread(cli, "--by", "key", "--format", "json", "--model", "gpt-4o-mini")
    report = orjson.loads(out)
    assert report["by"] == "key" and report["filters"] == {"model": "gpt-4o-mini"}
    assert [r["group"] for r in report["data"]] == ["key_0", "key_1"]
    assert report["total"]["cost_usd"] == "0.000075"

    code, _, err = await asyncio.to_thread(cli, "--since", "2030-03-05", "--until", "2030-03-01")
    assert code == 1 and "until:" in err


def test_spend_command_rejects_a_bad_date(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run_cli(capsys, "spend", "--since", "March")
    assert "since: 'March' is not a date; use YYYY-MM-DD" in capsys.readouterr().err
