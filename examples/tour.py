"""The whole story in under a minute: the FastAPI example, driven by a script.

``make demo`` runs it on a fresh SQLite file; set ``DATABASE_URL`` to run it on
PostgreSQL instead (it then writes the example's two tables there). For each
request it prints what the client got, what the request's collector saw
before the COMMIT or ROLLBACK, and which audit rows were committed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

# Make ``examples`` importable when this file is run as a script.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@dataclass
class Step:
    """One request of the tour, and what came of it."""

    method: str
    path: str
    why: str
    body: dict[str, Any] | None = None
    status: int = 0
    answer: Any = None
    collector: dict[str, list[str]] | None = None
    audited: list[dict[str, Any]] = field(default_factory=list)


STEPS = [
    Step("POST", "/items", "create an item: committed, audited", {"name": "apple", "quantity": 3}),
    Step("POST", "/items", "create another", {"name": "pear", "quantity": 5}),
    Step("POST", "/items/1/move/99?quantity=2", "move stock to a missing item: 404, the flushed UPDATE rolls back"),
    Step(
        "PUT",
        "/items/2",
        "rename onto a taken name: COMMIT fails, 409, nothing written",
        {"name": "apple", "quantity": 5},
    ),
    Step("POST", "/items/1/move/2?quantity=2", "move stock between items: both rows updated together"),
    Step("DELETE", "/items/1", "delete: the audit row keeps the old values"),
    Step("POST", "/items/2/restock?quantity=10", "restock in a background task, in its own db.scope()"),
    Step("GET", "/export.csv", "stream a CSV export"),
]


async def run(steps: list[Step]) -> list[Step]:
    """Send each step's request to the example app, in process, and fill in what came of it."""
    from examples.fastapi_app import app, lifespan

    async with lifespan(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
            seen = 0
            for step in steps:
                response = await client.request(step.method, step.path, json=step.body)
                step.status = response.status_code
                is_json = response.content and "json" in response.headers.get("content-type", "")
                step.answer = response.json() if is_json else response.text
                header = response.headers.get("x-collector")
                step.collector = json.loads(header) if header is not None else None
                await asyncio.sleep(0.05)  # let a background task finish
                step.audited = (await client.get("/audit", params={"after": seen})).json()
                seen = max([seen, *(row["id"] for row in step.audited)])
    return steps


def show(step: Step) -> None:
    print(f"{step.method} {step.path}  ({step.why})")
    if step.body is not None:
        print(f"  sent       {json.dumps(step.body)}")
    answer = step.answer if isinstance(step.answer, str) else json.dumps(step.answer)
    print(f"  got        {step.status} {answer.strip()}".replace("\n", "\n             "))
    if step.collector is None:
        print("  collector  (no header: the handler's response was replaced)")
    else:
        flushed, unflushed = (", ".join(step.collector[key]) or "none" for key in ("flushed", "unflushed"))
        print(f"  collector  flushed: {flushed}; for the COMMIT to flush: {unflushed}")
    for row in step.audited:
        print(f"  audited    {row['op']} {row['entity']}{row['identity']} {json.dumps(row['diff'])}")
    if not step.audited:
        print("  audited    nothing")
    print()


def main() -> list[Step]:
    """Run the tour on ``DATABASE_URL``, or on a new SQLite file, and print it."""
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("DATABASE_URL", f"sqlite+aiosqlite:///{Path(tmp) / 'tour.db'}")
        steps = asyncio.run(run([Step(s.method, s.path, s.why, s.body) for s in STEPS]))
    for step in steps:
        show(step)
    return steps


if __name__ == "__main__":
    main()
