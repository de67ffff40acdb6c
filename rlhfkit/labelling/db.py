"""The labelling store's queries: annotators (add, revoke, rotate), task import, the annotator's loop.

Connections, schema, transactions and errors live in ``store.py``; export, stats and
backup in ``reports.py``. ``LabelDB`` is what the app and the CLI use.

Hand-out rule: an annotator gets (1) their own unexpired lease if they hold one (so a
reload shows the same task), else (2) the first task, in import order, that they have
neither submitted nor skipped and whose submitted labels plus other annotators'
unexpired leases are fewer than ``annotations_per_task``. An expired lease simply stops
counting, which returns the task to the pool. A task whose id could not travel in a URL
(only a database filled by an older rlhfkit can hold one) is never handed out.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import reports
from .rankings import (
    RankingError,
    display_order,
    flags_to_display,
    flags_to_original,
    to_display,
    to_original,
    validate_flags,
    validate_ranking,
)
from .store import (  # noqa: F401  (re-exported: the app and the tests import them from here)
    Conflict,
    DatabaseProblem,
    Invalid,
    LabellingError,
    NotFound,
    Store,
    admin_token_path,
    write_private,
)
from .tasks import Task

# Tasks that ``:me`` may be handed now (see the module docstring).
_AVAILABLE = """
    safe_task_id(t.id)
    AND NOT EXISTS (SELECT 1 FROM assignments m
                WHERE m.task_seq = t.seq AND m.annotator_id = :me AND m.status IN ('submitted', 'skipped'))
    AND (SELECT COUNT(*) FROM assignments o
         WHERE o.task_seq = t.seq
           AND (o.status = 'submitted'
                OR (o.status = 'leased' AND o.expires_at > :now AND o.annotator_id != :me))) < :n
"""

REVOKED = "revoked:"
"""Prefix of a revoked account's ``token_hash``: no SHA-256 hex digest starts with it."""


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


class LabelDB(Store):
    """The labelling database. Safe to share between threads (one connection per thread).

    Options as for :class:`~.store.Store`. After opening, ``new_admin_token`` holds the
    admin token if this open created the admin account (a new database), else ``None``;
    it is kept only in ``<db>.admin-token`` (0600).
    """

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

    @staticmethod
    def _account(c: sqlite3.Connection, name: str) -> sqlite3.Row:
        row = c.execute("SELECT id, name, is_admin, token_hash FROM annotators WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no annotator named {name!r}", "unknown_annotator")
        return row

    def _stored_admin_token(self) -> str | None:
        try:
            return admin_token_path(self.path).read_text(encoding="utf-8").strip() or None
        except OSError:
            return None

    def revoke(self, name: str) -> int:
        """Make the account's token worthless at once (its labels stay); release its leases. Returns how many."""
        with self._write() as c:
            row = self._account(c, name)
            c.execute("UPDATE annotators SET token_hash = ? WHERE id = ?", (REVOKED + secrets.token_hex(16), row["id"]))
            released = c.execute("DELETE FROM assignments WHERE annotator_id = ? AND status = 'leased'", (row["id"],)).rowcount
        stored = self._stored_admin_token()
        if stored and hash_token(stored) == row["token_hash"]:
            admin_token_path(self.path).unlink(missing_ok=True)  # it no longer opens anything
        return released

    def rotate(self, name: str) -> str:
        """Give the account a new token (the old one stops working at once; a revoked account comes back)."""
        token = secrets.token_urlsafe(24)
        with self._write() as c:
            row = self._account(c, name)
            c.execute("UPDATE annotators SET token_hash = ? WHERE id = ?", (hash_token(token), row["id"]))
        stored = self._stored_admin_token()
        if stored and hash_token(stored) == row["token_hash"]:
            write_private(admin_token_path(self.path), token + "\n")  # keep `label admin-token` working
        return token

    def admin_token(self) -> tuple[str, str]:
        """``(token, account name)`` from ``<db>.admin-token``; ``NotFound`` if missing or no longer valid."""
        path = admin_token_path(self.path)
        token = self._stored_admin_token()
        if token is None:
            raise NotFound(f"{path}: no admin token file; `rlhfkit label rotate admin --db {self.path}` makes a new token")
        who = self.annotator_by_token(token)
        if who is None or not who.is_admin:
            raise NotFound(f"{path}: this token no longer opens an admin account (revoked or rotated)")
        return token, who.name

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

    def unservable_task_ids(self) -> list[str]:
        """Ids a URL cannot carry (imported by an older rlhfkit): these tasks are never handed out."""
        return [r[0] for r in self._conn().execute("SELECT id FROM tasks WHERE NOT safe_task_id(id) ORDER BY seq")]

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
                   WHERE a.annotator_id = ? AND a.status = 'leased' AND a.expires_at > ? AND safe_task_id(t.id)
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

    # -- admin: export, stats, backup (in reports.py) ------------------------------------------
    def export_records(self) -> list[dict]:
        """Every submitted label as a K-wise ranking record (see :func:`.reports.export_records`)."""
        with self._read() as c:
            return reports.export_records(c)

    def write_export(self, out: str | Path) -> int:
        """Write the export JSONL to ``out`` (never onto a database); returns the line count."""
        return reports.write_export(self.export_records(), out, db_path=self.path)

    def stats(self, *, annotations_per_task: int | None = None) -> dict:
        """Counts per annotator, seconds per task (lease to submit), and pairwise agreement."""
        if annotations_per_task is None:
            annotations_per_task = int(self.get_meta("annotations_per_task", "1"))
        with self._read() as c:
            return reports.stats(c, annotations_per_task=annotations_per_task, now=self.clock())

    def backup(self, out: str | Path) -> int:
        """A consistent copy of the database at ``out`` (SQLite's online backup); returns the label count."""
        return reports.backup(self._conn(), out, db_path=self.path)
