"""Read replicas: GETs read a replica, writes go to the primary, and a client that wrote reads its own writes.

``DATABASE_URL`` names the primary and ``REPLICA_URLS`` the replicas (comma-separated).
Each request's scope reads from one replica until it writes; a request that is not a
GET, HEAD or OPTIONS reads from the primary; ``/search`` is a POST that may read a
replica (``read_only=True``). After a request that committed writes, the response sets
a cookie that sends that client's reads to the primary for 5 seconds, longer than the
replicas lag: the client sees what it wrote, everybody else reads the replicas.

Without the variables it runs on two SQLite files, the second standing in for a replica
that never catches up (nothing replicates between them), which makes the routing plain::

    uvicorn examples.replicas:app
    curl -X POST 'localhost:8000/notes?body=hello' -c jar   # written to the primary; sets the cookie
    curl localhost:8000/notes -b jar                         # read from the primary: ["hello"]
    curl localhost:8000/notes                                # read from the replica: []

With PostgreSQL streaming replication::

    DATABASE_URL=postgresql+asyncpg://app@primary/app \\
    REPLICA_URLS=postgresql+asyncpg://app@replica-1/app,postgresql+asyncpg://app@replica-2/app \\
    uvicorn examples.replicas:app
"""

# No ``from __future__ import annotations``: FastAPI reads these annotations at runtime.
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from starlette_alchemy import AsyncScopedSession, DBSessionMiddleware, transaction
from starlette_alchemy.fastapi import SessionDep

DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///replicas_primary.db")
REPLICA_URLS = os.environ.get("REPLICA_URLS", "sqlite+aiosqlite:///replicas_replica.db").split(",")


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "replica_note"

    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(sa.String(200))


primary = create_async_engine(DATABASE_URL)
# Give replicas a connect timeout: one that does not answer is skipped for 5 s after it.
replicas = [create_async_engine(url) for url in REPLICA_URLS if url]
db = AsyncScopedSession(primary, replicas=replicas)


async def create_tables(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await create_tables(primary)
    if primary.dialect.name == "sqlite":
        # Two SQLite files stand in for a primary and its replica: the "replica" needs the table too.
        for replica in replicas:
            await create_tables(replica)
    yield
    for engine in (primary, *replicas):
        await engine.dispose()


app = FastAPI(lifespan=lifespan)
app.add_middleware(DBSessionMiddleware, db=db, read_your_writes=5.0)


@app.get("/notes")
async def list_notes(session: SessionDep) -> list[str]:
    """A GET: read from a replica, unless this client wrote within the last 5 seconds."""
    return list(await session.scalars(sa.select(Note.body).order_by(Note.id)))


@app.post("/notes", status_code=201)
async def add_note(body: str, session: SessionDep) -> list[str]:
    """A POST: every read and write on the primary, so it sees the note it just added."""
    session.add(Note(body=body))
    return list(await session.scalars(sa.select(Note.body).order_by(Note.id)))


@app.post("/search")
@transaction(read_only=True)
async def search(text: str, session: SessionDep) -> list[str]:
    """A POST that only reads: ``read_only=True`` lets it read a replica."""
    query = sa.select(Note.body).where(Note.body.contains(text)).order_by(Note.id)
    return list(await session.scalars(query))
