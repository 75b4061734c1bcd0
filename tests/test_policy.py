"""``@transaction(...)`` and ``db.scope(...)`` options, ``db.info``, ``on_begin`` and ``Changes.info``."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI
from sqlalchemy import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route

from starlette_alchemy import (
    AsyncScopedSession,
    Changes,
    DBSessionMiddleware,
    NoActiveScopeError,
    ReadOnlyTransactionError,
    ScopedSession,
    transaction,
)
from starlette_alchemy.policy import IsolationLevel, Policy, route_policy
from starlette_alchemy.sessions import _ScopeSession
from tests.conftest import BACKENDS, TESTED_POSTGRESQL, Backend, checked_out, engine_for
from tests.models import Item
from tests.support import (
    AnyDB,
    OuterTimeout,
    committed_names,
    delay_commit,
    http_client,
    resolve,
    run,
    scope,
    slow_commits,
)

pytestmark = pytest.mark.anyio

NOT_POSTGRESQL = [backend for backend in BACKENDS if backend.dialect != "postgresql"]


def app_with(db: AnyDB, *routes: Route | Mount) -> Starlette:
    return Starlette(routes=list(routes), middleware=[Middleware(DBSessionMiddleware, db=db)])


# -- at decoration time ---------------------------------------------------------------------------


def test_transaction_returns_the_endpoint_itself_marked() -> None:
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("")

    assert transaction(read_only=True, statement_timeout=2)(endpoint) is endpoint
    assert route_policy({"endpoint": endpoint}) == Policy(read_only=True, statement_timeout=2)


def test_options_for_later_features_are_stored() -> None:
    def endpoint() -> None: ...

    transaction(retry=False, primary=True, max_queries=5)(endpoint)
    assert route_policy({"endpoint": endpoint}) == Policy(retry=False, primary=True, max_queries=5)


@pytest.mark.parametrize(
    ("given", "level"),
    [("serializable", "SERIALIZABLE"), ("repeatable_read", "REPEATABLE READ"), ("Read  Committed", "READ COMMITTED")],
)
def test_isolation_levels_are_spelled_as_sqlalchemy_spells_them(given: Any, level: str) -> None:
    def endpoint() -> None: ...

    transaction(isolation_level=given)(endpoint)
    assert route_policy({"endpoint": endpoint}) == Policy(isolation_level=level)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"read_onyl": True}, TypeError, "transaction() has no option 'read_onyl'; it takes read_only, isolation_lev"),
        ({"read_only": 1}, TypeError, "'read_only' must be True or False; got 1 (int)."),
        ({"manual": "yes"}, TypeError, "'manual' must be True or False; got 'yes' (str)."),
        ({"retry": 3}, TypeError, "'retry' must be True or False; got 3 (int)."),
        ({"isolation_level": 8}, TypeError, "'isolation_level' must be one of 'SERIALIZABLE', 'REPEATABLE READ'"),
        ({"isolation_level": "serialisable"}, ValueError, "must be one of 'SERIALIZABLE', "),
        ({"isolation_level": "autocommit"}, ValueError, "the request would have no transaction to commit"),
        ({"statement_timeout": "5s"}, TypeError, "'statement_timeout' must be a number of seconds; got '5s' (str)."),
        ({"statement_timeout": True}, TypeError, "'statement_timeout' must be a number of seconds; got True (bool)."),
        ({"statement_timeout": 0}, ValueError, "'statement_timeout' must be more than 0 seconds; got 0."),
        ({"max_queries": 2.5}, TypeError, "'max_queries' must be a whole number of queries; got 2.5 (float)."),
        ({"max_queries": 0}, ValueError, "'max_queries' must be at least 1; got 0."),
        ({"commit_on": 200}, TypeError, "'commit_on' must be a function of the status code"),
        ({"manual": True, "commit_on": bool}, ValueError, "so 'commit_on' would do nothing. Drop one of them."),
    ],
)
def test_wrong_options_fail_at_decoration_time(options: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error) as caught:
        transaction(**options)
    assert message in str(caught.value)


def test_transaction_refuses_what_takes_no_attribute() -> None:
    with pytest.raises(TypeError, match=r"marks a function, and <built-in function print> takes no attribute"):
        transaction(read_only=True)(print)


async def test_db_scope_takes_only_the_options_outside_a_request(db: AnyDB) -> None:
    belongs = r"^'manual' belongs to requests \('@transaction\(manual=\.\.\.\)' on the endpoint\)"
    with pytest.raises(TypeError, match=belongs):
        async with scope(db, manual=True):
            pass
    accepted = "read_only, isolation_level, statement_timeout, primary, max_queries."
    with pytest.raises(TypeError, match=rf"^db.scope\(\) has no option 'readonly'; it takes {accepted}$"):
        async with scope(db, readonly=True):
            pass
    with pytest.raises(NoActiveScopeError):
        db()  # nothing was left open


def test_route_policy_picks_the_http_endpoint_method_as_starlette_does() -> None:
    class Items(HTTPEndpoint):
        @transaction(read_only=True)
        async def get(self, request: Request) -> Response:
            return PlainTextResponse("")

        async def post(self, request: Request) -> Response:
            return PlainTextResponse("")

    class WithHead(Items):
        async def head(self, request: Request) -> Response:
            return PlainTextResponse("")

    assert route_policy({"endpoint": Items, "method": "GET"}) == Policy(read_only=True)
    assert route_policy({"endpoint": Items, "method": "HEAD"}) == Policy(read_only=True)
    assert route_policy({"endpoint": Items, "method": "POST"}) is None
    assert route_policy({"endpoint": WithHead, "method": "HEAD"}) is None
    assert route_policy({"method": "GET"}) is None


# -- read_only -------------------------------------------------------------------------------------


def read_only_app(db: AnyDB) -> Starlette:
    """A read-only route that tries each kind of ORM write and answers with what stopped it."""

    @transaction(read_only=True)
    async def attempt(request: Request) -> Response:
        how = request.path_params["how"]
        try:
            if how == "add":
                db.add(Item(name="added"))
            elif how == "change":
                item = await run(db.scalar, sa.select(Item))
                item.name = "changed"
                await run(db.flush)
            elif how == "update":
                await run(db.execute, sa.update(Item).values(name="updated"))
            elif how == "delete":
                await run(db.delete, await run(db.scalar, sa.select(Item)))
        except ReadOnlyTransactionError as exc:
            return PlainTextResponse(str(exc), status_code=403)
        count = await run(db.scalar, sa.select(sa.func.count()).select_from(Item))
        return PlainTextResponse(f"{count} items")

    return app_with(db, Route("/attempt/{how}", attempt, methods=["POST"]))


@pytest.mark.parametrize("how", ["add", "change", "update", "delete"])
async def test_a_read_only_route_refuses_orm_writes_and_reads(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine, how: str
) -> None:
    with inspection_engine.begin() as conn:
        conn.execute(sa.insert(Item).values(name="kept"))
    async with http_client(read_only_app(db), "asgi") as client:
        refused = await client.post(f"/attempt/{how}")
        read = await client.post("/attempt/read")
    assert refused.status_code == 403
    assert refused.text.startswith("The transaction of 'POST /attempt/{how}' is read-only, so its session may not")
    assert "Drop 'read_only=True' from its '@transaction(...)'" in refused.text
    assert (read.status_code, read.text) == (200, "1 items")
    assert committed_names(inspection_engine) == {"kept"}
    assert checked_out(engine) == 0


async def test_an_ended_scope_with_a_policy_keeps_no_session_alive(db: AnyDB, engine: Engine | AsyncEngine) -> None:
    # Copies of a request's context outlive it (a task it started, an idle worker thread), and
    # with them the scope's holder: once the scope ended, the holder must keep no session alive.
    kept: list[contextvars.Context] = []

    @transaction(read_only=True, isolation_level="SERIALIZABLE")
    async def read(request: Request) -> Response:
        count = await run(db.scalar, sa.select(sa.func.count()).select_from(Item))
        kept.append(contextvars.copy_context())
        return PlainTextResponse(str(count))

    async with http_client(app_with(db, Route("/", read)), "asgi") as client:
        assert (await client.get("/")).text == "0"
    gc.collect()
    assert kept and [obj for obj in gc.get_objects() if isinstance(obj, _ScopeSession)] == []
    assert checked_out(engine) == 0


async def test_a_read_only_scope_refuses_orm_writes(db: AnyDB, inspection_engine: Engine) -> None:
    with pytest.raises(ReadOnlyTransactionError, match=r"^The transaction of 'db.scope\(\)' in 'scope' is read-only"):
        async with scope(db, read_only=True):
            db.add(Item(name="never"))
    async with scope(db, read_only=True):
        assert await run(db.scalar, sa.select(sa.func.count()).select_from(Item)) == 0
    assert committed_names(inspection_engine) == set()


# Only PostgreSQL begins a read-only transaction; elsewhere the ORM's guard is all there is.
@pytest.mark.parametrize("backend", TESTED_POSTGRESQL, ids=lambda b: b.id)
async def test_read_only_is_the_database_s_too_on_postgresql(db: AnyDB, inspection_engine: Engine) -> None:
    with pytest.raises(sa.exc.DBAPIError, match="cannot execute INSERT in a read-only transaction"):
        async with scope(db, read_only=True):
            await run(db.execute, sa.text("INSERT INTO item (name) VALUES ('raw')"))
    async with scope(db):
        # The connection went back to the pool as it came: the next transaction may write.
        await run(db.execute, sa.text("INSERT INTO item (name) VALUES ('raw')"))
    assert committed_names(inspection_engine) == {"raw"}


# -- isolation_level and statement_timeout end with the transaction ------------------------------------

# Per dialect: the level to ask for, how to read the connection's level, what it reads with it and without.
ISOLATION: dict[str, tuple[IsolationLevel, str, Any, Any]] = {
    "postgresql": ("SERIALIZABLE", "SELECT current_setting('transaction_isolation')", "serializable", "read committed"),
    "mysql": ("SERIALIZABLE", "SELECT @@tx_isolation", "SERIALIZABLE", "REPEATABLE-READ"),
    "sqlite": ("READ UNCOMMITTED", "PRAGMA read_uncommitted", 1, 0),
}
# What identifies the connection on the server side.
BACKEND_ID = {"postgresql": "SELECT pg_backend_pid()", "mysql": "SELECT connection_id()", "sqlite": "SELECT 0"}


@pytest.fixture
async def one_connection(backend: Backend, tmp_path: Path, inspection_engine: Engine) -> AsyncIterator[AnyDB]:
    """A registry whose pool holds one connection: every request gets the same one."""
    async with engine_for(backend, tmp_path, pool_size=1, max_overflow=0) as engine:
        yield AsyncScopedSession(engine) if isinstance(engine, AsyncEngine) else ScopedSession(engine)


async def test_isolation_level_and_timeout_do_not_outlive_the_transaction(
    backend: Backend, one_connection: AnyDB, caplog: pytest.LogCaptureFixture
) -> None:
    db = one_connection
    level, read_level, strict_level, default_level = ISOLATION[backend.dialect]

    async def settings(request: Request) -> Response:
        row = [await run(db.scalar, sa.text(query)) for query in (BACKEND_ID[backend.dialect], read_level)]
        if backend.dialect == "postgresql":
            for name in ("statement_timeout", "transaction_read_only"):
                row.append(await run(db.scalar, sa.text(f"SELECT current_setting('{name}')")))
        return JSONResponse(row)

    @transaction(isolation_level=level, statement_timeout=0.05, read_only=True)
    async def strict(request: Request) -> Response:
        return await settings(request)

    app = app_with(db, Route("/strict", strict), Route("/plain", settings))
    async with http_client(app, "asgi") as client:
        answers = [(await client.get(path)).json() for path in ("/strict", "/plain", "/strict", "/plain")]
    extra = {"postgresql": (["50ms", "on"], ["0", "off"])}.get(backend.dialect, ([], []))
    backend_id = answers[0][0]
    assert answers[0] == answers[2] == [backend_id, strict_level, *extra[0]]
    assert answers[1] == answers[3] == [backend_id, default_level, *extra[1]]


@pytest.mark.parametrize("backend", TESTED_POSTGRESQL, ids=lambda b: b.id)
async def test_read_only_alone_does_not_outlive_the_transaction(one_connection: AnyDB) -> None:
    # With psycopg, read_only alone is set on the DBAPI connection at BEGIN, with no execution option,
    # and undone at check-in: the same backend must begin read-write again, hooks included.
    db = one_connection
    begun: list[str] = []

    @db.on_begin
    def note(connection: Connection, info: dict[str, Any]) -> None:
        begun.append(connection.exec_driver_sql("SELECT current_setting('transaction_read_only')").scalar_one())

    async def settings(request: Request) -> Response:
        query = "SELECT pg_backend_pid(), current_setting('transaction_read_only')"
        return JSONResponse(list((await run(db.execute, sa.text(query))).one()))

    @transaction(read_only=True)
    async def read(request: Request) -> Response:
        return await settings(request)

    app = app_with(db, Route("/read", read), Route("/plain", settings))
    async with http_client(app, "asgi") as client:
        answers = [(await client.get(path)).json() for path in ("/read", "/plain", "/read", "/plain")]
    pid = answers[0][0]
    assert answers == [[pid, "on"], [pid, "off"], [pid, "on"], [pid, "off"]]
    assert begun == ["on", "off", "on", "off"]  # the hooks run inside the transaction as it began


@pytest.mark.parametrize("backend", TESTED_POSTGRESQL, ids=lambda b: b.id)
async def test_a_read_only_request_cancelled_mid_commit_leaves_its_connection_writable(
    backend: Backend, tmp_path: Path, inspection_engine: Engine
) -> None:
    # psycopg's read_only is undone at check-in: a COMMIT that a timeout interrupts must still get there.
    async with engine_for(backend, tmp_path, pool_size=1, max_overflow=0) as engine:
        db: AnyDB = AsyncScopedSession(engine) if isinstance(engine, AsyncEngine) else ScopedSession(engine)
        read_by: list[int] = []
        query = "SELECT pg_backend_pid(), current_setting('transaction_read_only')"

        @transaction(read_only=True)
        async def read(request: Request) -> Response:
            pid, setting = (await run(db.execute, sa.text(query))).one()
            assert setting == "on"
            read_by.append(pid)
            await delay_commit(db, 1.0)
            return PlainTextResponse("read")

        async def write(request: Request) -> Response:
            db.add(Item(name="written after"))
            return JSONResponse(list((await run(db.execute, sa.text(query))).one()), status_code=201)

        app = app_with(db, Route("/read", read), Route("/write", write, methods=["POST"]))
        with slow_commits(engine):
            async with http_client(OuterTimeout(app, seconds=0.2, kind="asyncio"), "asgi") as client:
                cancelled = await client.get("/read")
                written = await client.post("/write")
    assert cancelled.status_code == 504
    assert (written.status_code, written.json()) == (201, [read_by[0], "off"])  # the same backend, read-write
    assert committed_names(inspection_engine) == {"written after"}


@pytest.mark.parametrize("backend", NOT_POSTGRESQL, ids=lambda b: b.id)
async def test_statement_timeout_is_ignored_with_one_warning_where_it_cannot_be_local(
    backend: Backend, db: AnyDB, caplog: pytest.LogCaptureFixture
) -> None:

    @transaction(statement_timeout=1)
    async def count(request: Request) -> Response:
        return PlainTextResponse(str(await run(db.scalar, sa.select(sa.func.count()).select_from(Item))))

    # Warned once per route and process: a path of this test's own.
    app = app_with(db, Route(f"/{backend.id}/{{n}}", count))
    async with http_client(app, "asgi") as client:
        assert [(await client.get(f"/{backend.id}/{n}")).text for n in range(3)] == ["0", "0", "0"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"'statement_timeout' is ignored in 'GET /{backend.id}/{{n}}': {backend.dialect} has no timeout local to a "
        "transaction. Set one on the engine's connections instead, or drop the option."
    ]


@pytest.mark.parametrize("backend", TESTED_POSTGRESQL, ids=lambda b: b.id)
async def test_a_statement_over_the_timeout_fails_with_the_driver_s_error(
    db: AnyDB, engine: Engine | AsyncEngine
) -> None:

    @transaction(statement_timeout=0.05)
    async def slow(request: Request) -> Response:
        await run(db.execute, sa.text("SELECT pg_sleep(5)"))
        return PlainTextResponse("never")

    async def canceled(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, sa.exc.DBAPIError)
        return PlainTextResponse(f"timed out: {exc.orig.sqlstate}", status_code=503)  # type: ignore[union-attr]

    app = app_with(db, Route("/slow", slow))
    app.add_exception_handler(sa.exc.OperationalError, canceled)
    app.add_exception_handler(sa.exc.DBAPIError, canceled)
    async with http_client(app, "asgi") as client:
        response = await client.get("/slow")
    # 57014: query_canceled, whichever driver raised it.
    assert (response.status_code, response.text) == (503, "timed out: 57014")
    assert checked_out(engine) == 0


# -- commit_on and manual -----------------------------------------------------------------------------


async def test_commit_on_of_the_route_replaces_the_middleware_s(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine
) -> None:
    async def redirect(request: Request) -> Response:
        db.add(Item(name=request.path_params["name"]))
        return RedirectResponse("/", status_code=303)

    @transaction(commit_on=lambda status: status < 300)
    async def strict(request: Request) -> Response:
        return await redirect(request)

    @transaction(commit_on=lambda status: status < 500)
    async def lenient(request: Request) -> Response:
        db.add(Item(name=request.path_params["name"]))
        return PlainTextResponse("conflict, recorded", status_code=409)

    app = app_with(
        db,
        Route("/default/{name}", redirect, methods=["POST"]),
        Route("/strict/{name}", strict, methods=["POST"]),
        Route("/lenient/{name}", lenient, methods=["POST"]),
    )
    async with http_client(app, "asgi") as client:
        statuses = [(await client.post(path)).status_code for path in ("/default/a", "/strict/b", "/lenient/c")]
    assert statuses == [303, 303, 409]
    assert committed_names(inspection_engine) == {"a", "c"}
    assert checked_out(engine) == 0


async def test_a_manual_route_commits_only_what_its_handler_commits(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    @transaction(manual=True)
    async def write(request: Request) -> Response:
        how, name = request.path_params["how"], request.path_params["name"]
        db.add(Item(name=name))
        if how == "flushed":
            await run(db.flush)
        elif how.startswith("committed"):
            await run(db.commit)
            if how == "committed-then-read":
                await run(db.scalar, sa.select(sa.func.count()).select_from(Item))
        return PlainTextResponse(how)

    app = app_with(db, Route("/{how}/{name}", write, methods=["POST"]))
    async with http_client(app, "asgi") as client:
        for path in ("/committed/a", "/committed-then-read/b", "/flushed/c", "/added/d"):
            assert (await client.post(path)).status_code == 200
    assert committed_names(inspection_engine) == {"a", "b"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2
    assert all(
        m.startswith("The handler of 'POST /{how}/{name}', a '@transaction(manual=True)' route, left changes on ")
        and m.endswith(
            "that it never committed; they were rolled back. Commit them in the handler ('db.commit()'), "
            "or drop 'manual=True'."
        )
        for m in warnings
    )
    assert checked_out(engine) == 0


# -- where the policy is found -----------------------------------------------------------------------


async def test_http_endpoint_methods_and_mounted_routes_have_their_policy(db: AnyDB, inspection_engine: Engine) -> None:
    class Items(HTTPEndpoint):
        @transaction(read_only=True)
        async def get(self, request: Request) -> Response:
            return await attempt_write(db, request.path_params["name"])

        async def post(self, request: Request) -> Response:
            return await attempt_write(db, request.path_params["name"])

        @transaction(read_only=True)
        def put(self, request: Request) -> Response:
            # A sync method: Starlette runs it in a worker thread, in a copy of the request's context.
            try:
                db.add(Item(name=request.path_params["name"]))
            except ReadOnlyTransactionError:
                return PlainTextResponse("refused in a thread", status_code=403)
            return PlainTextResponse("written")

    app = app_with(db, Mount("/v1", routes=[Route("/items/{name}", Items)]))
    async with http_client(app, "asgi") as client:
        refused = await client.get("/v1/items/a")
        written = await client.post("/v1/items/b")
        head = await client.head("/v1/items/c")
        put = await client.put("/v1/items/d")
    assert (refused.status_code, written.status_code, head.status_code, put.status_code) == (403, 200, 403, 403)
    assert "'GET /v1/items/{name}'" in refused.text
    assert committed_names(inspection_engine) == {"b"}


async def attempt_write(db: AnyDB, name: str) -> Response:
    try:
        db.add(Item(name=name))
    except ReadOnlyTransactionError as exc:
        return PlainTextResponse(str(exc), status_code=403)
    return PlainTextResponse("written")


async def test_fastapi_path_functions_keep_their_parameters(db: AnyDB, inspection_engine: Engine) -> None:
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, db=db)

    @app.get("/items/{name}")
    @transaction(read_only=True)
    async def read(name: str, limit: int = 10) -> dict[str, Any]:
        response = await attempt_write(db, name)
        return {"status": response.status_code, "limit": limit}

    @app.post("/items/{name}")
    @transaction(commit_on=lambda status: status == 201)
    def write(name: str, session: Any = Depends(db.dependency)) -> dict[str, str]:  # noqa: B008
        # A sync path function: it runs in a worker thread, in a copy of the request's context.
        db.info["who"] = name
        session.add(Item(name=name))
        return {"written": name}

    async with http_client(app, "asgi") as client:
        read_answer = (await client.get("/items/a?limit=3")).json()
        write_status = (await client.post("/items/b")).status_code
    assert read_answer == {"status": 403, "limit": 3}
    assert write_status == 200
    assert committed_names(inspection_engine) == set()  # 200 is not 201: rolled back


# -- db.info, on_begin and Changes.info ------------------------------------------------------------------


async def test_on_begin_runs_at_each_begin_with_the_scope_s_info(db: AnyDB, engine: Engine | AsyncEngine) -> None:
    began: list[tuple[Any, bool]] = []

    @db.on_begin
    def note(connection: Connection, info: dict[str, Any]) -> None:
        began.append((dict(info), connection.in_transaction()))

    async def handler(request: Request) -> Response:
        db.info["user"] = request.path_params["user"]
        await run(db.scalar, sa.select(sa.literal(1)))
        await run(db.commit)
        await run(db.scalar, sa.select(sa.literal(2)))  # a second transaction: a second BEGIN
        return PlainTextResponse("ok")

    async def anonymous(request: Request) -> Response:
        await run(db.scalar, sa.select(sa.literal(1)))
        return PlainTextResponse("ok")

    app = app_with(db, Route("/as/{user}", handler), Route("/anonymous", anonymous))
    async with http_client(app, "asgi") as client:
        await client.get("/as/ann")
        await client.get("/anonymous")
    assert began == [({"user": "ann"}, True), ({"user": "ann"}, True), ({}, True)]
    assert checked_out(engine) == 0


@pytest.mark.sqlite_savepoints
async def test_on_begin_does_not_run_for_a_savepoint(db: AnyDB) -> None:
    began: list[str] = []
    db.on_begin(lambda connection, info: began.append("begin"))
    async with scope(db):
        await run(db.scalar, sa.select(sa.literal(1)))
        nested: Any = await resolve(db.begin_nested())
        await run(db.scalar, sa.select(sa.literal(1)))
        await resolve(nested.commit())
    assert began == ["begin"]


@pytest.mark.parametrize("backend", TESTED_POSTGRESQL, ids=lambda b: b.id)
async def test_on_begin_runs_after_the_route_s_policy(db: AnyDB) -> None:
    seen: list[Any] = []
    db.on_begin(lambda connection, info: seen.append(connection.exec_driver_sql("SHOW statement_timeout").scalar()))
    async with scope(db, statement_timeout=1.5):
        await run(db.scalar, sa.select(sa.literal(1)))
    assert seen == ["1500ms"]


async def test_on_begin_refuses_coroutine_functions(db: AnyDB) -> None:
    async def hook(connection: Connection, info: dict[str, Any]) -> None: ...

    with pytest.raises(TypeError, match=r"'on_begin' hooks run at BEGIN, on the synchronous Connection"):
        db.on_begin(hook)  # type: ignore[arg-type]


async def test_db_info_is_fresh_per_request_and_per_scope(db: AnyDB) -> None:
    with pytest.raises(NoActiveScopeError):
        db.info  # noqa: B018
    async with scope(db):
        db.info["user"] = "ann"
        async with scope(db):
            assert db.info == {}
            db.info["user"] = "bob"
        assert db.info == {"user": "ann"}
        assert db().info is not db.info
    async with scope(db):
        assert db.info == {}


async def test_changes_info_is_a_read_only_snapshot_at_commit(db: AnyDB) -> None:
    seen: list[Changes] = []
    db.before_commit(lambda session, changes: seen.append(changes))
    db.after_commit(seen.append)
    async with scope(db):
        info = db.info
        info["user"] = "ann"
        db.add(Item(name="a"))
    info["user"] = "changed afterwards"
    before, after = seen
    assert dict(before.info) == dict(after.info) == {"user": "ann"}
    with pytest.raises(TypeError):
        after.info["user"] = "bob"  # type: ignore[index]
    assert [change.obj.name for change in after.inserted] == ["a"]


async def test_changes_without_info_have_an_empty_one(db: AnyDB) -> None:
    seen: list[Changes] = []
    db.after_commit(seen.append)
    async with scope(db):
        db.add(Item(name="a"))
    assert dict(seen[0].info) == {}
    assert seen[0] == Changes(inserted=seen[0].inserted)  # info takes no part in comparing


def test_the_policy_has_the_options_the_readme_documents() -> None:
    assert [name for name in Policy.__dataclass_fields__ if not name.startswith("_")] == [
        "read_only",
        "isolation_level",
        "statement_timeout",
        "commit_on",
        "manual",
        "retry",
        "primary",
        "max_queries",
    ]


@pytest.mark.parametrize("backend", TESTED_POSTGRESQL, ids=lambda b: b.id)
async def test_a_killed_connection_of_a_policy_route_leaves_nothing_behind(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine
) -> None:
    # The backend serving a route with every connection-level option dies mid-statement (a failover, an admin).
    settings = sa.text(
        "SELECT current_setting('transaction_isolation') || ',' || current_setting('transaction_read_only') "
        "|| ',' || current_setting('statement_timeout')"
    )
    pids: list[int] = []

    @transaction(read_only=True, isolation_level="SERIALIZABLE", statement_timeout=5)
    async def doomed(request: Request) -> Response:
        pids.append(await run(db.scalar, sa.text("SELECT pg_backend_pid()")))
        await run(db.execute, sa.text("SELECT pg_sleep(3)"))
        return PlainTextResponse("never")

    @transaction(read_only=True)
    async def read_only(request: Request) -> Response:
        return PlainTextResponse(await run(db.scalar, settings))

    async def plain(request: Request) -> Response:
        return PlainTextResponse(await run(db.scalar, settings))

    app = app_with(db, Route("/doomed", doomed), Route("/read-only", read_only), Route("/plain", plain))
    async with http_client(app, "uvicorn") as client:
        request = asyncio.ensure_future(client.get("/doomed"))
        while not pids:
            await asyncio.sleep(0.01)
        with inspection_engine.connect() as connection:
            assert connection.scalar(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pids[0]})
        assert (await request).status_code == 500
        after = [(await client.get(path)).text for path in ("/plain", "/read-only", "/plain")]
    # The pool is whole again, and what the dead connection's route set reached no one else.
    assert after == ["read committed,off,0", "read committed,on,0", "read committed,off,0"]
    assert checked_out(engine) == 0
