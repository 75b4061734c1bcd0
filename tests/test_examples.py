"""Every example runs, so none of them can rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from examples.tour import main

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).parent.parent


async def test_tour_commits_the_clean_scope_only(tmp_path: Path) -> None:
    assert await main(tmp_path / "tour.db") == ["committed on a clean exit"]


def test_tour_runs_as_a_script() -> None:
    done = subprocess.run([sys.executable, "examples/tour.py"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "outside a scope:  No database scope is active" in done.stdout
    assert "in the database:  ['committed on a clean exit']" in done.stdout
