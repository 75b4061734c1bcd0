"""The testing kit: what a test commits through the app is rolled back; after-commit work and Changes are checked.

These tests share one PostgreSQL database and may run in any order and in
parallel (``make test`` also runs them with ``-n 2 --random-order``): each one
checks, after it ends, that every table holds exactly the rows it held before.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest
import sqlalchemy as sa
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from starlette_alchemy import (
    AsyncScopedSession,
    Change,
    Changes,
    CommitFailedError,
    DBSessionMiddleware,
    ScopedSession,
    TrackingDisabledError,
)
from starlette_alchemy.testing import LostCommitWarning, arolled_back, assert_changes, capture_on_commit, rolled_back
from tests.conftest import ASYNC_BACKENDS, SQLITE_BACKENDS, Backend, engine_for, ensure_tables
from tests.models import AuditLog, Base, Item
from tests.support import AnyDB, http_client, resolve, run, scope

pytestmark = pytest.mark.anyio


# -- fixtures: a database the tests must leave exactly as they found it ----------------------


def snapshot(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every committed row of every table, sorted."""
    with engine.connect() as conn:
        return {table.name: sorted(map(tuple, conn.execute(sa.select(table)))) for table in Base.metadata.sorted_tables}


@pytest.fixture
async def engine(backend: Backend, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """The app's engine; after the test, every table must hold what it held before, and no connection be out."""
    inspection = create_engine(backend.inspection_url(tmp_path))
    if backend.dialect != "sqlite":
        ensure_tables(backend)
    else:
        Base.metadata.create_all(inspection)
        # A committed row that tests may change: it must come back unchanged.
        with inspection.begin() as conn:
            conn.execute(sa.insert(Item).values(name="committed before the test"))
    before = snapshot(inspection)
    async with engine_for(backend, tmp_path) as engine:
        yield engine
    assert snapshot(inspection) == before, "the test changed committed data"
    inspection.dispose()


@pytest.fixture
def db(engine: Engine | AsyncEngine) -> AnyDB:
    return AsyncScopedSession(engine) if isinstance(engine, AsyncEngine) else ScopedSession(engine)


@pytest.fixture
def tag() -> str:
    """A prefix for the names a test writes: parallel tests must not wait on each other's unique keys."""
    return uuid.uuid4().hex[:8]


@asynccontextmanager
async def bound(db: AnyDB) -> AsyncIterator[Connection | AsyncConnection]:
    """``rolled_back(db)`` or ``arolled_back(db)``, as the registry's kind needs."""
    if isinstance(db, AsyncScopedSession):
        async with arolled_back(db) as async_connection:
            yield async_connection
    else:
        with rolled_back(db) as connection:
            yield connection


async def names_through(connection: Connection | AsyncConnection, tag: str) -> list[str]:
    """The names starting with *tag* that *connection* sees, sorted."""
    query = sa.select(Item.name).where(Item.name.startswith(tag)).order_by(Item.name)
    return list(await resolve(connection.scalars(query)))


def make_app(db: AnyDB, events: list[str]) -> Starlette:
    """An app that adds, lists, renames and deletes items, and answers a failed COMMIT with a 409."""

    async def add(request: Request) -> Response:
        # No flush here: a duplicate name fails in the middleware's COMMIT.
        db.add(Item(name=request.path_params["name"]))
        db.on_commit(lambda: events.append(f"on_commit {request.path_params['name']}"))
        return PlainTextResponse("added", status_code=int(request.query_params.get("status", "201")))

    async def listing(request: Request) -> Response:
        names = await run(db.scalars, sa.select(Item.name).order_by(Item.name))
        return JSONResponse(list(names))

    async def rename(request: Request) -> Response:
        item = await run(db.scalar, sa.select(Item).where(Item.name == request.path_params["name"]))
        assert item is not None
        item.name = request.query_params["to"]
        return PlainTextResponse("renamed")

    async def delete(request: Request) -> Response:
        item = await run(db.scalar, sa.select(Item).where(Item.name == request.path_params["name"]))
        await run(db.delete, item)
        return PlainTextResponse("deleted")

    def conflict(exc: CommitFailedError) -> Response:
        return PlainTextResponse("conflict", status_code=409)

    routes = [
        Route("/items", listing),
        Route("/items/{name}", add, methods=["POST"]),
        Route("/items/{name}/rename", rename, methods=["POST"]),
        Route("/items/{name}", delete, methods=["DELETE"]),
    ]
    return Starlette(routes=routes, middleware=[Middleware(DBSessionMiddleware, db=db, on_commit_failure=conflict)])


# -- rolled_back() / arolled_back() ----------------------------------------------------------


async def test_requests_write_and_read_back_and_leave_the_database_as_it_was(
    db: AnyDB, transport: str, tag: str
) -> None:
    async with bound(db) as connection, http_client(make_app(db, []), transport) as client:
        assert (await client.post(f"/items/{tag}-a")).status_code == 201
        assert (await client.post(f"/items/{tag}-b")).status_code == 201
        assert (await client.post(f"/items/{tag}-a/rename?to={tag}-c")).status_code == 200
        assert (await client.delete(f"/items/{tag}-b")).status_code == 200
        listed = (await client.get("/items")).json()
        assert [name for name in listed if name.startswith(tag)] == [f"{tag}-c"]
        assert await names_through(connection, tag) == [f"{tag}-c"]
    # The engine fixture checks that every table holds what it held before.


async def test_a_request_that_rolls_back_keeps_what_earlier_requests_committed(
    db: AnyDB, transport: str, tag: str
) -> None:
    async with bound(db) as connection, http_client(make_app(db, []), transport) as client:
        assert (await client.post(f"/items/{tag}-kept")).status_code == 201
        assert (await client.post(f"/items/{tag}-refused?status=400")).status_code == 400
        assert await names_through(connection, tag) == [f"{tag}-kept"]


async def test_a_failed_commit_leaves_the_test_connection_usable(
    db: AnyDB, engine: Any, transport: str, tag: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "starlette_alchemy")
    async with bound(db) as connection, http_client(make_app(db, []), transport) as client:
        assert (await client.post(f"/items/{tag}-a")).status_code == 201
        # The duplicate fails in the COMMIT (its SAVEPOINT's flush); the connection is the test's, not discarded.
        assert (await client.post(f"/items/{tag}-a")).status_code == 409
        assert (await client.post(f"/items/{tag}-b")).status_code == 201
        assert await names_through(connection, tag) == [f"{tag}-a", f"{tag}-b"]
    # The log names the database, though the session was bound to the test's connection.
    (failure,) = [r.getMessage() for r in caplog.records if "COMMIT failed" in r.getMessage()]
    assert f"COMMIT failed on '{engine.url.render_as_string(hide_password=True)}'" in failure


@pytest.mark.parametrize("backend", SQLITE_BACKENDS, indirect=True, ids=lambda b: b.id)
async def test_a_committed_row_the_app_changes_comes_back(db: AnyDB, transport: str) -> None:
    async with bound(db) as connection, http_client(make_app(db, []), transport) as client:
        assert (await client.post("/items/committed before the test/rename?to=renamed")).status_code == 200
        assert (await client.delete("/items/renamed")).status_code == 200
        assert await names_through(connection, "") == []
    # The engine fixture checks that the row is back, unchanged.


async def test_scopes_and_hooks_join_the_test_transaction(db: AnyDB, tag: str) -> None:
    @db.before_commit
    def audit(session: Session, changes: Changes) -> None:
        session.add_all(AuditLog(entity=tag, identity=str(c.identity), op=c.op, diff={}) for c in changes)

    # An after-commit hook that writes in a scope of its own (an outbox, say).
    if isinstance(db, AsyncScopedSession):
        async_db = db

        @async_db.after_commit
        async def outbox(changes: Changes) -> None:
            if any(change.entity is Item for change in changes):
                async with async_db.scope():
                    async_db.add(AuditLog(entity=tag, identity="", op="outbox", diff={}))

    else:
        sync_db = db

        @sync_db.after_commit
        def sync_outbox(changes: Changes) -> None:
            if any(change.entity is Item for change in changes):
                with sync_db.scope():
                    sync_db.add(AuditLog(entity=tag, identity="", op="outbox", diff={}))

    async with bound(db) as connection:
        async with scope(db):
            db.add(Item(name=f"{tag}-scoped"))
        assert await names_through(connection, tag) == [f"{tag}-scoped"]
        query = sa.select(AuditLog.op).where(AuditLog.entity == tag).order_by(AuditLog.id)
        audited = await resolve(connection.scalars(query))
        # The outbox row's own commit was audited too: audit rows are not Items, so no second outbox row.
        assert list(audited) == ["insert", "outbox", "insert"]
    # The engine fixture checks that none of it was committed.


async def test_the_registry_is_unbound_afterwards(db: AnyDB, tag: str) -> None:
    configuration = dict(db.session_factory.kw)
    async with bound(db):
        assert db.session_factory.kw["join_transaction_mode"] == "create_savepoint"
    assert db.session_factory.kw == configuration


async def test_a_test_may_lose_the_connection(db: AnyDB) -> None:
    async with bound(db) as connection:
        await resolve(connection.invalidate())


@pytest.mark.parametrize("backend", SQLITE_BACKENDS, indirect=True, ids=lambda b: b.id)
async def test_a_test_that_ends_the_outer_transaction_is_told_what_it_committed(
    db: AnyDB, backend: Backend, tmp_path: Path, tag: str
) -> None:
    with pytest.raises(RuntimeError, match="Something was committed for real on the test's connection"):
        async with bound(db) as connection:
            await resolve(connection.rollback())
            # The connection is in no transaction now, so the scope's session begins and commits one of its own.
            async with scope(db):
                db.add(Item(name=f"{tag}-committed"))
    # It was really committed: remove it, or the engine fixture reports the change.
    inspection = sa.create_engine(backend.inspection_url(tmp_path))
    with inspection.begin() as conn:
        assert conn.execute(sa.delete(Item).where(Item.name == f"{tag}-committed")).rowcount == 1
    inspection.dispose()


async def test_a_test_that_rolls_back_the_connection_by_hand_is_told(db: AnyDB, tag: str) -> None:
    with pytest.raises(RuntimeError, match="rolled back the transaction of the connection that rolled_back"):
        async with bound(db) as connection, http_client(make_app(db, []), "asgi") as client:
            assert (await client.post(f"/items/{tag}-vanishes")).status_code == 201
            await resolve(connection.rollback())
            assert await names_through(connection, tag) == []


def audited_app(db: AnyDB, status: int) -> Starlette:
    """An app whose handler writes an item, and an audit row in a scope of its own, then answers *status*."""

    async def audited(request: Request) -> Response:
        db.add(Item(name=request.path_params["name"]))
        await run(db.flush)  # the request's transaction is open on the connection before the scope's begins
        audit = AuditLog(entity=request.path_params["name"], identity="", op="attempt", diff={})
        if isinstance(db, AsyncScopedSession):
            async with db.scope():
                db.add(audit)
        else:
            with db.scope():
                db.add(audit)
        return PlainTextResponse("done", status_code=status)

    return Starlette(
        routes=[Route("/audited/{name}", audited, methods=["POST"])],
        middleware=[Middleware(DBSessionMiddleware, db=db)],
    )


async def test_a_nested_scope_lost_with_its_request_is_reported(db: AnyDB, tag: str) -> None:
    # In production the audit row survives the 404; on the test's one connection it cannot.
    message = r"'db.scope\(\)' in 'audited' committed inside the transaction of 'POST /audited/\{name\}'"
    with pytest.warns(LostCommitWarning, match=message):
        async with bound(db) as connection, http_client(audited_app(db, 404), "asgi") as client:
            assert (await client.post(f"/audited/{tag}")).status_code == 404
            assert list(await resolve(connection.scalars(sa.select(AuditLog).where(AuditLog.entity == tag)))) == []


async def test_a_nested_scope_kept_by_its_request_is_faithful(db: AnyDB, tag: str) -> None:
    # filterwarnings = error: a LostCommitWarning would fail this test.
    async with bound(db) as connection, http_client(audited_app(db, 200), "asgi") as client:
        assert (await client.post(f"/audited/{tag}")).status_code == 200
        query = sa.select(AuditLog.op).where(AuditLog.entity == tag)
        assert list(await resolve(connection.scalars(query))) == ["attempt"]


@pytest.mark.parametrize("backend", SQLITE_BACKENDS, indirect=True, ids=lambda b: b.id)
async def test_an_engine_with_the_savepoint_recipe_of_its_own(backend: Backend, tmp_path: Path, tag: str) -> None:
    async with engine_for(backend, tmp_path, savepoints=True) as engine:
        Base.metadata.create_all(sa.create_engine(backend.inspection_url(tmp_path)))
        db = AsyncScopedSession(engine) if isinstance(engine, AsyncEngine) else ScopedSession(engine)
        async with bound(db) as connection, http_client(make_app(db, []), "asgi") as client:
            assert (await client.post(f"/items/{tag}-a")).status_code == 201
            assert (await client.post(f"/items/{tag}-a")).status_code == 409
            assert await names_through(connection, tag) == [f"{tag}-a"]
        async with bound(db) as connection:
            assert await names_through(connection, tag) == []


async def test_one_binding_per_registry_at_a_time(db: AnyDB) -> None:
    async with bound(db):
        with pytest.raises(RuntimeError, match="already bound to a test connection"):
            async with bound(db):
                pass  # pragma: no cover


async def test_each_function_refuses_the_other_kind_of_registry() -> None:
    sync_db = ScopedSession(create_engine("sqlite://"))
    async_db = AsyncScopedSession(create_async_engine("sqlite+aiosqlite://"))
    with pytest.raises(
        TypeError,
        match=r"rolled_back\(\) takes a ScopedSession.*Use arolled_back\(\) instead \(the 'adb_transaction' fixture",
    ):
        with rolled_back(async_db):  # type: ignore[arg-type]
            pass  # pragma: no cover
    with pytest.raises(
        TypeError,
        match=r"arolled_back\(\) takes an AsyncScopedSession.*Use rolled_back\(\) instead \(the 'db_transaction'",
    ):
        async with arolled_back(sync_db):  # type: ignore[arg-type]
            pass  # pragma: no cover


def test_a_registry_without_one_engine_is_refused() -> None:
    db = ScopedSession(sessionmaker())
    with pytest.raises(TypeError, match=r"needs a registry whose sessions are bound to one engine.*bind=None"):
        with rolled_back(db):
            pass  # pragma: no cover


# -- capture_on_commit() ------------------------------------------------------------------


async def test_captured_work_waits_for_run(db: AnyDB, transport: str, tag: str) -> None:
    events: list[str] = []
    hooked: list[Changes] = []
    db.after_commit(hooked.append)
    async with bound(db), http_client(make_app(db, events), transport) as client:
        with capture_on_commit(db) as captured:
            assert (await client.post(f"/items/{tag}-a")).status_code == 201
            assert (await client.post(f"/items/{tag}-refused?status=400")).status_code == 400
        assert (events, hooked) == ([], [])
        (changes,) = captured.changes
        assert_changes(changes, inserted={Item: [{"name": f"{tag}-a"}]})
        assert [call.changes for call in captured.calls] == [changes, None]
        assert len(captured.callbacks) == 1
        if isinstance(db, AsyncScopedSession):
            await captured.arun()
        else:
            captured.run()
        assert (events, hooked) == ([f"on_commit {tag}-a"], [changes])
        captured.run()  # each call runs once
        assert len(events) == 1
        # Outside the block, after-commit work runs as usual.
        assert (await client.post(f"/items/{tag}-b")).status_code == 201
        assert events[-1] == f"on_commit {tag}-b"


async def test_captured_work_can_also_run_as_in_production(db: AnyDB, tag: str) -> None:
    events: list[str] = []
    async with bound(db), http_client(make_app(db, events), "asgi") as client:
        with capture_on_commit(db, execute=True) as captured:
            assert (await client.post(f"/items/{tag}-a")).status_code == 201
            assert events == [f"on_commit {tag}-a"]
        captured.run()
    assert events == [f"on_commit {tag}-a"]
    assert len(captured.changes) == 1 and len(captured.callbacks) == 1


@pytest.mark.parametrize("backend", ASYNC_BACKENDS, indirect=True, ids=lambda b: b.id)
async def test_run_refuses_a_coroutine_callback_and_arun_awaits_it(db: AsyncScopedSession[Any]) -> None:
    events: list[str] = []

    async def callback() -> None:
        events.append("awaited")

    async with bound(db):
        with capture_on_commit(db) as captured:
            async with db.scope():
                db.on_commit(callback)
        with pytest.raises(TypeError, match=r"is a coroutine function; use 'await captured.arun\(\)'"):
            captured.run()
        assert events == []
        await captured.arun()
        assert events == ["awaited"]


def test_capture_needs_change_tracking() -> None:
    db = ScopedSession(create_engine("sqlite://"), track_changes=False)
    with pytest.raises(TrackingDisabledError):
        with capture_on_commit(db):
            pass  # pragma: no cover


# -- assert_changes() ---------------------------------------------------------------------


class Other:
    pass


def change(op: Any, entity: type[Any], **diff: tuple[Any, Any]) -> Change:
    return Change(None, entity, None, op, diff)


CHANGES = Changes(
    inserted=(
        change("insert", Item, id=(None, 1), name=(None, "a")),
        change("insert", Item, id=(None, 2), name=(None, "b")),
    ),
    updated=(change("update", Item, name=("x", "y")),),
    deleted=(change("delete", Other, id=(7, None)),),
)


@pytest.mark.parametrize(
    "expected",
    [
        {
            "inserted": {Item: [{"name": "b"}, {"name": "a"}]},
            "updated": {Item: [{"name": ("x", "y")}]},
            "deleted": {Other: [{"id": 7}]},
        },
        {
            "inserted": {Item: [{"id": ANY, "name": "a"}, {}]},
            "updated": {Item: [{"name": (ANY, "y")}]},
            "deleted": {Other: [{}]},
        },
    ],
    ids=["subsets in any order", "ANY and empty rows"],
)
def test_assert_changes_accepts_what_matches(expected: dict[str, Any]) -> None:
    assert_changes(CHANGES, **expected)


@pytest.mark.parametrize(
    ("expected", "message"),
    [
        ({"inserted": {Item: [{"name": "a"}]}}, r"inserted Item: expected \[\{'name': 'a'\}\], got \[.*'b'\}\]"),
        ({"inserted": {Item: [{"name": "a"}, {"name": "a"}]}}, "inserted Item"),
        ({"inserted": {Item: [{"name": "a"}, {"name": "c"}]}}, "inserted Item"),
        ({"inserted": {Item: [{"name": "a"}, {"nom": "b"}]}}, "inserted Item"),
        ({"updated": {Item: [{"name": "y"}]}}, r"updated Item: expected \[\{'name': 'y'\}\]"),
        ({"inserted": {Item: [{}, {}], Other: [{}]}}, r"inserted Other: expected \[\{\}\], got \[\]"),
    ],
)
def test_assert_changes_names_every_difference(expected: dict[str, Any], message: str) -> None:
    with pytest.raises(AssertionError, match=message) as raised:
        assert_changes(CHANGES, **expected)
    # What was not mentioned must not have changed, so the other kinds are reported too.
    assert "deleted Other: expected [], got [{'id': 7}]" in str(raised.value)


def test_assert_changes_of_nothing() -> None:
    assert_changes(Changes())
    with pytest.raises(AssertionError, match=r"inserted Item: expected \[\{\}\], got \[\]"):
        assert_changes(Changes(), inserted={Item: [{}]})
