"""Replaying a request whose transaction met a serialization failure or a deadlock: ``Retry``, ``is_retryable()``.

PostgreSQL aborts a transaction with a serialization failure (SQLSTATE
40001) or a deadlock (40P01) and expects the client to run it again; MySQL
and MariaDB do the same with error 1213 (deadlock) and 1205 (lock wait
timeout), which carry no SQLSTATE of their own. The error reaches the app
wrapped: in SQLAlchemy's ``DBAPIError`` (the driver's error is its
``orig``), in asyncpg's adapter (which chains asyncpg's own), in a
``CommitFailedError``; ``is_retryable()`` looks through all of them.

``DBSessionMiddleware(retry=Retry(...))`` runs the whole app again for such
an error, as long as nothing has reached the client: the middleware holds
the status line until the COMMIT's outcome is known, so it can. Each run is
an ``Attempt``; ``replay()`` runs them, with the body recorded as the app
reads it and replayed to the next one.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from typing import Any

import anyio
from sqlalchemy import Engine, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .exceptions import CommitFailedError, first_line
from .policy import route_policy
from .registry import route_name

__all__ = ["Retry", "is_retryable"]

logger = logging.getLogger("starlette_alchemy")

# PostgreSQL: serialization_failure, deadlock_detected.
RETRYABLE_SQLSTATES = frozenset(("40001", "40P01"))
# MySQL and MariaDB: ER_LOCK_DEADLOCK, ER_LOCK_WAIT_TIMEOUT.
RETRYABLE_MYSQL_ERRORS = frozenset((1213, 1205))

# The key under which the middleware puts the current ``Attempt`` in each attempt's ASGI scope.
ATTEMPT_KEY = "starlette_alchemy.attempt"
# The longest wait between two attempts, in seconds, whatever the backoff and the attempt.
MAX_DELAY = 0.5


def is_retryable(error: BaseException) -> bool:
    """True if *error*, or an error it wraps, says the transaction may succeed if run again.

    Recognises PostgreSQL's SQLSTATE 40001 and 40P01 (psycopg, psycopg2,
    asyncpg) and MySQL's errors 1213 and 1205 (PyMySQL, aiomysql, asyncmy,
    mysqlclient), through SQLAlchemy's wrappers and the chain of causes.
    """
    return any(_retryable_itself(current) for current in _chain(error))


def _chain(error: BaseException) -> Iterable[BaseException]:
    """*error* and every error it wraps: SQLAlchemy's ``orig``, causes and contexts, each once."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [getattr(current, "orig", None), current.__cause__, current.__context__]


def _retryable_itself(error: BaseException) -> bool:
    for attribute in ("sqlstate", "pgcode"):
        code = getattr(error, attribute, None)
        if isinstance(code, str) and code in RETRYABLE_SQLSTATES:
            return True
    # A MySQL driver's error: its number in 'errno' (mysql-connector, mariadb), or first in its args (the others).
    number = getattr(error, "errno", None)
    if number is None and error.args:
        number = error.args[0]
    return type(number) is int and number in RETRYABLE_MYSQL_ERRORS and _from_mysql(error)


def _from_mysql(error: BaseException) -> bool:
    """True if *error* comes from a MySQL driver, whose errors start with the error number."""
    module = type(error).__module__.split(".", 1)[0]
    return module in ("pymysql", "aiomysql", "asyncmy", "MySQLdb", "mysql", "mariadb")


class Retry:
    """How ``DBSessionMiddleware`` replays a request that met a transient database error.

    *attempts* counts every run, the first included; *backoff* is the base
    delay in seconds, doubled per attempt with full jitter and capped at half
    a second; bodies of up to *max_body* bytes are recorded for the replay;
    *retry_on(error)* says which errors are transient.
    """

    __slots__ = ("attempts", "backoff", "max_body", "retry_on")

    def __init__(
        self,
        attempts: int = 3,
        *,
        backoff: float = 0.01,
        max_body: int = 1 << 20,
        retry_on: Callable[[BaseException], bool] = is_retryable,
    ) -> None:
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError(f"'attempts' must be a whole number, 1 or more (the first run counts); got {attempts!r}.")
        if isinstance(backoff, bool) or not isinstance(backoff, int | float) or not backoff >= 0:
            raise ValueError(f"'backoff' must be a number of seconds, 0 or more; got {backoff!r}.")
        if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 0:
            raise ValueError(f"'max_body' must be a number of bytes, 0 or more; got {max_body!r}.")
        if not callable(retry_on):
            raise TypeError(f"'retry_on' must be a function of the error, True to retry; got {retry_on!r}.")
        self.attempts = attempts
        self.backoff = float(backoff)
        self.max_body = max_body
        self.retry_on = retry_on

    def __repr__(self) -> str:
        return f"Retry(attempts={self.attempts}, backoff={self.backoff}, max_body={self.max_body})"

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number *attempt* (1 for the first): full jitter, capped."""
        return random.uniform(0, min(MAX_DELAY, self.backoff * 2 ** (attempt - 1)))


class _Replay(BaseException):
    """Raised from ``send`` to stop an attempt whose 5xx is not forwarded: no handler may swallow it."""


class Attempt:
    """One run of the app for a request that may be replayed, and what decides whether it is."""

    __slots__ = ("body", "committed", "errors", "number", "retry", "scope", "sent", "verdict")

    def __init__(self, number: int, retry: Retry, body: _Body, scope: Scope) -> None:
        self.number = number
        self.retry = retry
        self.body = body
        self.scope = scope
        # Database errors the attempt's connections raised, which an exception handler may have turned into a 5xx.
        self.errors: list[BaseException] = []
        self.sent = False  # the app's status line was forwarded: from then on, nothing is replayed
        self.committed = False  # a transaction of the request committed: replaying would repeat its writes
        self.verdict: bool | None = None  # once decided, whether this attempt is replayed

    def replays(self, error: BaseException) -> bool:
        """Decide, once, whether the attempt that *error* ended is run again; say why not, if not."""
        if self.verdict is None:
            self.verdict = self._transient(error) and self._may_replay(error)
        return self.verdict

    def replays_status(self, status: int) -> bool:
        """Decide whether an attempt answering *status* is run again: a 5xx made of a transient error is."""
        if self.verdict is None and status >= 500:
            for error in self.errors:
                if self._transient(error):
                    self.verdict = self._may_replay(error, status)
                    break
        return bool(self.verdict)

    def _transient(self, error: BaseException) -> bool:
        try:
            return bool(self.retry.retry_on(error))
        except Exception:
            # A bug in retry_on must not hide the request's own error.
            logger.exception("'retry_on' raised on %s; the request is not replayed.", type(error).__name__)
            return False

    def _may_replay(self, error: BaseException, status: int | None = None) -> bool:
        why_not = self._why_not(error)
        request = route_name(self.scope)
        what = _describe(error)
        if status is not None:
            what = f"a {status} made of {what}"
        if why_not is None:
            logger.info(
                "%s met %s; replaying it (attempt %d of %d).", request, what, self.number + 1, self.retry.attempts
            )
            return True
        if why_not == _EXHAUSTED:
            logger.warning("%s met %s in each of its %d attempts; giving up.", request, what, self.number)
        else:
            logger.debug("%s met %s; not replayed: %s.", request, what, why_not)
        return False

    def _why_not(self, error: BaseException) -> str | None:
        """Why the attempt may not run again, or ``None`` if it may."""
        if self.sent:
            return "its response had started"
        if self.committed or _partly_committed(error):
            return "a database had already committed its transaction, so a replay would repeat its writes"
        policy = route_policy(self.scope)
        if policy is not None and policy.manual:
            return "its route is '@transaction(manual=True)'"
        if policy is not None and policy.retry is False:
            return "its route is '@transaction(retry=False)'"
        if not self.body.replayable:
            return f"its body was larger than 'max_body' ({self.retry.max_body} bytes), so it was not recorded"
        if self.number >= self.retry.attempts:
            return _EXHAUSTED
        return None

    def send(self, send: Send) -> Send:
        """*send*, holding back a 5xx status line that a replay will answer instead."""

        def send_or_replay(message: Message) -> Awaitable[None]:
            if message["type"] == "http.response.start":
                if self.errors and self.replays_status(message["status"]):
                    raise _Replay()
                self.sent = True
            return send(message)

        return send_or_replay


_EXHAUSTED = "no attempt is left"


def _partly_committed(error: BaseException) -> bool:
    """True if *error* is (or wraps) a COMMIT that failed after another database had committed."""
    return any(isinstance(current, CommitFailedError) and current.committed for current in _chain(error))


def _describe(error: BaseException) -> str:
    """Name an error on one line: a failed COMMIT by the database's own error."""
    cause = error.__cause__
    if isinstance(error, CommitFailedError) and cause is not None:
        return f"a failed COMMIT ({type(cause).__name__}: {first_line(cause).rstrip('.')})"
    return f"{type(error).__name__}: {first_line(error).rstrip('.')}"


class _Body:
    """The request's body messages, recorded as the first attempt reads them, up to a size, for the next ones."""

    __slots__ = ("limit", "messages", "receive", "replayable", "size")

    def __init__(self, receive: Receive, limit: int) -> None:
        self.receive = receive
        self.limit = limit
        self.messages: list[Message] = []
        self.size = 0
        self.replayable = True

    def for_attempt(self) -> Receive:
        """A ``receive`` that gives what was recorded first, then reads (and records) the rest."""
        position = 0

        async def receive() -> Message:
            nonlocal position
            if position < len(self.messages):
                position += 1
                return self.messages[position - 1]
            message = await self.receive()
            if self.replayable and message["type"] == "http.request":
                self.size += len(message.get("body", b""))
                if self.size > self.limit:
                    self.replayable = False
                    self.messages = []  # never replayed: let go of it
                else:
                    self.messages.append(message)
                    position += 1
            return message

        return receive


# -- the attempts' database errors --------------------------------------------------------------

# The attempt running in this context: its connections' errors are noted in it (the handle_error listener).
_current: ContextVar[Attempt | None] = ContextVar("starlette_alchemy.attempt", default=None)
_ERRORS_KEPT = 20


def watch_errors(engines: Iterable[Engine | AsyncEngine]) -> None:
    """Note in the current attempt every error the connections of *engines* raise (once per engine)."""
    for engine in engines:
        sync = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        if not event.contains(sync, "handle_error", _note_error):
            event.listen(sync, "handle_error", _note_error)


def _note_error(context: ExceptionContext) -> None:
    attempt = _current.get()
    if attempt is not None and len(attempt.errors) < _ERRORS_KEPT:
        attempt.errors.append(context.sqlalchemy_exception or context.original_exception)


# -- the attempts -------------------------------------------------------------------------------


async def replay(retry: Retry, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Run *app* for an HTTP request until an attempt is not replayed: it answered, or its error is raised."""
    pristine = _copy(scope)
    body = _Body(receive, retry.max_body)
    number = 1
    while True:
        attempt = Attempt(number, retry, body, scope)
        scope[ATTEMPT_KEY] = attempt
        token = _current.set(attempt)
        try:
            await app(scope, body.for_attempt(), attempt.send(send))
            return
        except BaseException as error:
            if not _replayed(attempt, error):
                raise
        finally:
            _current.reset(token)
            # Copies of the attempt's context outlive it (an idle worker thread keeps its last one):
            # the errors it noted must not keep their tracebacks, and the sessions in them, alive.
            attempt.errors.clear()
            # The scope and the attempt refer to each other: without this, each request would be freed
            # only by the cyclic garbage collector.
            scope.pop(ATTEMPT_KEY, None)
        # The attempt's sessions are closed and its scopes ended: nothing of it is left but the wait.
        await anyio.sleep(retry.delay(number))
        number += 1
        scope.clear()
        scope.update(_copy(pristine))


def _replayed(attempt: Attempt, error: BaseException) -> bool:
    """True if the attempt that *error* ended is run again."""
    if isinstance(error, Exception):
        return attempt.replays(error)
    # Never after a cancellation: only the 5xx held back (perhaps inside a task group's exception group) is replayed.
    return _only_replays(error)


def _only_replays(error: BaseException) -> bool:
    if isinstance(error, _Replay):
        return True
    inner = getattr(error, "exceptions", None)
    return isinstance(inner, tuple) and bool(inner) and all(_only_replays(each) for each in inner)


def _copy(scope: Scope) -> dict[str, Any]:
    """The ASGI scope as the request came in, with a ``state`` of its own, for each attempt to start from."""
    copy = dict(scope)
    state = copy.get("state")
    if isinstance(state, dict):
        copy["state"] = dict(state)
    return copy
