"""``DBSessionMiddleware``: one session scope per request, committed before the status line."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Literal

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import sessionmaker
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .exceptions import CommitFailedError, first_line
from .observe import server_timing
from .policy import route_policy
from .retry import ATTEMPT_KEY, Attempt, Retry, replay, watch_errors
from .routing import METHOD_PIN, RequestReads, cookie_header, request_reads
from .scoped import AsyncScopedSession, ScopedSession
from .settle import (
    AnyScopedSession,
    Opened,
    after_commit_ready,
    commit_or_roll_back,
    end,
    forget,
    in_use,
    open_scopes,
    run_after_commit,
    seal,
)

__all__ = ["DBSessionMiddleware"]

logger = logging.getLogger("starlette_alchemy")

# The key under which the middleware lists its registries in each ASGI scope (see fastapi.py).
SCOPE_KEY = "starlette_alchemy.registries"


def commit_2xx_3xx(status: int) -> bool:
    """The default ``commit_on``: commit for 2xx and 3xx (Post/Redirect/Get), roll back otherwise."""
    return 200 <= status < 400


class DBSessionMiddleware:
    """Open a session scope for each request, commit it before the response starts, always close it.

    The commit happens when the app sends ``http.response.start`` and before that
    message is forwarded, so a failed COMMIT turns into a 500, never a 2xx. Add it
    with ``Middleware(DBSessionMiddleware, db=db)``, so Starlette's error
    middleware stays outside it and answers that 500. ``on_commit_failure(exc)``
    may answer instead (a 409 for a conflict, say) by returning a ``Response``.
    After-commit hooks and ``on_commit`` callbacks run once the response has
    been sent.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        db: AnyScopedSession | Sequence[AnyScopedSession],
        commit_on: Callable[[int], bool] | None = None,
        on_commit_failure: Callable[[CommitFailedError], Response | None] | None = None,
        websocket: Literal["manual", "off"] = "manual",
        server_timing: bool = False,
        read_your_writes: float | None = 5.0,
        replica_methods: Iterable[str] = ("GET", "HEAD", "OPTIONS"),
        retry: Retry | None = None,
    ) -> None:
        self.app = app
        self.registries = _registries(db)
        # Read replicas: only when a registry has some does a request carry routing (and get the cookie).
        self.routed = any(registry.registry.router is not None for registry in self.registries)
        self.read_your_writes = _window(read_your_writes)
        self.replica_methods = _methods(replica_methods)
        _check_callable("commit_on", commit_on, "a function of the status code, True to commit: 'lambda status: ...'")
        _check_callable("on_commit_failure", on_commit_failure, "a function of the error returning a Response or None")
        if websocket not in ("manual", "off"):
            raise ValueError(
                f"'websocket' must be 'manual' (one scope per connection, the handler commits) or 'off' "
                f"(no scope); got {websocket!r}."
            )
        self.commit_on = commit_on or commit_2xx_3xx
        self.on_commit_failure = on_commit_failure
        self.websocket = websocket
        if not isinstance(server_timing, bool):
            raise TypeError(f"'server_timing' must be True or False; got {server_timing!r}.")
        self.server_timing = server_timing
        if retry is not None and not isinstance(retry, Retry):
            raise TypeError(f"'retry' must be a Retry, such as 'Retry(attempts=3)', or None; got {retry!r}.")
        self.retry = retry
        if retry is not None:
            # An exception handler may turn a conflict into a 5xx: the attempt learns of it from its connections.
            watch_errors(engine for registry in self.registries for engine in _engines(registry))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # HTTP is handled here rather than in a method of its own: one coroutine
        # less per request is a measurable share of a request that never uses the database.
        if scope["type"] != "http":
            await self._not_http(scope, receive, send)
            return
        if self.retry is not None and ATTEMPT_KEY not in scope:
            await replay(self.retry, self, scope, receive, send)  # which calls back here for each attempt
            return
        scope[SCOPE_KEY] = self.registries
        reads = request_reads(scope, self.replica_methods, self.read_your_writes) if self.routed else None
        opened = open_scopes(self.registries, scope, reads)

        # A plain function returning the awaitable: forwarding a message costs no coroutine of its own.
        def send_after_settling(message: Message) -> Awaitable[None]:
            kind = message["type"]
            if kind == "http.response.start":
                if in_use(opened):
                    return self._settle_then_send(opened, message, send, scope, reads)
                seal(opened)
                if reads is not None:
                    message = self._with_cookie(message, reads, scope)
            elif kind == "http.response.body" and not message.get("more_body") and after_commit_ready(opened):
                return _send_then_run_after_commit(opened, message, send)
            return send(message)

        try:
            try:
                await self.app(scope, receive, send_after_settling)
            except CommitFailedError as exc:
                if self.retry is not None and _replays(scope, exc):
                    raise  # the request runs again; its last attempt's failure is answered as without retry
                await self._answer_commit_failure(exc, scope, receive, send)
        except BaseException as exc:
            await end(opened, error=exc)
            raise
        if in_use(opened):
            await end(opened)
        else:
            forget(opened)  # no session was ever created: nothing to await

    async def _settle_then_send(
        self, opened: Opened, message: Message, send: Send, scope: Scope, reads: RequestReads | None
    ) -> None:
        # Don't forward the status line until the transaction's outcome is known.
        status = message["status"]
        policy = route_policy(scope)
        if policy is None:
            commit = self.commit_on(status)
            await commit_or_roll_back(opened, status=status, commit=commit)
        else:
            commit = not policy.manual and (policy.commit_on or self.commit_on)(status)
            await commit_or_roll_back(opened, status=status, commit=commit, manual=policy.manual)
        if commit and status >= 500 and self.retry is not None:
            _note_commit(scope)  # a 5xx that committed (its route's commit_on) is never replayed
        if self.server_timing:
            message = _with_server_timing(message, opened)
        if reads is not None:
            message = self._with_cookie(message, reads, scope)
        await send(message)

    def _with_cookie(self, message: Message, reads: RequestReads, scope: Scope) -> Message:
        """The status line, with the read-your-writes cookie if the request's scopes committed writes."""
        if not reads.wrote or self.read_your_writes is None:
            return message
        # A copy: the app's Response keeps the list it sent, and may send it again.
        headers = [*message.get("headers", ()), cookie_header(self.read_your_writes, scope)]
        return {**message, "headers": headers}

    async def _answer_commit_failure(self, exc: CommitFailedError, scope: Scope, receive: Receive, send: Send) -> None:
        # The handler's status line was never forwarded, so another response still can be.
        response = self.on_commit_failure(exc) if self.on_commit_failure is not None else None
        if response is None:
            logger.error("%s The client gets a 500.", exc, exc_info=True)
            raise exc
        # Name the error itself, on one line.
        cause = exc.__cause__
        logger.info(
            "%s The error: %s: %s. 'on_commit_failure' answered %d.",
            exc,
            type(cause).__name__,
            first_line(cause),
            response.status_code,
        )
        await response(scope, receive, send)

    async def _not_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and self.websocket == "manual":
            scope[SCOPE_KEY] = self.registries
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A WebSocket has no method that says it only reads: its scopes read from the primary.
        opened = open_scopes(self.registries, scope, RequestReads(METHOD_PIN) if self.routed else None)
        try:
            await self.app(scope, receive, send)
        except BaseException as exc:
            await end(opened, error=exc)
            raise
        await end(opened)


def _registries(db: object) -> tuple[AnyScopedSession, ...]:
    """The registries that ``db`` names, or a ``TypeError``/``ValueError`` that says how to name them."""
    if isinstance(db, ScopedSession | AsyncScopedSession):
        return (db,)
    if not isinstance(db, list | tuple):
        raise TypeError(f"'db' must be a ScopedSession or an AsyncScopedSession, or a list of them; {_got(db)}")
    if not db:
        raise ValueError("'db' is an empty list, so the middleware would manage no database. Give it a registry.")
    for index, registry in enumerate(db):
        if not isinstance(registry, ScopedSession | AsyncScopedSession):
            raise TypeError(f"'db[{index}]' must be a ScopedSession or an AsyncScopedSession; {_got(registry)}")
    if len({id(registry) for registry in db}) != len(db):
        raise ValueError("'db' names the same registry twice; give each registry once.")
    return tuple(db)


def _got(value: object) -> str:
    """What was given, and how to turn it into a registry."""
    if isinstance(value, AsyncEngine | async_sessionmaker):
        fix = " Wrap it: 'AsyncScopedSession(...)'."
    elif isinstance(value, Engine | sessionmaker):
        fix = " Wrap it: 'ScopedSession(...)'."
    elif isinstance(value, str):
        fix = " Create an engine from the URL, and a registry from it: 'AsyncScopedSession(create_async_engine(url))'."
    elif isinstance(value, set | frozenset):
        fix = " A set has no order, and registries commit in order: give a list."
    else:
        fix = ""
    return f"got {value!r} ({type(value).__name__}).{fix}"


def _engines(registry: AnyScopedSession) -> list[Engine | AsyncEngine]:
    """The engines a registry's sessions connect to: its bind (or binds), and its replicas."""
    options = registry.session_factory.kw
    binds = [options.get("bind"), *(options.get("binds") or {}).values()]
    router = registry.registry.router
    if router is not None:
        binds += router.replicas
    return [bind for bind in binds if isinstance(bind, Engine | AsyncEngine)]


def _replays(scope: Scope, error: CommitFailedError) -> bool:
    attempt: Attempt | None = scope.get(ATTEMPT_KEY)
    return attempt is not None and attempt.replays(error)


def _note_commit(scope: Scope) -> None:
    attempt: Attempt | None = scope.get(ATTEMPT_KEY)
    if attempt is not None:
        attempt.committed = True


def _window(seconds: object) -> float | None:
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
        raise ValueError(
            f"'read_your_writes' must be a number of seconds, more than 0 (how long a client that wrote reads from "
            f"the primary), or None to turn it off; got {seconds!r}."
        )
    return float(seconds)


def _methods(methods: object) -> frozenset[str]:
    listed = list(methods) if isinstance(methods, Iterable) and not isinstance(methods, str | bytes) else None
    if listed is None or not all(isinstance(method, str) for method in listed):
        raise TypeError(f"'replica_methods' must be a list of HTTP methods, such as ['GET', 'HEAD']; got {methods!r}.")
    return frozenset(method.upper() for method in listed)


def _check_callable(name: str, value: object, expected: str) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"'{name}' must be {expected}; got {value!r} ({type(value).__name__}).")


def _with_server_timing(message: Message, opened: Opened) -> Message:
    """The status line with the database time, COMMIT included, in ``Server-Timing`` (merged with the app's)."""
    metric = server_timing([state.meter for _, state, _ in opened])
    if metric is None:
        return message
    headers = list(message.get("headers", ()))
    for index, (name, value) in enumerate(headers):
        if name.lower() == b"server-timing":
            headers[index] = (name, value + b", " + metric)
            break
    else:
        headers.append((b"server-timing", metric))
    # A copy: the app's Response keeps the list it sent, and may send it again.
    return {**message, "headers": headers}


async def _send_then_run_after_commit(opened: Opened, message: Message, send: Send) -> None:
    """Forward the response's last message, then run the after-commit work: a slow hook never delays a response."""
    await send(message)
    await run_after_commit(opened)
