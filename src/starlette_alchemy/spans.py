"""The ``db.transaction`` span: an OpenTelemetry span per scope that used the database (extra ``otel``).

``observe.py``'s meter calls ``record_span()`` when its scope ends. Without
OpenTelemetry installed nothing here imports it; without a tracer provider
set, nothing is recorded.
"""

from __future__ import annotations

import os
import time
from typing import Any, Protocol

try:
    from opentelemetry import trace as _opentelemetry_trace
except ImportError:  # the 'otel' extra is not installed: no spans
    _opentelemetry_trace = None  # type: ignore[assignment]

__all__ = ["Spanned", "record_span"]

# OpenTelemetry's trace API, or None; a variable, so the benchmarks can compare it absent and present.
_trace: Any = _opentelemetry_trace


class Spanned(Protocol):
    """What a span reads of its scope's meter (``Meter``, observe.py)."""

    system: str | None
    outcome: str | None
    queries: int
    inserted: int
    updated: int
    deleted: int
    began_ns: int
    ended_ns: int

    @property
    def route(self) -> str: ...


def record_span(meter: Spanned) -> None:
    """Record the scope's span after the fact, from its first BEGIN to its last transaction's end.

    Nothing is done without OpenTelemetry, or without a tracer provider set.
    """
    if _trace is None:
        return
    provider = _provider()
    if provider is None:
        return
    attributes: dict[str, Any] = {
        "db.system.name": meter.system or "other_sql",
        "db.transaction.outcome": meter.outcome or "rollback",
        "db.transaction.queries": meter.queries,
        "db.transaction.rows.inserted": meter.inserted,
        "db.transaction.rows.updated": meter.updated,
        "db.transaction.rows.deleted": meter.deleted,
    }
    route = _route_template(meter.route)
    if route is not None:
        attributes["http.route"] = route
    else:
        attributes["db.transaction.scope"] = meter.route
    tracer = _tracer(provider)
    span = tracer.start_span("db.transaction", start_time=meter.began_ns, attributes=attributes)
    if meter.outcome == "commit_failed":
        span.set_status(_trace.StatusCode.ERROR, "COMMIT failed")
    span.end(end_time=meter.ended_ns or time.time_ns())


_tracers: tuple[Any, Any] | None = None
_PROVIDER_FROM_ENVIRONMENT = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ
_UNKNOWN = object()


def _provider() -> Any:
    """The global tracer provider, or ``None`` if none is set: then no span is made, at no cost."""
    # OpenTelemetry's own global, read directly: its getter looks the environment up at every call.
    provider = getattr(_trace, "_TRACER_PROVIDER", _UNKNOWN)
    if provider is _UNKNOWN or (provider is None and _PROVIDER_FROM_ENVIRONMENT):
        provider = _trace.get_tracer_provider()
    if provider is None or isinstance(provider, _trace.ProxyTracerProvider | _trace.NoOpTracerProvider):
        return None
    return provider


def _tracer(provider: Any) -> Any:
    """The package's tracer from *provider*, made once per provider (the SDK makes a new one per call)."""
    global _tracers
    cached = _tracers
    if cached is None or cached[0] is not provider:
        cached = _tracers = (provider, provider.get_tracer("starlette_alchemy"))
    return cached[1]


def _route_template(route: str) -> str | None:
    """The path template of a request's route name ("'GET /items/{id}'"), or ``None`` for ``db.scope()``."""
    if route.startswith("'db.scope()'") or " " not in route:
        return None
    return route.strip("'").split(" ", 1)[1]
