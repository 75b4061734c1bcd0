"""What read replicas cost: a GET served by a replica against the same GET on a registry without replicas.

Run ``make bench-routing`` (``BENCH_ARGS=--quick`` for a smoke run). The
"replica" is a second engine on the same database, on the pool the round's
engines share (``on_shared_pool()``): the figure is what routing itself adds,
not a second server's speed. Target: throughput ratio at least 0.97, in
process, each figure the median over rounds of ``in_turns()``. The database
calls per request (statements, COMMITs and ROLLBACKs the driver was asked
for) are counted for both: routing must add none.
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.types import ASGIApp

import starlette_alchemy
from bench.driver import databases, request
from bench.models import recreate
from bench.policy import app
from bench.requests import Build, Figure, Target, in_turns, on_shared_pool, run_in_turns_command

TARGETS = [
    Target("w1: without replicas, another instance (A/A: the noise floor)", "w1", "plain-again", "plain", None),
    Target("w1 (a GET by primary key): from a replica / without replicas", "w1", "replica", "plain", 0.97),
]


def replica_app(kind: str, url: str, engines: list[Any]) -> ASGIApp:
    """``app()`` on a registry whose one replica is another engine on the same database (and pool)."""
    options = on_shared_pool(engines)
    replica = create_async_engine(url, **options) if kind == "async" else sa.create_engine(url, **options)
    engines.append(replica)
    return app(starlette_alchemy, kind, url, engines, stats=False, replicas=[replica])


def build_for(kind: str, url: str) -> Build:
    def build(engines: list[Any]) -> dict[str, ASGIApp]:
        return {
            "replica": replica_app(kind, url, engines),
            "plain": app(starlette_alchemy, kind, url, engines, stats=False),
            "plain-again": app(starlette_alchemy, kind, url, engines, stats=False),
        }

    return build


async def calls_per_request(kind: str, url: str, variant: str, requests: int = 20) -> float:
    """How many statements, COMMITs and ROLLBACKs the driver is asked for per GET of *variant*."""
    engines: list[Any] = []
    asgi = build_for(kind, url)(engines)[variant]
    calls = 0

    def count(*args: Any) -> None:
        nonlocal calls
        calls += 1

    for engine in engines:
        sync = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        sa.event.listen(sync, "before_cursor_execute", count)
        sa.event.listen(sync, "commit", count)
        sa.event.listen(sync, "rollback", count)
    for _ in range(requests):
        assert await request(asgi, "GET", "/w1") == 200
    result = engines[0].dispose()  # the pool they share
    if result is not None:
        await result
    return calls / requests


def report(title: str, rows: list[Figure], calls: dict[str, float]) -> int:
    limits = {target.label: f">= {target.limit}" for target in TARGETS}
    print(f"\n{title}")
    for label, value, met in rows:
        print(f"  {label:<64} {value:>7.3f}  {limits[label]:>8}  {'ok' if met else 'MISSED'}")
    same = calls["replica"] == calls["plain"]
    print(
        f"  {'database calls per GET: from a replica / without replicas':<64} "
        f"{calls['replica']:>3.1f} / {calls['plain']:.1f}  {'same' if same else 'MORE'}"
    )
    return sum(not met for _, _, met in rows) + (not same)


async def main(rounds: int, count: int, only: str) -> int:
    started, missed = time.monotonic(), 0
    with tempfile.TemporaryDirectory() as directory:
        gc.freeze()
        for label, kind, url in databases(Path(directory), only):
            recreate(url)
            calls = {variant: await calls_per_request(kind, url, variant) for variant in ("replica", "plain")}
            times = await in_turns(build_for(kind, url), ["w1"], rounds, count)
            rows = [target.judge(times["w1"]) for target in TARGETS]
            missed += report(f"{label}, in process, sequential ({rounds} rounds x {count} requests)", rows, calls)
    print(f"\n{time.monotonic() - started:.0f} s; {'all targets met' if not missed else f'{missed} MISSED'}")
    return 1 if missed else 0


if __name__ == "__main__":
    run_in_turns_command(__doc__, main, rounds=20, count=300)
