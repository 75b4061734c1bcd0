"""``run_to_completion``: work once begun finishes, whatever cancels the task waiting for it."""

from __future__ import annotations

import asyncio
import threading

import anyio
import pytest

from starlette_alchemy.shield import run_to_completion

pytestmark = pytest.mark.anyio


async def _work(log: list[str], seconds: float = 0.2, fail: bool = False) -> str:
    await asyncio.sleep(seconds)
    log.append("done")
    if fail:
        raise LookupError("the work failed")
    return "result"


async def test_returns_the_result_or_raises_the_error() -> None:
    log: list[str] = []
    assert await run_to_completion(_work(log, 0)) == "result"
    with pytest.raises(LookupError):
        await run_to_completion(_work(log, 0, fail=True))
    assert log == ["done", "done"]


@pytest.mark.parametrize("kind", ["asyncio", "anyio"])
async def test_a_timeout_waits_for_the_work_then_cancels(kind: str) -> None:
    log: list[str] = []
    seen: list[str] = []

    def on_cancelled(task: asyncio.Task[str]) -> None:
        seen.append(task.result())

    with pytest.raises(TimeoutError):
        if kind == "asyncio":
            async with asyncio.timeout(0.05):
                await run_to_completion(_work(log), on_cancelled=on_cancelled)
        else:
            with anyio.fail_after(0.05):
                await run_to_completion(_work(log), on_cancelled=on_cancelled)
    assert (log, seen) == (["done"], ["result"])


async def test_repeated_cancellations_of_the_caller_and_of_every_task_are_absorbed() -> None:
    # What asyncio.run() does at exit: cancel every task, the work's own included, more than once.
    log: list[str] = []
    before = asyncio.all_tasks()
    caller = asyncio.ensure_future(run_to_completion(_work(log, 0.3)))
    await asyncio.sleep(0.05)
    started = asyncio.all_tasks() - before  # the caller and the task running the work
    assert len(started) == 2
    for _ in range(3):
        for task in started:
            task.cancel()
        await asyncio.sleep(0.02)
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert log == ["done"]


async def test_without_reraise_the_cancellation_is_dropped_and_the_outcome_kept() -> None:
    log: list[str] = []
    results: list[str | None] = []

    async def cleanup() -> None:
        results.append(await run_to_completion(_work(log), reraise=False))

    caller = asyncio.ensure_future(cleanup())
    await asyncio.sleep(0.05)
    caller.cancel()
    await caller  # no CancelledError: the caller was cleaning up after another exception
    assert (log, results) == (["done"], ["result"])


async def test_a_failure_under_cancellation_is_reported_not_lost() -> None:
    log: list[str] = []
    failures: list[BaseException | None] = []
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await run_to_completion(_work(log, fail=True), on_cancelled=lambda task: failures.append(task.exception()))
    assert log == ["done"] and isinstance(failures[0], LookupError)


async def test_work_in_a_worker_thread_is_waited_for() -> None:
    finished = threading.Event()

    def blocking() -> None:
        finished.wait(0.3)
        finished.set()

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await run_to_completion(anyio.to_thread.run_sync(blocking))
    assert finished.is_set()
