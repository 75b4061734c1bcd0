"""The app one uvicorn process serves in the out-of-process half of ``make bench``, chosen by environment variables.

``BENCH_VARIANT=ours-on BENCH_KIND=async BENCH_URL=sqlite+aiosqlite:///bench.db
python -m uvicorn bench.serve:app --factory`` serves one of the variants of
``bench.requests.VARIANTS`` (``bare``, ``pass``, ``hand``, ``same``, ``ours-off``, ``ours-on``, ``ours-commit``).
"""

from __future__ import annotations

import os

from starlette.types import ASGIApp

from bench.requests import VARIANTS


def app() -> ASGIApp:
    """The app named by ``BENCH_VARIANT``, ``BENCH_KIND`` and ``BENCH_URL`` (uvicorn's ``--factory``)."""
    variant, kind = os.environ["BENCH_VARIANT"], os.environ["BENCH_KIND"]
    if variant not in VARIANTS or kind not in ("sync", "async"):
        raise ValueError(f"BENCH_VARIANT must be one of {', '.join(VARIANTS)} and BENCH_KIND sync or async.")
    return VARIANTS[variant](kind, os.environ["BENCH_URL"])
