"""Read replicas: which engine serves a scope's reads, and the cookie that sends a client's reads to the primary.

A registry created with ``replicas=[...]`` has a ``Router``. Each of its scopes
has a ``Route``: when the scope's session is created, ``Route.decide()`` says
whether its reads may go to a replica (the route's options, the request's
method, the read-your-writes cookie); the session (sessions.py) then asks
``Route.bind_for()`` for the engine of each statement, which pins the scope to
the primary from its first write on. A replica that cannot be reached is
skipped for a cool-down (``Router.unreachable()``).
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import Select, TextClause

from .exceptions import first_line
from .policy import Policy

__all__ = ["COOKIE", "RequestReads", "Route", "Router"]

logger = logging.getLogger("starlette_alchemy")

# The read-your-writes cookie: when the client's reads may go to a replica again, in milliseconds since the epoch.
COOKIE = "sa_primary_until"
_COOKIE_PREFIX = COOKIE.encode() + b"="
# Why a request's reads go to the primary, before its route is known: a fresh cookie, or a method that may write.
COOKIE_PIN = "cookie"
METHOD_PIN = "method"


class RequestReads:
    """What one request's scopes share for routing: why their reads go to the primary, and whether one wrote."""

    __slots__ = ("pin", "wrote")

    def __init__(self, pin: str | None) -> None:
        self.pin = pin
        # A scope of the request committed writes: the response sets the cookie.
        self.wrote = False


class Router:
    """A registry's primary and replicas: the replicas' turns, and which of them cool down after a failed connect."""

    __slots__ = ("_cooling", "_in_turn", "_lock", "_turns", "bind", "clock", "cooldown", "primary", "replicas")

    def __init__(self, bind: object, primary: Engine, replicas: Sequence[Engine], cooldown: float) -> None:
        # The registry's own bind: a session factory still bound to it routes (the testing kit rebinds it).
        self.bind = bind
        self.primary = primary
        self.replicas = frozenset(replicas)
        self.cooldown = cooldown
        self._in_turn = tuple(replicas)
        self._turns = itertools.count()  # its next() is atomic: threads may share it
        # Replica -> when it may be tried again, by the clock.
        self._cooling: dict[Engine, float] = {}
        self.clock = time.monotonic
        self._lock = threading.Lock()

    def next_replica(self) -> Engine:
        """The next healthy replica in turn; the primary when every replica is cooling down."""
        in_turn = self._in_turn
        turn = next(self._turns)
        if not self._cooling:
            return in_turn[turn % len(in_turn)]
        for offset in range(len(in_turn)):
            replica = in_turn[(turn + offset) % len(in_turn)]
            if replica not in self._cooling or self._cooled(replica):
                return replica
        return self.primary

    def _cooled(self, replica: Engine) -> bool:
        until = self._cooling.get(replica)
        if until is not None and self.clock() < until:
            return False
        self._cooling.pop(replica, None)
        return True

    def unreachable(self, replica: Engine, error: Exception) -> Engine:
        """*replica* could not be connected to: cool it down (warning once) and return the engine to read from now."""
        with self._lock:
            now = self.clock()
            warn = replica not in self._cooling or now >= self._cooling[replica]
            self._cooling[replica] = now + self.cooldown
        if warn:
            busy = isinstance(error, PoolTimeoutError)  # the pool's own timeout: no connection was free
            logger.warning(
                "The replica %s %s (%s: %s); reads skip it for %s s and go to another replica, or to the primary. %s",
                _name(replica),
                "had no free connection in its pool" if busy else "could not be reached",
                type(error).__name__,
                first_line(error),
                self.cooldown,
                "Size its engine's pool to the concurrency (pool_size, max_overflow)."
                if busy
                else "Check that it is up and its URL is right.",
            )
        return self.next_replica()


class Route:
    """One scope's routing: whether its reads go to the primary, and which engine serves them otherwise."""

    __slots__ = ("inherited", "primary", "reads_from", "request", "router")

    def __init__(self, router: Router, request: RequestReads | None, inherited: Policy | None) -> None:
        self.router = router
        self.request = request
        # The enclosing request's (or scope's) options, for a db.scope() inside it that has none of its own.
        self.inherited = inherited
        # Every statement goes to the primary: the rules said so when the session was created, or the scope wrote.
        self.primary = False
        # The engine the scope reads from, picked at its first read: a replica, or the primary if none is healthy.
        self.reads_from: Engine | None = None

    def decide(self, policy: Policy | None) -> None:
        """Say, when the scope's session is created, whether its reads go to the primary.

        Precedence: ``primary=True`` (or SERIALIZABLE, which a standby cannot
        run) > a fresh read-your-writes cookie > ``read_only=True`` > the method.
        """
        pin = self.request.pin if self.request is not None else None
        inherited = self.inherited
        if policy is None and inherited is None:
            self.primary = pin is not None  # the common case: a route without options
        elif _needs_primary(policy) or _needs_primary(inherited) or pin == COOKIE_PIN:
            self.primary = True
        else:
            read_only = (policy is not None and policy.read_only) or (inherited is not None and inherited.read_only)
            self.primary = not read_only and pin == METHOD_PIN

    def bind_for(self, wrote: bool, clause: object) -> Engine:
        """The engine for the scope's next statement (*clause*, if known); *wrote*: its transaction wrote."""
        if not self.primary:
            if not (wrote or _locks(clause)):
                reads_from = self.reads_from
                if reads_from is None:
                    reads_from = self.reads_from = self.router.next_replica()
                return reads_from
            self.primary = True  # from its first write on, the scope reads what it wrote
        return self.router.primary

    def unreachable(self, replica: Engine, error: Exception) -> Engine:
        """The scope's replica could not be connected to: read from the next healthy one, or from the primary."""
        self.reads_from = self.router.unreachable(replica, error)
        return self.reads_from

    def committed(self) -> None:
        """The scope's transaction committed writes: the request's response sets the cookie."""
        if self.request is not None:
            self.request.wrote = True


def _needs_primary(policy: Policy | None) -> bool:
    """True if *policy* reads the primary: ``primary=True``, or SERIALIZABLE, which a standby cannot run."""
    return policy is not None and (policy.primary or policy.isolation_level == "SERIALIZABLE")


_LOCKING = re.compile(r"\bFOR\s+(?:NO\s+KEY\s+)?(?:UPDATE|SHARE|KEY\s+SHARE)\b", re.IGNORECASE)


def _locks(clause: object) -> bool:
    """True for ``SELECT ... FOR UPDATE`` (or another row lock): it must run where the rows can change."""
    if isinstance(clause, Select):
        return clause._for_update_arg is not None
    return isinstance(clause, TextClause) and _LOCKING.search(clause.text) is not None


# -- the registry's options ------------------------------------------------------------------


def router_for(factory: Any, replicas: object, cooldown: object, registry: str) -> Router | None:
    """The ``Router`` of a registry whose session *factory* is given, created with *replicas*, or ``None`` without any.

    Wrong replicas are refused, as is a factory bound to no single engine.
    """
    if replicas is None:
        return None
    if isinstance(replicas, Engine | AsyncEngine | str) or not isinstance(replicas, Iterable):
        raise TypeError(f"'replicas' must be a list of engines; got {replicas!r}. Wrap one: 'replicas=[engine]'.")
    replicas = list(replicas)
    if not replicas:
        return None  # no replica configured (a development set-up, say): every statement goes to the primary
    if isinstance(cooldown, bool) or not isinstance(cooldown, int | float) or not cooldown >= 0:
        raise ValueError(f"'replica_cooldown' must be a number of seconds, 0 or more; got {cooldown!r}.")
    bound = factory.kw.get("bind")
    primary = _primary_engine(bound, registry)
    kind = Engine if registry == "ScopedSession" else AsyncEngine
    engines: list[Engine] = []
    for index, replica in enumerate(replicas):
        if not isinstance(replica, kind):
            raise TypeError(f"'replicas[{index}]' must be {_an(kind)} like the primary's; got {replica!r}.")
        engine: Engine = replica.sync_engine if isinstance(replica, AsyncEngine) else replica
        if engine is primary:
            raise ValueError(f"'replicas[{index}]' is the primary's own engine. List only the replicas' engines.")
        if engine.dialect.name != primary.dialect.name:
            raise ValueError(
                f"'replicas[{index}]' is a {engine.dialect.name} database and the primary a {primary.dialect.name} "
                "one; a replica must be a copy of the primary."
            )
        engines.append(engine)
    if len(set(engines)) != len(engines):
        raise ValueError("'replicas' names the same engine twice; give each replica once.")
    return Router(bound, primary, engines, float(cooldown))


def _primary_engine(engine: object, registry: str) -> Engine:
    """The primary's (sync) engine, from what the registry's session factory is bound to."""
    if isinstance(engine, AsyncEngine):
        return engine.sync_engine
    if isinstance(engine, Engine):
        return engine
    raise TypeError(
        f"A {registry} with 'replicas' needs a primary engine: give it the engine, or a session factory bound to "
        f"one ('bind=engine'); its session factory has bind={engine!r}."
    )


def _an(kind: type) -> str:
    return "an Engine" if kind is Engine else "an AsyncEngine"


def _name(engine: Engine) -> str:
    return f"'{engine.url.render_as_string(hide_password=True)}'"


# -- the middleware's side: the method, and the read-your-writes cookie ------------------------


def request_reads(scope: Mapping[str, Any], replica_methods: frozenset[str], window: float | None) -> RequestReads:
    """Why the request's reads go to the primary, as far as its method and cookie say (``None``: they need not)."""
    if window is not None and _fresh_cookie(scope):
        return RequestReads(COOKIE_PIN)
    return RequestReads(None if scope.get("method") in replica_methods else METHOD_PIN)


def _fresh_cookie(scope: Mapping[str, Any]) -> bool:
    """True if the request carries a read-your-writes cookie that has not expired, or one that cannot be read.

    A forged or garbled cookie can only send the client's reads to the primary.
    """
    for name, value in scope.get("headers", ()):
        if name == b"cookie" and _COOKIE_PREFIX in value:
            for part in value.split(b";"):
                part = part.strip()
                if part.startswith(_COOKIE_PREFIX):
                    until = part[len(_COOKIE_PREFIX) :]
                    if not (until.isdigit() and len(until) < 16):
                        return True
                    return int(until) > time.time() * 1000
    return False


def cookie_header(window: float, scope: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """The ``Set-Cookie`` header that sends the client's reads to the primary for the next *window* seconds."""
    until = int((time.time() + window) * 1000) + 1
    max_age = max(1, int(window + 0.999))
    value = f"{COOKIE}={until}; Max-Age={max_age}; Path=/; HttpOnly; SameSite=Lax"
    if scope.get("scheme") in ("https", "wss"):
        value += "; Secure"
    return b"set-cookie", value.encode()
