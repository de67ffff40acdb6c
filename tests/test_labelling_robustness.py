"""The labelling server against clumsy commands and unlucky moments (issue 17).

No label is lost through a mistyped ``--out``, a file copy after shutdown or a backup under
load; request bodies are bounded; tokens can be revoked; database trouble is a clear 503 or
one line at the CLI; a failed ``serve`` changes nothing; the files are 0600.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from browser_utils import LabelServer, free_port, http_client, run_cli
from rlhfkit.labelling.app import create_app
from rlhfkit.labelling.cli import label_app
from rlhfkit.labelling.db import LabelDB
from rlhfkit.labelling.rankings import RankingError, validate_flags
from rlhfkit.labelling.tasks import load_tasks
from test_labelling import client_for, db_snapshot, make_task, write_tasks

runner = CliRunner()


def submitted(db_path: Path) -> set[tuple[str, str]]:
    """(task id, annotator) of every submitted label, read straight from the file."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            """SELECT t.id, n.name FROM assignments a JOIN tasks t ON t.seq = a.task_seq
               JOIN annotators n ON n.id = a.annotator_id WHERE a.status = 'submitted'"""
        ).fetchall()
    finally:
        conn.close()
    return set(rows)


def make_db(tmp_path: Path, n_tasks: int = 4, names=("alice", "bob"), per_task: int = 1):
    tasks_path = write_tasks(tmp_path / "tasks.jsonl", [make_task(i) for i in range(n_tasks)])
    db_path = tmp_path / "labels.sqlite"
    app = create_app(db_path, tasks_path, annotations_per_task=per_task)
    tokens = {n: app.state.db.add_annotator(n) for n in names}
    return app, db_path, tokens


def label_one(client) -> str:
    view = client.post("/api/next").json()["task"]
    r = client.post(f"/api/tasks/{view['id']}/submit", json={"ranking": [[p] for p in range(view["k"])]})
    assert r.status_code == 201, r.text
    return view["id"]


def one_error_line(text: str, path: Path) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert str(path) in lines[0] and "Traceback" not in text, text
    return lines[0]


# ---- 1. export never overwrites the database ------------------------------------------------------
def test_export_onto_the_database_or_any_sqlite_file_is_refused(tmp_path):
    app, db_path, tokens = make_db(tmp_path)
    label_one(client_for(app, tokens["alice"]))
    app.state.db.close()
    before = db_snapshot(db_path)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE keep (x)").connection.close()
    other_bytes = other.read_bytes()
    link = tmp_path / "link.jsonl"
    link.symlink_to(db_path)
    for out in [db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm"), other, link, tmp_path / "." / db_path.name]:
        r = runner.invoke(label_app, ["export", "--db", str(db_path), "--out", str(out)])
        assert r.exit_code == 1, (out, r.output)
        assert r.output.startswith("error: ") and "refusing" in r.output, r.output
    assert db_snapshot(db_path) == before
    assert other.read_bytes() == other_bytes
    # an ordinary output still works (and an old JSONL export is replaced)
    out = tmp_path / "rankings.jsonl"
    out.write_text("old\n")
    r = runner.invoke(label_app, ["export", "--db", str(db_path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert len(out.read_text().splitlines()) == 1 and json.loads(out.read_text())["annotator"] == "alice"


# ---- 2. shutdown checkpoint and the online backup ---------------------------------------------------
def test_after_sigterm_a_plain_copy_of_the_file_holds_every_label(tmp_path):
    app, db_path, tokens = make_db(tmp_path, n_tasks=6)
    app.state.db.close()
    server = LabelServer(db_path, tmp_path / "tasks.jsonl").start()
    try:
        acked = set()
        for name in ["alice", "bob"]:
            with http_client(server.url, tokens[name]) as c:
                for _ in range(3):
                    acked.add((label_one(c), name))
    finally:
        server.stop()  # SIGTERM: uvicorn shuts down, the app checkpoints the WAL
    assert server.proc.returncode is not None
    copy = tmp_path / "copy" / "labels.sqlite"
    copy.parent.mkdir()
    shutil.copyfile(db_path, copy)  # the main file alone, without -wal
    assert len(acked) == 6 and submitted(copy) == acked


def test_backup_during_a_running_load_holds_every_label_acknowledged_before_it(tmp_path):
    names = [f"ann{i}" for i in range(4)]
    app, db_path, tokens = make_db(tmp_path, n_tasks=30, names=names, per_task=4)
    app.state.db.close()
    server = LabelServer(db_path, tmp_path / "tasks.jsonl", annotations_per_task=4).start()
    acked: set[tuple[str, str]] = set()
    lock, stop, errors = threading.Lock(), threading.Event(), []

    def annotate(name):
        with http_client(server.url, tokens[name]) as c:
            while not stop.is_set():
                r = c.post("/api/next")
                view = r.json()["task"]
                if view is None:
                    return
                r = c.post(f"/api/tasks/{view['id']}/submit", json={"ranking": [[p] for p in range(view["k"])]})
                if r.status_code != 201:
                    errors.append(r.text)
                    return
                with lock:
                    acked.add((view["id"], name))

    threads = [threading.Thread(target=annotate, args=(n,), daemon=True) for n in names]
    try:
        for t in threads:
            t.start()
        while len(acked) < 20 and all(t.is_alive() for t in threads):
            time.sleep(0.01)
        with lock:
            before = set(acked)
        out = tmp_path / "backups" / "backup.sqlite"
        r = run_cli("backup", "--db", str(db_path), "--out", str(out))
        assert r.returncode == 0, r.stderr
        with lock:
            during = len(acked) - len(before)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    finally:
        server.stop()
    assert not errors, errors[:3]
    assert len(before) >= 20 and during > 0, during  # the load really ran while the backup did
    in_backup = submitted(out)
    assert before <= in_backup  # every label acknowledged before the backup started
    assert in_backup <= acked | submitted(db_path)  # and nothing invented
    conn = sqlite3.connect(out)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one self-contained file
    conn.close()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    # a backup never overwrites: not the database, not an earlier backup
    for target in [db_path, out]:
        r = runner.invoke(label_app, ["backup", "--db", str(db_path), "--out", str(target)])
        assert r.exit_code == 1 and r.output.startswith("error: "), r.output
    assert submitted(out) == in_backup


# ---- 3. bounded request bodies ------------------------------------------------------------------------
def test_a_5mb_body_gets_413_before_it_is_read(tmp_path):
    app, db_path, tokens = make_db(tmp_path)
    app.state.db.close()
    server = LabelServer(db_path, tmp_path / "tasks.jsonl").start()
    try:
        proc = psutil.Process(server.proc.pid)
        big = json.dumps({"ranking": [[i] for i in range(700_000)]}).encode()  # about 5 MB of JSON
        assert len(big) > 5_000_000
        with http_client(server.url, timeout=30.0) as anon, http_client(server.url, tokens["alice"], timeout=30.0) as alice:
            view = alice.post("/api/next").json()["task"]  # warm up every code path once
            url = f"/api/tasks/{view['id']}/submit"
            assert alice.post(url, content=b"{}", headers={"content-type": "application/json"}).status_code == 422
            rss_before = proc.memory_info().rss
            answers = []
            for client in (anon, alice):
                answers.append(client.post(url, content=big, headers={"content-type": "application/json"}))
                # chunked: no Content-Length, counted as it streams in
                chunks = (big[i : i + 65536] for i in range(0, len(big), 65536))
                answers.append(client.post(url, content=chunks, headers={"content-type": "application/json"}))
            grown = (proc.memory_info().rss - rss_before) / 2**20
            print(f"\nRSS grew by {grown:.2f} MiB over four 5 MB requests")
            assert grown < 4, f"the server's RSS grew by {grown:.1f} MiB"
            for r in answers:
                assert r.status_code == 413, r.text[:200]
                assert r.json()["code"] == "body_too_large"
                assert "default-src 'none'" in r.headers["content-security-policy"]
            # the label itself still goes through
            r = alice.post(url, json={"ranking": [[p] for p in range(view["k"])]})
            assert r.status_code == 201, r.text
    finally:
        server.stop()


# ---- 4. task ids that a URL cannot carry ---------------------------------------------------------------
@pytest.mark.parametrize("bad_id", ["a/b", "..", ".", "../x", "a b", "a%2Fb", "a?b", "a#b", "é", ".hidden", "x\\y"])
def test_an_unsafe_task_id_is_refused_at_load_with_its_line(tmp_path, bad_id):
    path = write_tasks(tmp_path / "t.jsonl", [make_task(0), make_task(1, id=bad_id)])
    with pytest.raises(ValueError) as e:
        load_tasks(path)
    assert str(e.value).startswith(f"{path}:2: field 'id': ")
    assert not (tmp_path / "l.db").exists()


def test_a_stored_unsafe_task_id_is_never_handed_out(tmp_path):
    """A database filled by an older rlhfkit may hold such an id: it must not block the annotator."""
    app, db_path, tokens = make_db(tmp_path, n_tasks=1)
    conn = sqlite3.connect(db_path)
    conn.execute(
        "INSERT INTO tasks (id, messages, responses, models, sampling, k, created_at) "
        "SELECT 'a/b', messages, responses, models, sampling, k, created_at FROM tasks"
    )
    conn.execute("UPDATE tasks SET seq = -1 WHERE id = 'a/b'")  # first in hand-out order
    conn.commit()
    conn.close()
    alice = client_for(app, tokens["alice"])
    assert label_one(alice) == "task-0"
    assert alice.post("/api/next").json()["task"] is None
    assert alice.get("/api/progress").json()["you"]["remaining"] == 0
    assert app.state.db.unservable_task_ids() == ["a/b"]


# ---- 5. a task file with bad encoding ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad_line, message",
    [
        (b'{"id": "x", "prompt": "caf\xe9", "responses": [{"text": "a"}, {"text": "b"}]}', "not valid UTF-8"),
        (b'{"id": "x", "prompt": "\\ud800", "responses": [{"text": "a"}, {"text": "b"}]}', "lone surrogate"),
        (b'{"id": "x", "prompt": "p", "responses": [{"text": "\\udfff"}, {"text": "b"}]}', "lone surrogate"),
    ],
    ids=["latin-1-byte", "surrogate-in-prompt", "surrogate-in-response"],
)
def test_a_bad_encoding_task_file_names_its_line_and_creates_no_database(tmp_path, bad_line, message):
    path = tmp_path / "t.jsonl"
    path.write_bytes(json.dumps(make_task(0)).encode() + b"\n\n" + bad_line + b"\n")
    with pytest.raises(ValueError, match=rf"t\.jsonl:3: {message}"):
        load_tasks(path)
    db = tmp_path / "l.db"
    r = run_cli("serve", "--db", str(db), "--tasks", str(path), "--port", str(free_port()))
    assert r.returncode == 2
    assert f"{path}:3: {message}" in one_error_line(r.stderr, path)
    assert not list(tmp_path.glob("l.db*"))  # no database, no token file


# ---- 6. revocable tokens -----------------------------------------------------------------------------------------
def test_a_revoked_token_gets_401_on_every_endpoint_and_rotate_gives_a_new_one(tmp_path):
    app, db_path, tokens = make_db(tmp_path, names=("alice", "bob", "root"))
    db = app.state.db
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE annotators SET is_admin = 1 WHERE name = 'root'")
    conn.commit()
    conn.close()
    alice, bob, root = (client_for(app, tokens[n]) for n in ["alice", "bob", "root"])
    tid = label_one(alice)
    held = alice.post("/api/next").json()["task"]["id"]  # alice holds a lease
    assert root.get("/api/admin/stats").status_code == 200

    r = runner.invoke(label_app, ["revoke", "alice", "--db", str(db_path)])
    assert r.exit_code == 0 and "1 leased task(s) returned" in r.output, r.output
    r = runner.invoke(label_app, ["revoke", "root", "--db", str(db_path)])
    assert r.exit_code == 0, r.output
    paths = [(route.path, method) for route in app.routes for method in getattr(route, "methods", ()) if route.path.startswith("/api/")]
    assert len(paths) >= 10
    for client in (alice, root):
        for path, method in paths:
            if path in ("/api/health", "/api/openapi.json") or method == "HEAD":  # public
                continue
            r = client.request(method, path.replace("{task_id}", tid), json={"ranking": [[0], [1], [2]]})
            assert r.status_code == 401, (path, method, r.text)
            assert r.json()["code"] == "unauthorized" and "content-security-policy" in r.headers
    # the lease went back to the pool; alice's label stays
    assert bob.post("/api/next").json()["task"]["id"] == held
    assert ("task-0", "alice") in {(x["task_id"], x["annotator"]) for x in db.export_records()}

    r = runner.invoke(label_app, ["rotate", "alice", "--db", str(db_path), "--url", "http://127.0.0.1:9"])
    assert r.exit_code == 0, r.output
    new = r.output.split("token: ")[1].split()[0]
    assert f"login link: http://127.0.0.1:9/#token={new}" in r.output
    assert client_for(app, new).get("/api/me").json()["name"] == "alice"
    assert alice.get("/api/me").status_code == 401
    r = runner.invoke(label_app, ["revoke", "nobody", "--db", str(db_path)])
    assert r.exit_code == 1 and "no annotator named 'nobody'" in r.output
    db.close()


def test_admin_token_lives_in_a_private_file_and_follows_a_rotation(tmp_path):
    port = free_port()
    app, db_path, tokens = make_db(tmp_path)
    first = app.state.admin_token
    app.state.db.close()
    token_file = tmp_path / "labels.sqlite.admin-token"
    assert token_file.read_text().strip() == first
    with LabelServer(db_path, tmp_path / "tasks.jsonl", port=port) as server:
        log = server.log.read_text()
    assert first not in log and "admin-token" in log  # never printed where logs keep it
    r = runner.invoke(label_app, ["admin-token", "--db", str(db_path), "--url", "http://h:1"])
    assert r.exit_code == 0 and f"login link: http://h:1/#token={first}" in r.output
    r = runner.invoke(label_app, ["rotate", "admin", "--db", str(db_path)])
    new = r.output.split("token: ")[1].split()[0]
    assert token_file.read_text().strip() == new != first
    r = runner.invoke(label_app, ["admin-token", "--db", str(db_path)])
    assert r.exit_code == 0 and new in r.output
    runner.invoke(label_app, ["revoke", "admin", "--db", str(db_path)])
    assert not token_file.exists()
    r = runner.invoke(label_app, ["admin-token", "--db", str(db_path)])
    assert r.exit_code == 1 and "rotate admin" in r.output


# ---- 8. flag keys: one spelling per position ---------------------------------------------------------------------
@pytest.mark.parametrize("key", ["00", "+0", "-0", " 0", "0 ", "\u0660", "\u0661", "1_0", "0x1", "1.0", "", "-1"])
def test_alias_flag_keys_get_422(tmp_path, key):
    app, db_path, tokens = make_db(tmp_path)
    alice = client_for(app, tokens["alice"])
    view = alice.post("/api/next").json()["task"]
    before = db_snapshot(db_path)
    r = alice.post(f"/api/tasks/{view['id']}/submit", json={"ranking": [[0], [1], [2]], "flags": {key: ["unsafe"]}})
    assert r.status_code == 422, r.text
    assert "not a response position" in r.json()["detail"]
    assert db_snapshot(db_path) == before
    with pytest.raises(RankingError):
        validate_flags({"0": ["unsafe"], key: ["nonsense"]}, 3)
    app.state.db.close()


def test_canonical_flag_keys_are_accepted():
    assert validate_flags({"0": ["unsafe"], "2": ["nonsense", "unsafe"], 1: []}, 3) == {0: ["unsafe"], 2: ["nonsense", "unsafe"]}
    assert validate_flags({"10": ["unsafe"]}, 11) == {10: ["unsafe"]}


# ---- 9. database trouble --------------------------------------------------------------------------------------------
def test_a_locked_database_answers_503_json_within_the_busy_timeout(tmp_path):
    tasks_path = write_tasks(tmp_path / "t.jsonl", [make_task(0)])
    db_path = tmp_path / "l.db"
    app = create_app(db_path, tasks_path, busy_timeout=0.5)
    alice = client_for(app, app.state.db.add_annotator("alice"))
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        t0 = time.monotonic()
        r = alice.post("/api/next")
        elapsed = time.monotonic() - t0
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json()["code"] == "database_busy" and "locked" in r.json()["detail"]
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert 0.4 < elapsed < 3.0, elapsed
    assert alice.post("/api/next").json()["task"]["id"] == "task-0"  # lock gone: back to normal
    app.state.db.close()


def test_database_trouble_while_serving_is_a_503_and_anything_else_a_json_500(tmp_path, monkeypatch):
    app, db_path, tokens = make_db(tmp_path)
    db = app.state.db
    c = TestClient(app, raise_server_exceptions=False)

    def read_only(*args, **kwargs):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(db, "count_tasks", read_only)
    r = c.get("/api/health")
    assert r.status_code == 503 and r.json() == {
        "detail": "the database is read-only (check the permissions of the file, its -wal/-shm and its folder)",
        "code": "database_unavailable",
    }
    assert "content-security-policy" in r.headers
    monkeypatch.setattr(db, "count_tasks", lambda: 1 / 0)
    r = c.get("/api/health")
    assert r.status_code == 500 and r.json()["code"] == "internal_error"
    assert "default-src 'none'" in r.headers["content-security-policy"] and r.headers["x-frame-options"] == "DENY"
    db.close()


def _corrupt(db_path: Path, keep_header: bool) -> None:
    data = bytearray(db_path.read_bytes())
    start = 100 if keep_header else 0
    data[start : start + 8192] = b"\xa5" * min(8192, len(data) - start)
    db_path.write_bytes(bytes(data))


@pytest.mark.parametrize("keep_header", [False, True], ids=["not-a-database", "malformed-pages"])
def test_a_corrupted_database_gives_one_line_at_the_cli(tmp_path, keep_header):
    app, db_path, tokens = make_db(tmp_path, n_tasks=40)
    label_one(client_for(app, tokens["alice"]))
    app.state.db.close()
    _corrupt(db_path, keep_header)
    commands = [
        ["export", "--out", str(tmp_path / "x.jsonl")],
        ["stats"],
        ["add-annotator", "zoe"],
        ["backup", "--out", str(tmp_path / "b.sqlite")],
        ["revoke", "alice"],
        ["rotate", "alice"],
        ["admin-token"],
        ["serve", "--port", str(free_port())],
    ]
    for cmd in commands:
        r = run_cli(*cmd, "--db", str(db_path))
        assert r.returncode == 1, (cmd, r.stdout, r.stderr)
        line = one_error_line(r.stderr, db_path)
        assert line.startswith(f"error: {db_path}: ") and ("corrupted" in line or "malformed" in line), (cmd, line)
    assert not (tmp_path / "b.sqlite").exists()


def _make_read_only(path: Path) -> None:
    """chmod 0400, and for root (whom permissions do not stop) the immutable attribute."""
    path.chmod(0o400)
    if os.geteuid() == 0:
        r = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"running as root and chattr +i failed: {r.stderr.strip()}")


def test_a_read_only_database_gives_one_line_at_the_cli_and_can_still_be_read(tmp_path):
    app, db_path, tokens = make_db(tmp_path)
    label_one(client_for(app, tokens["alice"]))
    app.state.db.close()
    _make_read_only(db_path)
    try:
        for cmd in (["add-annotator", "zoe"], ["revoke", "alice"], ["serve", "--port", str(free_port())]):
            r = run_cli(*cmd, "--db", str(db_path))
            assert r.returncode == 1, (cmd, r.stderr)
            assert "the database is read-only" in one_error_line(r.stderr, db_path), cmd
        r = run_cli("export", "--db", str(db_path), "--out", str(tmp_path / "x.jsonl"))
        assert r.returncode == 0, r.stderr
        assert json.loads((tmp_path / "x.jsonl").read_text())["annotator"] == "alice"
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(db_path)], check=True)


# ---- 10. a failed second serve changes nothing ------------------------------------------------------------------
def test_a_second_serve_on_a_busy_port_changes_no_setting(tmp_path):
    app, db_path, tokens = make_db(tmp_path)
    app.state.db.close()
    more = write_tasks(tmp_path / "more.jsonl", [make_task(i) for i in range(9)])
    with LabelServer(db_path, tmp_path / "tasks.jsonl", annotations_per_task=2) as server:
        before = db_snapshot(db_path)
        r = run_cli("serve", "--db", str(db_path), "--tasks", str(more), "--port", str(server.port), "--annotations-per-task", "5")
        assert r.returncode == 1
        assert "cannot listen on 127.0.0.1" in one_error_line(r.stderr, db_path)
        assert db_snapshot(db_path) == before  # no setting, no task changed
        with http_client(server.url) as c:
            assert c.get("/api/health").json()["tasks"] == 4
    assert LabelDB(db_path, create=False).get_meta("annotations_per_task") == "2"
    # a busy port never creates a database either
    with LabelServer(db_path) as server:
        r = run_cli("serve", "--db", str(tmp_path / "new.db"), "--port", str(server.port))
        assert r.returncode == 1 and not (tmp_path / "new.db").exists()


# ---- 11. private files -------------------------------------------------------------------------------------------------
def test_the_database_files_and_the_admin_token_file_are_0600(tmp_path):
    old = os.umask(0o022)
    try:
        app, db_path, tokens = make_db(tmp_path)
        db = app.state.db
        label_one(client_for(app, tokens["alice"]))  # -wal and -shm exist now
        files = [db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm"), tmp_path / "labels.sqlite.admin-token"]
        for f in files:
            assert f.exists(), f
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, (f, oct(f.stat().st_mode))
        db.close()
        # a database made 0644 by an older rlhfkit is tightened when opened
        db_path.chmod(0o644)
        LabelDB(db_path).close()
        assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    finally:
        os.umask(old)
