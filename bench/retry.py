"""What replaying requests costs when nothing conflicts, and what it buys when everything does.

Run ``make bench-retry`` (``BENCH_ARGS=--quick`` for a smoke run). Two figures:

- on every database, w2 (an insert, a POST whose small JSON body the endpoint
  reads) on a middleware with ``retry=Retry(...)`` and no conflicts, against
  the same app without it: throughput ratio at least 0.98, the median over
  rounds of ``in_turns()``, in process, beside the A/A row (another instance
  of the app without retry: the noise floor). With retry, every request's
  body is recorded as the app reads it; nothing else should cost;
- on PostgreSQL (asyncpg), reported, not judged: ``CLIENTS`` clients at once,
  in process, each POSTing to a ``SERIALIZABLE`` route that reads the total
  of a small table and adds 1 to the client's own row, so that concurrent
  requests conflict (write skew: each reads what the others write). For each
  variant, with and without retry, in ``RUNS`` runs that take turns, each on
  the table created afresh and stopped after ``--count`` requests per client
  or ``SECONDS``: requests answered 200 per second, the share answered 500,
  attempts per request (the endpoint's calls), and whether the table's total
  grew by exactly the requests answered 200 (a replay must not write twice).
"""

from __future__ import annotations

import gc
import json
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

import starlette_alchemy
from bench.driver import databases, request
from bench.models import Row, recreate
from bench.policy import app, report
from bench.requests import Build, Target, in_turns, run_in_turns_command
from starlette_alchemy import AsyncScopedSession, DBSessionMiddleware, Retry, is_retryable, transaction

RETRY = Retry(attempts=3, backoff=0.01, max_body=1 << 20, retry_on=is_retryable)
BODY = json.dumps({"name": "x"}).encode()  # w2's row, named by the client

TARGETS = [
    Target("w2: without retry, another instance (A/A: the noise floor)", "w2", "plain-again", "plain", None),
    Target("w2 (an insert, a JSON body): Retry, no conflict / without", "w2", "retry", "plain", 0.98),
]

CLIENTS = 20  # concurrent clients of the write-skew workload, and the rows of its table: one each
SECONDS = 2.0  # the longest a run of the write-skew workload lasts
RUNS = 2  # runs of each variant of the write-skew workload, taking turns: retry, plain, plain, retry


def build_for(kind: str, url: str) -> Build:
    def build(engines: list[Any]) -> dict[str, ASGIApp]:
        def w2_app(**middleware: Any) -> ASGIApp:
            return app(starlette_alchemy, kind, url, engines, json_body=True, middleware=middleware, stats=False)

        return {"retry": w2_app(retry=RETRY), "plain": w2_app(), "plain-again": w2_app()}

    return build


# -- the write-skew workload ------------------------------------------------------------------------


@dataclass
class Tally:
    """What the runs of one variant of the write-skew workload did, summed."""

    seconds: float = 0.0
    answered: Counter[int] = field(default_factory=Counter)  # status -> requests
    attempts: int = 0  # the endpoint's calls
    committed: int = 0  # what the table's total grew by

    @property
    def requests(self) -> int:
        return sum(self.answered.values())


def skew_app(engine: AsyncEngine, retry: Retry | None, tally: Tally) -> ASGIApp:
    """One SERIALIZABLE route: read the table's total, then add 1 to the row the JSON body names; count its calls."""
    db = AsyncScopedSession(engine, stats=False)

    @transaction(isolation_level="SERIALIZABLE")
    async def skew(request: Request) -> Response:
        tally.attempts += 1
        row = (await request.json())["row"]
        total = await db.scalar(sa.select(sa.func.sum(Row.value)))
        await db.execute(sa.update(Row).where(Row.id == row).values(value=Row.value + 1))
        return Response(str(total), media_type="text/plain")

    return Starlette(
        routes=[Route("/skew", skew, methods=["POST"])],
        middleware=[Middleware(DBSessionMiddleware, db=db, retry=retry)],
    )


async def clients(asgi: ASGIApp, count: int, seconds: float, tally: Tally) -> None:
    """``CLIENTS`` clients at once, each POSTing its row until it sent *count* requests or *seconds* passed."""
    deadline = time.perf_counter() + seconds

    async def client(number: int) -> None:
        body = json.dumps({"row": number + 1}).encode()
        for _ in range(count):
            if time.perf_counter() >= deadline:
                return
            tally.answered[await request(asgi, "POST", "/skew", body)] += 1

    gc.collect()
    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for number in range(CLIENTS):
            tg.start_soon(client, number)
    tally.seconds += time.perf_counter() - started


async def run_once(url: str, retry: Retry | None, count: int, seconds: float, tally: Tally) -> None:
    """One run of the workload on a table created afresh and an engine of its own, added to *tally*."""
    # The same rows for every run, and none of the last run's dead ones for the reads to scan.
    recreate(url, rows=CLIENTS)
    # A pool the size of the concurrency: one that opens and closes connections on demand distorts the figures.
    engine = create_async_engine(url, pool_size=CLIENTS, max_overflow=0)
    try:
        opened = [await engine.connect() for _ in range(CLIENTS)]  # connecting is not what is measured
        for connection in opened:
            await connection.close()
        await clients(skew_app(engine, retry, tally), count, seconds, tally)
        async with engine.connect() as connection:
            tally.committed += await connection.scalar(sa.select(sa.func.sum(Row.value))) or 0
    finally:
        await engine.dispose()


@contextmanager
def muted(name: str = "starlette_alchemy") -> Iterator[None]:
    """Silence *name*'s log for the block."""
    logger = logging.getLogger(name)
    before, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = before


async def write_skew(url: str, count: int) -> int:
    """Run the write-skew workload with retry and without, in turns; print its figures; 1 if a total is wrong."""
    tallies = {"without retry": Tally(), f"with {RETRY!r}": Tally()}
    retries = dict(zip(tallies, (None, RETRY), strict=True))
    # Every failed request logs (a replay, a COMMIT that failed, with its traceback): to stderr, by logging's
    # last resort, that would be timed, and bury the figures.
    with muted():
        for run in range(RUNS):
            names = list(tallies)
            for name in names if run % 2 else reversed(names):
                await run_once(url, retries[name], count, SECONDS, tallies[name])
    print(
        f"\nasync asyncpg, write skew: {CLIENTS} clients at once, SERIALIZABLE, "
        f"{RUNS} runs per variant of {count} requests per client or {SECONDS} s"
    )
    print(f"  {'':<58} {'200/s':>7} {'500s':>6} {'attempts':>9}  the table's total grew by the 200s")
    wrong = 0
    for name, tally in tallies.items():
        requests = max(tally.requests, 1)
        share = tally.answered[500] / requests
        right = tally.committed == tally.answered[200]
        wrong += not right
        others = {status: n for status, n in tally.answered.items() if status not in (200, 500)}
        print(
            f"  {name:<58} {tally.answered[200] / tally.seconds:>7.1f} {share:>6.1%} "
            f"{tally.attempts / requests:>9.2f}  {'ok' if right else 'WRONG'}: "
            f"+{tally.committed}, {tally.answered[200]} of {tally.requests} requests"
            + (f"; other statuses: {others}" if others else "")
        )
    return wrong


async def main(rounds: int, count: int, only: str) -> int:
    started, missed = time.monotonic(), 0
    with tempfile.TemporaryDirectory() as directory:
        gc.freeze()
        for label, kind, url in databases(Path(directory), only):
            recreate(url)
            times = await in_turns(build_for(kind, url), ["w2"], rounds, count, BODY)
            rows = [target.judge(times["w2"]) for target in TARGETS]
            missed += report(f"{label}, in process, sequential ({rounds} rounds x {count} requests)", rows, TARGETS)
            if url.startswith("postgresql+asyncpg"):
                missed += await write_skew(url, count)
    print(f"\n{time.monotonic() - started:.0f} s; {'all targets met' if not missed else f'{missed} MISSED'}")
    return 1 if missed else 0


if __name__ == "__main__":
    run_in_turns_command(__doc__, main, rounds=20, count=300)
