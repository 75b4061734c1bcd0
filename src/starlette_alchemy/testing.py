"""Transactional tests for apps that use a registry: whatever a test commits is rolled back after it.

``rolled_back(db)`` (``arolled_back(db)`` for an ``AsyncScopedSession``) binds a
registry to one connection inside a transaction that is rolled back when the
block ends. Every session the registry creates meanwhile, through
``DBSessionMiddleware``, ``db.scope()`` or a hook, joins that transaction with
``join_transaction_mode="create_savepoint"``, so its COMMIT only releases a
SAVEPOINT. ``capture_on_commit(db)`` records the after-commit work of the
transactions that commit, and ``assert_changes()`` compares one transaction's
``Changes`` with what a test expects; ``assert_max_queries(n)`` and
``count_queries()`` count the statements scopes run (queries.py). The pytest
fixtures in ``starlette_alchemy.pytest_plugin`` wrap them.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, async_sessionmaker
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from .changes import Change, Changes
from .lifecycle import AfterCommitCall
from .queries import QueryCounter, assert_max_queries, count_queries
from .registry import ScopeState
from .scoped import AsyncScopedSession, ScopedSession
from .sessions import _STATE_KEY

__all__ = [
    "AfterCommitRecord",
    "CapturedCommits",
    "LostCommitWarning",
    "QueryCounter",
    "arolled_back",
    "assert_changes",
    "assert_max_queries",
    "capture_on_commit",
    "count_queries",
    "rolled_back",
]

_WRONG_KIND = (
    "{function}() takes {expected}; {got} is {kind}. Use {other}() instead (the {fixture!r} fixture, in pytest)."
)
_NOT_ONE_ENGINE = (
    "{function}() needs a registry whose sessions are bound to one engine, but its session factory has bind={bind!r}. "
    "Create the registry from an engine, or from a sessionmaker with 'bind=engine'."
)
_ALREADY_BOUND = (
    "This registry is already bound to a test connection, by an enclosing rolled_back() or arolled_back(). "
    "Open only one per registry at a time."
)
_COMMITTED = (
    "Something was committed for real on the test's connection, so it could not be rolled back: the test ended "
    "the connection's transaction (commit() or rollback() on it), and a session then committed one of its own. "
    "Leave the transaction of the connection that rolled_back() yields alone."
)
_ROLLED_BACK = (
    "The test rolled back the transaction of the connection that rolled_back() yields (rollback() on it), so "
    "everything the app had written before that vanished mid-test. Leave that transaction alone; to undo a step, "
    "use a SAVEPOINT ('connection.begin_nested()')."
)
_LOST = (
    "{inner} committed inside the transaction of {outer}, and {outer} then rolled back: in production the commit "
    "of {inner} survives, but here all scopes share the test's one connection, so it went into the SAVEPOINT of "
    "{outer} and was rolled back with it. Check what {inner} wrote before {outer} ends, or test this without "
    "rolled_back()."
)


class LostCommitWarning(UserWarning):
    """A scope's commit was lost in ``rolled_back()`` that would have survived in production."""


# -- rolling back everything a test commits ------------------------------------------------


@contextmanager
def rolled_back(db: ScopedSession[Any]) -> Iterator[Connection]:
    """Bind *db* to one connection for the block, and roll back everything committed through it at the end.

    Yields the connection, for reading back what the app wrote. The app must
    use it for one request at a time, since all of them share it.
    """
    if not isinstance(db, ScopedSession):
        raise TypeError(_wrong_kind("rolled_back", db))
    engine = _engine(db.session_factory, Engine, "rolled_back")
    with engine.connect() as connection:
        end = _begin_outer(connection)
        try:
            with _bound(db.session_factory, connection), _watching_scopes(db.session_factory.class_, connection):
                yield connection
        finally:
            end(connection)


@asynccontextmanager
async def arolled_back(db: AsyncScopedSession[Any]) -> AsyncIterator[AsyncConnection]:
    """Like ``rolled_back()``, for an ``AsyncScopedSession``; yields an ``AsyncConnection``.

    Run the app in the test's event loop (``httpx.ASGITransport``, or uvicorn
    started in that loop): the connection belongs to it. At the end the
    engine's pool is emptied, so no connection of this loop is handed to the
    next test, which anyio runs in a loop of its own.
    """
    if not isinstance(db, AsyncScopedSession):
        raise TypeError(_wrong_kind("arolled_back", db))
    engine = _engine(db.session_factory, AsyncEngine, "arolled_back")
    try:
        async with engine.connect() as connection:
            end = await connection.run_sync(_begin_outer)
            session_class = db.session_factory.kw["sync_session_class"]
            try:
                with (
                    _bound(db.session_factory, connection),
                    _watching_scopes(session_class, connection.sync_connection),
                ):
                    yield connection
            finally:
                await connection.run_sync(end)
    finally:
        # An asyncpg or aiosqlite connection works only in the event loop that opened it.
        await engine.dispose()


def _wrong_kind(function: str, db: object) -> str:
    if function == "rolled_back":
        expected, other, fixture = "a ScopedSession", "arolled_back", "adb_transaction"
    else:
        expected, other, fixture = "an AsyncScopedSession", "rolled_back", "db_transaction"
    kind = type(db).__name__
    return _WRONG_KIND.format(
        function=function, expected=expected, got=repr(db), kind=kind, other=other, fixture=fixture
    )


def _engine(factory: sessionmaker[Any] | async_sessionmaker[Any], kind: type[Any], function: str) -> Any:
    bind = factory.kw.get("bind")
    if isinstance(bind, Connection | AsyncConnection):
        raise RuntimeError(_ALREADY_BOUND)
    if not isinstance(bind, kind):
        raise TypeError(_NOT_ONE_ENGINE.format(function=function, bind=bind))
    return bind


def _begin_outer(connection: Connection) -> Callable[[Connection], None]:
    """Begin the transaction that the test's sessions join; return the function that rolls it back."""
    sqlite = connection.dialect.name == "sqlite"
    raw: Any = connection.connection.dbapi_connection
    recipe = False
    if sqlite:
        # The sqlite3 driver's own transaction handling breaks SAVEPOINTs: turn it off on this connection.
        isolation_level, raw.isolation_level = raw.isolation_level, None
    connection.begin()
    if sqlite and not _sqlite_in_transaction(connection):
        # Nothing emitted BEGIN, so the engine lacks SQLAlchemy's SAVEPOINT recipe: apply it to this
        # connection, for this transaction and any later one.
        recipe = True
        event.listen(connection, "begin", _begin_explicitly)
        _begin_explicitly(connection)

    # A COMMIT or ROLLBACK of the connection's own transaction, not a SAVEPOINT's: the test
    # ended the outer transaction by hand (and a session may then have committed its own).
    ended: dict[str, bool] = {}

    def record_commit(connection: Connection) -> None:
        ended["commit"] = True

    def record_rollback(connection: Connection) -> None:
        ended["rollback"] = True

    event.listen(connection, "commit", record_commit)
    event.listen(connection, "rollback", record_rollback)

    def end(connection: Connection) -> None:
        event.remove(connection, "commit", record_commit)
        event.remove(connection, "rollback", record_rollback)
        if not connection.invalidated:  # an invalidated connection took its transaction with it
            connection.rollback()
            if recipe:
                event.remove(connection, "begin", _begin_explicitly)
            if sqlite:
                raw.isolation_level = isolation_level
        if ended.get("commit"):
            raise RuntimeError(_COMMITTED)
        if ended.get("rollback"):
            raise RuntimeError(_ROLLED_BACK)

    return end


def _sqlite_in_transaction(connection: Connection) -> bool:
    return bool(connection.connection.driver_connection.in_transaction)  # type: ignore[union-attr]


def _begin_explicitly(connection: Connection) -> None:
    """The "begin" half of SQLAlchemy's SQLite SAVEPOINT recipe."""
    connection.exec_driver_sql("BEGIN")


@contextmanager
def _bound(
    factory: sessionmaker[Any] | async_sessionmaker[Any], connection: Connection | AsyncConnection
) -> Iterator[None]:
    """Make *factory* create sessions that join *connection*'s transaction, until the block ends."""
    saved = dict(factory.kw)
    factory.configure(bind=connection, join_transaction_mode="create_savepoint")
    try:
        yield
    finally:
        factory.kw.clear()
        factory.kw.update(saved)


@contextmanager
def _watching_scopes(session_class: type[Session], connection: Connection) -> Iterator[None]:
    """Warn when a scope's commit is lost with an enclosing scope's rollback, which production would keep.

    Every scope's session joins *connection* in a SAVEPOINT of its own, nested
    in those of the scopes whose transactions were open when it began. Its
    COMMIT only releases that SAVEPOINT into the enclosing one, so what it
    wrote goes wherever the enclosing scope's transaction goes.
    """
    # The sessions whose transactions are open on the connection, oldest first, with the
    # scopes whose commits were released into each.
    open_sessions: dict[Session, list[str]] = {}
    lost: list[str] = []

    def began(session: Session, transaction: SessionTransaction, bound: Connection) -> None:
        if bound is connection and session not in open_sessions:
            open_sessions[session] = []

    def committed(session: Session) -> None:
        if session in open_sessions and not session.in_nested_transaction():
            released = open_sessions.pop(session)
            if open_sessions:
                enclosing = next(reversed(open_sessions))
                open_sessions[enclosing] += [*released, _scope_name(session)]

    def ended(session: Session, transaction: SessionTransaction) -> None:
        if transaction.parent is None and session in open_sessions:
            outer = _scope_name(session)
            lost.extend(_LOST.format(inner=inner, outer=outer) for inner in open_sessions.pop(session))

    listeners: list[tuple[str, Callable[..., None]]] = [
        ("after_begin", began),
        ("after_commit", committed),
        ("after_transaction_end", ended),
    ]
    for name, listener in listeners:
        event.listen(session_class, name, listener)
    try:
        yield
    finally:
        for name, listener in listeners:
            event.remove(session_class, name, listener)
        for message in lost:
            warnings.warn(message, LostCommitWarning, stacklevel=5)


def _scope_name(session: Session) -> str:
    state: ScopeState[Any] | None = session.info.get(_STATE_KEY)
    return state.describe() if state is not None else "a session"


# -- capturing after-commit work -----------------------------------------------------------


@dataclass(frozen=True)
class AfterCommitRecord:
    """One call a committed transaction made after its COMMIT, or would have made."""

    function: Callable[..., Any]
    # What an ``after_commit`` hook receives; None for an ``on_commit`` callback.
    changes: Changes | None

    def __call__(self) -> Any:
        return self.function() if self.changes is None else self.function(self.changes)


class CapturedCommits:
    """The after-commit work of the transactions that committed inside ``capture_on_commit()``."""

    def __init__(self, *, execute: bool) -> None:
        self.execute = execute
        # One entry per committed transaction that wrote rows, in commit order.
        self.changes: list[Changes] = []
        # Every after_commit hook call and on_commit callback, in the order they were (or would be) made.
        self.calls: list[AfterCommitRecord] = []
        self._not_run: list[AfterCommitRecord] = []

    @property
    def callbacks(self) -> list[Callable[..., Any]]:
        """The ``on_commit`` callbacks, in order."""
        return [call.function for call in self.calls if call.changes is None]

    def run(self) -> None:
        """Run the recorded calls that have not run yet, in order; their errors propagate."""
        while self._not_run:
            call = self._not_run[0]
            result = call()
            if inspect.isawaitable(result):
                result.close()  # type: ignore[attr-defined]  # never awaited, so it did nothing: arun() can still
                raise TypeError(f"{call.function!r} is a coroutine function; use 'await captured.arun()'.")
            del self._not_run[0]

    async def arun(self) -> None:
        """Like ``run()``, awaiting the calls that are coroutine functions."""
        while self._not_run:
            result = self._not_run.pop(0)()
            if inspect.isawaitable(result):
                await result

    def _take(self, changes: Changes, calls: list[AfterCommitCall]) -> bool:
        """Record one committed transaction's work; return whether it runs now."""
        if changes:
            self.changes.append(changes)
        records = [AfterCommitRecord(function, args[0] if args else None) for function, args in calls]
        self.calls += records
        if not self.execute:
            # Run later by run()/arun(), and only then: callbacks they make commit again are recorded too.
            self._not_run += records
        return self.execute


@contextmanager
def capture_on_commit(
    db: ScopedSession[Any] | AsyncScopedSession[Any], *, execute: bool = False
) -> Iterator[CapturedCommits]:
    """Record the ``after_commit`` hook calls and ``on_commit`` callbacks of what commits in the block.

    With ``execute=False`` they are recorded instead of run: ``run()`` (or
    ``await arun()``) runs them later. With ``execute=True`` they also run, at
    the moment they would in production. Either way ``changes`` holds the
    ``Changes`` of each committed transaction, hooks or not.
    """
    hooks = db._hooks()
    captured = CapturedCommits(execute=execute)
    previous, hooks.capture = hooks.capture, captured._take
    try:
        yield captured
    finally:
        hooks.capture = previous


# -- asserting on Changes ------------------------------------------------------------------

Expected = Mapping[type[Any], Sequence[Mapping[str, Any]]]


def assert_changes(
    changes: Changes,
    *,
    inserted: Expected | None = None,
    updated: Expected | None = None,
    deleted: Expected | None = None,
) -> None:
    """Assert that *changes* holds exactly the expected rows; what is not mentioned must not have changed.

    Each argument maps an entity class to one dict per row, in any order. A row
    matches a dict when it has the dict's items, so generated keys can be left
    out. Inserted rows are compared with their new values, deleted rows with
    their old values, and updated rows with ``(old, new)`` pairs of the
    attributes that changed; ``unittest.mock.ANY`` matches anything.
    """
    problems = [
        problem
        for op, actual, expected in (
            ("inserted", changes.inserted, inserted),
            ("updated", changes.updated, updated),
            ("deleted", changes.deleted, deleted),
        )
        for problem in _compare(op, _rows(actual), expected or {})
    ]
    if problems:
        raise AssertionError("The changes differ from what was expected:\n  " + "\n  ".join(problems))


def _rows(changes: tuple[Change, ...]) -> dict[type[Any], list[dict[str, Any]]]:
    """Each entity's rows: new values of inserts, old values of deletes, ``(old, new)`` of updates."""
    rows: dict[type[Any], list[dict[str, Any]]] = {}
    for change in changes:
        if change.op == "insert":
            values = {key: new for key, (_, new) in change.diff.items()}
        elif change.op == "delete":
            values = {key: old for key, (old, _) in change.diff.items()}
        else:
            values = dict(change.diff)
        rows.setdefault(change.entity, []).append(values)
    return rows


def _compare(op: str, actual: dict[type[Any], list[dict[str, Any]]], expected: Expected) -> Iterator[str]:
    for entity in {**actual, **expected}:
        want, got = list(expected.get(entity, ())), actual.get(entity, [])
        if not _match(want, got):
            yield f"{op} {entity.__name__}: expected {want}, got {got}"


def _match(expected: list[Mapping[str, Any]], actual: list[dict[str, Any]]) -> bool:
    """True if each expected row matches a different actual row, and no actual row is left over."""
    if len(expected) != len(actual):
        return False
    if not expected:
        return True
    first, rest = expected[0], expected[1:]
    return any(
        _has_items(row, first) and _match(rest, actual[:index] + actual[index + 1 :])
        for index, row in enumerate(actual)
    )


def _has_items(row: Mapping[str, Any], items: Mapping[str, Any]) -> bool:
    # The expected value goes on the left, so that unittest.mock.ANY decides.
    return all(key in row and value == row[key] for key, value in items.items())
