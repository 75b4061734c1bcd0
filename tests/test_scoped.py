"""The registry: lazy per-scope sessions, scopes, doom, and proxy parity with SQLAlchemy."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from contextlib import nullcontext
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import IntegrityError, InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_scoped_session, async_sessionmaker
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from starlette_alchemy import AsyncScopedSession, NoActiveScopeError, ScopedSession
from tests.conftest import ASYNC_BACKENDS, checked_out
from tests.models import Item, Note
from tests.support import (
    AnyDB,
    build,
    committed_names,
    counting_session_class,
    delay_commit,
    resolve,
    scope,
    slow_commits,
)

pytestmark = pytest.mark.anyio


class RecordingSession(Session):
    """A Session that counts its ``close()`` calls, so tests can prove every session was closed."""

    close_calls = 0

    def close(self) -> None:
        self.close_calls += 1
        super().close()


class FailingCloseSession(Session):
    def close(self) -> None:
        super().close()
        raise RuntimeError("close failed")


def sync_session(session: Session | AsyncSession) -> Session:
    return session.sync_session if isinstance(session, AsyncSession) else session


# -- outside any scope ---------------------------------------------------------


async def test_outside_a_scope_db_raises_with_the_fix(db: AnyDB) -> None:
    with pytest.raises(NoActiveScopeError, match=r"Add 'DBSessionMiddleware' to the app, or open a scope with"):
        db()
    with pytest.raises(NoActiveScopeError):
        db.add(Item(name="x"))
    with pytest.raises(NoActiveScopeError):
        db.doom()
    with pytest.raises(NoActiveScopeError):
        db.is_doomed  # noqa: B018
    with pytest.raises(NoActiveScopeError):
        await db.dependency()
    assert not db.has()
    db.registry.clear()
    await resolve(db.remove())


async def test_no_scope_message_names_the_right_opener(engine: Engine | AsyncEngine, db: AnyDB) -> None:
    opener = "async with" if isinstance(engine, AsyncEngine) else "with"
    with pytest.raises(NoActiveScopeError, match=rf"'{opener} db\.scope\(\):'"):
        db()


@pytest.mark.parametrize(
    ("registry", "bind", "message"),
    [
        (
            "sync",
            "sqlite://",
            r"ScopedSession\(\) takes an Engine or a sessionmaker; it was given 'sqlite://' \(str\)\. "
            r"Create an engine from the URL first: ScopedSession\(create_engine\('sqlite://'\)\)",
        ),
        ("sync", "async engine", r"it was given .*\(AsyncEngine\)\. Use 'AsyncScopedSession' for it\."),
        ("sync", "async maker", r"it was given async_sessionmaker.*Use 'AsyncScopedSession' for it\."),
        (
            "async",
            "sync engine",
            r"AsyncScopedSession\(\) takes an AsyncEngine or an async_sessionmaker; it was given "
            r"Engine\(sqlite://\) \(Engine\)\. Use 'ScopedSession' for it\.",
        ),
        ("async", "sync maker", r"it was given sessionmaker.*Use 'ScopedSession' for it\."),
        (
            "async",
            "sqlite+aiosqlite://",
            r"Create an engine from the URL first: AsyncScopedSession\(create_async_engine",
        ),
        ("async", None, r"it was given None \(NoneType\)\.$"),
    ],
)
def test_a_registry_refuses_what_it_cannot_build_sessions_from(registry: str, bind: Any, message: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    binds = {
        "async engine": create_async_engine("sqlite+aiosqlite://"),
        "async maker": async_sessionmaker(),
        "sync engine": create_engine("sqlite://"),
        "sync maker": sessionmaker(),
    }
    kind: Any = ScopedSession if registry == "sync" else AsyncScopedSession
    with pytest.raises(TypeError, match=message):
        kind(binds.get(bind, bind))


def test_track_changes_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match=r"'track_changes' must be True or False; got 'no' \(str\)"):
        ScopedSession(create_engine("sqlite://"), track_changes="no")  # type: ignore[call-overload]


# -- lazy sessions ---------------------------------------------------------------


async def test_session_is_created_lazily_once_per_scope(db: AnyDB, engine: Engine | AsyncEngine) -> None:
    async with scope(db):
        assert not db.has()
        session = db()
        assert db.has()
        assert db() is session
        assert await db.dependency() is session
        assert checked_out(engine) == 0, "creating a session must not check out a connection"


async def test_scope_that_never_uses_db_creates_no_session(engine: Engine | AsyncEngine) -> None:
    created: list[Session] = []
    db = build(engine, counting_session_class(created))
    async with scope(db):
        pass
    assert created == []


async def test_engine_built_factory_does_not_expire_on_commit(db: AnyDB) -> None:
    assert db.session_factory.kw["expire_on_commit"] is False


async def test_given_factory_keeps_its_configuration(engine: Engine | AsyncEngine) -> None:
    db = build(engine, RecordingSession, expire_on_commit=True, info={"tag": "mine"})
    async with scope(db):
        session = sync_session(db())
        assert isinstance(session, RecordingSession)
        assert session.expire_on_commit is True
        assert session.info["tag"] == "mine"


async def test_keyword_arguments_create_the_scope_session_once(db: AnyDB) -> None:
    async with scope(db):
        session = db(autoflush=False)
        assert db() is session and not session.autoflush
        with pytest.raises(InvalidRequestError, match="Scoped session is already present"):
            db(autoflush=True)


async def test_remove_closes_and_forgets_the_session(engine: Engine | AsyncEngine) -> None:
    db = build(engine, RecordingSession)
    async with scope(db):
        first = db()
        await resolve(db.execute(sa.select(1)))
        await resolve(db.remove())
        assert sync_session(first).close_calls == 1  # type: ignore[attr-defined]
        assert checked_out(engine) == 0
        assert not db.has()
        assert db() is not first


# -- scope outcomes --------------------------------------------------------------


async def test_scope_commits_on_clean_exit(db: AnyDB, inspection_engine: Engine) -> None:
    async with scope(db):
        db.add(Item(name="kept"))
    assert committed_names(inspection_engine) == {"kept"}


async def test_scope_rolls_back_and_reraises_on_error(db: AnyDB, inspection_engine: Engine) -> None:
    with pytest.raises(ZeroDivisionError):
        async with scope(db):
            db.add(Item(name="lost"))
            await resolve(db.flush())
            1 / 0  # noqa: B018
    assert committed_names(inspection_engine) == set()


async def test_scope_without_commit_rolls_back(db: AnyDB, inspection_engine: Engine) -> None:
    async with scope(db, commit=False):
        db.add(Item(name="lost"))
        await resolve(db.flush())
    assert committed_names(inspection_engine) == set()


async def test_doomed_scope_rolls_back(db: AnyDB, inspection_engine: Engine) -> None:
    async with scope(db):
        assert not db.is_doomed
        db.add(Item(name="lost"))
        db.doom()
        assert db.is_doomed
    assert committed_names(inspection_engine) == set()


async def test_scope_closes_its_session_on_every_path(engine: Engine | AsyncEngine) -> None:
    db = build(engine, RecordingSession)
    sessions = []
    for fail in (False, True):
        with pytest.raises(KeyError) if fail else nullcontext():
            async with scope(db):
                sessions.append(sync_session(db()))
                await resolve(db.execute(sa.select(1)))
                if fail:
                    raise KeyError("boom")
    assert [s.close_calls for s in sessions] == [1, 1]  # type: ignore[attr-defined]
    assert checked_out(engine) == 0


async def test_failed_commit_raises_from_the_scope_and_releases_the_connection(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine
) -> None:
    async with scope(db):
        db.add(Item(name="dup"))
    with pytest.raises(IntegrityError):
        async with scope(db):
            db.add(Item(name="dup"))
    assert checked_out(engine) == 0
    assert committed_names(inspection_engine) == {"dup"}


async def test_failed_commit_never_returns_its_connection_to_the_pool(
    db: AnyDB, engine: Engine | AsyncEngine, inspection_engine: Engine
) -> None:
    for attempt in range(2):
        with pytest.raises(IntegrityError):
            async with scope(db):
                db.add(Note(item_id=31337))  # a deferred foreign key: the flush passes, COMMIT fails
        async with scope(db):
            # A pooled connection still inside the failed transaction would fail this COMMIT.
            db.add(Item(name=f"after {attempt}"))
        assert checked_out(engine) == 0
    assert committed_names(inspection_engine) == {"after 0", "after 1"}


async def test_close_error_after_an_error_is_logged_not_raised(
    engine: Engine | AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    db = build(engine, FailingCloseSession)
    with pytest.raises(KeyError, match="original"):
        async with scope(db):
            db()
            raise KeyError("original")
    assert "Error while closing the session after an error" in caplog.text
    assert "close failed" in caplog.text


async def test_close_error_on_a_clean_exit_is_raised(engine: Engine | AsyncEngine) -> None:
    db = build(engine, FailingCloseSession)
    with pytest.raises(RuntimeError, match="close failed"):
        async with scope(db):
            db()
    assert not db.registry._var.get(), "the scope must be reset even when close fails"


async def test_scope_is_reset_after_exit(db: AnyDB) -> None:
    async with scope(db):
        db()
    with pytest.raises(NoActiveScopeError):
        db()


async def test_nested_scopes_are_independent(db: AnyDB, inspection_engine: Engine) -> None:
    with pytest.raises(LookupError):
        async with scope(db):
            outer = db()
            outer.add(Item(name="outer"))
            async with scope(db):
                inner = db()
                assert inner is not outer
                inner.add(Item(name="inner"))
            assert db() is outer, "the outer scope must be restored"
            await resolve(db.flush())
            raise LookupError("outer fails")
    assert committed_names(inspection_engine) == {"inner"}


async def test_cancelled_scope_never_commits_and_still_closes(
    engine: Engine | AsyncEngine, inspection_engine: Engine
) -> None:
    db = build(engine, RecordingSession)
    sessions = []
    with anyio.move_on_after(0.05):
        async with scope(db):
            sessions.append(sync_session(db()))
            db.add(Item(name="cancelled"))
            await resolve(db.flush())
            await anyio.sleep(5)
    assert sessions[0].close_calls == 1  # type: ignore[attr-defined]
    assert checked_out(engine) == 0
    assert committed_names(inspection_engine) == set()


@pytest.mark.parametrize("backend", ASYNC_BACKENDS, indirect=True, ids=lambda b: b.id)
@pytest.mark.parametrize("kind", ["asyncio", "anyio"])
async def test_a_scope_cancelled_mid_commit_completes_the_commit(
    engine: AsyncEngine, inspection_engine: Engine, kind: str
) -> None:
    db = AsyncScopedSession(engine)
    ran: list[str] = []

    async def write() -> None:
        async with db.scope():
            db.add(Item(name="committed late"))
            db.on_commit(lambda: ran.append("on_commit"))
            await delay_commit(db, 0.5)

    with slow_commits(engine), pytest.raises(TimeoutError):
        if kind == "asyncio":
            async with asyncio.timeout(0.2):
                await write()
        else:
            with anyio.fail_after(0.2):
                await write()
    assert committed_names(inspection_engine) == {"committed late"}
    assert ran == ["on_commit"]
    assert checked_out(engine) == 0


async def test_a_scope_that_ended_refuses_code_that_outlived_it(db: AnyDB, engine: Engine | AsyncEngine) -> None:
    async with scope(db):
        session = db()
        await resolve(db.execute(sa.select(1)))
        context = contextvars.copy_context()
    with pytest.raises(NoActiveScopeError, match="This scope has ended"):
        context.run(db)
    with pytest.raises(NoActiveScopeError, match="This scope has ended"):
        await resolve(session.execute(sa.select(1)))
    assert not context.run(db.has)
    assert checked_out(engine) == 0


async def test_a_connection_acquired_after_the_scope_ended_goes_back_at_once(
    db: AnyDB, engine: Engine | AsyncEngine
) -> None:
    # Another task's query began before the scope ended and gets its connection after: the
    # end lands during the checkout here, deterministically.
    pool_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine

    async with scope(db, commit=False):
        state = db.registry.current()
        session = db()

        def end_now(*args: Any) -> None:
            state.sealed = state.ended = True

        sa.event.listen(pool_engine, "checkout", end_now, once=True)
        with pytest.raises(NoActiveScopeError, match="This scope has ended"):
            await resolve(session.execute(sa.select(1)))
        assert checked_out(engine) == 0
        state.sealed = state.ended = False
    assert checked_out(engine) == 0


# -- threads and tasks -------------------------------------------------------------


async def test_session_created_in_a_worker_thread_is_the_owners(engine: Engine | AsyncEngine) -> None:
    db = build(engine, RecordingSession)
    async with scope(db):
        created = await anyio.to_thread.run_sync(db)
        assert db() is created
    assert sync_session(created).close_calls == 1  # type: ignore[attr-defined]


async def test_concurrent_tasks_get_distinct_sessions_all_closed(engine: Engine | AsyncEngine) -> None:
    db = build(engine, RecordingSession)
    sessions: list[Session] = []

    async def one_request() -> None:
        async with scope(db):
            mine = sync_session(db())
            sessions.append(mine)
            await anyio.sleep(0)
            assert sync_session(db()) is mine, "another task's session leaked into this scope"
            if isinstance(db, AsyncScopedSession):
                await db.execute(sa.select(1))

    async with anyio.create_task_group() as tg:
        for _ in range(500):
            tg.start_soon(one_request)
    assert len({id(s) for s in sessions}) == 500
    assert all(s.close_calls == 1 for s in sessions)  # type: ignore[attr-defined]
    assert checked_out(engine) == 0


# -- proxies -----------------------------------------------------------------------


class _Returned:
    """What the spy session returns: awaitable (async proxies) and identifiable (sync proxies)."""

    def __await__(self) -> Any:
        return self
        yield  # pragma: no cover


class SpySession:
    """Stands in for a session to prove that each proxy reaches the current scope's session."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.returned = _Returned()

    def __getattr__(self, name: str) -> Any:
        self.calls.append(name)
        return lambda *args, **kw: self.returned

    def __contains__(self, item: object) -> bool:
        self.calls.append("__contains__")
        return True

    def __iter__(self) -> Any:
        self.calls.append("__iter__")
        return iter([self.returned])


PAIRS = [(ScopedSession, scoped_session), (AsyncScopedSession, async_scoped_session)]


def proxied_names(base: type) -> list[str]:
    """The names that SQLAlchemy's generated proxy code forwards to ``self._proxied``."""
    names = []
    for name, value in vars(base).items():
        code = getattr(getattr(value, "fget", value), "__code__", None)
        if code is not None and "_proxied" in code.co_names and name != "_proxied":
            names.append(name)
    return sorted(names)


@pytest.mark.parametrize(
    ("ours", "base"), [(ScopedSession, scoped_session), (AsyncScopedSession, async_scoped_session)]
)
def test_no_sqlalchemy_proxy_is_shadowed(ours: type, base: type) -> None:
    assert len(proxied_names(base)) > 40
    own = [vars(cls) for cls in ours.__mro__ if cls.__module__.startswith("starlette_alchemy.")]
    shadowed = [name for name in vars(base) if not name.startswith("__") and any(name in names for names in own)]
    # db.info is the scope's own dict (DESIGN section 6); db().info is still the session's.
    assert shadowed == [*BY_DESIGN], "a name of SQLAlchemy's scoped session is overridden"


BY_DESIGN = ("info",)


@pytest.mark.parametrize(
    ("ours", "base"), [(ScopedSession, scoped_session), (AsyncScopedSession, async_scoped_session)]
)
async def test_every_proxy_reaches_the_scope_session(ours: type, base: type) -> None:
    db = ours(sessionmaker() if ours is ScopedSession else async_sessionmaker())
    for name in proxied_names(base):
        if name in BY_DESIGN:
            continue
        spy = SpySession()
        state, token = db.registry.open()
        try:
            state.session = spy
            attr = getattr(base, name)
            if isinstance(attr, property):
                getattr(db, name)
                assert spy.calls == [name], name
                continue
            params = list(inspect.signature(attr).parameters.values())[1:]
            args = [object() for p in params if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
            result = await resolve(getattr(db, name)(*args))
            assert spy.calls == [name], name
            if name not in ("__contains__", "__iter__"):
                assert result is spy.returned, name
        finally:
            db.registry.reset(token)


async def test_session_methods_work_through_the_proxy(db: AnyDB, inspection_engine: Engine) -> None:
    async with scope(db):
        item = Item(name="a")
        db.add(item)
        db.add_all([Item(name="b")])
        assert item in db and item in db.new
        await resolve(db.flush())
        assert await resolve(db.get(Item, item.id)) is item
        assert await resolve(db.get_one(Item, item.id)) is item
        assert await resolve(db.scalar(sa.select(sa.func.count()).select_from(Item))) == 2
        assert set((await resolve(db.scalars(sa.select(Item.name)))).all()) == {"a", "b"}
        assert (await resolve(db.execute(sa.select(Item.name).where(Item.id == item.id)))).scalar_one() == "a"
        item.name = "a2"
        assert item in db.dirty and db.is_modified(item)
        await resolve(db.refresh(item))
        assert item.name == "a"
        merged = await resolve(db.merge(Item(id=item.id, name="a3")))
        assert merged is item and item.name == "a3"
        await resolve(db.delete(item))
        await resolve(db.flush())
        assert item in db.deleted or item not in db.identity_map.values()
        async with _nested(db):
            db.add(Item(name="in-savepoint"))
        db.expire_all()
        db.expunge_all()
        assert db.is_active and db.info is not db().info  # the scope's own dict; the session's
        with db.no_autoflush:
            db.add(Item(name="c"))
        assert db.get_bind() is not None and db.bind is not None
        connection: Any = db.connection()
        assert await resolve(connection) is not None
    assert committed_names(inspection_engine) == {"b", "in-savepoint", "c"}


async def test_rollback_and_commit_through_the_proxy(db: AnyDB, inspection_engine: Engine) -> None:
    async with scope(db):
        db.add(Item(name="rolled-back"))
        await resolve(db.rollback())
        db.add(Item(name="committed"))
        await resolve(db.commit())
        db.add(Item(name="closed"))
        await resolve(db.close())
    assert committed_names(inspection_engine) == {"committed"}


async def test_configure_applies_to_later_sessions(db: AnyDB) -> None:
    db.configure(autoflush=False)
    async with scope(db):
        assert db().autoflush is False


def test_query_property_uses_the_current_scope(tmp_path: Any) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'q.db'}")
    Item.metadata.create_all(engine)
    db = ScopedSession(engine)
    query = db.query_property()
    with db.scope():
        db.add(Item(name="q"))
        db.flush()
        assert [i.name for i in query.__get__(None, Item)] == ["q"]
    engine.dispose()


# -- helpers -------------------------------------------------------------------------


class _nested:
    """``begin_nested()`` as an async context manager for either kind of registry."""

    def __init__(self, db: AnyDB) -> None:
        self.db = db

    async def __aenter__(self) -> None:
        self.tx: Any = await resolve(self.db.begin_nested())

    async def __aexit__(self, *exc: object) -> None:
        await resolve(self.tx.commit())
