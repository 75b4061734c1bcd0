"""Row-level security on PostgreSQL: each request sees and writes only its own tenant's rows.

The tenant comes from the ``X-Tenant`` header, through a dependency, into
``db.info``. An ``on_begin`` hook then makes it the transaction's
``app.tenant`` setting and switches to a role that row-level security applies
to (the login role, a superuser here, would bypass it). Both are local to the
transaction, so a pooled connection never carries one request's tenant into
the next. A request without the header sees no row and may write none.

Run it against PostgreSQL, as a role that may create roles; it sets up its
table, policy and role at start-up (``setup()``)::

    DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/test uvicorn examples.tenants:app
"""

# No ``from __future__ import annotations``: FastAPI reads these annotations at runtime.
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, FastAPI, Header, HTTPException
from pydantic import BaseModel
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from starlette_alchemy import AsyncScopedSession, DBSessionMiddleware, transaction
from starlette_alchemy.fastapi import SessionDep

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
# The role requests run as: it owns nothing and is not a superuser, so the policy applies to it.
TENANT_ROLE = os.environ.get("TENANT_ROLE", "tenant_app")


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "tenant_note"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[str] = mapped_column(sa.String(50))
    body: Mapped[str] = mapped_column(sa.String(200))


engine = create_async_engine(DATABASE_URL, pool_size=5, max_overflow=0)
db = AsyncScopedSession(engine)


@db.on_begin
def enter_tenant(connection: Connection, info: dict[str, Any]) -> None:
    """Run this transaction as the tenant role, for the request's tenant ('' for none: no row matches)."""
    # set_config(..., true) is SET LOCAL: both settings end with the transaction.
    connection.execute(
        sa.text("SELECT set_config('role', :role, true), set_config('app.tenant', :tenant, true)"),
        {"role": TENANT_ROLE, "tenant": info.get("tenant", "")},
    )


async def current_tenant(x_tenant: Annotated[str | None, Header()] = None) -> str | None:
    """Put the request's tenant where the on_begin hook finds it, before the first query."""
    if x_tenant:
        db.info["tenant"] = x_tenant
    return x_tenant or None


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with engine.begin() as connection:
        await connection.run_sync(setup)
    yield
    await engine.dispose()


app = FastAPI(lifespan=lifespan, dependencies=[Depends(current_tenant)])
app.add_middleware(DBSessionMiddleware, db=db)


class NoteIn(BaseModel):
    body: str


class NoteOut(BaseModel):
    id: int
    tenant: str
    body: str


@app.get("/notes")
@transaction(read_only=True)
async def list_notes(session: SessionDep) -> list[NoteOut]:
    """The tenant's notes: the policy filters the others out, whatever the query says."""
    notes = await session.scalars(sa.select(Note).order_by(Note.id))
    return [NoteOut(id=note.id, tenant=note.tenant, body=note.body) for note in notes]


@app.post("/notes", status_code=201)
async def add_note(
    note: NoteIn, session: SessionDep, tenant: Annotated[str | None, Depends(current_tenant)]
) -> NoteOut:
    if tenant is None:
        raise HTTPException(400, "Say whose note this is in the X-Tenant header.")
    row = Note(tenant=tenant, body=note.body)
    session.add(row)
    await session.flush()  # the policy's WITH CHECK runs here: a row of another tenant is refused
    return NoteOut(id=row.id, tenant=row.tenant, body=row.body)


def setup(connection: Connection) -> None:
    """Create the table, the role requests run as, and the policy that filters rows by ``app.tenant``."""
    role = connection.dialect.identifier_preparer.quote(TENANT_ROLE)
    exists = connection.scalar(sa.text("SELECT count(*) FROM pg_roles WHERE rolname = :role"), {"role": TENANT_ROLE})
    if not exists:
        connection.exec_driver_sql(f"CREATE ROLE {role} NOLOGIN")
    Base.metadata.create_all(connection)
    for statement in (
        "ALTER TABLE tenant_note ENABLE ROW LEVEL SECURITY",
        "DROP POLICY IF EXISTS tenant_isolation ON tenant_note",
        "CREATE POLICY tenant_isolation ON tenant_note "
        "USING (tenant = current_setting('app.tenant', true)) "
        "WITH CHECK (tenant = current_setting('app.tenant', true))",
        f"GRANT SELECT, INSERT ON tenant_note TO {role}",
        f"GRANT USAGE ON SEQUENCE tenant_note_id_seq TO {role}",
    ):
        connection.exec_driver_sql(statement)


def teardown(connection: Connection) -> None:
    """Drop what ``setup()`` created."""
    Base.metadata.drop_all(connection)
    connection.exec_driver_sql(f"DROP ROLE IF EXISTS {connection.dialect.identifier_preparer.quote(TENANT_ROLE)}")
