"""``DBSessionMiddleware(retry=Retry(...))``: a request that met a transient error runs again, and leaves one trace.

Each database raises the transient error itself: PostgreSQL and MariaDB a
serialization failure, SQLite (which has none) an error of its own that the
tests' ``retry_on`` takes for one. The real conflicts between concurrent
requests, through uvicorn, are in test_conflicts.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from starlette_alchemy import (
    AsyncScopedSession,
    Changes,
    CommitFailedError,
    DBSessionMiddleware,
    Retry,
    ScopedSession,
    transaction,
)
from starlette_alchemy.retry import MAX_DELAY
from starlette_alchemy.sessions import _ScopeSession
from tests.conftest import (
    COMMIT_FAILURE_BACKENDS,
    SQLITE_BACKENDS,
    SYNC_BACKENDS,
    TESTED_POSTGRESQL,
    Backend,
    checked_out,
    engine_for,
)
from tests.models import AuditLog, Item, Note
from tests.support import (
    CONFLICT,
    AnyDB,
    OuterTimeout,
    committed_names,
    conflict,
    http_client,
    idle_in_transaction,
    run,
    transient,
)

pytestmark = pytest.mark.anyio


def app_with(db: AnyDB | list[AnyDB], endpoint: Callable[..., Any], **options: Any) -> Starlette:
    """An app routing POST, GET and PUT ``/`` to *endpoint*, behind the middleware given *options*."""
    handlers = options.pop("exception_handlers", None)
    options.setdefault("retry", Retry(retry_on=transient))
    return Starlette(
        routes=[Route("/", endpoint, methods=["GET", "POST", "PUT"])],
        middleware=[Middleware(DBSessionMiddleware, db=db, **options)],
        exception_handlers=handlers,
    )


def count_rows(engine: Engine, model: type[Any]) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(sa.select(sa.func.count()).select_from(model)) or 0)


# -- what is replayed ----------------------------------------------------------------------------


async def test_a_conflict_in_the_handler_runs_the_request_again_and_only_the_last_run_counts(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    bodies: list[bytes] = []
    events: list[str] = []
    committed: list[Changes] = []

    @db.before_commit
    def audit(session: Session, changes: Changes) -> None:
        for change in changes.inserted:
            if change.entity is Item:
                session.add(AuditLog(entity="Item", identity=str(change.identity), op=change.op, diff={}))

    @db.after_commit
    def after(changes: Changes) -> None:
        committed.append(changes)

    async def endpoint(request: Request) -> Response:
        bodies.append(await request.body())
        attempt = len(bodies)
        db.add(Item(name=f"attempt {attempt}"))
        await run(db.flush)
        db.on_commit(lambda: events.append(f"on_commit {attempt}"))
        if attempt < 3:
            await conflict(db)
        return PlainTextResponse("done", background=BackgroundTask(events.append, f"background {attempt}"))

    caplog.set_level(logging.INFO, "starlette_alchemy")
    async with http_client(app_with(db, endpoint), "asgi") as client:
        response = await client.post("/", content=b'{"amount": 10}')
    assert response.status_code == 200 and response.text == "done"
    assert bodies == [b'{"amount": 10}'] * 3
    assert committed_names(inspection_engine) == {"attempt 3"}
    assert count_rows(inspection_engine, AuditLog) == 1
    inserted = [[change.obj.name for change in changes.inserted if change.entity is Item] for changes in committed]
    assert inserted == [["attempt 3"]]
    assert sorted(events) == ["background 3", "on_commit 3"]
    assert caplog.text.count("replaying it") == 2 and "(attempt 3 of 3)" in caplog.text
    assert checked_out(engine) == 0


@pytest.mark.parametrize("backend", SYNC_BACKENDS, indirect=True, ids=lambda b: b.id)
async def test_a_sync_endpoint_is_replayed_too(db: AnyDB, engine: Engine, inspection_engine: Engine) -> None:
    assert isinstance(db, ScopedSession)
    names: list[str] = []

    def endpoint(request: Request) -> Response:
        session = db()
        names.append(f"attempt {len(names) + 1}")
        session.add(Item(name=names[-1]))
        session.flush()
        if len(names) == 1:
            session.execute(sa.text(CONFLICT[engine.dialect.name]))
        return PlainTextResponse("done")

    async with http_client(app_with(db, endpoint), "asgi") as client:
        assert (await client.post("/")).status_code == 200
    assert names == ["attempt 1", "attempt 2"]
    assert committed_names(inspection_engine) == {"attempt 2"}
    assert checked_out(engine) == 0


async def test_a_flush_that_fails_is_replayed(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine
) -> None:
    with inspection_engine.begin() as conn:
        conn.execute(sa.insert(Item), [{"name": "taken"}])
    names = iter(["taken", "free"])

    async def endpoint(request: Request) -> Response:
        db.add(Item(name=next(names)))
        await run(db.flush)  # the first name is taken: the unique key fails the flush
        return PlainTextResponse("added")

    retry = Retry(retry_on=lambda error: isinstance(error, IntegrityError))
    async with http_client(app_with(db, endpoint, retry=retry), "asgi") as client:
        assert (await client.post("/")).status_code == 200
    assert committed_names(inspection_engine) == {"taken", "free"}
    assert checked_out(engine) == 0


@pytest.mark.parametrize("backend", COMMIT_FAILURE_BACKENDS, indirect=True, ids=lambda b: b.id)
async def test_a_commit_that_fails_is_replayed_and_the_unsent_response_s_work_never_runs(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine
) -> None:
    events: list[str] = []
    failures: list[CommitFailedError] = []

    async def endpoint(request: Request) -> Response:
        attempt = len(events) + 1
        events.append(f"attempt {attempt}")
        if attempt == 1:
            db.add(Note(item_id=999_999))  # the deferred foreign key fails at COMMIT
        else:
            db.add(Item(name="second"))
        await run(db.flush)
        db.on_commit(lambda: events.append(f"on_commit {attempt}"))
        return PlainTextResponse("ok", background=BackgroundTask(events.append, f"background {attempt}"))

    def on_commit_failure(error: CommitFailedError) -> Response | None:
        failures.append(error)
        return None

    retry = Retry(retry_on=lambda error: isinstance(error, CommitFailedError))
    app = app_with(db, endpoint, retry=retry, on_commit_failure=on_commit_failure)
    async with http_client(app, "asgi") as client:
        assert (await client.post("/")).status_code == 200
    assert events[:2] == ["attempt 1", "attempt 2"] and sorted(events[2:]) == ["background 2", "on_commit 2"]
    assert failures == []  # the failure of an attempt that runs again is not answered
    assert committed_names(inspection_engine) == {"second"}
    assert count_rows(inspection_engine, Note) == 0
    assert checked_out(engine) == 0


@pytest.mark.parametrize("backend", TESTED_POSTGRESQL, indirect=True, ids=lambda b: b.id)
async def test_a_serialization_failure_at_commit_is_replayed_by_default(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine
) -> None:
    # A deferred constraint trigger: PostgreSQL raises its error at COMMIT, as it does for a serialization failure.
    table = f"deferred_conflict_{os.getpid()}_{random.randrange(1 << 30)}"
    with inspection_engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {table} (fails boolean NOT NULL)")
        conn.exec_driver_sql(
            f"CREATE FUNCTION {table}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN IF NEW.fails THEN "
            "RAISE EXCEPTION 'conflict at COMMIT' USING ERRCODE = '40001'; END IF; RETURN NEW; END $$"
        )
        conn.exec_driver_sql(
            f"CREATE CONSTRAINT TRIGGER {table} AFTER INSERT ON {table} DEFERRABLE INITIALLY DEFERRED "
            f"FOR EACH ROW EXECUTE FUNCTION {table}()"
        )
    attempts: list[bool] = []

    async def endpoint(request: Request) -> Response:
        attempts.append(not attempts)  # the first attempt's row fails at COMMIT
        await run(db.execute, sa.text(f"INSERT INTO {table} VALUES (:fails)"), {"fails": attempts[-1]})
        db.add(Item(name=f"attempt {len(attempts)}"))
        return PlainTextResponse("ok")

    try:
        async with http_client(app_with(db, endpoint, retry=Retry()), "asgi") as client:
            assert (await client.post("/")).status_code == 200
        assert attempts == [True, False]
        assert committed_names(inspection_engine) == {"attempt 2"}
        with inspection_engine.connect() as conn:
            assert conn.exec_driver_sql(f"SELECT fails FROM {table}").scalars().all() == [False]
    finally:
        with inspection_engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE {table}")
            conn.exec_driver_sql(f"DROP FUNCTION {table}()")
    assert idle_in_transaction(inspection_engine) == 0
    assert checked_out(engine) == 0


async def test_a_5xx_that_an_exception_handler_made_of_a_conflict_is_replayed_unsent(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine
) -> None:
    events: list[str] = []

    async def endpoint(request: Request) -> Response:
        events.append("attempt")
        db.add(Item(name=f"attempt {len(events)}"))
        if len(events) == 1:
            await conflict(db)
        return PlainTextResponse("ok")

    def busy(request: Request, exc: Exception) -> Response:
        return JSONResponse({"detail": "busy"}, status_code=503, background=BackgroundTask(events.append, "503 ran"))

    app = app_with(db, endpoint, exception_handlers={DBAPIError: busy})
    async with http_client(app, "asgi") as client:
        response = await client.post("/")
    assert response.status_code == 200
    assert events == ["attempt", "attempt"]  # the 503's background task never ran
    assert committed_names(inspection_engine) == {"attempt 2"}
    assert checked_out(engine) == 0


async def test_a_5xx_made_of_no_conflict_is_answered_as_it_is(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine
) -> None:
    with inspection_engine.begin() as conn:
        conn.execute(sa.insert(Item), [{"name": "taken"}])
    attempts: list[str] = []

    async def endpoint(request: Request) -> Response:
        attempts.append(request.query_params["case"])
        await run(db.execute, sa.select(Item))
        if request.query_params["case"] == "duplicate":
            db.add(Item(name="taken"))
            await run(db.flush)  # an error of the database, but no conflict: the handler's 503 is the answer
        return PlainTextResponse("deliberate", status_code=503)

    def unavailable(request: Request, exc: Exception) -> Response:
        return PlainTextResponse("duplicate", status_code=503)

    app = app_with(db, endpoint, exception_handlers={IntegrityError: unavailable})
    async with http_client(app, "asgi") as client:
        deliberate = await client.post("/?case=deliberate")
        duplicate = await client.post("/?case=duplicate")
    assert (deliberate.status_code, deliberate.text) == (503, "deliberate")
    assert (duplicate.status_code, duplicate.text) == (503, "duplicate")
    assert attempts == ["deliberate", "duplicate"]
    assert checked_out(engine) == 0


# -- what is not replayed ----------------------------------------------------------------------


async def test_exhausted_attempts_answer_as_without_retry(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    runs: list[str] = []

    async def endpoint(request: Request) -> Response:
        runs.append(request.query_params.get("app", ""))
        db.add(Item(name=f"run {len(runs)}"))
        await conflict(db)
        return PlainTextResponse("never")

    def busy(request: Request, exc: Exception) -> Response:
        return JSONResponse({"detail": "busy"}, status_code=503)

    answers: dict[str, list[tuple[int, str]]] = {}
    retries: list[tuple[str, Retry | None]] = [("without", None), ("with", Retry(retry_on=transient))]
    for name, retry in retries:
        for handlers in (None, {DBAPIError: busy}):
            async with http_client(app_with(db, endpoint, exception_handlers=handlers, retry=retry), "asgi") as client:
                response = await client.post(f"/?app={name}")
            answers.setdefault(name, []).append((response.status_code, response.text))
    assert answers["with"] == answers["without"] == [(500, "Internal Server Error"), (503, '{"detail":"busy"}')]
    assert runs.count("with") == 6 and runs.count("without") == 2
    assert caplog.text.count("in each of its 3 attempts; giving up") == 2
    assert [r.levelname for r in caplog.records if "giving up" in r.getMessage()] == ["WARNING", "WARNING"]
    assert committed_names(inspection_engine) == set()
    assert checked_out(engine) == 0


@pytest.mark.parametrize("backend", COMMIT_FAILURE_BACKENDS, indirect=True, ids=lambda b: b.id)
async def test_exhausted_commit_failures_reach_on_commit_failure_once(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine
) -> None:
    failures: list[CommitFailedError] = []
    runs: list[int] = []

    async def endpoint(request: Request) -> Response:
        runs.append(1)
        db.add(Note(item_id=999_999))
        return PlainTextResponse("never sent")

    def conflict_answer(error: CommitFailedError) -> Response:
        failures.append(error)
        return PlainTextResponse("conflict", status_code=409)

    retry = Retry(attempts=2, retry_on=lambda error: isinstance(error, CommitFailedError))
    async with http_client(app_with(db, endpoint, retry=retry, on_commit_failure=conflict_answer), "asgi") as client:
        response = await client.post("/")
    assert (response.status_code, response.text) == (409, "conflict")
    assert len(runs) == 2 and len(failures) == 1
    assert count_rows(inspection_engine, Note) == 0
    assert checked_out(engine) == 0


async def test_no_replay_once_the_response_started(
    db: AnyDB, engine: Engine | AsyncEngine, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    runs: list[int] = []

    async def endpoint(request: Request) -> Response:
        runs.append(1)
        await run(db.execute, sa.select(1))

        async def body() -> AsyncIterator[bytes]:
            yield b"first part"
            await conflict(db)  # the status line and a first part are on their way: too late
            yield b"never"

        return StreamingResponse(body())

    caplog.set_level(logging.DEBUG, "starlette_alchemy")
    received: list[bytes] = []
    async with http_client(app_with(db, endpoint), transport) as client:
        with contextlib.suppress(httpx.HTTPError):  # uvicorn cuts the connection short, httpx says so
            async with client.stream("GET", "/") as response:
                async for chunk in response.aiter_bytes():
                    received.append(chunk)
    assert b"".join(received) == b"first part"  # and the error ended the body
    assert runs == [1]
    assert "not replayed: its response had started" in caplog.text
    assert checked_out(engine) == 0


async def test_a_body_over_max_body_is_not_replayed_and_one_of_max_body_is(
    db: AnyDB, engine: Engine | AsyncEngine, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    bodies: list[bytes] = []

    async def endpoint(request: Request) -> Response:
        bodies.append(await request.body())
        if len(bodies) == 1:
            await conflict(db)
        return PlainTextResponse("ok")

    caplog.set_level(logging.DEBUG, "starlette_alchemy")
    app = app_with(db, endpoint, retry=Retry(max_body=10, retry_on=transient))
    async with http_client(app, transport) as client:
        over = await client.post("/", content=b"x" * 11)
        bodies.clear()
        exactly = await client.post("/", content=b"y" * 10)
    assert over.status_code == 500
    assert "not replayed: its body was larger than 'max_body' (10 bytes)" in caplog.text
    assert exactly.status_code == 200 and bodies == [b"y" * 10, b"y" * 10]
    assert checked_out(engine) == 0


@pytest.mark.parametrize("option", ["retry", "manual"])
async def test_routes_that_opt_out_are_not_replayed(
    db: AnyDB, engine: Engine | AsyncEngine, option: str, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    runs: list[int] = []

    @transaction(**({"retry": False} if option == "retry" else {"manual": True}))  # type: ignore[arg-type]
    async def endpoint(request: Request) -> Response:
        runs.append(1)
        await conflict(db)
        return PlainTextResponse("never")

    caplog.set_level(logging.DEBUG, "starlette_alchemy")
    async with http_client(app_with(db, endpoint), transport) as client:
        assert (await client.post("/")).status_code == 500
    assert runs == [1]
    opted = "retry=False" if option == "retry" else "manual=True"
    assert f"not replayed: its route is '@transaction({opted})'" in caplog.text
    assert checked_out(engine) == 0


@pytest.mark.parametrize("backend", SQLITE_BACKENDS, indirect=True, ids=lambda b: b.id)
@pytest.mark.parametrize("when", ["during the attempt", "during the backoff"])
async def test_a_cancelled_request_is_never_replayed(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine, when: str
) -> None:
    runs: list[int] = []

    async def endpoint(request: Request) -> Response:
        runs.append(1)
        db.add(Item(name=f"run {len(runs)}"))
        await run(db.flush)
        if when == "during the attempt":
            await anyio.sleep(10)  # the outer timeout cancels it here
        await conflict(db)  # then the backoff, which the timeout cancels
        return PlainTextResponse("never")

    class Waits(Retry):
        def delay(self, attempt: int) -> float:
            return MAX_DELAY  # the longest wait: the timeout lands in it, every time

    retry = Waits(attempts=5, retry_on=transient)
    app = OuterTimeout(app_with(db, endpoint, retry=retry), seconds=0.2, kind="asyncio")
    with anyio.fail_after(5):
        async with http_client(app, "asgi") as client:
            response = await client.post("/")
    assert response.status_code == 504
    assert runs == [1]  # cancelled in the first attempt, or in the wait after it: never run again
    assert committed_names(inspection_engine) == set()
    assert checked_out(engine) == 0


@pytest.mark.parametrize("backend", COMMIT_FAILURE_BACKENDS, indirect=True, ids=lambda b: b.id)
async def test_several_registries_are_not_replayed_once_one_committed(
    backend: Backend, tmp_path: Path, inspection_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    runs: list[int] = []
    caplog.set_level(logging.DEBUG, "starlette_alchemy")
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    async with engine_for(backend, first_dir) as first, engine_for(backend, second_dir) as second:
        for engine in (first, second):
            if engine.dialect.name == "sqlite":
                await _create_tables(engine)
        one, two = _registry(first), _registry(second)

        async def endpoint(request: Request) -> Response:
            runs.append(1)
            one.add(Item(name=f"first {len(runs)}"))
            two.add(Note(item_id=999_999))  # the second database's COMMIT fails, after the first's
            return PlainTextResponse("never sent")

        retry = Retry(retry_on=lambda error: isinstance(error, CommitFailedError))
        async with http_client(app_with([one, two], endpoint, retry=retry), "asgi") as client:
            assert (await client.post("/")).status_code == 500
        assert runs == [1]
        assert "had already committed its transaction, so a replay would repeat its writes" in caplog.text
        assert checked_out(first) == checked_out(second) == 0


@pytest.mark.parametrize("backend", SQLITE_BACKENDS, indirect=True, ids=lambda b: b.id)
async def test_a_replay_discards_every_registry_s_work(backend: Backend, tmp_path: Path) -> None:
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    async with engine_for(backend, first_dir) as first, engine_for(backend, second_dir) as second:
        for engine in (first, second):
            await _create_tables(engine)
        one, two = _registry(first), _registry(second)
        runs: list[int] = []

        async def endpoint(request: Request) -> Response:
            runs.append(1)
            for db in (one, two):
                db.add(Item(name=f"run {len(runs)}"))
                await run(db.flush)
            if len(runs) == 1:
                await conflict(two)
            return PlainTextResponse("ok")

        async with http_client(app_with([one, two], endpoint), "asgi") as client:
            assert (await client.post("/")).status_code == 200
        for engine in (first, second):
            assert await _names(engine) == {"run 2"}
            assert checked_out(engine) == 0


def _registry(engine: Engine | AsyncEngine) -> AnyDB:
    return AsyncScopedSession(engine) if isinstance(engine, AsyncEngine) else ScopedSession(engine)


async def _create_tables(engine: Engine | AsyncEngine) -> None:
    from tests.models import Base

    if isinstance(engine, AsyncEngine):
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
    else:
        Base.metadata.create_all(engine)


async def _names(engine: Engine | AsyncEngine) -> set[str]:
    if isinstance(engine, AsyncEngine):
        async with engine.connect() as conn:
            return set((await conn.scalars(sa.select(Item.name))).all())
    with engine.connect() as conn:
        return set(conn.scalars(sa.select(Item.name)))


# -- what each attempt gets ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", SQLITE_BACKENDS, indirect=True, ids=lambda b: b.id)
async def test_each_attempt_starts_from_the_request_as_it_came(db: AnyDB, engine: Engine | AsyncEngine) -> None:
    seen: list[tuple[bool, bool]] = []

    async def endpoint(request: Request) -> Response:
        seen.append((hasattr(request.state, "user"), "app.note" in request.scope))
        request.state.user = "set by the first attempt"
        request.scope["app.note"] = "set by the first attempt"
        if len(seen) == 1:
            await conflict(db)
        return PlainTextResponse("ok")

    async with http_client(app_with(db, endpoint), "asgi") as client:
        assert (await client.post("/")).status_code == 200
    assert seen == [(False, False), (False, False)]


@pytest.mark.parametrize("content", ["binary chunks", "json"])
async def test_the_body_is_replayed_byte_for_byte_through_uvicorn(
    db: AnyDB, engine: Engine | AsyncEngine, content: str
) -> None:
    if content == "json":  # one message, as a JSON API's client sends it
        sent = [json.dumps({"name": "Zoë ☕", "amounts": list(range(500)), "note": "a\u0000b"}).encode()]
    else:  # several http.request messages, not text
        sent = [os.urandom(40_000) for _ in range(5)]
    bodies: list[bytes] = []

    async def endpoint(request: Request) -> Response:
        chunks = [chunk async for chunk in request.stream()]
        bodies.append(b"".join(chunks))
        if len(bodies) < 3:
            await conflict(db)
        return PlainTextResponse(str(len(chunks)))

    async def chunked() -> AsyncIterator[bytes]:
        for part in sent:
            yield part
            await anyio.sleep(0.01)  # apart: the server hands them over one by one

    async with http_client(app_with(db, endpoint), "uvicorn") as client:
        if content == "json":
            response = await client.post("/", content=sent[0], headers={"content-type": "application/json"})
        else:
            response = await client.post("/", content=chunked())
    assert response.status_code == 200 and (int(response.text) > 1 or content == "json")
    assert bodies == [b"".join(sent)] * 3
    assert checked_out(engine) == 0


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"attempts": 0}, "'attempts' must be a whole number, 1 or more"),
        ({"attempts": True}, "'attempts' must be a whole number"),
        ({"attempts": 2.5}, "'attempts' must be a whole number"),
        ({"backoff": -1}, "'backoff' must be a number of seconds, 0 or more"),
        ({"backoff": "1"}, "'backoff' must be a number of seconds"),
        ({"max_body": -1}, "'max_body' must be a number of bytes, 0 or more"),
        ({"max_body": 1.5}, "'max_body' must be a number of bytes"),
        ({"retry_on": 40001}, "'retry_on' must be a function of the error"),
    ],
)
def test_wrong_retry_options_are_refused(options: dict[str, Any], error: str) -> None:
    with pytest.raises((TypeError, ValueError), match=error):
        Retry(**options)


def test_the_middleware_refuses_a_retry_that_is_not_one() -> None:
    db = ScopedSession(sa.create_engine("sqlite://"))
    with pytest.raises(TypeError, match=r"'retry' must be a Retry, such as 'Retry\(attempts=3\)', or None"):
        DBSessionMiddleware(app_with(db, lambda request: None), db=db, retry=3)  # type: ignore[arg-type]


def test_the_waits_are_full_jitter_doubling_per_attempt_and_capped() -> None:
    retry = Retry(backoff=0.01)
    random.seed(17)
    for attempt, ceiling in [(1, 0.01), (2, 0.02), (3, 0.04), (8, MAX_DELAY), (30, MAX_DELAY)]:
        waits = [retry.delay(attempt) for _ in range(2000)]
        assert 0 <= min(waits) < ceiling * 0.05 and ceiling * 0.95 < max(waits) <= ceiling
    assert Retry(backoff=0).delay(5) == 0
    assert repr(Retry()) == "Retry(attempts=3, backoff=0.01, max_body=1048576)"


@pytest.mark.parametrize("backend", SQLITE_BACKENDS, indirect=True, ids=lambda b: b.id)
async def test_a_5xx_is_replayed_through_a_base_http_middleware_inside(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine
) -> None:
    runs: list[str] = []

    async def endpoint(request: Request) -> Response:
        runs.append("run")
        db.add(Item(name=f"run {len(runs)}"))
        if len(runs) == 1:
            await conflict(db)
        return PlainTextResponse("ok")

    async def passing(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        return response

    def busy(request: Request, exc: Exception) -> Response:
        return PlainTextResponse("busy", status_code=503)

    app = Starlette(
        routes=[Route("/", endpoint, methods=["POST"])],
        middleware=[
            Middleware(DBSessionMiddleware, db=db, retry=Retry(retry_on=transient)),
            Middleware(BaseHTTPMiddleware, dispatch=passing),  # runs the app in a task group of its own
        ],
        exception_handlers={DBAPIError: busy},
    )
    async with http_client(app, "asgi") as client:
        response = await client.post("/")
    assert (response.status_code, response.text) == (200, "ok")
    assert runs == ["run", "run"]
    assert committed_names(inspection_engine) == {"run 2"}
    assert checked_out(engine) == 0


@pytest.mark.parametrize("backend", SQLITE_BACKENDS, indirect=True, ids=lambda b: b.id)
async def test_a_retry_on_that_raises_leaves_the_request_s_own_error(
    db: AnyDB, engine: Engine | AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    async def endpoint(request: Request) -> Response:
        await conflict(db)
        return PlainTextResponse("never")

    def broken(error: BaseException) -> bool:
        raise KeyError("a bug in retry_on")

    async with http_client(app_with(db, endpoint, retry=Retry(retry_on=broken)), "asgi") as client:
        assert (await client.post("/")).status_code == 500
    assert "'retry_on' raised on OperationalError; the request is not replayed." in caplog.text
    assert "no such table: conflict_stand_in" in caplog.text  # what the app raised is what reaches the server
    assert checked_out(engine) == 0


@pytest.mark.parametrize("backend", SQLITE_BACKENDS, indirect=True, ids=lambda b: b.id)
async def test_a_5xx_its_route_committed_is_not_replayed(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    runs: list[int] = []

    @transaction(commit_on=lambda status: True)
    async def endpoint(request: Request) -> Response:
        runs.append(1)
        db.add(Item(name=f"run {len(runs)}"))
        try:
            await conflict(db)
        except DBAPIError:
            pass  # answered below, and committed all the same
        return PlainTextResponse("busy", status_code=503)

    caplog.set_level(logging.DEBUG, "starlette_alchemy")
    async with http_client(app_with(db, endpoint), "asgi") as client:
        assert (await client.post("/")).status_code == 503
    assert runs == [1]
    assert committed_names(inspection_engine) == {"run 1"}
    assert "not replayed: a database had already committed its transaction" in caplog.text
    assert checked_out(engine) == 0


async def test_a_replayed_request_keeps_no_session_alive(db: AnyDB, engine: Engine | AsyncEngine) -> None:
    runs: list[int] = []

    async def endpoint(request: Request) -> Response:
        runs.append(1)
        db.add(Item(name=f"run {len(runs)}"))
        await run(db.flush)
        if len(runs) == 1:
            await conflict(db)  # its traceback holds the first attempt's session
        return PlainTextResponse("ok")

    async with http_client(app_with(db, endpoint), "asgi") as client:
        assert (await client.post("/")).status_code == 200
    gc.collect()
    assert [session for session in gc.get_objects() if isinstance(session, _ScopeSession)] == []


@pytest.mark.parametrize("backend", SQLITE_BACKENDS, indirect=True, ids=lambda b: b.id)
async def test_the_request_s_scope_keeps_no_attempt_once_answered(db: AnyDB, engine: Engine | AsyncEngine) -> None:
    async def endpoint(request: Request) -> Response:
        await run(db.execute, sa.select(1))
        return PlainTextResponse("ok")

    seen: list[dict[str, Any]] = []
    inner = app_with(db, endpoint)

    async def outer(scope: Any, receive: Any, send: Any) -> None:
        await inner(scope, receive, send)
        seen.append(dict(scope))

    async with http_client(outer, "asgi") as client:
        assert (await client.post("/")).status_code == 200
    # The attempt refers to the scope: left in it, each request would wait for the cyclic garbage collector.
    assert [key for key in seen[0] if key.startswith("starlette_alchemy.attempt")] == []
    assert seen[0]["endpoint"] is endpoint  # what the router put there stays, for the middleware outside


@pytest.mark.parametrize("backend", TESTED_POSTGRESQL, indirect=True, ids=lambda b: b.id)
async def test_a_killed_connection_is_not_a_conflict_and_leaves_nothing_behind(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine
) -> None:
    # The backend dies mid-statement (a failover, an admin): an error, but not one a replay should meet again.
    pids: list[int] = []

    async def doomed(request: Request) -> Response:
        db.add(Item(name=f"doomed {len(pids)}"))
        await run(db.flush)
        pids.append(await run(db.scalar, sa.text("SELECT pg_backend_pid()")))
        await run(db.execute, sa.text("SELECT pg_sleep(3)"))
        return PlainTextResponse("never")

    async with http_client(app_with(db, doomed, retry=Retry()), "uvicorn") as client:
        answer = asyncio.ensure_future(client.post("/"))
        with anyio.fail_after(5):
            while not pids:
                await anyio.sleep(0.01)
        with inspection_engine.connect() as connection:
            assert connection.scalar(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pids[0]})
        assert (await answer).status_code == 500
    assert len(pids) == 1  # run once
    assert committed_names(inspection_engine) == set()
    assert idle_in_transaction(inspection_engine) == 0
    assert checked_out(engine) == 0
