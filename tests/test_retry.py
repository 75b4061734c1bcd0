"""``is_retryable()``: the drivers' own errors for serialization failures and deadlocks, however they are wrapped."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from starlette_alchemy import CommitFailedError
from starlette_alchemy.retry import is_retryable
from tests.conftest import TESTED_MYSQL, TESTED_POSTGRESQL, Backend, engine_for
from tests.models import Item
from tests.support import RAISE

pytestmark = pytest.mark.anyio

# (error code, the SQLSTATE the server gives it, retryable): MySQL's 1205 has no SQLSTATE of its own (HY000).
CODES: dict[str, list[tuple[str | int, str, bool]]] = {
    "postgresql": [("40001", "", True), ("40P01", "", True), ("23505", "", False), ("57014", "", False)],
    "mysql": [(1213, "40001", True), (1205, "HY000", True), (1062, "23000", False), (1146, "42S02", False)],
}


async def raised(engine: Engine | AsyncEngine, statement: str) -> BaseException:
    """The error the engine's driver raises for *statement*, as SQLAlchemy hands it to the app."""
    with pytest.raises(sa.exc.DBAPIError) as caught:
        if isinstance(engine, AsyncEngine):
            async with engine.connect() as connection:
                await connection.exec_driver_sql(statement)
        else:
            with engine.connect() as connection:
                connection.exec_driver_sql(statement)
    return caught.value


@pytest.mark.parametrize("backend", TESTED_POSTGRESQL + TESTED_MYSQL, ids=lambda b: b.id)
async def test_the_drivers_errors_are_recognised_by_their_code(backend: Backend, tmp_path: Path) -> None:
    async with engine_for(backend, tmp_path) as engine:
        for code, state, retryable in CODES[backend.dialect]:
            error = await raised(engine, RAISE[backend.dialect].format(code=code, state=state))
            assert is_retryable(error) is retryable, (code, repr(error.orig))  # type: ignore[attr-defined]
            # Wrapped as the middleware wraps a failed COMMIT.
            try:
                raise CommitFailedError("COMMIT failed") from error
            except CommitFailedError as wrapped:
                assert is_retryable(wrapped) is retryable


@pytest.mark.parametrize(
    "backend", [b for b in TESTED_POSTGRESQL + TESTED_MYSQL if b.kind == "sync"], ids=lambda b: b.id
)
async def test_a_real_deadlock_is_retryable(backend: Backend, tmp_path: Path, inspection_engine: Engine) -> None:
    with inspection_engine.begin() as connection:
        connection.execute(sa.insert(Item), [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}])
    async with engine_for(backend, tmp_path) as engine:
        assert isinstance(engine, Engine)
        errors: list[BaseException] = []
        both_locked = threading.Barrier(2)

        def lock(first: int, second: int) -> None:
            with engine.connect() as connection:
                try:
                    # Names stay unique: the second lock must wait on the other's row, not on the unique index.
                    update = sa.update(Item).values(name=Item.name + "!").where(Item.id == sa.bindparam("key"))
                    connection.execute(update, {"key": first})
                    both_locked.wait(timeout=10)
                    connection.execute(update, {"key": second})
                    connection.commit()
                except sa.exc.DBAPIError as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=lock, args=order) for order in ((1, 2), (2, 1))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    assert len(errors) == 1, errors
    assert is_retryable(errors[0])


def test_other_errors_are_not_retryable() -> None:
    assert not is_retryable(sqlite3.OperationalError("database is locked"))
    assert not is_retryable(ValueError(1213))  # a number, but no MySQL driver's error
    assert not is_retryable(RuntimeError("40001"))
    # A cycle in the chain of causes ends the search.
    first, second = RuntimeError("first"), RuntimeError("second")
    first.__context__, second.__context__ = second, first
    assert not is_retryable(first)
