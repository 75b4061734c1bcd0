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
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import event
from sqlalchemy.orm import NO_VALUE, Mapper, ORMExecuteState, Session, SessionTransaction
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.util import IdentitySet

if TYPE_CHECKING:
    from sqlalchemy.orm.unitofwork import UOWTransaction
    from sqlalchemy.sql.base import Executable
    from sqlalchemy.sql.elements import ColumnElement

__all__ = ["UNKNOWN", "Change", "Changes", "Collector", "Hooks"]

logger = logging.getLogger("starlette_alchemy")

# Where a tracked session keeps the Collector of the scope that owns it, once there is one;
# the function that creates it on first use (a scope that never writes needs none);
# and the registry's Hooks.
_COLLECTOR_KEY = "starlette_alchemy.collector"
_TRACKER_KEY = "starlette_alchemy.tracker"
_HOOKS_KEY = "starlette_alchemy.hooks"

Op = Literal["insert", "update", "delete"]
Callback = Callable[[], None | Awaitable[None]]
BeforeCommitHook = Callable[[Session, "Changes"], None]
AfterCommitHook = Callable[["Changes"], None | Awaitable[None]]


class _Unknown:
    """The type of ``UNKNOWN``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Any = _Unknown()
"""A value in a ``Change.diff`` that was never loaded, so it is not known without SQL."""


@dataclass(frozen=True, slots=True)
class Change:
    """One row that a scope inserted, updated or deleted, captured at flush time.

    ``diff`` maps attribute names to ``(old, new)``: ``old`` is ``None`` for an
    insert, ``new`` is ``None`` for a delete, and either is ``UNKNOWN`` where
    the value was not loaded. For a bulk ``update()``/``delete()`` statement,
    ``obj`` is ``None``, ``statement`` is the statement, and ``identity`` is
    ``None`` unless the statement was run with one parameter set per row.
    """

    obj: Any
    entity: type[Any]
    identity: tuple[Any, ...] | None
    op: Op
    diff: Mapping[str, tuple[Any, Any]]
    statement: Executable | None = None

    @property
    def criteria(self) -> ColumnElement[Any] | None:
        """The WHERE clause of the bulk statement this change came from, if any."""
        return getattr(self.statement, "whereclause", None)


_NO_INFO: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Changes:
    """What a scope's transaction wrote, netted per object: inserted, updated and deleted rows.

    ``info`` is a read-only copy of the scope's ``db.info`` taken at COMMIT (or
    when ``changes()`` was called): who made the change, for audit hooks.
    """

    inserted: tuple[Change, ...] = ()
    updated: tuple[Change, ...] = ()
    deleted: tuple[Change, ...] = ()
    info: Mapping[str, Any] = field(default_factory=lambda: _NO_INFO, compare=False)

    def __iter__(self) -> Iterator[Change]:
        yield from self.inserted
        yield from self.updated
        yield from self.deleted

    def __len__(self) -> int:
        return len(self.inserted) + len(self.updated) + len(self.deleted)

    def __bool__(self) -> bool:
        return bool(self.inserted or self.updated or self.deleted)


_NO_CHANGES = Changes()

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


class _Write:
    """One journal entry: what a flush or a bulk statement wrote for one row (or one statement)."""

    __slots__ = ("data", "entity", "identity", "obj", "op", "state", "statement")

    def __init__(
        self,
        op: Op,
        state: InstanceState[Any] | None,
        entity: type[Any],
        identity: tuple[Any, ...] | None,
        data: dict[str, Any],
        statement: Executable | None = None,
    ) -> None:
        self.op = op
        self.state = state
        # A strong reference, so a Change always has its object until the transaction ends.
        self.obj = state.obj() if state is not None else None
        self.entity = entity
        self.identity = identity
        # insert: attribute -> new value; delete: attribute -> old value; update: attribute -> (old, new)
        self.data = data
        self.statement = statement


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

    __slots__ = ("_callbacks", "_hooks", "_info", "_journal", "_left", "_ready", "_savepoints", "_session")

    def __init__(self, hooks: Hooks, info: Callable[[], Mapping[str, Any] | None] | None = None) -> None:
        self._hooks = hooks
        # Reads the scope's db.info, for the snapshot in each Changes.
        self._info = info
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
        return _net(self._journal, self._snapshot())

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
            changes = _net(self._journal, self._snapshot())
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


# -- computing Changes ------------------------------------------------------------------


class _MapperInfo:
    """The column attribute keys (in mapper order, and as a set) and primary key attribute keys of one mapper."""

    __slots__ = ("column_set", "columns", "primary_key")

    def __init__(self, mapper: Mapper[Any]) -> None:
        self.columns = tuple(prop.key for prop in mapper.column_attrs)
        self.column_set = frozenset(self.columns)
        self.primary_key = tuple(mapper.get_property_by_column(column).key for column in mapper.primary_key)


_mapper_info: dict[Mapper[Any], _MapperInfo] = {}


def _info(mapper: Mapper[Any]) -> _MapperInfo:
    info = _mapper_info.get(mapper)
    if info is None:
        info = _mapper_info[mapper] = _MapperInfo(mapper)
    return info


def _record_flush(collector: Collector, flush_context: UOWTransaction) -> None:
    """Journal the rows a flush just wrote, while their history is still intact."""
    journal = collector._journal
    inserted: list[_Write] = []
    for state, (is_delete, list_only) in flush_context.states.items():
        if list_only:
            continue
        info = _info(state.mapper)
        values = state.dict
        if is_delete:
            old = {key: _original(state, key) for key in info.columns if key in values}
            journal.append(_Write("delete", state, state.class_, state.identity, old))
        elif state.key is None:
            # A plain copy keeps the flush fast; _change() picks the columns and the identity from it.
            inserted.append(_Write("insert", state, state.class_, None, values.copy()))
        else:
            diff = _diff(state, info)
            if diff:
                journal.append(_Write("update", state, state.class_, state.identity, diff))
    # The flush's own bookkeeping is unordered; report inserts in the order the objects were added.
    inserted.sort(key=_insert_order)
    journal.extend(inserted)


def _insert_order(write: _Write) -> int:
    return write.state.insert_order or 0  # type: ignore[union-attr]


def _original(state: InstanceState[Any], key: str) -> Any:
    """The value *key* had when the transaction last read or wrote it (before any pending change)."""
    old = state.committed_state.get(key, state.dict[key])
    return UNKNOWN if old is NO_VALUE else old


def _diff(state: InstanceState[Any], info: _MapperInfo) -> dict[str, tuple[Any, Any]]:
    """``(old, new)`` for every column attribute whose value this flush changed."""
    diff = {}
    values = state.dict
    for key, old in state.committed_state.items():
        if key not in info.column_set:
            continue
        new = values.get(key, UNKNOWN)
        if old is NO_VALUE:
            old = UNKNOWN
        elif new is not UNKNOWN and state.manager[key].impl.is_equal(old, new):
            continue
        diff[key] = (old, new)
    return diff


def _record_bulk(collector: Collector, execute_state: ORMExecuteState) -> None:
    """Journal a bulk ORM INSERT, UPDATE or DELETE statement that just ran."""
    mapper = execute_state.bind_mapper
    assert mapper is not None, "an ORM-enabled INSERT, UPDATE or DELETE names its entity"
    statement = execute_state.statement
    op: Op = "insert" if execute_state.is_insert else "update" if execute_state.is_update else "delete"
    rows = execute_state.parameters
    if not isinstance(rows, list) or not rows:
        collector._journal.append(_Write(op, None, mapper.class_, None, {}, statement))
        return
    primary_key = _info(mapper).primary_key
    for row in rows:
        identity = tuple(row[key] for key in primary_key) if all(key in row for key in primary_key) else None
        if op == "insert":
            data: dict[str, Any] = dict(row)
        else:
            data = {key: (UNKNOWN, value) for key, value in row.items() if key not in primary_key}
        collector._journal.append(_Write(op, None, mapper.class_, identity, data, statement))


def _net(journal: list[_Write], info: Mapping[str, Any] = _NO_INFO) -> Changes:
    """Fold the journal into one change per object: what the transaction wrote, net."""
    netted: list[_Write | None] = []
    # Where each object's net write is in ``netted``, while it can still be combined.
    open_entry: dict[InstanceState[Any], int] = {}
    for write in journal:
        state = write.state
        index = open_entry.get(state) if state is not None else None
        previous = netted[index] if index is not None else None
        if index is None or previous is None or previous.op == "delete":
            # A first write, or a re-insert after the object was deleted and made transient.
            if state is not None:
                open_entry[state] = len(netted)
            netted.append(write)
        else:
            netted[index] = _combine(previous, write)
    changes: dict[Op, list[Change]] = {"insert": [], "update": [], "delete": []}
    for net in netted:
        if net is not None:
            changes[net.op].append(_change(net))
    return Changes(tuple(changes["insert"]), tuple(changes["update"]), tuple(changes["delete"]), info)


def _combine(first: _Write, then: _Write) -> _Write | None:
    """The net effect of two writes to one object within one transaction."""
    if first.op == "insert":
        if then.op == "delete":
            return None
        values = {**first.data, **{key: new for key, (_, new) in then.data.items()}}
        return _Write("insert", first.state, first.entity, first.identity, values)
    if then.op == "update":
        diff = {key: (first.data[key][0] if key in first.data else old, new) for key, (old, new) in then.data.items()}
        return _Write("update", first.state, first.entity, first.identity, {**first.data, **diff})
    # update, then delete: the row's old values are those from before the update.
    old = {**then.data, **{key: old for key, (old, _) in first.data.items()}}
    return _Write("delete", first.state, first.entity, then.identity, old)


def _change(write: _Write) -> Change:
    identity = write.identity
    if write.op == "update":
        diff = write.data
    elif write.op == "insert":
        values = write.data
        if write.state is not None:
            # A flushed insert journaled a copy of the object's whole ``__dict__``.
            info = _info(write.state.mapper)
            values = {key: values[key] for key in info.columns if key in values}
            identity = tuple([values.get(key) for key in info.primary_key])
        diff = {key: (None, value) for key, value in values.items()}
    else:
        diff = {key: (value, None) for key, value in write.data.items()}
    return Change(write.obj, write.entity, identity, write.op, diff, write.statement)


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
        _record_flush(collector, flush_context)


@event.listens_for(_TrackedSession, "do_orm_execute")
def _bulk_statement(execute_state: ORMExecuteState) -> Any:
    if not execute_state.is_orm_statement or not execute_state.statement.is_dml:
        return None
    collector = _recorder(execute_state.session)
    if collector is None:
        return None
    # Run the statement now, so it is journaled only if it succeeded.
    result = execute_state.invoke_statement()
    _record_bulk(collector, execute_state)
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
