"""What a scope's statements cost: ``ScopeStats``, N+1 detection, slow statements and the transaction span.

Each scope whose registry keeps statistics has a ``Meter``. When the scope's
session begins a transaction, ``watch()`` ties the connection to the meter;
the execute listeners this module puts on that engine's dialect then run,
count and time each statement the connection sends, and leave every other
connection's to SQLAlchemy. The session's own listeners (sessions.py) report
lazy loads, COMMITs and the end of each transaction. When the scope ends,
``Meter.finish()`` records an OpenTelemetry span for it, if OpenTelemetry is
installed and a tracer provider is set.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Protocol
from weakref import WeakSet

from sqlalchemy import Connection, Engine, event
from sqlalchemy.orm import ORMExecuteState

from .exceptions import NPlusOneError
from .policy import warn_once
from .spans import record_span

__all__ = ["Observer", "ScopeStats"]

logger = logging.getLogger("starlette_alchemy")

NPlusOne = int | Literal["raise"] | None
# The threshold of n_plus_one="raise": the default one, where it raises rather than warns.
_N_PLUS_ONE = 10
_NO_ROWS: Mapping[str, int] = MappingProxyType({"insert": 0, "update": 0, "delete": 0})


@dataclass(frozen=True, slots=True)
class ScopeStats:
    """What a scope's statements cost so far: a snapshot, taken when read.

    ``queries`` counts the statements its sessions sent (not BEGIN, COMMIT,
    ROLLBACK or SAVEPOINT); ``seconds`` is the time spent in them and in the
    COMMIT; ``lazy_loads`` counts relationship loads that ran a query;
    ``rows`` maps ``"insert"``, ``"update"`` and ``"delete"`` to rows affected.
    """

    queries: int = 0
    seconds: float = 0.0
    lazy_loads: int = 0
    rows: Mapping[str, int] = field(default_factory=lambda: _NO_ROWS)


class Described(Protocol):
    """What a meter reads of its scope (``ScopeState``, registry.py)."""

    def describe(self) -> str: ...


class Observer:
    """A registry's statistics settings, and the N+1 warnings it already gave."""

    __slots__ = ("engines", "n_plus_one", "raises", "slow_query", "warned")

    def __init__(self, *, n_plus_one: NPlusOne = _N_PLUS_ONE, slow_query: float | None = None) -> None:
        _check_settings(n_plus_one, slow_query)
        self.raises = n_plus_one == "raise"
        self.n_plus_one: int | None = _N_PLUS_ONE if n_plus_one == "raise" else n_plus_one
        self.slow_query = slow_query
        # The (route, relationship) pairs already warned of: N+1 warnings are once per registry.
        self.warned: set[tuple[str, str]] = set()
        # The engines whose statements this registry's sessions count (see _listen()).
        self.engines: set[Engine] = set()


def _check_settings(n_plus_one: object, slow_query: object) -> None:
    if n_plus_one not in (None, "raise") and not (
        isinstance(n_plus_one, int) and not isinstance(n_plus_one, bool) and n_plus_one >= 2
    ):
        raise ValueError(
            f"'n_plus_one' must be a number of lazy loads (2 or more) that triggers the warning, 'raise' to raise "
            f"NPlusOneError instead, or None to turn it off; got {n_plus_one!r}."
        )
    if slow_query is not None and (
        not isinstance(slow_query, int | float) or isinstance(slow_query, bool) or not slow_query > 0
    ):
        raise ValueError(f"'slow_query' must be a number of seconds, more than 0, or None; got {slow_query!r}.")


class Meter:
    """One scope's running statistics: fed by the engine's events, read as ``ScopeStats`` snapshots."""

    __slots__ = (
        "_commit_mark",
        "_connections",
        "_last_end",
        "_lazy",
        "_route",
        "_scope",
        "began_ns",
        "deleted",
        "ended_ns",
        "inserted",
        "lazy_loads",
        "max_queries",
        "observer",
        "outcome",
        "queries",
        "seconds",
        "system",
        "updated",
    )

    def __init__(self, observer: Observer, scope: Described, max_queries: int | None) -> None:
        self.observer = observer
        # The scope, for its name in messages, named only when one is needed; let go of when it ends.
        self._scope: Described | None = scope
        self._route: str | None = None
        self.max_queries = max_queries
        self.queries = self.lazy_loads = self.inserted = self.updated = self.deleted = 0
        self.seconds = 0.0
        # When the last statement ended, and when commit() was called (0.0: no COMMIT in flight).
        self._last_end = self._commit_mark = 0.0
        self._lazy: dict[object, int] = {}
        self._connections: list[Connection] = []
        # For the span: the database, when the first transaction began and the last one ended, and how.
        self.system: str | None = None
        self.began_ns = self.ended_ns = 0
        self.outcome: str | None = None

    @property
    def route(self) -> str:
        """The scope's name in messages: its request's route, or where its ``db.scope()`` was opened."""
        if self._route is None:
            self._route = self._scope.describe() if self._scope is not None else "a scope"
        return self._route

    def snapshot(self) -> ScopeStats:
        """The statistics as they are now (a COMMIT in flight is counted up to now)."""
        self.stop_commit_clock()
        rows = MappingProxyType({"insert": self.inserted, "update": self.updated, "delete": self.deleted})
        return ScopeStats(self.queries, self.seconds, self.lazy_loads, rows)

    # -- called by the session's listeners (sessions.py) -----------------------------------

    def lazy_load(self, execute_state: ORMExecuteState) -> None:
        """Count a lazy load about to run its query; warn (or raise) when one relationship loads too often."""
        self.lazy_loads += 1
        path = execute_state.loader_strategy_path
        relationship = path[-1] if path is not None and len(path) else None
        count = self._lazy[relationship] = self._lazy.get(relationship, 0) + 1
        threshold = self.observer.n_plus_one
        if threshold is not None and count >= threshold and relationship is not None:
            self._n_plus_one(str(relationship), count)

    def _n_plus_one(self, relationship: str, count: int) -> None:
        fix = f"load them with the query that loads the parents: '.options(selectinload({relationship}))'"
        if self.observer.raises:
            raise NPlusOneError(f"{self.route} lazy-loaded {relationship} {count} times, one query each (N+1); {fix}.")
        if count == self.observer.n_plus_one:
            warn_once(
                self.route,
                relationship,
                "%s lazy-loaded %s %d times, one query each (N+1); %s.",
                relationship,
                count,
                fix,
                seen=self.observer.warned,
            )

    def transaction_ended(self, wrote: bool) -> None:
        """The scope's root transaction ended; ``commit()`` then says if it committed."""
        if not self._connections:
            return  # it never reached the database
        self.ended_ns = time.time_ns()
        # A failed COMMIT stays the outcome: discarding its connection ends the transaction afterwards.
        if self.outcome != "commit_failed" and (wrote or self.outcome is None):
            self.outcome = "rollback"
        for connection in self._connections:
            if getattr(connection, _METER, None) is self:
                delattr(connection, _METER)
        self._connections.clear()

    def commit_started(self) -> None:
        """The session's ``commit()`` was called: its COMMIT is timed from then, or from its flush's last statement."""
        self._commit_mark = time.perf_counter()

    def committed(self, ok: bool) -> None:
        """The session's ``commit()`` returned (*ok*) or raised."""
        self.stop_commit_clock()  # unless a snapshot taken in an after-commit listener did
        self.outcome = "commit" if ok else "commit_failed"

    def stop_commit_clock(self) -> None:
        """Count the COMMIT in flight, if any, up to now."""
        mark = self._commit_mark
        if mark:
            self.seconds += time.perf_counter() - max(mark, self._last_end)
            self._commit_mark = 0.0

    # -- called by the engine's listeners ------------------------------------------------

    def _statement(self, statement: str, started: float, failed: bool) -> None:
        """Count a statement that was sent at *started* and just ended."""
        self._last_end = now = time.perf_counter()
        elapsed = now - started
        self.queries += 1
        self.seconds += elapsed
        if self.max_queries is not None and self.queries == self.max_queries + 1:
            logger.warning(
                "%s ran more than its max_queries=%d statements; the one over: %s",
                self.route,
                self.max_queries,
                _shorten(statement),
            )
        slow = self.observer.slow_query
        if slow is not None and elapsed >= slow:
            logger.warning(
                "A statement of %s took %.3f s (slow_query=%s)%s: %s",
                self.route,
                elapsed,
                slow,
                " and failed" if failed else "",
                _shorten(statement),
            )
        if _watchers:
            for watcher in _watchers:
                watcher(statement, self.observer)

    def _rows(self, cursor: Any, parameters: Any, context: Any, many: bool) -> None:
        """Count the rows an INSERT, UPDATE or DELETE affected: the driver's count, else one per parameter set."""
        count: int = cursor.rowcount
        if count < 0 or (count == 0 and context.isinsert):
            # An INSERT ... RETURNING whose rows are not fetched yet, or an executemany the driver does not count.
            count = len(parameters) if many else 1
        if context.isinsert:
            self.inserted += count
        elif context.isupdate:
            self.updated += count
        else:
            self.deleted += count

    # -- at the scope's end --------------------------------------------------------------

    def finish(self, wrote: bool) -> None:
        """The scope ended: record its ``db.transaction`` span, if it used the database and a tracer is set.

        *wrote*: its transaction, if one is still open (its owner rolls it back next), wrote.
        """
        if self._connections:
            self.transaction_ended(wrote)
        if self.began_ns:
            record_span(self)
        self._scope = None  # the scope holds the meter: no cycle outlives it


def server_timing(meters: list[Meter | None]) -> bytes | None:
    """The ``Server-Timing`` metric of a request's scopes (``db;dur=<ms>;desc="<n> queries"``), if they sent any."""
    queries, seconds = 0, 0.0
    for meter in meters:
        if meter is not None:
            meter.stop_commit_clock()
            queries += meter.queries
            seconds += meter.seconds
    if not queries and not seconds:
        return None
    return f'db;dur={seconds * 1000:.2f};desc="{queries} queries"'.encode()


def _shorten(statement: str) -> str:
    """The statement for a log line: placeholders, never parameters; one line, at most 500 characters."""
    one_line = " ".join(statement.split())
    return one_line if len(one_line) <= 500 else one_line[:497] + "..."


# -- tying connections to meters, and the engine's listeners ------------------------------------

# The attribute of a Connection (a new object per checkout) that holds the meter of the scope it began for.
_METER = "_starlette_alchemy_meter"
_engines: WeakSet[Engine] = WeakSet()
_engines_lock = threading.Lock()
# Called with each counted statement: the testing kit's query counters.
_watchers: list[Callable[[str, Observer], None]] = []


def watch(connection: Connection, meter: Meter) -> None:
    """Count what *connection* sends, for *meter*, until its transaction ends."""
    if getattr(connection, _METER, None) is meter:
        return  # a SAVEPOINT of the transaction already watched
    engine = connection.engine
    if engine not in meter.observer.engines:
        _listen(engine)
        meter.observer.engines.add(engine)
    # An attribute of the Connection rather than a weak mapping: it is read for every statement.
    setattr(connection, _METER, meter)
    meter._connections.append(connection)
    if not meter.began_ns:
        meter.began_ns = time.time_ns()
        dialect = connection.dialect
        meter.system = "mariadb" if getattr(dialect, "is_mariadb", False) else dialect.name


def _listen(engine: Engine) -> None:
    # The dialect's execute events, not the Connection's: with a Connection event listened to, SQLAlchemy
    # dispatches every connection event of the engine through a per-connection join, which cost
    # more per transaction than everything this module does.
    with _engines_lock:
        if engine in _engines:
            return
        event.listen(engine, "do_execute", _do_execute)
        event.listen(engine, "do_executemany", _do_executemany)
        event.listen(engine, "do_execute_no_params", _do_execute_no_params)
        _engines.add(engine)


def _counting(method: str, many: bool = False) -> Callable[..., bool]:
    """A dialect execute listener: it runs (with the dialect's *method*) and counts a watched connection's statement."""

    def listener(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        meter: Meter | None = getattr(context.root_connection, _METER, None)
        if meter is None or (statement[:4] in _CONTROL and _controls_transaction(statement)):
            return False  # SQLAlchemy runs it, uncounted
        run = getattr(context.dialect, method)
        started = time.perf_counter()
        try:
            if parameters is _NO_PARAMETERS:
                run(cursor, statement, context)
            else:
                run(cursor, statement, parameters, context)
        except BaseException:
            meter._statement(statement, started, failed=True)
            raise
        meter._statement(statement, started, failed=False)
        if context.isinsert or context.isupdate or context.isdelete:
            meter._rows(cursor, parameters, context, many)
        return True  # it ran

    return listener


_NO_PARAMETERS = object()
_do_execute = _counting("do_execute")
_do_executemany = _counting("do_executemany", many=True)
_do_execute_with_no_parameters = _counting("do_execute_no_params")


def _do_execute_no_params(cursor: Any, statement: str, context: Any) -> bool:
    return _do_execute_with_no_parameters(cursor, statement, _NO_PARAMETERS, context)


def _controls_transaction(statement: str) -> bool:
    """True for SAVEPOINT, RELEASE, ROLLBACK TO, and BEGIN or COMMIT sent as SQL (SQLite's recipe), in capitals."""
    return statement.split(None, 1)[0] in _CONTROL_WORDS


_CONTROL = frozenset(("SAVE", "RELE", "ROLL", "BEGI", "COMM"))
_CONTROL_WORDS = frozenset(("SAVEPOINT", "RELEASE", "ROLLBACK", "BEGIN", "COMMIT"))
