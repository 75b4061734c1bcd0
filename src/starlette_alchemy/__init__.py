"""Request-scoped SQLAlchemy sessions for Starlette and FastAPI."""

from .changes import UNKNOWN, Change, Changes
from .exceptions import (
    CommitFailedError,
    NoActiveScopeError,
    NPlusOneError,
    ReadOnlyTransactionError,
    SessionSealedError,
    StarletteAlchemyError,
    TrackingDisabledError,
)
from .lifecycle import Collector
from .middleware import DBSessionMiddleware
from .observe import ScopeStats
from .policy import transaction
from .retry import Retry, is_retryable
from .scoped import AsyncScopedSession, ContextVarRegistry, ScopedSession

__all__ = [
    "AsyncScopedSession",
    "Change",
    "Changes",
    "Collector",
    "CommitFailedError",
    "ContextVarRegistry",
    "DBSessionMiddleware",
    "NPlusOneError",
    "NoActiveScopeError",
    "ReadOnlyTransactionError",
    "Retry",
    "ScopeStats",
    "ScopedSession",
    "SessionSealedError",
    "StarletteAlchemyError",
    "TrackingDisabledError",
    "UNKNOWN",
    "is_retryable",
    "transaction",
]
