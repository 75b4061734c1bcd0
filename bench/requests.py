"""What the integration costs per request, next to bare Starlette and hand-written sessions.

Run ``make bench`` (``BENCH_ARGS=--quick`` for a run under a minute). Each
database is measured three ways: apps called in process by
``bench.driver.request`` (no HTTP client in the loop), sequentially and 50 at a
time; the same apps behind uvicorn processes on 127.0.0.1, driven by the load
generator of ``bench.http`` over 1 and 50 connections; and a soak. Every ratio
pairs two variants within one round of interleaved rounds and is reported as the
median over rounds. Each figure is judged against the reference that does the
same job (``targets()``): ours against the least middleware with the same
contract (``bench.contract``) where the contract itself costs something, and
a limit counts as missed only when a figure falls short of it by more than
the table's noise floor (the pass-through middleware's distance from bare).
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
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
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
from starlette.types import ASGIApp, Receive, Scope, Send

from bench import contract
from bench.driver import databases, request
from bench.http import out_of_process
from bench.models import Row, recreate
from starlette_alchemy import AsyncScopedSession, DBSessionMiddleware, ScopedSession

WORKLOADS = ("w0", "touch", "w1", "w2")


# -- the variants: one app each, with a route per workload --------------------------------


def ok() -> Response:
    return Response(b"ok", media_type="text/plain")


def bare(kind: str, url: str) -> Starlette:
    """Starlette with no database at all: the floor."""

    async def endpoint_async(request: Request) -> Response:
        return ok()

    def endpoint_sync(request: Request) -> Response:
        return ok()

    endpoint = endpoint_async if kind == "async" else endpoint_sync
    return Starlette(routes=[Route(f"/{name}", endpoint, methods=["GET", "POST"]) for name in WORKLOADS])


class PassThrough:
    """A pure ASGI middleware that only calls the app: what any middleware costs at the least."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def pass_through(kind: str, url: str) -> ASGIApp:
    """Bare Starlette behind ``PassThrough``: the floor for any middleware, ours included."""
    app = bare(kind, url)
    app.add_middleware(PassThrough)
    return app


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


def ours(kind: str, url: str, *, track: bool, commit_in_endpoint: bool = False) -> ASGIApp:
    """``DBSessionMiddleware`` and a registry; the middleware commits, unless the endpoints already did."""
    if kind == "async":
        db = AsyncScopedSession(create_async_engine(url), track_changes=track)

        async def w0(request: Request) -> Response:
            return ok()

        async def touch(request: Request) -> Response:
            db()
            return ok()

        async def w1(request: Request) -> Response:
            await db.get(Row, 1)
            if commit_in_endpoint:
                await db.commit()
            return ok()

        async def w2(request: Request) -> Response:
            db.add(Row(name="x"))
            if commit_in_endpoint:
                await db.commit()
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
            if commit_in_endpoint:
                sync_db.commit()
            return ok()

        def w2_sync(request: Request) -> Response:
            sync_db.add(Row(name="x"))
            if commit_in_endpoint:
                sync_db.commit()
            return ok()

        routes = {"w0": w0_sync, "touch": touch_sync, "w1": w1_sync, "w2": w2_sync}  # type: ignore[dict-item]
        registry = sync_db
    return Starlette(
        routes=[Route(f"/{name}", endpoint, methods=["GET", "POST"]) for name, endpoint in routes.items()],
        middleware=[Middleware(DBSessionMiddleware, db=registry)],
    )


def same_contract(kind: str, url: str) -> ASGIApp:
    """The least middleware with our contract (``bench.contract``), and endpoints that use its session."""
    if kind == "async":
        maker: Any = async_sessionmaker(create_async_engine(url), expire_on_commit=False)

        async def w0(request: Request) -> Response:
            return ok()

        async def touch(request: Request) -> Response:
            contract.session()
            return ok()

        async def w1(request: Request) -> Response:
            await contract.session().get(Row, 1)
            return ok()

        async def w2(request: Request) -> Response:
            contract.session().add(Row(name="x"))
            return ok()

        routes = {"w0": w0, "touch": touch, "w1": w1, "w2": w2}
    else:
        maker = sessionmaker(sa.create_engine(url), expire_on_commit=False)

        def w0_sync(request: Request) -> Response:
            return ok()

        def touch_sync(request: Request) -> Response:
            contract.session()
            return ok()

        def w1_sync(request: Request) -> Response:
            contract.session().get(Row, 1)
            return ok()

        def w2_sync(request: Request) -> Response:
            contract.session().add(Row(name="x"))
            return ok()

        routes = {"w0": w0_sync, "touch": touch_sync, "w1": w1_sync, "w2": w2_sync}  # type: ignore[dict-item]
    return Starlette(
        routes=[Route(f"/{name}", endpoint, methods=["GET", "POST"]) for name, endpoint in routes.items()],
        middleware=[Middleware(contract.SameContract, maker=maker)],
    )


# Every variant, by name: a function of (kind, url) that builds its app.
VARIANTS: dict[str, Callable[[str, str], ASGIApp]] = {
    "bare": bare,
    "pass": pass_through,
    "hand": hand_written,
    "same": same_contract,
    "ours-off": partial(ours, track=False),
    "ours-on": partial(ours, track=True),
    # Endpoints that commit themselves, as hand-written ones do: the middleware then has nothing to commit.
    "ours-commit": partial(ours, track=True, commit_in_endpoint=True),
}


# -- measuring ----------------------------------------------------------------------------


async def burst(app: ASGIApp, path: str, count: int, concurrency: int, body: bytes = b"") -> tuple[float, int]:
    """Serve *count* POSTs of *body* to *path* in process, *concurrency* at a time: seconds per request, failures."""
    gc.collect()
    failed = 0

    async def serve(requests: int) -> None:
        nonlocal failed
        for _ in range(requests):
            failed += not 200 <= await request(app, "POST", path, body) < 300

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(serve, count // concurrency)
    return (time.perf_counter() - started) / count, failed


async def timed(app: ASGIApp, path: str, count: int, concurrency: int, body: bytes = b"") -> float:
    """Seconds per request of a ``burst()`` in which every request succeeded."""
    seconds, failed = await burst(app, path, count, concurrency, body)
    if failed:
        raise RuntimeError(f"{failed} of {count} requests to {path} failed, so the timing means nothing; see the log.")
    return seconds


def run_in_turns_command(doc: str, main: Callable[..., Any], *, rounds: int, count: int) -> None:
    """The command line of a benchmark built on ``in_turns()``: run ``main(rounds=, count=, only=)``, exit with it."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few rounds of a few requests: a smoke run")
    parser.add_argument("--only", default="", help="only the databases whose label contains this, e.g. 'psycopg'")
    parser.add_argument("--rounds", type=int, default=rounds, help=f"rounds per database (default {rounds})")
    parser.add_argument("--count", type=int, default=count, help=f"requests per variant and round (default {count:,})")
    args = parser.parse_args()
    rounds, count = (2, 50) if args.quick else (args.rounds, args.count)
    sys.exit(asyncio.run(main(rounds=rounds, count=count, only=args.only)))


Build = Callable[[list[Any]], dict[str, ASGIApp]]
Times = dict[str, dict[str, list[float]]]  # workload -> variant -> seconds per request, one per round
SLICE = 25  # requests a variant serves before the next one's turn


def on_shared_pool(engines: list[Any]) -> dict[str, Any]:
    """``create_engine`` options that put a new engine on the pool of the first in *engines* (none if empty).

    Variants on one pool run on the same connections, the same server
    process, while each engine keeps its own dialect and so its own events.
    """
    if not engines:
        return {}
    first = engines[0]
    return {"pool": first.pool if isinstance(first, sa.Engine) else first.sync_engine.pool}


async def in_turns(build: Build, workloads: list[str], rounds: int, count: int, body: bytes = b"") -> Times:
    """Time every variant of *build* on each workload, in rounds of apps built afresh, in slices that take turns.

    Fresh apps (engines, registries, one pool shared by all, see
    ``on_shared_pool()``) each round: two instances of one app differ by a
    few percent for reasons of their own, which would otherwise stay with one
    variant for the whole run. Within a round, the variants take turns every
    ``SLICE`` requests, in an order that turns each time, so what drifts
    meanwhile (the machine, the SQLite file, the server) falls on all alike.
    Every request is a POST of *body* (empty by default).
    """
    times: Times = {workload: {} for workload in workloads}
    slices = max(count // SLICE, 1)
    for _ in range(rounds):
        engines: list[Any] = []
        apps = build(engines)
        names = list(apps)
        for workload, by_name in times.items():
            path = f"/{workload}"
            for name in names:
                await timed(apps[name], path, max(count // 5, 10), 1, body)  # warm up: pool, caches
            spent = dict.fromkeys(names, 0.0)
            for turn in range(slices):
                turned = names[turn % len(names) :] + names[: turn % len(names)]
                for name in turned if turn % 2 == 0 else reversed(turned):
                    spent[name] += await timed(apps[name], path, SLICE, 1, body)
            for name in names:
                by_name.setdefault(name, []).append(spent[name] / slices)
        result = engines[0].dispose()  # the pool they share
        if result is not None:
            await result
    return times


Figure = tuple[str, float, bool]  # label, value, met


@dataclass
class Target:
    """A ratio (or a difference) between two variants that must stay within a limit."""

    label: str
    workload: str
    candidate: str
    baseline: str
    limit: float | None  # None: a reference figure, reported but not judged
    kind: str = "throughput"  # "throughput": baseline time / candidate time >= limit; "slower": <= limit; "added-us"

    def value(self, times: dict[str, list[float]]) -> float:
        """The median over rounds of this round's comparison, from seconds per request."""
        pairs = zip(times[self.baseline], times[self.candidate], strict=True)
        if self.kind == "throughput":
            return statistics.median(b / c for b, c in pairs)
        if self.kind == "slower":
            return statistics.median(c / b for b, c in pairs)
        return statistics.median((c - b) * 1e6 for b, c in pairs)

    def met(self, value: float, noise: float = 0.0) -> bool:
        """True if *value* is within the limit, or misses it by no more than *noise* (a ratio's own noise floor)."""
        if self.limit is None:
            return True
        if self.kind == "throughput":
            return value >= self.limit - noise
        return value <= self.limit + (noise if self.kind == "slower" else 0.0)

    def judge(self, times: dict[str, list[float]], noise: float = 0.0) -> Figure:
        value = self.value(times)
        return self.label, value, self.met(value, noise)


# The reference whose distance from 1.0 is each table's noise floor: two apps doing the same work.
NOISE = Target("w0: pass-through middleware / bare (reference: the noise floor)", "w0", "pass", "bare", None)


def targets(kind: str, uvicorn: bool) -> list[Target]:
    """The figures of one table, each judged against the reference that does the same job.

    A request that never uses the database is judged in process against the
    least middleware with our contract (``bench.contract``), and through
    uvicorn against bare Starlette. With a sync registry, a COMMIT at the
    status line costs a worker-thread hop that an endpoint committing in its
    own thread does not: ours is judged against the same-contract middleware
    there, and ours with the endpoint committing (the documented fast path)
    against hand-written endpoints.
    """
    w0 = (
        Target("w0: ours (tracking on) / bare Starlette, throughput", "w0", "ours-on", "bare", 0.97)
        if uvicorn
        else Target("w0: ours (tracking on) / same-contract middleware", "w0", "ours-on", "same", 0.95)
    )
    rows = [
        NOISE,
        Target("w0: same-contract middleware / bare (reference)", "w0", "same", "bare", None),
        w0,
        Target("touch: microseconds added over hand-written", "touch", "ours-on", "hand", 15.0, "added-us"),
    ]
    for workload in ("w1", "w2"):
        if kind == "sync":
            rows += [
                Target(f"{workload}: ours / same-contract middleware", workload, "ours-on", "same", 0.95),
                Target(f"{workload}: ours, endpoint commits / hand-written", workload, "ours-commit", "hand", 0.95),
                Target(f"{workload}: ours / hand-written (reference)", workload, "ours-on", "hand", None),
            ]
        else:
            rows += [
                Target(f"{workload}: ours / hand-written, throughput", workload, "ours-on", "hand", 0.95),
                Target(
                    f"{workload}: same-contract middleware / hand-written (reference)", workload, "same", "hand", None
                ),
            ]
    rows.append(Target("w2: tracking on / off, time", "w2", "ours-on", "ours-off", 1.10, "slower"))
    return rows


def judge_all(rows: list[Target], times: dict[str, dict[str, list[float]]]) -> list[Figure]:
    """Each target's figure, missed only when below its limit by more than the table's noise floor."""
    noise = abs(NOISE.value(times[NOISE.workload]) - 1.0)
    return [target.judge(times[target.workload], noise) for target in rows]


async def in_process(kind: str, url: str, rounds: int, count: int, concurrency: int) -> list[Figure]:
    """Interleaved rounds over the two variants of each target, called in process; one row per target.

    Each target is a measurement of its own; the first, the noise floor, sets how far the others may miss.
    """
    apps = {name: build(kind, url) for name, build in VARIANTS.items()}
    rows, noise = [], 0.0
    for target in targets(kind, uvicorn=False):
        path = f"/{target.workload}"
        names = [target.baseline, target.candidate]
        times: dict[str, list[float]] = {name: [] for name in names}
        for name in names:
            await timed(apps[name], path, max(count // 10, concurrency), concurrency)  # warm up
        for round_ in range(rounds):
            for name in names if round_ % 2 == 0 else reversed(names):
                times[name].append(await timed(apps[name], path, count, concurrency))
        if target is NOISE:
            noise = abs(target.value(times) - 1.0)
        rows.append(target.judge(times, noise))
    return rows


async def through_uvicorn(
    kind: str, url: str, rounds: int, count: int, connections: int, deadline: float
) -> tuple[list[Figure], dict[str, dict[str, list[float]]]]:
    """Interleaved rounds over every variant, each served by its own uvicorn; target rows and the raw times."""
    times = await out_of_process(
        kind, url, rounds, count, connections, variants=VARIANTS, workloads=WORKLOADS, deadline=deadline
    )
    return judge_all(targets(kind, uvicorn=True), times), times


async def soak(kind: str, url: str, count: int) -> list[Figure]:
    """*count* w2 requests through ours, 50 at a time: RSS growth, live sessions and checked-out connections after."""
    app = ours(kind, url, track=True)
    await timed(app, "/w2", 500, 1)  # warm up: pools, caches, lazy imports
    gc.collect()
    before = _rss_mb()
    # Failures count too: what a failed COMMIT leaves behind must be released as well.
    _, failed = await burst(app, "/w2", count, 50)
    gc.collect()
    growth = _rss_mb() - before
    sessions = sum(1 for obj in gc.get_objects() if isinstance(obj, Session))
    registry = app.user_middleware[0].kwargs["db"]  # type: ignore[attr-defined]
    bind = registry.session_factory.kw["bind"]
    pool = (bind.sync_engine if hasattr(bind, "sync_engine") else bind).pool
    return [
        ("soak: failed requests (reference)", failed, True),
        (f"soak: RSS growth after {count:,} requests (MB)", growth, growth < 5),
        ("soak: live Session objects", sessions, sessions == 0),
        ("soak: connections checked out", pool.checkedout(), pool.checkedout() == 0),
    ]


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def report(title: str, rows: list[Figure], kind: str) -> int:
    """Print one row per target, with its limit; return how many missed (beyond the table's noise floor)."""
    limits = {
        t.label: (">= " if t.kind == "throughput" else "<= ") + str(t.limit) for t in _every_target(kind) if t.limit
    }
    print(f"\n{title}")
    for label, value, met in rows:
        print(f"  {label:<62} {value:>9.3f}  {limits.get(label, ''):>8}  {'ok' if met else 'MISSED'}")
    return sum(not met for _, _, met in rows)


def _every_target(kind: str) -> list[Target]:
    return targets(kind, uvicorn=False) + targets(kind, uvicorn=True)


def report_times(times: dict[str, dict[str, list[float]]]) -> None:
    """Print the median microseconds per request of every variant on every workload, for scale."""
    variants = list(next(iter(times.values())))
    print(f"  {'median us/request':<20}" + "".join(f"{name:>10}" for name in variants))
    for workload, by_variant in times.items():
        print(f"  {workload:<20}" + "".join(f"{statistics.median(by_variant[n]) * 1e6:>10.1f}" for n in variants))


@dataclass
class Plan:
    """How much of each kind of measurement one run makes."""

    rounds: int
    count: int  # requests per round and variant, in process
    http_rounds: int
    http_count: int  # requests per load through uvicorn, unless the deadline comes first
    http_deadline: float  # seconds per load through uvicorn
    soak: int


QUICK = Plan(rounds=2, count=60, http_rounds=2, http_count=60, http_deadline=0.05, soak=500)
FULL = Plan(rounds=10, count=1_000, http_rounds=8, http_count=1_000, http_deadline=0.5, soak=10_000)


async def main(plan: Plan) -> int:
    missed = 0
    started = time.monotonic()
    # What is imported stays: each gc.collect() before a timed run then scans only what the run allocated.
    gc.freeze()
    with tempfile.TemporaryDirectory() as directory:
        for label, kind, url in databases(Path(directory)):
            recreate(url)
            for concurrency in (1, 50):
                rows = await in_process(kind, url, plan.rounds, plan.count, concurrency)
                mode = "sequential" if concurrency == 1 else f"{concurrency} concurrent"
                missed += report(
                    f"{label}, in process, {mode} ({plan.rounds} rounds x {plan.count} requests)", rows, kind
                )
            for connections in (1, 50):
                rows, times = await through_uvicorn(
                    kind, url, plan.http_rounds, plan.http_count, connections, plan.http_deadline
                )
                mode = "sequential" if connections == 1 else f"{connections} connections"
                loads = f"{plan.http_rounds} rounds x {plan.http_count} requests or {plan.http_deadline} s"
                missed += report(f"{label}, through uvicorn, {mode} ({loads})", rows, kind)
                report_times(times)
            missed += report(f"{label}, soak", await soak(kind, url, plan.soak), kind)
    print(f"\n{time.monotonic() - started:.0f} s; {'all targets met' if not missed else f'{missed} MISSED'}")
    return 1 if missed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and requests: under a minute")
    sys.exit(asyncio.run(main(QUICK if parser.parse_args().quick else FULL)))
