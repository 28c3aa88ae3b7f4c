"""Alembic environment for the packaged migrations.

Two ways in:

- :func:`tokyo_ia.store.db.upgrade` hands over an open connection in
  ``config.attributes["connection"]`` (the normal path: one async engine, any backend);
- a plain ``alembic`` command with ``sqlalchemy.url`` set (``-x``-free, e.g. from
  :func:`tokyo_ia.store.db.alembic_config`): an async engine is created here.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection

from tokyo_ia.store.db import VERSION_TABLE, create_engine
from tokyo_ia.store.models import Base

config = context.config
target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        # SQLite cannot ALTER most things; batch mode rebuilds tables instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def _run_sync(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


async def _run_with_own_engine(url: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_run_sync)
    finally:
        await engine.dispose()


def run_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_sync(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set sqlalchemy.url, or call tokyo_ia.store.db.upgrade(url)")
    asyncio.run(_run_with_own_engine(url))


if context.is_offline_mode():
    run_offline()
else:
    run_online()
