"""Request-scoped SQLAlchemy sessions for Starlette and FastAPI."""

from .exceptions import CommitFailedError, NoActiveScopeError, SessionSealedError, StarletteAlchemyError
from .middleware import DBSessionMiddleware
from .scoped import AsyncScopedSession, ContextVarRegistry, ScopedSession

__all__ = [
    "AsyncScopedSession",
    "CommitFailedError",
    "ContextVarRegistry",
    "DBSessionMiddleware",
    "NoActiveScopeError",
    "ScopedSession",
    "SessionSealedError",
    "StarletteAlchemyError",
]
