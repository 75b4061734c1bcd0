"""One request's scopes, one per registry: opened, committed or rolled back at the status line, ended.

``DBSessionMiddleware`` decides *when*; this module does the work, and makes
sure it completes: a COMMIT once sent, the closing of every session and the
after-commit work of what committed all run to their end however the request
is cancelled (see ``shield.py``), and their outcome is logged.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from contextvars import Token
from typing import Any
from weakref import WeakKeyDictionary

import anyio
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from .ending import aclose_or_discard, acommit_or_discard, close_or_discard, commit_or_discard
from .exceptions import CommitFailedError
from .lifecycle import Collector
from .registry import ScopeState, _sync
from .routing import RequestReads
from .scoped import AsyncScopedSession, ScopedSession
from .shield import run_to_completion

__all__ = ["Opened", "commit_or_roll_back", "end", "forget", "open_scopes", "run_after_commit", "seal"]

logger = logging.getLogger("starlette_alchemy")

AnyScopedSession = ScopedSession[Any] | AsyncScopedSession[Any]
# The scopes one request opened: each registry, its scope's holder, and the token that restores the previous one.
Opened = list[tuple[AnyScopedSession, ScopeState[Any], Token[Any]]]


def open_scopes(
    registries: tuple[AnyScopedSession, ...], origin: MutableMapping[str, Any], reads: RequestReads | None = None
) -> Opened:
    """Open a fresh scope on every registry, in the current context, for the request *origin*.

    *reads*: what the request's method and cookie say of its reads, when a registry has replicas.
    """
    opened: Opened = []
    for registry in registries:
        state, token = registry.registry.open(origin, None, reads)
        if isinstance(registry, ScopedSession):
            state.loop_thread = threading.get_ident()
        opened.append((registry, state, token))
    return opened


def in_use(opened: Opened) -> bool:
    """True if a scope created its session or collector: the request has something to settle."""
    for _, state, _ in opened:
        if state.session is not None or state.collector is not None:
            return True
    return False


def after_commit_ready(opened: Opened) -> bool:
    """True if a transaction that committed is waiting for its after-commit hooks and callbacks."""
    for _, state, _ in opened:
        if state.collector is not None and state.collector._has_ready:
            return True
    return False


def seal(opened: Opened) -> None:
    """The response started: from now on the scopes' sessions may read but not write."""
    for _, state, _ in opened:
        state.sealed = True


# -- the status line: COMMIT or ROLLBACK ----------------------------------------------------


async def commit_or_roll_back(opened: Opened, *, status: int, commit: bool, manual: bool = False) -> None:
    """Commit (or roll back) every scope's transaction, then seal the sessions.

    A COMMIT, once begun, completes even if the request is cancelled meanwhile;
    the cancellation is then raised, after its outcome was logged. On a
    *manual* route, whose handler commits itself, what it left is rolled back.
    """
    committed: list[str] = []
    try:
        for _, state, _ in opened:
            session = state.session
            commits = commit and not state.doomed
            if session is not None and session.in_transaction():
                if commits:
                    await _refuse_if_cancelled()
                    await _commit(state, session, committed)
                    committed.append(_describe(session))
                else:
                    if manual:
                        _warn_of_uncommitted(state, session)
                    with _logging_errors(session, "ROLLBACK"):
                        await _run(session, "rollback")
                if logger.isEnabledFor(logging.DEBUG):
                    _log_outcome(state, session, _decision(state, status, commits, manual))
            if state.collector is not None:
                state.collector._settle(committed=commits)
    finally:
        seal(opened)


def _decision(state: ScopeState[Any], status: int, commits: bool, manual: bool) -> str:
    if commits:
        return f"committed (status {status})"
    if manual:
        return f"rolled back (a manual route, whose handler commits itself; status {status})"
    if state.doomed:
        return f"rolled back (db.doom() was called; status {status})"
    return f"rolled back (status {status} is not one that 'commit_on' commits)"


def _warn_of_uncommitted(state: ScopeState[Any], session: Session | AsyncSession) -> None:
    """Say that a manual route's handler left writes it never committed, which are about to be rolled back."""
    sync = _sync(session)
    if state.wrote or sync.new or sync.deleted or sync.identity_map.check_modified():
        logger.warning(
            "The handler of %s, a '@transaction(manual=True)' route, left changes on %s that it never committed; "
            "they were rolled back. Commit them in the handler ('db.commit()'), or drop 'manual=True'.",
            state.describe(),
            _describe(session),
        )


def _log_outcome(state: ScopeState[Any], session: Session | AsyncSession, outcome: str) -> None:
    logger.debug("%s on %s: %s.", state.describe(), _describe(session), outcome)


async def _refuse_if_cancelled() -> None:
    """Never begin a COMMIT for a request that is being cancelled."""
    await anyio.lowlevel.checkpoint_if_cancelled()
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    if cancelling is not None and cancelling():
        # A plain task cancellation is pending, or was swallowed by the app: either way, no COMMIT.
        raise asyncio.CancelledError("the request was cancelled before its COMMIT")


async def _commit(state: ScopeState[Any], session: Session | AsyncSession, committed: list[str]) -> None:
    """COMMIT, or raise ``CommitFailedError`` naming the databases that already committed."""

    def report(task: asyncio.Task[None]) -> None:
        outcome = "it failed" if task.exception() is not None else "it committed"
        logger.warning(
            "The request %s was cancelled while its COMMIT on %s was in flight. The COMMIT was completed and %s; "
            "the client was not told (it gets what the cancelling code answers, such as a 504).",
            _request(state),
            _describe(session),
            outcome,
            exc_info=task.exception(),
        )

    try:
        if isinstance(session, AsyncSession):
            await run_to_completion(acommit_or_discard(session), on_cancelled=report)
        else:
            await run_to_completion(_in_thread(commit_or_discard, session), on_cancelled=report)
    except Exception as exc:
        where = _describe(session)
        already = f" after {', '.join(committed)} had already committed" if committed else ""
        message = f"COMMIT failed on {where}{already}; the handler's response was not sent."
        raise CommitFailedError(message, tuple(committed)) from exc


@contextmanager
def _logging_errors(session: Session | AsyncSession, doing: str) -> Iterator[None]:
    """Log an ``Exception`` raised in the block instead of raising it: it must not mask the outcome being reported."""
    try:
        yield
    except Exception:
        logger.exception("%s on %s failed.", doing, _describe(session))


# -- after the response: after-commit work, and the end of the scopes --------------------------


async def run_after_commit(opened: Opened) -> None:
    """Run the after-commit work of the transactions that committed, to its end, outside the request's scopes."""
    await run_to_completion(_after_commit([(registry, state.collector) for registry, state, _ in opened], opened))


async def end(opened: Opened, *, error: BaseException | None = None) -> None:
    """End the request's scopes: close every session, run what after-commit work is left, restore the contextvars.

    The closing and the work complete even if the request is cancelled
    meanwhile. That cancellation is re-raised afterwards, unless *error*, the
    exception the request ended with, is on its way out already.
    """
    try:
        work: list[_Ending] = []
        for registry, state, _ in opened:
            sealed = state.sealed
            session, collector = state.end()
            if session is not None:
                if sealed:
                    _warn_of_discarded_changes(state, session)
                if not session.in_transaction():
                    # No transaction, so no connection: closing does no I/O, and may not be needed at all.
                    _close_without_io(_sync(session))
                    session = None
            if session is not None or (collector is not None and collector._has_ready):
                work.append((registry, state, session, collector))
        if work:
            await run_to_completion(_end_with_io(work, opened, error), reraise=error is None)
    finally:
        for registry, _, token in reversed(opened):
            registry.registry.reset(token)


def forget(opened: Opened) -> None:
    """End scopes that never created a session or collector, and restore the contextvars."""
    for registry, state, token in reversed(opened):
        state.end()
        registry.registry.reset(token)


# One scope that needs I/O to end: its session to close (a transaction is open), or after-commit work to run.
_Ending = tuple[AnyScopedSession, ScopeState[Any], Session | AsyncSession | None, Collector | None]


async def _end_with_io(work: list[_Ending], opened: Opened, error: BaseException | None) -> None:
    for _, state, session, _ in work:
        if session is not None:
            _warn_of_leftovers(state, session)
            if logger.isEnabledFor(logging.DEBUG):
                _log_outcome(state, session, _why_rolled_back(state, error))
            with _logging_errors(session, "Closing the session"):
                if isinstance(session, AsyncSession):
                    await aclose_or_discard(session)
                else:
                    await _in_thread(close_or_discard, session)
    await _after_commit([(registry, collector) for registry, _, _, collector in work], opened)


def _why_rolled_back(state: ScopeState[Any], error: BaseException | None) -> str:
    """Why a transaction still open when its scope ends is rolled back."""
    if isinstance(error, asyncio.CancelledError):
        return "rolled back (the request was cancelled)"
    if error is not None:
        return f"rolled back (the request raised {type(error).__name__})"
    if isinstance(state.origin, MutableMapping) and state.origin["type"] == "websocket":
        return "rolled back (left open when the WebSocket closed)"
    return "rolled back (left open after the response started, by reads or raw SQL: nothing commits it)"


def _warn_of_leftovers(state: ScopeState[Any], session: Session | AsyncSession) -> None:
    """Say what closing is about to discard: a transaction left open where nothing will commit it."""
    if isinstance(state.origin, MutableMapping) and state.origin["type"] == "websocket":
        logger.warning(
            "A WebSocket connection to %s closed with a transaction still open on %s; it was rolled back. "
            "Commit explicitly, or use 'db.scope()' for each message.",
            state.describe(),
            _describe(session),
        )
    elif state.raw_sql:
        logger.warning(
            "Raw SQL ran through the sealed session of %s after its response started and left a transaction "
            "open on %s; it was rolled back, so anything it wrote was discarded. Write in 'db.scope()' instead.",
            state.describe(),
            _describe(session),
        )


def _warn_of_discarded_changes(state: ScopeState[Any], session: Session | AsyncSession) -> None:
    """Say that objects changed after the response started are discarded unflushed."""
    if _sync(session).identity_map.check_modified():
        logger.warning(
            "Objects of %s were changed after its response started and never flushed; the changes were "
            "discarded. Make them in 'db.scope()' instead.",
            state.describe(),
        )


def _close_without_io(session: Session) -> None:
    """Close a session that has no transaction, so no connection: that does no I/O, and may do nothing."""
    # One that holds no object either (a request that only called ``db()``) has
    # nothing to release: closing it would cost as much again as creating it.
    if len(session.identity_map) or session.new:
        session.close()


async def _after_commit(collectors: list[tuple[AnyScopedSession, Collector | None]], opened: Opened) -> None:
    """Run the after-commit hooks and ``on_commit`` callbacks of the transactions that committed.

    Runs in a task of its own (``run_to_completion``), where the request's
    scopes are left first: the hooks see the scopes that enclosed the request.
    """
    for registry, _, token in opened:
        registry.registry._var.set(None if token.old_value is Token.MISSING else token.old_value)
    for registry, collector in collectors:
        if collector is not None and collector._has_ready:
            if isinstance(registry, AsyncScopedSession):
                await collector._arun_ready()
            else:
                # Hooks that hang must not take the threads that endpoints or sessions need.
                await _in_thread(collector._run_ready, limiter=_limiter(_hook_limiters))


# -- helpers ------------------------------------------------------------------------------


def _request(state: ScopeState[Any]) -> str:
    """Name the request a scope belongs to, by method and path, for log messages."""
    origin = state.origin
    if not isinstance(origin, MutableMapping):
        return state.describe()
    return f"'{origin.get('method', 'WEBSOCKET')} {origin.get('path', '')}'"


async def _run(session: Session | AsyncSession, method: str) -> None:
    """Call a session method that takes no argument; a sync session's call goes to a worker thread."""
    if isinstance(session, AsyncSession):
        await getattr(session, method)()
    else:
        await _in_thread(getattr(session, method))


async def _in_thread(function: Callable[..., None], *args: Any, limiter: anyio.CapacityLimiter | None = None) -> None:
    """Run blocking session work in a worker thread, by default under the package's own limiter."""
    # An idle worker thread keeps its last job's arguments: hand it a box it
    # empties, so it does not keep a session (and its objects) alive.
    await anyio.to_thread.run_sync(_call_unboxed, [function, args], limiter=limiter or _limiter(_session_limiters))


def _call_unboxed(box: list[Any]) -> None:
    function, args = box
    box.clear()
    function(*args)


# Limiters of our own, per event loop: sessions can always finish even when sync endpoints
# hold every default threadpool token waiting for a pooled connection, and hooks that hang
# take neither the endpoints' threads nor the sessions'.
_session_limiters: WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter] = WeakKeyDictionary()
_hook_limiters: WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter] = WeakKeyDictionary()
_THREADS = 40


def _limiter(limiters: WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter]) -> anyio.CapacityLimiter:
    loop = asyncio.get_running_loop()
    limiter = limiters.get(loop)
    if limiter is None:
        limiter = limiters[loop] = anyio.CapacityLimiter(_THREADS)
    return limiter


def _describe(session: Session | AsyncSession) -> str:
    """Name a session's database for log messages, without its password."""
    # An Engine is its own engine; a Connection (as the testing kit binds) names its engine.
    url = getattr(getattr(session.bind, "engine", None), "url", None)
    return f"'{url.render_as_string(hide_password=True)}'" if url is not None else "the session's database"
