"""The least a middleware with ``DBSessionMiddleware``'s contract does: what ``make bench`` judges ours against.

``SameContract`` opens a lazily created session per request in a ContextVar
holder, COMMITs it (2xx and 3xx) or rolls it back when the app sends its
status line and before forwarding it, and closes it at the end; a sync
session's COMMIT, ROLLBACK and close run in a worker thread under a capacity
limiter of the middleware's own, so endpoints waiting on a lock cannot starve
the COMMIT. Nothing else: no sealing, no change tracking, no cancellation
shield, no policies. A request that never uses the database pays the holder's
set and reset and the wrapped ``send``.
"""

from __future__ import annotations

from collections.abc import Awaitable
from contextvars import ContextVar
from typing import Any

import anyio
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

THREADS = 40  # the middleware's own worker threads, as many as Starlette's pool has


class Holder:
    """The per-request holder: the factory, and the session once something asked for it."""

    __slots__ = ("maker", "session")

    def __init__(self, maker: Any) -> None:
        self.maker = maker
        self.session: Any = None


_holder: ContextVar[Holder | None] = ContextVar("bench.contract.holder", default=None)


def session() -> Any:
    """The current request's session, created on first use."""
    holder = _holder.get()
    assert holder is not None, "SameContract is not installed"
    if holder.session is None:
        holder.session = holder.maker()
    return holder.session


class SameContract:
    """A session per request, committed or rolled back before the status line is forwarded, always closed."""

    def __init__(self, app: ASGIApp, *, maker: Any) -> None:
        self.app = app
        self.maker = maker
        self.sync = isinstance(maker, sessionmaker)
        self.limiter: anyio.CapacityLimiter | None = None  # made in the event loop, on first use

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        holder = Holder(self.maker)
        token = _holder.set(holder)

        def settle_then_send(message: Message) -> Awaitable[None]:
            if message["type"] == "http.response.start" and holder.session is not None:
                return self._settle_then_send(holder.session, message, send)
            return send(message)

        try:
            await self.app(scope, receive, settle_then_send)
        finally:
            if holder.session is not None:
                await self._close(holder.session)
            _holder.reset(token)

    async def _settle_then_send(self, session: Session | AsyncSession, message: Message, send: Send) -> None:
        commit = 200 <= message["status"] < 400
        if isinstance(session, AsyncSession):
            await (session.commit() if commit else session.rollback())
        else:
            await self._in_thread(session.commit if commit else session.rollback)
        await send(message)

    async def _close(self, session: Session | AsyncSession) -> None:
        if isinstance(session, AsyncSession):
            await session.close()
        elif session.in_transaction():
            await self._in_thread(session.close)
        else:
            session.close()  # no transaction, so no connection: no I/O

    async def _in_thread(self, function: Any) -> None:
        if self.limiter is None:
            self.limiter = anyio.CapacityLimiter(THREADS)
        await anyio.to_thread.run_sync(function, limiter=self.limiter)
