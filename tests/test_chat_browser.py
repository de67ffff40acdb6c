"""`rlhfkit chat`: two tiny models side by side, streamed, in a real (headless Debian) Chromium.

The server runs in this process (uvicorn in a thread, 127.0.0.1 only); the page is driven through
Playwright. A screenshot goes to test-artifacts/chat.png.
"""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest

from browser_utils import ARTIFACTS, free_port, http_client, launch_chromium
from conftest import build_tiny_model
from rlhfkit.chat import create_chat_app, load_chat_models
from rlhfkit.config import GenerationSettings

XSS = '<img src=x onerror="window.__pwned=1">'


@pytest.fixture(scope="module")
def chat_url(tiny_model_dir, tmp_path_factory):
    import uvicorn

    second = tmp_path_factory.mktemp("tiny-llama-b")
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, second / f.name)
    from transformers import AutoTokenizer

    build_tiny_model(second, vocab_size=len(AutoTokenizer.from_pretrained(tiny_model_dir)), seed=1)
    models = load_chat_models([str(tiny_model_dir), str(second)], "fp32")
    app = create_chat_app(models, GenerationSettings(max_new_tokens=40, temperature=1.0, top_p=1.0), max_new_tokens_limit=64)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "chat server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def _stream(client, body) -> list[dict]:
    with client.stream("POST", "/api/chat", json=body) as res:
        assert res.status_code == 200, res.read()
        assert res.headers["content-type"].startswith("application/x-ndjson")
        assert "default-src 'none'" in res.headers["content-security-policy"]
        return [json.loads(line) for line in res.iter_lines() if line.strip()]


def test_api_streams_ndjson_pieces(chat_url):
    with http_client(chat_url, timeout=60) as client:
        models = client.get("/api/models").json()
        assert [m["id"] for m in models["models"]] == [0, 1] and models["max_new_tokens_limit"] == 64
        lines = _stream(client, {"model": 1, "prompt": "hello there", "max_new_tokens": 500, "temperature": 1.0})
        assert lines[0]["start"] and lines[0]["max_new_tokens"] == 64  # capped at the limit
        pieces = [l["text"] for l in lines if "text" in l]
        done = lines[-1]
        assert done["done"] and 1 <= done["tokens"] <= 64 and isinstance(done["has_eos"], bool)
        assert len(pieces) >= 2 and "".join(pieces).strip()  # streamed in several pieces
        greedy = [_stream(client, {"model": 0, "prompt": "the answer", "max_new_tokens": 8, "temperature": 0}) for _ in range(2)]
        texts = ["".join(l.get("text", "") for l in g) for g in greedy]
        assert texts[0] == texts[1]  # temperature 0 is greedy


def test_api_refuses_bad_requests(chat_url):
    with http_client(chat_url) as client:
        assert client.post("/api/chat", content='{"model": 0, "prompt": "x"}', headers={"content-type": "text/plain"}).status_code == 415
        assert client.post("/api/chat", json={"model": 0, "prompt": ""}).status_code == 422
        assert client.post("/api/chat", json={"model": 0, "prompt": "x", "extra": 1}).status_code == 422
        assert client.post("/api/chat", json={"model": 7, "prompt": "x"}).status_code == 404
        assert client.get("/api/health", headers={"host": "evil.example"}).status_code == 400  # DNS rebinding


@pytest.mark.browser
def test_chat_page_two_models_side_by_side(chat_url):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.set_default_timeout(60_000)
            problems = []
            page.on("console", lambda m: m.type == "error" and problems.append(m.text))
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(chat_url + "/")
            page.wait_for_selector("body[data-ready='1']")
            assert "vs" in page.inner_text("#models-info")
            prompt = f"Tell me about apples and the river. {XSS}"
            page.fill("#prompt", prompt)
            page.click("#send")
            page.wait_for_function("() => document.querySelectorAll(\".column[data-state='done']\").length === 2")
            texts = page.eval_on_selector_all(".column .text", "els => els.map(e => e.textContent)")
            assert len(texts) == 2 and all(t.strip() for t in texts), texts
            metas = page.eval_on_selector_all(".column .meta", "els => els.map(e => e.textContent)")
            assert all("tokens" in m for m in metas), metas
            assert page.inner_text(".exchange .prompt") == prompt  # shown as text
            assert page.evaluate("() => window.__pwned") is None
            # a second prompt, sent with the keyboard
            page.fill("#prompt", "And what about bananas?")
            page.press("#prompt", "Control+Enter")
            page.wait_for_function("() => document.querySelectorAll('.exchange').length === 2")
            page.wait_for_function("() => document.querySelectorAll(\".exchange:last-child .column[data-state='done'], .exchange:last-child .column[data-state='error']\").length === 2")
            assert not page.is_disabled("#send")
            assert not problems, problems
            page.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)
        finally:
            browser.close()
