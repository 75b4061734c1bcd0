"""Counting the statements that scopes run, for tests: ``count_queries()`` and ``assert_max_queries()``.

Re-exported by ``starlette_alchemy.testing``; the ``query_counter`` fixture
wraps ``count_queries()``. A counter sees what ``db.stats`` counts, in every
thread and task: the statements of scopes whose registry keeps statistics.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .observe import Observer, _watchers

__all__ = ["QueryCounter", "assert_max_queries", "count_queries"]


class QueryCounter:
    """The statements that scopes ran while it counted, in order (SQL with placeholders, no parameters)."""

    __slots__ = ("_observer", "statements")

    def __init__(self, db: Any = None) -> None:
        self.statements: list[str] = []
        # Only this registry's scopes, or (None) every registry's.
        self._observer: Observer | None = _observer_of(db) if db is not None else None

    @property
    def count(self) -> int:
        """How many statements ran."""
        return len(self.statements)

    def clear(self) -> None:
        """Forget what was counted so far (the set-up's statements, say)."""
        self.statements.clear()

    def assert_max(self, limit: int) -> None:
        """Raise ``AssertionError``, listing the statements, if more than *limit* ran."""
        if self.count > limit:
            raise AssertionError(f"{self.count} queries ran, more than the {limit} allowed:\n{self._listing()}")

    def _record(self, statement: str, observer: Observer) -> None:
        if self._observer is None or observer is self._observer:
            self.statements.append(statement)

    def _listing(self) -> str:
        return "\n".join(f"  {number}. {' '.join(sql.split())}" for number, sql in enumerate(self.statements, 1))

    def __repr__(self) -> str:
        # pytest shows this when 'assert query_counter.count == n' fails: the statements are the explanation.
        if not self.statements:
            return "<QueryCounter: no queries>"
        return f"<QueryCounter: {self.count} queries:\n{self._listing()}\n>"


@contextmanager
def count_queries(db: Any = None) -> Iterator[QueryCounter]:
    """Count the statements that scopes of *db* (or of every registry) run in the block."""
    counter = QueryCounter(db)
    _watchers.append(counter._record)
    try:
        yield counter
    finally:
        _watchers.remove(counter._record)


@contextmanager
def assert_max_queries(limit: int, db: Any = None) -> Iterator[QueryCounter]:
    """Fail, listing the statements, if scopes of *db* (or of every registry) run more than *limit* in the block."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise TypeError(f"'assert_max_queries' takes a number of queries, 0 or more; got {limit!r}.")
    with count_queries(db) as counter:
        yield counter
    counter.assert_max(limit)


def _observer_of(db: Any) -> Observer:
    observer = getattr(getattr(db, "registry", None), "observer", None)
    if not isinstance(observer, Observer):
        raise TypeError(
            f"Queries are counted for a ScopedSession or AsyncScopedSession that keeps statistics "
            f"(stats=True, the default); got {db!r}."
        )
    return observer
