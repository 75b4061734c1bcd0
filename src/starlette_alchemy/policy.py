"""Per-route transaction policy (``@transaction``), and what runs on a scope's connection at BEGIN.

``transaction(...)`` marks an endpoint with a ``Policy``; the registry reads it
from the ASGI scope's ``endpoint`` when the request's session is created (the
connection's characteristics: isolation level, read-only), and the middleware
when it settles (``commit_on``, ``manual``). At each BEGIN of a scope's
session, ``begin()`` sets the transaction-local state: the statement timeout,
then the registry's ``on_begin`` hooks, which see the scope's ``info``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypedDict, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["BeginHook", "Policy", "ScopeOptions", "TransactionOptions", "transaction"]

logger = logging.getLogger("starlette_alchemy")

IsolationLevel = Literal["SERIALIZABLE", "REPEATABLE READ", "READ COMMITTED", "READ UNCOMMITTED"]
# ``hook(connection, info)``: runs after each BEGIN of a scope's session, on the connection that began.
BeginHook = Callable[[Connection, dict[str, Any]], None]
_F = TypeVar("_F", bound=Callable[..., Any])


class ScopeOptions(TypedDict, total=False):
    """The options of ``db.scope(...)``: those that apply outside a request."""

    read_only: bool
    isolation_level: IsolationLevel
    statement_timeout: float
    primary: bool
    max_queries: int


class TransactionOptions(ScopeOptions, total=False):
    """The options of ``@transaction(...)``."""

    commit_on: Callable[[int], bool]
    manual: bool
    retry: bool


@dataclass(frozen=True, slots=True)
class Policy:
    """How one route's (or one ``db.scope()``'s) transaction behaves; ``None`` means the app-wide default."""

    read_only: bool = False
    isolation_level: IsolationLevel | None = None
    statement_timeout: float | None = None
    commit_on: Callable[[int], bool] | None = None
    manual: bool = False
    # Read by the read replicas (``primary``, routing.py) and query statistics (``max_queries``); stored for retries.
    retry: bool | None = None
    primary: bool = False
    max_queries: int | None = None
    # characteristics() on PostgreSQL, with psycopg and elsewhere, computed once: each request's session reads them.
    _on_postgresql: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)
    _on_psycopg: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)
    _elsewhere: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_on_postgresql", self.characteristics("postgresql") or None)
        object.__setattr__(self, "_on_psycopg", self.characteristics("postgresql", "psycopg") or None)
        object.__setattr__(self, "_elsewhere", self.characteristics("") or None)

    def characteristics(self, dialect: str, driver: str = "") -> dict[str, Any]:
        """The execution options the connection needs before BEGIN; SQLAlchemy resets them at check-in."""
        options: dict[str, Any] = {}
        if self.isolation_level is not None:
            options["isolation_level"] = self.isolation_level
        if self.read_only and dialect == "postgresql" and driver != "psycopg":
            # asyncpg puts it in the BEGIN itself ("BEGIN READ ONLY"): no round trip of its own.
            # psycopg does too, but is set directly, for a fifth of the cost (sessions.py: _begin_read_only()).
            options["postgresql_readonly"] = True
        return options


_ATTRIBUTE = "__starlette_alchemy_transaction__"
_REQUEST_ONLY = ("commit_on", "manual", "retry")
_ISOLATION_LEVELS = ("SERIALIZABLE", "REPEATABLE READ", "READ COMMITTED", "READ UNCOMMITTED")


def transaction(**options: Unpack[TransactionOptions]) -> Callable[[_F], _F]:
    """Mark an endpoint with how its request's transaction behaves; the endpoint itself is returned unchanged.

    Decorate a Starlette endpoint function, an ``HTTPEndpoint`` method or a
    FastAPI path function, sync or async; FastAPI still sees its signature.
    """
    policy = _policy(dict(options), "transaction()")

    def mark(endpoint: _F) -> _F:
        try:
            setattr(endpoint, _ATTRIBUTE, policy)
        except AttributeError:
            raise TypeError(
                f"@transaction(...) marks a function, and {endpoint!r} takes no attribute. "
                "Decorate the endpoint function, or the method inside its class."
            ) from None
        return endpoint

    if options.get("manual") and "commit_on" in options:
        raise ValueError(
            "@transaction(manual=True) routes are never committed by the middleware, so 'commit_on' would do "
            "nothing. Drop one of them."
        )
    return mark


def scope_policy(options: Mapping[str, Any]) -> Policy | None:
    """The policy of a ``db.scope(**options)``, or ``None`` without options; wrong ones are refused."""
    if not options:
        return None
    for name in _REQUEST_ONLY:
        if name in options:
            raise TypeError(
                f"'{name}' belongs to requests ('@transaction({name}=...)' on the endpoint), not to 'db.scope()', "
                "which commits on a clean exit (or not, with 'commit=False')."
            )
    return _policy(dict(options), "db.scope()")


def route_policy(scope: Mapping[str, Any]) -> Policy | None:
    """The policy of the endpoint the router matched for this ASGI scope; ``None`` before routing or unmarked."""
    endpoint = scope.get("endpoint")
    if endpoint is None:
        return None
    policy: Policy | None = getattr(endpoint, _ATTRIBUTE, None)
    if policy is None and isinstance(endpoint, type):
        # An HTTPEndpoint: the method that handles this request, picked as Starlette picks it.
        method = scope.get("method", "GET").lower()
        if method == "head" and not hasattr(endpoint, "head"):
            method = "get"
        policy = getattr(getattr(endpoint, method, None), _ATTRIBUTE, None)
    return policy


# -- validation ---------------------------------------------------------------------------

_BOOL = ("True or False", lambda value: isinstance(value, bool))
_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "read_only": _BOOL,
    "isolation_level": (f"one of {', '.join(map(repr, _ISOLATION_LEVELS))}", lambda value: isinstance(value, str)),
    "statement_timeout": (
        "a number of seconds",
        lambda value: isinstance(value, int | float) and not isinstance(value, bool),
    ),
    "commit_on": ("a function of the status code, True to commit: 'lambda status: ...'", callable),
    "manual": _BOOL,
    "retry": _BOOL,
    "primary": _BOOL,
    "max_queries": ("a whole number of queries", lambda value: isinstance(value, int) and not isinstance(value, bool)),
}


def _policy(options: dict[str, Any], where: str) -> Policy:
    """Check *options* as *where* takes them and build their ``Policy``."""
    for name, value in options.items():
        if name not in _KINDS:
            accepted = ", ".join(name for name in _KINDS if where != "db.scope()" or name not in _REQUEST_ONLY)
            raise TypeError(f"{where} has no option {name!r}; it takes {accepted}.")
        expected, accepts = _KINDS[name]
        if not accepts(value):
            raise TypeError(f"{where}: {name!r} must be {expected}; got {value!r} ({type(value).__name__}).")
    level = options.get("isolation_level")
    if level is not None:
        options["isolation_level"] = _isolation_level(level, where)
    timeout = options.get("statement_timeout")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"{where}: 'statement_timeout' must be more than 0 seconds; got {timeout!r}.")
    queries = options.get("max_queries")
    if queries is not None and queries < 1:
        raise ValueError(f"{where}: 'max_queries' must be at least 1; got {queries!r}.")
    return Policy(**options)


def _isolation_level(level: str, where: str) -> IsolationLevel:
    normal = " ".join(level.replace("_", " ").upper().split())
    if normal == "AUTOCOMMIT":
        raise ValueError(
            f"{where}: 'AUTOCOMMIT' would commit each statement on its own, so the request would have no "
            "transaction to commit or roll back. Use a scope of its own per statement instead."
        )
    if normal not in _ISOLATION_LEVELS:
        raise ValueError(
            f"{where}: 'isolation_level' must be one of {', '.join(map(repr, _ISOLATION_LEVELS))}; got {level!r}."
        )
    return normal  # type: ignore[return-value]


# -- at session creation: the connection's characteristics ------------------------------------------


def characteristics_for(bind: object, policy: Policy) -> dict[str, Any] | None:
    """The execution options a session bound to *bind* gives each transaction's connection, or ``None``.

    ``None`` when there are none, and when *bind* is not an engine (a
    connection the testing kit holds, or a ``binds`` mapping): such a
    session's connection keeps its own, and the ORM's read-only guard still applies.
    """
    if not isinstance(bind, Engine | AsyncEngine):
        return None
    # Shared by every session of the policy's routes: nothing may change it.
    dialect = bind.dialect
    if dialect.name != "postgresql":
        return policy._elsewhere
    return policy._on_psycopg if dialect.driver == "psycopg" else policy._on_postgresql


def read_only_at_begin(bind: object, policy: Policy) -> bool:
    """True if a session bound to *bind* sets psycopg's ``read_only`` itself at each BEGIN (sessions.py)."""
    return policy.read_only and isinstance(bind, Engine | AsyncEngine) and bind.dialect.driver == "psycopg"


# -- at BEGIN: transaction-local state, then the on_begin hooks --------------------------------------


class BeginScope(Protocol):
    """What ``begin()`` reads of the scope whose session began (``ScopeState``, registry.py)."""

    policy: Policy | None
    on_begin: list[BeginHook]

    @property
    def info(self) -> dict[str, Any]: ...

    def describe(self) -> str: ...


def begin(connection: Connection, scope: BeginScope) -> None:
    """Set up the transaction that *connection* just began for *scope*: its statement timeout, then the hooks."""
    policy = scope.policy
    if policy is not None and policy.statement_timeout is not None:
        _set_statement_timeout(connection, policy.statement_timeout, scope)
    if scope.on_begin:
        info = scope.info
        for hook in scope.on_begin:
            hook(connection, info)


def _set_statement_timeout(connection: Connection, seconds: float, scope: BeginScope) -> None:
    if connection.dialect.name == "postgresql":
        # SET LOCAL: it ends with the transaction, so the pooled connection's next user never sees it.
        connection.exec_driver_sql(f"SET LOCAL statement_timeout = {max(1, round(seconds * 1000))}")
        return
    warn_once(
        scope.describe(),
        "statement_timeout",
        "'statement_timeout' is ignored in %s: %s has no timeout local to a transaction. "
        "Set one on the engine's connections instead, or drop the option.",
        connection.dialect.name,
    )


_warned: set[tuple[str, str]] = set()


def warn_once(route: str, about: str, message: str, *args: Any, seen: set[tuple[str, str]] | None = None) -> None:
    """Log *message* at WARNING the first time *route* meets *about* in this process, or in *seen* (bounded)."""
    warned = _warned if seen is None else seen
    key = (route, about)
    if key not in warned and len(warned) < 1000:
        warned.add(key)
        logger.warning(message, route, *args)
