"""A first look at starlette-alchemy on SQLite: two scopes, one committed and one rolled back.

Run it with ``make demo``. A later release replaces this with the full FastAPI tour.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from starlette_alchemy import AsyncScopedSession, NoActiveScopeError


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "note"

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str]


async def main(path: Path) -> list[str]:
    """Write through two scopes and return the notes that were committed."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    db = AsyncScopedSession(engine)

    try:
        db()
    except NoActiveScopeError as exc:
        print(f"outside a scope:  {exc}")

    async with db.scope():
        db.add(Note(text="committed on a clean exit"))
    print("scope 1:          exited cleanly, committed")

    try:
        async with db.scope():
            db.add(Note(text="rolled back"))
            await db.flush()
            raise RuntimeError("the handler failed")
    except RuntimeError as exc:
        print(f"scope 2:          raised {exc!r}, rolled back")

    async with db.scope():
        notes = list(await db.scalars(sa.select(Note.text)))
    print(f"in the database:  {notes}")
    await engine.dispose()
    return notes


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(Path(tmp) / "tour.db"))
