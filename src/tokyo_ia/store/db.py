"""Engines, sessions and migrations: one async code path for SQLite and PostgreSQL.

SQLite (aiosqlite) is the embedded default; PostgreSQL (asyncpg) is for several replicas.
Nothing else in the code base looks at which one is in use.

Migrations ship inside the package (``store/migrations``) and are driven by an Alembic config
built here, so no ``alembic.ini`` is needed anywhere. :func:`upgrade` runs them over an async
connection of our own engine; plain ``alembic`` commands work too through
:func:`alembic_config` (see migrations/env.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from ..errors import ConfigError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
#: Our own version table, so Tokyo-IA can share a database with another Alembic project.
VERSION_TABLE = "tokyo_ia_alembic_version"
_DRIVERS = {"sqlite": "aiosqlite", "postgresql": "asyncpg"}


def redact(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable database url>"


def _check_url(url: str) -> str:
    """Reject URLs for a sync driver early, with the fix, instead of a deep greenlet error."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(
            f"store.url: '{redact(url)}' is not a database URL; use sqlite+aiosqlite:///./tokyo-ia.db "
            "or postgresql+asyncpg://USER:PASSWORD@HOST:5432/DB"
        ) from None
    driver = _DRIVERS.get(parsed.get_backend_name())
    if driver is None or parsed.get_driver_name() != driver:
        raise ConfigError(
            f"store.url: '{redact(url)}' is not supported; use sqlite+aiosqlite:///PATH "
            "or postgresql+asyncpg://USER:PASSWORD@HOST:5432/DB"
        )
    return url


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL lets several worker processes read while one writes; busy_timeout makes writers wait."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine for ``store.url``. Dispose of it (``await engine.dispose()``) on shutdown."""
    engine = create_async_engine(_check_url(url), pool_pre_ping=True, **kwargs)
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions whose objects stay readable after commit (we hand plain records out anyway)."""
    return async_sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str | None = None) -> AlembicConfig:
    """The Alembic configuration of the packaged migrations, built without an ini file."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_table", VERSION_TABLE)
    if url is not None:
        # ConfigParser interpolates '%': URL-encoded passwords must be escaped.
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _run(connection: Connection, cfg: AlembicConfig, action: str, revision: str) -> None:
    cfg.attributes["connection"] = connection
    if action == "upgrade":
        command.upgrade(cfg, revision)
    else:
        command.downgrade(cfg, revision)


async def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database to ``revision`` (default: the newest). Safe to run repeatedly."""
    await _migrate(url, "upgrade", revision)


async def downgrade(url: str, revision: str) -> None:
    """Migrate the database back to ``revision`` (``base`` empties it of our tables)."""
    await _migrate(url, "downgrade", revision)


async def _migrate(url: str, action: str, revision: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_run, alembic_config(url), action, revision)
    finally:
        await engine.dispose()


def head_revision() -> str | None:
    """The newest revision the installed package knows."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(
        connection, opts={"version_table": VERSION_TABLE}
    ).get_current_revision()


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at (``None``: never migrated)."""
    async with engine.connect() as conn:
        return await conn.run_sync(_current)


async def check_schema(engine: AsyncEngine) -> None:
    """Fail with the command to run when the database is not at this version's schema."""
    current, head = await current_revision(engine), head_revision()
    if current != head:
        state = "is empty" if current is None else f"is at revision {current}"
        raise ConfigError(
            f"the database {engine.url.render_as_string(hide_password=True)} {state}, "
            f"this version needs {head}; run: tokyo-ia db upgrade (with the same --config, if any)"
        )
