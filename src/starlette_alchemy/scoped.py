"""Session registries scoped by a ContextVar: ``ScopedSession`` and ``AsyncScopedSession``."""

from __future__ import annotations

import inspect
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, Generic, TypedDict, TypeVar, overload

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_scoped_session, async_sessionmaker
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from .ending import aclose_or_discard, acommit_or_discard, close_or_discard, commit_or_discard, log_errors
from .exceptions import TrackingDisabledError
from .factories import async_factory, sync_factory
from .lifecycle import AfterCommitHook, BeforeCommitHook, Callback, Collector, Hooks
from .observe import NPlusOne, Observer, ScopeStats
from .policy import BeginHook, ScopeOptions, scope_policy
from .registry import _UNTRACKED, ContextVarRegistry, ScopeState
from .routing import router_for
from .shield import run_to_completion

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["AsyncScopedSession", "ContextVarRegistry", "ScopeState", "ScopedSession", "StatsOptions"]

_T = TypeVar("_T", bound=Session | AsyncSession)
_S = TypeVar("_S", bound=Session)
_AS = TypeVar("_AS", bound=AsyncSession)

_NO_SCOPE = (
    "No database scope is active, so there is no session to use. "
    "Add 'DBSessionMiddleware' to the app, or open a scope with '{opener} db.scope():'."
)
_ASYNC_BEFORE_COMMIT = (
    "{name!r} is a coroutine function, but 'before_commit' hooks run inside the COMMIT, synchronously. "
    "Register a plain function: it gets the synchronous Session, whose 'add()' needs no await."
)
_ASYNC_ON_BEGIN = (
    "{name!r} is a coroutine function, but 'on_begin' hooks run at BEGIN, on the synchronous Connection. "
    "Register a plain function: 'connection.execute(...)' needs no await there."
)
_NO_STATS = "Statistics are off for this registry, so it has no 'stats'. Create it with 'stats=True' (the default)."
_SYNC_HOOK = (
    "{name!r} is a coroutine function, but a 'ScopedSession' runs its hooks synchronously. "
    "Register a plain function, or use 'AsyncScopedSession'."
)


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
    def info(self) -> dict[str, Any]:
        """The current scope's own dict (fresh per request and per ``scope()``), for request context.

        Put the user id or tenant there before the first query: ``on_begin``
        hooks get it, and ``Changes.info`` is a snapshot of it at COMMIT.
        ``db().info`` is still the session's own dict.
        """
        return self.registry.current().info

    def on_begin(self, hook: BeginHook) -> BeginHook:
        """Register ``hook(connection, info)`` to run after each BEGIN of every scope's session.

        Use it as a decorator. It runs on the synchronous ``Connection`` that
        began, after the route's policy, so ``SET LOCAL`` and
        ``set_config(..., true)`` end with the transaction.
        """
        if inspect.iscoroutinefunction(hook):
            raise TypeError(_ASYNC_ON_BEGIN.format(name=_name(hook)))
        if not callable(hook):
            raise TypeError(f"'on_begin' takes a function of (connection, info); got {hook!r}.")
        self.registry.on_begin.append(hook)
        return hook

    @property
    def stats(self) -> ScopeStats:
        """What the current scope's statements cost so far: queries, seconds, lazy loads and rows written."""
        state = self.registry.current()
        if state.observer is None:
            raise TrackingDisabledError(_NO_STATS)
        return state.stats_snapshot()

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
    def __init__(
        self: ScopedSession[Session],
        bind: Engine,
        /,
        *,
        track_changes: bool = True,
        replicas: Sequence[Engine] | None = None,
        replica_cooldown: float = 5.0,
        **stats: Unpack[StatsOptions],
    ) -> None: ...

    @overload
    def __init__(
        self,
        bind: sessionmaker[_S],
        /,
        *,
        track_changes: bool = True,
        replicas: Sequence[Engine] | None = None,
        replica_cooldown: float = 5.0,
        **stats: Unpack[StatsOptions],
    ) -> None: ...

    def __init__(
        self,
        bind: Engine | sessionmaker[_S],
        /,
        *,
        track_changes: bool = True,
        replicas: Sequence[Engine] | None = None,
        replica_cooldown: float = 5.0,
        **stats: Unpack[StatsOptions],
    ) -> None:
        """*replicas*: engines of read replicas of *bind*'s database; a scope reads from one of them until it writes."""
        observer = _observer(stats)
        factory = sync_factory(bind, track_changes, routed=bool(replicas), metered=observer is not None)
        self.session_factory = factory
        self.hooks = Hooks() if track_changes else None
        self.registry = ContextVarRegistry(
            factory,
            no_scope_message=_NO_SCOPE.format(opener="with"),
            hooks=self.hooks,
            observer=observer,
            router=router_for(factory, replicas, replica_cooldown, "ScopedSession"),
        )

    def _check_callable(self, function: Callable[..., Any]) -> None:
        if inspect.iscoroutinefunction(function):
            raise TypeError(_SYNC_HOOK.format(name=_name(function)))

    @contextmanager
    def scope(self, *, commit: bool = True, **options: Unpack[ScopeOptions]) -> Iterator[ScopedSession[_S]]:
        """Open an independent scope: commit on clean exit, roll back on error, always close.

        Yields the registry itself, so ``with db.scope() as s: s.add(obj)`` acts
        on the new scope's session; the enclosing scope is restored on exit.
        *options* are those of ``@transaction(...)`` that apply outside a request.
        """
        state, token = self.registry.open(_caller(), scope_policy(options))
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
        self: AsyncScopedSession[AsyncSession],
        bind: AsyncEngine,
        /,
        *,
        track_changes: bool = True,
        replicas: Sequence[AsyncEngine] | None = None,
        replica_cooldown: float = 5.0,
        **stats: Unpack[StatsOptions],
    ) -> None: ...

    @overload
    def __init__(
        self,
        bind: async_sessionmaker[_AS],
        /,
        *,
        track_changes: bool = True,
        replicas: Sequence[AsyncEngine] | None = None,
        replica_cooldown: float = 5.0,
        **stats: Unpack[StatsOptions],
    ) -> None: ...

    def __init__(
        self,
        bind: AsyncEngine | async_sessionmaker[_AS],
        /,
        *,
        track_changes: bool = True,
        replicas: Sequence[AsyncEngine] | None = None,
        replica_cooldown: float = 5.0,
        **stats: Unpack[StatsOptions],
    ) -> None:
        """*replicas*: engines of read replicas of *bind*'s database; a scope reads from one of them until it writes."""
        observer = _observer(stats)
        factory = async_factory(bind, track_changes, routed=bool(replicas), metered=observer is not None)
        self.session_factory = factory
        self.hooks = Hooks() if track_changes else None
        self.registry = ContextVarRegistry(
            factory,
            no_scope_message=_NO_SCOPE.format(opener="async with"),
            hooks=self.hooks,
            observer=observer,
            router=router_for(factory, replicas, replica_cooldown, "AsyncScopedSession"),
        )

    @asynccontextmanager
    async def scope(
        self, *, commit: bool = True, **options: Unpack[ScopeOptions]
    ) -> AsyncIterator[AsyncScopedSession[_AS]]:
        """Open an independent scope: commit on clean exit, roll back on error, always close.

        Yields the registry itself, so ``async with db.scope() as s: s.add(obj)``
        acts on the new scope's session; the enclosing scope is restored on exit.
        Once COMMIT is sent, it and the close complete even if the task is cancelled.
        *options* are those of ``@transaction(...)`` that apply outside a request.
        """
        state, token = self.registry.open(_caller(), scope_policy(options))
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


class StatsOptions(TypedDict, total=False):
    """A registry's statistics options (``db.stats``, N+1 detection, slow statements)."""

    stats: bool
    n_plus_one: NPlusOne
    slow_query: float | None


def _observer(options: StatsOptions) -> Observer | None:
    """The registry's ``Observer``, or ``None`` with ``stats=False``; wrong options are refused."""
    unknown = set(options) - set(StatsOptions.__annotations__)
    if unknown:
        raise TypeError(
            f"Unknown option {sorted(unknown)[0]!r}; a registry takes track_changes, stats, n_plus_one and slow_query."
        )
    stats = options.get("stats", True)
    if not isinstance(stats, bool):
        raise TypeError(f"'stats' must be True or False; got {stats!r} ({type(stats).__name__}).")
    if not stats:
        tuned = [name for name in ("n_plus_one", "slow_query") if options.get(name) is not None]
        if tuned:
            raise ValueError(f"'{tuned[0]}' needs statistics, which 'stats=False' turns off. Drop one of them.")
        return None
    return Observer(n_plus_one=options.get("n_plus_one", 10), slow_query=options.get("slow_query"))


def _name(function: Callable[..., Any]) -> str:
    return getattr(function, "__qualname__", repr(function))


def _caller() -> str:
    """Describe where ``db.scope()`` was entered: past this function, ``scope()`` and the context manager's own."""
    return f"'db.scope()' in {sys._getframe(3).f_code.co_name!r}"


def _close(session: Session | None) -> None:
    if session is not None:
        close_or_discard(session)


async def _aclose(session: AsyncSession | None) -> None:
    if session is not None:
        await aclose_or_discard(session)
