"""The ``db.transaction`` span: one per scope that used the database, inside the request's span."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from starlette_alchemy import DBSessionMiddleware
from tests.conftest import Backend
from tests.models import Item, Note
from tests.support import AnyDB, http_client, run, scope

pytestmark = pytest.mark.anyio


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """A global SDK tracer provider for the test, exporting to memory; the process's globals are restored after."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()
    # OpenTelemetry sets its global provider once per process; its own test helpers reset it like this.
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


def traced_app(db: AnyDB, *routes: Route) -> Any:
    app = Starlette(routes=list(routes), middleware=[Middleware(DBSessionMiddleware, db=db)])
    return OpenTelemetryMiddleware(app)


def by_name(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


async def test_a_request_span_holds_one_transaction_span_with_what_it_did(
    db: AnyDB, backend: Backend, spans: InMemorySpanExporter, transport: str
) -> None:
    async def write(request: Request) -> Response:
        await run(db.add, Item(id=1, name="traced"))
        await run(db.flush)
        await run(db.execute, sa.update(Item).values(name="traced again"))
        await run(db.execute, sa.select(Item))
        return PlainTextResponse("")

    async with http_client(traced_app(db, Route("/items", write, methods=["POST"])), transport) as client:
        assert (await client.post("/items")).status_code == 200
    (transaction,) = by_name(spans, "db.transaction")
    (request,) = [span for span in spans.get_finished_spans() if span.kind == trace.SpanKind.SERVER]
    assert transaction.parent is not None and transaction.parent.span_id == request.context.span_id
    assert transaction.context.trace_id == request.context.trace_id
    assert request.start_time <= transaction.start_time <= transaction.end_time <= request.end_time  # type: ignore[operator]
    system = {"sqlite": "sqlite", "postgresql": "postgresql", "mysql": "mariadb"}[backend.dialect]
    assert dict(transaction.attributes or {}) == {
        "db.system.name": system,
        "db.transaction.outcome": "commit",
        "db.transaction.queries": 3,
        "db.transaction.rows.inserted": 1,
        "db.transaction.rows.updated": 1,
        "db.transaction.rows.deleted": 0,
        "http.route": "/items",
    }


async def test_outcomes_rollback_and_commit_failed(db: AnyDB, spans: InMemorySpanExporter) -> None:
    async def refused(request: Request) -> Response:
        await run(db.add, Item(name="refused"))
        await run(db.flush)
        return PlainTextResponse("", status_code=409)

    async def failing(request: Request) -> Response:
        # Its foreign key fails at COMMIT (on MariaDB, at the flush that commit() does first).
        await run(db.add, Note(id=1, item_id=999))
        return PlainTextResponse("")

    async def unused(request: Request) -> Response:
        return PlainTextResponse("")

    routes = [
        Route(path, endpoint, methods=["POST"]) for path, endpoint in (("/refused", refused), ("/failing", failing))
    ]
    async with http_client(traced_app(db, *routes, Route("/unused", unused)), "asgi") as client:
        assert (await client.post("/refused")).status_code == 409
        assert (await client.post("/failing")).status_code == 500
        assert (await client.get("/unused")).status_code == 200
    first, second = by_name(spans, "db.transaction")  # none for the request that never used the database
    assert first.attributes is not None and first.attributes["db.transaction.outcome"] == "rollback"
    assert second.attributes is not None and second.attributes["db.transaction.outcome"] == "commit_failed"
    assert second.status.status_code == trace.StatusCode.ERROR


async def test_a_db_scope_has_its_own_span_inside_the_current_one(db: AnyDB, spans: InMemorySpanExporter) -> None:
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("job") as job:
        async with scope(db):
            await run(db.add, Item(name="from a job"))
    (transaction,) = by_name(spans, "db.transaction")
    assert transaction.parent is not None and transaction.parent.span_id == job.get_span_context().span_id
    attributes = dict(transaction.attributes or {})
    assert attributes["db.transaction.outcome"] == "commit"
    assert str(attributes["db.transaction.scope"]).startswith("'db.scope()' in ")


def test_without_a_tracer_provider_no_span_is_made(tmp_path: Any) -> None:
    code = f"""
        import sqlalchemy as sa
        from opentelemetry import trace
        from starlette_alchemy import ScopedSession, spans

        made = []
        spans._tracer = lambda provider: made.append(provider)
        db = ScopedSession(sa.create_engine("sqlite:///{tmp_path / "a.db"}"))
        with db.scope():
            db.execute(sa.select(1))
        assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
        assert made == [], made
        print("ok")
    """
    assert _python(code) == "ok"


def test_without_opentelemetry_installed_nothing_is_imported_or_done(tmp_path: Any) -> None:
    code = f"""
        import sys
        sys.modules["opentelemetry"] = None  # as if it were not installed: importing it fails
        import sqlalchemy as sa
        from starlette_alchemy import ScopedSession

        db = ScopedSession(sa.create_engine("sqlite:///{tmp_path / "a.db"}"))
        with db.scope():
            db.execute(sa.select(1))
            assert db.stats.queries == 1
        assert not [name for name in sys.modules if name.startswith("opentelemetry.")]
        print("ok")
    """
    assert _python(code) == "ok"


def _python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()
