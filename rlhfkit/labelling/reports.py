"""What leaves the labelling database: the export JSONL, the stats, and backups.

Pure functions over an open SQLite connection (``LabelDB`` calls them inside a read
snapshot). Neither the export nor a backup ever writes onto the database or onto any
other SQLite file: a clumsy ``--out labels.sqlite`` is refused and changes nothing.
"""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import tempfile
from pathlib import Path

from .rankings import agreement
from .store import companion_files, is_sqlite_file


class UnsafeOutput(ValueError):
    """An output path that would overwrite the database or another SQLite file."""


def check_output(out: str | Path, db_path: str | Path, *, what: str, allow_existing: bool) -> Path:
    """Refuse an ``out`` that is the database, its ``-wal``/``-shm``, or any SQLite file (or any file, unless ``allow_existing``)."""
    out = Path(out)
    target = out.resolve()
    for f in companion_files(db_path):
        same = f.resolve() == target or (out.exists() and f.exists() and os.path.samefile(f, out))
        if same:
            raise UnsafeOutput(f"{out}: refusing to write the {what} onto the database's own file {f}")
    if out.exists():
        if out.is_dir():
            raise UnsafeOutput(f"{out}: is a folder; give a file name for the {what}")
        if is_sqlite_file(out):
            raise UnsafeOutput(f"{out}: is an SQLite database; refusing to overwrite it with the {what}")
        if not allow_existing:
            raise UnsafeOutput(f"{out}: already exists; give a new file name for the {what}")
    return out


def _replace_atomically(out: Path, fill) -> None:
    """``fill(tmp_path)`` writes a temp file beside ``out`` (0600, from mkstemp); then it replaces ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        fill(Path(tmp))
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_records(c: sqlite3.Connection) -> list[dict]:
    """Every submitted label as a K-wise ranking record in ORIGINAL response indices.

    One record per (task, annotator), ordered by task import order then annotator
    name; skipped and leased tasks are not exported.
    """
    rows = c.execute(
        """SELECT t.id AS task_id, t.messages, t.responses, t.models, n.name, a.ranking, a.flags
           FROM assignments a JOIN tasks t ON t.seq = a.task_seq JOIN annotators n ON n.id = a.annotator_id
           WHERE a.status = 'submitted' ORDER BY t.seq, n.name"""
    ).fetchall()
    return [
        {
            # `messages` only: the comparison readers take `prompt` or `messages`, not both.
            "messages": json.loads(r["messages"]),
            "responses": json.loads(r["responses"]),
            "ranking": json.loads(r["ranking"]),
            "flags": json.loads(r["flags"] or "{}"),
            "annotator": r["name"],
            "task_id": r["task_id"],
            "models": json.loads(r["models"]),
        }
        for r in rows
    ]


def write_export(records: list[dict], out: str | Path, *, db_path: str | Path) -> int:
    """Write ``records`` as JSONL (atomically: temp file + rename). Returns the line count.

    Raises :class:`UnsafeOutput` for an ``out`` that is the database or an SQLite file.
    """
    out = check_output(out, db_path, what="export", allow_existing=True)

    def fill(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    _replace_atomically(out, fill)
    return len(records)


def backup(src: sqlite3.Connection, out: str | Path, *, db_path: str | Path) -> int:
    """Copy the database to a new file ``out`` with SQLite's online backup API; returns its label count.

    Safe while the server runs: the copy is one consistent snapshot (every label committed
    before it started), and writers carry on meanwhile (WAL). The copy is a single
    self-contained file (rollback journal, not WAL), 0600, checked with ``quick_check``.
    """
    out = check_output(out, db_path, what="backup", allow_existing=False)

    def fill(tmp: Path) -> None:
        dst = sqlite3.connect(tmp, isolation_level=None)
        try:
            src.backup(dst)  # all pages in one step: one read snapshot of the source
            dst.execute("PRAGMA journal_mode = DELETE")
            check = dst.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"the backup failed its integrity check: {check}")
        finally:
            dst.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())

    _replace_atomically(out, fill)
    check = sqlite3.connect(f"file:{out}?mode=ro", uri=True)
    try:
        return check.execute("SELECT COUNT(*) FROM assignments WHERE status = 'submitted'").fetchone()[0]
    finally:
        check.close()


def stats(c: sqlite3.Connection, *, annotations_per_task: int, now: float) -> dict:
    """Counts per annotator, seconds per task (lease to submit), and pairwise agreement."""
    annotators = c.execute("SELECT id, name, is_admin FROM annotators ORDER BY name").fetchall()
    rows = c.execute(
        """SELECT a.annotator_id, a.status, a.leased_at, a.expires_at, a.submitted_at, a.ranking, t.id AS task_id
           FROM assignments a JOIN tasks t ON t.seq = a.task_seq"""
    ).fetchall()
    tasks = c.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]
    names = {a["id"]: a["name"] for a in annotators}
    per: dict[int, dict] = {a["id"]: {"labelled": 0, "skipped": 0, "leased": 0, "seconds": []} for a in annotators}
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
