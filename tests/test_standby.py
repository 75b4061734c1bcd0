"""Read replicas on real replication: a PostgreSQL primary and a streaming hot standby of its own.

The pair is started for this module with the server binaries the machine has
(``initdb``, ``pg_ctl``, ``pg_basebackup``), on free ports, in a temporary
directory, and stopped and removed at the end, even on failure. The system
server on 5432 is never touched. Where the binaries are missing the tests
skip, unless ``STARLETTE_ALCHEMY_REQUIRE_STANDBY`` is set (as CI sets it):
then they fail.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from starlette_alchemy import AsyncScopedSession, DBSessionMiddleware, ScopedSession
from starlette_alchemy.routing import COOKIE
from tests.models import Base, Item
from tests.support import AnyDB, http_client, run

pytestmark = pytest.mark.anyio

REQUIRED = "STARLETTE_ALCHEMY_REQUIRE_STANDBY"


@dataclass(frozen=True)
class Pair:
    """A running primary and its streaming standby: their sync URLs (psycopg)."""

    primary: str
    standby: str

    def url(self, which: str, driver: str) -> str:
        url = sa.make_url(getattr(self, which)).set(drivername=f"postgresql+{driver}")
        if driver == "asyncpg":
            url = url.update_query_dict({"ssl": "disable"})
        return url.render_as_string(hide_password=False)


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRED):
        pytest.fail(f"{reason} ({REQUIRED} is set, so the hot-standby tests may not skip).")
    pytest.skip(reason)


def _binaries() -> Path:
    """The newest PostgreSQL server binaries on the machine."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_basebackup"), key=lambda p: int(p.parent.parent.name))
    if not found:
        _unavailable("No PostgreSQL server binaries in /usr/lib/postgresql/<version>/bin")
    return found[-1].parent


def _as_server_user() -> tuple[list[str], str | None]:
    """The prefix that runs a binary as a user it accepts (never root), and that user's name if not ours."""
    if os.geteuid() != 0:
        return [], None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        _unavailable("Running as root, and there is no 'postgres' user to run the server binaries as")
    if shutil.which("runuser") is None:
        _unavailable("Running as root, and there is no 'runuser' to run the server binaries as 'postgres'")
    return ["runuser", "-u", "postgres", "--"], "postgres"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    binaries = _binaries()
    prefix, user = _as_server_user()
    root = Path(tempfile.mkdtemp(prefix="starlette_alchemy_standby_"))
    if user is not None:
        shutil.chown(root, user)
    primary, standby = root / "primary", root / "standby"
    ports = _free_port(), _free_port()

    def run_binary(name: str, *args: str) -> None:
        command = [*prefix, str(binaries / name), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")

    def start(directory: Path, port: int) -> None:
        options = f"-p {port} -c listen_addresses=127.0.0.1 -k {root} -c fsync=off"
        run_binary("pg_ctl", "-D", str(directory), "-o", options, "-l", f"{directory}.log", "-w", "start")

    try:
        run_binary("initdb", "-D", str(primary), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "-N")
        with (primary / "pg_hba.conf").open("a") as hba:
            hba.write("host replication all 127.0.0.1/32 trust\n")
        start(primary, ports[0])
        run_binary(
            "pg_basebackup", "-h", "127.0.0.1", "-p", str(ports[0]), "-U", "postgres", "-D", str(standby),
            "-R", "-X", "stream", "--checkpoint=fast",
        )  # fmt: skip
        start(standby, ports[1])
        urls = Pair(*(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres" for port in ports))
        engine = create_engine(urls.primary)
        try:
            Base.metadata.create_all(engine)
        finally:
            engine.dispose()
        _wait_for_replay(urls)
        yield urls
    finally:
        for directory in (standby, primary):
            if (directory / "postmaster.pid").exists():
                subprocess.run(
                    [*prefix, str(binaries / "pg_ctl"), "-D", str(directory), "-m", "immediate", "stop"],
                    capture_output=True,
                    timeout=60,
                )
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_replay(pair: Pair, within: float = 30.0) -> None:
    """Return once the standby has replayed everything the primary has written so far."""
    primary, standby = create_engine(pair.primary), create_engine(pair.standby)
    try:
        with primary.connect() as connection:
            target = connection.scalar(sa.text("SELECT pg_current_wal_lsn()"))
        deadline = time.monotonic() + within
        with standby.connect() as connection:
            query = sa.text("SELECT pg_last_wal_replay_lsn() >= CAST(:target AS pg_lsn)")
            while not connection.scalar(query, {"target": target}):
                if time.monotonic() > deadline:
                    raise AssertionError(f"The standby did not replay up to {target} within {within} s.")
                time.sleep(0.02)
                connection.rollback()
    finally:
        primary.dispose()
        standby.dispose()


def _standby_sql(pair: Pair, statement: str) -> Any:
    engine = create_engine(pair.standby, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            return connection.scalar(sa.text(statement))
    finally:
        engine.dispose()


def _names(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return set(connection.scalars(sa.select(Item.name)))
    finally:
        engine.dispose()


@pytest.fixture(params=["psycopg", "asyncpg"])
async def db(pair: Pair, request: pytest.FixtureRequest) -> AsyncIterator[AnyDB]:
    """A registry on the pair: sync with psycopg, async with asyncpg."""
    engines: list[Any]
    if request.param == "psycopg":
        engines = [create_engine(pair.url(which, "psycopg")) for which in ("primary", "standby")]
        yield ScopedSession(engines[0], replicas=[engines[1]])
    else:
        engines = [create_async_engine(pair.url(which, "asyncpg")) for which in ("primary", "standby")]
        yield AsyncScopedSession(engines[0], replicas=[engines[1]])
    for engine in engines:
        if isinstance(engine, AsyncEngine):
            await engine.dispose()
        else:
            assert isinstance(engine, Engine)
            engine.dispose()
    engine = create_engine(pair.primary)
    try:
        with engine.begin() as connection:
            connection.execute(sa.delete(Item))
    finally:
        engine.dispose()


def app_for(db: AnyDB) -> Starlette:
    async def recovery(request: Request) -> Response:
        return JSONResponse(await run(db.scalar, sa.text("SELECT pg_is_in_recovery()")))

    async def items(request: Request) -> Response:
        if request.method == "POST":
            await run(db.add, Item(name=request.query_params["name"]))
            return JSONResponse("added")
        return JSONResponse(sorted(await run(db.scalars, sa.select(Item.name))))

    async def get_that_writes(request: Request) -> Response:
        await run(db.scalars, sa.select(Item.name))
        await run(db.add, Item(name=request.query_params["name"]))
        await run(db.flush)
        return JSONResponse(await run(db.scalar, sa.text("SELECT pg_is_in_recovery()")))

    routes = [
        Route("/recovery", recovery),
        Route("/items", items, methods=["GET", "POST"]),
        Route("/get-that-writes", get_that_writes),
    ]
    return Starlette(routes=routes, middleware=[Middleware(DBSessionMiddleware, db=db)])


async def test_reads_are_served_by_the_standby_and_writes_never_go_there(pair: Pair, db: AnyDB) -> None:
    async with http_client(app_for(db), "uvicorn") as client:
        assert (await client.get("/recovery")).json() is True  # the standby served the GET
        assert (await client.post("/items", params={"name": "posted"})).status_code == 200
        # A GET that writes: its read went to the standby, its write (which the standby would refuse)
        # to the primary, and so did what it read after writing.
        response = await client.get("/get-that-writes", params={"name": "got"})
        assert response.status_code == 200 and response.json() is False
    assert _names(pair.primary) == {"posted", "got"}


async def test_read_your_writes_hides_real_replication_lag(pair: Pair, db: AnyDB) -> None:
    _wait_for_replay(pair)
    _standby_sql(pair, "SELECT pg_wal_replay_pause()")
    try:
        async with http_client(app_for(db), "uvicorn") as client:
            assert (await client.post("/items", params={"name": "lagging"})).status_code == 200
            assert COOKIE in client.cookies
            # The writer reads its write, from the primary; a client without the cookie reads the
            # standby, where replay is paused: the write is not there yet.
            assert (await client.get("/items")).json() == ["lagging"]
            writer = dict(client.cookies)
            client.cookies.clear()
            assert (await client.get("/items")).json() == []
            assert (await client.get("/recovery")).json() is True
            client.cookies.update(writer)
            assert (await client.get("/items")).json() == ["lagging"]
    finally:
        _standby_sql(pair, "SELECT pg_wal_replay_resume()")
    _wait_for_replay(pair)
    assert _names(pair.standby) == {"lagging"}
