"""Helpers that let one test body drive sync and async registries alike."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from inspect import isawaitable
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from starlette_alchemy import AsyncScopedSession, ScopedSession
from tests.models import Item

T = TypeVar("T")

AnyDB = ScopedSession[Session] | AsyncScopedSession[AsyncSession]


async def resolve(value: T | Awaitable[T]) -> T:
    """Await *value* if a coroutine came back (async registry), else return it."""
    if isawaitable(value):
        return await value
    return value


@asynccontextmanager
async def scope(db: AnyDB, *, commit: bool = True) -> AsyncIterator[None]:
    """Enter ``db.scope()`` with ``async with`` or ``with``, as the registry's kind needs."""
    if isinstance(db, AsyncScopedSession):
        async with db.scope(commit=commit):
            yield
    else:
        with db.scope(commit=commit):
            yield


def committed_names(engine: Engine) -> set[str]:
    """Read the item names that are committed, through a separate connection."""
    with engine.connect() as conn:
        return set(conn.scalars(sa.select(Item.name)))
