"""`rlhfkit chat --model A [--model B]`: type a prompt, watch one or two models answer side by side.

A local page (FastAPI + uvicorn, one static HTML/JS page, no build step, nothing from the internet).
Each prompt is a fresh single-turn conversation (optionally with a system prompt), sent to every model
at once; each model's response streams into its own column as it is generated.

API::

    GET  /api/health        {"ok": true, "models": n}
    GET  /api/models        {"models": [{"id", "name", "path"}], "defaults": {"max_new_tokens", "temperature"},
                             "max_new_tokens_limit"}
    POST /api/chat          body {"model": id, "prompt": str, "system": str|null, "max_new_tokens": int|null,
                             "temperature": float|null}; the answer streams as NDJSON (one JSON object a line,
                             chunked): {"start": true, "model": id}, then {"text": "..."} pieces, then
                             {"done": true, "tokens", "has_eos", "seconds", "tokens_per_s"} or {"error": "..."}.

Streaming: `model.generate` runs in a thread and feeds a transformers `TextIteratorStreamer`; the response
reads from it. When the page goes away (or presses Stop) the request is cancelled and a stopping criterion
ends the generation at the next token. Generation on one model is serialised by a lock; different models
generate concurrently.

Safety: model output is untrusted. The page puts every text into the DOM with textContent, the CSP forbids
inline script (same headers as the labelling app), POST bodies must be JSON (no cross-site form posts),
and on loopback only Host headers naming loopback are accepted (no DNS rebinding). There is no
authentication: keep it on 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from .config import ChatConfig, GenerationSettings
from .labelling.app import SecurityHeaders
from .tokens import encode_prompt

log = logging.getLogger("rlhfkit.chat")

STATIC_DIR = Path(__file__).parent / "chat_static"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


@dataclass
class ChatModel:
    name: str
    path: str
    model: Any
    tokenizer: Any
    lock: threading.Lock = field(default_factory=threading.Lock)


class ChatIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictInt
    prompt: str = Field(min_length=1, max_length=50_000)
    system: str | None = Field(None, max_length=20_000)
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=5)


def load_chat_models(names: list[str], precision: str = "bf16") -> list[ChatModel]:
    from .generate import load_for_inference, model_path_of

    models, seen = [], {}
    for name in names:
        model, tokenizer = load_for_inference(name, precision)
        label = short_name(name)
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{name} #{seen[label]}"
        models.append(ChatModel(label, model_path_of(name), model, tokenizer))
        log.info("loaded %s", model_path_of(name))
    return models


def short_name(name: str) -> str:
    """A column title: the last two parts of a path ('runs/demo/ppo' -> 'demo/ppo'), a hub id or 'default' as is."""
    path = Path(name)
    if not path.exists():
        return name
    parts = path.resolve().parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else str(path)


class _StopWhenSet:
    """A stopping criterion: stop every row once `event` is set (the client went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _line(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


def stream_response(m: ChatModel, index: int, req: ChatIn, gen: GenerationSettings, limit: int):
    """An async iterator of NDJSON lines: the response of model `m` to `req`, piece by piece."""
    import anyio
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    tok = m.tokenizer
    messages = [{"role": "user", "content": req.prompt}]
    system = req.system if req.system else gen.system_prompt
    ids = encode_prompt(tok, messages, gen.max_prompt_length, system)
    max_new = min(req.max_new_tokens or gen.max_new_tokens, limit)
    temperature = gen.temperature if req.temperature is None else req.temperature
    greedy = temperature == 0
    device = next(m.model.parameters()).device
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=600)
    stop = threading.Event()
    result: dict[str, Any] = {}

    def work() -> None:
        finished = False
        try:
            with m.lock:
                if stop.is_set():
                    return
                t0 = time.perf_counter()
                out = m.model.generate(
                    input_ids=torch.tensor([ids], device=device),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                    max_new_tokens=max_new,
                    do_sample=not greedy,
                    temperature=None if greedy else temperature,
                    top_p=None if greedy else gen.top_p,
                    top_k=gen.top_k if gen.top_k and not greedy else None,
                    eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]),
                )
                finished = True
                new = out[0, len(ids) :].tolist()
                has_eos = tok.eos_token_id in new
                n = new.index(tok.eos_token_id) + 1 if has_eos else len([t for t in new if t != tok.pad_token_id])
                seconds = time.perf_counter() - t0
                result.update(tokens=n, has_eos=has_eos, seconds=seconds, tokens_per_s=n / max(seconds, 1e-9))
        except Exception as e:  # shown in the page's column
            log.exception("generation failed")
            result["error"] = f"{type(e).__name__}: {e}"
        finally:
            if not finished:
                streamer.end()  # release the reader

    def next_piece(it):
        try:
            return next(it)
        except StopIteration:
            return None

    async def body():
        thread = threading.Thread(target=work, name=f"chat-generate-{index}", daemon=True)
        thread.start()
        try:
            yield _line({"start": True, "model": index, "max_new_tokens": max_new, "temperature": temperature})
            it = iter(streamer)
            while True:
                piece = await anyio.to_thread.run_sync(next_piece, it)
                if piece is None:
                    break
                if piece:
                    yield _line({"text": piece})
            await anyio.to_thread.run_sync(thread.join)
            yield _line({"error": result["error"]} if "error" in result else {"done": True, **result})
        finally:
            stop.set()  # the client went away, or we are done: stop generating

    return body()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def create_chat_app(
    models: list[ChatModel],
    generation: GenerationSettings | None = None,
    max_new_tokens_limit: int = 1024,
    allowed_hosts: tuple[str, ...] | list[str] | None = LOOPBACK_HOSTS,
) -> FastAPI:
    """The chat app over already loaded models. `allowed_hosts`: Host header names accepted (None: any)."""
    gen = generation or GenerationSettings()
    app = FastAPI(title="rlhfkit chat", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.models = models
    app.add_middleware(SecurityHeaders)
    if allowed_hosts is not None:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        text = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg', '')}" for e in exc.errors())
        return JSONResponse({"detail": f"invalid request: {text}"}, status_code=422)

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return Response(status_code=204)

    @app.get("/api/health")
    def health():
        return {"ok": True, "models": len(models)}

    @app.get("/api/models")
    def list_models():
        return {
            "models": [{"id": i, "name": m.name, "path": m.path} for i, m in enumerate(models)],
            "defaults": {"max_new_tokens": min(gen.max_new_tokens, max_new_tokens_limit), "temperature": gen.temperature},
            "max_new_tokens_limit": max_new_tokens_limit,
        }

    @app.post("/api/chat")
    async def chat(request: Request):
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return JSONResponse({"detail": "send the request as application/json"}, status_code=415)
        try:
            req = ChatIn.model_validate_json(await request.body())
        except ValueError as e:
            errors = getattr(e, "errors", lambda: [])()
            text = "; ".join(f"{'.'.join(str(p) for p in x.get('loc', ()))}: {x.get('msg', '')}" for x in errors) or str(e)
            return JSONResponse({"detail": f"invalid request: {text}"}, status_code=422)
        if not 0 <= req.model < len(models):
            return JSONResponse({"detail": f"no model {req.model}: there are {len(models)}"}, status_code=404)
        body = stream_response(models[req.model], req.model, req, gen, max_new_tokens_limit)
        return StreamingResponse(body, media_type="application/x-ndjson", headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def run_chat(cfg: ChatConfig) -> None:
    """Load the models and serve the page until interrupted."""
    import uvicorn

    models = load_chat_models(cfg.models, cfg.precision)
    loopback = _is_loopback(cfg.host)
    app = create_chat_app(models, cfg.generation, cfg.max_new_tokens_limit, LOOPBACK_HOSTS if loopback else None)
    shown = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    if not loopback:
        log.warning("listening beyond loopback: anyone who can reach %s can use the models (no authentication)", shown)
    print(f"chat with {', '.join(m.name for m in models)} on http://{shown}:{cfg.port}/", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)


__all__ = ["ChatModel", "create_chat_app", "load_chat_models", "run_chat", "stream_response"]
