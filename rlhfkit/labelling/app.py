"""The labelling web app: a JSON API plus one static page (no build step, nothing from the internet).

Authentication: every API call sends ``Authorization: Bearer <token>``. The login link
is ``http://host:port/#token=<token>``: the token sits in the URL *fragment*, which the
browser never sends to the server (so it is not in access logs); the page moves it to
localStorage and sends it as the bearer header. No cookies, hence no CSRF.

API (positions are the annotator's display positions 0..K-1, as the page shows them)::

    GET  /api/health                       no auth; {"ok": true, "tasks": n}
    GET  /api/me                           {"name", "is_admin"}
    POST /api/next                         lease (or return the held) next task: {"task": {...} | null, "progress"}
    GET  /api/progress                     {"you": {...}, "overall": {...}}
    POST /api/tasks/{id}/submit            body {"ranking": [[pos, ...], ...], "flags": {"pos": ["unsafe"|"nonsense"]}} -> 201
    POST /api/tasks/{id}/skip              -> 200
    GET  /api/labels                       your own labels (task ids, times)
    GET  /api/labels/{id}                  your own label of a task, with the task
    PUT  /api/labels/{id}                  change your own label (same body as submit)
    GET  /api/admin/export                 admin: the export JSONL
    GET  /api/admin/stats                  admin: counts, seconds per task, agreement

Errors are ``{"detail": "<what is wrong>", "code": "<machine code>"}``, always with the
security headers: 401 no/unknown/revoked token, 403 not an admin, 404 unknown task / no such
label, 409 not leased to you / already submitted / skipped / lease expired, 413 a body over
``max_body_bytes`` (refused before it is read in full, authenticated or not), 422 malformed
body or a ranking that is not a permutation of the task's responses, 503 the database is
locked past the busy timeout, read-only or corrupted. A refused request changes nothing.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, StrictInt

from .db import Annotator, DatabaseProblem, LabelDB, LabellingError
from .store import DEFAULT_BUSY_TIMEOUT, describe_sqlite_error
from .tasks import Task, load_tasks

STATIC_DIR = Path(__file__).parent / "static"
MAX_BODY_BYTES = 256 * 1024
"""A label is a few hundred bytes; anything near this is a mistake or an attack."""

log = logging.getLogger("rlhfkit.labelling")

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


class SecurityHeaders:
    """ASGI middleware: a strict CSP and friends on every response (model output is untrusted)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in SECURITY_HEADERS if k not in names
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyLimit:
    """ASGI middleware: answer 413 to a request body over ``max_bytes`` before the app (or auth) sees it.

    A declared ``Content-Length`` over the cap is refused without reading a byte; a chunked
    body is counted as it streams in and refused as soon as it passes the cap, so memory
    never holds more than ``max_bytes`` of it. The server discards the rest of the upload.
    """

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def too_large(self, scope, receive, send):
        body = {"detail": f"request body too large: the limit is {self.max_bytes} bytes", "code": "body_too_large"}
        await JSONResponse(body, status_code=413)(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self.too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self.too_large(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


class Unauthorized(LabellingError):
    status = 401
    code = "unauthorized"


class Forbidden(LabellingError):
    status = 403
    code = "forbidden"


class LabelIn(BaseModel):
    """A label: tie groups of display positions, best first, and optional flags per position."""

    model_config = ConfigDict(extra="forbid")
    ranking: list[list[StrictInt]]
    flags: dict[str, list[str]] = {}


def _loc(loc) -> str:
    parts = [str(p) for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def create_app(
    db_path: str | Path,
    tasks_path: str | Path | None = None,
    *,
    annotations_per_task: int = 1,
    lease_seconds: float = 600,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    max_body_bytes: int = MAX_BODY_BYTES,
    tasks: list[Task] | None = None,
    db: LabelDB | None = None,
) -> FastAPI:
    """Build the app on the SQLite file ``db_path`` (created if missing).

    ``tasks_path``: a task JSONL file imported now (idempotent by task id); or ``tasks``, already read.
    ``annotations_per_task``: how many different annotators label each task.
    ``lease_seconds``: how long a handed-out task stays reserved for its annotator.
    ``busy_timeout``: seconds a request waits for a database locked by another process, then 503.
    ``max_body_bytes``: larger request bodies get 413 before they are read.
    ``app.state.db`` is the :class:`LabelDB`, ``app.state.admin_token`` the admin token
    if this call created the database (else ``None``), ``app.state.imported`` the import counts.
    On shutdown the app checkpoints the WAL and closes the database.
    Raises ``ValueError`` (bad options or task file, before any file is touched) or
    :class:`~.store.DatabaseProblem`.
    """
    if annotations_per_task < 1:
        raise ValueError("annotations_per_task must be at least 1")
    if lease_seconds <= 0:
        raise ValueError("lease_seconds must be positive")
    if busy_timeout < 0 or max_body_bytes < 1:
        raise ValueError("busy_timeout must be >= 0 and max_body_bytes >= 1")
    if tasks is None and tasks_path is not None:
        tasks = load_tasks(tasks_path)  # a bad file fails before any DB is made
    db = db or LabelDB(db_path, busy_timeout=busy_timeout)
    try:
        imported = db.import_tasks(tasks) if tasks is not None else None
        db.set_meta("annotations_per_task", str(annotations_per_task))
    except sqlite3.Error as e:
        db.close()
        raise DatabaseProblem(db.path, e) from None
    n = annotations_per_task

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        db.close(checkpoint=True)  # then a plain copy of the file alone is a full copy

    app = FastAPI(title="rlhfkit labelling", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json", lifespan=lifespan)
    app.state.db = db
    app.state.admin_token = db.new_admin_token
    app.state.imported = imported
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(SecurityHeaders)  # added last, so outermost: its headers go on the 413 too

    @app.exception_handler(LabellingError)
    async def _labelling_error(request: Request, exc: LabellingError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"detail": exc.message, "code": exc.code}, status_code=exc.status, headers=headers)

    @app.exception_handler(sqlite3.Error)
    async def _database_error(request: Request, exc: sqlite3.Error):
        reason = describe_sqlite_error(exc)
        log.warning("labelling database %s: %s", db.path, reason)
        code = "database_busy" if "locked" in reason else "database_unavailable"
        return JSONResponse({"detail": reason, "code": code}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected_error(request: Request, exc: Exception):
        # runs outside the middlewares (Starlette's outermost layer), so it adds the headers itself;
        # Starlette re-raises afterwards and the server log keeps the traceback
        headers = {k.decode(): v.decode() for k, v in SECURITY_HEADERS}
        body = {"detail": "internal error; the server log has the details", "code": "internal_error"}
        return JSONResponse(body, status_code=500, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = [{"field": _loc(e.get("loc", ())), "message": e.get("msg", "")} for e in exc.errors()]
        text = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return JSONResponse({"detail": f"invalid request: {text}", "code": "invalid_request", "errors": errors}, status_code=422)

    def annotator(request: Request) -> Annotator:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing token: send 'Authorization: Bearer <token>' (open your login link)")
        who = db.annotator_by_token(token.strip())
        if who is None:
            raise Unauthorized("unknown or revoked token: ask for a new login link")
        return who

    def admin(who: Annotator = Depends(annotator)) -> Annotator:
        if not who.is_admin:
            raise Forbidden("this needs an admin token")
        return who

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return Response(status_code=204)

    @app.get("/api/health")
    def health():
        return {"ok": True, "tasks": db.count_tasks()}

    @app.get("/api/me")
    def me(who: Annotator = Depends(annotator)):
        return {"name": who.name, "is_admin": who.is_admin}

    @app.post("/api/next")
    def next_task(who: Annotator = Depends(annotator)):
        task = db.next_task(who, annotations_per_task=n, lease_seconds=lease_seconds)
        return {"task": task, "progress": db.progress(who, annotations_per_task=n)}

    @app.get("/api/progress")
    def progress(who: Annotator = Depends(annotator)):
        return db.progress(who, annotations_per_task=n)

    @app.post("/api/tasks/{task_id}/submit", status_code=201)
    def submit(task_id: str, body: LabelIn, who: Annotator = Depends(annotator)):
        return db.submit(who, task_id, body.ranking, body.flags, annotations_per_task=n)

    @app.post("/api/tasks/{task_id}/skip")
    def skip(task_id: str, who: Annotator = Depends(annotator)):
        return db.skip(who, task_id)

    @app.get("/api/labels")
    def my_labels(who: Annotator = Depends(annotator)):
        return {"labels": db.list_labels(who)}

    @app.get("/api/labels/{task_id}")
    def my_label(task_id: str, who: Annotator = Depends(annotator)):
        return db.get_label(who, task_id)

    @app.put("/api/labels/{task_id}")
    def change_label(task_id: str, body: LabelIn, who: Annotator = Depends(annotator)):
        return db.update_label(who, task_id, body.ranking, body.flags)

    @app.get("/api/admin/export")
    def export(who: Annotator = Depends(admin)):
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in db.export_records())
        return Response(
            body,
            media_type="application/x-ndjson",
            headers={"Content-Disposition": 'attachment; filename="rankings.jsonl"'},
        )

    @app.get("/api/admin/stats")
    def stats(who: Annotator = Depends(admin)):
        return db.stats(annotations_per_task=n)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
