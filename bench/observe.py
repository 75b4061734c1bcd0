"""What query statistics and the OpenTelemetry span cost, as ratios measured in the same run.

Run ``make bench-observe`` (``BENCH_ARGS=--quick`` for a smoke run). For each
database, the same app is timed, in process, in interleaved rounds, built
afresh for each round, as:

- ``off``: a registry created with ``stats=False``;
- ``on``: the default, statistics on; OpenTelemetry installed, no tracer provider set;
- ``no-otel``: statistics on, as if OpenTelemetry were not installed;
- ``sdk``: statistics on, with an SDK tracer provider, a batch span processor and an exporter that drops spans;
- ``on-again``: ``on`` again, another instance.

The variants take turns every 25 requests, on one pool. Targets: ``on``
within 3% of ``off`` on w1 (a read) and w2 (an insert); ``on`` within 1% of
``no-otel``, judged from the cost of the one call the two run differently
(``span_call_seconds()``), since the throughput comparison, also reported,
cannot resolve 1%. ``sdk`` against ``on`` is reported, and so is
``on-again`` (another instance of ``on``) against ``on``: the noise floor.
"""

from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from starlette.types import ASGIApp, Receive, Scope, Send

import starlette_alchemy
from bench.driver import databases
from bench.models import recreate
from bench.policy import app, report
from bench.requests import Build, Figure, Target, in_turns, run_in_turns_command
from starlette_alchemy import spans


class _DropSpans(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class Setting:
    """Put the process's OpenTelemetry state as a variant needs it, around each of its requests."""

    def __init__(self, app: ASGIApp, otel: Any, provider: Any) -> None:
        self.app, self.otel, self.provider = app, otel, provider

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Every variant pays for this wrapper alike; only what it sets differs.
        spans._trace = self.otel
        trace._TRACER_PROVIDER = self.provider  # None: no provider set (the proxy)
        await self.app(scope, receive, send)


TARGETS = [
    Target("w1: on / on, another instance (A/A: the noise floor)", "w1", "on-again", "on", None),
    Target("w1 (a read): statistics on / off, throughput", "w1", "on", "off", 0.97),
    Target("w1: OpenTelemetry installed, no provider / not installed", "w1", "on", "no-otel", None),
    Target("w1: the same, from the span call's own cost", "w1", "on", "on-less-span", 0.99),
    Target("w1: SDK provider, spans dropped / no provider (reference)", "w1", "sdk", "on", None),
    Target("w2: on / on, another instance (A/A: the noise floor)", "w2", "on-again", "on", None),
    Target("w2 (an insert): statistics on / off, throughput", "w2", "on", "off", 0.97),
    Target("w2: OpenTelemetry installed, no provider / not installed", "w2", "on", "no-otel", None),
    Target("w2: the same, from the span call's own cost", "w2", "on", "on-less-span", 0.99),
    Target("w2: SDK provider, spans dropped / no provider (reference)", "w2", "sdk", "on", None),
]


async def measure(build: Build, rounds: int, count: int) -> list[Figure]:
    """The targets' figures from ``in_turns()``, with ``on`` less the span call's own cost as one more variant."""
    times = await in_turns(build, ["w1", "w2"], rounds, count)
    span_call = span_call_seconds()
    for by_name in times.values():
        by_name["on-less-span"] = [seconds - span_call for seconds in by_name["on"]]
    return [target.judge(times[target.workload]) for target in TARGETS]


def span_call_seconds(calls: int = 100_000) -> float:
    """What the end of a scope costs with OpenTelemetry installed and no provider set, over it not installed.

    That call, ``record_span()``, is all the code the two states run
    differently: timed alone, its cost is known to far better than the 1%
    the throughput comparison would need to resolve.
    """
    installed, meter = spans._trace, cast(Any, object())
    best = {True: float("inf"), False: float("inf")}
    try:
        for _ in range(5):
            for state in (True, False):
                spans._trace = installed if state else None
                trace._TRACER_PROVIDER = None
                started = time.perf_counter()
                for _ in range(calls):
                    spans.record_span(meter)
                best[state] = min(best[state], (time.perf_counter() - started) / calls)
    finally:
        spans._trace = installed
    return max(best[True] - best[False], 0.0)


async def main(rounds: int, count: int, only: str) -> int:
    started, missed = time.monotonic(), 0
    installed = spans._trace
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_DropSpans()))
    gc.freeze()
    with tempfile.TemporaryDirectory() as directory:
        for label, kind, url in databases(Path(directory), only):
            recreate(url)

            def build(engines: list[Any], kind: str = kind, url: str = url) -> dict[str, ASGIApp]:
                # One app for the three that differ only in OpenTelemetry's state: nothing else differs.
                on = app(starlette_alchemy, kind, url, engines, stats=True)
                return {
                    "off": Setting(app(starlette_alchemy, kind, url, engines, stats=False), installed, None),
                    "on": Setting(on, installed, None),
                    "on-again": Setting(app(starlette_alchemy, kind, url, engines, stats=True), installed, None),
                    "no-otel": Setting(on, None, None),
                    "sdk": Setting(on, installed, provider),
                }

            rows = await measure(build, rounds, count)
            missed += report(f"{label}, in process, sequential ({rounds} rounds x {count} requests)", rows, TARGETS)
    provider.shutdown()
    print(f"\n{time.monotonic() - started:.0f} s; {'all targets met' if not missed else f'{missed} MISSED'}")
    return 1 if missed else 0


if __name__ == "__main__":
    run_in_turns_command(__doc__, main, rounds=40, count=500)
