"""Python bytecode instructions per request: today's package against the one before policies (``make bench-policy``).

Run ``python -m bench.instructions``. Unlike time on a shared machine, the
count is the same from one run to the next, so it shows a difference of 1%
that timings cannot resolve. It counts every instruction the process runs
for a request (Starlette, SQLAlchemy, the package), in process on SQLite,
where Python is nearly all of a request's cost: the ratio is the most a
change in the package's Python can cost there. Work done in C (a driver, the
database) is not counted, so on PostgreSQL the same instructions weigh less.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

import starlette_alchemy
from bench.driver import request
from bench.models import recreate
from bench.policy import app, load_baseline

REQUESTS = 50


class Tally:
    """Counts the instructions run, by everything and by the package, while a label is set."""

    def __init__(self) -> None:
        self.label: str | None = None
        self.counts: Counter[str] = Counter()

    def trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        if self.label is None:
            return None
        frame.f_trace_opcodes = True
        return self._local

    def _local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode" and self.label is not None:
            self.counts[self.label] += 1
            if "starlette_alchemy" in frame.f_code.co_filename:
                self.counts[f"{self.label} package"] += 1
        return self._local


async def count(kind: str, url: str, before: Any) -> Counter[str]:
    """Instructions per request of w1 and w2 on *package*'s app today and before, in the current threads."""
    engines: list[Any] = []
    apps = {"today": app(starlette_alchemy, kind, url, engines, stats=False), "before": app(before, kind, url, engines)}
    tally = Tally()
    # Worker threads started from now on are traced too (a sync endpoint runs in one).
    sys.settrace(tally.trace)
    threading.settrace(tally.trace)
    try:
        for workload in ("w1", "w2"):
            for name, asgi in apps.items():
                for _ in range(REQUESTS):  # warm up: the pool, SQLAlchemy's caches
                    await request(asgi, "GET", f"/{workload}")
                tally.label = f"{workload} {name}"
                for _ in range(REQUESTS):
                    await request(asgi, "GET", f"/{workload}")
                tally.label = None
    finally:
        sys.settrace(None)
        threading.settrace(None)
    return tally.counts


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        before = load_baseline(Path(directory))
        print(f"{'database':14} {'workload':8} {'today':>7} {'before':>7} {'before / today':>15}  in the package")
        for kind, url in (("sync", f"sqlite:///{directory}/s.db"), ("async", f"sqlite+aiosqlite:///{directory}/a.db")):
            recreate(url)
            counts = asyncio.run(count(kind, url, before))
            for workload in ("w1", "w2"):
                today, then = (counts[f"{workload} {name}"] / REQUESTS for name in ("today", "before"))
                package = [counts[f"{workload} {name} package"] / REQUESTS for name in ("today", "before")]
                print(
                    f"{kind + ' sqlite':14} {workload:8} {today:7.0f} {then:7.0f} {then / today:15.4f} "
                    f" {package[0]:>12.0f} / {package[1]:.0f}"
                )


if __name__ == "__main__":
    main()
