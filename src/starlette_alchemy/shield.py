"""Work that must finish once begun, whatever cancels the task waiting for it.

A COMMIT that has been sent, and the cleanup of a request, must run to their
end so that their outcome is known: otherwise a client is told 504 for a
write that committed, a connection stays checked out, or the after-commit work
of a committed transaction is lost. ``anyio.CancelScope(shield=True)`` only
holds against anyio's own cancel scopes; a plain ``Task.cancel()``
(``asyncio.timeout``, uvicorn's graceful-shutdown timeout, ``asyncio.run``
cancelling what is left at exit) still interrupts whatever is awaited. So the
work runs in a task of its own that refuses cancellation, and the caller waits
for it however often it is cancelled meanwhile. (An anyio cancel scope keeps
re-sending its cancellation until the task leaves the scope: that costs a few
callbacks per loop iteration for the rest of the COMMIT, a shield scope about
ten microseconds on every one, so there is none.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["run_to_completion"]

_T = TypeVar("_T")


class _Uncancellable(asyncio.Task[_T]):
    """A task that refuses ``cancel()``: it runs only the package's own work, never code with timeouts of its own."""

    def cancel(self, msg: Any = None) -> bool:
        return False


async def run_to_completion(
    coro: Coroutine[Any, Any, _T],
    *,
    on_cancelled: Callable[[asyncio.Task[_T]], None] | None = None,
    reraise: bool = True,
) -> _T:
    """Run *coro* to its end in a task that cannot be cancelled; return its result or raise its error.

    If the caller is cancelled meanwhile (by a cancel scope or a plain task
    cancellation, once or many times), *coro* still finishes; then
    ``on_cancelled(task)`` is called with the finished task, whose outcome is
    known, and the cancellation is re-raised instead of the outcome, unless
    *reraise* is false (cleanup that runs while another exception
    propagates, which must not be replaced).
    """
    task = _Uncancellable(coro)
    try:
        # A cancellation of this task first tries to cancel the one it awaits: refused, it
        # waits for that task to finish, and is then delivered here, once.
        return await task
    except asyncio.CancelledError as exc:
        if not task.done() or task.cancelled():
            raise  # the work cancelled itself, or was never started: nothing more to wait for
        cancelled = exc
    if on_cancelled is not None:
        on_cancelled(task)
    if not reraise:
        return task.result()
    task.exception()  # retrieved: the cancellation is what the caller sees
    raise cancelled
