"""What the integration costs per request, next to bare Starlette and hand-written sessions.

Run ``make bench`` (``BENCH_ARGS=--quick`` for a run under a minute). Apps are
called in process by ``bench.driver.request``, sequentially and 50 at a time
(the run through uvicorn that the benchmark's issue also asks for is not built
yet). Every ratio pairs
two variants within one round of interleaved rounds and is reported as the
median over rounds; the targets are those of the benchmark's issue.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from bench.driver import databases, request
from bench.models import Row, recreate
from starlette_alchemy import AsyncScopedSession, DBSessionMiddleware, ScopedSession

WORKLOADS = ("w0", "touch", "w1", "w2")


# -- the variants: one app each, with a route per workload --------------------------------


def ok() -> Response:
    return Response(b"ok", media_type="text/plain")


def bare(kind: str, url: str) -> ASGIApp:
    """Starlette with no database at all: the floor."""

    async def endpoint_async(request: Request) -> Response:
        return ok()

    def endpoint_sync(request: Request) -> Response:
        return ok()

    endpoint = endpoint_async if kind == "async" else endpoint_sync
    return Starlette(routes=[Route(f"/{name}", endpoint, methods=["GET", "POST"]) for name in WORKLOADS])


def hand_written(kind: str, url: str) -> ASGIApp:
    """A session opened and closed in each endpoint: ``async with maker() as s`` (or ``with``)."""
    if kind == "async":
        maker = async_sessionmaker(create_async_engine(url), expire_on_commit=False)

        async def w0(request: Request) -> Response:
            return ok()

        async def touch(request: Request) -> Response:
            async with maker():
                return ok()

        async def w1(request: Request) -> Response:
            async with maker() as session:
                await session.get(Row, 1)
                return ok()

        async def w2(request: Request) -> Response:
            async with maker() as session:
                session.add(Row(name="x"))
                await session.commit()
                return ok()

        routes = {"w0": w0, "touch": touch, "w1": w1, "w2": w2}
    else:
        sync_maker = sessionmaker(sa.create_engine(url), expire_on_commit=False)

        def w0_sync(request: Request) -> Response:
            return ok()

        def touch_sync(request: Request) -> Response:
            with sync_maker():
                return ok()

        def w1_sync(request: Request) -> Response:
            with sync_maker() as session:
                session.get(Row, 1)
                return ok()

        def w2_sync(request: Request) -> Response:
            with sync_maker() as session:
                session.add(Row(name="x"))
                session.commit()
                return ok()

        routes = {"w0": w0_sync, "touch": touch_sync, "w1": w1_sync, "w2": w2_sync}  # type: ignore[dict-item]
    return Starlette(routes=[Route(f"/{name}", endpoint, methods=["GET", "POST"]) for name, endpoint in routes.items()])


def ours(kind: str, url: str, *, track: bool) -> ASGIApp:
    """``DBSessionMiddleware`` and a registry; the middleware commits."""
    if kind == "async":
        db = AsyncScopedSession(create_async_engine(url), track_changes=track)

        async def w0(request: Request) -> Response:
            return ok()

        async def touch(request: Request) -> Response:
            db()
            return ok()

        async def w1(request: Request) -> Response:
            await db.get(Row, 1)
            return ok()

        async def w2(request: Request) -> Response:
            db.add(Row(name="x"))
            return ok()

        routes = {"w0": w0, "touch": touch, "w1": w1, "w2": w2}
        registry: Any = db
    else:
        sync_db = ScopedSession(sa.create_engine(url), track_changes=track)

        def w0_sync(request: Request) -> Response:
            return ok()

        def touch_sync(request: Request) -> Response:
            sync_db()
            return ok()

        def w1_sync(request: Request) -> Response:
            sync_db.get(Row, 1)
            return ok()

        def w2_sync(request: Request) -> Response:
            sync_db.add(Row(name="x"))
            return ok()

        routes = {"w0": w0_sync, "touch": touch_sync, "w1": w1_sync, "w2": w2_sync}  # type: ignore[dict-item]
        registry = sync_db
    return Starlette(
        routes=[Route(f"/{name}", endpoint, methods=["GET", "POST"]) for name, endpoint in routes.items()],
        middleware=[Middleware(DBSessionMiddleware, db=registry)],
    )


def variants(kind: str, url: str) -> dict[str, ASGIApp]:
    return {
        "bare": bare(kind, url),
        "hand": hand_written(kind, url),
        "ours-off": ours(kind, url, track=False),
        "ours-on": ours(kind, url, track=True),
    }


# -- measuring ----------------------------------------------------------------------------


async def burst(app: ASGIApp, path: str, count: int, concurrency: int) -> float:
    """Seconds to serve *count* requests to *path*, *concurrency* at a time."""
    gc.collect()
    started = time.perf_counter()
    if concurrency == 1:
        for _ in range(count):
            await request(app, "POST", path)
    else:
        per_worker = count // concurrency

        async def worker() -> None:
            for _ in range(per_worker):
                await request(app, "POST", path)

        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)
    return time.perf_counter() - started


@dataclass
class Target:
    """A ratio (or a difference) between two variants that must stay within a limit."""

    label: str
    workload: str
    candidate: str
    baseline: str
    limit: float
    kind: str = "throughput"  # "throughput": baseline time / candidate time >= limit; "slower": <= limit; "added-us"

    def value(self, times: dict[str, list[float]], count: int) -> float:
        pairs = zip(times[self.baseline], times[self.candidate], strict=True)
        if self.kind == "throughput":
            return statistics.median(b / c for b, c in pairs)
        if self.kind == "slower":
            return statistics.median(c / b for b, c in pairs)
        return statistics.median((c - b) / count * 1e6 for b, c in pairs)

    def met(self, value: float) -> bool:
        return value >= self.limit if self.kind == "throughput" else value <= self.limit


TARGETS = [
    Target("w0: ours (tracking on) / bare Starlette, throughput", "w0", "ours-on", "bare", 0.97),
    Target("touch: microseconds added over hand-written", "touch", "ours-on", "hand", 15.0, "added-us"),
    Target("w1: ours / hand-written, throughput", "w1", "ours-on", "hand", 0.95),
    Target("w2: ours / hand-written, throughput", "w2", "ours-on", "hand", 0.95),
    Target("w2: tracking on / off, time", "w2", "ours-on", "ours-off", 1.10, "slower"),
]


async def in_process(kind: str, url: str, rounds: int, count: int, concurrency: int) -> list[tuple[str, float, bool]]:
    """Interleaved rounds over every variant a target needs; one row per target."""
    apps = variants(kind, url)
    results = []
    for target in TARGETS:
        path = f"/{target.workload}"
        names = [target.baseline, target.candidate]
        times: dict[str, list[float]] = {name: [] for name in names}
        for name in names:
            await burst(apps[name], path, max(count // 10, concurrency), concurrency)  # warm up
        for round_ in range(rounds):
            for name in names if round_ % 2 == 0 else reversed(names):
                times[name].append(await burst(apps[name], path, count, concurrency))
        value = target.value(times, count)
        results.append((target.label, value, target.met(value)))
    return results


async def soak(kind: str, url: str, count: int) -> list[tuple[str, float, bool]]:
    """*count* w2 requests through ours: RSS growth, live sessions and checked-out connections after."""
    app = ours(kind, url, track=True)
    await burst(app, "/w2", 500, 1)  # warm up: pools, caches, lazy imports
    gc.collect()
    before = _rss_mb()
    await burst(app, "/w2", count, 50)
    gc.collect()
    growth = _rss_mb() - before
    sessions = sum(1 for obj in gc.get_objects() if isinstance(obj, Session))
    registry = app.user_middleware[0].kwargs["db"]  # type: ignore[attr-defined]
    bind = registry.session_factory.kw["bind"]
    pool = (bind.sync_engine if hasattr(bind, "sync_engine") else bind).pool
    return [
        (f"soak: RSS growth after {count:,} requests (MB)", growth, growth < 5),
        ("soak: live Session objects", sessions, sessions == 0),
        ("soak: connections checked out", pool.checkedout(), pool.checkedout() == 0),
    ]


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def report(title: str, rows: list[tuple[str, float, bool]], limits: dict[str, str]) -> int:
    print(f"\n{title}")
    missed = 0
    for label, value, met in rows:
        missed += not met
        print(f"  {label:<58} {value:>9.3f}  {limits.get(label, ''):>8}  {'ok' if met else 'MISSED'}")
    return missed


async def main(quick: bool) -> int:
    rounds, count, soak_count = (4, 200, 2_000) if quick else (10, 1_000, 10_000)
    limits = {t.label: (">= " if t.kind == "throughput" else "<= ") + str(t.limit) for t in TARGETS}
    missed = 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as directory:
        for label, kind, url in databases(Path(directory)):
            recreate(url)
            for concurrency in (1, 50):
                rows = await in_process(kind, url, rounds, count, concurrency)
                mode = "sequential" if concurrency == 1 else f"{concurrency} concurrent"
                missed += report(f"{label}, in process, {mode} ({rounds} rounds x {count} requests)", rows, limits)
            missed += report(f"{label}, soak", await soak(kind, url, soak_count), {})
    print(f"\n{time.monotonic() - started:.0f} s; {'all targets met' if not missed else f'{missed} MISSED'}")
    return 1 if missed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and requests: under a minute")
    sys.exit(asyncio.run(main(parser.parse_args().quick)))
