"""The pytest plugin: its fixtures, used by a test suite of its own, run in a pytest subprocess."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

APP = """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from starlette_alchemy import {registry}, DBSessionMiddleware


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "item"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


engine = sa.{create}("sqlite+{driver}:///{path}")
db = {registry}(engine)


async def add(request: Request) -> PlainTextResponse:
    db.add(Item(name=request.path_params["name"]))
    db.on_commit(lambda: None)
    return PlainTextResponse("added", status_code=201)


routes = [Route("/items/{{name}}", add, methods=["POST"])]
app = Starlette(routes=routes, middleware=[Middleware(DBSessionMiddleware, db=db)])
"""

CONFTEST = """
import pytest
from app import db


@pytest.fixture
def db_registry():
    return db
"""

SYNC_TESTS = """
import sqlalchemy as sa
from starlette.testclient import TestClient

from app import Item, app
from starlette_alchemy.testing import assert_changes


def test_write(db_transaction, captured_commits):
    with TestClient(app) as client:
        assert client.post("/items/a").status_code == 201
    assert db_transaction.scalars(sa.select(Item.name)).all() == ["committed", "a"]
    (changes,) = captured_commits.changes
    assert_changes(changes, inserted={Item: [{"name": "a"}]})
    assert len(captured_commits.callbacks) == 1


def test_write_again(db_transaction):
    with TestClient(app) as client:
        assert client.post("/items/b").status_code == 201
    assert db_transaction.scalars(sa.select(Item.name)).all() == ["committed", "b"]
"""

ASYNC_TESTS = """
import httpx
import pytest
import sqlalchemy as sa

from app import Item, app


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["a", "b"])
async def test_write(adb_transaction, name):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
        assert (await client.post(f"/items/{name}")).status_code == 201
    assert (await adb_transaction.scalars(sa.select(Item.name))).all() == ["committed", name]
"""


def make_suite(pytester: pytest.Pytester, kind: str) -> Path:
    """Write an app on a SQLite file with one committed row, its conftest and its tests; return the file."""
    path = pytester.path / "app.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE item (id INTEGER PRIMARY KEY, name VARCHAR NOT NULL)")
        conn.exec_driver_sql("INSERT INTO item (name) VALUES ('committed')")
    engine.dispose()
    if kind == "sync":
        options = {"registry": "ScopedSession", "create": "create_engine", "driver": "pysqlite"}
    else:
        options = {"registry": "AsyncScopedSession", "create": "ext.asyncio.create_async_engine", "driver": "aiosqlite"}
    pytester.makepyfile(app=APP.format(path=path, **options), conftest=CONFTEST)
    pytester.makepyfile(**{"test_app": SYNC_TESTS if kind == "sync" else ASYNC_TESTS})
    return path


def committed(path: Path) -> list[str]:
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        names = list(conn.scalars(sa.text("SELECT name FROM item ORDER BY id")))
    engine.dispose()
    return names


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_fixtures_roll_back_every_test(pytester: pytest.Pytester, kind: str) -> None:
    path = make_suite(pytester, kind)
    result = pytester.runpytest_subprocess("-p", "anyio")
    result.assert_outcomes(passed=2)
    assert committed(path) == ["committed"]


def test_a_missing_registry_fixture_says_how_to_define_it(pytester: pytest.Pytester) -> None:
    make_suite(pytester, "sync")
    (pytester.path / "conftest.py").unlink()
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*'db_registry' fixture is not defined for this test. Define it in your conftest.py*"])


def test_the_plugin_can_be_turned_off(pytester: pytest.Pytester) -> None:
    make_suite(pytester, "sync")
    result = pytester.runpytest_subprocess("-p", "no:starlette_alchemy")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*fixture 'db_transaction' not found*"])


COUNTING_TESTS = """
from starlette.testclient import TestClient

from app import app


def test_within_budget(db_transaction, query_counter):
    with TestClient(app) as client:
        client.post("/items/a")
    assert query_counter.count == 1


def test_over_budget(db_transaction, query_counter):
    with TestClient(app) as client:
        client.post("/items/b")
        client.post("/items/c")
    assert query_counter.count <= 1
"""


def test_query_counter_counts_the_apps_statements_and_a_failure_lists_them(pytester: pytest.Pytester) -> None:
    make_suite(pytester, "sync")
    pytester.makepyfile(test_app=COUNTING_TESTS)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*assert 2 <= 1*",
            r"*where 2 = <QueryCounter: 2 queries:\n  1. INSERT INTO item (name) VALUES (?)\n  2. INSERT INTO item*",
        ]
    )
