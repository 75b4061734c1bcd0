"""Every example runs, so none of them can rot."""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import POSTGRES_URL

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).parent.parent


def import_with_database(module: str, url: str) -> ModuleType:
    """Import an example module that reads ``DATABASE_URL`` when it is first imported."""
    previous = os.environ.get("DATABASE_URL")
    os.environ["DATABASE_URL"] = url
    try:
        return importlib.import_module(module)
    finally:
        if previous is None:
            del os.environ["DATABASE_URL"]
        else:
            os.environ["DATABASE_URL"] = previous


@pytest.fixture(scope="session")
def fastapi_example(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    path = tmp_path_factory.mktemp("fastapi_example") / "example.db"
    return import_with_database("examples.fastapi_app", f"sqlite+aiosqlite:///{path}")


@pytest.fixture
async def example_client(fastapi_example: ModuleType) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the FastAPI example, whose tables start empty."""
    async with fastapi_example.engine.begin() as conn:
        await conn.run_sync(fastapi_example.Base.metadata.drop_all)
    async with fastapi_example.lifespan(fastapi_example.app):
        transport = httpx.ASGITransport(fastapi_example.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
            yield client


async def test_fastapi_example_serves_audits_and_rolls_back(example_client: httpx.AsyncClient) -> None:
    client = example_client
    apple = (await client.post("/items", json={"name": "apple", "quantity": 3})).json()
    pear = (await client.post("/items", json={"name": "pear"})).json()
    assert (await client.post("/items", json={"name": "apple"})).status_code == 409  # conflict at flush
    assert (await client.get(f"/items/{apple['id']}")).json() == apple
    assert (await client.get("/items/999")).status_code == 404
    assert (await client.post(f"/items/{apple['id']}/move/999?quantity=2")).status_code == 404
    assert (await client.put(f"/items/{pear['id']}", json={"name": "apple"})).status_code == 409  # at COMMIT
    assert (await client.put(f"/items/{pear['id']}", json={"name": "pear", "quantity": 1})).status_code == 200
    assert (await client.post(f"/items/{pear['id']}/restock?quantity=4")).status_code == 202
    assert (await client.delete(f"/items/{apple['id']}")).status_code == 204
    assert (await client.get("/items")).json() == [{"id": pear["id"], "name": "pear", "quantity": 5}]
    assert (await client.get("/export.csv")).text == f"id,name,quantity\n{pear['id']},pear,5\n"
    audit = [(row["op"], row["identity"], row["diff"]) for row in (await client.get("/audit")).json()]
    assert audit == [
        ("insert", f"[{apple['id']}]", {"id": [None, apple["id"]], "name": [None, "apple"], "quantity": [None, 3]}),
        ("insert", f"[{pear['id']}]", {"id": [None, pear["id"]], "name": [None, "pear"], "quantity": [None, 0]}),
        ("update", f"[{pear['id']}]", {"quantity": [0, 1]}),
        ("update", f"[{pear['id']}]", {"quantity": [1, 5]}),
        ("delete", f"[{apple['id']}]", {"id": [apple["id"], None], "name": ["apple", None], "quantity": [3, None]}),
    ]


async def test_tour_tells_the_whole_story(fastapi_example: ModuleType, example_client: httpx.AsyncClient) -> None:
    from examples.tour import STEPS, Step, run

    steps = await run([Step(s.method, s.path, s.why, s.body) for s in STEPS])
    assert [step.status for step in steps] == [201, 201, 404, 409, 200, 204, 202, 200]
    move_404, rename_409, move = steps[2], steps[3], steps[4]
    assert move_404.collector == {"flushed": ["update Item[1]"], "unflushed": []} and move_404.audited == []
    assert rename_409.collector is None and rename_409.audited == []
    assert move.collector == {"flushed": ["update Item[1]"], "unflushed": ["update Item[2]"]}
    assert [(row["op"], row["identity"]) for row in move.audited] == [("update", "[1]"), ("update", "[2]")]
    assert [row["op"] for row in steps[5].audited] == ["delete"]
    assert [row["diff"] for row in steps[6].audited] == [{"quantity": [7, 17]}]
    assert steps[7].answer == "id,name,quantity\n2,pear,17\n"


def run_tour(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "examples/tour.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def test_make_demo_runs_the_tour_on_sqlite_in_under_a_minute() -> None:
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    started = time.monotonic()
    done = run_tour(env)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 60
    assert 'got        409 {"detail": "That name is taken."}' in done.stdout
    assert "audited    delete Item[1]" in done.stdout
    assert not list(ROOT.glob("*.db")), "the demo leaves no database behind"


if POSTGRES_URL:

    def test_database_url_switches_the_tour_to_postgresql() -> None:
        assert POSTGRES_URL is not None
        sync_url = sa.make_url(POSTGRES_URL).set(drivername="postgresql+psycopg")
        engine = sa.create_engine(sync_url)
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS example_audit_log, example_item")
        engine.dispose()
        url = sync_url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
        done = run_tour({**os.environ, "DATABASE_URL": url})
        assert done.returncode == 0, done.stderr
        assert "got        409" in done.stdout and 'audited    update Item[2] {"quantity": [7, 17]}' in done.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """``make serve``, on a free port (``PORT``) and a fresh SQLite file; yields the base URL."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'example.db'}"}
    command = ["make", "--no-print-directory", "-C", str(ROOT), "serve", "HOST=127.0.0.1", f"PORT={port}"]
    log = (tmp_path / "uvicorn.log").open("wb")
    # A session of its own, so that stopping it stops make's uvicorn too.
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/items", timeout=1)
                break
            except httpx.TransportError:
                started = time.monotonic() < deadline and server.poll() is None
                assert started, (tmp_path / "uvicorn.log").read_text()
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)
        log.close()


def test_fastapi_example_runs_under_uvicorn(served: str) -> None:
    created = httpx.post(f"{served}/items", json={"name": "served"}, timeout=10)
    assert created.status_code == 201
    assert [row["op"] for row in httpx.get(f"{served}/audit", timeout=10).json()] == ["insert"]


@pytest.fixture(scope="session")
def starlette_example(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    path = tmp_path_factory.mktemp("starlette_example") / "notes.db"
    return import_with_database("examples.starlette_sync", f"sqlite:///{path}")


async def test_starlette_sync_example(starlette_example: ModuleType, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", "examples.starlette_sync")
    transport = httpx.ASGITransport(starlette_example.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
        note = (await client.post("/notes", params={"text": "hello"})).json()
        assert (await client.get(f"/notes/{note['id']}")).json() == note
        assert (await client.get("/notes")).json() == [note]
        assert (await client.delete(f"/notes/{note['id']}")).status_code == 204
        assert (await client.delete(f"/notes/{note['id']}")).status_code == 404
        assert (await client.get("/notes")).json() == []
    assert f"note {note['id']} is safely stored" in caplog.text
    assert f"insert Note[{note['id']}]" in caplog.text and f"delete Note[{note['id']}]" in caplog.text
    starlette_example.engine.dispose()
