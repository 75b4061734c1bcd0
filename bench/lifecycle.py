"""What change tracking costs: a 1,000-object flush, and single-insert requests, tracking on vs off.

Run ``make bench-lifecycle`` (or ``python -m bench.lifecycle [--quick]``). Every
ratio is tracked time over untracked time, paired within a round and measured
in the same run; the median is compared with the target.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench.driver import Comparison, compare, databases, request
from bench.models import Row, recreate
from starlette_alchemy import AsyncScopedSession, DBSessionMiddleware, ScopedSession

FLUSH_TARGET = 1.15
REQUEST_TARGET = 1.10

AnyDB = ScopedSession[Any] | AsyncScopedSession[Any]


def registry(kind: str, url: str, *, track: bool) -> AnyDB:
    """A registry of *kind* ("sync" or "async") on its own engine, with tracking on or off."""
    if kind == "sync":
        return ScopedSession(sa.create_engine(url), track_changes=track)
    return AsyncScopedSession(create_async_engine(url), track_changes=track)


def flush_1000(db: AnyDB) -> Callable[[], Awaitable[None]]:
    """Add 1,000 objects and flush them in one flush; the scope then rolls back, keeping the table small."""

    async def run() -> None:
        rows = [Row(name=f"row {n}", value=n) for n in range(1000)]
        if isinstance(db, AsyncScopedSession):
            async with db.scope(commit=False):
                db.add_all(rows)
                await db.flush()
        else:
            with db.scope(commit=False):
                db.add_all(rows)
                db.flush()

    return run


def insert_requests(db: AnyDB, count: int) -> Callable[[], Awaitable[None]]:
    """*count* sequential requests through the middleware, each inserting one row and committing."""

    async def insert_async(request: Request) -> Response:
        db.add(Row(name="one", value=1))
        return Response(status_code=201)

    def insert_sync(request: Request) -> Response:
        db.add(Row(name="one", value=1))
        return Response(status_code=201)

    endpoint = insert_async if isinstance(db, AsyncScopedSession) else insert_sync
    app = Starlette(
        routes=[Route("/rows", endpoint, methods=["POST"])], middleware=[Middleware(DBSessionMiddleware, db=db)]
    )

    async def run() -> None:
        for _ in range(count):
            status = await request(app, "POST", "/rows")
            assert status == 201, status

    return run


async def dispose(db: AnyDB) -> None:
    bind = db.session_factory.kw["bind"]
    result = bind.dispose()
    if asyncio.iscoroutine(result):
        await result


async def measure(label: str, kind: str, url: str, rounds: int, requests: int) -> list[tuple[Comparison, float]]:
    off, on = registry(kind, url, track=False), registry(kind, url, track=True)
    try:
        return [
            (await compare(f"flush 1,000 objects ({label})", flush_1000(off), flush_1000(on), rounds), FLUSH_TARGET),
            (
                await compare(
                    f"{requests * rounds:,} insert requests ({label})",
                    insert_requests(off, requests),
                    insert_requests(on, requests),
                    rounds,
                ),
                REQUEST_TARGET,
            ),
        ]
    finally:
        await dispose(off)
        await dispose(on)


async def main(quick: bool) -> int:
    rounds, requests = (6, 100) if quick else (20, 100)
    results: list[tuple[Comparison, float]] = []
    with tempfile.TemporaryDirectory() as directory:
        found = databases(Path(directory))
        for _, kind, url in found:
            if kind == "sync":  # one of each database's entries
                recreate(url)
        for label, kind, url in found:
            results += await measure(label, kind, url, rounds, requests)
    print(f"{'benchmark':<44} {'off (ms)':>9} {'on (ms)':>9} {'ratio':>7} {'target':>8}")
    missed = 0
    for comparison, target in results:
        off = sorted(comparison.baseline)[len(comparison.baseline) // 2] * 1000
        on = sorted(comparison.candidate)[len(comparison.candidate) // 2] * 1000
        verdict = "ok" if comparison.ratio <= target else "MISSED"
        missed += verdict != "ok"
        print(
            f"{comparison.name:<44} {off:>9.2f} {on:>9.2f} {comparison.ratio:>7.3f} {'<= ' + str(target):>8} {verdict}"
        )
    print(f"\n{rounds} interleaved rounds; times are per round (medians); ratio = median of paired on/off ratios.")
    return 1 if missed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, for a smoke run")
    sys.exit(asyncio.run(main(parser.parse_args().quick)))
