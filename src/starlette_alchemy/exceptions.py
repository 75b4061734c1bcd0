"""Errors raised by starlette-alchemy.

StarletteAlchemyError
├── NoActiveScopeError
├── CommitFailedError
├── SessionSealedError
├── ReadOnlyTransactionError
├── NPlusOneError
└── TrackingDisabledError
"""

from __future__ import annotations


class StarletteAlchemyError(Exception):
    """Base class of every error this package raises."""


class NoActiveScopeError(StarletteAlchemyError):
    """A registry was used where no scope is open."""


class CommitFailedError(StarletteAlchemyError):
    """COMMIT failed after the handler finished; chained from the database error.

    ``committed`` names the request's other databases that had committed already (several registries).
    """

    def __init__(self, message: str, committed: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.committed = committed


class SessionSealedError(StarletteAlchemyError):
    """The response already started, so this scope's session may no longer write."""


class ReadOnlyTransactionError(StarletteAlchemyError):
    """A scope whose transaction is read-only (``@transaction(read_only=True)``) tried to write through the ORM."""


class NPlusOneError(StarletteAlchemyError):
    """A relationship was lazy-loaded too often in one scope, on a registry created with ``n_plus_one="raise"``."""


class TrackingDisabledError(StarletteAlchemyError):
    """A registry was asked for what it does not keep: changes (``track_changes=False``) or ``stats=False``."""


def first_line(error: BaseException | None) -> str:
    """The first line of an error's message, for one-line logs (SQLAlchemy adds a second one with a link)."""
    return (str(error).splitlines() or [""])[0]
