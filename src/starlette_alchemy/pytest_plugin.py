"""Pytest fixtures for transactional tests; the plugin adds nothing else, and they do nothing until asked for.

Installed as the ``starlette_alchemy`` plugin (``-p no:starlette_alchemy``
turns it off). Override ``db_registry`` in your ``conftest.py`` to return the
registry your app uses, then ask for ``db_transaction`` (a ``ScopedSession``)
or ``adb_transaction`` (an ``AsyncScopedSession``, with anyio's pytest plugin)
in the tests that should leave the database as they found it, for
``captured_commits`` to see the after-commit work they caused, and for
``query_counter`` to see the statements the app's scopes ran. The fixtures
wrap the functions of ``starlette_alchemy.testing``, imported only when a test
uses one, so the plugin costs nothing otherwise.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from sqlalchemy import Connection
    from sqlalchemy.ext.asyncio import AsyncConnection

    from .testing import CapturedCommits, QueryCounter

_NO_REGISTRY = (
    "The 'db_registry' fixture is not defined for this test. Define it in your conftest.py to return "
    "the ScopedSession or AsyncScopedSession your app uses."
)


@pytest.fixture
def db_registry() -> Any:
    """The registry of the app under test: override this fixture to return it."""
    pytest.fail(_NO_REGISTRY, pytrace=False)


@pytest.fixture
def db_transaction(db_registry: Any) -> Iterator[Connection]:
    """Run the test with ``db_registry`` bound to one connection whose transaction is rolled back afterwards."""
    from .testing import rolled_back

    with rolled_back(db_registry) as connection:
        yield connection


@pytest.fixture
async def adb_transaction(db_registry: Any, anyio_backend: Any) -> AsyncIterator[AsyncConnection]:
    """Like ``db_transaction``, for an ``AsyncScopedSession``; the test runs under anyio."""
    from .testing import arolled_back

    async with arolled_back(db_registry) as connection:
        yield connection


@pytest.fixture
def captured_commits(db_registry: Any) -> Iterator[CapturedCommits]:
    """The after-commit work of what the test commits, recorded instead of run (``run()`` runs it)."""
    from .testing import capture_on_commit

    with capture_on_commit(db_registry) as captured:
        yield captured


@pytest.fixture
def query_counter() -> Iterator[QueryCounter]:
    """The statements every registry's scopes run during the test (``assert query_counter.count <= n``)."""
    from .testing import count_queries

    with count_queries() as counter:
        yield counter
