"""The labelling page in a real (headless Debian) Chromium against a real server on loopback.

Ranks one task with the mouse and one with the keyboard, checks the export holds exactly
those rankings in original response indices, saves a screenshot to
``test-artifacts/labelling_page.png``, checks that model output cannot run script, and that
another annotator's login link asks before it switches the account.
"""

from __future__ import annotations

import json
import sqlite3

import pytest

from browser_utils import ARTIFACTS, LabelServer, launch_chromium, run_cli
from rlhfkit.labelling.db import LabelDB

pytestmark = pytest.mark.browser

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")

XSS_SCRIPT = "<script>window.__pwned=1</script>"
XSS_IMG = '<img src=x onerror="window.__pwned=2">'

TASKS = [
    {
        "id": "task-mouse",
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "Name a good way to keep bread fresh."},
        ],
        "responses": [
            {"text": "Keep it in a bread box at room temperature; freeze what you will not eat within two days.", "model": "m-a"},
            {"text": "Put it in the fridge.", "model": "m-b"},
            {"text": "Bread bread bread bread.", "model": "m-c"},
            {"text": "Wrap it in a clean cotton towel\nand store it somewhere cool and dry.", "model": "m-d"},
        ],
    },
    {
        "id": "task-keys",
        "prompt": "What is 7 times 8?",
        "responses": [
            {"text": "56", "model": "m-a"},
            {"text": "7 x 8 = 56.", "model": "m-b"},
            {"text": "54", "model": "m-c"},
        ],
    },
    {
        "id": "task-skip",
        "prompt": "Write a haiku about rain.",
        "responses": [{"text": "Rain on the tin roof", "model": "m-a"}, {"text": "It is raining.", "model": "m-b"}],
    },
]

GROUPS_JS = """() => [...document.querySelectorAll('#ranking > li.group')]
    .map(li => [...li.querySelectorAll('.card')].map(c => Number(c.dataset.pos)))"""
TEXTS_JS = """() => Object.fromEntries([...document.querySelectorAll('#ranking .card')]
    .map(c => [c.dataset.pos, c.querySelector('.text').textContent]))"""


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = launch_chromium(p)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(15_000)
    pg.problems = []  # console errors (a CSP violation would show up here)
    pg.on("console", lambda m: m.type == "error" and pg.problems.append(m.text))
    pg.on("pageerror", lambda e: pg.problems.append(str(e)))
    yield pg
    context.close()


def serve(tmp_path, tasks, names=("ann",)):
    tasks_path = tmp_path / "tasks.jsonl"
    tasks_path.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    db_path = tmp_path / "labels.db"
    db = LabelDB(db_path)
    tokens = {n: db.add_annotator(n) for n in names}
    db.close()
    return LabelServer(db_path, tasks_path).start(), tokens, db_path


def wait_for_task(page, task_id):
    page.wait_for_function("id => document.getElementById('task-id').textContent.includes(id)", arg=task_id)


def original_indices(page, task) -> dict[int, int]:
    """Display position -> original index, from the response texts the page shows."""
    texts = [r["text"] for r in task["responses"]]
    return {int(pos): texts.index(text) for pos, text in page.evaluate(TEXTS_JS).items()}


def card(page, pos):
    return page.locator(f'#ranking .card[data-pos="{pos}"]')


def drag_to_top(page, pos):
    """Press on the card's header, move above the first group, release: a real pointer drag."""
    head = card(page, pos).locator(".label")
    box = head.bounding_box()
    first = page.locator("#ranking > li.group").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2, first["y"] + 40, steps=8)
    page.mouse.move(box["x"] + box["width"] / 2, first["y"] + 5, steps=4)
    page.mouse.up()


def export(tmp_path, db_path) -> list[dict]:
    out = tmp_path / "export.jsonl"
    r = run_cli("export", "--db", str(db_path), "--out", str(out))
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_rank_with_mouse_and_keyboard_then_export(tmp_path, page):
    server, tokens, db_path = serve(tmp_path, TASKS)
    try:
        page.goto(f"{server.url}/#token={tokens['ann']}")
        wait_for_task(page, "task-mouse")
        assert "token" not in page.url  # the login link's token left the address bar
        assert page.locator("#who").inner_text() == "ann"
        assert "m-a" not in page.content()  # model names are hidden
        shown = page.evaluate(TEXTS_JS)
        page.reload()  # same task, same order after a reload (token kept in localStorage)
        wait_for_task(page, "task-mouse")
        assert page.evaluate(TEXTS_JS) == shown
        assert page.evaluate(GROUPS_JS) == [[0], [1], [2], [3]]

        # ---- task 1 with the mouse: drag, then the card buttons
        orig = original_indices(page, TASKS[0])
        drag_to_top(page, 3)
        assert page.evaluate(GROUPS_JS) == [[3], [0], [1], [2]]
        card(page, 0).get_by_role("button", name="↓").click()
        assert page.evaluate(GROUPS_JS) == [[3], [1], [0], [2]]
        card(page, 2).get_by_role("button", name="tie ↑").click()
        assert page.evaluate(GROUPS_JS) == [[3], [1], [0, 2]]
        card(page, 1).get_by_role("button", name="unsafe").click()
        assert card(page, 1).locator(".badge").inner_text() == "unsafe"
        page.get_by_role("button", name="Submit ranking (Enter)").click()
        expected_mouse = ([[orig[3]], [orig[1]], sorted([orig[0], orig[2]])], {str(orig[1]): ["unsafe"]})

        # ---- task 2 with the keyboard only
        wait_for_task(page, "task-keys")
        assert "Saved task task-mouse" in page.locator("#status").inner_text()
        orig = original_indices(page, TASKS[1])
        for key in ["3", "ArrowUp", "ArrowUp"]:  # select response 3, move it to the top
            page.keyboard.press(key)
        assert page.evaluate(GROUPS_JS) == [[2], [0], [1]]
        for key in ["2", "u"]:  # response 2 up one
            page.keyboard.press(key)
        assert page.evaluate(GROUPS_JS) == [[2], [1], [0]]
        page.keyboard.press("t")  # tie it with the one above
        assert page.evaluate(GROUPS_JS) == [[2, 1], [0]]
        for key in ["1", "f", "n"]:  # response 1: flag unsafe and nonsense
            page.keyboard.press(key)
        assert card(page, 0).locator(".badge").all_inner_texts() == ["unsafe", "nonsense"]
        assert "1 / 3 done" in page.locator("#progress").inner_text()

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "labelling_page.png"), full_page=True)

        page.keyboard.press("Enter")
        expected_keys = ([sorted([orig[2], orig[1]]), [orig[0]]], {str(orig[0]): ["nonsense", "unsafe"]})

        # ---- task 3: skipped with "s"
        wait_for_task(page, "task-skip")
        page.keyboard.press("s")
        page.locator("#done").wait_for(state="visible")
        progress = page.locator("#progress").inner_text()
        assert "You: 3 / 3 done (2 labelled, 1 skipped)" in progress
        assert "Everyone: 2 / 3 labels (67%)" in progress
        assert not page.problems, page.problems

        records = export(tmp_path, db_path)
        got = {r["task_id"]: (r["ranking"], r["flags"]) for r in records}
        assert got == {"task-mouse": expected_mouse, "task-keys": expected_keys}  # task-skip is not exported
        assert [r["annotator"] for r in records] == ["ann", "ann"]
        assert records[0]["responses"] == [r["text"] for r in TASKS[0]["responses"]]
        assert records[0]["models"] == ["m-a", "m-b", "m-c", "m-d"]
        assert records[1]["messages"] == [{"role": "user", "content": "What is 7 times 8?"}]
    finally:
        server.stop()


def test_change_last_label_in_the_page(tmp_path, page):
    server, tokens, db_path = serve(tmp_path, TASKS[1:2])
    try:
        page.goto(f"{server.url}/")
        page.locator("#login").wait_for(state="visible")  # no token yet
        page.goto(f"{server.url}/#token={tokens['ann']}")  # the login link in the same tab: only the fragment changes
        wait_for_task(page, "task-keys")
        orig = original_indices(page, TASKS[1])
        page.keyboard.press("Enter")  # the order as shown
        page.locator("#done").wait_for(state="visible")
        assert export(tmp_path, db_path)[0]["ranking"] == [[orig[0]], [orig[1]], [orig[2]]]

        page.locator("#edit-last-done").click()  # reopens the label as it was saved; Enter saves with PUT
        page.locator("#editing").wait_for(state="visible")
        assert page.evaluate(GROUPS_JS) == [[0], [1], [2]]
        for key in ["3", "u", "u", "f"]:
            page.keyboard.press(key)
        page.keyboard.press("Enter")
        page.locator("#done").wait_for(state="visible")
        assert "Changed your label of task task-keys" in page.locator("#status").inner_text()
        [record] = export(tmp_path, db_path)
        assert record["ranking"] == [[orig[2]], [orig[0]], [orig[1]]]
        assert record["flags"] == {str(orig[2]): ["unsafe"]}
        assert not page.problems, page.problems
    finally:
        server.stop()


def test_model_output_is_shown_as_text_not_run(tmp_path, page):
    tasks = [
        {
            "id": "xss",
            "prompt": f"Repeat after me: {XSS_SCRIPT}",
            "responses": [
                {"text": f"Sure: {XSS_SCRIPT}", "model": "evil"},
                {"text": f"Here is a picture {XSS_IMG}", "model": "evil"},
                {"text": '"><svg onload="window.__pwned=3">', "model": "evil"},
            ],
        }
    ]
    server, tokens, db_path = serve(tmp_path, tasks)
    try:
        page.goto(f"{server.url}/#token={tokens['ann']}")
        wait_for_task(page, "xss")
        page.wait_for_timeout(300)  # give an injected onerror/onload a chance to fire
        assert page.get_by_text(XSS_SCRIPT, exact=False).first.is_visible()
        assert page.locator("#ranking .text", has_text=f"Sure: {XSS_SCRIPT}").is_visible()
        assert page.locator("#ranking .text", has_text=f"Here is a picture {XSS_IMG}").is_visible()
        assert page.locator("#conversation .text", has_text=f"Repeat after me: {XSS_SCRIPT}").is_visible()
        assert page.evaluate("typeof window.__pwned") == "undefined"
        assert page.locator("main img, main svg, main script").count() == 0
        assert not page.problems, page.problems
    finally:
        server.stop()


def tasks_held(db_path, name) -> int:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return conn.execute(
            "SELECT COUNT(*) FROM assignments a JOIN annotators n ON n.id = a.annotator_id WHERE n.name = ?", (name,)
        ).fetchone()[0]
    finally:
        conn.close()


def test_another_annotators_login_link_asks_before_switching(tmp_path, page):
    server, tokens, db_path = serve(tmp_path, TASKS, names=("ann", "bea"))
    try:
        page.goto(f"{server.url}/#token={tokens['ann']}")
        wait_for_task(page, "task-mouse")

        # bea's link in the same tab (only the fragment changes): a question, no lease for bea
        page.goto(f"{server.url}/#token={tokens['bea']}")
        page.locator("#switch").wait_for(state="visible")
        text = page.locator("#switch-text").inner_text()
        assert "signed in as ann" in text and "for bea" in text, text
        assert "token" not in page.url and page.locator("#work").is_hidden()
        assert tasks_held(db_path, "bea") == 0
        page.get_by_role("button", name="Stay signed in as ann").click()
        wait_for_task(page, "task-mouse")
        assert page.locator("#who").inner_text() == "ann"

        # bea's link in a new tab of the same browser (ann is signed in there too, through localStorage)
        tab = page.context.new_page()
        tab.goto(f"{server.url}/#token={tokens['bea']}")
        tab.locator("#switch").wait_for(state="visible")
        assert tasks_held(db_path, "bea") == 0
        tab.get_by_role("button", name="Switch to bea").click()
        wait_for_task(tab, "task-keys")  # ann holds task-mouse
        assert tab.locator("#who").inner_text() == "bea"
        assert tasks_held(db_path, "bea") == 1

        # the signed-in annotator's own link again: no question
        tab.goto(f"{server.url}/?again#token={tokens['bea']}")
        wait_for_task(tab, "task-keys")
        assert tab.locator("#switch").is_hidden() and tab.locator("#who").inner_text() == "bea"
        assert not page.problems, page.problems
    finally:
        server.stop()
