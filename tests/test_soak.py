"""A hostile soak through uvicorn: every fault at once, then an audit of what the database holds.

5,000 requests, 50 at a time, mixing 2xx writes, 4xx after a flush,
exceptions, COMMIT failures (a deferred foreign key), streams the client walks
away from, fire-and-forget tasks that call ``db()`` after the response, an
outer timeout that cancels some requests while their COMMIT is in flight, and
requests whose first attempt meets a conflict and is replayed (``Retry``).
Afterwards: every row belongs to a request whose COMMIT succeeded, every 2xx
write is there, the log names each committed request whose client got the
timeout's 504, each committed scope's ``on_commit`` ran exactly once, each
replayed request ran twice and wrote once, and no connection, session or idle
PostgreSQL transaction is left.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from starlette_alchemy import DBSessionMiddleware, NoActiveScopeError, Retry
from starlette_alchemy.sessions import _ScopeSession
from tests.conftest import Backend, checked_out, engine_for
from tests.models import Base, Item, Note
from tests.support import (
    AnyDB,
    OuterTimeout,
    committed_names,
    conflict,
    delay_commit,
    idle_in_transaction,
    resolve,
    run,
    serve,
    slow_commits,
    transient,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

REQUESTS = 5000
CONCURRENCY = 50
# One kind of request for each fault, in turn; "slow" ones are cancelled by the outer timeout mid-COMMIT.
KINDS = ["ok", "bad", "ok", "crash", "ok", "dangling", "ok", "stream", "ok", "forget", "ok", "slow", "ok", "conflict"]
FORGOTTEN = sum(1 for n in range(REQUESTS) if KINDS[n % len(KINDS)] == "forget")
TIMEOUT = 0.5  # what the outer middleware allows a "slow" request
COMMIT_DELAY = 1.0  # how late a "slow" request's COMMIT answers


def soak_app(db: AnyDB, ran: list[str], forgotten: list[BaseException], attempts: Counter[str]) -> ASGIApp:
    tasks: set[asyncio.Task[None]] = set()

    async def write(request: Request) -> Response:
        kind, name = request.path_params["kind"], request.path_params["name"]
        attempts[name] += 1
        db.add(Item(name=name))
        db.on_commit(lambda: ran.append(name))
        if kind == "conflict" and attempts[name] == 1:
            await run(db.flush)
            await conflict(db)  # replayed: the second attempt writes the same row, once
        if kind == "slow":
            await delay_commit(db, COMMIT_DELAY)
        elif kind == "dangling":
            db.add(Note(item_id=10_000_000 + int(name.split("-")[1])))  # the deferred foreign key fails at COMMIT
        elif kind == "forget":
            task = asyncio.create_task(later(request.scope[_ENDED]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if kind in ("bad", "crash"):
            await run(db.flush)
            if kind == "bad":
                raise HTTPException(409)
            raise RuntimeError("the handler crashed")
        return PlainTextResponse("written", status_code=201)

    async def later(request_ended: asyncio.Event) -> None:
        await request_ended.wait()
        try:
            await run(db.scalar, sa.select(sa.literal(1)))
        except NoActiveScopeError as exc:
            forgotten.append(exc)

    async def stream(request: Request) -> Response:
        await run(db.scalar, sa.select(sa.func.count(Item.id)))

        async def body() -> AsyncIterator[bytes]:
            for _ in range(20):
                yield b"." * 1024
                await anyio.sleep(0.01)

        return StreamingResponse(body())

    routes = [Route("/write/{kind}/{name}", write, methods=["POST"]), Route("/stream/{name}", stream)]
    app = MarksTheEnd(DBSessionMiddleware(Starlette(routes=routes), db=db, retry=Retry(retry_on=transient)))
    return OnlySlowTimesOut(app, OuterTimeout(app, seconds=TIMEOUT, kind="asyncio"))


_ENDED = "tests.request_ended"


class MarksTheEnd:
    """Set ``scope[_ENDED]`` once the app, and so the request's database scope, has finished."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[_ENDED] = ended = asyncio.Event()
        try:
            await self.app(scope, receive, send)
        finally:
            ended.set()


class OnlySlowTimesOut:
    """A per-route timeout: the "slow" requests go through the outer timeout, the others straight to the app."""

    def __init__(self, app: ASGIApp, timed: ASGIApp) -> None:
        self.app = app
        self.timed = timed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        slow = scope["type"] == "http" and scope["path"].startswith("/write/slow/")
        await (self.timed if slow else self.app)(scope, receive, send)


@contextmanager
def captured_messages(logger_name: str) -> Iterator[list[str]]:
    """Collect the messages the logger emits at INFO and above, without keeping records (nor their tracebacks)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger(logger_name)
    handler = Collect(logging.INFO)
    previous = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    # pytest keeps every record it sees, and a record's traceback holds a failed request's session.
    logger.propagate = False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.level, logger.propagate = previous


@pytest.fixture
def own_database(backend: Backend) -> Iterator[str | None]:
    """A database of this test's own on the backend's server (SQLite's file is the test's already).

    Soaks run two at a time (``make test``: ``-n 2``); each reads every row and starts from empty tables.
    """
    server = backend.server
    if server is None:
        yield None
        return
    name = f"starlette_alchemy_soak_{os.getpid()}_{secrets.token_hex(3)}"
    with server.admin() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {server.quote}{name}{server.quote}")
    try:
        yield name
    finally:
        with server.admin() as connection:
            connection.exec_driver_sql(server.drop.format(f"{server.quote}{name}{server.quote}"))


@pytest.fixture
def inspection_engine(backend: Backend, tmp_path: Path, own_database: str | None) -> Iterator[Engine]:
    engine = sa.create_engine(backend.inspection_url(tmp_path, own_database))
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
async def engine(
    backend: Backend, tmp_path: Path, own_database: str | None, inspection_engine: Engine
) -> AsyncIterator[Engine | AsyncEngine]:
    async with engine_for(backend, tmp_path, database=own_database) as engine:
        yield engine


async def test_soak_through_uvicorn_accounts_for_every_write(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine
) -> None:
    ran: list[str] = []
    forgotten: list[BaseException] = []
    attempts: Counter[str] = Counter()
    statuses: dict[str, int] = {}
    limit = anyio.CapacityLimiter(CONCURRENCY)
    with slow_commits(engine), captured_messages("starlette_alchemy") as messages:
        async with serve(soak_app(db, ran, forgotten, attempts)) as url:
            # Hundreds of "Exception in ASGI application", by design: printed, they would bury a failure's report.
            logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
            limits = httpx.Limits(max_connections=CONCURRENCY)
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

                async def one(n: int) -> None:
                    kind = KINDS[n % len(KINDS)]
                    name = f"{kind}-{n}"
                    async with limit:
                        if kind == "stream":
                            async with client.stream("GET", f"/stream/{name}") as response:
                                async for _ in response.aiter_bytes():
                                    break  # and walk away
                        else:
                            # uvicorn closes the connection after an app exception, even once the 500 went out:
                            # a client reusing it would race the close.
                            headers = {"connection": "close"} if kind in ("crash", "dangling") else {}
                            response = await client.post(f"/write/{kind}/{name}", headers=headers)
                            statuses[name] = response.status_code

                async with anyio.create_task_group() as tg:
                    for n in range(REQUESTS):
                        tg.start_soon(one, n)
            # The last fire-and-forget tasks, after-commit work and connections.
            with anyio.fail_after(30):
                while checked_out(engine) or len(forgotten) < FORGOTTEN:
                    await anyio.sleep(0.05)

    rows = committed_names(inspection_engine)
    kinds = Counter(name.split("-")[0] for name in rows)
    assert set(kinds) <= {"ok", "forget", "slow", "conflict"}, f"rows of requests that did not commit: {kinds}"
    # Every 2xx write is there; no row without a 2xx, except the timed-out ones that the log names.
    answered = {name for name, status in statuses.items() if status == 201}
    timed_out = {name for name, status in statuses.items() if status == 504}
    assert answered <= rows
    reported = {match for message in messages for match in _committed_after_cancel(message)}
    unexplained = {
        name: (statuses.get(name), [m for m in messages if f"/{name}'" in m]) for name in rows - answered - reported
    }
    assert rows - answered == reported, unexplained
    assert reported <= timed_out and reported, "no request was cancelled mid-COMMIT: the soak tested nothing"
    # Each committed scope's on_commit ran exactly once, and no other.
    assert Counter(ran) == Counter(rows)
    assert len(forgotten) == FORGOTTEN
    # Each conflict that answered 201 was replayed once, and its second attempt alone wrote (its name is unique);
    # nothing else ran twice. (Like any write here, one may fail of itself: a lock that waits past SQLite's
    # busy timeout on a loaded machine. Such a request ran once or twice, and left nothing.)
    conflicts = {name for name in statuses if name.startswith("conflict")}
    replayed = {name for name in conflicts if statuses[name] == 201}
    assert len(replayed) >= len(conflicts) * 0.9, {n: (statuses[n], attempts[n]) for n in conflicts - replayed}
    assert replayed <= rows and not (conflicts - replayed) & rows
    assert {attempts[name] for name in replayed} == {2}
    assert {name for name, count in attempts.items() if count > 1} <= conflicts
    assert {statuses[n] for n in statuses if n.startswith(("bad", "crash", "dangling"))} == {409, 500}
    assert checked_out(engine) == 0
    assert idle_in_transaction(inspection_engine) == 0
    # aiosqlite's worker thread keeps its last result (a failed COMMIT's traceback) until the pool is disposed,
    # and a connection's thread may still be finishing its close: a moment later, no session may be left.
    await resolve(engine.dispose())
    for _ in range(40):
        gc.collect()
        left = [o for o in gc.get_objects() if isinstance(o, _ScopeSession)]
        if not left:
            break
        await anyio.sleep(0.05)
    assert left == []


def _committed_after_cancel(message: str) -> list[str]:
    """The name of the request a "cancelled while its COMMIT was in flight ... it committed" message reports."""
    if "in flight" not in message or "it committed" not in message:
        return []
    return re.findall(r"'POST /write/slow/(slow-\d+)'", message)
