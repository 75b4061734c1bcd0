"""A minimal in-process ASGI driver and an interleaved-rounds timer, shared by the benchmarks."""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from starlette.types import ASGIApp, Message


async def request(app: ASGIApp, method: str = "GET", path: str = "/", body: bytes = b"") -> int:
    """Call *app* directly with a hand-built HTTP scope; return the response status (500 if the app raised).

    A *body* is sent in one message, as JSON, with its length; without one, the request has no headers.
    """
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))] if body else [],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    status = 0

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    try:
        await app(scope, receive, send)
    except Exception:
        # What a server does: Starlette's error middleware has sent its 500 and re-raises
        # for the server to log. Raising here would cancel every concurrent request.
        return status or 500
    return status


@dataclass
class Comparison:
    """Timings of a baseline and a candidate, measured in interleaved rounds (A B A B ...)."""

    name: str
    baseline: list[float] = field(default_factory=list)
    candidate: list[float] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        """Candidate time over baseline time, paired within each round."""
        return [c / b for b, c in zip(self.baseline, self.candidate, strict=True)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)


async def compare(
    name: str, baseline: Callable[[], Awaitable[None]], candidate: Callable[[], Awaitable[None]], rounds: int
) -> Comparison:
    """Time *baseline* and *candidate* once per round, alternating which goes first."""
    result = Comparison(name)
    await baseline()  # warm up: imports, mapper configuration, pool connections
    await candidate()
    for round_ in range(rounds):
        order = [(baseline, result.baseline), (candidate, result.candidate)]
        for run, times in order if round_ % 2 == 0 else reversed(order):
            # Start each measurement with no garbage pending, so a collection lands on neither side.
            gc.collect()
            start = time.perf_counter()
            await run()
            times.append(time.perf_counter() - start)
    return result


def databases(directory: Path, only: str = "") -> list[tuple[str, str, str]]:
    """(label, kind, url) for SQLite in *directory*, and for PostgreSQL when TEST_POSTGRES_URL is set.

    *only*: just those whose label contains it (a benchmark's ``--only``).
    """
    sqlite = directory / "bench.db"
    found = [
        ("sync sqlite", "sync", f"sqlite+pysqlite:///{sqlite}"),
        ("async sqlite", "async", f"sqlite+aiosqlite:///{sqlite}"),
    ]
    postgres = os.environ.get("TEST_POSTGRES_URL")
    if postgres:
        url = sa.make_url(postgres)
        found += [
            ("sync psycopg", "sync", url.set(drivername="postgresql+psycopg").render_as_string(False)),
            ("async asyncpg", "async", url.set(drivername="postgresql+asyncpg").render_as_string(False)),
        ]
    return [database for database in found if only in database[0]]
