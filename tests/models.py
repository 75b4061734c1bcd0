"""Mapped classes the tests write."""

from __future__ import annotations

from sqlalchemy import JSON, ForeignKeyConstraint, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "item"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)
    # View-only, so flushes of the other tests stay as they were: for the N+1 tests (test_observe.py).
    notes: Mapped[list[Note]] = relationship(
        primaryjoin="Item.id == foreign(Note.item_id)", viewonly=True, order_by="Note.id"
    )


class Note(Base):
    """A row whose foreign key is checked only at COMMIT, so a flush succeeds and the COMMIT fails.

    MySQL and MariaDB cannot defer a constraint: there the key is checked at once, by the flush.
    """

    __tablename__ = "note"
    __table_args__ = (
        ForeignKeyConstraint(["item_id"], ["item.id"], deferrable=True, initially="DEFERRED").ddl_if(
            callable_=lambda ddl, target, bind, tables=None, state=None, *, dialect, **kw: dialect.name != "mysql"
        ),
        ForeignKeyConstraint(["item_id"], ["item.id"]).ddl_if(dialect="mysql"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int]
    item: Mapped[Item] = relationship(primaryjoin="Item.id == foreign(Note.item_id)", viewonly=True)


class AuditLog(Base):
    """One row per change a request made, written by a ``before_commit`` hook."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    entity: Mapped[str] = mapped_column(String(50))
    identity: Mapped[str] = mapped_column(String(200))
    op: Mapped[str] = mapped_column(String(10))
    diff: Mapped[dict[str, list[object]]] = mapped_column(JSON)
