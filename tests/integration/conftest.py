"""Real databases for the store and key tests: SQLite (a temporary file) and PostgreSQL.

PostgreSQL is ``postgresql+asyncpg://postgres@127.0.0.1:5432/test`` unless
``TOKYO_IA_TEST_PG_URL`` says otherwise. Each test session creates its own uniquely named
database next to it and drops it at the end, so parallel runs and leftovers never collide.
When no server answers, PostgreSQL tests are skipped with a loud reason locally, and FAIL when
``CI=true`` (DESIGN.md, "Tests"): CI must never go green without having tested PostgreSQL.

Engines are created per test, inside the test's event loop (asyncpg connections belong to
one loop); the session-wide set-up runs in its own short-lived loop and thread.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from redis.asyncio import Redis
from sqlalchemy import delete, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from tests.integration.conftest_redis import connect_or_skip
from tests.support import missing_service
from tokyo_ia.security.keys import KeyService
from tokyo_ia.store import create_engine, session_factory, upgrade
from tokyo_ia.store.models import Base

PG_URL = os.environ.get("TOKYO_IA_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", "postgresql"]
T = TypeVar("T")


def _unavailable(reason: str) -> None:
    message = (
        f"PostgreSQL NOT TESTED: {reason}. Start a server at {make_url(PG_URL).render_as_string()} "
        "or set TOKYO_IA_TEST_PG_URL"
    )
    missing_service(message)


def run_in_thread(coro: Coroutine[Any, Any, T]) -> T:
    """Run set-up code in its own loop and thread, leaving the tests' event loop untouched."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _admin(statement: str) -> None:
    engine = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text(statement))
    finally:
        await engine.dispose()


class Databases:
    """Throw-away databases for the session: created on first use, dropped at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.pg_created: list[str] = []
        self.pg_error: str | None = None
        self.migrated: dict[str, str] = {}

    def new(self, backend: str) -> str:
        """A brand-new, empty database."""
        if backend == "sqlite":
            return f"sqlite+aiosqlite:///{self.tmp / uuid.uuid4().hex[:12]}.db"
        if self.pg_error is not None:
            _unavailable(self.pg_error)
        name = f"tokyo_ia_test_{uuid.uuid4().hex[:12]}"
        try:
            run_in_thread(_admin(f'CREATE DATABASE "{name}"'))
        except Exception as exc:  # noqa: BLE001 - any failure means "no usable server"
            self.pg_error = f"cannot create a database ({type(exc).__name__}: {exc})"
            _unavailable(self.pg_error)
        self.pg_created.append(name)
        return make_url(PG_URL).set(database=name).render_as_string(hide_password=False)

    def shared(self, backend: str) -> str:
        """The session's migrated database of this backend."""
        if backend not in self.migrated:
            url = self.new(backend)
            run_in_thread(upgrade(url))
            self.migrated[backend] = url
        return self.migrated[backend]

    def drop_all(self) -> None:
        for name in self.pg_created:
            run_in_thread(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def databases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Databases]:
    dbs = Databases(tmp_path_factory.mktemp("db"))
    yield dbs
    dbs.drop_all()


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, databases: Databases) -> str:
    """A migrated database of each backend, shared by the session (emptied by ``engine``)."""
    return databases.shared(request.param)


@pytest.fixture(params=BACKENDS)
def empty_db_url(request: pytest.FixtureRequest, databases: Databases) -> str:
    """A brand-new database with nothing in it, one per backend."""
    return databases.new(request.param)


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(db_url)
    async with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            await conn.execute(delete(table))
    yield engine
    await engine.dispose()


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return session_factory(engine)


@pytest.fixture
def keys(sessions: async_sessionmaker[AsyncSession]) -> KeyService:
    return KeyService(sessions)


@pytest.fixture
async def redis_client() -> AsyncIterator[Redis]:
    """A client of the test Redis (skipped locally, failed under CI=true, when none answers)."""
    client = await connect_or_skip()
    yield client
    await client.aclose()
