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

Errors are ``{"detail": "<what is wrong>", "code": "<machine code>"}`` with a 4xx status:
401 no/unknown token, 403 not an admin, 404 unknown task / no such label, 409 not
leased to you / already submitted / skipped / lease expired, 422 malformed body or a
ranking that is not a permutation of the task's responses. A refused request changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, StrictInt

from .db import Annotator, LabelDB, LabellingError
from .tasks import load_tasks

STATIC_DIR = Path(__file__).parent / "static"

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
    db: LabelDB | None = None,
) -> FastAPI:
    """Build the app on the SQLite file ``db_path`` (created if missing).

    ``tasks_path``: a task JSONL file imported now (idempotent by task id).
    ``annotations_per_task``: how many different annotators label each task.
    ``lease_seconds``: how long a handed-out task stays reserved for its annotator.
    ``app.state.db`` is the :class:`LabelDB`, ``app.state.admin_token`` the admin token
    if this call created the database (else ``None``), ``app.state.imported`` the import counts.
    """
    if annotations_per_task < 1:
        raise ValueError("annotations_per_task must be at least 1")
    if lease_seconds <= 0:
        raise ValueError("lease_seconds must be positive")
    tasks = load_tasks(tasks_path) if tasks_path is not None else None  # a bad file fails before any DB is made
    db = db or LabelDB(db_path)
    imported = db.import_tasks(tasks) if tasks is not None else None
    db.set_meta("annotations_per_task", str(annotations_per_task))
    n = annotations_per_task

    app = FastAPI(title="rlhfkit labelling", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.state.db = db
    app.state.admin_token = db.new_admin_token
    app.state.imported = imported
    app.add_middleware(SecurityHeaders)

    @app.exception_handler(LabellingError)
    async def _labelling_error(request: Request, exc: LabellingError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"detail": exc.message, "code": exc.code}, status_code=exc.status, headers=headers)

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
            raise Unauthorized("unknown token: ask for a new login link")
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
