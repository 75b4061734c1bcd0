"""What a registry keeps per scope: ``ScopeState``, the holder in its ContextVar, and ``ContextVarRegistry``.

``scoped.py`` builds the registries users hold on these; ``settle.py`` and the
testing kit open, end and read the scopes through them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from contextvars import ContextVar, Token
from typing import Any, Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.util import ScopedRegistry

from .exceptions import NoActiveScopeError, TrackingDisabledError
from .lifecycle import _HOOKS_KEY, _TRACKER_KEY, Collector, Hooks
from .observe import Meter, Observer, ScopeStats
from .policy import BeginHook, Policy, characteristics_for, read_only_at_begin, route_policy
from .routing import RequestReads, Route, Router
from .sessions import _ENDED, _STATE_KEY

__all__ = ["ContextVarRegistry", "ScopeState", "route_name"]

_T = TypeVar("_T", bound=Session | AsyncSession)

_UNTRACKED = (
    "Change tracking is off for this registry, so it has no collector, hooks or 'on_commit'. "
    "Create it with 'track_changes=True' (the default)."
)


class ScopeState(Generic[_T]):
    """The mutable holder that one scope keeps in a registry's ContextVar."""

    __slots__ = (
        "_info",
        "began",
        "characteristics",
        "collector",
        "doomed",
        "ended",
        "hooks",
        "loop_thread",
        "meter",
        "observer",
        "on_begin",
        "origin",
        "policy",
        "raw_sql",
        "read_only",
        "read_only_at_begin",
        "route",
        "sealed",
        "session",
        "wrote",
    )

    def __init__(
        self,
        hooks: Hooks | None = None,
        origin: MutableMapping[str, Any] | str | None = None,
        on_begin: list[BeginHook] | None = None,
        policy: Policy | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.session: _T | None = None
        self.doomed = False
        # Sealed: the response started, so the session may read but not write. Ended: it may not be used at all.
        self.sealed = False
        self.ended = False
        # Raw SQL ran while sealed: what it left open is rolled back at close, with a warning.
        self.raw_sql = False
        # The current transaction may have written (a flush, ORM DML, raw SQL other than SELECT).
        self.wrote = False
        # The transaction policy: db.scope()'s, or the route's, read when the request's session is created.
        self.policy = policy
        self.read_only = policy is not None and policy.read_only
        # The execution options the policy gives each transaction's connection before BEGIN, if any,
        # and, per engine, the (root) transaction that last acquired a connection to it: those have them.
        self.characteristics: dict[str, Any] | None = None
        self.began: dict[Any, Any] | None = None
        # psycopg: the session sets the connection's read_only itself at BEGIN (cheaper than an execution option).
        self.read_only_at_begin = False
        # The registry's on_begin hooks, and the scope's own dict for them (db.info), made on first use.
        self.on_begin: list[BeginHook] = on_begin if on_begin is not None else []
        self._info: dict[str, Any] | None = None
        # Who opened the scope, for messages: the request's ASGI scope, or a description.
        self.origin = origin
        # For a sync registry's request scope: the event loop's thread, where its sessions must do no I/O.
        self.loop_thread: int | None = None
        # Change tracking: the registry's hooks, and this scope's collector, made on first use.
        self.hooks = hooks
        self.collector: Collector | None = None
        # Statistics: the registry's settings, and this scope's meter, made with its session.
        self.observer = observer
        self.meter: Meter | None = None
        # Read replicas: where the scope's statements go, for a registry that has any (routing.py).
        self.route: Route | None = None

    @property
    def info(self) -> dict[str, Any]:
        """The scope's own dict for request context (``db.info``), created on first use."""
        if self._info is None:
            self._info = {}
        return self._info

    def info_snapshot(self) -> Mapping[str, Any] | None:
        """What ``db.info`` holds now, for ``Changes.info``; ``None`` if nothing was ever put there."""
        return self._info

    def stats_snapshot(self) -> ScopeStats:
        """What the scope's statements cost so far (``db.stats``, ``Changes.stats``)."""
        return self.meter.snapshot() if self.meter is not None else ScopeStats()

    def adopt_route_policy(self) -> Policy | None:
        """For a request's scope: take the policy of the endpoint the router matched, if any yet."""
        # A request's origin is its ASGI scope, a dict; db.scope()'s is a description.
        if self.policy is None and isinstance(self.origin, dict):
            policy = self.policy = route_policy(self.origin)
            if policy is not None:
                self.read_only = policy.read_only
        return self.policy

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
        self.began = None  # a transaction of the session: it would keep the session alive too
        if self.meter is not None:
            self.meter.finish(self.wrote)
        return ended

    def tracker(self) -> Collector:
        """Return this scope's collector, creating it on first use (a scope that never writes needs none)."""
        if self.collector is None:
            if self.hooks is None:
                raise TrackingDisabledError(_UNTRACKED)
            self.collector = Collector(self.hooks, self.info_snapshot, self.stats_snapshot)
            if self.session is not None:
                self.collector._attach(_sync(self.session))
        return self.collector


class ContextVarRegistry(ScopedRegistry[_T]):
    """A ``ScopedRegistry`` whose scope is the ``ScopeState`` held in a ContextVar.

    The object is stored *in* the holder, never with ``ContextVar.set()``: worker
    threads and child tasks run in a copy of the context, so only a mutation of
    the shared holder reaches the code that opened the scope and must close it.
    """

    __slots__ = ("_hooks", "_no_scope", "_var", "observer", "on_begin", "router")

    def __init__(
        self,
        createfunc: Callable[..., _T],
        *,
        no_scope_message: str,
        hooks: Hooks | None = None,
        observer: Observer | None = None,
        router: Router | None = None,
    ) -> None:
        self.createfunc = createfunc
        self.scopefunc = self.current
        self.registry = None
        self._no_scope = no_scope_message
        self._hooks = hooks
        self._var: ContextVar[ScopeState[_T] | None] = ContextVar("starlette_alchemy.scope", default=None)
        self.on_begin: list[BeginHook] = []
        self.observer = observer
        self.router = router

    def __call__(self) -> _T:
        """Return the current scope's object, creating it on first use."""
        state = self.current()
        if state.session is None:
            self.set(self._create(state))
        return state.session  # type: ignore[return-value]

    def _create(self, state: ScopeState[_T]) -> _T:
        """Create the scope's session; note what its connections need before BEGIN, as the scope's policy says."""
        policy = state.adopt_route_policy()
        if policy is not None:
            bind = getattr(self.createfunc, "kw", {}).get("bind")
            state.characteristics = characteristics_for(bind, policy)
            state.read_only_at_begin = read_only_at_begin(bind, policy)
        if state.observer is not None:
            state.meter = Meter(state.observer, state, policy.max_queries if policy is not None else None)
        route = state.route
        if route is not None:
            if getattr(self.createfunc, "kw", {}).get("bind") is route.router.bind:
                route.decide(policy)
            else:
                state.route = None  # the testing kit bound the factory to its one connection: everything goes there
        return self.createfunc()

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
        self,
        origin: MutableMapping[str, Any] | str | None = None,
        policy: Policy | None = None,
        reads: RequestReads | None = None,
    ) -> tuple[ScopeState[_T], Token[ScopeState[_T] | None]]:
        """Open a new, empty scope in the current context; give the token to ``reset()``.

        *reads*: for a request's scope, what its method and cookie say of its reads (routing.py).
        """
        state: ScopeState[_T] = ScopeState(self._hooks, origin, self.on_begin, policy, self.observer)
        if self.router is not None:
            state.route = self._route(self.router, reads)
        return state, self._var.set(state)

    def _route(self, router: Router, reads: RequestReads | None) -> Route:
        """A new scope's routing; one opened inside another (``db.scope()`` in a request) inherits its reads' rules."""
        enclosing = self._var.get()
        if reads is not None or enclosing is None or enclosing.route is None:
            return Route(router, reads, None)
        outer = enclosing.route
        return Route(router, outer.request, enclosing.adopt_route_policy() or outer.inherited)

    def reset(self, token: Token[ScopeState[_T] | None]) -> None:
        """Restore the scope that was current before ``open()`` returned *token*."""
        self._var.reset(token)


def _sync(session: Session | AsyncSession) -> Session:
    return session.sync_session if isinstance(session, AsyncSession) else session


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
