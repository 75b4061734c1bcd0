"""``db.stats``, ``Changes.stats``, N+1 detection, ``max_queries``, ``slow_query`` and ``Server-Timing``."""

from __future__ import annotations

import logging
import re
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import selectinload
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from starlette_alchemy import (
    AsyncScopedSession,
    Changes,
    DBSessionMiddleware,
    NPlusOneError,
    ScopedSession,
    ScopeStats,
    StarletteAlchemyError,
    TrackingDisabledError,
    transaction,
)
from tests.conftest import checked_out
from tests.models import Item, Note
from tests.support import AnyDB, http_client, run, scope

pytestmark = pytest.mark.anyio


def registry(engine: Engine | AsyncEngine, **options: Any) -> AnyDB:
    if isinstance(engine, AsyncEngine):
        return AsyncScopedSession(engine, **options)
    return ScopedSession(engine, **options)


def app_with(db: AnyDB, *routes: Route, **middleware: Any) -> Starlette:
    return Starlette(routes=list(routes), middleware=[Middleware(DBSessionMiddleware, db=db, **middleware)])


async def select_n(db: AnyDB, n: int) -> None:
    """Run *n* statements, one round trip each."""
    for number in range(n):
        await run(db.execute, sa.select(sa.literal(number)))


async def load(db: AnyDB, obj: Any, attribute: str) -> Any:
    """Read *obj*'s (maybe lazy) attribute: in a worker thread for a sync registry, in the session's greenlet else."""
    if isinstance(db, AsyncScopedSession):
        return await db().run_sync(lambda _: getattr(obj, attribute))
    return await run(getattr, obj, attribute)


async def all_of(db: AnyDB, statement: Any) -> list[Any]:
    """Every object *statement* selects, its eager loads included, off the event loop's thread for a sync registry."""
    if isinstance(db, AsyncScopedSession):
        return list((await db.scalars(statement)).all())
    found: list[Any] = await run(lambda: list(db.scalars(statement)))
    return found


def stats_json(stats: ScopeStats) -> dict[str, Any]:
    return {"queries": stats.queries, "lazy_loads": stats.lazy_loads, "rows": dict(stats.rows)}


async def seed(db: AnyDB, items: int, notes_each: int) -> None:
    async with scope(db):
        for number in range(1, items + 1):
            await run(db.add, Item(id=number, name=f"item {number}"))
            for note in range(notes_each):
                await run(db.add, Note(id=number * 100 + note, item_id=number))


# -- db.stats ---------------------------------------------------------------------------------------


async def test_each_of_100_concurrent_requests_counts_only_its_own_statements(
    db: AnyDB, engine: Engine | AsyncEngine, transport: str
) -> None:
    async def endpoint(request: Request) -> Response:
        assert isinstance(db, AsyncScopedSession)
        for number in range(request.path_params["n"]):
            await db.execute(sa.select(sa.literal(number)))
            await anyio.sleep(0)  # let the other requests' statements interleave
        return JSONResponse({"queries": db.stats.queries})

    def sync_endpoint(request: Request) -> Response:
        # A plain 'def', which holds its worker thread: a sync registry's session waiting for the
        # pool in one thread while its holder needs another would deadlock at 100 requests.
        for number in range(request.path_params["n"]):
            db.execute(sa.select(sa.literal(number)))
        return JSONResponse({"queries": db.stats.queries})

    route = Route("/{n:int}", endpoint if isinstance(db, AsyncScopedSession) else sync_endpoint)
    app = app_with(db, route, server_timing=True)
    expected = {index: index % 7 + 1 for index in range(100)}
    answers: dict[int, tuple[int, str]] = {}
    async with http_client(app, transport) as client:

        async def ask(index: int) -> None:
            response = await client.get(f"/{expected[index]}")
            assert response.status_code == 200
            answers[index] = (response.json()["queries"], response.headers["server-timing"])

        async with anyio.create_task_group() as tg:
            for index in expected:
                tg.start_soon(ask, index)
    for index, n in expected.items():
        queries, timing = answers[index]
        assert queries == n
        assert re.fullmatch(rf'db;dur=\d+\.\d\d;desc="{n} queries"', timing)
    assert checked_out(engine) == 0


async def test_stats_count_statements_rows_and_lazy_loads(db: AnyDB) -> None:
    await seed(db, items=3, notes_each=2)
    async with scope(db):
        assert db.stats == ScopeStats()  # nothing ran yet
        items = list(await run(db.scalars, sa.select(Item).order_by(Item.id)))
        first = db.stats
        assert (first.queries, first.lazy_loads, dict(first.rows)) == (1, 0, {"insert": 0, "update": 0, "delete": 0})
        assert first.seconds > 0
        await run(db.add, Item(id=10, name="new"))
        await run(db.add, Item(id=11, name="newer"))
        items[0].name = "renamed"
        await run(db.flush)
        await run(db.execute, sa.update(Item).where(Item.id.in_([2, 3])).values(name=Item.name + "!"))
        await run(db.execute, sa.delete(Note).where(Note.item_id == 2))
        await run(db.execute, sa.delete(Note).where(Note.item_id == 3))
        await run(db.delete, items[2])
        await run(db.flush)
        stats = db.stats
        assert dict(stats.rows) == {"insert": 2, "update": 1 + 2, "delete": 2 + 2 + 1}
        assert stats.seconds >= first.seconds
        assert stats.lazy_loads == 0
    async with scope(db):
        other = await run(db.get, Item, 10)
        assert db.stats.queries == 1
        await load(db, other, "notes")
        assert (db.stats.queries, db.stats.lazy_loads) == (2, 1)


async def test_a_db_scope_inside_a_request_counts_for_itself(db: AnyDB) -> None:
    seen: dict[str, int] = {}

    async def endpoint(request: Request) -> Response:
        await select_n(db, 2)
        async with scope(db):
            await select_n(db, 3)
            seen["inner"] = db.stats.queries
        await select_n(db, 1)
        seen["outer"] = db.stats.queries
        return PlainTextResponse("")

    async with http_client(app_with(db, Route("/", endpoint)), "asgi") as client:
        assert (await client.get("/")).status_code == 200
    assert seen == {"inner": 3, "outer": 3}


async def test_after_commit_hooks_get_the_stats_at_commit_including_the_commit(db: AnyDB) -> None:
    received: list[Changes] = []
    at_handler_end: list[ScopeStats] = []
    db.after_commit(received.append)

    async def endpoint(request: Request) -> Response:
        await run(db.add, Item(name="counted"))
        await select_n(db, 1)  # flushes the insert first (autoflush does not: a plain SELECT)
        at_handler_end.append(db.stats)
        return PlainTextResponse("")

    async with http_client(app_with(db, Route("/", endpoint, methods=["POST"])), "asgi") as client:
        assert (await client.post("/")).status_code == 200
    (changes,) = received
    assert changes.stats.queries == 2  # the SELECT and the INSERT the COMMIT flushed
    assert changes.stats.rows["insert"] == 1
    assert changes.stats.seconds > at_handler_end[0].seconds  # the INSERT and the COMMIT


async def test_failed_statements_count(db: AnyDB) -> None:
    async with scope(db, commit=False):
        with pytest.raises(sa.exc.DBAPIError):
            await run(db.execute, sa.text("SELECT * FROM no_such_table"))
        assert db.stats.queries == 1


@pytest.mark.sqlite_savepoints
async def test_savepoints_are_not_queries(db: AnyDB) -> None:
    async with scope(db):
        await select_n(db, 1)
        if isinstance(db, AsyncScopedSession):
            async with db.begin_nested():
                await db.execute(sa.select(sa.literal(1)))
        else:
            await run(_nested_select, db)
        assert db.stats.queries == 2


def _nested_select(db: ScopedSession[Any]) -> None:
    with db.begin_nested():
        db.execute(sa.select(sa.literal(1)))


async def test_stats_off(engine: Engine | AsyncEngine) -> None:
    db = registry(engine, stats=False)
    async with scope(db):
        await select_n(db, 1)
        with pytest.raises(TrackingDisabledError, match="stats=True"):
            db.stats  # noqa: B018


async def test_registry_options_are_checked(engine: Engine | AsyncEngine) -> None:
    for bad in (1, 0, True, "warn", 2.5):
        with pytest.raises(ValueError, match="'n_plus_one' must be"):
            registry(engine, n_plus_one=bad)
    for bad_seconds in (0, -1, "1", True):
        with pytest.raises(ValueError, match="'slow_query' must be"):
            registry(engine, slow_query=bad_seconds)
    with pytest.raises(ValueError, match="'slow_query' needs statistics"):
        registry(engine, stats=False, slow_query=1)
    with pytest.raises(TypeError, match="Unknown option 'stat'"):
        registry(engine, stat=True)
    with pytest.raises(TypeError, match="'stats' must be True or False"):
        registry(engine, stats="yes")
    registry(engine, stats=False, n_plus_one=None)  # no detection asked for: fine


def test_npluseoneerror_is_a_package_error() -> None:
    assert issubclass(NPlusOneError, StarletteAlchemyError)


# -- N+1 ---------------------------------------------------------------------------------------------


def notes_of_every_item(db: AnyDB, *, eager: bool = False, limit: int | None = None) -> Any:
    async def endpoint(request: Request) -> Response:
        statement = sa.select(Item).order_by(Item.id).limit(limit)
        if eager:
            statement = statement.options(selectinload(Item.notes))
        items = await all_of(db, statement)
        counts = [len(await load(db, item, "notes")) for item in items]
        return JSONResponse({"counts": counts, **stats_json(db.stats)})

    return endpoint


async def test_n_plus_one_warns_once_per_route_and_relationship(db: AnyDB, caplog: pytest.LogCaptureFixture) -> None:
    await seed(db, items=12, notes_each=1)
    app = app_with(db, Route("/items", notes_of_every_item(db)))
    with caplog.at_level(logging.WARNING, "starlette_alchemy"):
        async with http_client(app, "asgi") as client:
            for _ in range(3):
                answer = (await client.get("/items")).json()
                assert (answer["queries"], answer["lazy_loads"]) == (13, 12)
    (warning,) = [record.getMessage() for record in caplog.records]
    assert warning == (
        "'GET /items' lazy-loaded Item.notes 10 times, one query each (N+1); load them with the query that "
        "loads the parents: '.options(selectinload(Item.notes))'."
    )


async def test_n_plus_one_raise(engine: Engine | AsyncEngine) -> None:
    db = registry(engine, n_plus_one="raise")
    await seed(db, items=12, notes_each=1)
    async with scope(db, commit=False):
        items = list(await run(db.scalars, sa.select(Item).order_by(Item.id)))
        for item in items[:9]:
            await load(db, item, "notes")
        with pytest.raises(NPlusOneError, match=r"lazy-loaded Item.notes 10 times.*selectinload\(Item.notes\)"):
            await load(db, items[9], "notes")
        assert db.stats.queries == 10  # the refused load never ran its query


@pytest.mark.parametrize("setting", [None, 20])
async def test_n_plus_one_off_or_higher(
    engine: Engine | AsyncEngine, setting: int | None, caplog: pytest.LogCaptureFixture
) -> None:
    db = registry(engine, n_plus_one=setting)
    await seed(db, items=12, notes_each=1)
    app = app_with(db, Route("/items", notes_of_every_item(db)))
    with caplog.at_level(logging.WARNING, "starlette_alchemy"):
        async with http_client(app, "asgi") as client:
            assert (await client.get("/items")).json()["lazy_loads"] == 12
    assert caplog.records == []


async def test_no_n_plus_one_for_eager_loads_or_one_lazy_load_per_request(
    db: AnyDB, caplog: pytest.LogCaptureFixture
) -> None:
    await seed(db, items=12, notes_each=2)
    app = app_with(
        db,
        Route("/eager", notes_of_every_item(db, eager=True)),
        Route("/one", notes_of_every_item(db, limit=1)),
    )
    with caplog.at_level(logging.WARNING, "starlette_alchemy"):
        async with http_client(app, "asgi") as client:
            eager = (await client.get("/eager")).json()
            assert (eager["counts"], eager["queries"], eager["lazy_loads"]) == ([2] * 12, 2, 0)
            for _ in range(15):
                one = (await client.get("/one")).json()
                assert (one["counts"], one["queries"], one["lazy_loads"]) == ([2], 2, 1)
    assert caplog.records == []


async def test_a_many_to_one_found_in_the_session_is_no_lazy_load(db: AnyDB) -> None:
    await seed(db, items=1, notes_each=12)
    async with scope(db):
        item = await run(db.get, Item, 1)  # held: the session holds its objects weakly
        notes = await all_of(db, sa.select(Note))
        for note in notes:
            assert await load(db, note, "item") is item  # already in the identity map: no query
        assert (db.stats.queries, db.stats.lazy_loads) == (2, 0)


# -- max_queries and slow_query ------------------------------------------------------------------------


async def test_max_queries_warns_once_per_scope_with_the_statement_and_no_parameters(
    db: AnyDB, caplog: pytest.LogCaptureFixture
) -> None:
    @transaction(max_queries=2)
    async def endpoint(request: Request) -> Response:
        for _ in range(5):
            await run(db.execute, sa.select(Item).where(Item.name == "secret-value"))
        return PlainTextResponse("")

    with caplog.at_level(logging.WARNING, "starlette_alchemy"):
        async with http_client(app_with(db, Route("/budget", endpoint)), "asgi") as client:
            for _ in range(2):
                assert (await client.get("/budget")).status_code == 200
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2  # once per request
    assert messages[0].startswith("'GET /budget' ran more than its max_queries=2 statements; the one over: SELECT ")
    assert "secret-value" not in messages[0]


async def test_max_queries_of_a_db_scope(db: AnyDB, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "starlette_alchemy"):
        async with scope(db, max_queries=3):
            await select_n(db, 3)
        assert caplog.records == []
        async with scope(db, max_queries=3):
            await select_n(db, 4)
    (record,) = caplog.records
    assert "'db.scope()' in" in record.getMessage() and "max_queries=3" in record.getMessage()


async def test_slow_query_logs_the_statement_without_its_parameters(
    engine: Engine | AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    db = registry(engine, slow_query=1e-9)  # every statement is slower than that
    with caplog.at_level(logging.WARNING, "starlette_alchemy"):
        async with scope(db):
            await run(db.execute, sa.select(Item).where(Item.name == "secret-value"))
    (record,) = caplog.records
    message = record.getMessage()
    assert re.match(r"A statement of 'db.scope\(\)' in '\w+' took \d+\.\d{3} s \(slow_query=1e-09\): SELECT", message)
    assert "secret-value" not in message and "item.name =" in message


async def test_no_slow_query_warning_under_the_threshold(
    engine: Engine | AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    db = registry(engine, slow_query=30)
    with caplog.at_level(logging.WARNING, "starlette_alchemy"):
        async with scope(db):
            await select_n(db, 3)
    assert caplog.records == []


# -- Server-Timing ----------------------------------------------------------------------------------------


async def test_server_timing_merges_with_the_apps_own_header_and_only_when_the_database_was_used(
    db: AnyDB, transport: str
) -> None:
    async def used(request: Request) -> Response:
        await run(db.add, Item(name="timed"))
        return PlainTextResponse("", headers={"Server-Timing": 'app;dur=1.5;desc="render"'})

    async def session_only(request: Request) -> Response:
        db()  # a session, but no statement
        return PlainTextResponse("")

    async def unused(request: Request) -> Response:
        return PlainTextResponse("")

    routes = [Route("/used", used, methods=["POST"]), Route("/session", session_only), Route("/unused", unused)]
    async with http_client(app_with(db, *routes, server_timing=True), transport) as client:
        response = await client.post("/used")
        (header,) = response.headers.get_list("server-timing")
        assert re.fullmatch(r'app;dur=1\.5;desc="render", db;dur=\d+\.\d\d;desc="1 queries"', header)
        assert "server-timing" not in (await client.get("/session")).headers
        assert "server-timing" not in (await client.get("/unused")).headers
    async with http_client(app_with(db, *routes), transport) as client:
        assert "server-timing" not in (await client.post("/used")).headers


async def test_server_timing_sums_several_registries(engine: Engine | AsyncEngine) -> None:
    first, second = registry(engine), registry(engine)

    async def endpoint(request: Request) -> Response:
        await select_n(first, 2)
        await select_n(second, 3)
        return PlainTextResponse("")

    app = Starlette(
        routes=[Route("/", endpoint)],
        middleware=[Middleware(DBSessionMiddleware, db=[first, second], server_timing=True)],
    )
    async with http_client(app, "asgi") as client:
        assert (await client.get("/")).headers["server-timing"].endswith('desc="5 queries"')


async def test_server_timing_must_be_a_bool(db: AnyDB) -> None:
    with pytest.raises(TypeError, match="'server_timing' must be True or False"):
        DBSessionMiddleware(Starlette(), db=db, server_timing="yes")  # type: ignore[arg-type]
