"""Request-scoped SQLAlchemy sessions for Starlette and FastAPI."""

from .exceptions import CommitFailedError, NoActiveScopeError, SessionSealedError, StarletteAlchemyError
from .scoped import AsyncScopedSession, ContextVarRegistry, ScopedSession

__all__ = [
    "AsyncScopedSession",
    "CommitFailedError",
    "ContextVarRegistry",
    "NoActiveScopeError",
    "ScopedSession",
    "SessionSealedError",
    "StarletteAlchemyError",
]
