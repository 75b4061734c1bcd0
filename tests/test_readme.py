"""Every code block in the README runs: Python blocks are executed, shell commands are checked.

Python blocks run in order, each in a fresh namespace unless an
``<!-- example: NAME -->`` comment before it names a namespace that earlier
blocks share. They run in a temporary directory, where their SQLite files go.
The block named ``pytest`` is a test module: pytest runs it, in random order.
"""

from __future__ import annotations

import re
import shlex
from importlib.metadata import metadata
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import uvicorn
from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import POSTGRES_URL

ROOT = Path(__file__).parent.parent
BLOCK = re.compile(r"(?:<!-- example: (?P<name>[\w-]+) -->\n)?```(?P<language>\w+)\n(?P<code>.*?)```", re.DOTALL)


def blocks(language: str) -> list[tuple[str | None, int, str]]:
    """(namespace name, line number, code) of each README block in *language*, in order."""
    readme = (ROOT / "README.md").read_text()
    return [
        (match["name"], readme.count("\n", 0, match.start("code")) + 1, match["code"])
        for match in BLOCK.finditer(readme)
        if match["language"] == language
    ]


def test_the_readme_has_the_blocks_this_test_expects() -> None:
    assert len(blocks("python")) >= 10
    assert {name for name, _, _ in blocks("python")} >= {
        "fastapi",
        "starlette",
        "several",
        "pytest",
        "pytest-async",
        "tenants",
        "stats",
        "otel",
        "replicas",
        "retry",
        None,
    }


@pytest.mark.parametrize("runs", [2])
def test_python_blocks_run_and_run_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runs: int) -> None:
    # Twice in the same directory: a reader runs them again, on the SQLite files the first run left.
    monkeypatch.chdir(tmp_path)
    for _ in range(runs):
        namespaces: dict[str, dict[str, Any]] = {}
        for name, line, code in blocks("python"):
            if name in ("pytest", "pytest-async", "tenants", "otel"):
                continue  # the tests below run them, as pytest would, or the example they come from
            namespace = namespaces.setdefault(name, {}) if name else {}
            namespace.setdefault("__name__", f"readme_{name or line}")
            # dont_inherit: the blocks run without this module's ``from __future__ import annotations``.
            exec(compile(code, f"README.md:{line}", "exec", dont_inherit=True), namespace)
        for namespace in namespaces.values():
            for value in namespace.values():
                if isinstance(value, Engine):
                    value.dispose()
                elif isinstance(value, AsyncEngine):
                    assert value.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_the_test_module_passes_and_leaves_the_database_empty(pytester: pytest.Pytester) -> None:
    ((_, _, code),) = [block for block in blocks("python") if block[0] == "pytest"]
    pytester.makepyfile(test_items=code)
    result = pytester.runpytest_subprocess("-p", "random_order", "--random-order")
    result.assert_outcomes(passed=2)
    engine = create_engine(f"sqlite:///{pytester.path / 'items.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM item").scalar() == 0
    engine.dispose()


def test_the_async_test_module_passes_on_postgresql(pytester: pytest.Pytester) -> None:
    # On PostgreSQL with asyncpg when the suite has one (CI always does), else on a SQLite file.
    if POSTGRES_URL is not None:
        url = sa.make_url(POSTGRES_URL).set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
        inspection = sa.make_url(url).set(drivername="postgresql+psycopg")
    else:
        url = f"sqlite+aiosqlite:///{pytester.path / 'products.db'}"
        inspection = sa.make_url(url).set(drivername="sqlite+pysqlite")
    ((_, _, code),) = [block for block in blocks("python") if block[0] == "pytest-async"]
    pytester.makepyfile(test_products=code)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DATABASE_URL", url)
        # Twice, in random order: the second run must not trip over the first one's pooled connections.
        for _ in range(2):
            result = pytester.runpytest_subprocess("-p", "random_order", "--random-order", "-p", "anyio")
            result.assert_outcomes(passed=2)
    engine = create_engine(inspection)
    with engine.begin() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM product").scalar() == 0
        conn.exec_driver_sql("DROP TABLE product")
    engine.dispose()


def test_the_tenants_excerpt_is_the_example_s_own_code() -> None:
    # tests/test_examples.py runs examples/tenants.py on PostgreSQL: the excerpt must be what runs.
    ((_, _, code),) = [block for block in blocks("python") if block[0] == "tenants"]
    assert code in (ROOT / "examples" / "tenants.py").read_text()


def test_shell_commands_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    extras = metadata("starlette-alchemy").get_all("Provides-Extra") or []
    commands = [line.split("#")[0].strip() for _, _, code in blocks("sh") for line in code.splitlines()]
    assert commands
    for command in filter(None, commands):
        program, *args = shlex.split(command)
        if program == "make":
            assert all(re.search(rf"^{target}:", makefile, re.MULTILINE) for target in args), command
        elif program == "pip":
            (requirement,) = [arg for arg in args if arg.startswith("starlette-alchemy")]
            assert set(re.findall(r"\w+", requirement.split("[")[1])) <= set(extras), command
        else:
            assert program == "uvicorn", command
            uvicorn.main.make_context("uvicorn", args)  # raises on an unknown option


def test_the_opentelemetry_block_records_the_span_it_asserts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry import trace
    from opentelemetry.util._once import Once

    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "readme_otel"}
    try:
        for name, line, code in blocks("python"):
            if name in ("stats", "otel"):  # the otel block uses the stats blocks' app
                exec(compile(code, f"README.md:{line}", "exec", dont_inherit=True), namespace)
    finally:
        # The block sets the process's tracer provider, which OpenTelemetry lets happen once: undo it.
        trace._TRACER_PROVIDER_SET_ONCE = Once()
        trace._TRACER_PROVIDER = None
        namespace["engine"].dispose()
