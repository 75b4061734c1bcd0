"""Helpers that let one test body drive sync and async registries alike."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
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
from starlette.types import ASGIApp

from starlette_alchemy import AsyncScopedSession, ScopedSession
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
async def scope(db: AnyDB, *, commit: bool = True) -> AsyncIterator[None]:
    """Enter ``db.scope()`` with ``async with`` or ``with``, as the registry's kind needs."""
    if isinstance(db, AsyncScopedSession):
        async with db.scope(commit=commit):
            yield
    else:
        with db.scope(commit=commit):
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
    config = uvicorn.Config(app, lifespan="off", log_level="warning", timeout_graceful_shutdown=5)
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
