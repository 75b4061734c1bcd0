"""Errors raised by starlette-alchemy.

StarletteAlchemyError
├── NoActiveScopeError
├── CommitFailedError
├── SessionSealedError
├── ReadOnlyTransactionError
└── TrackingDisabledError
"""

from __future__ import annotations


class StarletteAlchemyError(Exception):
    """Base class of every error this package raises."""


class NoActiveScopeError(StarletteAlchemyError):
    """A registry was used where no scope is open."""


class CommitFailedError(StarletteAlchemyError):
    """COMMIT failed after the handler finished; chained from the database error."""


class SessionSealedError(StarletteAlchemyError):
    """The response already started, so this scope's session may no longer write."""


class ReadOnlyTransactionError(StarletteAlchemyError):
    """A scope whose transaction is read-only (``@transaction(read_only=True)``) tried to write through the ORM."""


class TrackingDisabledError(StarletteAlchemyError):
    """A collector, hook or ``on_commit`` was used on a registry created with ``track_changes=False``."""
