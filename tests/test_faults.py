"""The middleware under the faults of real deployments.

Work that outlives its request, writes after the response started, a
cancellation that lands while COMMIT is in flight or while after-commit hooks
run, and a session whose close fails. Each is checked through the database
(a separate connection), ``pool.checkedout()`` and, on PostgreSQL, the
server's own view of idle transactions.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy as sa
import uvicorn
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from starlette_alchemy import (
    AsyncScopedSession,
    Changes,
    DBSessionMiddleware,
    NoActiveScopeError,
    ScopedSession,
    SessionSealedError,
)
from tests.conftest import ASYNC_BACKENDS, SYNC_BACKENDS, Backend, checked_out
from tests.models import Item
from tests.support import (
    AnyDB,
    OuterTimeout,
    build,
    committed_names,
    delay_commit,
    http_client,
    idle_in_transaction,
    resolve,
    run,
    slow_commits,
)

pytestmark = pytest.mark.anyio

_ENDED = "scope has ended"


# -- code that outlives its request ---------------------------------------------------------


async def test_a_task_that_outlives_its_request_gets_an_error_not_a_session(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine, transport: str
) -> None:
    response_sent = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    errors: list[BaseException] = []

    async def later(session: Any) -> None:
        await response_sent.wait()
        attempts: list[Callable[[], Any]] = [
            db,  # the registry
            lambda: db.execute(sa.select(1)),  # a proxied call
            lambda: db.add(Item(name="late")),
            lambda: session.execute(sa.select(1)),  # the request's session, kept by reference
            lambda: session.add(Item(name="late too")),
        ]
        for attempt in attempts:
            try:
                await resolve(attempt())
            except NoActiveScopeError as exc:
                errors.append(exc)

    async def fire_and_forget(request: Request) -> Response:
        session = db()
        await resolve(db.execute(sa.select(1)))
        tasks.append(asyncio.create_task(later(session)))
        return PlainTextResponse("started")

    app = Starlette(routes=[Route("/", fire_and_forget)], middleware=[Middleware(DBSessionMiddleware, db=db)])
    async with http_client(app, transport) as client:
        assert (await client.get("/")).status_code == 200
        response_sent.set()
        await asyncio.gather(*tasks)
    assert len(errors) == 5
    assert all(_ENDED in str(error) and "db.scope()" in str(error) for error in errors)
    assert checked_out(engine) == 0
    assert idle_in_transaction(inspection_engine) == 0
    assert committed_names(inspection_engine) == set()


async def test_fire_and_forget_tasks_cannot_exhaust_the_pool(backend: Backend, tmp_path: Any) -> None:
    # The report: pool_size=3, and three requests whose tasks call db() after the response.
    options: dict[str, Any] = {"pool_size": 3, "max_overflow": 0, "pool_timeout": 2}
    engine: Any = (
        sa.create_engine(backend.url(tmp_path), **options)
        if backend.kind == "sync"
        else create_async_engine(backend.url(tmp_path), **options)
    )
    db = ScopedSession(engine) if backend.kind == "sync" else AsyncScopedSession(engine)
    tasks: list[asyncio.Task[None]] = []
    response_sent = asyncio.Event()

    async def later() -> None:
        await response_sent.wait()
        with pytest.raises(NoActiveScopeError, match=_ENDED):
            await resolve(db.scalar(sa.select(1)))

    async def spawn(request: Request) -> Response:
        if "spawn" in request.query_params:
            tasks.append(asyncio.create_task(later()))
        return PlainTextResponse(str(await resolve(db.scalar(sa.select(sa.literal(1))))))

    app = Starlette(routes=[Route("/", spawn)], middleware=[Middleware(DBSessionMiddleware, db=db)])
    try:
        async with http_client(app, "uvicorn") as client:
            for _ in range(3):
                assert (await client.get("/?spawn")).status_code == 200
            response_sent.set()
            await asyncio.gather(*tasks)
            for _ in range(3):
                assert (await client.get("/")).text == "1"
        assert checked_out(engine) == 0
    finally:
        await resolve(engine.dispose())


async def test_a_thread_given_a_copy_of_the_request_context_gets_an_error(
    db: AnyDB, engine: Engine | AsyncEngine, transport: str
) -> None:
    contexts: list[contextvars.Context] = []

    async def keep_context(request: Request) -> Response:
        await resolve(db.execute(sa.select(1)))
        contexts.append(contextvars.copy_context())
        return PlainTextResponse("kept")

    app = Starlette(routes=[Route("/", keep_context)], middleware=[Middleware(DBSessionMiddleware, db=db)])
    async with http_client(app, transport) as client:
        await client.get("/")
    errors: list[BaseException] = []

    def in_thread() -> None:
        try:
            contexts[0].run(db)
        except NoActiveScopeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert len(errors) == 1 and _ENDED in str(errors[0])
    assert checked_out(engine) == 0


# -- writes after the response started ---------------------------------------------------------


async def test_every_write_after_the_response_is_refused(db: AnyDB, inspection_engine: Engine, transport: str) -> None:
    refused: list[str] = []
    allowed: list[str] = []

    async def attempt(name: str, method: Callable[..., Any], *args: Any) -> None:
        try:
            await run(method, *args)
        except SessionSealedError as exc:
            assert "db.scope()" in str(exc)
            refused.append(name)
        else:
            allowed.append(name)

    async def background() -> None:
        item = await run(db.get, Item, 1)  # reads work
        await attempt("add", db.add, Item(name="added late"))
        await attempt("add_all", db.add_all, [Item(name="added late too")])
        await attempt("delete", db.delete, item)
        await attempt("merge", db.merge, Item(id=1, name="merged late"))
        await attempt("delete_all", db.delete_all, [item])
        await attempt("merge_all", db.merge_all, [Item(id=1, name="merged late")])
        # The legacy bulk methods, on the synchronous Session.
        sync: Any = db().sync_session if isinstance(db, AsyncScopedSession) else db
        await attempt("bulk_save_objects", sync.bulk_save_objects, [Item(name="bulk late")])
        await attempt("bulk_insert_mappings", sync.bulk_insert_mappings, Item, [{"name": "mapped late"}])
        await attempt("bulk_update_mappings", sync.bulk_update_mappings, Item, [{"id": 1, "name": "remapped"}])
        await attempt("orm insert", db.execute, sa.insert(Item).values(name="inserted late"))
        await attempt("orm update", db.execute, sa.update(Item).values(name="updated late"))
        await attempt("orm delete", db.execute, sa.delete(Item))
        item.name = "changed late"
        await attempt("flush", db.flush)
        db.expire(item)  # leave nothing pending for close, so only the refusals count
        await attempt("commit", db.commit)

    async def write(request: Request) -> Response:
        db.add(Item(id=1, name="the request's"))
        return PlainTextResponse("written", background=BackgroundTask(background))

    app = Starlette(routes=[Route("/", write, methods=["POST"])], middleware=[Middleware(DBSessionMiddleware, db=db)])
    async with http_client(app, transport) as client:
        assert (await client.post("/")).status_code == 200
    expected = ["add", "add_all", "delete", "merge", "delete_all", "merge_all", "bulk_save_objects"]
    expected += ["bulk_insert_mappings", "bulk_update_mappings", "orm insert", "orm update", "orm delete"]
    expected += ["flush", "commit"]
    assert (refused, allowed) == (expected, [])
    assert committed_names(inspection_engine) == {"the request's"}


async def test_raw_sql_after_the_response_is_never_committed_and_is_reported(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    insert = sa.text("INSERT INTO item (name) VALUES (:name)")
    outcomes: list[str] = []

    async def background(name: str, then_commit: bool) -> None:
        if name.startswith("connection"):
            connection = await run(db.connection)
            await run(connection.execute, insert, {"name": name})
        else:
            await run(db.execute, insert, {"name": name})
        if then_commit:
            try:
                await run(db.commit)
            except SessionSealedError:
                outcomes.append(f"{name}: commit refused")

    async def raw(request: Request) -> Response:
        name = request.path_params["name"]
        task = BackgroundTask(background, name, name.endswith("commit"))
        return PlainTextResponse("answered", background=task)

    async def stream_read(request: Request) -> Response:
        # A read that leaves a transaction open after the response is no write: it warns of nothing.
        return PlainTextResponse("read", background=BackgroundTask(run, db.scalar, sa.select(sa.func.count(Item.id))))

    routes = [Route("/raw/{name}", raw, methods=["POST"]), Route("/read", stream_read)]
    app = Starlette(routes=routes, middleware=[Middleware(DBSessionMiddleware, db=db)])
    async with http_client(app, transport) as client:
        await client.post("/raw/left-open")
        await client.post("/raw/then-commit")
        await client.post("/raw/connection-left-open")
        await client.get("/read")
    assert outcomes == ["then-commit: commit refused"]
    assert committed_names(inspection_engine) == set()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "starlette_alchemy"]
    assert len(warnings) == 3, [r.getMessage() for r in warnings]
    assert all("'POST /raw/{name}'" in r.getMessage() and "discarded" in r.getMessage() for r in warnings)
    assert checked_out(engine) == 0


# -- cancellation while COMMIT is in flight, and during after-commit work ---------------------------


def _slow_commit_app(db: AnyDB, log: list[str], *, seconds: float, kind: str) -> OuterTimeout:
    """An app whose writes commit late, behind an outer timeout middleware of *kind*."""

    async def write(request: Request) -> Response:
        name = request.path_params["name"]
        db.add(Item(name=name))
        await delay_commit(db, float(request.query_params.get("delay", "0")))
        db.on_commit(lambda: log.append(f"on_commit {name}"))
        return PlainTextResponse("written", status_code=201)

    def published(changes: Changes) -> None:
        log.append(f"after_commit {[change.diff['name'][1] for change in changes.inserted]}")

    db.after_commit(published)
    app = Starlette(routes=[Route("/write/{name}", write, methods=["POST"])])
    return OuterTimeout(DBSessionMiddleware(app, db=db), seconds=seconds, kind=kind)


@pytest.mark.parametrize("kind", ["asyncio", "anyio"])
async def test_a_timeout_mid_commit_completes_the_commit_and_says_so(
    db: AnyDB,
    engine: Engine | AsyncEngine,
    inspection_engine: Engine,
    transport: str,
    kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    log: list[str] = []
    with slow_commits(engine):
        async with http_client(_slow_commit_app(db, log, seconds=0.3, kind=kind), transport) as client:
            late = await client.post("/write/late?delay=0.8")
            prompt = await client.post("/write/prompt")
            await _until(lambda: len(log) == 4)
    assert (late.status_code, prompt.status_code) == (504, 201)
    assert committed_names(inspection_engine) == {"late", "prompt"}
    # The commit that the timeout interrupted ran its after-commit work too, once.
    assert sorted(log) == ["after_commit ['late']", "after_commit ['prompt']", "on_commit late", "on_commit prompt"]
    reports = [r for r in caplog.records if r.levelno >= logging.INFO and "POST /write/late" in r.getMessage()]
    assert len(reports) == 1 and "committed" in reports[0].getMessage() and "cancelled" in reports[0].getMessage()
    assert checked_out(engine) == 0
    assert idle_in_transaction(inspection_engine) == 0


@pytest.mark.parametrize("kind", ["asyncio", "anyio"])
async def test_a_timeout_during_after_commit_work_lets_it_all_run(
    db: AnyDB, engine: Engine | AsyncEngine, transport: str, kind: str
) -> None:
    log: list[str] = []
    sync = isinstance(db, ScopedSession)

    def slow_sync(changes: Changes) -> None:
        threading.Event().wait(0.5)
        log.append("slow hook")

    async def slow_async(changes: Changes) -> None:
        await asyncio.sleep(0.5)
        log.append("slow hook")

    db.after_commit(slow_sync if sync else slow_async)
    async with http_client(_slow_commit_app(db, log, seconds=0.2, kind=kind), transport) as client:
        response = await client.post("/write/hooked")
        await _until(lambda: len(log) == 3)
    # The hooks run after the response was sent, so the timeout could not turn it into a 504.
    assert response.status_code == 201
    assert log == ["slow hook", "after_commit ['hooked']", "on_commit hooked"]
    assert checked_out(engine) == 0


async def test_a_slow_after_commit_hook_does_not_hold_back_the_response(db: AnyDB) -> None:
    release = threading.Event()
    ran: list[str] = []

    def waits_for_the_client(changes: Changes) -> None:
        release.wait(10)
        ran.append("hook")

    async def async_waits_for_the_client(changes: Changes) -> None:
        await anyio.to_thread.run_sync(waits_for_the_client, changes)

    db.after_commit(async_waits_for_the_client if isinstance(db, AsyncScopedSession) else waits_for_the_client)

    async def write(request: Request) -> Response:
        db.add(Item(name="hooked"))
        db.on_commit(lambda: ran.append("callback"))
        return PlainTextResponse("written")

    app = Starlette(routes=[Route("/", write, methods=["POST"])], middleware=[Middleware(DBSessionMiddleware, db=db)])
    async with http_client(app, "uvicorn") as client:
        with anyio.fail_after(5):  # the hook waits for the response, so holding it back would hang
            response = await client.post("/")
        assert response.text == "written"
        release.set()
        await _until(lambda: len(ran) == 2)
    assert ran == ["hook", "callback"]


@pytest.mark.parametrize("backend", SYNC_BACKENDS, indirect=True, ids=lambda b: b.id)
async def test_hanging_sync_hooks_do_not_starve_def_endpoints(db: ScopedSession[Session], engine: Engine) -> None:
    release = threading.Event()
    entered: list[int] = []

    @db.after_commit
    def hangs(changes: Changes) -> None:
        entered.append(1)
        release.wait(20)

    def write(request: Request) -> Response:
        db.add(Item(name=request.path_params["name"]))
        return PlainTextResponse("written")

    def ping(request: Request) -> Response:
        return PlainTextResponse("pong")

    routes = [Route("/write/{name}", write, methods=["POST"]), Route("/ping", ping)]
    app = Starlette(routes=routes, middleware=[Middleware(DBSessionMiddleware, db=db)])
    try:
        async with http_client(app, "uvicorn") as client:
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    for n in range(45):
                        tg.start_soon(client.post, f"/write/n{n}")
                await _until(lambda: len(entered) >= 20)
                # Starlette's threadpool (40 threads) still serves def endpoints.
                assert (await client.get("/ping")).text == "pong"
            release.set()
            await _until(lambda: len(entered) == 45, seconds=20)
    finally:
        release.set()
    assert checked_out(engine) == 0


async def test_server_shutdown_mid_commit_completes_the_commit(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    log: list[str] = []
    app = _slow_commit_app(db, log, seconds=30, kind="asyncio")
    config = uvicorn.Config(app, lifespan="off", log_level="warning", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    answers: list[int | Exception] = []
    with slow_commits(engine):
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            while not server.started:
                await anyio.sleep(0.01)

            async def client_request() -> None:
                async with httpx.AsyncClient(base_url=url) as client:
                    try:
                        answers.append((await client.post("/write/at-shutdown?delay=3")).status_code)
                    except httpx.HTTPError as exc:
                        answers.append(exc)

            tg.start_soon(client_request)
            await anyio.sleep(0.3)  # the COMMIT is in flight; uvicorn cancels it after one second
            server.should_exit = True
        await _until(lambda: len(log) == 2)
    # uvicorn answers a cancelled request with a 500 (or drops the connection): never a 2xx.
    assert answers == [500] or isinstance(answers[0], httpx.HTTPError)
    assert committed_names(inspection_engine) == {"at-shutdown"}
    assert sorted(log) == ["after_commit ['at-shutdown']", "on_commit at-shutdown"]
    assert any("POST /write/at-shutdown" in r.getMessage() and "committed" in r.getMessage() for r in caplog.records)
    assert checked_out(engine) == 0


@pytest.mark.parametrize("backend", [b for b in ASYNC_BACKENDS if b.dialect == "postgresql"], ids=lambda b: b.id)
async def test_a_timeout_while_postgresql_runs_deferred_work_at_commit(
    backend: Backend, engine: AsyncEngine, inspection_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    # The database itself is slow to COMMIT: a deferred constraint trigger sleeps.
    with inspection_engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN PERFORM pg_sleep(0.8); RETURN NULL; END $$"
            )
        )
        conn.execute(
            sa.text(
                "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON item DEFERRABLE INITIALLY DEFERRED "
                "FOR EACH ROW EXECUTE FUNCTION slow_commit()"
            )
        )
    try:
        db = AsyncScopedSession(engine)
        log: list[str] = []
        async with http_client(_slow_commit_app(db, log, seconds=0.3, kind="asyncio"), "uvicorn") as client:
            assert (await client.post("/write/deferred")).status_code == 504
            await _until(lambda: len(log) == 2)
        assert committed_names(inspection_engine) == {"deferred"}
        assert any("POST /write/deferred" in r.getMessage() and "committed" in r.getMessage() for r in caplog.records)
        assert checked_out(engine) == 0
        assert idle_in_transaction(inspection_engine) == 0
    finally:
        with inspection_engine.begin() as conn:
            conn.execute(sa.text("DROP TRIGGER slow_commit ON item"))
            conn.execute(sa.text("DROP FUNCTION slow_commit()"))


# -- a close that fails -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ASYNC_BACKENDS, indirect=True, ids=lambda b: b.id)
async def test_concurrent_use_of_one_session_still_returns_its_connection(
    db: AsyncScopedSession[AsyncSession],
    engine: AsyncEngine,
    inspection_engine: Engine,
    transport: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def gather(request: Request) -> Response:
        try:
            await asyncio.gather(db.execute(sa.select(sa.literal(1))), db.execute(sa.select(sa.literal(2))))
        except Exception as exc:  # what SQLAlchemy says of concurrent use
            return PlainTextResponse(type(exc).__name__, status_code=500)
        return PlainTextResponse("no error this time")

    app = Starlette(routes=[Route("/", gather)], middleware=[Middleware(DBSessionMiddleware, db=db)])
    async with http_client(app, transport) as client:
        for _ in range(3):
            await client.get("/")
            await asyncio.sleep(0.1)  # let the second query, which gather() does not wait for, finish
            assert checked_out(engine) == 0
    assert idle_in_transaction(inspection_engine) == 0


class FailingClose(Session):
    def close(self) -> None:
        raise RuntimeError("close failed")


async def test_a_session_whose_close_fails_still_returns_its_connection(
    engine: Engine | AsyncEngine, inspection_engine: Engine, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = build(engine, FailingClose)

    async def read(request: Request) -> Response:
        # A read after the response leaves a transaction open: closing it is what fails.
        return PlainTextResponse("answered", background=BackgroundTask(run, db.scalar, sa.select(sa.literal(1))))

    app = Starlette(routes=[Route("/", read)], middleware=[Middleware(DBSessionMiddleware, db=db)])
    async with http_client(app, transport) as client:
        assert (await client.get("/")).text == "answered"
    assert "close failed" in caplog.text and "invalidated" in caplog.text
    assert checked_out(engine) == 0
    assert idle_in_transaction(inspection_engine) == 0


async def _until(condition: Callable[[], bool], seconds: float = 10) -> None:
    """Wait until *condition* holds; fail after *seconds*."""
    with anyio.fail_after(seconds):
        while not condition():
            await anyio.sleep(0.02)
