"""The labelling store: one SQLite file in WAL mode with ``synchronous=FULL``.

Every write runs in its own ``BEGIN IMMEDIATE`` transaction and is committed before
the method returns, so a label the server acknowledged survives a kill at any moment,
and a restarted server on the same file carries on where the old one stopped.

Tables
------
``annotators``   name, SHA-256 of the login token (the token itself is never stored), admin flag.
``tasks``        the imported tasks; ``seq`` is the import order and the hand-out order.
``assignments``  one row per (task, annotator) that was ever handed out: ``status`` is
                 ``leased`` (handed out, ``expires_at`` bounds the lease), ``submitted``
                 (a label: ``ranking``/``flags`` in ORIGINAL response indices) or
                 ``skipped``. The primary key makes "one label per annotator and task"
                 a database invariant.

Hand-out rule: an annotator gets (1) their own unexpired lease if they hold one (so a
reload shows the same task), else (2) the first task, in import order, that they have
neither submitted nor skipped and whose submitted labels plus other annotators'
unexpired leases are fewer than ``annotations_per_task``. An expired lease simply stops
counting, which returns the task to the pool.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .rankings import (
    RankingError,
    agreement,
    display_order,
    flags_to_display,
    flags_to_original,
    to_display,
    to_original,
    validate_flags,
    validate_ranking,
)
from .tasks import Task

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS annotators (
    id         INTEGER PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    token_hash TEXT NOT NULL UNIQUE,
    is_admin   INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    messages   TEXT NOT NULL,   -- JSON list of {role, content}
    responses  TEXT NOT NULL,   -- JSON list of response texts, original order
    models     TEXT NOT NULL,   -- JSON list of model names (or null), original order
    sampling   TEXT NOT NULL,   -- JSON list of sampling settings (or null), original order
    k          INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    task_seq      INTEGER NOT NULL REFERENCES tasks(seq),
    annotator_id  INTEGER NOT NULL REFERENCES annotators(id),
    status        TEXT NOT NULL CHECK (status IN ('leased', 'submitted', 'skipped')),
    display_order TEXT NOT NULL,  -- JSON: display position -> original index
    leased_at     REAL NOT NULL,
    expires_at    REAL NOT NULL,
    submitted_at  REAL,
    updated_at    REAL,
    ranking       TEXT,           -- JSON tie groups of ORIGINAL indices, best first
    flags         TEXT,           -- JSON {original index: [flag, ...]}
    PRIMARY KEY (task_seq, annotator_id)
);
CREATE INDEX IF NOT EXISTS assignments_by_annotator ON assignments (annotator_id, status);
CREATE INDEX IF NOT EXISTS assignments_by_status ON assignments (task_seq, status, expires_at);
"""

# Tasks that ``:me`` may be handed now (see the module docstring).
_AVAILABLE = """
    NOT EXISTS (SELECT 1 FROM assignments m
                WHERE m.task_seq = t.seq AND m.annotator_id = :me AND m.status IN ('submitted', 'skipped'))
    AND (SELECT COUNT(*) FROM assignments o
         WHERE o.task_seq = t.seq
           AND (o.status = 'submitted'
                OR (o.status = 'leased' AND o.expires_at > :now AND o.annotator_id != :me))) < :n
"""


class LabellingError(Exception):
    """A request that cannot be honoured; ``status`` is the HTTP status the API answers with."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code


class NotFound(LabellingError):
    status = 404
    code = "not_found"


class Conflict(LabellingError):
    status = 409
    code = "conflict"


class Invalid(LabellingError):
    status = 422
    code = "invalid"


@dataclass(frozen=True)
class Annotator:
    id: int
    name: str
    is_admin: bool


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _validate_name(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= 64:
        raise Invalid("annotator name must be 1 to 64 characters")
    if any(not c.isprintable() for c in name):
        raise Invalid("annotator name must not contain control characters")
    return name


class LabelDB:
    """The labelling database. Safe to share between threads (one connection per thread).

    ``create=False`` refuses to create a missing file (for ``export``/``stats``).
    ``clock`` returns the time in seconds (tests pass a fake one).
    After opening, ``new_admin_token`` holds the admin token if this open created the
    admin account (a new database), else ``None``; it is not stored anywhere.
    """

    def __init__(self, path: str | Path, *, create: bool = True, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no labelling database here")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.new_admin_token = self._init()

    # -- connections and transactions ---------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout = 30000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, committed (and fsynced: WAL + synchronous=FULL) on exit."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several SELECTs."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._all.clear()
        self._local = threading.local()

    def _init(self) -> str | None:
        conn = self._conn()
        conn.executescript(SCHEMA)
        with self._write() as c:
            row = c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                c.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row["value"]) != SCHEMA_VERSION:
                raise RuntimeError(f"{self.path}: schema version {row['value']}, this rlhfkit reads {SCHEMA_VERSION}")
            if c.execute("SELECT 1 FROM annotators WHERE is_admin = 1").fetchone():
                return None
            name = "admin"
            n = 1
            while c.execute("SELECT 1 FROM annotators WHERE name = ?", (name,)).fetchone():
                n += 1
                name = f"admin-{n}"
            return self._insert_annotator(c, name, admin=True)

    # -- meta -----------------------------------------------------------------------------
    def set_meta(self, key: str, value: str) -> None:
        with self._write() as c:
            c.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self._conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else default

    # -- annotators -----------------------------------------------------------------------
    def _insert_annotator(self, c: sqlite3.Connection, name: str, admin: bool) -> str:
        token = secrets.token_urlsafe(24)
        c.execute(
            "INSERT INTO annotators (name, token_hash, is_admin, created_at) VALUES (?, ?, ?, ?)",
            (name, hash_token(token), int(admin), self.clock()),
        )
        return token

    def add_annotator(self, name: str, *, admin: bool = False) -> str:
        """Create an account and return its login token (shown once, only its hash is kept)."""
        name = _validate_name(name)
        with self._write() as c:
            if c.execute("SELECT 1 FROM annotators WHERE name = ?", (name,)).fetchone():
                raise Conflict(f"an annotator named {name!r} already exists", "name_taken")
            return self._insert_annotator(c, name, admin)

    def annotator_by_token(self, token: str) -> Annotator | None:
        if not token:
            return None
        row = self._conn().execute(
            "SELECT id, name, is_admin FROM annotators WHERE token_hash = ?", (hash_token(token),)
        ).fetchone()
        return Annotator(row["id"], row["name"], bool(row["is_admin"])) if row else None

    def annotator_by_name(self, name: str) -> Annotator | None:
        row = self._conn().execute("SELECT id, name, is_admin FROM annotators WHERE name = ?", (name,)).fetchone()
        return Annotator(row["id"], row["name"], bool(row["is_admin"])) if row else None

    # -- tasks ----------------------------------------------------------------------------
    def import_tasks(self, tasks: Iterable[Task]) -> dict:
        """Add tasks whose id is new; idempotent. A known id with different content keeps the stored version.

        Returns ``{"added": n, "unchanged": n, "changed": [ids kept as stored]}``.
        """
        added, unchanged, changed = 0, 0, []
        now = self.clock()
        with self._write() as c:
            for t in tasks:
                fields = (_dumps(t.messages), _dumps(t.responses), _dumps(t.models), _dumps(t.sampling))
                row = c.execute("SELECT messages, responses, models, sampling FROM tasks WHERE id = ?", (t.id,)).fetchone()
                if row is None:
                    c.execute(
                        "INSERT INTO tasks (id, messages, responses, models, sampling, k, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (t.id, *fields, t.k, now),
                    )
                    added += 1
                elif tuple(row) == fields:
                    unchanged += 1
                else:
                    changed.append(t.id)
        return {"added": added, "unchanged": unchanged, "changed": changed}

    def count_tasks(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM tasks").fetchone()[0]

    @staticmethod
    def _task(c: sqlite3.Connection, task_id: str) -> sqlite3.Row:
        row = c.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            raise NotFound(f"unknown task {task_id!r}", "unknown_task")
        return row

    @staticmethod
    def _assignment(c: sqlite3.Connection, task_seq: int, annotator_id: int) -> sqlite3.Row | None:
        return c.execute(
            "SELECT * FROM assignments WHERE task_seq = ? AND annotator_id = ?", (task_seq, annotator_id)
        ).fetchone()

    @staticmethod
    def _task_view(task: sqlite3.Row, order: list[int], assignment: sqlite3.Row | None = None) -> dict:
        """What the annotator sees: the conversation and the responses in display order, no model names."""
        texts = json.loads(task["responses"])
        view = {
            "id": task["id"],
            "messages": json.loads(task["messages"]),
            "k": task["k"],
            "responses": [{"position": d, "text": texts[i]} for d, i in enumerate(order)],
        }
        if assignment is not None:
            view["leased_at"] = assignment["leased_at"]
            view["expires_at"] = assignment["expires_at"]
        return view

    # -- the annotator's loop -----------------------------------------------------------------
    def next_task(self, annotator: Annotator, *, annotations_per_task: int = 1, lease_seconds: float = 600) -> dict | None:
        """Lease the annotator's next task (or return the one they already hold); ``None`` when none is left."""
        now = self.clock()
        with self._write() as c:
            held = c.execute(
                """SELECT t.*, a.display_order, a.leased_at, a.expires_at FROM assignments a JOIN tasks t ON t.seq = a.task_seq
                   WHERE a.annotator_id = ? AND a.status = 'leased' AND a.expires_at > ?
                   ORDER BY a.leased_at, t.seq LIMIT 1""",
                (annotator.id, now),
            ).fetchone()
            if held is not None:
                return self._task_view(held, json.loads(held["display_order"]), held)
            task = c.execute(
                f"SELECT t.* FROM tasks t WHERE {_AVAILABLE} ORDER BY t.seq LIMIT 1",
                {"me": annotator.id, "now": now, "n": annotations_per_task},
            ).fetchone()
            if task is None:
                return None
            order = display_order(annotator.name, task["id"], task["k"])
            c.execute(
                """INSERT INTO assignments (task_seq, annotator_id, status, display_order, leased_at, expires_at)
                   VALUES (?, ?, 'leased', ?, ?, ?)
                   ON CONFLICT (task_seq, annotator_id) DO UPDATE
                   SET leased_at = excluded.leased_at, expires_at = excluded.expires_at
                   WHERE assignments.status = 'leased'""",
                (task["seq"], annotator.id, _dumps(order), now, now + lease_seconds),
            )
            row = self._assignment(c, task["seq"], annotator.id)
            return self._task_view(task, json.loads(row["display_order"]), row)

    def _check_label(self, task: sqlite3.Row, ranking, flags) -> tuple[list[list[int]], dict[int, list[str]]]:
        try:
            return validate_ranking(ranking, task["k"]), validate_flags(flags, task["k"])
        except RankingError as e:
            raise Invalid(str(e), "invalid_ranking") from None

    def submit(
        self, annotator: Annotator, task_id: str, ranking, flags=None, *, annotations_per_task: int = 1
    ) -> dict:
        """Store a label for a task leased to ``annotator``; ``ranking``/``flags`` use display positions.

        Committed before returning. Raises ``NotFound`` (unknown task), ``Invalid`` (bad
        ranking/flags) or ``Conflict`` (not leased to you, already submitted or skipped,
        lease expired and the task went to someone else); nothing changes then.
        """
        now = self.clock()
        with self._write() as c:
            task = self._task(c, task_id)
            ranking, flags = self._check_label(task, ranking, flags)
            row = self._assignment(c, task["seq"], annotator.id)
            if row is None:
                raise Conflict(f"task {task_id!r} is not leased to you; get it from POST /api/next first", "not_leased")
            if row["status"] == "submitted":
                raise Conflict(
                    f"you already submitted task {task_id!r}; change your label with PUT /api/labels/{task_id}",
                    "already_submitted",
                )
            if row["status"] == "skipped":
                raise Conflict(f"you skipped task {task_id!r}; skipped tasks cannot be labelled", "skipped")
            if row["expires_at"] <= now:
                taken = c.execute(
                    """SELECT COUNT(*) FROM assignments WHERE task_seq = ? AND annotator_id != ?
                       AND (status = 'submitted' OR (status = 'leased' AND expires_at > ?))""",
                    (task["seq"], annotator.id, now),
                ).fetchone()[0]
                if taken >= annotations_per_task:
                    raise Conflict(
                        f"your lease on task {task_id!r} expired and the task went to other annotators", "lease_expired"
                    )
            order = json.loads(row["display_order"])
            orig = to_original(ranking, order)
            orig_flags = flags_to_original(flags, order)
            c.execute(
                """UPDATE assignments SET status = 'submitted', ranking = ?, flags = ?, submitted_at = ?, updated_at = ?
                   WHERE task_seq = ? AND annotator_id = ?""",
                (_dumps(orig), _dumps(orig_flags), now, now, task["seq"], annotator.id),
            )
        return {"task_id": task_id, "ranking": ranking, "flags": flags, "submitted_at": now}

    def skip(self, annotator: Annotator, task_id: str) -> dict:
        """Mark a task leased to ``annotator`` as skipped: they will not see it again; others still may."""
        now = self.clock()
        with self._write() as c:
            task = self._task(c, task_id)
            row = self._assignment(c, task["seq"], annotator.id)
            if row is None:
                raise Conflict(f"task {task_id!r} is not leased to you; get it from POST /api/next first", "not_leased")
            if row["status"] == "submitted":
                raise Conflict(f"you already submitted task {task_id!r}; it cannot be skipped", "already_submitted")
            if row["status"] == "skipped":
                raise Conflict(f"you already skipped task {task_id!r}", "skipped")
            c.execute(
                "UPDATE assignments SET status = 'skipped', updated_at = ? WHERE task_seq = ? AND annotator_id = ?",
                (now, task["seq"], annotator.id),
            )
        return {"task_id": task_id, "skipped": True}

    def update_label(self, annotator: Annotator, task_id: str, ranking, flags=None) -> dict:
        """Change the annotator's own submitted label (display positions, as for :meth:`submit`)."""
        now = self.clock()
        with self._write() as c:
            task = self._task(c, task_id)
            row = self._assignment(c, task["seq"], annotator.id)
            if row is None or row["status"] != "submitted":
                raise NotFound(f"you have no submitted label for task {task_id!r}", "no_label")
            ranking, flags = self._check_label(task, ranking, flags)
            order = json.loads(row["display_order"])
            c.execute(
                "UPDATE assignments SET ranking = ?, flags = ?, updated_at = ? WHERE task_seq = ? AND annotator_id = ?",
                (_dumps(to_original(ranking, order)), _dumps(flags_to_original(flags, order)), now, task["seq"], annotator.id),
            )
        return {"task_id": task_id, "ranking": ranking, "flags": flags, "updated_at": now}

    def get_label(self, annotator: Annotator, task_id: str) -> dict:
        """The annotator's own label of a task, with the task, all in their display order."""
        c = self._conn()
        task = self._task(c, task_id)
        row = self._assignment(c, task["seq"], annotator.id)
        if row is None or row["status"] != "submitted":
            raise NotFound(f"you have no submitted label for task {task_id!r}", "no_label")
        order = json.loads(row["display_order"])
        flags = {int(k): v for k, v in json.loads(row["flags"] or "{}").items()}
        return {
            "task": self._task_view(task, order),
            "ranking": to_display(json.loads(row["ranking"]), order),
            "flags": {str(k): v for k, v in sorted(flags_to_display(flags, order).items())},
            "submitted_at": row["submitted_at"],
            "updated_at": row["updated_at"],
        }

    def list_labels(self, annotator: Annotator) -> list[dict]:
        """The annotator's own submitted labels, most recent first."""
        rows = self._conn().execute(
            """SELECT t.id, a.submitted_at, a.updated_at FROM assignments a JOIN tasks t ON t.seq = a.task_seq
               WHERE a.annotator_id = ? AND a.status = 'submitted' ORDER BY a.submitted_at DESC, t.seq DESC""",
            (annotator.id,),
        ).fetchall()
        return [{"task_id": r["id"], "submitted_at": r["submitted_at"], "updated_at": r["updated_at"]} for r in rows]

    def progress(self, annotator: Annotator, *, annotations_per_task: int = 1) -> dict:
        n = annotations_per_task
        now = self.clock()
        with self._read() as c:
            mine = dict(
                c.execute(
                    "SELECT status, COUNT(*) FROM assignments WHERE annotator_id = ? GROUP BY status", (annotator.id,)
                ).fetchall()
            )
            available = c.execute(
                f"SELECT COUNT(*) FROM tasks t WHERE {_AVAILABLE}", {"me": annotator.id, "now": now, "n": n}
            ).fetchone()[0]
            tasks = c.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]
            per_task = c.execute(
                "SELECT COUNT(*) FROM assignments WHERE status = 'submitted' GROUP BY task_seq"
            ).fetchall()
        labels = sum(min(r[0], n) for r in per_task)
        return {
            "you": {"labelled": mine.get("submitted", 0), "skipped": mine.get("skipped", 0), "remaining": available, "tasks": tasks},
            "overall": {
                "labels": labels,
                "wanted": tasks * n,
                "tasks": tasks,
                "complete_tasks": sum(1 for r in per_task if r[0] >= n),
                "annotations_per_task": n,
            },
        }

    # -- admin: export and stats -----------------------------------------------------------
    def export_records(self) -> list[dict]:
        """Every submitted label as a K-wise ranking record in ORIGINAL response indices.

        One record per (task, annotator), ordered by task import order then annotator
        name; skipped and leased tasks are not exported.
        """
        with self._read() as c:
            rows = c.execute(
                """SELECT t.id AS task_id, t.messages, t.responses, t.models, n.name, a.ranking, a.flags
                   FROM assignments a JOIN tasks t ON t.seq = a.task_seq JOIN annotators n ON n.id = a.annotator_id
                   WHERE a.status = 'submitted' ORDER BY t.seq, n.name"""
            ).fetchall()
        out = []
        for r in rows:
            messages = json.loads(r["messages"])
            out.append(
                {
                    # `messages` only: the comparison readers take `prompt` or `messages`, not both.
                    "messages": messages,
                    "responses": json.loads(r["responses"]),
                    "ranking": json.loads(r["ranking"]),
                    "flags": json.loads(r["flags"] or "{}"),
                    "annotator": r["name"],
                    "task_id": r["task_id"],
                    "models": json.loads(r["models"]),
                }
            )
        return out

    def write_export(self, out: str | Path) -> int:
        """Write :meth:`export_records` as JSONL (atomically: temp file + rename). Returns the line count."""
        out = Path(out)
        records = self.export_records()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        tmp.replace(out)
        return len(records)

    def stats(self, *, annotations_per_task: int | None = None) -> dict:
        """Counts per annotator, seconds per task (lease to submit), and pairwise agreement."""
        if annotations_per_task is None:
            annotations_per_task = int(self.get_meta("annotations_per_task", "1"))
        now = self.clock()
        with self._read() as c:
            annotators = c.execute("SELECT id, name, is_admin FROM annotators ORDER BY name").fetchall()
            rows = c.execute(
                """SELECT a.annotator_id, a.status, a.leased_at, a.expires_at, a.submitted_at, a.ranking, t.id AS task_id
                   FROM assignments a JOIN tasks t ON t.seq = a.task_seq"""
            ).fetchall()
            tasks = c.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]
        names = {a["id"]: a["name"] for a in annotators}
        per: dict[int, dict] = {
            a["id"]: {"labelled": 0, "skipped": 0, "leased": 0, "seconds": []} for a in annotators
        }
        submitted_per_task: dict[str, int] = {}
        labels = []
        for r in rows:
            p = per[r["annotator_id"]]
            if r["status"] == "submitted":
                p["labelled"] += 1
                p["seconds"].append(max(0.0, r["submitted_at"] - r["leased_at"]))
                submitted_per_task[r["task_id"]] = submitted_per_task.get(r["task_id"], 0) + 1
                labels.append((r["task_id"], names[r["annotator_id"]], json.loads(r["ranking"])))
            elif r["status"] == "skipped":
                p["skipped"] += 1
            elif r["expires_at"] > now:
                p["leased"] += 1
        annot_rows = []
        for a in annotators:
            p = per[a["id"]]
            secs = p.pop("seconds")
            if not (p["labelled"] or p["skipped"] or p["leased"]) and a["is_admin"]:
                continue  # an admin account that never labelled is not an annotator
            annot_rows.append(
                {
                    "annotator": a["name"],
                    **p,
                    "median_seconds": statistics.median(secs) if secs else None,
                    "mean_seconds": statistics.fmean(secs) if secs else None,
                }
            )
        n = annotations_per_task
        return {
            "annotators": annot_rows,
            "tasks": {
                "total": tasks,
                "with_labels": len(submitted_per_task),
                "complete": sum(1 for v in submitted_per_task.values() if v >= n),
                "labels": len(labels),
                "annotations_per_task": n,
                "wanted": tasks * n,
            },
            "agreement": agreement(labels),
        }
