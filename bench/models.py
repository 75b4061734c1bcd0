"""The table the benchmarks write, and how each run starts it afresh."""

from __future__ import annotations

import atexit
import os

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = "bench_row"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))
    value: Mapped[int] = mapped_column(default=0)


def recreate(url: str, rows: int = 1) -> None:
    """Drop and create the table on *url*'s database (through a sync driver), with *rows* rows, id 1 the first.

    The table is dropped again when the process exits: a benchmark leaves the database as it found it.
    """
    sync_url = url.replace("+aiosqlite", "+pysqlite").replace("+asyncpg", "+psycopg")
    engine = sa.create_engine(sync_url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(Row), [{"name": "seed"}] * rows)
    engine.dispose()
    if sync_url not in _created:
        _created.add(sync_url)
        atexit.register(_drop, sync_url)


_created: set[str] = set()


def _drop(sync_url: str) -> None:
    database = sa.make_url(sync_url).database
    if sync_url.startswith("sqlite") and database and not os.path.exists(database):
        return  # a SQLite file in a temporary directory that is gone already
    engine = sa.create_engine(sync_url)
    Base.metadata.drop_all(engine)
    engine.dispose()
