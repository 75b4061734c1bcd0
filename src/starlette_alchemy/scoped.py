"""Session registries scoped by a ContextVar: ``ScopedSession`` and ``AsyncScopedSession``."""

from __future__ import annotations

import inspect
import sys
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar, Token
from typing import Any, Generic, TypeVar, overload

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_scoped_session, async_sessionmaker
from sqlalchemy.orm import Session, scoped_session, sessionmaker
from sqlalchemy.util import ScopedRegistry

from .exceptions import NoActiveScopeError, TrackingDisabledError
from .lifecycle import _HOOKS_KEY, _TRACKER_KEY, AfterCommitHook, BeforeCommitHook, Callback, Collector, Hooks
from .sessions import (
    _ENDED,
    _STATE_KEY,
    aclose_or_discard,
    acommit_or_discard,
    async_factory,
    close_or_discard,
    commit_or_discard,
    log_errors,
    sync_factory,
)
from .shield import run_to_completion

__all__ = ["AsyncScopedSession", "ContextVarRegistry", "ScopeState", "ScopedSession"]

_T = TypeVar("_T", bound=Session | AsyncSession)
_S = TypeVar("_S", bound=Session)
_AS = TypeVar("_AS", bound=AsyncSession)

_NO_SCOPE = (
    "No database scope is active, so there is no session to use. "
    "Add 'DBSessionMiddleware' to the app, or open a scope with '{opener} db.scope():'."
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


class ScopeState(Generic[_T]):
    """The mutable holder that one scope keeps in a registry's ContextVar."""

    __slots__ = ("collector", "doomed", "ended", "hooks", "loop_thread", "origin", "raw_sql", "sealed", "session")

    def __init__(self, hooks: Hooks | None = None, origin: MutableMapping[str, Any] | str | None = None) -> None:
        self.session: _T | None = None
        self.doomed = False
        # Sealed: the response started, so the session may read but not write. Ended: it may not be used at all.
        self.sealed = False
        self.ended = False
        # Raw SQL ran while sealed: what it left open is rolled back at close, with a warning.
        self.raw_sql = False
        # Who opened the scope, for messages: the request's ASGI scope, or a description.
        self.origin = origin
        # For a sync registry's request scope: the event loop's thread, where its sessions must do no I/O.
        self.loop_thread: int | None = None
        # Change tracking: the registry's hooks, and this scope's collector, made on first use.
        self.hooks = hooks
        self.collector: Collector | None = None

    def describe(self) -> str:
        """Name the scope for log messages: the request's route, or where ``db.scope()`` was opened."""
        origin = self.origin
        if isinstance(origin, str) or origin is None:
            return origin or "a scope"
        return route_name(origin)

    def end(self) -> tuple[_T | None, Collector | None]:
        """End the scope: from now on its session and registry refuse every use. Return and let go of both."""
        self.sealed = self.ended = True
        ended = self.session, self.collector
        # Copies of the scope's context outlive it (an idle worker thread keeps its
        # last one): the holder they share must not keep the session alive.
        self.session = None
        self.collector = None
        return ended

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
        """Return True if an object is present in the current scope (never after the scope ended)."""
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
        """Return the current scope's holder; raise ``NoActiveScopeError`` outside any scope or after it ended."""
        state = self._var.get()
        if state is None:
            raise NoActiveScopeError(self._no_scope)
        if state.ended:
            raise NoActiveScopeError(_ENDED)
        return state

    def open(
        self, origin: MutableMapping[str, Any] | str | None = None
    ) -> tuple[ScopeState[_T], Token[ScopeState[_T] | None]]:
        """Open a new, empty scope in the current context; give the token to ``reset()``."""
        state: ScopeState[_T] = ScopeState(self._hooks, origin)
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
        factory = sync_factory(bind, track_changes)
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
        state, token = self.registry.open(_caller())
        collector = None
        committed = False
        try:
            yield self
            session = state.session
            if commit and not state.doomed:
                if session is not None and session.in_transaction():
                    commit_or_discard(session)
                committed = True
        except BaseException:
            session, collector = state.end()
            with log_errors("closing the session after an error"):
                _close(session)
            raise
        else:
            session, collector = state.end()
            _close(session)
        finally:
            self.registry.reset(token)
            if collector is not None:
                collector._settle(committed=committed)
                collector._run_ready()


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
        factory = async_factory(bind, track_changes)
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
        Once COMMIT is sent, it and the close complete even if the task is cancelled.
        """
        state, token = self.registry.open(_caller())
        collector = None
        committed = False
        try:
            yield self
            session = state.session
            if commit and not state.doomed:
                if session is not None and session.in_transaction():
                    await run_to_completion(acommit_or_discard(session))
                committed = True
        except BaseException:
            session, collector = state.end()
            with log_errors("closing the session after an error"):
                await run_to_completion(_aclose(session), reraise=False)
            raise
        else:
            session, collector = state.end()
            await run_to_completion(_aclose(session))
        finally:
            self.registry.reset(token)
            if collector is not None:
                collector._settle(committed=committed)
                await run_to_completion(collector._arun_ready())


def _sync(session: Session | AsyncSession) -> Session:
    return session.sync_session if isinstance(session, AsyncSession) else session


def _name(function: Callable[..., Any]) -> str:
    return getattr(function, "__qualname__", repr(function))


def _caller() -> str:
    """Describe where ``db.scope()`` was entered: past this function, ``scope()`` and the context manager's own."""
    return f"'db.scope()' in {sys._getframe(3).f_code.co_name!r}"


def route_name(scope: MutableMapping[str, Any]) -> str:
    """Name a request's route for messages: its method and path template once routed, else its path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path is None:
        path = scope.get("path", "")
    else:
        # Inside a Mount, the template is relative to the mount's own path.
        path = scope.get("root_path", "")[len(scope.get("app_root_path", "")) :] + path
    return f"'{scope.get('method', 'WEBSOCKET')} {path}'"


def _close(session: Session | None) -> None:
    if session is not None:
        close_or_discard(session)


async def _aclose(session: AsyncSession | None) -> None:
    if session is not None:
        await aclose_or_discard(session)
