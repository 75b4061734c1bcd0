"""The Session classes behind every session a registry creates, and what they refuse.

A scope's session follows its scope: once the response has started, the
scope is *sealed* and its session may read but not write; once the scope has
ended, its session may not be used at all, through the registry or through a
reference kept by code that outlived the request. The scope's ``ScopeState``
is found in ``session.info``; sessions made anywhere else are untouched.
``_RoutedScopeSession`` (read replicas) and ``_MeteredScopeSession``
(statistics) add what only some registries need; factories.py combines them.
"""

from __future__ import annotations

import threading
from functools import partial
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, event
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction

from .ending import _owns
from .exceptions import NoActiveScopeError, ReadOnlyTransactionError, SessionSealedError
from .observe import Meter, watch
from .policy import BeginScope, begin, warn_once
from .routing import Route

# Where a session created by a registry keeps the ScopeState that owns it.
_STATE_KEY = "starlette_alchemy.scope"


class _Scope(BeginScope, Protocol):
    """What the guards read and write of the ``ScopeState`` (registry.py) that owns a session."""

    characteristics: dict[str, Any] | None
    read_only_at_begin: bool
    began: dict[Engine, SessionTransaction] | None
    sealed: bool
    ended: bool
    read_only: bool
    raw_sql: bool
    wrote: bool
    loop_thread: int | None
    meter: Meter | None
    route: Route | None


_SEALED = (
    "The response has already started, so this request's session is sealed and may not write. "
    "Write in a scope of its own: 'with db.scope():' ('async with' for AsyncScopedSession)."
)
_READ_ONLY = (
    "The transaction of {scope} is read-only, so its session may not write. "
    "Drop 'read_only=True' from its '@transaction(...)' (or 'db.scope(...)'), or write in a scope of its own."
)
_ENDED = (
    "This scope has ended (its request finished, or its 'db.scope()' block exited), so it has no session any more. "
    "Code that outlives it, such as a task or thread it started, must open a scope of its own: "
    "'async with db.scope():' ('with' for ScopedSession)."
)


class _ScopeSession(Session):
    """The synchronous Session class behind every session a registry creates.

    The package's event listeners live on this class, so sessions created
    anywhere else in the process never reach them. Once its scope is sealed,
    what would write without flushing pending objects (which the
    ``before_flush`` listener refuses) is refused too: objects put in the
    session would otherwise be discarded silently at close, and ``commit()``
    would commit raw SQL. ``add_all`` calls ``add``.
    """

    def add(self, *args: Any, **kw: Any) -> None:
        _refuse_if_closed_to_writes(self)
        super().add(*args, **kw)

    def delete(self, *args: Any, **kw: Any) -> None:
        _refuse_if_closed_to_writes(self)
        super().delete(*args, **kw)

    def delete_all(self, *args: Any, **kw: Any) -> None:
        _refuse_if_closed_to_writes(self)
        super().delete_all(*args, **kw)

    def merge(self, *args: Any, **kw: Any) -> Any:
        _refuse_if_closed_to_writes(self)
        return super().merge(*args, **kw)

    def merge_all(self, *args: Any, **kw: Any) -> Any:
        _refuse_if_closed_to_writes(self)
        return super().merge_all(*args, **kw)

    def bulk_save_objects(self, *args: Any, **kw: Any) -> None:
        _refuse_if_closed_to_writes(self)
        super().bulk_save_objects(*args, **kw)

    def bulk_insert_mappings(self, *args: Any, **kw: Any) -> None:
        _refuse_if_closed_to_writes(self)
        super().bulk_insert_mappings(*args, **kw)

    def bulk_update_mappings(self, *args: Any, **kw: Any) -> None:
        _refuse_if_closed_to_writes(self)
        super().bulk_update_mappings(*args, **kw)

    def commit(self) -> None:
        state: _Scope | None = self.info.get(_STATE_KEY)
        if state is not None:
            if state.sealed:
                raise _sealed_error(state)
            if state.loop_thread is not None:
                _note_blocking(state)
        super().commit()
        if state is not None:
            state.wrote = False  # what the transaction wrote is committed

    def rollback(self) -> None:
        super().rollback()
        state: _Scope | None = self.info.get(_STATE_KEY)
        if state is not None:
            state.wrote = False

    def connection(self, *args: Any, **kw: Any) -> Connection:
        state: _Scope | None = self.info.get(_STATE_KEY)
        if state is not None:
            if state.sealed:
                if state.ended:
                    raise NoActiveScopeError(_ENDED)
                # What runs on the raw connection may write: what it leaves open is rolled back, with a warning.
                state.raw_sql = True
            state.wrote = True
            if state.loop_thread is not None:
                _note_blocking(state)
            if state.characteristics is not None:
                due = _due_characteristics(self, state, _target(self, state, kw.get("bind_arguments")))
                if due is not None:
                    kw["execution_options"] = {**due, **(kw.get("execution_options") or {})}
        return super().connection(*args, **kw)


class _RoutedScopeSession(_ScopeSession):
    """A ``_ScopeSession`` of a registry with replicas: each statement goes where its scope's ``Route`` says.

    A class of its own, so that registries without replicas pay nothing for it.
    """

    def get_bind(self, mapper: Any = None, *, clause: Any = None, bind: Any = None, **kw: Any) -> Any:
        if bind is None:
            state: _Scope | None = self.info.get(_STATE_KEY)
            route = state.route if state is not None else None
            if route is not None:
                return route.bind_for(state.wrote, clause)  # type: ignore[union-attr]
        return super().get_bind(mapper, clause=clause, bind=bind, **kw)

    def _connection_for_bind(self, engine: Any, execution_options: Any = None, **kw: Any) -> Connection:
        state: _Scope | None = self.info.get(_STATE_KEY)
        route = state.route if state is not None else None
        if route is not None:
            # A replica that cannot be connected to is skipped: the scope reads from the next one, or the primary.
            while engine in route.router.replicas:
                try:
                    return super()._connection_for_bind(engine, execution_options, **kw)
                except Exception as error:
                    transaction = self.get_transaction()  # the root: it holds the connections
                    if transaction is not None and engine in transaction._connections:
                        raise  # it connected, then failed (an on_begin hook, say): the request's own error
                    engine = route.unreachable(engine, error)
        return super()._connection_for_bind(engine, execution_options, **kw)


class _MeteredScopeSession(_ScopeSession):
    """A ``_ScopeSession`` of a registry that keeps statistics: it times each COMMIT, and tells when a transaction ends.

    A class of its own, so that registries with ``stats=False`` pay nothing for it.
    """

    def commit(self) -> None:
        state: _Scope | None = self.info.get(_STATE_KEY)
        meter = state.meter if state is not None else None
        if meter is None or state.sealed:  # type: ignore[union-attr]
            super().commit()  # a sealed scope's commit is refused before it begins: nothing to time
            return
        meter.commit_started()
        try:
            super().commit()
        except BaseException:
            meter.committed(ok=False)
            raise
        meter.committed(ok=True)


def _due_characteristics(session: Session, state: _Scope, engine: object) -> dict[str, Any] | None:
    """The scope's characteristics, if its current transaction's connection to *engine* does not have them yet."""
    if state.characteristics is None:
        return None
    began = state.began
    if began is not None and began.get(engine) is session.get_transaction():  # type: ignore[call-overload]
        return None
    return state.characteristics


def _target(session: Session, state: _Scope, bind_arguments: dict[str, Any] | None = None) -> object:
    """The engine a statement with *bind_arguments* goes to: the session's own, unless the scope routes reads."""
    if state.route is None:
        return session.bind
    return session.get_bind(**bind_arguments) if bind_arguments else session.get_bind()


def _characterize(session: Session, state: _Scope, execute_state: ORMExecuteState | None = None) -> None:
    """Acquire the connection the next statement needs now, with the scope's characteristics, unless that is done."""
    if state.characteristics is None:
        return
    engine = _target(session, state, execute_state.bind_arguments if execute_state is not None else None)
    due = _due_characteristics(session, state, engine)
    if due is not None:
        # The Session's own method: acquiring it for the policy's sake is no raw SQL. A session with
        # characteristics is bound to one engine (policy.characteristics_for()), or routes to its replicas.
        Session.connection(session, bind_arguments={"bind": engine}, execution_options=due)


def _sealed_error(state: _Scope) -> Exception:
    """What a write meets once the scope is sealed: ``NoActiveScopeError`` if it ended, else ``SessionSealedError``."""
    return NoActiveScopeError(_ENDED) if state.ended else SessionSealedError(_SEALED)


def _refuse_if_closed_to_writes(session: Session) -> None:
    """Raise if *session*'s scope is sealed (``SessionSealedError``), ended (``NoActiveScopeError``) or read-only."""
    state: _Scope | None = session.info.get(_STATE_KEY)
    if state is not None:
        _refuse_writes(state)


def _refuse_writes(state: _Scope) -> None:
    if state.sealed:
        raise _sealed_error(state)
    if state.read_only:
        raise ReadOnlyTransactionError(_READ_ONLY.format(scope=state.describe()))


def _note_blocking(state: _Scope) -> None:
    """Warn, once per route, when a sync registry's session does I/O on the event loop's own thread."""
    if state.loop_thread is not None and state.loop_thread == threading.get_ident():
        warn_once(state.describe(), "blocking", _BLOCKING)


_BLOCKING = (
    "A ScopedSession ran SQL on the event loop's own thread in %s (from an 'async def' endpoint, dependency or "
    "task), so every other request waited for the database meanwhile. Use AsyncScopedSession there, or make the "
    "endpoint a plain 'def', which Starlette runs in a worker thread."
)


@event.listens_for(_ScopeSession, "before_flush")
def _refuse_flush(session: Session, flush_context: Any, instances: Any) -> None:
    state: _Scope | None = session.info.get(_STATE_KEY)
    if state is not None:
        _refuse_writes(state)
        if state.loop_thread is not None:
            _note_blocking(state)
        state.wrote = True
        _characterize(session, state)


@event.listens_for(_ScopeSession, "do_orm_execute")
def _check_statement(execute_state: ORMExecuteState) -> None:
    session = execute_state.session
    state: _Scope | None = session.info.get(_STATE_KEY)
    if state is None:
        return
    if state.loop_thread is not None:
        _note_blocking(state)
    if state.ended:
        raise NoActiveScopeError(_ENDED)
    statement = execute_state.statement
    if statement.is_select:
        if state.characteristics is not None:
            _characterize(session, state, execute_state)
        if state.meter is not None and execute_state.lazy_loaded_from is not None:
            state.meter.lazy_load(execute_state)
        return
    if statement.is_dml:
        _refuse_writes(state)
        state.wrote = True
    elif not _reads(statement):
        # Raw SQL may write (the database refuses it in a read-only transaction, where it can).
        state.wrote = True
        state.raw_sql = state.raw_sql or state.sealed
    # After the above: a statement that writes goes to a routed scope's primary, with the characteristics.
    _characterize(session, state, execute_state)


def _reads(statement: Any) -> bool:
    """True for a ``text()`` that is a plain SELECT: the only raw SQL known not to write."""
    text = getattr(statement, "text", None)
    return isinstance(text, str) and text.lstrip()[:6].upper() == "SELECT"


@event.listens_for(_ScopeSession, "after_begin")
def _after_begin(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
    """Set up the transaction a scope's session began (``policy.begin()``), unless the scope has ended."""
    state: _Scope | None = session.info.get(_STATE_KEY)
    if state is None:
        return
    if state.ended and _owns(session):
        # Work started before the scope ended (another task's query on the same session)
        # may acquire a connection after it: give that connection back at once.
        connection.invalidate()
        raise NoActiveScopeError(_ENDED)
    if state.meter is not None:
        watch(connection, state.meter)  # first: what on_begin hooks run counts too
    # A SAVEPOINT is not a new transaction: what BEGIN set up still holds in it.
    if not transaction.nested:
        if state.read_only_at_begin:
            _begin_read_only(connection)  # first: psycopg sends BEGIN with the first statement, hooks' too
        if state.characteristics is not None:
            if state.began is None:
                state.began = {}
            state.began[connection.engine] = transaction
        if state.on_begin or (state.policy is not None and state.policy.statement_timeout is not None):
            begin(connection, state)


@event.listens_for(_RoutedScopeSession, "after_commit")
def _committed(session: Session) -> None:
    """Tell the scope's route if what committed wrote (the flush inside the COMMIT included): it sets the cookie."""
    state: _Scope | None = session.info.get(_STATE_KEY)
    if state is not None and state.wrote and state.route is not None:
        state.route.committed()


@event.listens_for(_MeteredScopeSession, "after_transaction_end")
def _transaction_ended(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        state: _Scope | None = session.info.get(_STATE_KEY)
        if state is not None and state.meter is not None:
            state.meter.transaction_ended(wrote=state.wrote)


def _begin_read_only(connection: Connection) -> None:
    """Make the transaction psycopg is about to begin ``READ ONLY``; undo it when the connection is checked in."""
    dialect = connection.dialect
    fairy = connection.connection
    dialect.set_readonly(fairy.dbapi_connection, True)  # type: ignore[attr-defined]
    # What SQLAlchemy's 'postgresql_readonly' option does, less its generic execution-option machinery (which
    # cost 6% of a read): a callback run at check-in, after the reset-on-return; skipped if invalidated.
    fairy._connection_record.finalize_callback.append(partial(_no_read_only, dialect))


def _no_read_only(dialect: Any, dbapi_connection: Any) -> None:
    # None, psycopg's default, rather than False: the next transaction begins with a plain BEGIN.
    dialect.set_readonly(dbapi_connection, None)
