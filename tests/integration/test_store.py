"""The store on real SQLite and real PostgreSQL: migrations, schema, portable types."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from tokyo_ia.errors import ConfigError
from tokyo_ia.store import check_schema, create_engine, current_revision, head_revision, upgrade
from tokyo_ia.store.db import VERSION_TABLE, downgrade
from tokyo_ia.store.models import ApiKey, AuditEntry, Base

TABLES = {"api_keys", "audit_log", "spend_ledger", VERSION_TABLE}


def _tables(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())


async def test_upgrade_builds_the_schema_on_an_empty_database(empty_db_url: str) -> None:
    engine = create_engine(empty_db_url)
    try:
        assert await current_revision(engine) is None
        await upgrade(empty_db_url)
        assert await current_revision(engine) == head_revision() == "0002"
        async with engine.connect() as conn:
            assert await conn.run_sync(_tables) >= TABLES
        await check_schema(engine)
        await upgrade(empty_db_url)  # a second run changes nothing
        assert await current_revision(engine) == "0002"
    finally:
        await engine.dispose()


async def test_an_unmigrated_database_is_refused_with_the_command_to_run(empty_db_url: str) -> None:
    engine = create_engine(empty_db_url)
    try:
        with pytest.raises(ConfigError, match=r"is empty, this version needs 0002; run: tokyo-ia db upgrade"):
            await check_schema(engine)
    finally:
        await engine.dispose()


async def test_downgrade_to_base_removes_our_tables_and_upgrade_restores_them(empty_db_url: str) -> None:
    await upgrade(empty_db_url)
    await downgrade(empty_db_url, "base")
    engine = create_engine(empty_db_url)
    try:
        async with engine.connect() as conn:
            assert not {"api_keys", "audit_log", "spend_ledger"} & await conn.run_sync(_tables)
        await upgrade(empty_db_url)
        assert await current_revision(engine) == "0002"
    finally:
        await engine.dispose()


def _diff(conn: Connection) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"compare_type": True, "version_table": VERSION_TABLE})
    return [d for d in compare_metadata(context, Base.metadata) if not _is_version_table(d)]


def _is_version_table(diff: Any) -> bool:
    return isinstance(diff, tuple) and getattr(diff[1], "name", None) == VERSION_TABLE


async def test_models_and_migrations_describe_the_same_schema(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        assert await conn.run_sync(_diff) == []


async def test_timestamps_come_back_as_aware_utc(sessions: async_sessionmaker[AsyncSession]) -> None:
    tokyo = timezone(timedelta(hours=9))
    expires = datetime(2031, 1, 1, 9, 0, tzinfo=tokyo)
    naive = datetime(2030, 6, 1, 12, 0)
    async with sessions.begin() as session:
        session.add(_key_row("key_a", expires_at=expires, created_at=naive))
    async with sessions() as session:
        row = (await session.execute(select(ApiKey))).scalar_one()
    assert row.expires_at == datetime(2031, 1, 1, 0, 0, tzinfo=UTC)
    assert row.expires_at is not None
    assert row.expires_at.tzinfo is UTC
    assert row.created_at == datetime(2030, 6, 1, 12, 0, tzinfo=UTC)  # naive is read as UTC
    assert row.models == ["gpt-*"]
    assert row.meta == {"env": "test"}
    assert row.log_payloads is False


async def test_audit_log_ids_increase_and_json_round_trips(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions.begin() as session:
        for i in range(3):
            session.add(
                AuditEntry(action="key.create", detail={"n": i, "nested": [1, "x"]}, hash=f"{i:064x}")
            )
    async with sessions() as session:
        rows = (await session.execute(select(AuditEntry).order_by(AuditEntry.id))).scalars().all()
    assert [r.detail for r in rows] == [{"n": i, "nested": [1, "x"]} for i in range(3)]
    assert rows[0].id < rows[1].id < rows[2].id
    assert all(r.ts.tzinfo is UTC for r in rows)


@pytest.mark.parametrize(
    "url",
    ["sqlite:///./x.db", "postgresql://u@h/db", "mysql+aiomysql://u@h/db", "not a url"],
)
def test_only_async_sqlite_and_postgres_urls_are_accepted(url: str) -> None:
    with pytest.raises(ConfigError, match=r"store\.url: .* (is not supported|is not a database URL)"):
        create_engine(url)


def test_messages_never_show_the_database_password() -> None:
    with pytest.raises(ConfigError) as info:
        create_engine("mysql+aiomysql://u:hunter2@h/db")
    assert "hunter2" not in str(info.value)


def _key_row(key_id: str, **fields: Any) -> ApiKey:
    values: dict[str, Any] = {
        "id": key_id,
        "key_hash": key_id.ljust(64, "0"),
        "prefix": "sk-tia-abcd",
        "last4": "wxyz",
        "name": key_id,
        "models": ["gpt-*"],
        "meta": {"env": "test"},
        **fields,
    }
    return ApiKey(**values)
