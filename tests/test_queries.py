"""The testing kit's query counting: ``count_queries()``, ``assert_max_queries()`` and ``QueryCounter``."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from starlette_alchemy.testing import QueryCounter, assert_max_queries, count_queries
from tests.models import Item
from tests.support import AnyDB, http_client, run, scope
from tests.test_observe import app_with, registry

pytestmark = pytest.mark.anyio


async def test_assert_max_queries_passes_at_the_limit_and_counts_requests(db: AnyDB) -> None:
    async def endpoint(request: Request) -> Response:
        await run(db.execute, sa.select(Item).where(Item.name == "a"))
        await run(db.add, Item(name="b"))
        return PlainTextResponse("")

    async with http_client(app_with(db, Route("/", endpoint, methods=["POST"])), "asgi") as client:
        with assert_max_queries(2) as counter:
            assert (await client.post("/")).status_code == 200
    assert counter.count == 2
    assert counter.statements[0].startswith("SELECT item.id, item.name")
    assert counter.statements[1].startswith("INSERT INTO item")


async def test_assert_max_queries_fails_listing_the_statements(db: AnyDB) -> None:
    with pytest.raises(AssertionError) as raised:
        with assert_max_queries(1):
            async with scope(db):
                await run(db.execute, sa.select(Item).where(Item.name == "secret-value"))
                await run(db.execute, sa.select(sa.literal(1)))
    message = str(raised.value)
    assert message.startswith("2 queries ran, more than the 1 allowed:\n  1. SELECT item.id, item.name FROM item WHERE")
    assert "\n  2. SELECT " in message
    assert "secret-value" not in message


async def test_an_error_in_the_block_is_not_masked(db: AnyDB) -> None:
    with pytest.raises(ZeroDivisionError):
        with assert_max_queries(0):
            async with scope(db):
                await run(db.execute, sa.select(sa.literal(1)))
                raise ZeroDivisionError


async def test_a_counter_for_one_registry_ignores_the_others(engine: Engine | AsyncEngine) -> None:
    mine, other = registry(engine), registry(engine)
    with count_queries(mine) as counter, count_queries() as everything:
        async with scope(mine):
            await run(mine.execute, sa.select(sa.literal(1)))
        async with scope(other):
            await run(other.execute, sa.select(sa.literal(2)))
    assert (counter.count, everything.count) == (1, 2)
    async with scope(mine):
        await run(mine.execute, sa.select(sa.literal(3)))
    assert counter.count == 1  # the block ended: no longer counting


async def test_clear_and_repr(db: AnyDB) -> None:
    with count_queries() as counter:
        assert repr(counter) == "<QueryCounter: no queries>"
        async with scope(db):
            await run(db.execute, sa.select(sa.literal(1)))
            counter.clear()
            await run(db.execute, sa.select(Item))
    assert counter.count == 1
    assert repr(counter).startswith("<QueryCounter: 1 queries:\n  1. SELECT item.id, item.name FROM item")
    counter.assert_max(1)
    with pytest.raises(AssertionError, match="1 queries ran, more than the 0 allowed"):
        counter.assert_max(0)


async def test_what_a_counter_takes(engine: Engine | AsyncEngine) -> None:
    with pytest.raises(TypeError, match="keeps statistics"):
        QueryCounter(registry(engine, stats=False))
    with pytest.raises(TypeError, match="keeps statistics"):
        QueryCounter(engine)
    for bad in (-1, 1.5, True):
        with pytest.raises(TypeError, match="a number of queries, 0 or more"):
            with assert_max_queries(bad):  # type: ignore[arg-type]
                pass
