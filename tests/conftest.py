"""Shared fixtures: every test runs against each backend, sync and async, SQLite and PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import Pool

from starlette_alchemy import AsyncScopedSession, ScopedSession
from tests.models import Base
from tests.support import AnyDB

# pytester runs the pytest plugin's own tests in subprocesses.
pytest_plugins = ["pytester"]

POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL")


@dataclass(frozen=True)
class Backend:
    """One way of reaching a database: a registry kind, a dialect and a driver."""

    id: str
    kind: str  # "sync" or "async"
    dialect: str  # "sqlite" or "postgresql"
    driver: str

    def url(self, tmp_path: Path) -> str:
        if self.dialect == "sqlite":
            return f"sqlite+{self.driver}:///{tmp_path / 'test.db'}"
        assert POSTGRES_URL is not None
        return sa.make_url(POSTGRES_URL).set(drivername=f"postgresql+{self.driver}").render_as_string(False)

    def inspection_url(self, tmp_path: Path) -> str:
        """A synchronous URL to the same database, for reading back with a separate connection."""
        driver = "pysqlite" if self.dialect == "sqlite" else "psycopg"
        return sa.make_url(self.url(tmp_path)).set(drivername=f"{self.dialect}+{driver}").render_as_string(False)


SQLITE_BACKENDS = [
    Backend("sync-sqlite", "sync", "sqlite", "pysqlite"),
    Backend("async-sqlite", "async", "sqlite", "aiosqlite"),
]
POSTGRES_BACKENDS = [
    Backend("sync-psycopg", "sync", "postgresql", "psycopg"),
    Backend("async-asyncpg", "async", "postgresql", "asyncpg"),
    Backend("async-psycopg", "async", "postgresql", "psycopg"),
]
BACKENDS = SQLITE_BACKENDS + (POSTGRES_BACKENDS if POSTGRES_URL else [])
SYNC_BACKENDS = [backend for backend in BACKENDS if backend.kind == "sync"]
ASYNC_BACKENDS = [backend for backend in BACKENDS if backend.kind == "async"]


@pytest.fixture
def anyio_backend() -> str:
    # SQLAlchemy's asyncio extension runs on asyncio only.
    return "asyncio"


@pytest.fixture(params=["asgi", "uvicorn"])
def transport(request: pytest.FixtureRequest) -> str:
    """How a test's HTTP client reaches the app: in process, or through uvicorn on 127.0.0.1."""
    name: str = request.param
    return name


@pytest.fixture(scope="session")
def postgres_schema() -> Iterator[None]:
    """Create the test tables once per run on PostgreSQL; fail loudly if it is unreachable."""
    engine = postgres_engine()
    try:
        with engine.begin() as conn:
            Base.metadata.drop_all(conn)
            Base.metadata.create_all(conn)
        yield
        with engine.begin() as conn:
            Base.metadata.drop_all(conn)
    finally:
        engine.dispose()


def postgres_engine() -> Engine:
    """A synchronous engine on the PostgreSQL test database."""
    assert POSTGRES_URL is not None
    return create_engine(sa.make_url(POSTGRES_URL).set(drivername="postgresql+psycopg"))


@pytest.fixture(params=BACKENDS, ids=lambda b: b.id)
def backend(request: pytest.FixtureRequest) -> Backend:
    backend: Backend = request.param
    return backend


@pytest.fixture
def inspection_engine(backend: Backend, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Engine]:
    """A separate synchronous engine on the test database, with fresh empty tables."""
    engine = create_engine(backend.inspection_url(tmp_path))
    if backend.dialect == "postgresql":
        request.getfixturevalue("postgres_schema")
        with engine.begin() as conn:
            for table in reversed(Base.metadata.sorted_tables):
                conn.execute(table.delete())
    else:
        Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
async def engine(
    backend: Backend, tmp_path: Path, inspection_engine: Engine, request: pytest.FixtureRequest
) -> AsyncIterator[Engine | AsyncEngine]:
    """The engine under test; afterwards its pool must have every connection checked in.

    Tests marked ``sqlite_savepoints`` get SQLite with working SAVEPOINTs.
    """
    savepoints = request.node.get_closest_marker("sqlite_savepoints") is not None
    async with engine_for(backend, tmp_path, savepoints=savepoints) as engine:
        yield engine


@asynccontextmanager
async def engine_for(
    backend: Backend, tmp_path: Path, *, savepoints: bool = False
) -> AsyncIterator[Engine | AsyncEngine]:
    """An engine of the backend's kind; on exit its pool must have every connection checked in."""
    if backend.kind == "sync":
        sync_engine = create_engine(backend.url(tmp_path))
        configure_sqlite(sync_engine, savepoints=savepoints)
        yield sync_engine
        assert checked_out(sync_engine) == 0
        sync_engine.dispose()
    else:
        async_engine = create_async_engine(backend.url(tmp_path))
        configure_sqlite(async_engine.sync_engine, savepoints=savepoints)
        yield async_engine
        assert checked_out(async_engine) == 0
        await async_engine.dispose()


@pytest.fixture
def db(engine: Engine | AsyncEngine) -> AnyDB:
    """A registry of the backend's kind, built from its engine."""
    if isinstance(engine, AsyncEngine):
        return AsyncScopedSession(engine)
    return ScopedSession(engine)


def pool_of(engine: Engine | AsyncEngine) -> Pool:
    return engine.sync_engine.pool if isinstance(engine, AsyncEngine) else engine.pool


def checked_out(engine: Engine | AsyncEngine) -> int:
    return pool_of(engine).checkedout()  # type: ignore[attr-defined, no-any-return]


def configure_sqlite(engine: Engine, *, savepoints: bool = False) -> None:
    """Make SQLite check foreign keys, so deferred ones fail at COMMIT as on PostgreSQL.

    With *savepoints*, also replace the driver's own transaction handling by an
    explicit BEGIN (SQLAlchemy's documented recipe), without which SAVEPOINTs do
    not work; reads then hold SQLite's shared lock until their transaction ends.
    """
    if engine.dialect.name != "sqlite":
        return

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        if savepoints:
            dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    if savepoints:

        @sa.event.listens_for(engine, "begin")
        def _on_begin(connection: sa.Connection) -> None:
            connection.exec_driver_sql("BEGIN")
