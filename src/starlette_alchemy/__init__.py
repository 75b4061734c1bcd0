"""Request-scoped SQLAlchemy sessions for Starlette and FastAPI."""

from .changes import UNKNOWN, Change, Changes
from .exceptions import (
    CommitFailedError,
    NoActiveScopeError,
    ReadOnlyTransactionError,
    SessionSealedError,
    StarletteAlchemyError,
    TrackingDisabledError,
)
from .lifecycle import Collector
from .middleware import DBSessionMiddleware
from .policy import transaction
from .scoped import AsyncScopedSession, ContextVarRegistry, ScopedSession

__all__ = [
    "AsyncScopedSession",
    "Change",
    "Changes",
    "Collector",
    "CommitFailedError",
    "ContextVarRegistry",
    "DBSessionMiddleware",
    "NoActiveScopeError",
    "ReadOnlyTransactionError",
    "ScopedSession",
    "SessionSealedError",
    "StarletteAlchemyError",
    "TrackingDisabledError",
    "UNKNOWN",
    "transaction",
]
