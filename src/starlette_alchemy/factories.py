"""The session factories behind the registries: the package's Session class for each registry's features.

A registry's sessions are of one class made of the feature classes it needs
(sessions.py: change tracking, read replicas, statistics); a registry built
from a user's session factory gets a copy of it whose class also derives from them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from .lifecycle import _TrackedSession
from .sessions import _MeteredScopeSession, _RoutedScopeSession, _ScopeSession

__all__ = ["async_factory", "sync_factory"]

_scope_classes: dict[tuple[type[Session], type[Session]], type[Session]] = {}


def _scope_class(session_class: type[Session], base: type[Session]) -> type[Session]:
    """Return a subclass of *session_class* that also derives from *base* (cached)."""
    if issubclass(session_class, base):
        return session_class
    key = (session_class, base)
    if key not in _scope_classes:
        _scope_classes[key] = type(session_class.__name__, (base, session_class), {})
    return _scope_classes[key]


_bases: dict[tuple[bool, bool, bool], type[Session]] = {}


def _base(track_changes: bool, routed: bool, metered: bool) -> type[Session]:
    """The package's Session class for a registry with these features, made of one class per feature (cached)."""
    key = (track_changes, routed, metered)
    if key not in _bases:
        features = [(_TrackedSession, track_changes), (_RoutedScopeSession, routed), (_MeteredScopeSession, metered)]
        classes = tuple(cls for cls, wanted in features if wanted)
        if not routed and not metered:
            classes += (_ScopeSession,)
        name = "".join(cls.__name__.strip("_").replace("ScopeSession", "").replace("Session", "") for cls in classes)
        name += "ScopeSession"
        _bases[key] = type(f"_{name}", classes, {}) if len(classes) > 1 else classes[0]
    return _bases[key]


_WRONG_BIND = "{registry}() takes {accepted}; it was given {given!r} ({kind}).{hint}"


def _check_bind(registry: str, bind: object) -> None:
    """Refuse, with the fix, what a registry cannot build sessions from."""
    sync = registry == "ScopedSession"
    if isinstance(bind, Engine | sessionmaker) if sync else isinstance(bind, AsyncEngine | async_sessionmaker):
        return
    if isinstance(bind, AsyncEngine | async_sessionmaker) if sync else isinstance(bind, Engine | sessionmaker):
        hint = " Use 'AsyncScopedSession' for it." if sync else " Use 'ScopedSession' for it."
    elif isinstance(bind, str):
        factory = "create_engine" if sync else "create_async_engine"
        hint = f" Create an engine from the URL first: {registry}({factory}({bind!r}))."
    else:
        hint = ""
    accepted = "an Engine or a sessionmaker" if sync else "an AsyncEngine or an async_sessionmaker"
    raise TypeError(
        _WRONG_BIND.format(registry=registry, accepted=accepted, given=bind, kind=type(bind).__name__, hint=hint)
    )


def _check_track_changes(track_changes: object) -> None:
    if not isinstance(track_changes, bool):
        raise TypeError(
            f"'track_changes' must be True or False; got {track_changes!r} ({type(track_changes).__name__})."
        )


def sync_factory(
    bind: Engine | sessionmaker[Any], track_changes: bool, *, routed: bool = False, metered: bool = False
) -> sessionmaker[Any]:
    """A factory of the package's sessions: built for an engine, or a copy of the given one."""
    _check_bind("ScopedSession", bind)
    _check_track_changes(track_changes)
    base = _base(track_changes, routed, metered)
    if isinstance(bind, Engine):
        return sessionmaker(bind, class_=base, expire_on_commit=False)
    return sessionmaker(class_=_scope_class(bind.class_, base), **bind.kw)


def async_factory(
    bind: AsyncEngine | async_sessionmaker[Any], track_changes: bool, *, routed: bool = False, metered: bool = False
) -> async_sessionmaker[Any]:
    """An async factory whose sync sessions are the package's: built for an engine, or a copy."""
    _check_bind("AsyncScopedSession", bind)
    _check_track_changes(track_changes)
    base = _base(track_changes, routed, metered)
    if isinstance(bind, AsyncEngine):
        return async_sessionmaker(bind, expire_on_commit=False, sync_session_class=base)
    sync_class = bind.kw.get("sync_session_class", bind.class_.sync_session_class)
    sync_class = _scope_class(sync_class, base)
    return async_sessionmaker(class_=bind.class_, **{**bind.kw, "sync_session_class": sync_class})
