"""What per-route transaction policy costs, as ratios measured in the same run.

Run ``make bench-policy`` (``BENCH_ARGS=--quick`` for a smoke run), from a git
checkout. Two targets, each the median over rounds of ``in_turns()``, in process:

- a route with no ``@transaction`` costs what it did before policies existed:
  today's package against the package as it was at ``BASELINE``, which is
  loaded from git as a package of its own in this same process (throughput
  ratio at least 0.99); today's registries have ``stats=False``, since query
  statistics came later and ``make bench-observe`` measures them;
- on PostgreSQL, a ``read_only`` route against the same route without it
  (throughput ratio at least 0.95): ``READ ONLY`` rides in the ``BEGIN``.
"""

from __future__ import annotations

import gc
import importlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

import starlette_alchemy
from bench.driver import databases
from bench.models import Row, recreate
from bench.requests import Build, Figure, Target, in_turns, ok, on_shared_pool, run_in_turns_command

# The last commit before per-route policies: what a route without one must still cost.
BASELINE = "293b65470a672f1b892c5638f8137c20aef525d8"
ROOT = Path(__file__).parent.parent


def load_baseline(directory: Path) -> ModuleType:
    """Import the package as it was at ``BASELINE``, under the name ``starlette_alchemy_baseline``."""
    package = directory / "starlette_alchemy_baseline"
    package.mkdir()
    listing = _git("ls-tree", "--name-only", f"{BASELINE}:src/starlette_alchemy")
    for name in listing.split():
        if name.endswith(".py"):
            (package / name).write_text(_git("show", f"{BASELINE}:src/starlette_alchemy/{name}"))
    sys.path.insert(0, str(directory))
    return importlib.import_module("starlette_alchemy_baseline")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        message = f"This benchmark reads its baseline from git ({BASELINE[:12]}): run it in a clone. {exc}"
        raise SystemExit(message) from exc


def app(
    package: Any,
    kind: str,
    url: str,
    engines: list[Any],
    *,
    read_only: bool = False,
    json_body: bool = False,
    middleware: dict[str, Any] | None = None,
    **options: Any,
) -> ASGIApp:
    """w1 reads a row by primary key, w2 inserts one, on *package*'s middleware and registry (given *options*).

    ``read_only`` marks w1; ``json_body`` makes w2 an ``async def`` that names its row from the request's JSON
    body; *middleware* holds the middleware's options. Its engine goes in *engines*, on the pool of the first
    one there (``on_shared_pool()``).
    """
    if kind == "async":
        async_engine = create_async_engine(url, **on_shared_pool(engines))
        engines.append(async_engine)
        db = package.AsyncScopedSession(async_engine, **options)

        async def w1(request: Request) -> Response:
            await db.get(Row, 1)
            return ok()

        async def w2(request: Request) -> Response:
            db.add(Row(name="x"))
            return ok()

        routes: dict[str, Any] = {"w1": w1, "w2": w2}
    else:
        engine = sa.create_engine(url, **on_shared_pool(engines))
        engines.append(engine)
        db = package.ScopedSession(engine, **options)

        def w1_sync(request: Request) -> Response:
            db.get(Row, 1)
            return ok()

        def w2_sync(request: Request) -> Response:
            db.add(Row(name="x"))
            return ok()

        routes = {"w1": w1_sync, "w2": w2_sync}
    if read_only:
        starlette_alchemy.transaction(read_only=True)(routes["w1"])
    if json_body:
        # Only an async endpoint reads a body; a sync registry's session may add there: adding does no I/O.
        async def w2_json(request: Request) -> Response:
            db.add(Row(name=(await request.json())["name"]))
            return ok()

        routes["w2"] = w2_json
    return Starlette(
        routes=[Route(f"/{name}", endpoint, methods=["GET", "POST"]) for name, endpoint in routes.items()],
        middleware=[Middleware(package.DBSessionMiddleware, db=db, **(middleware or {}))],
    )


TARGETS = [
    Target("w1: today / today, another instance (A/A: the noise floor)", "w1", "today-again", "today", None),
    Target("w1 (a read), no @transaction: today / before policies", "w1", "today", "before", 0.99),
    Target("w2: today / today, another instance (A/A: the noise floor)", "w2", "today-again", "today", None),
    Target("w2 (a write), no @transaction: today / before policies", "w2", "today", "before", 0.99),
]
POSTGRESQL_TARGETS = [Target("w1 (a read): read_only / not, throughput", "w1", "read-only", "today", 0.95)]


async def measure(build: Build, targets: list[Target], rounds: int, count: int) -> list[Figure]:
    times = await in_turns(build, ["w1", "w2"], rounds, count)
    return [target.judge(times[target.workload]) for target in targets]


def report(title: str, rows: list[Figure], targets: list[Target]) -> int:
    limits = {target.label: f">= {target.limit}" for target in targets}
    print(f"\n{title}")
    for label, value, met in rows:
        print(f"  {label:<58} {value:>9.3f}  {limits[label]:>8}  {'ok' if met else 'MISSED'}")
    return sum(not met for _, _, met in rows)


async def main(rounds: int, count: int, only: str) -> int:
    started, missed = time.monotonic(), 0
    with tempfile.TemporaryDirectory() as directory:
        before = load_baseline(Path(directory))
        gc.freeze()
        for label, kind, url in databases(Path(directory), only):
            recreate(url)
            postgresql = url.startswith("postgresql")

            def build(engines: list[Any], kind: str = kind, url: str = url) -> dict[str, ASGIApp]:
                apps = {
                    "before": app(before, kind, url, engines),
                    # Query statistics came after the baseline, and have a benchmark of their own (bench/observe.py).
                    "today": app(starlette_alchemy, kind, url, engines, stats=False),
                    "today-again": app(starlette_alchemy, kind, url, engines, stats=False),
                }
                if url.startswith("postgresql"):
                    apps["read-only"] = app(starlette_alchemy, kind, url, engines, read_only=True, stats=False)
                return apps

            targets = TARGETS + (POSTGRESQL_TARGETS if postgresql else [])
            rows = await measure(build, targets, rounds, count)
            missed += report(f"{label}, in process, sequential ({rounds} rounds x {count} requests)", rows, targets)
    print(f"\n{time.monotonic() - started:.0f} s; {'all targets met' if not missed else f'{missed} MISSED'}")
    return 1 if missed else 0


if __name__ == "__main__":
    run_in_turns_command(__doc__, main, rounds=30, count=1000)
