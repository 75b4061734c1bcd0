"""Lifecycle: the collector's four sets, ``Changes``, and the audit hooks."""

from __future__ import annotations

import gc
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from inspect import iscoroutinefunction
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import InvalidRequestError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, AsyncSessionTransaction, create_async_engine
from sqlalchemy.orm import Session, SessionTransaction, make_transient
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from starlette_alchemy import (
    UNKNOWN,
    AsyncScopedSession,
    Changes,
    DBSessionMiddleware,
    ScopedSession,
    TrackingDisabledError,
)
from starlette_alchemy.lifecycle import _after_flush, _TrackedSession
from tests.conftest import ASYNC_BACKENDS, SQLITE_BACKENDS, SYNC_BACKENDS, Backend, checked_out, configure_sqlite
from tests.models import AuditLog, Item
from tests.support import AnyDB, build, committed_names, http_client, resolve, run, scope

STATES = ("pending", "persistent", "deleted", "detached")
_names = itertools.count()


def unique_name(prefix: str = "item") -> str:
    return f"{prefix}-{next(_names)}"


def identities(objects: Any) -> set[int]:
    return {id(obj) for obj in objects}


def assert_sets_agree_with_inspect(db: AnyDB, objects: list[Any]) -> None:
    """Each of the collector's sets holds exactly the objects that ``inspect()`` puts in that state."""
    for name in STATES:
        expected = {id(obj) for obj in objects if getattr(sa.inspect(obj), name)}
        assert identities(getattr(db.collector, name)) == expected, name


def committed_rows(engine: Engine) -> dict[int, str]:
    """The committed item rows, read through a separate connection."""
    with engine.connect() as conn:
        return {row.id: row.name for row in conn.execute(sa.select(Item.id, Item.name))}


# -- a driver for hypothesis: one test body, sync and async sessions --------------------


@dataclass
class Driver:
    """Calls session methods from a synchronous test, awaiting async ones on a portal's event loop."""

    db: AnyDB
    portal: BlockingPortal
    savepoints: list[SessionTransaction | AsyncSessionTransaction] = field(default_factory=list)
    # Objects whose row is known to be committed: only those may be re-added once detached.
    committed: set[int] = field(default_factory=set)

    def reset(self) -> None:
        self.savepoints.clear()
        self.committed.clear()

    def __call__(self, method: Callable[..., Any], *args: Any) -> Any:
        if iscoroutinefunction(method):
            return self.portal.call(method, *args)
        return method(*args)

    def begin_nested(self, session: Session | AsyncSession) -> None:
        transaction = session.begin_nested()
        if isinstance(transaction, AsyncSessionTransaction):
            self.portal.call(transaction.start)
        self.savepoints.append(transaction)


@pytest.fixture
def driver(backend: Backend, tmp_path: Path, inspection_engine: Engine) -> Iterator[Driver]:
    """A registry on the backend (SQLite with working SAVEPOINTs), driven from a synchronous test."""
    with start_blocking_portal("asyncio") as portal:
        engine: Engine | AsyncEngine
        if backend.kind == "sync":
            engine = create_engine(backend.url(tmp_path))
            configure_sqlite(engine, savepoints=True)
            db: AnyDB = ScopedSession(engine)
        else:
            engine = create_async_engine(backend.url(tmp_path))
            configure_sqlite(engine.sync_engine, savepoints=True)
            db = AsyncScopedSession(engine)
        yield Driver(db, portal)
        assert checked_out(engine) == 0
        if isinstance(engine, AsyncEngine):
            portal.call(engine.dispose)
        else:
            engine.dispose()


OUTER = ("commit", "rollback", "close")
INNER = ("add", "readd", "update", "delete", "flush", "get", "expunge", "begin_nested", "release", "rollback_to")
Steps = st.lists(
    st.tuples(st.sampled_from(INNER + OUTER), st.integers(min_value=0, max_value=9)), min_size=5, max_size=40
)
InnerSteps = st.lists(st.tuples(st.sampled_from(INNER), st.integers(min_value=0, max_value=9)), min_size=5, max_size=40)


def step(drive: Driver, session: Session | AsyncSession, objects: list[Any], op: str, index: int) -> None:
    """Apply one operation; an operation SQLAlchemy refuses in the current state is skipped."""
    obj = objects[index % len(objects)] if objects else None
    try:
        if op == "add" or (op in ("readd", "update", "delete", "expunge") and obj is None):
            new = Item(name=unique_name())
            objects.append(new)
            session.add(new)
        elif op == "readd" and obj is not None and sa.inspect(obj).detached and id(obj) in drive.committed:
            session.add(obj)
        elif op == "update" and obj is not None and not sa.inspect(obj).deleted:
            obj.name = unique_name()
        elif op == "delete" and obj is not None and sa.inspect(obj).persistent:
            drive(session.delete, obj)
        elif op == "expunge" and obj is not None and obj in session:
            session.expunge(obj)
        elif op == "get":
            loaded = drive(session.get, Item, index + 1)
            if loaded is not None:
                objects.append(loaded)
        elif op == "flush":
            drive(session.flush)
        elif op == "begin_nested" and len(drive.savepoints) < 3:
            drive.begin_nested(session)
        elif op in ("release", "rollback_to") and drive.savepoints:
            savepoint = drive.savepoints.pop()
            drive(savepoint.commit if op == "release" else savepoint.rollback)
        elif op in OUTER:
            drive.savepoints.clear()
            drive(getattr(session, op))
            if op == "commit":
                drive.committed.update(id(obj) for obj in objects if sa.inspect(obj).persistent)
                drive.committed.difference_update(id(obj) for obj in objects if sa.inspect(obj).was_deleted)
    except InvalidRequestError:
        pass  # e.g. re-adding an object whose identity another instance already holds
    except (SQLAlchemyError, sa.exc.SAWarning):
        # A failed flush (a stale or conflicting row, or an identity clash that SQLAlchemy warns
        # about, an error here): the flush rolled the transaction back, so must we.
        drive.savepoints.clear()
        drive(session.rollback)


@pytest.mark.sqlite_savepoints
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=Steps)
def test_collector_sets_agree_with_inspect_after_every_step(driver: Driver, steps: list[tuple[str, int]]) -> None:
    db = driver.db
    driver.reset()
    _, token = db.registry.open()
    session = db()
    objects: list[Any] = []
    try:
        for op, index in steps:
            step(driver, session, objects, op, index)
            assert_sets_agree_with_inspect(db, objects)
    finally:
        driver(session.close)
        assert_sets_agree_with_inspect(db, objects)
        db.registry.reset(token)


@pytest.mark.sqlite_savepoints
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=InnerSteps)
def test_changes_are_exactly_what_the_transaction_wrote(
    driver: Driver, inspection_engine: Engine, steps: list[tuple[str, int]]
) -> None:
    """Applying the hooks' ``Changes`` to the rows before the transaction gives the rows after it."""
    db = driver.db
    driver.reset()
    received: list[tuple[str, Changes]] = []
    db.hooks.before_commit[:] = [lambda session, changes: received.append(("before", changes))]  # type: ignore[union-attr]
    db.hooks.after_commit[:] = [lambda changes: received.append(("after", changes))]  # type: ignore[union-attr]
    before = committed_rows(inspection_engine)
    state, token = db.registry.open()
    session = db()
    objects: list[Any] = []
    try:
        for op, index in steps:
            step(driver, session, objects, op, index)
        driver(session.commit)
        state.tracker()._run_ready()
    finally:
        driver(session.close)
        db.registry.reset(token)
    after = committed_rows(inspection_engine)
    if before == after:
        assert not received
        return
    (_, seen_before), (_, seen_after) = received
    assert [kind for kind, _ in received] == ["before", "after"]
    assert seen_after == seen_before
    assert apply(before, seen_after) == after


def apply(rows: dict[int, str], changes: Changes) -> dict[int, str]:
    """Replay *changes* on *rows*, checking every old value they claim against the rows."""
    rows = dict(rows)
    for change in changes.deleted:
        (key,) = change.identity or (None,)
        assert key in rows
        assert change.diff.get("name", (rows[key], None))[0] in (rows[key], UNKNOWN)
        del rows[key]
    for change in changes.updated:
        (key,) = change.identity or (None,)
        old, new = change.diff["name"]
        assert old in (rows[key], UNKNOWN)
        rows[key] = new
    for change in changes.inserted:
        (key,) = change.identity or (None,)
        assert key not in rows
        rows[key] = change.diff["name"][1]
    return rows


# -- the collector's sets, step by step -------------------------------------------------


@pytest.mark.anyio
async def test_sets_follow_an_object_through_its_lifecycle(db: AnyDB) -> None:
    async with scope(db):
        kept, dropped = Item(name=unique_name()), Item(name=unique_name())
        db.add_all([kept, dropped])
        assert identities(db.collector.pending) == identities([kept, dropped])
        await run(db.flush)
        assert identities(db.collector.persistent) == identities([kept, dropped])
        await run(db.delete, dropped)
        await run(db.flush)
        assert identities(db.collector.deleted) == identities([dropped])
        await run(db.commit)
        assert identities(db.collector.persistent) == identities([kept])
        # SQLAlchemy's own verdict on a committed delete varies (see semantics.md); agreeing with it is the contract.
        assert_sets_agree_with_inspect(db, [kept, dropped])
        db.expunge(kept)
        assert identities(db.collector.detached) >= identities([kept])
        db.add(kept)
        assert identities(db.collector.persistent) == identities([kept])
        rolled_back = Item(name=unique_name())
        db.add(rolled_back)
        await run(db.flush)
        await run(db.rollback)
        assert rolled_back not in db.collector.pending | db.collector.persistent | db.collector.detached
        assert_sets_agree_with_inspect(db, [kept, dropped, rolled_back])
        collector = db.collector
    assert identities(collector.detached) >= identities([kept])
    assert not collector.persistent and not collector.pending


@pytest.mark.anyio
async def test_garbage_collected_objects_leave_the_sets(db: AnyDB) -> None:
    async with scope(db):
        item = Item(name=unique_name())
        db.add(item)
        await run(db.commit)
        item_id = item.id
        db.expunge_all()
        del item
        # Not through a worker thread, which may hold on to its last result.
        loaded = await resolve(db.get(Item, item_id))
        assert len(db.collector.persistent) == 1
        assert loaded in db.collector.persistent
        del loaded
        gc.collect()
        assert len(db.collector.persistent) == 0


@pytest.mark.anyio
async def test_each_scope_has_its_own_collector(db: AnyDB) -> None:
    async with scope(db):
        outer = db.collector
        db.add(Item(name=unique_name()))
        async with scope(db):
            assert db.collector is not outer
            db.add(Item(name=unique_name()))
            assert len(db.collector.pending) == 1
        assert db.collector is outer
        assert len(outer.pending) == 1
        assert await db.collector_dependency() is outer


# -- Changes ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_changes_are_netted_per_object(db: AnyDB) -> None:
    async with scope(db):
        updated, deleted = Item(name="updated"), Item(name="deleted")
        db.add_all([updated, deleted])
    async with scope(db):
        updated = await run(db.get, Item, updated.id)
        deleted = await run(db.get, Item, deleted.id)
        inserted, short_lived = Item(name="inserted"), Item(name="short-lived")
        db.add_all([inserted, short_lived])
        updated.name, deleted.name = "updated-1", "deleted-1"
        await run(db.flush)
        inserted.name, updated.name = "inserted-2", "updated-2"
        await run(db.delete, short_lived)
        await run(db.delete, deleted)
        await run(db.flush)
        changes = db.collector.changes()
    assert [(c.obj, c.op, c.diff) for c in changes.inserted] == [
        (inserted, "insert", {"id": (None, inserted.id), "name": (None, "inserted-2")})
    ]
    assert [(c.obj, c.identity, c.diff) for c in changes.updated] == [
        (updated, (updated.id,), {"name": ("updated", "updated-2")})
    ]
    assert [(c.obj, c.identity, c.diff) for c in changes.deleted] == [
        (deleted, (deleted.id,), {"id": (deleted.id, None), "name": ("deleted", None)})
    ]
    assert len(changes) == 3 and list(changes) == [*changes.inserted, *changes.updated, *changes.deleted]
    assert changes.inserted[0].entity is Item and changes.inserted[0].statement is None


@pytest.mark.anyio
async def test_a_value_set_back_to_what_it_was_is_no_update(db: AnyDB) -> None:
    async with scope(db):
        item = Item(name="same")
        db.add(item)
        assert identities(db.collector.pending) == identities([item])
    async with scope(db):
        assert not db.collector.persistent, "no session yet"
        item = await run(db.get, Item, item.id)
        item.name = "changed"
        item.name = "same"
        await run(db.flush)
        assert not db.collector.changes()


@pytest.mark.anyio
async def test_update_of_an_unloaded_attribute_has_an_unknown_old_value(db: AnyDB) -> None:
    async with scope(db):
        item = Item(name="before")
        db.add(item)
    async with scope(db):
        item = await run(db.get, Item, item.id)
        db.expire(item, ["name"])
        item.name = "after"
        await run(db.flush)
        (change,) = db.collector.changes().updated
    assert change.diff == {"name": (UNKNOWN, "after")}
    assert repr(UNKNOWN) == "UNKNOWN"


@pytest.mark.anyio
@pytest.mark.sqlite_savepoints
async def test_savepoint_rollback_discards_its_writes_and_callbacks(db: AnyDB) -> None:
    ran: list[str] = []
    async with scope(db):
        db.add(Item(name="outer"))
        db.on_commit(lambda: ran.append("outer"))
        savepoint: Any = await resolve(db.begin_nested())
        db.add(Item(name="released"))
        db.on_commit(lambda: ran.append("released"))
        await run(savepoint.commit)
        savepoint = await resolve(db.begin_nested())
        db.add(Item(name="undone"))
        db.on_commit(lambda: ran.append("undone"))
        await run(db.flush)
        await run(savepoint.rollback)
        names = [change.diff["name"][1] for change in db.collector.changes().inserted]
    assert names == ["outer", "released"]
    assert ran == ["outer", "released"]


@pytest.mark.anyio
async def test_reading_a_change_emits_no_sql_even_after_expiry_and_close(
    engine: Engine | AsyncEngine, tmp_path: Path
) -> None:
    # expire_on_commit=True: reading the objects' attributes now would need SQL.
    db = build(engine, Session, expire_on_commit=True)
    statements: list[str] = []
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    sa.event.listen(sync_engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    received: list[Changes] = []
    db.after_commit(received.append)
    async with scope(db):
        db.add(Item(name="expired"))
    (changes,) = received
    statements.clear()
    (change,) = changes.inserted
    assert (change.entity, change.op, change.diff["name"]) == (Item, "insert", (None, "expired"))
    assert change.identity == (change.diff["id"][1],)
    assert change.obj is not None and change.criteria is None
    assert statements == []


@pytest.mark.anyio
async def test_bulk_statements_are_reported(db: AnyDB) -> None:
    items = [Item(name=f"bulk-{n}") for n in range(4)]
    async with scope(db):
        db.add_all(items)
    async with scope(db):
        criteria = Item.name == "bulk-0"
        await run(db.execute, sa.update(Item).where(criteria).values(name="renamed"))
        await run(db.execute, sa.update(Item), [{"id": items[1].id, "name": "by-key"}])
        await run(db.execute, sa.delete(Item).where(Item.name == "bulk-3"))
        await run(db.execute, sa.insert(Item), [{"name": "bulk-new"}])
        changes = db.collector.changes()
    where, by_key = changes.updated
    assert (where.obj, where.entity, where.identity, where.op) == (None, Item, None, "update")
    assert where.criteria is not None and where.criteria.compare(criteria)
    assert (by_key.identity, by_key.diff) == ((items[1].id,), {"name": (UNKNOWN, "by-key")})
    (deleted,) = changes.deleted
    assert deleted.entity is Item and deleted.criteria is not None and deleted.statement is not None
    (inserted,) = changes.inserted
    assert (inserted.identity, inserted.diff) == (None, {"name": (None, "bulk-new")})


@pytest.mark.anyio
@pytest.mark.parametrize("backend", SQLITE_BACKENDS, ids=lambda b: b.id, indirect=True)
async def test_a_failed_bulk_statement_is_not_reported(db: AnyDB) -> None:
    # SQLite only: there the transaction survives a failed statement (PostgreSQL aborts it).
    async with scope(db):
        db.add_all([Item(name="a"), Item(name="b")])
    async with scope(db):
        with pytest.raises(sa.exc.IntegrityError):
            await run(db.execute, sa.update(Item).where(Item.name == "b").values(name="a"))
        assert not db.collector.changes()


# -- hooks through the middleware -------------------------------------------------------


def audit(session: Session, changes: Changes) -> None:
    """The audit recipe: one ``AuditLog`` row per change, in the transaction that made it."""
    for change in changes:
        diff = {key: [_plain(old), _plain(new)] for key, (old, new) in change.diff.items()}
        session.add(
            AuditLog(entity=change.entity.__name__, identity=json.dumps(change.identity), op=change.op, diff=diff)
        )


def _plain(value: Any) -> Any:
    return None if value is UNKNOWN else value


def make_app(db: AnyDB, log: list[str]) -> Starlette:
    """Routes that write, then answer with a status, and report what their collector saw."""

    async def create(request: Request) -> Response:
        name = request.path_params["name"]
        db.add(Item(name=name))
        db.on_commit(lambda: log.append(f"on_commit {name}"))
        await run(db.flush)
        if request.query_params.get("fail") == "404":
            raise HTTPException(404)
        return JSONResponse({"persistent": sorted(obj.name for obj in db.collector.persistent)})

    async def batch(request: Request) -> Response:
        prefix = request.path_params["prefix"]
        seed = await run(db.scalar, sa.select(Item).where(Item.name == f"{prefix}-seed"))
        seed.name = f"{prefix}-renamed"
        db.add_all([Item(name=f"{prefix}-{n}") for n in range(3)])
        await anyio.sleep(0)
        pending = sorted(obj.name for obj in db.collector.pending)
        # One flush: on SQLite a second one would wait for the write lock in a worker thread.
        await run(db.flush)
        await anyio.sleep(0)
        changes = db.collector.changes()
        db.on_commit(lambda: log.append(prefix))
        return JSONResponse(
            {
                "pending": pending,
                "inserted": sorted(change.diff["name"][1] for change in changes.inserted),
                "updated": [change.diff["name"] for change in changes.updated],
            }
        )

    async def commit_then_404(request: Request) -> Response:
        db.add(Item(name="committed early"))
        db.on_commit(lambda: log.append("early commit"))
        await run(db.commit)
        db.on_commit(lambda: log.append("never"))
        raise HTTPException(404)

    async def no_database(request: Request) -> Response:
        db.on_commit(lambda: log.append("no database"))
        return PlainTextResponse("ok", status_code=int(request.query_params.get("status", "200")))

    routes = [
        Route("/items/{name}", create, methods=["POST"]),
        Route("/batch/{prefix}", batch, methods=["POST"]),
        Route("/commit-then-404", commit_then_404, methods=["POST"]),
        Route("/no-database", no_database),
    ]
    return Starlette(routes=routes, middleware=[Middleware(DBSessionMiddleware, db=db)])


def audit_rows(engine: Engine) -> list[tuple[str, str, str, dict[str, Any]]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(AuditLog.entity, AuditLog.identity, AuditLog.op, AuditLog.diff).order_by("id"))
        return [tuple(row) for row in rows]  # type: ignore[misc]


@pytest.mark.anyio
async def test_audit_rows_commit_with_the_data_and_vanish_on_rollback(
    db: AnyDB, inspection_engine: Engine, transport: str
) -> None:
    calls: list[Changes] = []
    after: list[Changes] = []
    db.before_commit(lambda session, changes: calls.append(changes))
    db.before_commit(audit)
    db.after_commit(after.append)
    log: list[str] = []
    async with http_client(make_app(db, log), transport) as client:
        assert (await client.post("/items/kept")).status_code == 200
        assert (await client.post("/items/dropped?fail=404")).status_code == 404
    assert committed_names(inspection_engine) == {"kept"}
    with inspection_engine.connect() as conn:
        kept = conn.scalar(sa.select(Item.id))
    assert audit_rows(inspection_engine) == [
        ("Item", f"[{kept}]", "insert", {"id": [None, kept], "name": [None, "kept"]})
    ]
    # The hook ran once: its own audit rows did not trigger it again, but they are what after_commit sees too.
    assert len(calls) == 1 and [c.entity for c in after[0].inserted] == [Item, AuditLog]
    assert log == ["on_commit kept"]


@pytest.mark.anyio
async def test_a_failing_before_commit_hook_aborts_the_commit_with_a_500(
    db: AnyDB, inspection_engine: Engine, engine: Engine | AsyncEngine, transport: str
) -> None:
    @db.before_commit
    def refuse(session: Session, changes: Changes) -> None:
        audit(session, changes)
        raise RuntimeError("audit store unavailable")

    log: list[str] = []
    async with http_client(make_app(db, log), transport) as client:
        response = await client.post("/items/refused")
    assert response.status_code == 500
    assert committed_names(inspection_engine) == set()
    assert audit_rows(inspection_engine) == []
    assert log == []
    assert checked_out(engine) == 0


@pytest.mark.anyio
async def test_after_commit_hook_failures_are_logged_and_the_rest_still_run(
    db: AnyDB, inspection_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []

    @db.after_commit
    def broken(changes: Changes) -> None:
        raise RuntimeError("webhook down")

    @db.after_commit
    def working(changes: Changes) -> None:
        ran.append(f"after_commit {[c.diff['name'][1] for c in changes.inserted]}")

    log: list[str] = []
    async with http_client(make_app(db, log), "asgi") as client:
        response = await client.post("/items/committed")
    assert response.status_code == 200
    assert committed_names(inspection_engine) == {"committed"}
    assert ran == ["after_commit ['committed']"]
    assert log == ["on_commit committed"]
    assert "After-commit hook" in caplog.text and "webhook down" in caplog.text


@pytest.mark.anyio
@pytest.mark.parametrize("backend", ASYNC_BACKENDS, ids=lambda b: b.id, indirect=True)
async def test_async_after_commit_hooks_and_callbacks_are_awaited(engine: AsyncEngine) -> None:
    db = AsyncScopedSession(engine)
    ran: list[str] = []

    @db.after_commit
    async def notify(changes: Changes) -> None:
        await anyio.sleep(0)
        ran.append(f"hook {len(changes)}")

    async def callback() -> None:
        await anyio.sleep(0)
        ran.append("callback")

    async with db.scope():
        db.add(Item(name="x"))
        db.on_commit(callback)
    assert ran == ["hook 1", "callback"]


@pytest.mark.anyio
@pytest.mark.parametrize("backend", SYNC_BACKENDS, ids=lambda b: b.id, indirect=True)
async def test_sync_registry_refuses_coroutine_hooks(db: ScopedSession[Session]) -> None:
    async def hook(changes: Changes) -> None: ...

    with pytest.raises(TypeError, match=r"a 'ScopedSession' runs its hooks synchronously"):
        db.after_commit(hook)
    with db.scope(), pytest.raises(TypeError, match=r"Register a plain function"):
        db.on_commit(hook)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_before_commit_hooks_must_be_plain_functions(db: AnyDB) -> None:
    async def hook(session: Session, changes: Changes) -> None: ...

    with pytest.raises(TypeError, match=r"'before_commit' hooks run inside the COMMIT, synchronously"):
        db.before_commit(hook)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_on_commit_follows_the_outcome_of_the_request(
    db: AnyDB, inspection_engine: Engine, transport: str
) -> None:
    log: list[str] = []
    async with http_client(make_app(db, log), transport) as client:
        assert (await client.post("/commit-then-404")).status_code == 404
        assert (await client.get("/no-database")).status_code == 200
        assert (await client.get("/no-database?status=400")).status_code == 400
        # Callbacks run once a response has been sent: through uvicorn, after the client has it.
        with anyio.fail_after(10):
            while len(log) < 2:
                await anyio.sleep(0.01)
    # The explicit commit's callback ran although the request then rolled back; the later one did not.
    assert sorted(log) == ["early commit", "no database"]
    assert committed_names(inspection_engine) == {"committed early"}


@pytest.mark.anyio
async def test_on_commit_in_a_scope_is_discarded_when_the_scope_fails(db: AnyDB) -> None:
    ran: list[str] = []
    with pytest.raises(RuntimeError):
        async with scope(db):
            db.add(Item(name="x"))
            db.on_commit(lambda: ran.append("failed scope"))
            raise RuntimeError
    async with scope(db, commit=False):
        db.on_commit(lambda: ran.append("commit=False"))
    async with scope(db):
        db.doom()
        db.on_commit(lambda: ran.append("doomed"))
    async with scope(db):
        db.on_commit(lambda: ran.append("committed"))
    assert ran == ["committed"]


@pytest.mark.anyio
async def test_hooks_of_an_explicit_commit_run_even_if_the_scope_then_fails(db: AnyDB) -> None:
    received: list[Changes] = []
    db.after_commit(received.append)
    with pytest.raises(RuntimeError):
        async with scope(db):
            db.add(Item(name="committed"))
            await run(db.commit)
            db.add(Item(name="rolled back"))
            raise RuntimeError
    assert [[c.diff["name"][1] for c in changes.inserted] for changes in received] == [["committed"]]


@pytest.mark.anyio
async def test_concurrent_requests_each_see_only_their_own_rows(
    db: AnyDB, inspection_engine: Engine, transport: str
) -> None:
    prefixes = [f"r{n}" for n in range(100)]
    async with scope(db):
        db.add_all([Item(name=f"{prefix}-seed") for prefix in prefixes])
    received: list[Changes] = []
    db.after_commit(received.append)
    log: list[str] = []
    responses: dict[str, Any] = {}
    # Sync sessions wait for a pooled connection in a worker thread: with fewer threads than
    # requests, the waiters could starve the requests that hold connections (FastAPI #5122).
    anyio.to_thread.current_default_thread_limiter().total_tokens = 110
    async with http_client(make_app(db, log), transport) as client:

        async def request(prefix: str) -> None:
            response = await client.post(f"/batch/{prefix}")
            assert response.status_code == 200
            responses[prefix] = response.json()

        async with anyio.create_task_group() as tg:
            for prefix in prefixes:
                tg.start_soon(request, prefix)
    assert sorted(responses) == sorted(prefixes)
    for prefix, seen in responses.items():
        own = [f"{prefix}-{n}" for n in range(3)]
        assert seen["pending"] == own
        assert seen["inserted"] == own
        assert seen["updated"] == [[f"{prefix}-seed", f"{prefix}-renamed"]]
    hooked = {
        (frozenset(c.diff["name"][1] for c in changes.inserted), tuple(c.diff["name"] for c in changes.updated))
        for changes in received
    }
    assert hooked == {(frozenset(f"{p}-{n}" for n in range(3)), ((f"{p}-seed", f"{p}-renamed"),)) for p in prefixes}
    assert sorted(log) == sorted(prefixes)
    assert len(committed_names(inspection_engine)) == 400


# -- tracking off, and sessions made elsewhere --------------------------------------------


@pytest.mark.anyio
async def test_tracking_off_has_no_collector_or_hooks(engine: Engine | AsyncEngine) -> None:
    db: AnyDB = (
        AsyncScopedSession(engine, track_changes=False)
        if isinstance(engine, AsyncEngine)
        else ScopedSession(engine, track_changes=False)
    )
    with pytest.raises(TrackingDisabledError, match=r"track_changes=True"):
        db.before_commit(audit)
    with pytest.raises(TrackingDisabledError):
        db.after_commit(print)
    async with scope(db):
        session = db()
        sync = session.sync_session if isinstance(session, AsyncSession) else session
        assert not isinstance(sync, _TrackedSession)
        with pytest.raises(TrackingDisabledError):
            db.collector  # noqa: B018
        with pytest.raises(TrackingDisabledError):
            db.on_commit(print)
        db.add(Item(name="untracked"))


@pytest.mark.anyio
async def test_sessions_made_elsewhere_are_untouched(engine: Engine | AsyncEngine, db: AnyDB) -> None:
    db.after_commit(lambda changes: pytest.fail("a foreign session reached the hooks"))
    assert not sa.event.contains(Session, "after_flush", _after_flush)
    if isinstance(engine, AsyncEngine):
        async with AsyncSession(engine) as foreign:
            foreign.add(Item(name="elsewhere"))
            await foreign.commit()
    else:
        with Session(engine) as session:
            session.add(Item(name="elsewhere"))
            session.commit()
    async with scope(db):
        session = db()
        sync = session.sync_session if isinstance(session, AsyncSession) else session
        assert isinstance(sync, _TrackedSession)


@pytest.mark.anyio
async def test_a_deleted_object_inserted_again_is_a_delete_and_an_insert(db: AnyDB) -> None:
    item = Item(name="reborn")
    async with scope(db):
        db.add(item)
    async with scope(db):
        db.add(item)
        await run(db.delete, item)
        await run(db.flush)
        make_transient(item)
        db.add(item)
        await run(db.flush)
        changes = db.collector.changes()
    assert [(c.op, c.obj) for c in changes] == [("insert", item), ("delete", item)]


@pytest.mark.anyio
async def test_a_session_made_from_the_factory_outside_a_scope_is_not_tracked(db: AnyDB) -> None:
    ran: list[str] = []
    db.before_commit(lambda session, changes: ran.append("before_commit"))
    db.after_commit(lambda changes: ran.append("after_commit"))
    session = db.session_factory()
    item = Item(name="unscoped")
    session.add(item)
    savepoint: Any = await resolve(session.begin_nested())
    await run(savepoint.commit)
    await run(session.execute, sa.update(Item).values(name="renamed"))
    await run(session.commit)
    await run(session.delete, item)
    await run(session.commit)
    await run(session.rollback)
    await run(session.close)
    assert ran == []
