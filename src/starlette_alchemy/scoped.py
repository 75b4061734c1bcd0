"""Session registries scoped by a ContextVar: ``ScopedSession`` and ``AsyncScopedSession``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar, Token
from typing import Any, Generic, TypeVar, overload

import anyio
from sqlalchemy import Engine, event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_scoped_session, async_sessionmaker
from sqlalchemy.orm import ORMExecuteState, Session, scoped_session, sessionmaker
from sqlalchemy.util import ScopedRegistry

from .exceptions import NoActiveScopeError, SessionSealedError

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
# Where a session created by a registry keeps the ScopeState that owns it.
_STATE_KEY = "starlette_alchemy.scope"


class ScopeState(Generic[_T]):
    """The mutable holder that one scope keeps in a registry's ContextVar."""

    __slots__ = ("doomed", "sealed", "session")

    def __init__(self) -> None:
        self.session: _T | None = None
        self.doomed = False
        self.sealed = False


class ContextVarRegistry(ScopedRegistry[_T]):
    """A ``ScopedRegistry`` whose scope is the ``ScopeState`` held in a ContextVar.

    The object is stored *in* the holder, never with ``ContextVar.set()``: worker
    threads and child tasks run in a copy of the context, so only a mutation of
    the shared holder reaches the code that opened the scope and must close it.
    """

    __slots__ = ("_no_scope", "_var")

    def __init__(self, createfunc: Callable[[], _T], *, no_scope_message: str) -> None:
        self.createfunc = createfunc
        self.scopefunc = self.current
        self.registry = None
        self._no_scope = no_scope_message
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
        state: ScopeState[_T] = ScopeState()
        return state, self._var.set(state)

    def reset(self, token: Token[ScopeState[_T] | None]) -> None:
        """Restore the scope that was current before ``open()`` returned *token*."""
        self._var.reset(token)


class _ScopeControls(Generic[_T]):
    """What both registries add to SQLAlchemy's scoped session, for the current scope."""

    registry: ContextVarRegistry[_T]

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


class ScopedSession(_ScopeControls[_S], scoped_session[_S]):
    """A ``scoped_session`` whose scope is one request or one ``scope()`` block.

    Every ``Session`` method proxied by ``scoped_session`` works unchanged and
    acts on the current scope's session, which is created on first use.
    """

    registry: ContextVarRegistry[_S]

    @overload
    def __init__(self: ScopedSession[Session], bind: Engine, /) -> None: ...

    @overload
    def __init__(self, bind: sessionmaker[_S], /) -> None: ...

    def __init__(self, bind: Engine | sessionmaker[_S], /) -> None:
        factory = _sync_factory(bind)
        self.session_factory = factory
        self.registry = ContextVarRegistry(factory, no_scope_message=_NO_SCOPE.format(opener="with"))

    @contextmanager
    def scope(self, *, commit: bool = True) -> Iterator[ScopedSession[_S]]:
        """Open an independent scope: commit on clean exit, roll back on error, always close.

        Yields the registry itself, so ``with db.scope() as s: s.add(obj)`` acts
        on the new scope's session; the enclosing scope is restored on exit.
        """
        state, token = self.registry.open()
        try:
            yield self
            session = state.session
            if commit and session is not None and not state.doomed and session.in_transaction():
                _commit_or_discard(session)
        except BaseException:
            with _log_errors("closing the session after an error"):
                _close(state.session)
            raise
        else:
            _close(state.session)
        finally:
            self.registry.reset(token)


class AsyncScopedSession(_ScopeControls[_AS], async_scoped_session[_AS]):
    """An ``async_scoped_session`` whose scope is one request or one ``scope()`` block.

    Every ``AsyncSession`` method proxied by ``async_scoped_session`` works
    unchanged and acts on the current scope's session, created on first use.
    """

    registry: ContextVarRegistry[_AS]

    @overload
    def __init__(self: AsyncScopedSession[AsyncSession], bind: AsyncEngine, /) -> None: ...

    @overload
    def __init__(self, bind: async_sessionmaker[_AS], /) -> None: ...

    def __init__(self, bind: AsyncEngine | async_sessionmaker[_AS], /) -> None:
        factory = _async_factory(bind)
        self.session_factory = factory
        self.registry = ContextVarRegistry(factory, no_scope_message=_NO_SCOPE.format(opener="async with"))

    @asynccontextmanager
    async def scope(self, *, commit: bool = True) -> AsyncIterator[AsyncScopedSession[_AS]]:
        """Open an independent scope: commit on clean exit, roll back on error, always close.

        Yields the registry itself, so ``async with db.scope() as s: s.add(obj)``
        acts on the new scope's session; the enclosing scope is restored on exit.
        """
        state, token = self.registry.open()
        try:
            yield self
            session = state.session
            if commit and session is not None and not state.doomed and session.in_transaction():
                await _acommit_or_discard(session)
        except BaseException:
            with anyio.CancelScope(shield=True), _log_errors("closing the session after an error"):
                await _aclose(state.session)
            raise
        else:
            with anyio.CancelScope(shield=True):
                await _aclose(state.session)
        finally:
            self.registry.reset(token)


class _ScopeSession(Session):
    """The synchronous Session class behind every session a registry creates.

    The package's event listeners live on this class, so sessions created
    anywhere else in the process never reach them.
    """


_scope_classes: dict[type[Session], type[Session]] = {}


def _scope_class(session_class: type[Session]) -> type[Session]:
    """Return a subclass of *session_class* that also derives from ``_ScopeSession`` (cached)."""
    if issubclass(session_class, _ScopeSession):
        return session_class
    if session_class not in _scope_classes:
        _scope_classes[session_class] = type(session_class.__name__, (_ScopeSession, session_class), {})
    return _scope_classes[session_class]


def _sync_factory(bind: Engine | sessionmaker[Any]) -> sessionmaker[Any]:
    """A factory of ``_ScopeSession`` sessions: built for an engine, or a copy of the given one."""
    if isinstance(bind, Engine):
        return sessionmaker(bind, class_=_ScopeSession, expire_on_commit=False)
    return sessionmaker(class_=_scope_class(bind.class_), **bind.kw)


def _async_factory(bind: AsyncEngine | async_sessionmaker[Any]) -> async_sessionmaker[Any]:
    """An async factory whose sync sessions are ``_ScopeSession``: built for an engine, or a copy."""
    if isinstance(bind, AsyncEngine):
        return async_sessionmaker(bind, expire_on_commit=False, sync_session_class=_ScopeSession)
    sync_class = bind.kw.get("sync_session_class", bind.class_.sync_session_class)
    return async_sessionmaker(class_=bind.class_, **{**bind.kw, "sync_session_class": _scope_class(sync_class)})


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
        with _log_errors("discarding the connection after a failed COMMIT"):
            session.invalidate()
        raise


async def _acommit_or_discard(session: AsyncSession) -> None:
    """COMMIT; if it fails, invalidate the connection (shielded) before re-raising."""
    try:
        await session.commit()
    except Exception:
        with anyio.CancelScope(shield=True), _log_errors("discarding the connection after a failed COMMIT"):
            await session.invalidate()
        raise


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
