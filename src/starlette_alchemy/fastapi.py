"""FastAPI dependencies for the session and collector of the current request.

The only module of the package that imports FastAPI::

    from starlette_alchemy.fastapi import CollectorDep, SessionDep

    @app.post("/items")
    async def create(name: str, session: SessionDep, collector: CollectorDep) -> dict[str, int]:
        session.add(Item(name=name))

They find the registry that ``DBSessionMiddleware`` manages for the request. With
several registries, name the one you mean: ``Annotated[AsyncSession, Depends(db.dependency)]``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from starlette.requests import HTTPConnection

from .exceptions import NoActiveScopeError, StarletteAlchemyError
from .lifecycle import Collector
from .middleware import SCOPE_KEY
from .scoped import AsyncScopedSession, ScopedSession
from .settle import AnyScopedSession

__all__ = ["CollectorDep", "SessionDep", "SyncSessionDep", "registry_of"]

_NO_MIDDLEWARE = (
    "No 'DBSessionMiddleware' handles this request, so there is no session to inject. "
    "Add it with 'app.add_middleware(DBSessionMiddleware, db=db)'."
)
_SEVERAL = (
    "This request's 'DBSessionMiddleware' manages {count} registries, so '{dependency}' cannot tell which you mean. "
    "Use 'Annotated[..., Depends(db.dependency)]' with the registry you want."
)
_WRONG_KIND = "This app's registry is a '{kind}', which '{dependency}' cannot inject; use '{instead}'."


def registry_of(connection: HTTPConnection, dependency: str = "the dependency") -> AnyScopedSession:
    """Return the one registry that ``DBSessionMiddleware`` manages for *connection*."""
    registries: tuple[AnyScopedSession, ...] | None = connection.scope.get(SCOPE_KEY)
    if registries is None:
        raise NoActiveScopeError(_NO_MIDDLEWARE)
    if len(registries) != 1:
        raise StarletteAlchemyError(_SEVERAL.format(count=len(registries), dependency=dependency))
    return registries[0]


async def _async_session(connection: HTTPConnection) -> AsyncSession:
    registry = registry_of(connection, "SessionDep")
    if not isinstance(registry, AsyncScopedSession):
        raise StarletteAlchemyError(
            _WRONG_KIND.format(dependency="SessionDep", kind="ScopedSession", instead="SyncSessionDep")
        )
    session: AsyncSession = registry()
    return session


async def _sync_session(connection: HTTPConnection) -> Session:
    registry = registry_of(connection, "SyncSessionDep")
    if not isinstance(registry, ScopedSession):
        raise StarletteAlchemyError(
            _WRONG_KIND.format(dependency="SyncSessionDep", kind="AsyncScopedSession", instead="SessionDep")
        )
    session: Session = registry()
    return session


async def _collector(connection: HTTPConnection) -> Collector:
    return registry_of(connection, "CollectorDep").collector


# Async on purpose: FastAPI would run a plain ``def`` dependency in the threadpool,
# and creating a session does no I/O worth a thread hop. Sync endpoints get the same session.
SessionDep = Annotated[AsyncSession, Depends(_async_session)]
"""The request's ``AsyncSession`` (the app's registry is an ``AsyncScopedSession``)."""

SyncSessionDep = Annotated[Session, Depends(_sync_session)]
"""The request's ``Session`` (the app's registry is a ``ScopedSession``)."""

CollectorDep = Annotated[Collector, Depends(_collector)]
"""The request's ``Collector``: the objects it touched and the rows it wrote."""
