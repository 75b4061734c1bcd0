"""Helpers that let one test body drive sync and async registries alike."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from inspect import isawaitable, iscoroutinefunction
from typing import Any, TypeVar

import anyio
import httpx
import sqlalchemy as sa
import uvicorn
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.util import await_
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from starlette_alchemy import AsyncScopedSession, ScopedSession, is_retryable
from tests.models import Item

T = TypeVar("T")

AnyDB = ScopedSession[Any] | AsyncScopedSession[Any]


async def resolve(value: T | Awaitable[T]) -> T:
    """Await *value* if a coroutine came back (async registry), else return it."""
    if isawaitable(value):
        return await value
    return value


def build(engine: Engine | AsyncEngine, session_class: type[Session], **kw: Any) -> AnyDB:
    """A registry of the engine's kind whose (sync) sessions are of *session_class*."""
    if isinstance(engine, AsyncEngine):
        return AsyncScopedSession(async_sessionmaker(engine, sync_session_class=session_class, **kw))
    return ScopedSession(sessionmaker(engine, class_=session_class, **kw))


def counting_session_class(created: list[Session]) -> type[Session]:
    """A Session class that appends every instance it creates to *created*."""

    class Counting(Session):
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            created.append(self)

    return Counting


async def run(method: Callable[..., Any], *args: Any) -> Any:
    """Await an async registry's proxy; run a sync one in a worker thread, as Starlette runs sync code."""
    if iscoroutinefunction(method):
        return await method(*args)
    return await anyio.to_thread.run_sync(partial(method, *args))


@asynccontextmanager
async def scope(db: AnyDB, *, commit: bool = True, **options: Any) -> AsyncIterator[None]:
    """Enter ``db.scope(**options)`` with ``async with`` or ``with``, as the registry's kind needs."""
    if isinstance(db, AsyncScopedSession):
        async with db.scope(commit=commit, **options):
            yield
    else:
        with db.scope(commit=commit, **options):
            yield


def committed_names(engine: Engine) -> set[str]:
    """Read the item names that are committed, through a separate connection."""
    with engine.connect() as conn:
        return set(conn.scalars(sa.select(Item.name)))


@asynccontextmanager
async def serve(app: ASGIApp) -> AsyncIterator[str]:
    """Run *app* under a real uvicorn server on 127.0.0.1, in this event loop; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    # A long keep-alive: a connection the server closes while the client reuses it fails that request.
    config = uvicorn.Config(
        app, lifespan="off", log_level="warning", timeout_graceful_shutdown=5, timeout_keep_alive=60
    )
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        while not server.started:
            await anyio.sleep(0.01)
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        finally:
            server.should_exit = True


@asynccontextmanager
async def http_client(app: ASGIApp, transport: str) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for *app*: in process ("asgi") or through uvicorn over TCP ("uvicorn")."""
    if transport == "asgi":
        asgi = httpx.ASGITransport(app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=asgi, base_url="http://test") as client:
            yield client
    else:
        async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
            yield client


@contextmanager
def slow_commits(engine: Engine | AsyncEngine) -> Iterator[None]:
    """Let a connection ask for its next COMMIT's reply to come late: ``delay_commit(connection, seconds)``.

    The delay comes after the driver's commit returned, so the database has
    committed and only the answer is late: a cancellation that lands meanwhile
    lands while COMMIT is in flight, as a slow network or a busy server makes it.
    """
    dialect = engine.sync_engine.dialect if isinstance(engine, AsyncEngine) else engine.dialect
    original = dialect.do_commit

    def do_commit(dbapi_connection: Any) -> None:
        original(dbapi_connection)
        seconds = dbapi_connection.info.pop(_COMMIT_DELAY, 0)
        if seconds and dialect.is_async:
            await_(asyncio.sleep(seconds))  # inside SQLAlchemy's greenlet: the event loop goes on
        elif seconds:
            time.sleep(seconds)  # a sync session commits in a worker thread

    dialect.do_commit = do_commit  # type: ignore[method-assign]
    try:
        yield
    finally:
        del dialect.do_commit


_COMMIT_DELAY = "tests.commit_delay"


async def delay_commit(db: AnyDB, seconds: float) -> None:
    """Make the current scope's COMMIT answer *seconds* late (see ``slow_commits()``)."""
    connection: Any = await run(db.connection)
    connection.info[_COMMIT_DELAY] = seconds


class OuterTimeout:
    """What deployments wrap apps in: cancel the request after *seconds*, answer 504 if nothing was sent yet.

    ``kind`` is "asyncio" (``asyncio.timeout``, a plain task cancellation) or
    "anyio" (``anyio.fail_after``, a cancel scope).
    """

    def __init__(self, app: ASGIApp, *, seconds: float, kind: str) -> None:
        self.app = app
        self.seconds = seconds
        self.kind = kind

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_noting_start(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            if self.kind == "asyncio":
                async with asyncio.timeout(self.seconds):
                    await self.app(scope, receive, send_noting_start)
            else:
                with anyio.fail_after(self.seconds):
                    await self.app(scope, receive, send_noting_start)
        except TimeoutError:
            if not started:
                await PlainTextResponse("timed out", status_code=504)(scope, receive, send)


def idle_in_transaction(inspection_engine: Engine, *, within: float = 5.0) -> int:
    """The test's PostgreSQL backends still 'idle in transaction' after *within* seconds; 0 on SQLite.

    A backend whose connection was just invalidated (closed by the client) is
    listed until its process has noticed and exited: that takes a moment.
    """
    if inspection_engine.dialect.name != "postgresql":
        return 0
    deadline = time.monotonic() + within
    while True:
        with inspection_engine.connect() as conn:
            count: int = conn.scalar(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
                )
            )
        if count == 0 or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


# How each server raises an error with a given code, as a transaction that conflicted would.
RAISE = {
    "postgresql": "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '{code}'; END $$",
    "mysql": "BEGIN NOT ATOMIC SIGNAL SQLSTATE '{state}' SET MYSQL_ERRNO = {code}, MESSAGE_TEXT = 'conflict'; END",
}
# A statement each database refuses with a transient error of its own making: a serialization failure, or
# a deadlock; SQLite has none, so an error of its own stands in (see ``transient()``).
CONFLICT = {
    "postgresql": RAISE["postgresql"].format(code="40001"),
    "mysql": RAISE["mysql"].format(state="40001", code=1213),
    "sqlite": "SELECT * FROM conflict_stand_in",  # no such table
}


def transient(error: BaseException) -> bool:
    """The tests' ``retry_on``: the drivers' transient errors, and SQLite's stand-in."""
    return is_retryable(error) or "conflict_stand_in" in str(error)


async def conflict(db: AnyDB) -> None:
    """Run the statement the current scope's database refuses with a transient error."""
    await run(db.execute, sa.text(CONFLICT[db.get_bind().dialect.name]))
