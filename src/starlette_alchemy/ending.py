"""Ending a session whatever happens: a failed COMMIT or close discards its connections instead of leaking them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

__all__ = ["aclose_or_discard", "acommit_or_discard", "close_or_discard", "commit_or_discard", "log_errors"]

logger = logging.getLogger("starlette_alchemy")


def commit_or_discard(session: Session) -> None:
    """COMMIT; if it fails, invalidate the connection before re-raising.

    After a failed COMMIT the connection's transaction state is unknown (pysqlite,
    for one, keeps the failed transaction open), so it must never go back to the pool.
    """
    try:
        session.commit()
    except Exception:
        if _owns(session):
            with log_errors("discarding the connection after a failed COMMIT"):
                session.invalidate()
        raise


async def acommit_or_discard(session: AsyncSession) -> None:
    """COMMIT; if it fails, invalidate the connection before re-raising."""
    try:
        await session.commit()
    except Exception:
        if _owns(session.sync_session):
            with log_errors("discarding the connection after a failed COMMIT"):
                await session.invalidate()
        raise


def close_or_discard(session: Session) -> None:
    """Close *session*; if that fails, invalidate its connections, so each goes back to the pool, and re-raise.

    Closing fails when the session is in a state it cannot leave, such as
    after two tasks used one ``AsyncSession`` at once; its connections are then
    reached below the session, whose own ``invalidate()`` would fail the same way.
    """
    try:
        session.close()
    except Exception:
        discard_connections(session)
        raise


async def aclose_or_discard(session: AsyncSession) -> None:
    """Like ``close_or_discard()``, for an ``AsyncSession``."""
    try:
        await session.close()
    except Exception:
        await session.run_sync(discard_connections)
        raise


def discard_connections(session: Session) -> None:
    """Invalidate the connections of *session*'s transaction that it checked out itself."""
    if not _owns(session):
        return
    transaction = session.get_transaction()
    # The session's own bookkeeping; no public accessor reaches it when the session is stuck.
    connections = {entry[0] for entry in getattr(transaction, "_connections", {}).values()}
    for connection in connections:
        with log_errors("invalidating a connection of a session that could not be closed"):
            connection.invalidate()
    if connections:
        logger.warning("%d connection(s) of a session that could not be closed were invalidated.", len(connections))


def _owns(session: Session) -> bool:
    """False if *session* is bound to a ``Connection`` that its caller opened and must discard or keep itself.

    Such a session (``testing.rolled_back()`` makes them) only joined the
    connection's transaction, so closing it afterwards rolls back what it did.
    """
    return not isinstance(session.bind, Connection)


@contextmanager
def log_errors(doing: str) -> Iterator[None]:
    """Log and swallow an ``Exception`` so that it cannot mask the one in flight."""
    try:
        yield
    except Exception:
        logger.exception("Error while %s; the original error is re-raised.", doing)
