"""An audited inventory API on FastAPI, with one session per request.

Create, read, update and delete items; move stock between items (a 404 rolls
the move back); a rename onto an existing name fails at COMMIT and becomes a
409; a CSV export streams; a restock runs as a background task in a scope of
its own. A ``before_commit`` hook writes one audit row per change, in the same
transaction as the change, with the user the ``X-User`` header names (a
dependency puts it in ``db.info``; the hook reads ``changes.info``), and
``GET /audit`` lists them. The reading routes are read-only transactions.

Run it with ``make serve`` (SQLite in ``example.db``), or point ``DATABASE_URL``
at PostgreSQL: ``DATABASE_URL=postgresql+asyncpg://user@host/db make serve``.
"""

# No ``from __future__ import annotations``: FastAPI reads these annotations at runtime.
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import BackgroundTasks, Depends, FastAPI, Header, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from starlette_alchemy import (
    UNKNOWN,
    AsyncScopedSession,
    Changes,
    CommitFailedError,
    DBSessionMiddleware,
    transaction,
)
from starlette_alchemy.fastapi import SessionDep

DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///example.db")


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "example_item"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(100), unique=True)
    quantity: Mapped[int] = mapped_column(default=0)


class AuditLog(Base):
    __tablename__ = "example_audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    entity: Mapped[str] = mapped_column(sa.String(100))
    identity: Mapped[str] = mapped_column(sa.String(200))
    op: Mapped[str] = mapped_column(sa.String(10))
    diff: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    user: Mapped[str | None] = mapped_column(sa.String(100))


engine = create_async_engine(DATABASE_URL)
db = AsyncScopedSession(engine)


@db.before_commit
def audit(session: Session, changes: Changes) -> None:
    """Write one audit row per change, inside the transaction: it commits exactly when the change does."""
    for change in changes:
        diff = {key: [_plain(old), _plain(new)] for key, (old, new) in change.diff.items()}
        identity = json.dumps(change.identity)
        # changes.info: what db.info held at COMMIT, so the hook knows who, without reaching for the request.
        user = changes.info.get("user")
        session.add(AuditLog(entity=change.entity.__name__, identity=identity, op=change.op, diff=diff, user=user))


def _plain(value: Any) -> Any:
    return None if value is UNKNOWN else value


def conflict(exc: CommitFailedError) -> Response | None:
    """A constraint that fails at COMMIT (a rename onto a taken name) is the client's conflict: 409."""
    if isinstance(exc.__cause__, IntegrityError):
        return JSONResponse({"detail": "That name is taken."}, status_code=409)
    return None  # anything else stays a 500


class CollectorHeader:
    """Report what the request's collector saw in an ``x-collector`` header (the tour prints it).

    Placed inside ``DBSessionMiddleware``, it sees the status line before the
    COMMIT or ROLLBACK does, so it shows what the handler did either way: the
    rows already flushed, and the changes the COMMIT's own flush would write.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start" and db.has():
                report = json.dumps({"flushed": _flushed(), "unflushed": _unflushed()})
                message["headers"] = [*message.get("headers", []), (b"x-collector", report.encode())]
            await send(message)

        await self.app(scope, receive, send_with_header)


def _flushed() -> list[str]:
    return [f"{change.op} {change.entity.__name__}{list(change.identity or [])}" for change in db.collector.changes()]


def _unflushed() -> list[str]:
    session = db()
    groups = (("insert", session.new), ("update", session.dirty), ("delete", session.deleted))
    return [f"{op} {type(obj).__name__}{list(sa.inspect(obj).identity or [])}" for op, objs in groups for obj in objs]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    yield
    await engine.dispose()


async def who(x_user: Annotated[str | None, Header()] = None) -> None:
    """Put the requesting user in ``db.info``, where the audit hook finds it in ``changes.info``."""
    if x_user:
        db.info["user"] = x_user


app = FastAPI(title="starlette-alchemy example", lifespan=lifespan, dependencies=[Depends(who)])
app.add_middleware(CollectorHeader)  # added first, so it runs inside DBSessionMiddleware
app.add_middleware(DBSessionMiddleware, db=db, on_commit_failure=conflict)


class ItemIn(BaseModel):
    name: str
    quantity: int = 0


class ItemOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    quantity: int


class AuditOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    entity: str
    identity: str
    op: str
    diff: dict[str, Any]
    user: str | None


async def load(session: SessionDep, item_id: int) -> Item:
    item = await session.get(Item, item_id)
    if item is None:
        raise HTTPException(404, f"Item {item_id} does not exist.")
    return item


@app.post("/items", status_code=201)
async def create_item(data: ItemIn, session: SessionDep) -> ItemOut:
    item = Item(name=data.name, quantity=data.quantity)
    session.add(item)
    try:
        await session.flush()  # the INSERT runs now, so the response can carry the new id
    except IntegrityError:
        raise HTTPException(409, "That name is taken.") from None
    return ItemOut.model_validate(item)


@app.get("/items")
@transaction(read_only=True)
async def list_items(session: SessionDep) -> list[ItemOut]:
    return [ItemOut.model_validate(item) for item in await session.scalars(sa.select(Item).order_by(Item.id))]


@app.get("/items/{item_id}")
@transaction(read_only=True)
async def read_item(item_id: int, session: SessionDep) -> ItemOut:
    return ItemOut.model_validate(await load(session, item_id))


@app.put("/items/{item_id}")
async def update_item(item_id: int, data: ItemIn, session: SessionDep) -> ItemOut:
    item = await load(session, item_id)
    item.name, item.quantity = data.name, data.quantity
    # No flush: the UPDATE runs at COMMIT, and a taken name becomes a 409 there (see ``conflict``).
    return ItemOut.model_validate(item)


@app.delete("/items/{item_id}", status_code=204)
async def delete_item(item_id: int, session: SessionDep) -> None:
    await session.delete(await load(session, item_id))


@app.post("/items/{source_id}/move/{target_id}")
async def move_stock(source_id: int, target_id: int, quantity: int, session: SessionDep) -> list[ItemOut]:
    source = await load(session, source_id)
    source.quantity -= quantity
    await session.flush()  # written; if the target is missing, the 404 rolls this back
    target = await load(session, target_id)
    target.quantity += quantity
    return [ItemOut.model_validate(source), ItemOut.model_validate(target)]


async def restock(item_id: int, quantity: int, user: str | None) -> None:
    """Runs after the response, so in a scope of its own: committed (and audited) on its own."""
    async with db.scope():
        db.info["user"] = user  # the scope's own db.info: the request's is gone
        item = await db.get(Item, item_id)
        if item is not None:
            item.quantity += quantity


@app.post("/items/{item_id}/restock", status_code=202)
async def schedule_restock(item_id: int, quantity: int, tasks: BackgroundTasks, session: SessionDep) -> dict[str, str]:
    await load(session, item_id)
    tasks.add_task(restock, item_id, quantity, db.info.get("user"))
    return {"detail": "Restock scheduled."}


@app.get("/export.csv")
async def export(session: SessionDep) -> StreamingResponse:
    async def rows() -> AsyncIterator[str]:
        yield "id,name,quantity\n"
        # Reading while the body streams is fine; the request's transaction already ended.
        for item in await session.scalars(sa.select(Item).order_by(Item.id)):
            yield f"{item.id},{item.name},{item.quantity}\n"

    return StreamingResponse(rows(), media_type="text/csv")


@app.get("/audit")
@transaction(read_only=True)
async def list_audit(session: SessionDep, after: int = 0) -> list[AuditOut]:
    rows = await session.scalars(sa.select(AuditLog).where(AuditLog.id > after).order_by(AuditLog.id))
    return [AuditOut.model_validate(row) for row in rows]
