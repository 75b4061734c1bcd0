"""Plain Starlette with synchronous endpoints and a ``ScopedSession``.

Starlette runs ``def`` endpoints in a worker thread, in a copy of the request's
context; the registry's per-request holder still reaches them, and the
middleware commits, rolls back and closes in worker threads of its own, never
on the event loop. Run it with
``uvicorn examples.starlette_sync:app`` (SQLite in ``notes.db``, or ``DATABASE_URL``).
"""

from __future__ import annotations

import logging
import os

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from starlette_alchemy import Changes, DBSessionMiddleware, ScopedSession

logger = logging.getLogger("examples.starlette_sync")


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "example_note"

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str]


engine = sa.create_engine(os.environ.get("DATABASE_URL", "sqlite:///notes.db"))
db = ScopedSession(engine)
Base.metadata.create_all(engine)


@db.after_commit
def log_changes(changes: Changes) -> None:
    """Runs after every COMMIT that wrote something; a failure here is logged, never a 500."""
    for change in changes:
        logger.info("%s %s%s", change.op, change.entity.__name__, list(change.identity or []))


def _note(note: Note) -> dict[str, object]:
    return {"id": note.id, "text": note.text}


def list_notes(request: Request) -> Response:
    return JSONResponse([_note(note) for note in db.scalars(sa.select(Note).order_by(Note.id))])


def add_note(request: Request) -> Response:
    note = Note(text=request.query_params["text"])
    db.add(note)
    db.flush()  # for the id; the middleware commits before the 201 goes out
    db.on_commit(lambda: logger.info("note %s is safely stored", note.id))
    return JSONResponse(_note(note), status_code=201)


def get_note(request: Request) -> Response:
    note = db.get(Note, int(request.path_params["id"]))
    if note is None:
        raise HTTPException(404)
    return JSONResponse(_note(note))


def delete_note(request: Request) -> Response:
    note = db.get(Note, int(request.path_params["id"]))
    if note is None:
        raise HTTPException(404)
    db.delete(note)
    return Response(status_code=204)


app = Starlette(
    routes=[
        Route("/notes", list_notes),
        Route("/notes", add_note, methods=["POST"]),
        Route("/notes/{id:int}", get_note),
        Route("/notes/{id:int}", delete_note, methods=["DELETE"]),
    ],
    middleware=[Middleware(DBSessionMiddleware, db=db)],
)
