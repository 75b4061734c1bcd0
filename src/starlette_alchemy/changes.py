"""What a scope's transaction wrote: ``Change`` and ``Changes``, and how a journal of writes becomes them.

A flush or a bulk statement appends ``_Write`` entries to the scope's journal
(``record_flush()``, ``record_bulk()``); ``net()`` folds the journal into one
``Change`` per row when ``changes()`` is read or a hook needs it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy.orm import NO_VALUE, Mapper, ORMExecuteState
from sqlalchemy.orm.state import InstanceState

from .observe import ScopeStats

if TYPE_CHECKING:
    from sqlalchemy.orm.unitofwork import UOWTransaction
    from sqlalchemy.sql.base import Executable
    from sqlalchemy.sql.elements import ColumnElement

__all__ = ["UNKNOWN", "Change", "Changes"]

Op = Literal["insert", "update", "delete"]


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
    ``stats`` is what the scope's statements had cost by then (``db.stats``).
    """

    inserted: tuple[Change, ...] = ()
    updated: tuple[Change, ...] = ()
    deleted: tuple[Change, ...] = ()
    info: Mapping[str, Any] = field(default_factory=lambda: _NO_INFO, compare=False)
    stats: ScopeStats = field(default_factory=ScopeStats, compare=False)

    def __iter__(self) -> Iterator[Change]:
        yield from self.inserted
        yield from self.updated
        yield from self.deleted

    def __len__(self) -> int:
        return len(self.inserted) + len(self.updated) + len(self.deleted)

    def __bool__(self) -> bool:
        return bool(self.inserted or self.updated or self.deleted)


_NO_CHANGES = Changes()


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


def record_flush(journal: list[_Write], flush_context: UOWTransaction) -> None:
    """Journal the rows a flush just wrote, while their history is still intact."""
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


def record_bulk(journal: list[_Write], execute_state: ORMExecuteState) -> None:
    """Journal a bulk ORM INSERT, UPDATE or DELETE statement that just ran."""
    mapper = execute_state.bind_mapper
    assert mapper is not None, "an ORM-enabled INSERT, UPDATE or DELETE names its entity"
    statement = execute_state.statement
    op: Op = "insert" if execute_state.is_insert else "update" if execute_state.is_update else "delete"
    rows = execute_state.parameters
    if not isinstance(rows, list) or not rows:
        journal.append(_Write(op, None, mapper.class_, None, {}, statement))
        return
    primary_key = _info(mapper).primary_key
    for row in rows:
        identity = tuple(row[key] for key in primary_key) if all(key in row for key in primary_key) else None
        if op == "insert":
            data: dict[str, Any] = dict(row)
        else:
            data = {key: (UNKNOWN, value) for key, value in row.items() if key not in primary_key}
        journal.append(_Write(op, None, mapper.class_, identity, data, statement))


def net(journal: list[_Write], info: Mapping[str, Any] = _NO_INFO, stats: ScopeStats | None = None) -> Changes:
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
    inserted, updated, deleted = tuple(changes["insert"]), tuple(changes["update"]), tuple(changes["delete"])
    return Changes(inserted, updated, deleted, info, stats if stats is not None else ScopeStats())


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
