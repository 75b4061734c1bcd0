"""Every example runs, so none of them can rot."""

from __future__ import annotations

import importlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType

import anyio
import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import POSTGRES_URL
from tests.support import serve

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
    ann, bob = {"x-user": "ann"}, {"x-user": "bob"}
    apple = (await client.post("/items", json={"name": "apple", "quantity": 3}, headers=ann)).json()
    pear = (await client.post("/items", json={"name": "pear"}, headers=bob)).json()
    assert (await client.post("/items", json={"name": "apple"})).status_code == 409  # conflict at flush
    assert (await client.get(f"/items/{apple['id']}")).json() == apple
    assert (await client.get("/items/999")).status_code == 404
    assert (await client.post(f"/items/{apple['id']}/move/999?quantity=2")).status_code == 404
    assert (await client.put(f"/items/{pear['id']}", json={"name": "apple"})).status_code == 409  # at COMMIT
    assert (await client.put(f"/items/{pear['id']}", json={"name": "pear", "quantity": 1}, headers=ann)).is_success
    assert (await client.post(f"/items/{pear['id']}/restock?quantity=4", headers=bob)).status_code == 202
    assert (await client.delete(f"/items/{apple['id']}")).status_code == 204
    assert (await client.get("/items")).json() == [{"id": pear["id"], "name": "pear", "quantity": 5}]
    assert (await client.get("/export.csv")).text == f"id,name,quantity\n{pear['id']},pear,5\n"
    audit = [(row["op"], row["identity"], row["diff"], row["user"]) for row in (await client.get("/audit")).json()]
    a, p = apple["id"], pear["id"]
    assert audit == [
        ("insert", f"[{a}]", {"id": [None, a], "name": [None, "apple"], "quantity": [None, 3]}, "ann"),
        ("insert", f"[{p}]", {"id": [None, p], "name": [None, "pear"], "quantity": [None, 0]}, "bob"),
        ("update", f"[{p}]", {"quantity": [0, 1]}, "ann"),
        ("update", f"[{p}]", {"quantity": [1, 5]}, "bob"),  # the restock, in the background, for bob
        ("delete", f"[{a}]", {"id": [a, None], "name": ["apple", None], "quantity": [3, None]}, None),
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


TENANTS = ["acme", "globex", "initech", "umbrella"]


def load_fresh(module: str, **environment: str) -> ModuleType:
    """Import a fresh copy of an example module that reads its settings from the environment at import."""
    sys.modules.pop(module, None)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        try:
            return importlib.import_module(module)
        finally:
            sys.modules.pop(module, None)


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"] if POSTGRES_URL else [])
async def test_tenants_example_isolates_tenants_under_concurrency(driver: str) -> None:
    assert POSTGRES_URL is not None
    url = sa.make_url(POSTGRES_URL).set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)
    tenants = load_fresh("examples.tenants", DATABASE_URL=url, TENANT_ROLE=f"tenant_app_{secrets.token_hex(4)}")
    inspection = sa.create_engine(sa.make_url(url).set(drivername="postgresql+psycopg"))
    try:
        async with tenants.lifespan(tenants.app), serve(tenants.app) as base:
            pool = tenants.engine.sync_engine.pool
            assert pool.size() == 5
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                answers = await tenant_requests(client)
            assert pool.checkedout() == 0
            await refused_by_the_database(tenants)
        written = {(n, tenant): response for (n, tenant, verb), response in answers.items() if verb == "POST"}
        listed = {(n, tenant): response for (n, tenant, verb), response in answers.items() if verb == "GET"}
        for (n, tenant), response in written.items():
            if tenant is None:
                assert response.status_code == 400, response.text
            else:
                assert response.status_code == 201, response.text
                assert response.json()["tenant"] == tenant and response.json()["body"] == f"{tenant}-{n}"
        for (_, tenant), response in listed.items():
            assert response.status_code == 200, response.text
            notes = response.json()
            assert {note["tenant"] for note in notes} <= ({tenant} if tenant else set()), notes
            if tenant is None:
                assert notes == []
        # Every note went in under its own tenant; what each tenant listed last is a superset of what it saw.
        with inspection.connect() as connection:
            rows = connection.execute(sa.select(tenants.Note.tenant, tenants.Note.body)).all()
        expected = {(tenant, f"{tenant}-{n}") for (n, tenant) in written if tenant is not None}
        assert set(rows) == expected and len(rows) == len(expected)
    finally:
        with inspection.begin() as connection:
            tenants.teardown(connection)
        inspection.dispose()


async def tenant_requests(client: httpx.AsyncClient) -> dict[tuple[int, str | None, str], httpx.Response]:
    """200 concurrent requests, alternating 4 tenants, writing and listing; every tenth has no tenant."""
    answers: dict[tuple[int, str | None, str], httpx.Response] = {}

    async def one(n: int) -> None:
        tenant = None if n % 10 == 9 else TENANTS[n % len(TENANTS)]
        headers = {"x-tenant": tenant} if tenant else {}
        verb = "POST" if n % 2 == 0 else "GET"
        body = {"json": {"body": f"{tenant}-{n}"}} if verb == "POST" else {}
        answers[n, tenant, verb] = await client.request(verb, "/notes", headers=headers, **body)  # type: ignore[arg-type]

    async with anyio.create_task_group() as tg:
        for n in range(200):
            tg.start_soon(one, n)
    return answers


async def refused_by_the_database(tenants: ModuleType) -> None:
    """Even code that skips the app's checks cannot write another tenant's row, nor read one."""
    with pytest.raises(sa.exc.DBAPIError, match="new row violates row-level security policy"):
        async with tenants.db.scope():
            tenants.db.info["tenant"] = "acme"
            tenants.db.add(tenants.Note(tenant="globex", body="forged"))
    async with tenants.db.scope():
        tenants.db.info["tenant"] = "acme"
        bodies = await tenants.db.scalars(sa.select(tenants.Note.tenant).distinct())
        assert list(bodies) == ["acme"]


async def test_replicas_example_reads_the_replica_except_for_a_client_that_wrote(tmp_path: Path) -> None:
    urls = {name: f"sqlite+aiosqlite:///{tmp_path / name}.db" for name in ("primary", "replica")}
    replicas = load_fresh("examples.replicas", DATABASE_URL=urls["primary"], REPLICA_URLS=urls["replica"])
    async with replicas.lifespan(replicas.app), serve(replicas.app) as base:
        async with httpx.AsyncClient(base_url=base) as writer, httpx.AsyncClient(base_url=base) as other:
            response = await writer.post("/notes", params={"body": "hello"})
            assert response.status_code == 201 and response.json() == ["hello"]
            # Nothing replicates between the two files: only reads from the primary see the note.
            assert (await writer.get("/notes")).json() == ["hello"]
            assert (await other.get("/notes")).json() == []
            assert (await other.post("/search", params={"text": "hel"})).json() == []
            assert (await writer.post("/search", params={"text": "hel"})).json() == ["hello"]
        for engine in (replicas.primary, *replicas.replicas):
            assert engine.sync_engine.pool.checkedout() == 0
