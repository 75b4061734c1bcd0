"""``DBSessionMiddleware``: one session scope per request, committed before the status line."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import Token
from typing import Any, Literal
from weakref import WeakKeyDictionary

import anyio
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .exceptions import CommitFailedError
from .scoped import AsyncScopedSession, ScopedSession, ScopeState, _acommit_or_discard, _commit_or_discard, _sync

__all__ = ["DBSessionMiddleware"]

logger = logging.getLogger("starlette_alchemy")

AnyScopedSession = ScopedSession[Any] | AsyncScopedSession[Any]
# The key under which the middleware lists its registries in each ASGI scope (see fastapi.py).
SCOPE_KEY = "starlette_alchemy.registries"
_Opened = list[tuple[AnyScopedSession, ScopeState[Any], Token[Any]]]


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
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        db: AnyScopedSession | Sequence[AnyScopedSession],
        commit_on: Callable[[int], bool] | None = None,
        on_commit_failure: Callable[[CommitFailedError], Response | None] | None = None,
        websocket: Literal["manual", "off"] = "manual",
    ) -> None:
        assert websocket in ("manual", "off"), "'websocket' must be 'manual' or 'off'."
        self.app = app
        self.registries: tuple[AnyScopedSession, ...] = tuple(db) if isinstance(db, Sequence) else (db,)
        self.commit_on = commit_on or commit_2xx_3xx
        self.on_commit_failure = on_commit_failure
        self.websocket = websocket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # HTTP is handled here rather than in a method of its own: one coroutine
        # less per request is a measurable share of a request that never uses the database.
        if scope["type"] != "http":
            await self._not_http(scope, receive, send)
            return
        scope[SCOPE_KEY] = self.registries
        opened = _open(self.registries)

        # A plain function returning the awaitable: forwarding a message costs no coroutine of its own.
        def send_after_settling(message: Message) -> Awaitable[None]:
            if message["type"] == "http.response.start":
                if _in_use(opened):
                    return self._settle_then_send(opened, message, send)
                _seal(opened)
            return send(message)

        try:
            await self.app(scope, receive, send_after_settling)
        except CommitFailedError as exc:
            # The handler's status line was never forwarded, so another response still can be.
            response = self.on_commit_failure(exc) if self.on_commit_failure is not None else None
            if response is None:
                logger.error("%s The client gets a 500.", exc, exc_info=True)
                raise
            logger.info("%s 'on_commit_failure' answered %d.", exc, response.status_code)
            await response(scope, receive, send)
        finally:
            if _in_use(opened):
                await _close(opened)
            else:
                _reset(opened)

    async def _settle_then_send(self, opened: _Opened, message: Message, send: Send) -> None:
        # Don't forward the status line until the transaction's outcome is known.
        await _settle(opened, commit=self.commit_on(message["status"]))
        await send(message)

    async def _not_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and self.websocket == "manual":
            scope[SCOPE_KEY] = self.registries
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        opened = _open(self.registries)
        try:
            await self.app(scope, receive, send)
        finally:
            for _, state, _ in opened:
                if state.session is not None and state.session.in_transaction():
                    logger.warning(
                        "A WebSocket connection closed with a transaction still open on %s; it was rolled back. "
                        "Commit explicitly, or use 'db.scope()' for each message.",
                        _describe(state.session),
                    )
            await _close(opened)


def _open(registries: tuple[AnyScopedSession, ...]) -> _Opened:
    """Open a fresh scope on every registry, in the current context."""
    return [(registry, *registry.registry.open()) for registry in registries]


def _in_use(opened: _Opened) -> bool:
    """True if a scope created its session or collector: the request has something to settle."""
    for _, state, _ in opened:
        if state.session is not None or state.collector is not None:
            return True
    return False


def _seal(opened: _Opened) -> None:
    for _, state, _ in opened:
        state.sealed = True


async def _settle(opened: _Opened, *, commit: bool) -> None:
    """Commit (or roll back) every scope's transaction, seal the sessions, run after-commit hooks."""
    committed: list[str] = []
    try:
        for _, state, _ in opened:
            session = state.session
            commits = commit and not state.doomed
            if session is not None and session.in_transaction():
                if commits:
                    # A request cancelled while it ran must not commit on its way out.
                    await anyio.lowlevel.checkpoint_if_cancelled()
                    await _commit(session, committed)
                    committed.append(_describe(session))
                else:
                    with _logging_errors(session, "ROLLBACK"):
                        await _run(session, "rollback")
            if state.collector is not None:
                state.collector._settle(committed=commits)
    finally:
        _seal(opened)
        # Hooks run once the sessions are sealed, and for every database that committed.
        await _run_after_commit(opened)


async def _run_after_commit(opened: _Opened) -> None:
    """Run the after-commit hooks and ``on_commit`` callbacks of the transactions that committed."""
    for registry, state, _ in opened:
        collector = state.collector
        if collector is not None and collector._has_ready:
            if isinstance(registry, AsyncScopedSession):
                await collector._arun_ready()
            else:
                await _in_thread(collector._run_ready, limiter=anyio.to_thread.current_default_thread_limiter())


async def _commit(session: Session | AsyncSession, committed: list[str]) -> None:
    """COMMIT, or raise ``CommitFailedError`` naming the databases that already committed."""
    try:
        if isinstance(session, AsyncSession):
            await _acommit_or_discard(session)
        else:
            await _in_thread(_commit_or_discard, session)
    except Exception as exc:
        where = _describe(session)
        already = f" after {', '.join(committed)} had already committed" if committed else ""
        message = f"COMMIT failed on {where}{already}; the handler's response was not sent."
        raise CommitFailedError(message) from exc


@contextmanager
def _logging_errors(session: Session | AsyncSession, doing: str) -> Iterator[None]:
    """Log an ``Exception`` raised in the block instead of raising it: it must not mask the outcome being reported."""
    try:
        yield
    except Exception:
        logger.exception("%s on %s failed.", doing, _describe(session))


async def _close(opened: _Opened) -> None:
    """Close every session and restore the previous scopes; a cancelled request still releases its connections."""
    try:
        for _, state, _ in opened:
            session = state.session
            if session is None:
                continue
            with _logging_errors(session, "Closing the session"):
                if session.in_transaction():
                    with anyio.CancelScope(shield=True):
                        await _run(session, "close")
                else:
                    _close_without_io(_sync(session))
        # For commits made after the response started (a WebSocket handler's, say).
        await _run_after_commit(opened)
    finally:
        _reset(opened)


def _close_without_io(session: Session) -> None:
    """Close a session that has no transaction, so no connection: that does no I/O, and may do nothing."""
    # One that holds no object either (a request that only called ``db()``) has
    # nothing to release: closing it would cost as much again as creating it.
    if len(session.identity_map) or session.new:
        session.close()


def _reset(opened: _Opened) -> None:
    """Restore the scopes that were current before ``_open()``, and let go of their sessions."""
    for registry, state, token in reversed(opened):
        registry.registry.reset(token)
        # Copies of the request's context outlive it (an idle worker thread keeps
        # its last one): the holder they share must not keep the session alive.
        state.session = None
        state.collector = None


async def _run(session: Session | AsyncSession, method: str) -> None:
    """Call a session method that takes no argument; a sync session's call goes to a worker thread."""
    if isinstance(session, AsyncSession):
        await getattr(session, method)()
    else:
        await _in_thread(getattr(session, method))


async def _in_thread(function: Callable[..., None], *args: Any, limiter: anyio.CapacityLimiter | None = None) -> None:
    """Run blocking session work in a worker thread, by default under the package's own limiter."""
    # An idle worker thread keeps its last job's arguments: hand it a box it
    # empties, so it does not keep a session (and its objects) alive.
    await anyio.to_thread.run_sync(_call_unboxed, [function, args], limiter=limiter or _session_limiter())


def _call_unboxed(box: list[Any]) -> None:
    function, args = box
    box.clear()
    function(*args)


# A limiter of our own, so sessions can always finish even when sync endpoints
# hold every default threadpool token waiting for a pooled connection.
_limiters: WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter] = WeakKeyDictionary()


def _session_limiter() -> anyio.CapacityLimiter:
    loop = asyncio.get_running_loop()
    limiter = _limiters.get(loop)
    if limiter is None:
        limiter = _limiters[loop] = anyio.CapacityLimiter(40)
    return limiter


def _describe(session: Session | AsyncSession) -> str:
    """Name a session's database for log messages, without its password."""
    bind = session.bind
    url = getattr(bind, "url", None)
    return f"'{url.render_as_string(hide_password=True)}'" if url is not None else "the session's database"
