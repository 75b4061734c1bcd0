"""Per-scope lifecycle tracking: which objects a scope touched, what it wrote, and the audit hooks.

Listeners are registered once, on the private ``_TrackedSession`` class that the
registries' session factories derive from, and find the scope's ``Collector``
in ``session.info``: no per-session ``event.listen``, nothing on ``Session``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.util import IdentitySet

from .changes import _NO_CHANGES, _NO_INFO, Changes, _Write, net, record_bulk, record_flush
from .observe import ScopeStats

if TYPE_CHECKING:
    from sqlalchemy.orm.unitofwork import UOWTransaction

__all__ = ["Collector", "Hooks"]

logger = logging.getLogger("starlette_alchemy")

# Where a tracked session keeps the Collector of the scope that owns it, once there is one;
# the function that creates it on first use (a scope that never writes needs none);
# and the registry's Hooks.
_COLLECTOR_KEY = "starlette_alchemy.collector"
_TRACKER_KEY = "starlette_alchemy.tracker"
_HOOKS_KEY = "starlette_alchemy.hooks"

Callback = Callable[[], None | Awaitable[None]]
BeforeCommitHook = Callable[[Session, "Changes"], None]
AfterCommitHook = Callable[["Changes"], None | Awaitable[None]]


# One call of after-commit work: an after_commit hook with its Changes, or an on_commit callback.
AfterCommitCall = tuple[Callable[..., Any], tuple[Any, ...]]
# Takes a committed transaction's Changes and after-commit calls; returns whether they still run.
Capture = Callable[["Changes", list[AfterCommitCall]], bool]


class Hooks:
    """The audit hooks registered on one registry."""

    __slots__ = ("after_commit", "before_commit", "capture")

    def __init__(self) -> None:
        self.before_commit: list[BeforeCommitHook] = []
        self.after_commit: list[AfterCommitHook] = []
        # Set by ``starlette_alchemy.testing.capture_on_commit()``.
        self.capture: Capture | None = None


class Collector:
    """What one scope did: the objects it touched, by state, and the rows its transaction wrote.

    The objects the scope touched are those in its session (read from the
    session's own bookkeeping) and those that left it, which the lifecycle
    events ``persistent_to_deleted``, ``persistent_to_detached`` and
    ``deleted_to_detached`` record. Each object's state is then read from
    SQLAlchemy itself, so the four sets agree with ``sqlalchemy.inspect(obj)``
    after rollbacks, SAVEPOINT rollbacks, expunge and close, where the events
    alone do not. Objects are held weakly: one garbage-collected is in no set.
    """

    __slots__ = ("_callbacks", "_hooks", "_info", "_journal", "_left", "_ready", "_savepoints", "_session", "_stats")

    def __init__(
        self,
        hooks: Hooks,
        info: Callable[[], Mapping[str, Any] | None] | None = None,
        stats: Callable[[], ScopeStats] | None = None,
    ) -> None:
        self._hooks = hooks
        # Read the scope's db.info and db.stats, for the snapshots in each Changes.
        self._info = info
        self._stats = stats
        self._session: Session | None = None
        self._left = _WeakStateSet()
        self._journal: list[_Write] = []
        self._callbacks: list[Callback] = []
        # One (savepoint, journal length, callbacks length) per open SAVEPOINT.
        self._savepoints: list[tuple[SessionTransaction, int, int]] = []
        # Committed transactions whose after-commit work has not run yet.
        self._ready: list[tuple[Changes, list[Callback]]] = []

    @property
    def pending(self) -> IdentitySet:
        """Objects touched by this scope that are pending now (added, not yet flushed)."""
        return self._select(lambda state: state.pending)

    @property
    def persistent(self) -> IdentitySet:
        """Objects touched by this scope that are persistent now (in a session, with a row)."""
        return self._select(lambda state: state.persistent)

    @property
    def deleted(self) -> IdentitySet:
        """Objects touched by this scope that are deleted now (DELETE flushed, not yet committed)."""
        return self._select(lambda state: state.deleted)

    @property
    def detached(self) -> IdentitySet:
        """Objects touched by this scope that are detached now (a row, but in no session)."""
        return self._select(lambda state: state.detached)

    def changes(self) -> Changes:
        """Return what this transaction's flushes and bulk statements wrote so far, netted per object."""
        return net(self._journal, self._snapshot(), self._stats() if self._stats is not None else None)

    def on_commit(self, callback: Callback) -> None:
        """Run *callback* once this scope's outermost transaction commits; forget it on rollback."""
        self._callbacks.append(callback)

    def _attach(self, session: Session) -> None:
        """Follow *session*, the scope's (synchronous) session."""
        self._session = session
        session.info[_COLLECTOR_KEY] = self

    def _snapshot(self) -> Mapping[str, Any]:
        """A read-only copy of the scope's ``db.info`` as it is now."""
        info = self._info() if self._info is not None else None
        return MappingProxyType(dict(info)) if info else _NO_INFO

    def _select(self, predicate: Callable[[InstanceState[Any]], bool]) -> IdentitySet:
        found = IdentitySet()
        for state in self._states():
            obj = state.obj()
            if obj is not None and predicate(state):
                found.add(obj)
        return found

    def _states(self) -> Iterator[InstanceState[Any]]:
        """The states of every object the scope touched that is still alive (some twice)."""
        session = self._session
        if session is not None:
            yield from session.identity_map.all_states()
            yield from (instance_state(obj) for obj in session.new)
        yield from self._left

    # -- called by the listeners below -------------------------------------------------

    def _savepoint_begun(self, savepoint: SessionTransaction) -> None:
        self._savepoints.append((savepoint, len(self._journal), len(self._callbacks)))

    def _savepoint_released(self, savepoint: SessionTransaction) -> None:
        # What the savepoint wrote now belongs to the enclosing transaction.
        self._savepoints = [entry for entry in self._savepoints if entry[0] is not savepoint]

    def _savepoint_rolled_back(self, savepoint: SessionTransaction) -> None:
        for index, (candidate, journal_length, callbacks_length) in enumerate(self._savepoints):
            if candidate is savepoint:
                del self._journal[journal_length:]
                del self._callbacks[callbacks_length:]
                del self._savepoints[index:]
                return

    def _committed(self) -> None:
        """The outermost transaction committed: queue its after-commit work, start afresh."""
        hooks = self._hooks
        if hooks.after_commit or hooks.capture is not None:
            changes = self.changes()
        else:
            changes = _NO_CHANGES
        if changes or self._callbacks:
            self._ready.append((changes, self._callbacks))
        self._journal = []
        self._callbacks = []
        self._savepoints = []

    def _ended(self) -> None:
        """The outermost transaction ended without committing: forget its writes and callbacks."""
        self._journal = []
        self._callbacks = []
        self._savepoints = []

    # -- called by the scope's owner ---------------------------------------------------

    def _settle(self, *, committed: bool) -> None:
        """Close the scope's books: callbacks not tied to a transaction run only if the scope committed."""
        if committed and self._callbacks:
            self._ready.append((Changes(), self._callbacks))
        self._callbacks = []

    @property
    def _has_ready(self) -> bool:
        """True if committed transactions are waiting for their after-commit hooks and callbacks."""
        return bool(self._ready)

    def _run_ready(self) -> None:
        """Run the after-commit hooks and callbacks of committed transactions; log their errors."""
        for function, argument in self._take_ready():
            with _logged(function):
                function(*argument)

    async def _arun_ready(self) -> None:
        """Like ``_run_ready()``, awaiting the hooks and callbacks that are coroutine functions."""
        for function, argument in self._take_ready():
            with _logged(function):
                result = function(*argument)
                if inspect.isawaitable(result):
                    # In a task of its own, which the hook's own timeouts may cancel: the
                    # caller runs this where nothing else can (shield.run_to_completion).
                    await asyncio.ensure_future(result)

    def _take_ready(self) -> Iterator[AfterCommitCall]:
        ready, self._ready = self._ready, []
        for changes, callbacks in ready:
            calls: list[AfterCommitCall] = [(hook, (changes,)) for hook in self._hooks.after_commit] if changes else []
            calls += [(callback, ()) for callback in callbacks]
            capture = self._hooks.capture
            if capture is None or capture(changes, calls):
                yield from calls


@contextmanager
def _logged(function: Callable[..., Any]) -> Iterator[None]:
    """Log an ``Exception`` raised by a hook instead of raising it: the transaction already committed."""
    try:
        yield
    except Exception:
        logger.exception("After-commit hook %r failed; the transaction had committed.", function)
    except asyncio.CancelledError:
        # Only the hook's own task can be cancelled here: asyncio.run() cancels every task at exit.
        logger.error("After-commit hook %r was cancelled; the transaction had committed.", function)


class _WeakStateSet:
    """An insertion-ordered set of ``InstanceState`` objects, held weakly, by identity."""

    __slots__ = ("_discard", "_members")

    def __init__(self) -> None:
        # Keyed by weak reference: a live one hashes and compares as its state does
        # (by identity), and the callback receives the very reference it must remove.
        members: dict[weakref.ref[InstanceState[Any]], None] = {}
        self._members = members
        self._discard = lambda ref: members.pop(ref, None)

    def add(self, state: InstanceState[Any]) -> None:
        ref = weakref.ref(state, self._discard)
        if ref not in self._members:
            self._members[ref] = None

    def __iter__(self) -> Iterator[InstanceState[Any]]:
        for ref in list(self._members):
            state = ref()
            if state is not None:
                yield state


# -- the listeners ----------------------------------------------------------------------


class _TrackedSession(Session):
    """A Session class whose sessions report to the ``Collector`` found in their ``info``.

    The package's factories derive their session classes from it, so sessions
    created anywhere else in the process never reach these listeners.
    """


def _collector(session: Session) -> Collector | None:
    """The scope's collector, if it has one yet."""
    return session.info.get(_COLLECTOR_KEY)


def _recorder(session: Session) -> Collector | None:
    """The scope's collector, created now if need be: something is about to be recorded."""
    collector = session.info.get(_COLLECTOR_KEY)
    if collector is None:
        tracker = session.info.get(_TRACKER_KEY)
        if tracker is not None:
            collector = tracker()
    return collector


def _left_session(session: Session, state: InstanceState[Any]) -> None:
    collector = _recorder(session)
    if collector is not None:
        collector._left.add(state)


# The transitions that take an object out of the session's own bookkeeping. The
# other seven end in the session (its new objects or identity map), where the
# collector reads them; listening to those would cost about a tenth of a flush.
for _transition in ("persistent_to_deleted", "persistent_to_detached", "deleted_to_detached"):
    # raw=True: the listener gets the InstanceState, without SQLAlchemy's wrapper call.
    event.listen(_TrackedSession, _transition, _left_session, raw=True)


@event.listens_for(_TrackedSession, "after_flush")
def _after_flush(session: Session, flush_context: UOWTransaction) -> None:
    collector = _recorder(session)
    if collector is not None:
        record_flush(collector._journal, flush_context)


@event.listens_for(_TrackedSession, "do_orm_execute")
def _bulk_statement(execute_state: ORMExecuteState) -> Any:
    if not execute_state.is_orm_statement or not execute_state.statement.is_dml:
        return None
    collector = _recorder(execute_state.session)
    if collector is None:
        return None
    # Run the statement now, so it is journaled only if it succeeded.
    result = execute_state.invoke_statement()
    record_bulk(collector._journal, execute_state)
    return result


@event.listens_for(_TrackedSession, "after_transaction_create")
def _transaction_created(session: Session, transaction: SessionTransaction) -> None:
    if transaction.nested:
        collector = _recorder(session)
        if collector is not None:
            collector._savepoint_begun(transaction)


@event.listens_for(_TrackedSession, "before_commit")
def _before_commit(session: Session) -> None:
    hooks: Hooks | None = session.info.get(_HOOKS_KEY)
    # before_commit fires for a SAVEPOINT release too; the hooks run for the outermost COMMIT only.
    if hooks is None or not hooks.before_commit or session.in_nested_transaction():
        return
    # The hooks see the final state: flush first. What they add is flushed by commit() itself.
    session.flush()
    collector = _collector(session)  # none yet: nothing was ever written
    changes = collector.changes() if collector is not None else Changes()
    if changes:
        for hook in hooks.before_commit:
            hook(session, changes)


@event.listens_for(_TrackedSession, "after_commit")
def _after_commit(session: Session) -> None:
    collector = _collector(session)
    if collector is None:
        return
    savepoint = session.get_nested_transaction()
    if savepoint is not None:
        collector._savepoint_released(savepoint)
    else:
        collector._committed()


@event.listens_for(_TrackedSession, "after_rollback")
def _after_rollback(session: Session) -> None:
    collector = _collector(session)
    if collector is None:
        return
    # after_rollback fires for a SAVEPOINT rollback too; the innermost open savepoint is the one undone.
    savepoint = session.get_nested_transaction()
    if savepoint is not None:
        collector._savepoint_rolled_back(savepoint)
    else:
        collector._ended()


@event.listens_for(_TrackedSession, "after_transaction_end")
def _transaction_ended(session: Session, transaction: SessionTransaction) -> None:
    # The outermost transaction ended: after a commit this is a no-op; after a
    # close() without rollback, the connection's reset discarded the writes.
    if transaction.parent is None:
        collector = _collector(session)
        if collector is not None:
            collector._ended()
