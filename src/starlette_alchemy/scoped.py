"""Session registries scoped by a ContextVar: ``ScopedSession`` and ``AsyncScopedSession``."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar, Token
from typing import Any, Generic, TypeVar, overload

import anyio
from sqlalchemy import Connection, Engine, event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_scoped_session, async_sessionmaker
from sqlalchemy.orm import ORMExecuteState, Session, scoped_session, sessionmaker
from sqlalchemy.util import ScopedRegistry

from .exceptions import NoActiveScopeError, SessionSealedError, TrackingDisabledError
from .lifecycle import (
    _HOOKS_KEY,
    _TRACKER_KEY,
    AfterCommitHook,
    BeforeCommitHook,
    Callback,
    Collector,
    Hooks,
    _TrackedSession,
)

__all__ = ["AsyncScopedSession", "ContextVarRegistry", "ScopeState", "ScopedSession"]

logger = logging.getLogger("starlette_alchemy")

_T = TypeVar("_T", bound=Session | AsyncSession)
_S = TypeVar("_S", bound=Session)
_AS = TypeVar("_AS", bound=AsyncSession)

_NO_SCOPE = (
    "No database scope is active, so there is no session to use. "
    "Add 'DBSessionMiddleware' to the app, or open a scope with '{opener} db.scope():'."
)
_SEALED = (
    "The response has already started, so this request's session is sealed and may not write. "
    "Write in a scope of its own: 'with db.scope():' ('async with' for AsyncScopedSession)."
)
_UNTRACKED = (
    "Change tracking is off for this registry, so it has no collector, hooks or 'on_commit'. "
    "Create it with 'track_changes=True' (the default)."
)
_ASYNC_BEFORE_COMMIT = (
    "{name!r} is a coroutine function, but 'before_commit' hooks run inside the COMMIT, synchronously. "
    "Register a plain function: it gets the synchronous Session, whose 'add()' needs no await."
)
_SYNC_HOOK = (
    "{name!r} is a coroutine function, but a 'ScopedSession' runs its hooks synchronously. "
    "Register a plain function, or use 'AsyncScopedSession'."
)
# Where a session created by a registry keeps the ScopeState that owns it.
_STATE_KEY = "starlette_alchemy.scope"


class ScopeState(Generic[_T]):
    """The mutable holder that one scope keeps in a registry's ContextVar."""

    __slots__ = ("collector", "doomed", "hooks", "sealed", "session")

    def __init__(self, hooks: Hooks | None = None) -> None:
        self.session: _T | None = None
        self.doomed = False
        self.sealed = False
        # Change tracking: the registry's hooks, and this scope's collector, made on first use.
        self.hooks = hooks
        self.collector: Collector | None = None

    def tracker(self) -> Collector:
        """Return this scope's collector, creating it on first use (a scope that never writes needs none)."""
        if self.collector is None:
            if self.hooks is None:
                raise TrackingDisabledError(_UNTRACKED)
            self.collector = Collector(self.hooks)
            if self.session is not None:
                self.collector._attach(_sync(self.session))
        return self.collector


class ContextVarRegistry(ScopedRegistry[_T]):
    """A ``ScopedRegistry`` whose scope is the ``ScopeState`` held in a ContextVar.

    The object is stored *in* the holder, never with ``ContextVar.set()``: worker
    threads and child tasks run in a copy of the context, so only a mutation of
    the shared holder reaches the code that opened the scope and must close it.
    """

    __slots__ = ("_hooks", "_no_scope", "_var")

    def __init__(self, createfunc: Callable[[], _T], *, no_scope_message: str, hooks: Hooks | None = None) -> None:
        self.createfunc = createfunc
        self.scopefunc = self.current
        self.registry = None
        self._no_scope = no_scope_message
        self._hooks = hooks
        self._var: ContextVar[ScopeState[_T] | None] = ContextVar("starlette_alchemy.scope", default=None)

    def __call__(self) -> _T:
        """Return the current scope's object, creating it on first use."""
        state = self.current()
        if state.session is None:
            self.set(self.createfunc())
        return state.session  # type: ignore[return-value]

    def has(self) -> bool:
        """Return True if an object is present in the current scope."""
        state = self._var.get()
        return state is not None and state.session is not None

    def set(self, obj: _T) -> None:
        """Set the object for the current scope."""
        state = self.current()
        obj.info[_STATE_KEY] = state
        if state.hooks is not None:
            # The listeners create the collector when there is something to record.
            obj.info[_TRACKER_KEY] = state.tracker
            obj.info[_HOOKS_KEY] = state.hooks
            if state.collector is not None:
                state.collector._attach(_sync(obj))
        state.session = obj

    def clear(self) -> None:
        """Clear the current scope's object, if any."""
        state = self._var.get()
        if state is not None:
            state.session = None

    def current(self) -> ScopeState[_T]:
        """Return the current scope's holder; raise ``NoActiveScopeError`` outside any scope."""
        state = self._var.get()
        if state is None:
            raise NoActiveScopeError(self._no_scope)
        return state

    def open(self) -> tuple[ScopeState[_T], Token[ScopeState[_T] | None]]:
        """Open a new, empty scope in the current context; give the token to ``reset()``."""
        state: ScopeState[_T] = ScopeState(self._hooks)
        return state, self._var.set(state)

    def reset(self, token: Token[ScopeState[_T] | None]) -> None:
        """Restore the scope that was current before ``open()`` returned *token*."""
        self._var.reset(token)


class _ScopeControls(Generic[_T]):
    """What both registries add to SQLAlchemy's scoped session, for the current scope."""

    registry: ContextVarRegistry[_T]
    hooks: Hooks | None

    def has(self) -> bool:
        """Return True if the current scope already created its session."""
        return self.registry.has()

    def doom(self) -> None:
        """Mark the current scope's transaction for rollback, whatever happens next."""
        self.registry.current().doomed = True

    @property
    def is_doomed(self) -> bool:
        """True if ``doom()`` was called in the current scope."""
        return self.registry.current().doomed

    async def dependency(self) -> _T:
        """Return the current scope's session; use as ``Depends(db.dependency)``."""
        # Async on purpose: FastAPI runs a plain ``def`` dependency in the
        # threadpool, and creating a session does no I/O worth a thread hop.
        return self.registry()

    async def collector_dependency(self) -> Collector:
        """Return the current scope's collector; use as ``Depends(db.collector_dependency)``."""
        return self.collector

    @property
    def collector(self) -> Collector:
        """The current scope's ``Collector``: the objects it touched and the rows it wrote."""
        return self.registry.current().tracker()

    def before_commit(self, hook: BeforeCommitHook) -> BeforeCommitHook:
        """Register ``hook(session, changes)`` to run inside every scope's transaction, just before COMMIT.

        Use it as a decorator. Objects it adds commit atomically with the data;
        an exception it raises aborts the commit.
        """
        if inspect.iscoroutinefunction(hook):
            raise TypeError(_ASYNC_BEFORE_COMMIT.format(name=_name(hook)))
        self._hooks().before_commit.append(hook)
        return hook

    def after_commit(self, hook: AfterCommitHook) -> AfterCommitHook:
        """Register ``hook(changes)`` to run after every scope's COMMIT; its errors are logged, never raised.

        Use it as a decorator.
        """
        self._check_callable(hook)
        self._hooks().after_commit.append(hook)
        return hook

    def on_commit(self, callback: Callback) -> None:
        """Run ``callback()`` after the current scope's outermost COMMIT; forget it if that rolls back."""
        self._check_callable(callback)
        self.registry.current().tracker().on_commit(callback)

    def _hooks(self) -> Hooks:
        if self.hooks is None:
            raise TrackingDisabledError(_UNTRACKED)
        return self.hooks

    def _check_callable(self, function: Callable[..., Any]) -> None:
        """Refuse a hook or callback this registry cannot run."""


class ScopedSession(_ScopeControls[_S], scoped_session[_S]):
    """A ``scoped_session`` whose scope is one request or one ``scope()`` block.

    Every ``Session`` method proxied by ``scoped_session`` works unchanged and
    acts on the current scope's session, which is created on first use.
    """

    registry: ContextVarRegistry[_S]

    @overload
    def __init__(self: ScopedSession[Session], bind: Engine, /, *, track_changes: bool = True) -> None: ...

    @overload
    def __init__(self, bind: sessionmaker[_S], /, *, track_changes: bool = True) -> None: ...

    def __init__(self, bind: Engine | sessionmaker[_S], /, *, track_changes: bool = True) -> None:
        factory = _sync_factory(bind, track_changes)
        self.session_factory = factory
        self.hooks = Hooks() if track_changes else None
        self.registry = ContextVarRegistry(factory, no_scope_message=_NO_SCOPE.format(opener="with"), hooks=self.hooks)

    def _check_callable(self, function: Callable[..., Any]) -> None:
        if inspect.iscoroutinefunction(function):
            raise TypeError(_SYNC_HOOK.format(name=_name(function)))

    @contextmanager
    def scope(self, *, commit: bool = True) -> Iterator[ScopedSession[_S]]:
        """Open an independent scope: commit on clean exit, roll back on error, always close.

        Yields the registry itself, so ``with db.scope() as s: s.add(obj)`` acts
        on the new scope's session; the enclosing scope is restored on exit.
        """
        state, token = self.registry.open()
        committed = False
        try:
            yield self
            session = state.session
            if commit and not state.doomed:
                if session is not None and session.in_transaction():
                    _commit_or_discard(session)
                committed = True
        except BaseException:
            with _log_errors("closing the session after an error"):
                _close(state.session)
            raise
        else:
            _close(state.session)
        finally:
            self.registry.reset(token)
            if state.collector is not None:
                state.collector._settle(committed=committed)
                state.collector._run_ready()


class AsyncScopedSession(_ScopeControls[_AS], async_scoped_session[_AS]):
    """An ``async_scoped_session`` whose scope is one request or one ``scope()`` block.

    Every ``AsyncSession`` method proxied by ``async_scoped_session`` works
    unchanged and acts on the current scope's session, created on first use.
    """

    registry: ContextVarRegistry[_AS]

    @overload
    def __init__(
        self: AsyncScopedSession[AsyncSession], bind: AsyncEngine, /, *, track_changes: bool = True
    ) -> None: ...

    @overload
    def __init__(self, bind: async_sessionmaker[_AS], /, *, track_changes: bool = True) -> None: ...

    def __init__(self, bind: AsyncEngine | async_sessionmaker[_AS], /, *, track_changes: bool = True) -> None:
        factory = _async_factory(bind, track_changes)
        self.session_factory = factory
        self.hooks = Hooks() if track_changes else None
        self.registry = ContextVarRegistry(
            factory, no_scope_message=_NO_SCOPE.format(opener="async with"), hooks=self.hooks
        )

    @asynccontextmanager
    async def scope(self, *, commit: bool = True) -> AsyncIterator[AsyncScopedSession[_AS]]:
        """Open an independent scope: commit on clean exit, roll back on error, always close.

        Yields the registry itself, so ``async with db.scope() as s: s.add(obj)``
        acts on the new scope's session; the enclosing scope is restored on exit.
        """
        state, token = self.registry.open()
        committed = False
        try:
            yield self
            session = state.session
            if commit and not state.doomed:
                if session is not None and session.in_transaction():
                    await _acommit_or_discard(session)
                committed = True
        except BaseException:
            with anyio.CancelScope(shield=True), _log_errors("closing the session after an error"):
                await _aclose(state.session)
            raise
        else:
            with anyio.CancelScope(shield=True):
                await _aclose(state.session)
        finally:
            self.registry.reset(token)
            if state.collector is not None:
                state.collector._settle(committed=committed)
                await state.collector._arun_ready()


def _sync(session: Session | AsyncSession) -> Session:
    return session.sync_session if isinstance(session, AsyncSession) else session


def _name(function: Callable[..., Any]) -> str:
    return getattr(function, "__qualname__", repr(function))


class _ScopeSession(Session):
    """The synchronous Session class behind every session a registry creates.

    The package's event listeners live on this class, so sessions created
    anywhere else in the process never reach them.
    """


class _TrackedScopeSession(_TrackedSession, _ScopeSession):
    """A ``_ScopeSession`` that also reports to its scope's ``Collector``."""


_scope_classes: dict[tuple[type[Session], type[Session]], type[Session]] = {}


def _scope_class(session_class: type[Session], base: type[Session]) -> type[Session]:
    """Return a subclass of *session_class* that also derives from *base* (cached)."""
    if issubclass(session_class, base):
        return session_class
    key = (session_class, base)
    if key not in _scope_classes:
        _scope_classes[key] = type(session_class.__name__, (base, session_class), {})
    return _scope_classes[key]


def _base(track_changes: bool) -> type[Session]:
    return _TrackedScopeSession if track_changes else _ScopeSession


def _sync_factory(bind: Engine | sessionmaker[Any], track_changes: bool) -> sessionmaker[Any]:
    """A factory of the package's sessions: built for an engine, or a copy of the given one."""
    if isinstance(bind, Engine):
        return sessionmaker(bind, class_=_base(track_changes), expire_on_commit=False)
    return sessionmaker(class_=_scope_class(bind.class_, _base(track_changes)), **bind.kw)


def _async_factory(bind: AsyncEngine | async_sessionmaker[Any], track_changes: bool) -> async_sessionmaker[Any]:
    """An async factory whose sync sessions are the package's: built for an engine, or a copy."""
    if isinstance(bind, AsyncEngine):
        return async_sessionmaker(bind, expire_on_commit=False, sync_session_class=_base(track_changes))
    sync_class = bind.kw.get("sync_session_class", bind.class_.sync_session_class)
    sync_class = _scope_class(sync_class, _base(track_changes))
    return async_sessionmaker(class_=bind.class_, **{**bind.kw, "sync_session_class": sync_class})


@event.listens_for(_ScopeSession, "before_flush")
def _refuse_flush_when_sealed(session: Session, flush_context: Any, instances: Any) -> None:
    state = session.info.get(_STATE_KEY)
    if state is not None and state.sealed:
        raise SessionSealedError(_SEALED)


@event.listens_for(_ScopeSession, "do_orm_execute")
def _refuse_dml_when_sealed(execute_state: ORMExecuteState) -> None:
    if execute_state.statement.is_dml:
        _refuse_flush_when_sealed(execute_state.session, None, None)


def _commit_or_discard(session: Session) -> None:
    """COMMIT; if it fails, invalidate the connection before re-raising.

    After a failed COMMIT the connection's transaction state is unknown (pysqlite,
    for one, keeps the failed transaction open), so it must never go back to the pool.
    """
    try:
        session.commit()
    except Exception:
        if _owns_connection(session):
            with _log_errors("discarding the connection after a failed COMMIT"):
                session.invalidate()
        raise


async def _acommit_or_discard(session: AsyncSession) -> None:
    """COMMIT; if it fails, invalidate the connection (shielded) before re-raising."""
    try:
        await session.commit()
    except Exception:
        if _owns_connection(session.sync_session):
            with anyio.CancelScope(shield=True), _log_errors("discarding the connection after a failed COMMIT"):
                await session.invalidate()
        raise


def _owns_connection(session: Session) -> bool:
    """False if *session* is bound to a ``Connection`` that its caller opened and must discard or keep itself.

    Such a session (``testing.rolled_back()`` makes them) only joined the
    connection's transaction, so closing it afterwards rolls back what it did.
    """
    return not isinstance(session.bind, Connection)


def _close(session: Session | None) -> None:
    if session is not None:
        session.close()


async def _aclose(session: AsyncSession | None) -> None:
    if session is not None:
        await session.close()


@contextmanager
def _log_errors(doing: str) -> Iterator[None]:
    """Log and swallow an ``Exception`` so that it cannot mask the one in flight."""
    try:
        yield
    except Exception:
        logger.exception("Error while %s; the original error is re-raised.", doing)
