"""``Retry`` against real conflicts, through uvicorn: write skew under SERIALIZABLE, a deadlock, exhausted attempts.

Each test works in a table of its own (a unique name, dropped afterwards),
mapped by a declarative base of its own, so ``tests/models.py`` is untouched.
What the requests did is read back through a separate connection.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from starlette_alchemy import AsyncScopedSession, Changes, DBSessionMiddleware, Retry, ScopedSession, transaction
from tests.conftest import TESTED_MYSQL, TESTED_POSTGRESQL, Backend, checked_out, engine_for
from tests.support import CONFLICT, AnyDB, http_client, idle_in_transaction

pytestmark = pytest.mark.anyio

# The longest any coordination in these tests waits, in seconds: nothing here can hang.
WAIT = 10.0


class Duty:
    """The columns of a test's own table: one row per doctor, on call or not, and a running total."""

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    on_call: Mapped[bool] = mapped_column(default=True)
    total: Mapped[int] = mapped_column(default=0)


@pytest.fixture
def duty(inspection_engine: Engine) -> Iterator[type[Duty]]:
    """A mapped class on a table of the test's own, created in the test's database and dropped after it."""

    class Base(DeclarativeBase):
        pass

    class OnCall(Duty, Base):
        __tablename__ = f"conflicts_{secrets.token_hex(4)}"

    Base.metadata.create_all(inspection_engine)
    try:
        yield OnCall
    finally:
        with inspection_engine.begin() as connection:
            # A connection a failed test left holding a lock makes the DROP fail rather than wait forever.
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql("SET LOCAL lock_timeout = '5s'")
            else:
                connection.exec_driver_sql("SET SESSION lock_wait_timeout = 5")
            Base.metadata.drop_all(connection)


def registry(engine: Engine | AsyncEngine) -> AnyDB:
    if isinstance(engine, AsyncEngine):
        return AsyncScopedSession(engine)
    return ScopedSession(engine)


def app_with(db: AnyDB, retry: Retry | None, *routes: Route, **kw: Any) -> Starlette:
    return Starlette(routes=list(routes), middleware=[Middleware(DBSessionMiddleware, db=db, retry=retry)], **kw)


class Attempts:
    """How many times the endpoint ran for each request key; safe from worker threads."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self._lock = threading.Lock()

    def next(self, key: int) -> int:
        """Note one more run for *key*; return its number (1 for the first)."""
        with self._lock:
            self.counts[key] += 1
            return self.counts[key]


async def wait_for(event: threading.Event, timeouts: list[str], what: str) -> None:
    """Wait for *event* in the event loop, at most ``WAIT`` seconds; note a timeout in *timeouts*."""
    with anyio.move_on_after(WAIT) as waited:
        while not event.is_set():
            await anyio.sleep(0.005)
    if waited.cancelled_caught:
        timeouts.append(what)


def wait_in_thread(event: threading.Event, timeouts: list[str], what: str) -> None:
    """Wait for *event* in a worker thread, at most ``WAIT`` seconds; note a timeout in *timeouts*."""
    if not event.wait(WAIT):
        timeouts.append(what)


class Gate:
    """Opens once *parties* have arrived: each waits until then (at most ``WAIT`` seconds)."""

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.arrived = 0
        self.open = threading.Event()
        self.timeouts: list[str] = []
        self._lock = threading.Lock()

    def _arrive(self) -> None:
        with self._lock:
            self.arrived += 1
            if self.arrived >= self.parties:
                self.open.set()

    def pass_in_thread(self) -> None:
        self._arrive()
        wait_in_thread(self.open, self.timeouts, "gate")

    async def pass_(self) -> None:
        self._arrive()
        await wait_for(self.open, self.timeouts, "gate")


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Wait until *condition()* holds (after-commit work runs after the response was sent), at most *seconds*."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        await anyio.sleep(0.01)


def messages(caplog: pytest.LogCaptureFixture, level: int, containing: str) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "starlette_alchemy" and record.levelno == level and containing in record.getMessage()
    ]


# -- write skew under SERIALIZABLE ----------------------------------------------------------------

DOCTORS = 20


@pytest.mark.parametrize("retried", [True, False], ids=["retry", "no-retry"])
@pytest.mark.parametrize("backend", TESTED_POSTGRESQL, ids=lambda b: b.id)
async def test_write_skew_under_serializable_is_replayed_until_every_request_succeeds(
    backend: Backend,
    tmp_path: Path,
    inspection_engine: Engine,
    duty: type[Duty],
    retried: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Every doctor asks to go off call at once; each may only if another stays on call. Each reads how many are
    # on call, then writes its own row: a write skew that only SERIALIZABLE catches, by failing all but one.
    caplog.set_level(logging.INFO, logger="starlette_alchemy")
    doctors = list(range(1, DOCTORS + 1))
    with inspection_engine.begin() as connection:
        connection.execute(sa.insert(duty), [{"id": doctor, "on_call": True} for doctor in doctors])
    on_call = sa.select(sa.func.count()).select_from(duty).where(duty.on_call)
    attempts = Attempts()
    # Every first attempt has read before any writes: they all conflict.
    gate = Gate(DOCTORS)
    callbacks: list[int] = []
    hooked: list[int] = []

    def decide(doctor: int, others: int, row: Duty) -> Response:
        if others >= 1:
            row.on_call = False  # flushed at COMMIT
            result = "off"
        else:
            result = "refused"
        return JSONResponse({"doctor": doctor, "result": result})

    # A pool as large as the crowd: every first attempt holds its connection at the gate.
    async with engine_for(backend, tmp_path, pool_size=DOCTORS, max_overflow=5) as engine:
        db = registry(engine)

        @db.after_commit
        def published(changes: Changes) -> None:
            for change in changes.updated:
                assert change.identity is not None and change.diff["on_call"] == (True, False)
                hooked.append(change.identity[0])

        if isinstance(db, ScopedSession):

            @transaction(isolation_level="SERIALIZABLE")
            def go_off_call(request: Request) -> Response:
                doctor = int(request.path_params["doctor"])
                number = attempts.next(doctor)
                count = db.scalar(on_call)
                assert count is not None
                if number == 1:
                    gate.pass_in_thread()
                row = db.get_one(duty, doctor)
                db.on_commit(partial(callbacks.append, doctor))
                return decide(doctor, count - row.on_call, row)

            endpoint: Callable[[Request], Any] = go_off_call
        else:
            adb = db

            @transaction(isolation_level="SERIALIZABLE")
            async def go_off_call_async(request: Request) -> Response:
                doctor = int(request.path_params["doctor"])
                number = attempts.next(doctor)
                count = await adb.scalar(on_call)
                assert count is not None
                if number == 1:
                    await gate.pass_()
                row = await adb.get_one(duty, doctor)
                adb.on_commit(partial(callbacks.append, doctor))
                return decide(doctor, count - row.on_call, row)

            endpoint = go_off_call_async

        retry = Retry(attempts=30) if retried else None
        app = app_with(db, retry, Route("/off/{doctor:int}", endpoint, methods=["POST"]))
        responses: dict[int, httpx.Response] = {}

        async def ask(client: httpx.AsyncClient, doctor: int) -> None:
            responses[doctor] = await client.post(f"/off/{doctor}")

        async with http_client(app, "uvicorn") as client:
            with anyio.fail_after(40):
                async with anyio.create_task_group() as tg:
                    for doctor in doctors:
                        tg.start_soon(ask, client, doctor)
            answered = [doctor for doctor in doctors if responses[doctor].status_code == 200]
            off = [doctor for doctor in answered if responses[doctor].json()["result"] == "off"]
            # After-commit work runs once the response was sent.
            await until(lambda: len(callbacks) == len(answered) and len(hooked) == len(off))
        assert checked_out(engine) == 0

    assert gate.timeouts == []
    with inspection_engine.connect() as connection:
        still_on_call = set(connection.scalars(sa.select(duty.id).where(duty.on_call)))
    # The invariant holds, whatever happened: someone is on call, and only those who were told "off" went off.
    assert len(still_on_call) >= 1
    assert still_on_call == set(doctors) - set(off)
    # Each request's after-commit work ran once if it committed, never if it did not.
    assert Counter(callbacks) == Counter(answered)
    assert Counter(hooked) == Counter(off)
    replays = messages(caplog, logging.INFO, "; replaying it (attempt ")
    if retried:
        assert {doctor: responses[doctor].status_code for doctor in doctors} == dict.fromkeys(doctors, 200)
        # Run one after another, as SERIALIZABLE promises: all but the last went off.
        assert len(off) == DOCTORS - 1 and len(still_on_call) == 1
        assert responses[still_on_call.pop()].json()["result"] == "refused"
        assert sum(attempts.counts.values()) > DOCTORS  # the gate made them conflict
        assert len(replays) == sum(attempts.counts.values()) - DOCTORS
        # Each replay names the database's own error, also when it came at COMMIT.
        assert all(m.startswith("'POST /off/") and "could not serialize" in m for m in replays), replays[:3]
        assert messages(caplog, logging.WARNING, "giving up") == []
    else:
        statuses = Counter(response.status_code for response in responses.values())
        assert set(statuses) <= {200, 500} and statuses[500] >= 1, statuses
        assert all(responses[doctor].text == "Internal Server Error" for doctor in doctors if doctor not in answered)
        assert attempts.counts == Counter(doctors)  # never run again
        assert replays == []
    assert idle_in_transaction(inspection_engine) == 0


# -- a deadlock -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", TESTED_POSTGRESQL + TESTED_MYSQL, ids=lambda b: b.id)
async def test_a_deadlock_is_replayed_and_each_write_lands_once(
    backend: Backend,
    engine: Engine | AsyncEngine,
    inspection_engine: Engine,
    duty: type[Duty],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="starlette_alchemy")
    with inspection_engine.begin() as connection:
        connection.execute(sa.insert(duty), [{"id": 1, "total": 0}, {"id": 2, "total": 0}])
    db = registry(engine)

    @db.on_begin
    def detect_deadlocks_soon(connection: Connection, info: dict[str, Any]) -> None:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql("SET LOCAL deadlock_timeout = '100ms'")
        else:  # InnoDB sees a deadlock at once; a lock it could not see would not wait 50 seconds
            connection.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 10")

    # Request 1 locks row 1 then row 2 and adds 1 to each; request 2 locks row 2 then row 1 and adds 10.
    orders = {1: (1, 2, 1), 2: (2, 1, 10)}
    locked = {1: threading.Event(), 2: threading.Event()}
    timeouts: list[str] = []
    attempts = Attempts()
    callbacks: list[int] = []

    def add(row: int, amount: int) -> sa.Update:
        statement = sa.update(duty).where(duty.id == row).values(total=duty.total + amount)
        return statement.execution_options(synchronize_session=False)

    if isinstance(db, ScopedSession):

        def lock_both(request: Request) -> Response:
            key = int(request.path_params["key"])
            first, second, amount = orders[key]
            attempts.next(key)
            db.execute(add(first, amount))
            locked[first].set()
            wait_in_thread(locked[second], timeouts, f"request {key}")  # set already when replayed
            db.execute(add(second, amount))
            db.on_commit(partial(callbacks.append, key))
            return JSONResponse({"key": key})

        endpoint: Callable[[Request], Any] = lock_both
    else:
        adb = db

        async def lock_both_async(request: Request) -> Response:
            key = int(request.path_params["key"])
            first, second, amount = orders[key]
            attempts.next(key)
            await adb.execute(add(first, amount))
            locked[first].set()
            await wait_for(locked[second], timeouts, f"request {key}")
            await adb.execute(add(second, amount))
            adb.on_commit(partial(callbacks.append, key))
            return JSONResponse({"key": key})

        endpoint = lock_both_async

    app = app_with(db, Retry(attempts=3), Route("/lock/{key:int}", endpoint, methods=["POST"]))
    responses: dict[int, httpx.Response] = {}

    async def ask(client: httpx.AsyncClient, key: int) -> None:
        responses[key] = await client.post(f"/lock/{key}")

    async with http_client(app, "uvicorn") as client:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for key in orders:
                    tg.start_soon(ask, client, key)
        await until(lambda: len(callbacks) == 2)

    assert timeouts == []
    assert {key: response.status_code for key, response in responses.items()} == {1: 200, 2: 200}
    # One of them was the deadlock's victim and ran again, once.
    assert sorted(attempts.counts.values()) == [1, 2]
    replays = messages(caplog, logging.INFO, "; replaying it (attempt 2 of 3)")
    assert len(replays) == 1 and "deadlock" in replays[0].lower(), replays
    with inspection_engine.connect() as connection:
        totals = {row.id: row.total for row in connection.execute(sa.select(duty.id, duty.total))}
    assert totals == {1: 11, 2: 11}  # both requests' writes, each once
    assert sorted(callbacks) == [1, 2]
    assert checked_out(engine) == 0
    assert idle_in_transaction(inspection_engine) == 0


# -- attempts exhausted -----------------------------------------------------------------------------


@pytest.mark.parametrize("handled", [False, True], ids=["raised", "handled"])
@pytest.mark.parametrize("backend", TESTED_POSTGRESQL + TESTED_MYSQL, ids=lambda b: b.id)
async def test_exhausted_attempts_answer_as_without_retry_and_say_so(
    backend: Backend,
    engine: Engine | AsyncEngine,
    inspection_engine: Engine,
    handled: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # "handled": an exception handler inside the middleware turns the conflict into a 503 of its own.
    caplog.set_level(logging.INFO, logger="starlette_alchemy")
    db = registry(engine)
    conflict = sa.text(CONFLICT[backend.dialect])
    runs: list[int] = []

    if isinstance(db, ScopedSession):

        def conflicts(request: Request) -> Response:
            runs.append(1)
            db.execute(conflict)
            return JSONResponse({"never": "sent"})

        endpoint: Callable[[Request], Any] = conflicts
    else:
        adb = db

        async def conflicts_async(request: Request) -> Response:
            runs.append(1)
            await adb.execute(conflict)
            return JSONResponse({"never": "sent"})

        endpoint = conflicts_async

    def unavailable(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": "conflict", "try": "later"}, status_code=503)

    handlers: dict[Any, Callable[[Request, Exception], Response]] = {sa.exc.DBAPIError: unavailable} if handled else {}

    async def answer(retry: Retry | None) -> httpx.Response:
        app = app_with(db, retry, Route("/conflict", endpoint, methods=["POST"]), exception_handlers=handlers)
        async with http_client(app, "uvicorn") as client:
            with anyio.fail_after(20):
                return await client.post("/conflict", content=b"the same body each time")

    without = await answer(None)
    assert runs == [1]
    assert messages(caplog, logging.WARNING, "") == []
    runs.clear()
    retried = await answer(Retry(attempts=2, backoff=0.01))

    assert (retried.status_code, retried.content) == (without.status_code, without.content)
    assert retried.headers.get("content-type") == without.headers.get("content-type")
    assert (without.status_code, without.text) == (
        (503, '{"error":"conflict","try":"later"}') if handled else (500, "Internal Server Error")
    )
    assert runs == [1, 1]
    replays = messages(caplog, logging.INFO, "replaying it")
    assert len(replays) == 1 and "'POST /conflict'" in replays[0] and "(attempt 2 of 2)" in replays[0], replays
    warnings = messages(caplog, logging.WARNING, "")
    assert len(warnings) == 1, warnings
    assert "'POST /conflict'" in warnings[0] and "in each of its 2 attempts; giving up." in warnings[0]
    assert ("a 503 made of " in warnings[0]) is handled
    assert checked_out(engine) == 0
    assert idle_in_transaction(inspection_engine) == 0
