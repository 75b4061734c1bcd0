"""The middleware: each row of DESIGN.md's commit table, in process and through uvicorn."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.types import Message
from starlette.websockets import WebSocket

from starlette_alchemy import (
    AsyncScopedSession,
    CommitFailedError,
    DBSessionMiddleware,
    NoActiveScopeError,
    ScopedSession,
    SessionSealedError,
)
from tests.conftest import COMMIT_FAILURE_BACKENDS, SYNC_BACKENDS, checked_out
from tests.models import Item, Note
from tests.support import AnyDB, build, committed_names, counting_session_class, http_client, resolve, run, scope

pytestmark = pytest.mark.anyio


def make_app(db: AnyDB, events: list[str], **options: Any) -> Starlette:
    """An app whose routes act out each situation of the commit table."""

    async def add(request: Request) -> Response:
        db.add(Item(name=request.path_params["name"]))
        await run(db.flush)
        return PlainTextResponse("added", status_code=int(request.query_params.get("status", "200")))

    async def not_found(request: Request) -> Response:
        db.add(Item(name=request.path_params["name"]))
        await run(db.flush)
        raise HTTPException(404)

    async def crash(request: Request) -> Response:
        db.add(Item(name=request.path_params["name"]))
        await run(db.flush)
        raise RuntimeError("handler crashed")

    async def doom(request: Request) -> Response:
        db.add(Item(name=request.path_params["name"]))
        db.doom()
        return PlainTextResponse("doomed")

    async def untouched(request: Request) -> Response:
        return PlainTextResponse("no database")

    async def dangling(request: Request) -> Response:
        db.add(Note(item_id=999_999))
        await run(db.flush)  # the deferred foreign key passes the flush and fails at COMMIT
        return PlainTextResponse("flushed", background=BackgroundTask(events.append, "background ran"))

    def sync_add(request: Request) -> Response:
        # A sync endpoint runs in a worker thread, in a copy of the context.
        session = db()
        assert isinstance(session, Session)
        session.add(Item(name=request.path_params["name"]))
        session.flush()
        return PlainTextResponse("added in a thread")

    async def stream(request: Request) -> Response:
        db.add(Item(name=request.path_params["name"]))
        await run(db.flush)

        async def body() -> AsyncIterator[str]:
            names = await run(db.scalars, sa.select(Item.name))
            yield f"read {sorted(names)}\n"
            try:
                db.add(Item(name="written after start"))
            except SessionSealedError as exc:
                events.append(str(exc))
                yield "sealed\n"
            async with scope(db):
                db.add(Item(name="own scope"))
            yield "done\n"

        return StreamingResponse(body())

    async def read_stream(request: Request) -> Response:
        await run(db.flush)

        async def body() -> AsyncIterator[str]:
            yield "names: "
            yield str(sorted(await run(db.scalars, sa.select(Item.name))))

        return StreamingResponse(body())

    async def background(request: Request) -> Response:
        async def task() -> None:
            try:
                db.add(Item(name="background through the request"))
            except SessionSealedError:
                events.append("background sealed")
            async with scope(db):
                db.add(Item(name="background scope"))

        return PlainTextResponse("ok", background=BackgroundTask(task))

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        name = await websocket.receive_text()
        db.add(Item(name=name))
        if name.startswith("commit"):
            await run(db.commit)
        else:
            await run(db.flush)
        await websocket.send_text("stored")
        await websocket.close()

    async def integrity_error(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": "conflict"}, status_code=409)

    routes = [
        Route("/add/{name}", add, methods=["POST"]),
        Route("/not-found/{name}", not_found, methods=["POST"]),
        Route("/crash/{name}", crash, methods=["POST"]),
        Route("/doom/{name}", doom, methods=["POST"]),
        Route("/untouched", untouched),
        Route("/dangling", dangling, methods=["POST"]),
        Route("/sync-add/{name}", sync_add, methods=["POST"]),
        Route("/stream/{name}", stream),
        Route("/read-stream", read_stream),
        Route("/background", background),
        WebSocketRoute("/ws", ws),
    ]
    middleware = [Middleware(DBSessionMiddleware, db=db, **options)]
    return Starlette(routes=routes, middleware=middleware, exception_handlers={IntegrityError: integrity_error})


# -- the commit table, over HTTP -------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status", "kept"),
    [
        ("/add/ok", 200, {"ok"}),
        ("/add/created?status=201", 201, {"created"}),
        ("/add/redirect?status=303", 303, {"redirect"}),
        ("/add/bad?status=400", 400, set()),
        ("/add/error?status=503", 503, set()),
        ("/not-found/missing", 404, set()),
        ("/crash/crashed", 500, set()),
        ("/doom/doomed", 200, set()),
    ],
)
async def test_status_decides_commit_or_rollback(
    db: AnyDB,
    engine: Engine | AsyncEngine,
    inspection_engine: Engine,
    transport: str,
    path: str,
    status: int,
    kept: set[str],
) -> None:
    async with http_client(make_app(db, []), transport) as client:
        response = await client.post(path)
    assert response.status_code == status
    assert committed_names(inspection_engine) == kept
    assert checked_out(engine) == 0


async def test_commit_on_can_restrict_commits_to_2xx(db: AnyDB, inspection_engine: Engine, transport: str) -> None:
    app = make_app(db, [], commit_on=lambda status: 200 <= status < 300)
    async with http_client(app, transport) as client:
        assert (await client.post("/add/redirect?status=303")).status_code == 303
        assert (await client.post("/add/ok")).status_code == 200
    assert committed_names(inspection_engine) == {"ok"}


@pytest.mark.parametrize("backend", COMMIT_FAILURE_BACKENDS, indirect=True, ids=lambda b: b.id)
async def test_failed_commit_is_a_500_and_skips_background_tasks(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[str] = []
    async with http_client(make_app(db, events), transport) as client:
        response = await client.post("/dangling")
    # An IntegrityError handler is registered, yet the app sees CommitFailedError: no
    # "response already started" error, and never the handler's 2xx.
    assert response.status_code == 500
    assert events == []
    assert "COMMIT failed on" in caplog.text and "IntegrityError" in caplog.text
    with inspection_engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(Note)) == 0
    assert checked_out(engine) == 0


@pytest.mark.parametrize("backend", COMMIT_FAILURE_BACKENDS, indirect=True, ids=lambda b: b.id)
async def test_on_commit_failure_can_answer_instead_of_the_500(
    db: AnyDB, inspection_engine: Engine, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    def conflict(exc: CommitFailedError) -> Response | None:
        if isinstance(exc.__cause__, IntegrityError) and "/dangling" in seen:
            return JSONResponse({"detail": "conflict"}, status_code=409)
        return None

    caplog.set_level(logging.INFO, "starlette_alchemy")
    seen: list[str] = []
    async with http_client(make_app(db, seen, on_commit_failure=conflict), transport) as client:
        unmapped = await client.post("/dangling")
        seen.append("/dangling")
        mapped = await client.post("/dangling")
    assert unmapped.status_code == 500
    assert (mapped.status_code, mapped.json()) == (409, {"detail": "conflict"})
    assert seen == ["/dangling"], "background tasks never run after a failed COMMIT"
    assert "'on_commit_failure' answered 409" in caplog.text
    # The INFO line says what the error was, not only where.
    (answered,) = [r.getMessage() for r in caplog.records if "answered 409" in r.getMessage()]
    assert "The error: IntegrityError: " in answered and "FOREIGN KEY" in answered.upper()
    with inspection_engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(Note)) == 0


async def test_a_failing_rollback_is_logged_and_the_session_still_closed(
    engine: Engine | AsyncEngine, inspection_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    class FailingRollback(Session):
        def rollback(self) -> None:
            raise RuntimeError("rollback failed")

    async with http_client(make_app(build(engine, FailingRollback), []), "asgi") as client:
        response = await client.post("/add/refused?status=400")
    assert response.status_code == 400
    assert "ROLLBACK on" in caplog.text and "RuntimeError: rollback failed" in caplog.text
    assert committed_names(inspection_engine) == set()
    assert checked_out(engine) == 0


@pytest.mark.parametrize("backend", SYNC_BACKENDS, indirect=True, ids=lambda b: b.id)
async def test_sync_endpoint_session_is_committed_and_closed(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine, transport: str
) -> None:
    async with http_client(make_app(db, []), transport) as client:
        assert (await client.post("/sync-add/threaded")).status_code == 200
    assert committed_names(inspection_engine) == {"threaded"}
    assert checked_out(engine) == 0


async def test_streaming_body_reads_but_cannot_write(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine, transport: str
) -> None:
    events: list[str] = []
    async with http_client(make_app(db, events), transport) as client:
        response = await client.get("/stream/streamed")
    assert response.text == "read ['streamed']\nsealed\ndone\n"
    assert len(events) == 1 and "sealed and may not write" in events[0] and "db.scope():" in events[0]
    assert committed_names(inspection_engine) == {"streamed", "own scope"}
    assert checked_out(engine) == 0


async def test_background_task_writes_only_in_its_own_scope(
    db: AnyDB, inspection_engine: Engine, transport: str
) -> None:
    events: list[str] = []
    async with http_client(make_app(db, events), transport) as client:
        assert (await client.get("/background")).status_code == 200
    assert events == ["background sealed"]
    assert committed_names(inspection_engine) == {"background scope"}


async def test_request_that_never_uses_db_creates_no_session(engine: Engine | AsyncEngine, transport: str) -> None:
    created: list[Session] = []
    db = build(engine, counting_session_class(created))
    async with http_client(make_app(db, []), transport) as client:
        assert (await client.get("/untouched")).text == "no database"
    assert created == []


async def test_nothing_leaks_into_the_next_request_in_the_same_task(db: AnyDB) -> None:
    async with http_client(make_app(db, []), "asgi") as client:
        await client.post("/add/first")
        with pytest.raises(NoActiveScopeError):
            db()
        await client.post("/add/second")
    with pytest.raises(NoActiveScopeError):
        db()


# -- the commit table, raw ASGI: what is forwarded, and when ------------------------------


async def call(app: Any, path: str, method: str = "POST", on_message: Any = None) -> list[Message]:
    """Call *app* once with a hand-built scope; return the messages it sent."""
    sent: list[Message] = []
    scope: dict[str, Any] = {"type": "http", "method": method, "path": path, "headers": [], "query_string": b""}
    scope.update(asgi={"version": "3.0", "spec_version": "2.3"}, http_version="1.1", root_path="")

    received: list[Message] = []

    async def receive() -> Message:
        if received:
            await anyio.sleep_forever()  # the client stays connected
        received.append({"type": "http.request", "body": b"", "more_body": False})
        return received[0]

    async def send(message: Message) -> None:
        if on_message is not None:
            on_message(message)
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def test_commit_happens_before_the_status_line_and_frees_the_connection(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine
) -> None:
    seen: list[tuple[set[str], int]] = []

    def on_message(message: Message) -> None:
        if message["type"] == "http.response.start":
            seen.append((committed_names(inspection_engine), checked_out(engine)))

    await call(make_app(db, []), "/add/early", on_message=on_message)
    assert seen == [({"early"}, 0)]


@pytest.mark.parametrize("backend", COMMIT_FAILURE_BACKENDS, indirect=True, ids=lambda b: b.id)
async def test_failed_commit_never_forwards_the_start_message(db: AnyDB) -> None:
    inner_errors: list[BaseException] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        db.add(Note(item_id=424242))
        await resolve(db.flush())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        except BaseException as exc:
            inner_errors.append(exc)
            raise

    middleware = DBSessionMiddleware(app, db=db)
    with pytest.raises(CommitFailedError) as caught:
        await call(middleware, "/")
    assert inner_errors == [caught.value]
    assert isinstance(caught.value.__cause__, IntegrityError)


async def test_exception_before_start_rolls_back_closes_and_reraises(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        db.add(Item(name="lost"))
        await resolve(db.flush())
        raise KeyError("boom")

    with pytest.raises(KeyError):
        await call(DBSessionMiddleware(app, db=db), "/")
    assert committed_names(inspection_engine) == set()
    assert checked_out(engine) == 0


# -- construction --------------------------------------------------------------------------


def _registries_for_construction() -> tuple[ScopedSession[Session], AsyncScopedSession[Any]]:
    from sqlalchemy.ext.asyncio import create_async_engine

    return ScopedSession(sa.create_engine("sqlite://")), AsyncScopedSession(create_async_engine("sqlite+aiosqlite://"))


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        (
            {"db": sa.create_engine("sqlite://")},
            TypeError,
            r"'db' must be a ScopedSession.*Engine.*'ScopedSession\(\.\.\.\)'",
        ),
        (
            {"db": None},
            TypeError,
            r"'db' must be a ScopedSession or an AsyncScopedSession, or a list of them; got None",
        ),
        ({"db": "sqlite://"}, TypeError, r"got 'sqlite://' \(str\)\. Create an engine from the URL"),
        ({"db": sessionmaker()}, TypeError, r"\(sessionmaker\)\. Wrap it: 'ScopedSession\(\.\.\.\)'"),
        ({"db": set()}, TypeError, r"A set has no order, and registries commit in order: give a list"),
        ({"db": []}, ValueError, r"'db' is an empty list, so the middleware would manage no database"),
        ({"db": [None]}, TypeError, r"'db\[0\]' must be a ScopedSession or an AsyncScopedSession; got None"),
        ({"commit_on": True}, TypeError, r"'commit_on' must be a function of the status code.*got True \(bool\)"),
        ({"on_commit_failure": 409}, TypeError, r"'on_commit_failure' must be a function of the error.*got 409"),
        ({"websocket": "auto"}, ValueError, r"'websocket' must be 'manual' .* or 'off' \(no scope\); got 'auto'"),
    ],
)
def test_every_argument_is_checked_at_construction(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    sync_db, _ = _registries_for_construction()
    with pytest.raises(error, match=message):
        DBSessionMiddleware(PlainTextResponse("never"), **{"db": sync_db, **options})


def test_the_same_registry_twice_is_refused() -> None:
    sync_db, async_db = _registries_for_construction()
    with pytest.raises(ValueError, match="names the same registry twice"):
        DBSessionMiddleware(PlainTextResponse("never"), db=[sync_db, async_db, sync_db])
    assert DBSessionMiddleware(PlainTextResponse("ok"), db=(sync_db, async_db)).registries == (sync_db, async_db)


@pytest.mark.parametrize(("kind", "options"), [("lifespan", {}), ("websocket", {"websocket": "off"})])
async def test_passes_straight_through_without_a_scope(db: AnyDB, kind: str, options: dict[str, Any]) -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            db()
        except NoActiveScopeError:
            seen.append(scope["type"])

    await DBSessionMiddleware(app, db=db, **options)({"type": kind}, _never, _discard)
    assert seen == [kind]


@pytest.mark.parametrize("backend", SYNC_BACKENDS, indirect=True, ids=lambda b: b.id)
async def test_sync_registry_finishes_sessions_in_a_worker_thread(engine: Engine) -> None:
    threads: list[str] = []

    class Recording(Session):
        def commit(self) -> None:
            threads.append(f"commit:{threading.current_thread() is threading.main_thread()}")
            super().commit()

        def close(self) -> None:
            threads.append(f"close:{threading.current_thread() is threading.main_thread()}")
            super().close()

    db = ScopedSession(sessionmaker(engine, class_=Recording))
    await call(make_app(db, []), "/add/threaded")
    # After the COMMIT there is no connection to give back, and the committed object is
    # gone from the (weak) identity map: there is nothing to close at all.
    assert threads == ["commit:False"]
    threads.clear()
    held: list[Item] = []

    async def hold(request: Request) -> Response:
        held.append(Item(name="held"))
        db.add(held[-1])
        return PlainTextResponse("added")

    app = Starlette(
        routes=[Route("/hold", hold, methods=["POST"])], middleware=[Middleware(DBSessionMiddleware, db=db)]
    )
    await call(app, "/hold")
    # An object the app still holds must be detached: closing does no I/O and stays on the loop.
    assert threads == ["commit:False", "close:True"]
    threads.clear()
    await call(make_app(db, []), "/read-stream", method="GET")
    # Nothing to commit at the status line; the streaming body's read then left a transaction
    # open, and closing it (a ROLLBACK) goes to a worker thread.
    assert threads == ["close:False"]


# -- cancellation and disconnects ---------------------------------------------------------


async def test_cancelled_request_mid_query_never_commits_and_cleans_up(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine
) -> None:
    started = anyio.Event()
    slow = slow_query(engine)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        db.add(Item(name="cancelled"))
        await resolve(db.flush())
        started.set()
        if engine.dialect.driver == "aiosqlite":
            # aiosqlite 0.22 leaves a close task hanging forever when cancelled mid-query
            # (SQLAlchemy's graceful terminate never completes), so cancel it mid-request.
            await anyio.sleep(1)
        elif isinstance(db, AsyncScopedSession):
            await db.execute(slow)
        else:  # where Starlette runs sync code: a worker thread
            await anyio.to_thread.run_sync(db.execute, slow)
        await send({"type": "http.response.start", "status": 200, "headers": []})

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, DBSessionMiddleware(app, db=db), "/")
            await started.wait()
            await anyio.sleep(0.2)  # into the slow query
            tg.cancel_scope.cancel()
    assert checked_out(engine) == 0
    assert committed_names(inspection_engine) == set()


async def test_client_disconnect_mid_stream_closes_everything(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine
) -> None:
    done = anyio.Event()

    async def body() -> AsyncIterator[bytes]:
        try:
            for _ in range(1000):
                yield b"x" * 1024
                await anyio.sleep(0.01)
        finally:
            done.set()

    async def endless(request: Request) -> Response:
        db.add(Item(name="before the stream"))
        await resolve(db.flush())
        return StreamingResponse(body())

    app = Starlette(routes=[Route("/endless", endless)], middleware=[Middleware(DBSessionMiddleware, db=db)])
    async with http_client(app, "uvicorn") as client:
        async with client.stream("GET", "/endless") as response:
            async for _ in response.aiter_bytes():
                break
        with anyio.fail_after(10):
            await done.wait()
        await anyio.sleep(0.1)
    assert committed_names(inspection_engine) == {"before the stream"}
    assert checked_out(engine) == 0


async def test_pool_of_one_serves_a_request_during_a_slow_stream(tmp_path: Any, backend: Any) -> None:
    url = backend.url(tmp_path)
    options = {"pool_size": 1, "max_overflow": 0, "pool_timeout": 2}
    if backend.kind == "sync":
        engine: Any = sa.create_engine(url, **options)
        db: AnyDB = ScopedSession(engine)
    else:
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(url, **options)
        db = AsyncScopedSession(engine)
    streaming = anyio.Event()

    async def slow(request: Request) -> Response:
        await resolve(db.execute(sa.select(1)))

        async def body() -> AsyncIterator[bytes]:
            streaming.set()
            for _ in range(10):
                yield b"."
                await anyio.sleep(0.2)

        return StreamingResponse(body())

    async def quick(request: Request) -> Response:
        return PlainTextResponse(str(await resolve(db.scalar(sa.select(sa.literal(42))))))

    app = Starlette(
        routes=[Route("/slow", slow), Route("/quick", quick)], middleware=[Middleware(DBSessionMiddleware, db=db)]
    )
    try:
        async with http_client(app, "uvicorn") as client, anyio.create_task_group() as tg:
            tg.start_soon(client.get, "/slow")
            await streaming.wait()
            response = await client.get("/quick")
            assert (response.status_code, response.text) == (200, "42")
    finally:
        await resolve(engine.dispose())


# -- websockets ----------------------------------------------------------------------------


async def test_websocket_commits_explicitly_and_rolls_back_leftovers(
    db: AnyDB, inspection_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(db, [])
    for text in ("commit-me", "leftover"):
        await _websocket_roundtrip(app, text)
    assert committed_names(inspection_engine) == {"commit-me"}
    assert "closed with a transaction still open" in caplog.text


# -- several databases -------------------------------------------------------------------


async def test_two_databases_commit_together(tmp_path: Any) -> None:
    first, second = _two_sqlite(tmp_path)
    app = _two_db_app(first, second, dangling_second=False)
    async with http_client(app, "asgi") as client:
        assert (await client.post("/")).status_code == 200
    assert [_names_and_dispose(db) for db in (first, second)] == [{"one"}, {"one"}]


async def test_second_database_failing_is_a_500_naming_the_first(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = _two_sqlite(tmp_path)
    app = _two_db_app(first, second, dangling_second=True)
    async with http_client(app, "asgi") as client:
        assert (await client.post("/")).status_code == 500
    assert "first.db' had already committed" in caplog.text
    assert [_names_and_dispose(db) for db in (first, second)] == [{"one"}, set()]


# -- helpers -------------------------------------------------------------------------------


def slow_query(engine: Engine | AsyncEngine) -> Any:
    """A statement that runs for about a second on the engine's database."""
    if engine.dialect.name == "postgresql":
        return sa.text("SELECT pg_sleep(1)")
    if engine.dialect.name == "mysql":
        return sa.text("SELECT SLEEP(1)")
    return sa.text(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000) SELECT count(*) FROM c"
    )


async def _never() -> Message:
    raise AssertionError("receive was not expected")


async def _discard(message: Message) -> None:
    pass


async def _websocket_roundtrip(app: Any, text: str) -> None:
    """Connect, send *text*, read the reply and let the server close, over raw ASGI."""
    inbox: list[Message] = [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": text},
        {"type": "websocket.disconnect", "code": 1000},
    ]
    outbox: list[Message] = []

    async def receive() -> Message:
        return inbox.pop(0)

    async def send(message: Message) -> None:
        outbox.append(message)

    await app({"type": "websocket", "path": "/ws", "headers": [], "query_string": b""}, receive, send)
    assert [m["type"] for m in outbox] == ["websocket.accept", "websocket.send", "websocket.close"]


def _two_sqlite(tmp_path: Any) -> tuple[ScopedSession[Session], ScopedSession[Session]]:
    from tests.conftest import configure_sqlite
    from tests.models import Base

    registries = []
    for name in ("first", "second"):
        engine = sa.create_engine(f"sqlite:///{tmp_path / name}.db")
        configure_sqlite(engine)
        Base.metadata.create_all(engine)
        registries.append(ScopedSession(engine))
    return registries[0], registries[1]


def _two_db_app(first: ScopedSession[Session], second: ScopedSession[Session], *, dangling_second: bool) -> Starlette:
    def write(request: Request) -> Response:
        first.add(Item(name="one"))
        second.add(Note(item_id=1) if dangling_second else Item(name="one"))
        return PlainTextResponse("written")

    return Starlette(
        routes=[Route("/", write, methods=["POST"])], middleware=[Middleware(DBSessionMiddleware, db=[first, second])]
    )


def _names_and_dispose(db: ScopedSession[Session]) -> set[str]:
    with db.scope():
        names = set(db.scalars(sa.select(Item.name)))
    db.session_factory.kw["bind"].dispose()
    return names
