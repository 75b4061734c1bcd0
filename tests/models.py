"""Mapped classes the tests write."""

from __future__ import annotations

from sqlalchemy import JSON, ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "item"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)


class Note(Base):
    """A row whose foreign key is checked only at COMMIT, so a flush succeeds and the COMMIT fails."""

    __tablename__ = "note"

    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("item.id", deferrable=True, initially="DEFERRED"))


class AuditLog(Base):
    """One row per change a request made, written by a ``before_commit`` hook."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    entity: Mapped[str] = mapped_column(String(50))
    identity: Mapped[str] = mapped_column(String(200))
    op: Mapped[str] = mapped_column(String(10))
    diff: Mapped[dict[str, list[object]]] = mapped_column(JSON)
