"""FastAPI: the annotated dependencies, with async and sync endpoints and dependencies.

No ``from __future__ import annotations`` here: FastAPI resolves string
annotations in the module's globals, where a registry built in a test is not.
"""

import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI
from pydantic import BaseModel
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from starlette_alchemy import (
    AsyncScopedSession,
    DBSessionMiddleware,
    NoActiveScopeError,
    Retry,
    ScopedSession,
    SessionSealedError,
    StarletteAlchemyError,
)
from starlette_alchemy.fastapi import CollectorDep, SessionDep, SyncSessionDep
from tests.conftest import ASYNC_BACKENDS, SYNC_BACKENDS
from tests.models import Item
from tests.support import CONFLICT, AnyDB, committed_names, http_client, transient

pytestmark = pytest.mark.anyio


def async_app(db: AsyncScopedSession[AsyncSession], events: list[str]) -> FastAPI:
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, db=db)

    async def name_of(session: SessionDep) -> str:
        # A dependency that itself depends on the session gets the same one.
        assert session is db()
        return "from a dependency"

    def sync_dependency(session: SessionDep) -> AsyncSession:
        # A plain ``def`` dependency runs in a worker thread, in a copy of the context.
        assert session is db()
        return session

    async def yield_dependency(session: SessionDep) -> AsyncIterator[AsyncSession]:
        session.add(Item(name="before yield"))
        yield session
        # FastAPI runs this after the response was sent: the session is sealed by then.
        try:
            session.add(Item(name="after yield"))
        except SessionSealedError:
            events.append("sealed after yield")

    @app.post("/annotated/{name}")
    async def annotated(name: str, session: SessionDep, collector: CollectorDep) -> dict[str, Any]:
        assert session is db()
        session.add(Item(name=name))
        await session.flush()
        return {"inserted": [change.diff["name"][1] for change in collector.changes().inserted]}

    @app.post("/explicit/{name}")
    async def explicit(name: str, session: Annotated[AsyncSession, Depends(db.dependency)]) -> str:
        assert session is db()
        session.add(Item(name=name))
        return "ok"

    @app.post("/sync-endpoint/{name}")
    def sync_endpoint(name: str, session: SessionDep, via: Annotated[AsyncSession, Depends(sync_dependency)]) -> str:
        assert session is via is db()
        session.add(Item(name=name))
        return "ok"

    @app.post("/dependencies")
    async def dependencies(
        name: Annotated[str, Depends(name_of)], session: Annotated[AsyncSession, Depends(yield_dependency)]
    ) -> str:
        assert session is db()
        session.add(Item(name=name))
        return "ok"

    return app


def sync_app(db: ScopedSession[Session], events: list[str]) -> FastAPI:
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, db=db)

    def yield_dependency(session: SyncSessionDep) -> Iterator[Session]:
        session.add(Item(name="before yield"))
        yield session
        events.append("after yield")

    @app.post("/annotated/{name}")
    def annotated(name: str, session: SyncSessionDep, collector: CollectorDep) -> dict[str, Any]:
        assert session is db()
        session.add(Item(name=name))
        session.flush()
        return {"inserted": [change.diff["name"][1] for change in collector.changes().inserted]}

    @app.post("/async-endpoint/{name}")
    async def async_endpoint(name: str, session: Annotated[Session, Depends(db.dependency)]) -> str:
        assert session is db()
        session.add(Item(name=name))
        return "ok"

    @app.post("/dependencies")
    def dependencies(session: Annotated[Session, Depends(yield_dependency)]) -> str:
        assert session is db()
        session.add(Item(name="from a dependency"))
        return "ok"

    return app


@pytest.mark.parametrize("backend", ASYNC_BACKENDS, ids=lambda b: b.id, indirect=True)
async def test_async_registry_in_every_kind_of_endpoint_and_dependency(
    db: AsyncScopedSession[AsyncSession], inspection_engine: Engine, transport: str
) -> None:
    events: list[str] = []
    async with http_client(async_app(db, events), transport) as client:
        response = await client.post("/annotated/a")
        assert response.json() == {"inserted": ["a"]}
        for path in ("/explicit/b", "/sync-endpoint/c", "/dependencies"):
            response = await client.post(path)
            assert response.status_code == 200, (path, response.text)
    assert committed_names(inspection_engine) == {"a", "b", "c", "from a dependency", "before yield"}
    assert events == ["sealed after yield"]


@pytest.mark.parametrize("backend", SYNC_BACKENDS, ids=lambda b: b.id, indirect=True)
async def test_sync_registry_in_every_kind_of_endpoint_and_dependency(
    db: ScopedSession[Session], inspection_engine: Engine, transport: str
) -> None:
    events: list[str] = []
    async with http_client(sync_app(db, events), transport) as client:
        response = await client.post("/annotated/a")
        assert response.json() == {"inserted": ["a"]}
        for path in ("/async-endpoint/b", "/dependencies"):
            response = await client.post(path)
            assert response.status_code == 200, (path, response.text)
    assert committed_names(inspection_engine) == {"a", "b", "from a dependency", "before yield"}
    assert events == ["after yield"]


async def test_misconfigurations_raise_errors_that_name_the_fix(db: AnyDB) -> None:
    wrong = SyncSessionDep if isinstance(db, AsyncScopedSession) else SessionDep
    bare, twice, mismatched = FastAPI(), FastAPI(), FastAPI()
    other = (
        AsyncScopedSession(db.session_factory)
        if isinstance(db, AsyncScopedSession)
        else ScopedSession(db.session_factory)
    )
    twice.add_middleware(DBSessionMiddleware, db=[db, other])
    mismatched.add_middleware(DBSessionMiddleware, db=db)

    async def needs_collector(collector: CollectorDep) -> str:
        return "unreachable"

    async def needs_wrong_kind(session: wrong) -> str:  # type: ignore[valid-type]
        return "unreachable"

    bare.get("/")(needs_collector)
    twice.get("/")(needs_collector)
    mismatched.get("/")(needs_wrong_kind)
    cases = [
        (bare, NoActiveScopeError, r"No 'DBSessionMiddleware' handles this request"),
        (twice, StarletteAlchemyError, r"manages 2 registries, so 'CollectorDep' cannot tell which you mean"),
        (mismatched, StarletteAlchemyError, r"which '(Sync)?SessionDep' cannot inject; use '(Sync)?SessionDep'"),
    ]
    for app, error, message in cases:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            with pytest.raises(error, match=message):
                await client.get("/")


def test_the_package_imports_without_fastapi() -> None:
    script = (
        "import sys; sys.modules['fastapi'] = None\n"
        "import starlette_alchemy\n"
        "try:\n    import starlette_alchemy.fastapi\nexcept ImportError:\n    print('fastapi.py needs fastapi')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "fastapi.py needs fastapi\n"


class Transfer(BaseModel):
    name: str
    amount: int


@pytest.mark.parametrize("backend", ASYNC_BACKENDS, indirect=True, ids=lambda b: b.id)
async def test_a_replayed_request_gets_its_json_body_and_dependencies_again(
    db: AsyncScopedSession[AsyncSession], inspection_engine: Engine
) -> None:
    received: list[Transfer] = []
    # Ids, not sessions: FastAPI caches what it learns of a path function for good, closure included.
    sessions: list[int] = []
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, db=db, retry=Retry(retry_on=transient))

    @app.post("/transfers")
    async def transfer(body: Transfer, session: SessionDep) -> dict[str, int]:
        received.append(body)
        sessions.append(id(session))
        session.add(Item(name=f"{body.name} {len(received)}"))
        if len(received) == 1:
            await session.execute(sa.text(CONFLICT[session.get_bind().dialect.name]))
        return {"attempts": len(received)}

    payload = {"name": "café ☕", "amount": 10}
    async with http_client(app, "asgi") as client:
        response = await client.post("/transfers", json=payload)
    assert response.status_code == 200 and response.json() == {"attempts": 2}
    assert [body.model_dump() for body in received] == [payload, payload]
    assert sessions[0] != sessions[1]  # a fresh scope, so a fresh session (the first is closed, not freed yet)
    assert committed_names(inspection_engine) == {"café ☕ 2"}


@pytest.mark.parametrize("backend", SYNC_BACKENDS, indirect=True, ids=lambda b: b.id)
async def test_a_replayed_sync_path_function_runs_again_in_a_thread(
    db: ScopedSession[Session], inspection_engine: Engine
) -> None:
    received: list[Transfer] = []
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, db=db, retry=Retry(retry_on=transient))

    @app.put("/transfers")
    def transfer(body: Transfer, session: SyncSessionDep) -> dict[str, int]:
        received.append(body)
        session.add(Item(name=f"{body.name} {len(received)}"))
        if len(received) == 1:
            session.execute(sa.text(CONFLICT[session.get_bind().dialect.name]))
        return {"attempts": len(received)}

    async with http_client(app, "asgi") as client:
        response = await client.put("/transfers", json={"name": "sync", "amount": 1})
    assert response.status_code == 200 and response.json() == {"attempts": 2}
    assert committed_names(inspection_engine) == {"sync 2"}
