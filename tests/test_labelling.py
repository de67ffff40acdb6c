"""The labelling server: task files, hand-out rules, auth, bad requests, durability, agreement.

Most tests use FastAPI's TestClient; the durability test runs the real server in a
subprocess on a loopback port and SIGKILLs it under load.
"""

from __future__ import annotations

import json
import random
import re
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from browser_utils import LabelServer, http_client, run_cli
from rlhfkit.labelling.app import create_app
from rlhfkit.labelling.cli import label_app
from rlhfkit.labelling.db import LabelDB
from rlhfkit.labelling.rankings import agreement, display_order, pair_agreement, to_display, validate_ranking
from rlhfkit.labelling.tasks import load_tasks


# ---- helpers ------------------------------------------------------------------------------
def make_task(i: int, k: int = 3, **extra) -> dict:
    task = {
        "id": f"task-{i}",
        "messages": [{"role": "user", "content": f"Question number {i}?"}],
        "responses": [{"text": f"answer {i}.{j}", "model": f"model-{j}", "sampling": {"temperature": 0.7}} for j in range(k)],
    }
    task.update(extra)
    return task


def write_tasks(path: Path, tasks: list[dict]) -> Path:
    path.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    return path


class FakeClock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def client_for(app, token: str | None) -> TestClient:
    c = TestClient(app)
    if token:
        c.headers["Authorization"] = f"Bearer {token}"
    return c


def original_of(task_view: dict, task_file_task: dict) -> list[int]:
    """Display position -> original index, recovered from the (unique) response texts."""
    texts = [r["text"] for r in task_file_task["responses"]]
    return [texts.index(r["text"]) for r in task_view["responses"]]


def canonical(ranking) -> list[list[int]]:
    return [sorted(g) for g in ranking]


def db_snapshot(path: Path) -> dict:
    """Every row of every table (to prove a refused request changed nothing)."""
    conn = sqlite3.connect(path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: sorted(map(tuple, conn.execute(f"SELECT * FROM {t}").fetchall()), key=repr) for t in tables}
    finally:
        conn.close()


@pytest.fixture
def setup(tmp_path):
    """An app with 4 tasks of 3 responses, annotators alice and bob, and the admin."""
    tasks = [make_task(i) for i in range(4)]
    tasks_path = write_tasks(tmp_path / "tasks.jsonl", tasks)
    db_path = tmp_path / "labels.db"
    app = create_app(db_path, tasks_path)
    db: LabelDB = app.state.db
    tokens = {"alice": db.add_annotator("alice"), "bob": db.add_annotator("bob"), "admin": app.state.admin_token}
    yield {"app": app, "db": db, "db_path": db_path, "tasks": {t["id"]: t for t in tasks}, "tokens": tokens, "tmp": tmp_path}
    db.close()


# ---- task files ------------------------------------------------------------------------------
def test_load_tasks_prompt_or_messages(tmp_path):
    path = write_tasks(
        tmp_path / "t.jsonl",
        [make_task(0), {"id": "p", "prompt": "Hi?", "responses": [{"text": "a"}, {"text": "b", "model": "m"}]}],
    )
    tasks = load_tasks(path)
    assert [t.id for t in tasks] == ["task-0", "p"]
    assert tasks[1].messages == [{"role": "user", "content": "Hi?"}]
    assert tasks[1].prompt == "Hi?" and tasks[1].models == [None, "m"] and tasks[1].k == 2
    assert tasks[0].responses == ["answer 0.0", "answer 0.1", "answer 0.2"]


@pytest.mark.parametrize(
    "line, field",
    [
        ({"messages": [{"role": "user", "content": "x"}], "responses": [{"text": "a"}, {"text": "b"}]}, "id"),
        ({"id": "a", "responses": [{"text": "a"}, {"text": "b"}]}, "messages"),
        ({"id": "a", "prompt": "", "responses": [{"text": "a"}, {"text": "b"}]}, "prompt"),
        ({"id": "a", "prompt": "p", "messages": [], "responses": [{"text": "a"}, {"text": "b"}]}, "prompt"),
        ({"id": "a", "messages": [{"role": "bot", "content": "x"}], "responses": [{"text": "a"}, {"text": "b"}]}, "messages[0].role"),
        ({"id": "a", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
          "responses": [{"text": "a"}, {"text": "b"}]}, "messages"),
        ({"id": "a", "prompt": "p", "responses": [{"text": "a"}]}, "responses"),
        ({"id": "a", "prompt": "p", "responses": [{"text": "a"}, {"txt": "b"}]}, "responses[1].text"),
        ({"id": "a", "prompt": "p", "responses": [{"text": "a"}, {"text": "b", "model": 3}]}, "responses[1].model"),
        ({"id": "a", "prompt": "p", "responses": [{"text": "a"}, {"text": "b", "sampling": 1}]}, "responses[1].sampling"),
    ],
)
def test_task_file_errors_name_file_line_and_field(tmp_path, line, field):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(make_task(0)) + "\n\n" + json.dumps(line) + "\n")
    with pytest.raises(ValueError) as e:
        load_tasks(path)
    assert str(e.value).startswith(f"{path}:3: field '{field}': ")


def test_task_file_bad_json_and_duplicate_id(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(make_task(0)) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        load_tasks(path)
    path.write_text(json.dumps(make_task(0)) + "\n" + json.dumps(make_task(0)) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: field 'id': duplicate task id 'task-0' \(first on line 1\)"):
        load_tasks(path)


def test_a_bad_task_file_stops_serve_before_creating_a_database(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "prompt": "p", "responses": [{"text": "only one"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: field 'responses': needs at least 2"):
        create_app(tmp_path / "l.db", bad)
    assert not (tmp_path / "l.db").exists()
    r = run_cli("serve", "--db", str(tmp_path / "l.db"), "--tasks", str(bad), "--port", "1")
    assert r.returncode == 2 and "bad.jsonl:1: field 'responses'" in r.stderr


def test_import_is_idempotent(tmp_path):
    tasks_path = write_tasks(tmp_path / "tasks.jsonl", [make_task(i) for i in range(3)])
    app = create_app(tmp_path / "l.db", tasks_path)
    assert app.state.imported == {"added": 3, "unchanged": 0, "changed": []}
    assert app.state.admin_token
    app.state.db.close()
    # serving the same file again (and a file with one new task) adds nothing twice
    app = create_app(tmp_path / "l.db", tasks_path)
    assert app.state.imported == {"added": 0, "unchanged": 3, "changed": []}
    assert app.state.admin_token is None  # created once, with the database
    app.state.db.close()
    changed = make_task(1)
    changed["responses"][0]["text"] = "something else"
    write_tasks(tasks_path, [make_task(0), changed, make_task(2), make_task(3)])
    app = create_app(tmp_path / "l.db", tasks_path)
    assert app.state.imported == {"added": 1, "unchanged": 2, "changed": ["task-1"]}
    assert app.state.db.count_tasks() == 4
    app.state.db.close()


# ---- rankings -----------------------------------------------------------------------------------
def test_validate_ranking():
    assert validate_ranking([[2], [0, 1]], 3) == [[2], [0, 1]]
    for bad, msg in [
        ([[0], [1]], "has 2 responses but this task has 3"),
        ([[0], [1], [2], [0]], "has 4 responses"),
        ([[0], [1, 1]], r"position\(s\) \[1\] appear more than once"),
        ([[0, 1], [1]], "not a permutation"),
        ([[0], [1], [3]], "out of range"),
        ([[0], [], [1, 2]], "non-empty"),
        ([], "non-empty list"),
        ([[0], [1], [True]], "not an integer"),
    ]:
        with pytest.raises(ValueError, match=msg):
            validate_ranking(bad, 3)


def test_display_order_is_a_stable_shuffle():
    order = display_order("alice", "task-1", 5)
    assert sorted(order) == list(range(5))
    assert display_order("alice", "task-1", 5) == order
    orders = {tuple(display_order(name, "task-1", 5)) for name in ["a", "b", "c", "d", "e", "f", "g", "h"]}
    assert len(orders) > 1  # it really shuffles, per annotator
    assert to_display([[order[3]], [order[0], order[1]], [order[2], order[4]]], order) == [[3], [0, 1], [2, 4]]


# ---- the annotator's loop through the API ------------------------------------------------------------
def test_submit_maps_display_positions_back_to_original_indices(setup):
    alice = client_for(setup["app"], setup["tokens"]["alice"])
    r = alice.post("/api/next")
    assert r.status_code == 200
    view = r.json()["task"]
    src = setup["tasks"][view["id"]]
    assert "model" not in json.dumps(view)  # model names are hidden
    assert sorted(x["text"] for x in view["responses"]) == sorted(x["text"] for x in src["responses"])
    # a reload shows the same task in the same order
    assert alice.post("/api/next").json()["task"]["responses"] == view["responses"]
    orig = original_of(view, src)
    # best: the response shown last; then the other two tied; the one shown first is flagged
    r = alice.post(f"/api/tasks/{view['id']}/submit", json={"ranking": [[2], [0, 1]], "flags": {"0": ["nonsense", "unsafe"]}})
    assert r.status_code == 201, r.text
    records = setup["db"].export_records()
    assert len(records) == 1
    rec = records[0]
    assert rec == {
        "messages": src["messages"],
        "responses": [x["text"] for x in src["responses"]],
        "ranking": [[orig[2]], sorted([orig[0], orig[1]])],
        "flags": {str(orig[0]): ["nonsense", "unsafe"]},
        "annotator": "alice",
        "task_id": view["id"],
        "models": ["model-0", "model-1", "model-2"],
    }
    # the annotator reads back their own label in their own display positions
    mine = alice.get(f"/api/labels/{view['id']}").json()
    assert mine["ranking"] == [[2], [0, 1]] and mine["flags"] == {"0": ["nonsense", "unsafe"]}
    assert [x["task_id"] for x in alice.get("/api/labels").json()["labels"]] == [view["id"]]
    # the next task is a different one
    assert alice.post("/api/next").json()["task"]["id"] != view["id"]


def test_change_own_label_with_put(setup):
    alice = client_for(setup["app"], setup["tokens"]["alice"])
    view = alice.post("/api/next").json()["task"]
    orig = original_of(view, setup["tasks"][view["id"]])
    assert alice.post(f"/api/tasks/{view['id']}/submit", json={"ranking": [[0], [1], [2]]}).status_code == 201
    r = alice.put(f"/api/labels/{view['id']}", json={"ranking": [[1, 2], [0]], "flags": {"2": ["unsafe"]}})
    assert r.status_code == 200, r.text
    [rec] = setup["db"].export_records()
    assert rec["ranking"] == [sorted([orig[1], orig[2]]), [orig[0]]]
    assert rec["flags"] == {str(orig[2]): ["unsafe"]}
    # a PUT is validated like a submit
    r = alice.put(f"/api/labels/{view['id']}", json={"ranking": [[1, 2]]})
    assert r.status_code == 422 and "this task has 3" in r.json()["detail"]
    assert setup["db"].export_records() == [rec]


def test_skip_counts_as_seen_and_is_not_exported(setup):
    alice = client_for(setup["app"], setup["tokens"]["alice"])
    bob = client_for(setup["app"], setup["tokens"]["bob"])
    first = alice.post("/api/next").json()["task"]["id"]
    r = alice.post(f"/api/tasks/{first}/skip")
    assert r.status_code == 200
    seen = {first}
    while (view := alice.post("/api/next").json()["task"]) is not None:
        assert view["id"] not in seen  # never the same task twice, skipped ones included
        seen.add(view["id"])
        assert alice.post(f"/api/tasks/{view['id']}/submit", json={"ranking": [[0], [1], [2]]}).status_code == 201
    assert seen == set(setup["tasks"])
    assert first not in {r["task_id"] for r in setup["db"].export_records()}
    # a skip does not use up the task: bob gets the skipped one
    assert bob.post("/api/next").json()["task"]["id"] == first
    progress = alice.get("/api/progress").json()
    assert progress["you"] == {"labelled": 3, "skipped": 1, "remaining": 0, "tasks": 4}
    assert progress["overall"]["labels"] == 3 and progress["overall"]["wanted"] == 4


# ---- auth -----------------------------------------------------------------------------------------------
def test_auth_annotators_see_and_change_only_their_own_labels(setup):
    app, tokens, db = setup["app"], setup["tokens"], setup["db"]
    alice, bob, admin = (client_for(app, tokens[n]) for n in ["alice", "bob", "admin"])
    anon, forged = client_for(app, None), client_for(app, "not-a-token")

    for c in (anon, forged):
        for method, path in [("POST", "/api/next"), ("GET", "/api/labels"), ("GET", "/api/admin/export"), ("GET", "/api/me")]:
            r = c.request(method, path)
            assert r.status_code == 401, (method, path)
            assert "token" in r.json()["detail"]

    view = alice.post("/api/next").json()["task"]
    tid = view["id"]
    assert alice.post(f"/api/tasks/{tid}/submit", json={"ranking": [[0], [1], [2]]}).status_code == 201
    before = db_snapshot(setup["db_path"])

    # bob cannot read or change alice's label, nor submit to a task leased to alice
    r = bob.get(f"/api/labels/{tid}")
    assert r.status_code == 404 and "you have no submitted label" in r.json()["detail"]
    assert bob.get("/api/labels").json() == {"labels": []}
    r = bob.put(f"/api/labels/{tid}", json={"ranking": [[2], [1], [0]]})
    assert r.status_code == 404
    r = bob.post(f"/api/tasks/{tid}/submit", json={"ranking": [[2], [1], [0]]})
    assert r.status_code == 409 and r.json()["code"] == "not_leased"
    # annotators cannot export or see stats
    for path in ["/api/admin/export", "/api/admin/stats"]:
        r = bob.get(path)
        assert r.status_code == 403 and r.json()["detail"] == "this needs an admin token"
    assert db_snapshot(setup["db_path"]) == before

    # the admin can
    assert admin.get("/api/me").json() == {"name": "admin", "is_admin": True}
    r = admin.get("/api/admin/export")
    assert r.status_code == 200
    [line] = r.text.splitlines()
    assert json.loads(line)["annotator"] == "alice"
    assert admin.get("/api/admin/stats").json()["annotators"][0]["annotator"] == "alice"


def test_bad_requests_get_a_clear_4xx_and_change_nothing(setup):
    alice = client_for(setup["app"], setup["tokens"]["alice"])
    view = alice.post("/api/next").json()["task"]
    tid = view["id"]
    other = next(t for t in setup["tasks"] if t != tid)
    before = db_snapshot(setup["db_path"])

    cases = [
        ("unknown task", f"/api/tasks/nope/submit", {"ranking": [[0], [1], [2]]}, 404, "unknown task 'nope'"),
        ("too few", f"/api/tasks/{tid}/submit", {"ranking": [[0], [1]]}, 422, "has 2 responses but this task has 3"),
        ("too many", f"/api/tasks/{tid}/submit", {"ranking": [[0], [1], [2], [3]]}, 422, "out of range"),
        ("repeat", f"/api/tasks/{tid}/submit", {"ranking": [[0], [1, 1]]}, 422, "not a permutation"),
        ("empty group", f"/api/tasks/{tid}/submit", {"ranking": [[0], [], [1, 2]]}, 422, "non-empty"),
        ("not ints", f"/api/tasks/{tid}/submit", {"ranking": [["a"], [1], [2]]}, 422, "ranking[0][0]"),
        ("no ranking", f"/api/tasks/{tid}/submit", {"flags": {}}, 422, "ranking: Field required"),
        ("extra field", f"/api/tasks/{tid}/submit", {"ranking": [[0], [1], [2]], "x": 1}, 422, "x: Extra inputs"),
        ("unknown flag", f"/api/tasks/{tid}/submit", {"ranking": [[0], [1], [2]], "flags": {"0": ["rude"]}}, 422, "unknown flag"),
        ("flag out of range", f"/api/tasks/{tid}/submit", {"ranking": [[0], [1], [2]], "flags": {"7": ["unsafe"]}}, 422, "out of range"),
        ("not leased", f"/api/tasks/{other}/submit", {"ranking": [[0], [1], [2]]}, 409, "is not leased to you"),
        ("skip not leased", f"/api/tasks/{other}/skip", None, 409, "is not leased to you"),
        ("skip unknown", f"/api/tasks/nope/skip", None, 404, "unknown task"),
        ("put unknown", None, None, 404, "unknown task"),
    ]
    for name, path, body, status, message in cases:
        if path is None:
            r = alice.put("/api/labels/nope", json={"ranking": [[0], [1], [2]]})
        else:
            r = alice.post(path, json=body) if body is not None else alice.post(path)
        assert r.status_code == status, (name, r.text)
        assert message in r.json()["detail"], (name, r.json())
        assert db_snapshot(setup["db_path"]) == before, name

    # a good submit, then the duplicate is a 409 that changes nothing
    assert alice.post(f"/api/tasks/{tid}/submit", json={"ranking": [[1], [0], [2]]}).status_code == 201
    after_submit = db_snapshot(setup["db_path"])
    r = alice.post(f"/api/tasks/{tid}/submit", json={"ranking": [[2], [0], [1]]})
    assert r.status_code == 409 and r.json()["code"] == "already_submitted"
    assert f"PUT /api/labels/{tid}" in r.json()["detail"]
    r = alice.post(f"/api/tasks/{tid}/skip")
    assert r.status_code == 409 and "already submitted" in r.json()["detail"]
    assert db_snapshot(setup["db_path"]) == after_submit


# ---- leases and distribution --------------------------------------------------------------------------
def test_lease_expiry_returns_the_task_to_the_pool(tmp_path):
    clock = FakeClock()
    tasks_path = write_tasks(tmp_path / "t.jsonl", [make_task(i) for i in range(2)])
    db = LabelDB(tmp_path / "l.db", clock=clock)
    app = create_app(tmp_path / "l.db", tasks_path, lease_seconds=60, db=db)
    a, b, c = (client_for(app, db.add_annotator(n)) for n in ["a", "b", "c"])

    assert a.post("/api/next").json()["task"]["id"] == "task-0"
    assert b.post("/api/next").json()["task"]["id"] == "task-1"  # task-0 is leased to a
    assert c.post("/api/next").json()["task"] is None  # everything is leased
    clock.advance(59)
    assert c.post("/api/next").json()["task"] is None
    clock.advance(2)  # both leases have expired
    assert c.post("/api/next").json()["task"]["id"] == "task-0"
    # a comes back too late: the task went to c
    r = a.post("/api/tasks/task-0/submit", json={"ranking": [[0], [1], [2]]})
    assert r.status_code == 409 and r.json()["code"] == "lease_expired"
    # b's lease expired but nobody took task-1: a late submit is still accepted
    assert b.post("/api/tasks/task-1/submit", json={"ranking": [[0], [1], [2]]}).status_code == 201
    assert c.post("/api/tasks/task-0/submit", json={"ranking": [[0], [1], [2]]}).status_code == 201
    assert a.post("/api/next").json()["task"] is None  # both tasks are done
    assert {(r["task_id"], r["annotator"]) for r in db.export_records()} == {("task-0", "c"), ("task-1", "b")}
    db.close()


def test_lease_expiry_in_real_time(tmp_path):
    tasks_path = write_tasks(tmp_path / "t.jsonl", [make_task(0)])
    app = create_app(tmp_path / "l.db", tasks_path, lease_seconds=0.3)
    db = app.state.db
    a, b = (client_for(app, db.add_annotator(n)) for n in ["a", "b"])
    assert a.post("/api/next").json()["task"]["id"] == "task-0"
    assert b.post("/api/next").json()["task"] is None
    time.sleep(0.4)
    assert b.post("/api/next").json()["task"]["id"] == "task-0"
    db.close()


def test_annotations_per_task_distribution(tmp_path):
    n_tasks, per_task, names = 7, 3, ["a", "b", "c", "d", "e"]
    tasks_path = write_tasks(tmp_path / "t.jsonl", [make_task(i, k=2 + i % 3) for i in range(n_tasks)])
    app = create_app(tmp_path / "l.db", tasks_path, annotations_per_task=per_task)
    db = app.state.db
    clients = {n: client_for(app, db.add_annotator(n)) for n in names}
    got: dict[str, list[str]] = {n: [] for n in names}
    rng = random.Random(0)
    active = list(names)
    skipped = set()
    while active:
        name = rng.choice(active)
        view = clients[name].post("/api/next").json()["task"]
        if view is None:
            active.remove(name)
            continue
        got[name].append(view["id"])
        if name == "e" and len(got[name]) == 1:
            assert clients[name].post(f"/api/tasks/{view['id']}/skip").status_code == 200
            skipped.add((view["id"], name))
            continue
        ranking = [[p] for p in range(view["k"])]
        assert clients[name].post(f"/api/tasks/{view['id']}/submit", json={"ranking": ranking}).status_code == 201
    for name, ids in got.items():
        assert len(ids) == len(set(ids)), f"{name} got a task twice"
    labels = [(r["task_id"], r["annotator"]) for r in db.export_records()]
    assert len(labels) == len(set(labels)) == n_tasks * per_task
    per = {}
    for tid, who in labels:
        per.setdefault(tid, set()).add(who)
    assert all(len(v) == per_task for v in per.values()) and len(per) == n_tasks
    assert not skipped & set(labels)
    progress = clients["a"].get("/api/progress").json()["overall"]
    assert progress == {"labels": 21, "wanted": 21, "tasks": 7, "complete_tasks": 7, "annotations_per_task": 3}
    db.close()


# ---- agreement and stats -----------------------------------------------------------------------------------
HAND_LABELS = [
    # task-1: a and b agree on 2 of 3 pairs; a and c on none; b and c on one (1 vs 2)
    ("task-1", "a", [[0], [1], [2]]),
    ("task-1", "b", [[0], [2], [1]]),
    ("task-1", "c", [[2], [1], [0]]),
    # task-2: a ties 0 and 1, b does not: they agree on 2 of 3 pairs
    ("task-2", "a", [[0, 1], [2]]),
    ("task-2", "b", [[0], [1], [2]]),
]


def test_agreement_hand_example():
    assert pair_agreement([[0], [1], [2]], [[0], [2], [1]]) == (2, 3)
    assert pair_agreement([[0, 1], [2]], [[1, 0], [2]]) == (3, 3)  # a tie is a tie, whatever the order inside it
    assert pair_agreement([[0, 1], [2]], [[0], [1], [2]]) == (2, 3)
    ag = agreement(HAND_LABELS)
    assert ag["pairs"] == [
        {"a": "a", "b": "b", "tasks": 2, "pairs": 6, "agreement": pytest.approx(4 / 6)},
        {"a": "a", "b": "c", "tasks": 1, "pairs": 3, "agreement": 0.0},
        {"a": "b", "b": "c", "tasks": 1, "pairs": 3, "agreement": pytest.approx(1 / 3)},
    ]
    assert ag["overall"] == pytest.approx(5 / 12)
    assert ag["shared_tasks"] == 2
    assert agreement([("t", "a", [[0], [1]])]) == {"pairs": [], "overall": None, "shared_tasks": 0}


def test_stats_from_the_database_and_the_cli(tmp_path):
    clock = FakeClock()
    tasks_path = write_tasks(tmp_path / "t.jsonl", [make_task(1), make_task(2), make_task(3)])
    db_path = tmp_path / "l.db"
    db = LabelDB(db_path, clock=clock)
    app = create_app(db_path, tasks_path, annotations_per_task=3, db=db)
    tokens = {n: db.add_annotator(n) for n in "abc"}
    seconds = {"a": [10, 30], "b": [20, 40], "c": [5]}
    for task_id, name, ranking in HAND_LABELS:
        c = client_for(app, tokens[name])
        view = c.post("/api/next").json()["task"]
        assert view["id"] == task_id
        clock.advance(seconds[name].pop(0))
        order = display_order(name, task_id, 3)
        r = c.post(f"/api/tasks/{task_id}/submit", json={"ranking": to_display(ranking, order)})
        assert r.status_code == 201, r.text
    # c skips task-2 and leaves task-3 leased
    c = client_for(app, tokens["c"])
    assert c.post("/api/next").json()["task"]["id"] == "task-2"
    assert c.post("/api/tasks/task-2/skip").status_code == 200
    assert c.post("/api/next").json()["task"]["id"] == "task-3"

    s = db.stats()
    by_name = {row["annotator"]: row for row in s["annotators"]}
    assert set(by_name) == {"a", "b", "c"}  # the admin never labelled
    assert by_name["a"] == {"annotator": "a", "labelled": 2, "skipped": 0, "leased": 0, "median_seconds": 20, "mean_seconds": 20}
    assert by_name["b"]["median_seconds"] == 30 and by_name["b"]["mean_seconds"] == 30
    assert by_name["c"] == {"annotator": "c", "labelled": 1, "skipped": 1, "leased": 1, "median_seconds": 5, "mean_seconds": 5}
    assert s["agreement"]["overall"] == pytest.approx(5 / 12)
    assert s["tasks"] == {"total": 3, "with_labels": 2, "complete": 1, "labels": 5, "annotations_per_task": 3, "wanted": 9}
    db.close()

    runner = CliRunner()
    r = runner.invoke(label_app, ["stats", "--db", str(db_path)])
    assert r.exit_code == 0, r.output
    assert "a ~ b: 0.667 over 6 pairs in 2 shared task(s)" in r.output
    assert "overall: 0.417" in r.output
    assert "labels: 5 of 9 wanted (3 per task)" in r.output
    r = runner.invoke(label_app, ["stats", "--db", str(db_path), "--json"])
    assert json.loads(r.output)["agreement"]["overall"] == pytest.approx(5 / 12)


def test_cli_add_annotator_and_export(tmp_path):
    runner = CliRunner()
    db_path = tmp_path / "l.db"
    r = runner.invoke(label_app, ["add-annotator", "zoe", "--db", str(db_path), "--url", "http://127.0.0.1:9999"])
    assert r.exit_code == 0, r.output
    assert "admin token" in r.output  # a new database: the admin token is printed once
    token = r.output.split("token: ")[-1].split()[0]
    assert f"login link: http://127.0.0.1:9999/#token={token}" in r.output
    r = runner.invoke(label_app, ["add-annotator", "zoe", "--db", str(db_path)])
    assert r.exit_code == 1 and "already exists" in r.output
    r = runner.invoke(label_app, ["add-annotator", "root", "--db", str(db_path), "--admin"])
    assert r.exit_code == 0 and "admin token" not in r.output
    admin_token = r.output.split("token: ")[-1].split()[0]

    tasks = [make_task(0), {"id": "p", "prompt": "Hello?", "responses": [{"text": "x"}, {"text": "y"}]}]
    app = create_app(db_path, write_tasks(tmp_path / "t.jsonl", tasks))
    zoe = client_for(app, token)
    assert client_for(app, admin_token).get("/api/admin/stats").status_code == 200
    v = zoe.post("/api/next").json()["task"]
    assert zoe.post(f"/api/tasks/{v['id']}/submit", json={"ranking": [[0, 1, 2]]}).status_code == 201
    v = zoe.post("/api/next").json()["task"]
    assert v["id"] == "p"
    order = original_of(v, tasks[1])
    assert zoe.post("/api/tasks/p/submit", json={"ranking": [[1], [0]]}).status_code == 201
    app.state.db.close()

    out = tmp_path / "out" / "rankings.jsonl"
    r = runner.invoke(label_app, ["export", "--db", str(db_path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["task_id"] for x in lines] == ["task-0", "p"]
    assert lines[0]["ranking"] == [[0, 1, 2]]
    assert lines[1] == {
        "messages": [{"role": "user", "content": "Hello?"}],
        "responses": ["x", "y"],
        "ranking": [[order[1]], [order[0]]],
        "flags": {},
        "annotator": "zoe",
        "task_id": "p",
        "models": [None, None],
    }
    r = runner.invoke(label_app, ["export", "--db", str(tmp_path / "missing.db"), "--out", str(out)])
    assert r.exit_code == 1 and "no labelling database" in r.output


def test_page_and_headers_are_strict(setup):
    c = client_for(setup["app"], None)
    r = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in r.text and "http://" not in r.text and "https://" not in r.text  # no inline JS, no CDN
    js = c.get("/static/app.js")
    assert js.status_code == 200 and "://" not in js.text  # nothing from elsewhere
    # model text only ever goes in through textContent
    assert not re.search(r"\.(innerHTML|outerHTML)\s*=|insertAdjacentHTML|document\.write|eval\(", js.text)
    assert "content-security-policy" in c.get("/api/health").headers


# ---- durability under load: SIGKILL the real server part-way --------------------------------------------------
N_ANNOTATORS, N_SUBMITS = 20, 25


def test_no_acknowledged_label_is_lost_when_the_server_is_killed(tmp_path):
    rng = random.Random(1)
    tasks = [make_task(i, k=3 + i % 2) for i in range(N_SUBMITS)]
    by_id = {t["id"]: t for t in tasks}
    tasks_path = write_tasks(tmp_path / "tasks.jsonl", tasks)
    db_path = tmp_path / "labels.db"
    db = LabelDB(db_path)
    conn = db._conn()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    tokens = {f"ann{i:02d}": db.add_annotator(f"ann{i:02d}") for i in range(N_ANNOTATORS)}
    db.close()

    server = LabelServer(db_path, tasks_path, annotations_per_task=N_ANNOTATORS)
    acked: dict[tuple[str, str], list[list[int]]] = {}  # got a 201
    retried_dupes: dict[tuple[str, str], list[list[int]]] = {}  # answer lost, the retry got the 409 duplicate
    sent: dict[tuple[str, str], list[list[int]]] = {}
    errors: list[str] = []
    lock = threading.Lock()
    transport_errors = [0]
    deadline = time.monotonic() + 90

    def annotator(name: str, token: str, seed: int) -> None:
        r_ = random.Random(seed)
        done = 0
        pending = None  # (task_id, display ranking, expected original ranking, retried?)
        with http_client(server.url, token, timeout=10.0) as c:
            while done < N_SUBMITS:
                if time.monotonic() > deadline:
                    errors.append(f"{name}: out of time after {done} submissions")
                    return
                try:
                    if pending is None:
                        r = c.post("/api/next")
                        if r.status_code != 200 or r.json()["task"] is None:
                            errors.append(f"{name}: /api/next gave {r.status_code} {r.text[:200]}")
                            return
                        view = r.json()["task"]
                        orig = original_of(view, by_id[view["id"]])
                        positions = list(range(view["k"]))
                        r_.shuffle(positions)
                        ranking, i = [], 0
                        while i < len(positions):
                            size = 2 if r_.random() < 0.3 and i + 1 < len(positions) else 1
                            ranking.append(positions[i : i + size])
                            i += size
                        pending = [view["id"], ranking, canonical([[orig[p] for p in g] for g in ranking]), False]
                        with lock:
                            sent[(view["id"], name)] = pending[2]
                    task_id, ranking, expected, retried = pending
                    r = c.post(f"/api/tasks/{task_id}/submit", json={"ranking": ranking})
                    if r.status_code == 201:
                        with lock:
                            acked[(task_id, name)] = expected
                    elif r.status_code == 409 and r.json().get("code") == "already_submitted" and retried:
                        with lock:
                            retried_dupes[(task_id, name)] = expected
                    else:
                        errors.append(f"{name}: submit {task_id} (retried={retried}) gave {r.status_code} {r.text[:200]}")
                        return
                    pending = None
                    done += 1
                except httpx.TransportError:
                    # connection refused / reset / timed out: the server is down; retry the same step
                    with lock:
                        transport_errors[0] += 1
                    if pending is not None:
                        pending[3] = True
                    time.sleep(0.05 + r_.random() * 0.1)

    server.start()
    try:
        threads = [
            threading.Thread(target=annotator, args=(name, token, i), daemon=True)
            for i, (name, token) in enumerate(tokens.items())
        ]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        total = N_ANNOTATORS * N_SUBMITS
        kills = []
        for fraction in (0.25, 0.5, 0.75):
            while len(acked) < total * fraction and time.monotonic() < deadline and any(t.is_alive() for t in threads):
                time.sleep(0.005)
            kills.append(len(acked))
            server.kill()  # SIGKILL mid-load: in-flight requests die with it
            time.sleep(0.2)
            server.start()  # same DB, same port: carries on
        for t in threads:
            t.join(timeout=max(1.0, deadline - time.monotonic()))
        elapsed = time.monotonic() - t0
        assert not any(t.is_alive() for t in threads), "clients did not finish"
        assert not errors, errors[:5]
        assert 0 < kills[0] and kills[-1] < total, kills  # the kills really happened mid-load

        # every acknowledged submission is in the export exactly once, with the ranking that was sent
        r = run_cli("export", "--db", str(db_path), "--out", str(tmp_path / "export.jsonl"))
        assert r.returncode == 0, r.stderr
        records = [json.loads(line) for line in (tmp_path / "export.jsonl").read_text().splitlines()]
        keys = [(rec["task_id"], rec["annotator"]) for rec in records]
        assert len(keys) == len(set(keys)), "a label was stored twice"
        exported = {(rec["task_id"], rec["annotator"]): rec["ranking"] for rec in records}
        for key, expected in acked.items():
            assert key in exported, f"acknowledged label {key} lost"
            assert exported[key] == expected, key
        for key, expected in retried_dupes.items():
            assert exported[key] == expected, key
        assert set(exported) == set(acked) | set(retried_dupes)
        assert len(exported) == total
        # a killed request whose answer never came was either never stored or stored exactly once
        assert set(exported) <= set(sent)
        print(
            f"\n{total} labels in {elapsed:.1f} s, SIGKILLed after {kills} acks, "
            f"{transport_errors[0]} transport errors retried, {len(retried_dupes)} retries answered 409 duplicate"
        )
    finally:
        server.stop()
