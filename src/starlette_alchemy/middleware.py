"""``DBSessionMiddleware``: one session scope per request, committed before the status line."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .exceptions import CommitFailedError
from .scoped import AsyncScopedSession, ScopedSession
from .settle import Opened, after_commit_ready, commit_or_roll_back, end, in_use, open_scopes, run_after_commit, seal

__all__ = ["DBSessionMiddleware"]

logger = logging.getLogger("starlette_alchemy")

AnyScopedSession = ScopedSession[Any] | AsyncScopedSession[Any]
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
        opened = open_scopes(self.registries, scope)

        # A plain function returning the awaitable: forwarding a message costs no coroutine of its own.
        def send_after_settling(message: Message) -> Awaitable[None]:
            kind = message["type"]
            if kind == "http.response.start":
                if in_use(opened):
                    return self._settle_then_send(opened, message, send)
                seal(opened)
            elif kind == "http.response.body" and not message.get("more_body") and after_commit_ready(opened):
                return _send_then_run_after_commit(opened, message, send)
            return send(message)

        try:
            try:
                await self.app(scope, receive, send_after_settling)
            except CommitFailedError as exc:
                await self._answer_commit_failure(exc, scope, receive, send)
        except BaseException:
            # Cleanup completes, but must not replace the exception in flight.
            await end(opened, reraise=False)
            raise
        await end(opened)

    async def _settle_then_send(self, opened: Opened, message: Message, send: Send) -> None:
        # Don't forward the status line until the transaction's outcome is known.
        await commit_or_roll_back(opened, commit=self.commit_on(message["status"]))
        await send(message)

    async def _answer_commit_failure(self, exc: CommitFailedError, scope: Scope, receive: Receive, send: Send) -> None:
        # The handler's status line was never forwarded, so another response still can be.
        response = self.on_commit_failure(exc) if self.on_commit_failure is not None else None
        if response is None:
            logger.error("%s The client gets a 500.", exc, exc_info=True)
            raise exc
        logger.info("%s 'on_commit_failure' answered %d.", exc, response.status_code)
        await response(scope, receive, send)

    async def _not_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and self.websocket == "manual":
            scope[SCOPE_KEY] = self.registries
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        opened = open_scopes(self.registries, scope)
        try:
            await self.app(scope, receive, send)
        except BaseException:
            await end(opened, reraise=False)
            raise
        await end(opened)


async def _send_then_run_after_commit(opened: Opened, message: Message, send: Send) -> None:
    """Forward the response's last message, then run the after-commit work: a slow hook never delays a response."""
    await send(message)
    await run_after_commit(opened)
