"""Read replicas: which database serves each read and write, the read-your-writes cookie, and dead replicas.

The replica is a real second database (a second SQLite file, or a database
created on the PostgreSQL or MariaDB server), with the same tables and a marker row of
its own: every read says which database served it. Writes go to the primary
only, so "replication lag" is simply that the replica never sees them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Message
from starlette.websockets import WebSocket

from starlette_alchemy import (
    AsyncScopedSession,
    Changes,
    DBSessionMiddleware,
    ScopedSession,
    SessionSealedError,
    transaction,
)
from starlette_alchemy.routing import COOKIE
from starlette_alchemy.testing import arolled_back, rolled_back
from tests.conftest import (
    MYSQL_BACKENDS,
    MYSQL_URL,
    POSTGRES_BACKENDS,
    POSTGRES_URL,
    SQLITE_BACKENDS,
    Backend,
    checked_out,
    engine_for,
)
from tests.models import Base, Item
from tests.support import (
    AnyDB,
    OuterTimeout,
    delay_commit,
    http_client,
    idle_in_transaction,
    run,
    scope,
    slow_commits,
)

pytestmark = pytest.mark.anyio

ROUTING_BACKENDS = SQLITE_BACKENDS + (POSTGRES_BACKENDS if POSTGRES_URL else []) + (MYSQL_BACKENDS if MYSQL_URL else [])
MARKERS = ("primary", "replica")


@pytest.fixture(params=ROUTING_BACKENDS, ids=lambda b: b.id)
def backend(request: pytest.FixtureRequest) -> Backend:
    backend: Backend = request.param
    return backend


@pytest.fixture
def replica_database(backend: Backend, tmp_path: Path, inspection_engine: Engine) -> Iterator[str | None]:
    """A second database with the primary's tables: its name on the server (None: a SQLite file of its own).

    The primary (the test's database) holds a row named 'primary', the replica one named 'replica'.
    """
    with inspection_engine.begin() as connection:
        connection.execute(sa.insert(Item).values(name="primary"))
    server = backend.server
    if server is None:
        name = None
        (tmp_path / "replica").mkdir()
    else:
        name = f"starlette_alchemy_replica_{secrets.token_hex(4)}"
        with server.admin() as connection:
            connection.exec_driver_sql(f"CREATE DATABASE {name}")
    engine = create_engine(_inspection_url(backend, tmp_path, name))
    try:
        with engine.begin() as connection:
            Base.metadata.create_all(connection)
            connection.execute(sa.insert(Item).values(name="replica"))
        yield name
    finally:
        engine.dispose()
        if server is not None:
            with server.admin() as connection:
                connection.exec_driver_sql(server.drop.format(name))


def _inspection_url(backend: Backend, tmp_path: Path, replica: str | None) -> str:
    return (
        backend.inspection_url(tmp_path / "replica") if replica is None else backend.inspection_url(tmp_path, replica)
    )


@pytest.fixture
def replica_engine(backend: Backend, tmp_path: Path, replica_database: str | None) -> Iterator[Engine]:
    """A separate synchronous engine on the replica, for reading back."""
    engine = create_engine(_inspection_url(backend, tmp_path, replica_database))
    yield engine
    engine.dispose()


@pytest.fixture
async def replica(
    backend: Backend, tmp_path: Path, replica_database: str | None
) -> AsyncIterator[Engine | AsyncEngine]:
    """The engine under test on the replica; afterwards its pool must have every connection checked in."""
    directory = tmp_path / "replica" if replica_database is None else tmp_path
    async with engine_for(backend, directory, database=replica_database) as engine:
        yield engine


def routed(engine: Engine | AsyncEngine, replicas: list[Any], **options: Any) -> AnyDB:
    if isinstance(engine, AsyncEngine):
        return AsyncScopedSession(engine, replicas=replicas, **options)
    return ScopedSession(engine, replicas=replicas, **options)


async def marker(db: AnyDB) -> str:
    """Which database served this read: the marker row it sees."""
    name: str = await run(db.scalar, sa.select(Item.name).where(Item.name.in_(MARKERS)))
    return name


async def write(db: AnyDB, name: str) -> None:
    await run(db.add, Item(name=name))
    await run(db.flush)


def names(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        return set(connection.scalars(sa.select(Item.name))) - set(MARKERS)


def app_for(db: AnyDB, **middleware: Any) -> Starlette:
    async def where(request: Request) -> Response:
        return JSONResponse(await marker(db))

    async def writes(request: Request) -> Response:
        before = await marker(db)
        await write(db, request.query_params["name"])
        return JSONResponse([before, await marker(db)])

    async def adds(request: Request) -> Response:
        await run(db.add, Item(name=request.query_params["name"]))  # flushed by the COMMIT itself
        return JSONResponse("added")

    async def locks(request: Request) -> Response:
        statement = sa.select(Item.name).where(Item.name.in_(MARKERS)).with_for_update()
        return JSONResponse([await run(db.scalar, statement), await marker(db)])

    async def nested(request: Request) -> Response:
        async with scope(db):
            inside = await marker(db)
            if "name" in request.query_params:
                await write(db, request.query_params["name"])
        return JSONResponse(inside)

    @transaction(primary=True)
    async def primary(request: Request) -> Response:
        return await where(request)

    @transaction(read_only=True)
    async def search(request: Request) -> Response:
        return await where(request)

    @transaction(isolation_level="SERIALIZABLE")
    async def serializable(request: Request) -> Response:
        return await where(request)

    routes = [
        Route("/where", where, methods=["GET", "HEAD", "POST", "PUT", "DELETE"]),
        Route("/write", writes, methods=["GET", "POST"]),
        Route("/add", adds, methods=["POST"]),
        Route("/lock", locks),
        Route("/nested", nested, methods=["GET", "POST"]),
        Route("/primary", primary),
        Route("/search", search, methods=["POST"]),
        Route("/serializable", serializable),
    ]
    return Starlette(routes=routes, middleware=[Middleware(DBSessionMiddleware, db=db, **middleware)])


# -- which database serves what ------------------------------------------------------------------


async def test_reads_go_to_the_replica_and_writes_to_the_primary(
    engine: Engine | AsyncEngine,
    replica: Engine | AsyncEngine,
    inspection_engine: Engine,
    replica_engine: Engine,
    transport: str,
) -> None:
    db = routed(engine, [replica])
    async with http_client(app_for(db), transport) as client:
        assert (await client.get("/where")).json() == "replica"
        assert (await client.head("/where")).status_code == 200
        # A method that may write reads from the primary, before and after it writes.
        for method in ("POST", "PUT", "DELETE"):
            assert (await client.request(method, "/where")).json() == "primary"
        client.cookies.clear()  # none was set: nothing was written
        response = await client.post("/write", params={"name": "posted"})
        assert response.json() == ["primary", "primary"]
    assert names(inspection_engine) == {"posted"}
    assert names(replica_engine) == set()
    assert checked_out(engine) == checked_out(replica) == 0


async def test_a_get_that_writes_is_pinned_to_the_primary_from_its_first_write(
    engine: Engine | AsyncEngine, replica: Engine | AsyncEngine, inspection_engine: Engine, replica_engine: Engine
) -> None:
    db = routed(engine, [replica])
    async with http_client(app_for(db), "asgi") as client:
        response = await client.get("/write", params={"name": "got"})
        # It read the replica, then wrote to the primary, and from then on read what it wrote.
        assert response.json() == ["replica", "primary"]
        assert COOKIE in response.cookies
    assert names(inspection_engine) == {"got"}
    assert names(replica_engine) == set()


async def test_select_for_update_goes_to_the_primary_and_pins(
    engine: Engine | AsyncEngine, replica: Engine | AsyncEngine, backend: Backend
) -> None:
    db = routed(engine, [replica])
    async with http_client(app_for(db), "asgi") as client:
        response = await client.get("/lock")
        assert response.json() == ["primary", "primary"]
        assert COOKIE not in response.cookies  # it locked, but wrote nothing


async def test_raw_sql_that_may_write_and_the_raw_connection_pin_the_scope(
    engine: Engine | AsyncEngine, replica: Engine | AsyncEngine, inspection_engine: Engine
) -> None:
    db = routed(engine, [replica])
    async with scope(db):
        assert await marker(db) == "replica"
        await run(db.execute, sa.text("INSERT INTO item (name) VALUES ('raw')"))
        assert await marker(db) == "primary"
    async with scope(db):
        assert await marker(db) == "replica"
        connection = await run(db.connection)
        assert connection.engine.url == engine.url  # the connection that may write is the primary's
        assert await marker(db) == "primary"
    async with scope(db):
        # An object written in an earlier transaction of the scope is refreshed from the primary.
        await write(db, "refreshed")
        await run(db.commit)
        item = await run(db.scalar, sa.select(Item).where(Item.name == "refreshed"))
        await run(db.refresh, item)
        assert item.name == "refreshed"
    assert names(inspection_engine) == {"raw", "refreshed"}


async def test_route_options_say_where_reads_go(
    engine: Engine | AsyncEngine, replica: Engine | AsyncEngine, backend: Backend
) -> None:
    db = routed(engine, [replica])
    async with http_client(app_for(db), "asgi") as client:
        assert (await client.get("/primary")).json() == "primary"
        # A read-only route may read a replica whatever its method (a search endpoint that takes a body).
        assert (await client.post("/search")).json() == "replica"
        if backend.dialect == "postgresql":
            # A standby cannot run a SERIALIZABLE transaction: such a route reads the primary.
            assert (await client.get("/serializable")).json() == "primary"


async def test_replica_methods_is_configurable(engine: Engine | AsyncEngine, replica: Engine | AsyncEngine) -> None:
    db = routed(engine, [replica])
    async with http_client(app_for(db, replica_methods=["get", "POST"]), "asgi") as client:
        assert (await client.post("/where")).json() == "replica"
        assert (await client.head("/where")).status_code == 200
        assert (await client.put("/where")).json() == "primary"


async def test_db_scope_reads_a_replica_unless_told_or_inside_a_request_that_reads_the_primary(
    engine: Engine | AsyncEngine, replica: Engine | AsyncEngine, inspection_engine: Engine, replica_engine: Engine
) -> None:
    db = routed(engine, [replica])
    async with scope(db):
        assert await marker(db) == "replica"
        await write(db, "scripted")
        assert await marker(db) == "primary"
    async with scope(db, primary=True):
        assert await marker(db) == "primary"
    async with scope(db, read_only=True):
        assert await marker(db) == "replica"
    async with http_client(app_for(db), "asgi") as client:
        # A db.scope() inside a request follows the request's reads: a GET's, a POST's, a cookie's.
        assert (await client.get("/nested")).json() == "replica"
        assert (await client.post("/nested")).json() == "primary"
        response = await client.get("/nested", params={"name": "nested"})
        assert response.json() == "replica"
        assert COOKIE in response.cookies  # a db.scope() inside the request committed a write
        assert (await client.get("/nested")).json() == "primary"
    assert names(inspection_engine) == {"scripted", "nested"}
    assert names(replica_engine) == set()


async def test_replicas_take_turns_one_per_scope(
    backend: Backend, tmp_path: Path, engine: Engine | AsyncEngine, replica: Engine | AsyncEngine
) -> None:
    # Two engines on the replica database stand in for two replicas: each scope uses one for all its reads.
    async with engine_for(backend, tmp_path / "replica", database=_database(replica)) as second:
        db = routed(engine, [replica, second])
        served = []
        for _ in range(4):
            async with scope(db):
                await marker(db)
                await marker(db)
                served.append(_read_engine(db))
        first, other = _sync(replica), _sync(second)
        assert served == [first, other, first, other]


def _database(engine: Engine | AsyncEngine) -> str | None:
    url = engine.url
    return None if url.get_backend_name() == "sqlite" else url.database


def _sync(engine: Engine | AsyncEngine) -> Engine:
    return engine.sync_engine if isinstance(engine, AsyncEngine) else engine


def _read_engine(db: AnyDB) -> Engine:
    route = db.registry.current().route
    assert route is not None and route.reads_from is not None
    return route.reads_from


# -- read-your-writes across requests -----------------------------------------------------------------


async def test_after_a_write_the_cookie_sends_the_clients_reads_to_the_primary_until_it_expires(
    engine: Engine | AsyncEngine, replica: Engine | AsyncEngine, transport: str
) -> None:
    db = routed(engine, [replica])
    async with http_client(app_for(db, read_your_writes=7.5), transport) as client:
        assert (await client.get("/where")).json() == "replica"
        sent = time.time()
        response = await client.post("/write", params={"name": "posted"})
        cookie = response.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=")
        assert "; Max-Age=8; Path=/; HttpOnly; SameSite=Lax" in cookie
        assert "Secure" not in cookie  # plain http
        # Its value is when the window ends, in milliseconds.
        until = int(client.cookies[COOKIE])
        assert (sent + 7.5) * 1000 <= until <= (time.time() + 7.5) * 1000 + 1
        # The same client now reads what it wrote; another client (no cookie) reads the replica.
        assert (await client.get("/where")).json() == "primary"
        client.cookies.clear()
        assert (await client.get("/where")).json() == "replica"
        assert (await client.get("/where", headers={"cookie": f"{COOKIE}={until}"})).json() == "primary"
        # Once the window has ended (a browser drops the cookie then; one that still sends it):
        expired = int(time.time() * 1000) - 1
        assert (await client.get("/where", headers={"cookie": f"{COOKIE}={expired}"})).json() == "replica"


async def test_a_write_flushed_by_the_commit_itself_sets_the_cookie(
    engine: Engine | AsyncEngine, replica: Engine | AsyncEngine, inspection_engine: Engine
) -> None:
    db = routed(engine, [replica])
    async with http_client(app_for(db), "asgi") as client:
        assert COOKIE in (await client.post("/add", params={"name": "added"})).cookies
        assert (await client.get("/where")).json() == "primary"
    assert names(inspection_engine) == {"added"}


async def test_no_cookie_without_a_committed_write(engine: Engine | AsyncEngine, replica: Engine | AsyncEngine) -> None:
    db = routed(engine, [replica])

    async def rolled_back_write(request: Request) -> Response:
        await write(db, "never")
        return JSONResponse("no", status_code=400)

    app = app_for(db)
    app.router.routes.append(Route("/refused", rolled_back_write, methods=["POST"]))
    async with http_client(app, "asgi") as client:
        for path in ("/where", "/refused"):
            response = await client.post(path)
            assert "set-cookie" not in response.headers, path
    async with http_client(app_for(db, read_your_writes=None), "asgi") as client:
        response = await client.post("/write", params={"name": "posted"})
        assert response.status_code == 200 and "set-cookie" not in response.headers


async def test_the_cookie_is_secure_over_https(engine: Engine | AsyncEngine, replica: Engine | AsyncEngine) -> None:
    db = routed(engine, [replica])
    transport = httpx.ASGITransport(app_for(db))
    async with httpx.AsyncClient(transport=transport, base_url="https://test") as client:
        response = await client.post("/write", params={"name": "posted"})
    assert response.headers["set-cookie"].endswith("; HttpOnly; SameSite=Lax; Secure")


@pytest.mark.parametrize(
    "value",
    ["garbage", "", "-5", "1e30", "9" * 40, "12 34", "\x00", "Ω", "99999999999999", '"1"', "0x10"],
)
async def test_a_forged_or_garbled_cookie_only_sends_reads_to_the_primary(
    engine: Engine | AsyncEngine, replica: Engine | AsyncEngine, value: str
) -> None:
    db = routed(engine, [replica])
    app = app_for(db)
    async with http_client(app, "asgi") as client:
        headers = {"cookie": f"other=1; {COOKIE}={value}; more=2".encode("utf-8", "surrogateescape")}
        response = await client.get("/where", headers=headers)  # type: ignore[arg-type]
        assert response.status_code == 200
        assert response.json() == "primary"
        # An expired one (a forged past date, say) is ignored.
        response = await client.get("/where", headers={"cookie": f"{COOKIE}=1"})
        assert response.json() == "replica"


# -- dead replicas ----------------------------------------------------------------------------------


def _dead_engine(backend: Backend, tmp_path: Path) -> Engine | AsyncEngine:
    """An engine of the backend's kind on a database that cannot be reached."""
    if backend.dialect == "sqlite":
        url = sa.make_url(backend.url(tmp_path)).set(database=str(tmp_path / "missing" / "dir" / "replica.db"))
    else:
        url = sa.make_url(backend.url(tmp_path)).set(port=_closed_port())
    return create_engine(url) if backend.kind == "sync" else create_async_engine(url)


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again when this returns: nothing listens there


async def test_a_replica_that_cannot_be_reached_is_skipped_for_a_cool_down_with_one_warning(
    backend: Backend,
    tmp_path: Path,
    engine: Engine | AsyncEngine,
    replica: Engine | AsyncEngine,
    caplog: pytest.LogCaptureFixture,
    transport: str,
) -> None:
    dead = _dead_engine(backend, tmp_path)
    db = routed(engine, [dead, replica], replica_cooldown=30)
    router = db.registry.router
    assert router is not None
    now = [1000.0]
    router.clock = lambda: now[0]  # the cool-down's clock, moved by the test
    try:
        async with http_client(app_for(db), transport) as client:
            served = [(await client.get("/where")).json() for _ in range(6)]
            # The dead one's turns go to the next healthy replica; none fails.
            assert served == ["replica"] * 6
            warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert len(warnings) == 1, warnings
            assert "The replica" in warnings[0] and "could not be reached" in warnings[0]
            assert "for 30.0 s" in warnings[0]
            now[0] += 29.9
            assert (await client.get("/where")).json() == "replica"
            assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1  # still cooling down
            now[0] += 0.2
            assert [(await client.get("/where")).json() for _ in range(2)] == ["replica"] * 2
            assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 2  # tried again: a new cool-down
    finally:
        await _dispose(dead)
    assert checked_out(engine) == checked_out(replica) == 0


async def test_with_every_replica_down_reads_go_to_the_primary(
    backend: Backend,
    tmp_path: Path,
    engine: Engine | AsyncEngine,
    replica_database: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead = _dead_engine(backend, tmp_path)
    db = routed(engine, [dead])
    try:
        async with http_client(app_for(db), "asgi") as client:
            assert [(await client.get("/where")).json() for _ in range(3)] == ["primary"] * 3
        assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    finally:
        await _dispose(dead)


async def test_a_replica_whose_pool_is_exhausted_is_skipped_too(
    backend: Backend,
    tmp_path: Path,
    engine: Engine | AsyncEngine,
    replica_database: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    directory = tmp_path / "replica" if replica_database is None else tmp_path
    pool: dict[str, Any] = {"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.2}
    async with engine_for(backend, directory, database=replica_database, **pool) as replica:
        db = routed(engine, [replica])

        async def held(request: Request) -> Response:
            served = await marker(db)
            await asyncio.sleep(0.5)  # its transaction, so its connection, stays open meanwhile
            return JSONResponse(served)

        app = app_for(db)
        app.router.routes.append(Route("/held", held))
        async with http_client(app, "asgi") as client:
            responses = await asyncio.gather(*(client.get("/held") for _ in range(4)))
        served = sorted(response.json() for response in responses)
        assert served == ["primary", "primary", "primary", "replica"]
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "had no free connection in its pool" in warnings[0], warnings
        assert "Size its engine's pool to the concurrency" in warnings[0]
    assert checked_out(engine) == 0


async def test_a_routed_request_cancelled_mid_commit_completes_it_on_both_databases(
    engine: Engine | AsyncEngine,
    replica: Engine | AsyncEngine,
    inspection_engine: Engine,
    replica_engine: Engine,
) -> None:
    # The scope holds a transaction on the replica (its read) and one on the primary (its write) when
    # a timeout cancels it during COMMIT: the COMMIT completes, and both connections go back to their pools.
    db = routed(engine, [replica])

    async def cancelled(request: Request) -> Response:
        before = await marker(db)
        await write(db, "committed anyway")
        await delay_commit(db, 1.0)  # the primary's COMMIT answers late
        return JSONResponse(before)

    app = app_for(db)
    app.router.routes.append(Route("/cancelled", cancelled))
    with slow_commits(engine):
        async with http_client(OuterTimeout(app, seconds=0.3, kind="asyncio"), "uvicorn") as client:
            assert (await client.get("/cancelled")).status_code == 504
            await asyncio.sleep(1.2)  # the COMMIT's own time
            # The 504 came from the timeout, not from the app's response: no cookie came with it.
            assert COOKIE not in client.cookies
            assert (await client.get("/where")).json() == "replica"
    assert names(inspection_engine) == {"committed anyway"}
    assert names(replica_engine) == set()
    assert idle_in_transaction(inspection_engine) == idle_in_transaction(replica_engine) == 0
    assert checked_out(engine) == checked_out(replica) == 0


async def test_a_replica_that_connects_then_fails_is_no_unreachable_replica(
    engine: Engine | AsyncEngine, replica: Engine | AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    db = routed(engine, [replica])

    @db.on_begin
    def refuse(connection: sa.Connection, info: dict[str, Any]) -> None:
        raise RuntimeError("the hook failed")

    async with http_client(app_for(db), "asgi") as client:
        assert (await client.get("/where")).status_code == 500
    assert "could not be reached" not in caplog.text
    assert checked_out(engine) == checked_out(replica) == 0


async def _dispose(engine: Engine | AsyncEngine) -> None:
    if isinstance(engine, AsyncEngine):
        await engine.dispose()
    else:
        engine.dispose()


@pytest.mark.parametrize("backend", [b for b in ROUTING_BACKENDS if b.dialect == "postgresql"], ids=lambda b: b.id)
async def test_a_replica_that_fails_after_reads_fails_the_request_like_any_database_error(
    engine: Engine | AsyncEngine, replica: Engine | AsyncEngine, replica_engine: Engine
) -> None:
    db = routed(engine, [replica])

    async def killed(request: Request) -> Response:
        await marker(db)
        pid = await run(db.scalar, sa.text("SELECT pg_backend_pid()"))
        with replica_engine.connect() as connection:
            connection.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        time.sleep(0.1)
        return JSONResponse(await marker(db))

    app = app_for(db)
    app.router.routes.append(Route("/killed", killed))
    async with http_client(app, "asgi") as client:
        assert (await client.get("/killed")).status_code == 500
        assert (await client.get("/where")).json() == "replica"  # the next request gets a live connection
    assert checked_out(engine) == checked_out(replica) == 0


# -- everything else behaves as without replicas ---------------------------------------------------


async def test_hooks_collectors_and_stats_see_both_databases(
    engine: Engine | AsyncEngine, replica: Engine | AsyncEngine
) -> None:
    db = routed(engine, [replica])
    seen: list[Changes] = []
    db.after_commit(seen.append)

    async def both(request: Request) -> Response:
        before = await marker(db)
        await write(db, "tracked")
        pending = [item.name for item in db.collector.persistent]
        return JSONResponse([before, pending, db.stats.queries])

    app = app_for(db)
    app.router.routes.append(Route("/both", both))
    async with http_client(app, "asgi") as client:
        before, persistent, queries = (await client.get("/both")).json()
    assert before == "replica"
    assert persistent == ["tracked"]
    assert queries == 2  # the read on the replica, the INSERT on the primary
    assert [[change.obj.name for change in changes.inserted] for changes in seen] == [["tracked"]]


async def test_the_sealed_session_still_reads_its_replica_and_refuses_writes(
    engine: Engine | AsyncEngine, replica: Engine | AsyncEngine
) -> None:
    db = routed(engine, [replica])
    after: list[Any] = []

    async def late() -> None:
        after.append(await marker(db))  # after the response started: reads still work, on the same replica
        try:
            await write(db, "late")
        except SessionSealedError as exc:
            after.append(type(exc).__name__)

    async def sealed(request: Request) -> Response:
        return JSONResponse(await marker(db), background=BackgroundTask(late))

    app = app_for(db)
    app.router.routes.append(Route("/sealed", sealed))
    async with http_client(app, "asgi") as client:
        assert (await client.get("/sealed")).json() == "replica"
    assert after == ["replica", "SessionSealedError"]


async def test_the_testing_kit_sends_everything_to_its_one_connection(
    engine: Engine | AsyncEngine, replica: Engine | AsyncEngine, inspection_engine: Engine
) -> None:
    db = routed(engine, [replica])
    if isinstance(db, AsyncScopedSession):
        async with arolled_back(db):
            async with http_client(app_for(db), "asgi") as client:
                assert (await client.get("/where")).json() == "primary"
                assert (await client.get("/write", params={"name": "kit"})).json() == ["primary", "primary"]
    else:
        with rolled_back(db):
            async with http_client(app_for(db), "asgi") as client:
                assert (await client.get("/where")).json() == "primary"
                assert (await client.get("/write", params={"name": "kit"})).json() == ["primary", "primary"]
    assert names(inspection_engine) == set()


async def test_websocket_scopes_read_the_primary(engine: Engine | AsyncEngine, replica: Engine | AsyncEngine) -> None:
    db = routed(engine, [replica])

    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json(await marker(db))
        await websocket.close()

    app = app_for(db)
    app.router.routes.append(WebSocketRoute("/ws", socket))
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app({"type": "websocket", "path": "/ws", "headers": [], "query_string": b""}, receive, send)
    assert [message.get("text") for message in sent if message["type"] == "websocket.send"] == ['"primary"']


async def test_a_hundred_concurrent_mixed_requests_each_read_where_the_rules_say(
    engine: Engine | AsyncEngine,
    replica: Engine | AsyncEngine,
    inspection_engine: Engine,
    replica_engine: Engine,
    transport: str,
) -> None:
    db = routed(engine, [replica])

    async def one(client: httpx.AsyncClient, number: int) -> tuple[int, Any, Any]:
        kind = number % 5
        if kind == 0:
            return kind, (await client.get("/where")).json(), "replica"
        if kind == 1:
            return kind, (await client.post("/where")).json(), "primary"
        if kind == 2:
            response = await client.post("/write", params={"name": f"w{number}"})
            return kind, response.json(), ["primary", "primary"]
        if kind == 3:
            response = await client.get("/where", headers={"cookie": f"{COOKIE}={int(time.time() * 1000) + 60_000}"})
            return kind, response.json(), "primary"
        return kind, (await client.post("/search")).json(), "replica"

    async with http_client(app_for(db), transport) as client:
        results = await asyncio.gather(*(one(client, number) for number in range(100)))
    wrong = [(kind, got, expected) for kind, got, expected in results if got != expected]
    assert wrong == []
    assert names(inspection_engine) == {f"w{number}" for number in range(100) if number % 5 == 2}
    assert names(replica_engine) == set()
    assert checked_out(engine) == checked_out(replica) == 0


# -- what a registry and the middleware accept ----------------------------------------------------------


def test_wrong_replica_options_are_refused(tmp_path: Path) -> None:
    primary = create_engine(f"sqlite:///{tmp_path / 'p.db'}")
    other = create_engine(f"sqlite:///{tmp_path / 'r.db'}")
    with pytest.raises(TypeError, match=r"'replicas' must be a list of engines; got Engine\(.*\)\. Wrap one"):
        ScopedSession(primary, replicas=other)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"'replicas\[0\]' must be an Engine like the primary's; got 'sqlite://'"):
        ScopedSession(primary, replicas=["sqlite://"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"'replicas\[0\]' is the primary's own engine"):
        ScopedSession(primary, replicas=[primary])
    with pytest.raises(ValueError, match=r"'replicas' names the same engine twice"):
        ScopedSession(primary, replicas=[other, other])
    with pytest.raises(ValueError, match=r"'replica_cooldown' must be a number of seconds, 0 or more; got -1"):
        ScopedSession(primary, replicas=[other], replica_cooldown=-1)
    async_other = create_async_engine("sqlite+aiosqlite://")
    with pytest.raises(TypeError, match=r"'replicas\[0\]' must be an Engine like the primary's; got <sqlalchemy"):
        ScopedSession(primary, replicas=[async_other])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"'replicas\[0\]' must be an AsyncEngine like the primary's"):
        AsyncScopedSession(async_other, replicas=[other])  # type: ignore[list-item]
    postgresql = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with pytest.raises(ValueError, match=r"is a postgresql database and the primary a sqlite one"):
        ScopedSession(primary, replicas=[postgresql])
    with pytest.raises(TypeError, match=r"A ScopedSession with 'replicas' needs a primary engine: .* has bind=None"):
        ScopedSession(sessionmaker(), replicas=[other])
    # No replica configured (a development set-up): nothing routes.
    assert ScopedSession(primary, replicas=[]).registry.router is None


async def test_a_registry_built_from_a_session_factory_routes_too(
    engine: Engine | AsyncEngine, replica: Engine | AsyncEngine
) -> None:
    if isinstance(engine, AsyncEngine):
        db: AnyDB = AsyncScopedSession(async_sessionmaker(engine), replicas=[replica])  # type: ignore[list-item]
    else:
        db = ScopedSession(sessionmaker(engine), replicas=[replica])  # type: ignore[list-item]
    async with scope(db):
        assert await marker(db) == "replica"
        assert db().bind is _sync(engine) or db().bind is engine  # the primary's, as without replicas


def test_wrong_middleware_options_are_refused(tmp_path: Path) -> None:
    db = ScopedSession(create_engine(f"sqlite:///{tmp_path / 'p.db'}"))
    app = Starlette()
    for window in (0, -1, "5", True):
        with pytest.raises(ValueError, match=r"'read_your_writes' must be a number of seconds, more than 0"):
            DBSessionMiddleware(app, db=db, read_your_writes=window)  # type: ignore[arg-type]
    for methods in ("GET", [1], None):
        with pytest.raises(TypeError, match=r"'replica_methods' must be a list of HTTP methods"):
            DBSessionMiddleware(app, db=db, replica_methods=methods)  # type: ignore[arg-type]
