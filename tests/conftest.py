"""Shared fixtures: every test runs against each backend, sync and async, SQLite and PostgreSQL."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
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


@dataclass(frozen=True)
class Server:
    """A database server to test on, named by an environment variable.

    The suite never touches the database that variable names: it creates a
    database of its own on that server for the run, and drops it at the end.
    """

    variable: str  # TEST_POSTGRES_URL or TEST_MYSQL_URL
    name: str
    admin_driver: str  # a sync driver, for CREATE and DROP DATABASE and for reading back
    quote: str  # how the server quotes an identifier
    drop: str  # DROP DATABASE, with what makes it end the run's own leftover connections

    @property
    def configured(self) -> str | None:
        return os.environ.get(self.variable)

    @contextmanager
    def admin(self, database: str | None = None) -> Iterator[sa.Connection]:
        """An AUTOCOMMIT connection to the configured database (or *database*)."""
        assert self.configured is not None
        url = sa.make_url(self.configured).set(drivername=self.admin_driver)
        if database is not None:
            url = url.set(database=database)
        engine = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as connection:
                yield connection
        finally:
            engine.dispose()

    def tables(self) -> list[tuple[Any, ...]]:
        """Every table of the configured database, in every schema."""
        with self.admin() as connection:
            schema = "table_schema = database()" if self.name == "MariaDB" else "true"
            query = f"SELECT table_schema, table_name FROM information_schema.tables WHERE {schema} ORDER BY 1, 2"
            return [tuple(row) for row in connection.exec_driver_sql(query)]


POSTGRESQL = Server("TEST_POSTGRES_URL", "PostgreSQL", "postgresql+psycopg", '"', "DROP DATABASE {} WITH (FORCE)")
MARIADB = Server("TEST_MYSQL_URL", "MariaDB", "mysql+pymysql", "`", "DROP DATABASE {}")
SERVERS = [POSTGRESQL, MARIADB]
# The run's own database on each configured server, once pytest_configure has created it.
RUN_URLS: dict[str, str] = {}
POSTGRES_URL = POSTGRESQL.configured  # replaced by the run's own database in pytest_configure
MYSQL_URL = MARIADB.configured
# How pytest-xdist workers, started after the controller created the run's database, learn its name.
_RUN_DATABASE = "STARLETTE_ALCHEMY_TEST_DATABASE"
_created = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    global POSTGRES_URL, MYSQL_URL
    configured = [server for server in SERVERS if server.configured]
    if not configured:
        return
    name = os.environ.get(_RUN_DATABASE)
    if name is None:
        name = f"starlette_alchemy_test_{os.getpid()}_{secrets.token_hex(3)}"
        for server in configured:
            with server.admin() as connection:
                connection.exec_driver_sql(f"CREATE DATABASE {server.quote}{name}{server.quote}")
        os.environ[_RUN_DATABASE] = name
        config.stash[_created] = name
    for server in configured:
        url = sa.make_url(server.configured).set(database=name)  # type: ignore[arg-type]
        RUN_URLS[server.name] = url.render_as_string(hide_password=False)
    POSTGRES_URL = RUN_URLS.get(POSTGRESQL.name)
    MYSQL_URL = RUN_URLS.get(MARIADB.name)


def pytest_unconfigure(config: pytest.Config) -> None:
    name = config.stash.get(_created, None)
    if name is None:
        return
    for server in SERVERS:
        if server.configured:
            with server.admin() as connection:
                connection.exec_driver_sql(server.drop.format(f"{server.quote}{name}{server.quote}"))
    del os.environ[_RUN_DATABASE]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for server, example in (
        (POSTGRESQL, "postgresql://user@host:5432/database"),
        (MARIADB, "mysql://user@host:3306/database"),
    ):
        if not server.configured:
            terminalreporter.write_line(
                f"{server.name} backends were skipped: set {server.variable}={example} to run them too "
                "(the suite works in a database of its own, created and dropped on that server)."
            )


@pytest.fixture(scope="session", autouse=True)
def the_configured_databases_are_left_as_they_were() -> Iterator[None]:
    """Every table of each configured database is there after the run, and no other."""
    configured = [server for server in SERVERS if server.configured]
    before = [server.tables() for server in configured]
    yield
    after = [server.tables() for server in configured]
    assert after == before, "the test run changed the tables of a database TEST_POSTGRES_URL or TEST_MYSQL_URL names"


@dataclass(frozen=True)
class Backend:
    """One way of reaching a database: a registry kind, a dialect and a driver."""

    id: str
    kind: str  # "sync" or "async"
    dialect: str  # "sqlite", "postgresql" or "mysql"
    driver: str

    def url(self, tmp_path: Path, database: str | None = None) -> str:
        """The run's database on the backend's server (or *database* there); a SQLite file in *tmp_path*."""
        if self.dialect == "sqlite":
            return f"sqlite+{self.driver}:///{tmp_path / 'test.db'}"
        url = sa.make_url(POSTGRES_URL if self.dialect == "postgresql" else MYSQL_URL)  # type: ignore[arg-type]
        if database is not None:
            url = url.set(database=database)
        if self.driver == "asyncpg":
            # asyncpg's default sslmode, prefer, leaks a never-retrieved ConnectionError("unexpected
            # connection_lost() call") when a connect or a cancel request is cancelled mid-handshake
            # (MagicStack/asyncpg#1211, #1310); anyio's test runner raises it in whichever test is running.
            url = url.update_query_dict({"ssl": "disable"})
        return url.set(drivername=f"{self.dialect}+{self.driver}").render_as_string(False)

    def inspection_url(self, tmp_path: Path, database: str | None = None) -> str:
        """A synchronous URL to the same database, for reading back with a separate connection."""
        driver = {"sqlite": "pysqlite", "postgresql": "psycopg", "mysql": "pymysql"}[self.dialect]
        url = sa.make_url(self.url(tmp_path, database)).difference_update_query(["ssl"])
        return url.set(drivername=f"{self.dialect}+{driver}").render_as_string(False)

    @property
    def server(self) -> Server | None:
        return {"postgresql": POSTGRESQL, "mysql": MARIADB}.get(self.dialect)

    @property
    def defers_constraints(self) -> bool:
        """True if a foreign key can wait for COMMIT, so a flush passes and the COMMIT fails (not MySQL's)."""
        return self.dialect != "mysql"


SQLITE_BACKENDS = [
    Backend("sync-sqlite", "sync", "sqlite", "pysqlite"),
    Backend("async-sqlite", "async", "sqlite", "aiosqlite"),
]
POSTGRES_BACKENDS = [
    Backend("sync-psycopg", "sync", "postgresql", "psycopg"),
    Backend("async-asyncpg", "async", "postgresql", "asyncpg"),
    Backend("async-psycopg", "async", "postgresql", "psycopg"),
]
MYSQL_BACKENDS = [
    Backend("sync-pymysql", "sync", "mysql", "pymysql"),
    Backend("async-aiomysql", "async", "mysql", "aiomysql"),
]
BACKENDS = SQLITE_BACKENDS + (POSTGRES_BACKENDS if POSTGRES_URL else []) + (MYSQL_BACKENDS if MYSQL_URL else [])
# Where a deferred foreign key lets a flush pass and the COMMIT fail.
COMMIT_FAILURE_BACKENDS = [backend for backend in BACKENDS if backend.defers_constraints]
SYNC_BACKENDS = [backend for backend in BACKENDS if backend.kind == "sync"]
ASYNC_BACKENDS = [backend for backend in BACKENDS if backend.kind == "async"]
# The backends this run tests on each server, for tests of what only that server does.
TESTED_POSTGRESQL = [backend for backend in BACKENDS if backend.dialect == "postgresql"]
TESTED_MYSQL = [backend for backend in BACKENDS if backend.dialect == "mysql"]


@pytest.fixture
def anyio_backend() -> str:
    # SQLAlchemy's asyncio extension runs on asyncio only.
    return "asyncio"


@pytest.fixture(params=["asgi", "uvicorn"])
def transport(request: pytest.FixtureRequest) -> str:
    """How a test's HTTP client reaches the app: in process, or through uvicorn on 127.0.0.1."""
    name: str = request.param
    return name


def ensure_tables(backend: Backend) -> None:
    """Create the test tables in the run's database on the backend's server, once per process.

    Parallel workers share that database: the server's own lock keeps two from creating at once.
    """
    if backend.dialect in _tables_created:
        return
    engine = create_engine(backend.inspection_url(Path()))
    lock, unlock = _LOCKS[backend.dialect]
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(lock)
            Base.metadata.create_all(conn)
            if unlock:
                conn.exec_driver_sql(unlock)
    finally:
        engine.dispose()
    _tables_created.add(backend.dialect)


_tables_created: set[str] = set()
_LOCKS = {
    "postgresql": ("SELECT pg_advisory_xact_lock(7321)", ""),
    "mysql": ("SELECT GET_LOCK('starlette_alchemy_tables', 60)", "SELECT RELEASE_LOCK('starlette_alchemy_tables')"),
}


@pytest.fixture(params=BACKENDS, ids=lambda b: b.id)
def backend(request: pytest.FixtureRequest) -> Backend:
    backend: Backend = request.param
    return backend


@pytest.fixture
def inspection_engine(backend: Backend, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Engine]:
    """A separate synchronous engine on the test database, with fresh empty tables."""
    engine = create_engine(backend.inspection_url(tmp_path))
    if backend.dialect != "sqlite":
        ensure_tables(backend)
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
    backend: Backend, tmp_path: Path, *, savepoints: bool = False, database: str | None = None, **kw: Any
) -> AsyncIterator[Engine | AsyncEngine]:
    """An engine of the backend's kind (*kw* for ``create_engine``); on exit every connection must be checked in."""
    if backend.kind == "sync":
        sync_engine = create_engine(backend.url(tmp_path, database), **kw)
        configure_sqlite(sync_engine, savepoints=savepoints)
        yield sync_engine
        assert checked_out(sync_engine) == 0
        sync_engine.dispose()
    else:
        async_engine = create_async_engine(backend.url(tmp_path, database), **kw)
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
