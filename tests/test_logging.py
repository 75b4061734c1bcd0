"""What the package logs: each request's outcome at DEBUG, nothing louder on the happy path, and mistakes once."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from starlette_alchemy import AsyncScopedSession, DBSessionMiddleware, ScopedSession, policy
from tests.conftest import ASYNC_BACKENDS, SYNC_BACKENDS
from tests.models import Item
from tests.support import AnyDB, OuterTimeout, http_client, run

pytestmark = pytest.mark.anyio


def outcomes_app(db: AnyDB) -> Any:
    """Routes that end each way a request's transaction can end."""

    async def write(request: Request) -> Response:
        db.add(Item(name=request.path_params["name"]))
        outcome = request.path_params["outcome"]
        if outcome == "doom":
            db.doom()
        elif outcome == "raise":
            await run(db.flush)
            raise RuntimeError("the handler failed")
        elif outcome == "hang":
            await run(db.flush)
            await anyio.sleep(10)
        elif outcome == "leftover":
            return PlainTextResponse(
                "read after", background=BackgroundTask(run, db.scalar, sa.select(sa.func.count(Item.id)))
            )
        status = 404 if outcome == "404" else 201
        if status == 404:
            raise HTTPException(404)
        return PlainTextResponse("written", status_code=status)

    routes = [Route("/write/{outcome}/{name}", write, methods=["POST"])]
    return OuterTimeout(
        Starlette(routes=routes, middleware=[Middleware(DBSessionMiddleware, db=db)]), seconds=0.5, kind="asyncio"
    )


async def test_each_outcome_is_logged_at_debug_with_its_route_and_reason(
    db: AnyDB, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "starlette_alchemy")
    async with http_client(outcomes_app(db), transport) as client:
        for outcome in ("commit", "404", "doom", "raise", "hang", "leftover"):
            await client.post(f"/write/{outcome}/{outcome}")
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and r.name == "starlette_alchemy"]
    route = "'POST /write/{outcome}/{name}' on '"
    assert all(message.startswith(route) for message in debug), debug
    outcomes = [message.split(": ", 1)[1] for message in debug]
    assert outcomes == [
        "committed (status 201).",
        "rolled back (status 404 is not one that 'commit_on' commits).",
        "rolled back (db.doom() was called; status 201).",
        "rolled back (the request raised RuntimeError).",
        "rolled back (the request was cancelled).",
        "committed (status 200).",
        "rolled back (left open after the response started, by reads or raw SQL: nothing commits it).",
    ]


async def test_the_happy_path_logs_nothing_above_debug(
    db: AnyDB, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "starlette_alchemy")
    async with http_client(outcomes_app(db), transport) as client:
        for n in range(3):
            assert (await client.post(f"/write/commit/n{n}")).status_code == 201
            assert (await client.post(f"/write/404/m{n}")).status_code == 404
    assert [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG] == []


# -- a sync registry doing I/O on the event loop -------------------------------------------------


@pytest.mark.parametrize("backend", SYNC_BACKENDS, indirect=True, ids=lambda b: b.id)
async def test_a_sync_registry_on_the_event_loop_is_named_once_per_route(
    db: ScopedSession[Session], transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    policy._warned.clear()  # once per route and process: forget the other tests' routes

    async def blocking(request: Request) -> Response:
        return PlainTextResponse(str(db.scalar(sa.select(sa.literal(1)))))  # on the event loop's thread

    def threaded(request: Request) -> Response:
        return PlainTextResponse(str(db.scalar(sa.select(sa.literal(2)))))  # in a worker thread

    routes = [Route("/blocking/{n}", blocking), Route("/threaded/{n}", threaded)]
    app = Starlette(routes=routes, middleware=[Middleware(DBSessionMiddleware, db=db)])
    async with http_client(app, transport) as client:
        for n in range(3):
            assert (await client.get(f"/blocking/{n}")).text == "1"
            assert (await client.get(f"/threaded/{n}")).text == "2"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "'GET /blocking/{n}'" in warnings[0] and "AsyncScopedSession" in warnings[0] and "'def'" in warnings[0]


@pytest.mark.parametrize("backend", ASYNC_BACKENDS, indirect=True, ids=lambda b: b.id)
async def test_an_async_registry_on_the_event_loop_is_as_it_should_be(
    engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    db = AsyncScopedSession(engine)

    async def read(request: Request) -> Response:
        return PlainTextResponse(str(await db.scalar(sa.select(sa.literal(1)))))

    app = Starlette(routes=[Route("/", read)], middleware=[Middleware(DBSessionMiddleware, db=db)])
    async with http_client(app, "asgi") as client:
        assert (await client.get("/")).text == "1"
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
