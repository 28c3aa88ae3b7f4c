"""The audit trail on real SQLite and real PostgreSQL: batching, draining, the hash chain,
tampering, several writers on one database, the client address, and the ``audit`` commands."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import logging
import os
import random
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from tests.support import Outage
from tokyo_ia.security.audit import (
    GENESIS_HASH,
    HASHED_FIELDS,
    AuditEvent,
    AuditWriter,
    VerifyReport,
    client_ip,
    row_hash,
    verify,
)
from tokyo_ia.security.audit_cli import add_commands
from tokyo_ia.store import create_engine, session_factory
from tokyo_ia.store.models import AuditEntry

Sessions = async_sessionmaker[AsyncSession]
REPO = Path(__file__).resolve().parents[2]


def event(i: int, **overrides: object) -> AuditEvent:
    fields: dict[str, object] = {
        "action": "request",
        "actor_key_id": f"key_{i % 3}",
        "route": "/v1/chat/completions",
        "model": "gpt-4o-mini",
        "status": 200,
        "tokens_in": 10 + i,
        "tokens_out": 20 + i,
        "client_ip": "203.0.113.7",
        "detail": {"request_id": f"req-{i}", "provider": "demo", "latency_ms": 1.5, "i": i},
    }
    fields.update(overrides)
    return AuditEvent(**fields)  # type: ignore[arg-type]


async def count_rows(sessions: Sessions) -> int:
    async with sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(AuditEntry)) or 0)


async def rows(sessions: Sessions) -> list[AuditEntry]:
    async with sessions() as session:
        return list(await session.scalars(select(AuditEntry).order_by(AuditEntry.id)))


async def until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def write(sessions: Sessions, n: int) -> list[AuditEntry]:
    writer = AuditWriter(sessions, batch_size=4)
    for i in range(n):
        writer.record(event(i))
    await writer.close()
    return await rows(sessions)


async def execute(engine: AsyncEngine, sql: str, **params: object) -> None:
    async with engine.begin() as conn:
        await conn.execute(text(sql), params)


# -- writing ------------------------------------------------------------------------------


async def test_record_never_writes_and_the_writer_batches(sessions: Sessions) -> None:
    writer = AuditWriter(sessions, batch_size=50, flush_interval_s=60)
    for i in range(120):
        writer.record(event(i))
    assert writer.pending == 120
    await asyncio.sleep(0.05)
    assert await count_rows(sessions) == 0  # nothing on the caller's path, nothing before start()

    writer.start()  # a full batch is waiting: the writer goes now, not after 60 s

    async def written() -> bool:
        return writer.events_written == 120

    await until(written)
    assert writer.batches_written == 1  # behind by more than a batch: the backlog goes at once
    assert await count_rows(sessions) == 120
    for i in range(30):  # not behind: batches of batch_size
        writer.record(event(i))
    await writer.flush()
    assert writer.batches_written == 2
    for i in range(5000):  # far behind: up to 10 batches' worth per transaction
        writer.record(event(i))

    async def all_written() -> bool:
        return writer.events_written == 5150

    await until(all_written)
    assert writer.batches_written <= 2 + 10
    assert await count_rows(sessions) == 5150
    await writer.close()


async def test_a_partial_batch_is_written_after_the_interval(sessions: Sessions) -> None:
    writer = AuditWriter(sessions, batch_size=1000, flush_interval_s=0.05)
    writer.start()
    for i in range(5):
        writer.record(event(i))

    async def written() -> bool:
        return await count_rows(sessions) == 5

    await until(written)
    assert writer.batches_written == 1
    await writer.close()


async def test_close_drains_everything_queued(sessions: Sessions) -> None:
    writer = AuditWriter(sessions, batch_size=1000, flush_interval_s=60)
    writer.start()
    for i in range(500):
        writer.record(event(i))
    await writer.close()
    assert await count_rows(sessions) == 500
    assert writer.pending == 0
    assert (await verify(sessions)).ok
    writer.record(event(999))  # after close: refused and counted, never silently queued
    assert writer.dropped == 1
    assert writer.pending == 0


async def test_a_full_queue_drops_the_oldest_and_says_so_in_the_trail(
    sessions: Sessions, caplog: pytest.LogCaptureFixture
) -> None:
    writer = AuditWriter(sessions, batch_size=100, max_queue=10)
    with caplog.at_level(logging.WARNING, logger="tokyo_ia.audit"):
        for i in range(15):
            writer.record(event(i))
    assert writer.dropped == 5
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1  # rate-limited
    await writer.close()
    stored = await rows(sessions)
    assert stored[0].action == "audit.dropped"
    assert stored[0].detail == {"count": 5, "total": 5}
    assert [r.detail["i"] for r in stored[1:] if r.detail] == list(range(5, 15))


async def test_a_database_failure_keeps_the_events_for_the_next_try(sessions: Sessions) -> None:
    outage = Outage(sessions)
    writer = AuditWriter(outage, batch_size=3, max_queue=8)  # type: ignore[arg-type]
    for i in range(7):
        writer.record(event(i))
    assert not await writer.flush()
    assert writer.pending == 7
    writer.record(event(7))
    writer.record(event(8))  # queue full: event 0 goes
    outage.up = True
    assert await writer.flush()
    stored = await rows(sessions)
    assert stored[0].action == "audit.dropped"
    assert [r.detail["i"] for r in stored[1:] if r.detail] == list(range(1, 9))
    assert (await verify(sessions)).ok
    await writer.close()


# -- the chain ----------------------------------------------------------------------------


async def test_rows_form_a_chain_that_verifies(sessions: Sessions) -> None:
    ts = datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    detail = {"z": 1, "a": {"y": [1, 2.5, None], "b": "ü"}, "request_id": "r"}
    writer = AuditWriter(sessions)
    writer.record(AuditEvent(action="admin.key.create", actor_key_id="master", ts=ts, detail=detail))
    writer.record(AuditEvent(action="request", ts=datetime(2030, 1, 2, 3, 4, 6)))  # naive: UTC
    await writer.close()
    stored = await write(sessions, 10)

    assert stored[0].prev_hash == GENESIS_HASH
    assert stored[0].ts == ts
    assert stored[0].detail == detail
    assert stored[1].ts == datetime(2030, 1, 2, 3, 4, 6, tzinfo=UTC)
    for before, after in itertools.pairwise(stored):
        assert after.prev_hash == before.hash
    for row in stored:
        assert row.prev_hash is not None
        assert row.hash == row_hash(row.prev_hash, {n: getattr(row, n) for n in HASHED_FIELDS})
    report = await verify(sessions)
    assert report == VerifyReport(ok=True, count=12, last_id=stored[-1].id, last_hash=stored[-1].hash)


async def test_numbers_that_postgresql_would_respell_keep_the_chain_whole(sessions: Sessions) -> None:
    """JSONB gives 1e16 back as 10000000000000000 (an int, another spelling): such numbers
    (magnitude 1e16 and up, which orjson writes with an exponent) are kept as their text."""
    detail = {"big": 1e16, "huge": -1.5e300, "list": [3e17, 2.5, 1e-7], "n": {"m": 12345678.9}, "i": 10**17}
    writer = AuditWriter(sessions)
    writer.record(AuditEvent(action="request", detail=detail))
    writer.record(AuditEvent(action="request", detail={"after": True}))
    await writer.close()
    stored = await rows(sessions)
    assert stored[0].detail == {
        "big": "1e+16",
        "huge": "-1.5e+300",
        "list": ["3e+17", 2.5, 1e-7],
        "n": {"m": 12345678.9},
        "i": 10**17,
    }
    assert (await verify(sessions)).ok


async def test_a_detail_that_cannot_be_hashed_again_is_reported_not_raised(
    engine: AsyncEngine, sessions: Sessions
) -> None:
    """E.g. a row written before the above, whose 1e20 PostgreSQL gave back as a 21-digit int."""
    stored = await write(sessions, 2)
    await execute(
        engine,
        "UPDATE audit_log SET detail = :d WHERE id = :id",
        d='{"x": 1' + "0" * 20 + "}",
        id=stored[0].id,
    )
    report = await verify(sessions)
    assert not report.ok and report.broken_id == stored[0].id
    assert report.reason is not None and report.reason.startswith("content cannot be hashed again")


class _Odd:
    def __str__(self) -> str:
        return "odd"


def golden_events() -> list[AuditEvent]:
    """Events that exercise every normalisation the hash sees (cuts, clamps, times, detail)."""
    at = datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    odd_detail: dict[Any, Any] = {
        "z": 1,
        "a": {"y": [1, 2.5, None, 0.1], "b": "ü日本", "c": (1, 2)},
        3: "int key",
        "when": at,
        "odd": _Odd(),
        "nested": {"k2": {"k1": [{"b": 1, "a": 2}]}},
    }
    return [
        event(
            1, ts=at, detail={"request_id": "r-1", "attempts": 1, "latency_ms": 12.345, "provider": "openai"}
        ),
        AuditEvent(action="request", ts=at.replace(microsecond=0)),  # no fraction
        AuditEvent(action="admin /admin/keys", ts=datetime(2030, 1, 2, 3, 4, 6)),  # naive: UTC
        AuditEvent(
            action="request", ts=datetime(2030, 1, 2, 12, 4, 7, 5, tzinfo=timezone(timedelta(hours=9)))
        ),
        AuditEvent(
            action="x" * 100,
            actor_key_id="k" * 200,
            route="/" * 300,
            model="m" * 300,
            client_ip="9" * 80,
            status=2**40,
            tokens_in=-(2**40),
            tokens_out=True,
            ts=at,
            detail=odd_detail,
        ),
        AuditEvent(action="request", ts=at, detail={}),
        AuditEvent(
            action="audit.dropped", ts=at + timedelta(microseconds=1), detail={"count": 5, "total": 7}
        ),
    ]


#: The chain the writer made of :func:`golden_events` before its SQLite rows skipped
#: SQLAlchemy's INSERT machinery. Stored trails hold chains made that way: never change these.
GOLDEN_HASHES = [
    "469cdef7bc97f7a1f14c6c7dd4c8c6f3a48d11cb48f62472baccbb5666da7b18",
    "383f48d803e6d84dc28e8196dc52356ca713270c471716fcee00cea2e5f62d67",
    "7857db077f577c072d6d810c42a2ea832c097fe271d7c711cf2adfd95628dc02",
    "66a9a254f48dacec3d7c67c923ccf785a186eb53aefc2d34e276fc6576c91703",
    "6271ee32152b389fd1c837f8b862538105f516a8c08590100589d3f63336929b",
    "586cc39755a94500bc6e5d1a7cbe58ef2f29ee6d30fb6d5ccb6ad46dc1d744e2",
    "c2f73bdc1bb841c569f8ca6045ede8486f9c9bedf95f1d8b1d13640453bbbc59",
]


async def test_the_writer_hashes_as_it_always_has(sessions: Sessions) -> None:
    writer = AuditWriter(sessions)
    for e in golden_events():
        writer.record(e)
    await writer.close()
    stored = await rows(sessions)
    assert [r.hash for r in stored] == GOLDEN_HASHES
    assert stored[4].detail is not None and stored[4].detail["3"] == "int key"
    assert (await verify(sessions)).ok


def reference_hash(prev_hash: str, row: dict[str, Any]) -> str:
    """The hash as the module docstring defines it, spelled out without shortcuts."""
    fields = {name: row.get(name) for name in HASHED_FIELDS}
    ts = row["ts"] if row["ts"].tzinfo else row["ts"].replace(tzinfo=UTC)
    fields["ts"] = ts.astimezone(UTC).isoformat(timespec="microseconds")
    canonical = orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(prev_hash.encode("ascii") + canonical).hexdigest()


def test_row_hash_spells_every_time_as_isoformat() -> None:
    """row_hash lets orjson write the time when that gives the same bytes; check it does."""
    rng = random.Random(20300102)
    zones = [UTC, None, timezone(timedelta(hours=-7)), timezone(timedelta(hours=5, minutes=45))]
    for _ in range(5000):
        seconds = rng.randrange(86_400 * 365 * 9_990) + 86_400 * 2  # years 1-9991, clear of the edges
        ts = datetime(1, 1, 1) + timedelta(
            seconds=seconds, microseconds=rng.choice([0, rng.randrange(10**6)])
        )
        row = {
            "ts": ts.replace(tzinfo=rng.choice(zones)),
            "action": "request",
            "status": 200,
            "detail": {"a": 1},
        }
        assert row_hash(GENESIS_HASH, row) == reference_hash(GENESIS_HASH, row)


async def test_an_empty_trail_verifies(sessions: Sessions) -> None:
    assert await verify(sessions) == VerifyReport(ok=True, count=0)


@pytest.mark.parametrize(
    "change", ["status = 500", "tokens_in = tokens_in + 1", "detail = NULL", "client_ip = '10.9.9.9'"]
)
async def test_a_changed_field_is_found(engine: AsyncEngine, sessions: Sessions, change: str) -> None:
    stored = await write(sessions, 9)
    await execute(engine, f"UPDATE audit_log SET {change} WHERE id = :id", id=stored[4].id)
    report = await verify(sessions)
    assert not report.ok
    assert report.broken_id == stored[4].id
    assert report.count == 4
    assert report.reason is not None and report.reason.startswith("content changed")


async def test_a_deleted_row_is_found(engine: AsyncEngine, sessions: Sessions) -> None:
    stored = await write(sessions, 9)
    await execute(engine, "DELETE FROM audit_log WHERE id = :id", id=stored[4].id)
    report = await verify(sessions)
    assert report.broken_id == stored[5].id
    assert report.reason is not None
    assert report.reason.startswith("link broken")
    assert f"ids {stored[4].id}..{stored[4].id} absent" in report.reason


async def test_a_deleted_first_row_is_found(engine: AsyncEngine, sessions: Sessions) -> None:
    stored = await write(sessions, 3)
    await execute(engine, "DELETE FROM audit_log WHERE id = :id", id=stored[0].id)
    report = await verify(sessions)
    assert report.broken_id == stored[1].id
    assert report.reason is not None and "the start of the log" in report.reason


async def test_a_changed_hash_is_found(engine: AsyncEngine, sessions: Sessions) -> None:
    stored = await write(sessions, 6)
    await execute(engine, "UPDATE audit_log SET hash = :h WHERE id = :id", h="f" * 64, id=stored[2].id)
    report = await verify(sessions)
    assert report.broken_id == stored[2].id
    assert report.reason is not None and report.reason.startswith("content changed")


async def test_a_rehashed_forgery_breaks_the_next_link(engine: AsyncEngine, sessions: Sessions) -> None:
    stored = await write(sessions, 6)
    forged = stored[2]
    fields = {n: getattr(forged, n) for n in HASHED_FIELDS}
    fields["status"] = 200 if forged.status != 200 else 201
    assert forged.prev_hash is not None
    new_hash = row_hash(forged.prev_hash, fields)
    await execute(
        engine,
        "UPDATE audit_log SET status = :s, hash = :h WHERE id = :id",
        s=fields["status"],
        h=new_hash,
        id=forged.id,
    )
    report = await verify(sessions)
    assert report.broken_id == stored[3].id
    assert report.reason is not None and report.reason.startswith("link broken")


async def test_verify_walks_more_than_one_page(sessions: Sessions, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tokyo_ia.security.audit._VERIFY_PAGE", 4)
    await write(sessions, 11)
    assert (await verify(sessions)).count == 11


async def test_two_writers_on_one_database_keep_one_chain(db_url: str, sessions: Sessions) -> None:
    """Separate engines = separate connections, as with two replicas; flushes overlap."""
    engines = [create_engine(db_url), create_engine(db_url)]
    writers = [AuditWriter(session_factory(e), batch_size=3) for e in engines]
    try:
        for round_ in range(12):
            for n, writer in enumerate(writers):
                for i in range(7):
                    writer.record(event(i, detail={"writer": n, "round": round_, "i": i}))
            results = await asyncio.gather(*(w.flush() for w in writers))
            assert all(results)
        for writer in writers:
            await writer.close()
    finally:
        for e in engines:
            await e.dispose()
    report = await verify(sessions)
    assert report.ok, report
    assert report.count == 2 * 12 * 7
    stored = await rows(sessions)
    assert {r.detail["writer"] for r in stored if r.detail} == {0, 1}


# -- the client address -------------------------------------------------------------------

TRUSTED = ["10.0.0.0/8", "fd00::/8", "127.0.0.1/32"]


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("203.0.113.9", "1.2.3.4", "203.0.113.9"),  # untrusted peer: its header is ignored
        ("10.0.0.2", None, "10.0.0.2"),  # trusted peer, no header
        ("10.0.0.2", "198.51.100.4", "198.51.100.4"),
        ("10.0.0.2", "6.6.6.6, 198.51.100.4, 10.1.1.1", "198.51.100.4"),  # spoofed left part skipped
        ("10.0.0.2", "10.3.3.3, 10.1.1.1", "10.3.3.3"),  # all hops trusted: the leftmost
        ("10.0.0.2", "garbage, 10.1.1.1", "10.1.1.1"),  # not an address: the last trusted hop
        ("10.0.0.2", "198.51.100.4:5555", "198.51.100.4"),
        ("10.0.0.2", "[2001:db8::1]:443", "2001:db8::1"),
        ("fd00::1", "2001:db8::7", "2001:db8::7"),
        ("::ffff:10.0.0.2", "198.51.100.4", "198.51.100.4"),  # IPv4-mapped peer
        ("10.0.0.2", "198.51.100.4,, ", "198.51.100.4"),
        (None, "1.2.3.4", ""),
        ("testclient", "1.2.3.4", "testclient"),
    ],
)
def test_client_ip(peer: str | None, xff: str | None, expected: str) -> None:
    assert client_ip(peer, xff, TRUSTED) == expected


def test_client_ip_without_trusted_proxies_ignores_the_header() -> None:
    assert client_ip("10.0.0.2", "1.2.3.4", []) == "10.0.0.2"


# -- commands -----------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """In-process, through ``add_commands``, until the lead wires it into ``tokyo_ia.cli``."""
    parser = argparse.ArgumentParser(prog="tokyo-ia")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = int(args.func(args))
    return code, capsys.readouterr().out


@pytest.fixture
def config(db_url: str, tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"store": {"url": db_url}}))
    return path


async def test_cli_verify_and_tail(
    engine: AsyncEngine, sessions: Sessions, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stored = await write(sessions, 5)
    code, out = await asyncio.to_thread(run_cli, capsys, "audit", "verify", "--config", str(config))
    assert code == 0
    assert out.startswith("ok: 5 records, chain intact")

    code, out = await asyncio.to_thread(
        run_cli, capsys, "audit", "tail", "--config", str(config), "-n", "2", "--json"
    )
    assert code == 0
    tail = orjson.loads(out)
    assert [r["id"] for r in tail] == [stored[3].id, stored[4].id]
    assert tail[1]["hash"] == stored[4].hash
    code, out = await asyncio.to_thread(run_cli, capsys, "audit", "tail", "--config", str(config))
    assert out.splitlines()[0].split()[:3] == ["ID", "TIME", "(UTC)"]
    assert len(out.splitlines()) == 6

    await execute(engine, "UPDATE audit_log SET tokens_out = 1 WHERE id = :id", id=stored[2].id)
    code, out = await asyncio.to_thread(run_cli, capsys, "audit", "verify", "--config", str(config))
    assert code == 1
    assert out.startswith(f"TAMPERED: record {stored[2].id}: content changed")


_SHIM = (
    "import argparse, sys\n"
    "from tokyo_ia.security.audit_cli import add_commands\n"
    "p = argparse.ArgumentParser(prog='tokyo-ia')\n"
    "add_commands(p.add_subparsers(dest='command', required=True))\n"
    "a = p.parse_args(sys.argv[1:])\n"
    "sys.exit(a.func(a))\n"
)


def _wired() -> bool:
    from tokyo_ia.cli import build_parser

    return "audit" in build_parser().format_help()


async def test_cli_verify_in_a_process(engine: AsyncEngine, sessions: Sessions, config: Path) -> None:
    """Exit codes as a cron job sees them: ``python -m tokyo_ia`` once wired, a shim until then."""
    stored = await write(sessions, 3)
    program = ["-m", "tokyo_ia"] if _wired() else ["-c", _SHIM]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}

    def run() -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, *program, "audit", "verify", "--config", str(config)]
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30, check=False)

    done = await asyncio.to_thread(run)
    assert (done.returncode, done.stdout.splitlines()[0]) == (0, "ok: 3 records, chain intact"), done.stderr
    await execute(engine, "DELETE FROM audit_log WHERE id = :id", id=stored[1].id)
    done = await asyncio.to_thread(run)
    assert done.returncode == 1, done.stderr
    assert done.stdout.startswith(f"TAMPERED: record {stored[2].id}: link broken")
