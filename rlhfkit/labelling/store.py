"""The labelling store's foundations: schema, connections, transactions, errors, file safety.

One SQLite file in WAL mode with ``synchronous=FULL``. Every write runs in its own
``BEGIN IMMEDIATE`` transaction and is committed before the method returns, so a label
the server acknowledged survives a kill at any moment. The server's shutdown checkpoints
the WAL into the main file (``close(checkpoint=True)``), so after a clean stop
``labels.sqlite`` alone holds everything.

Files: the database and its ``-wal``/``-shm`` are created 0600 (they hold token hashes
and every label); the admin token of a new database goes to ``<db>.admin-token`` (0600),
never to stdout.

Tables
------
``annotators``   name, SHA-256 of the login token (the token itself is never stored), admin
                 flag. A revoked account keeps its labels; its ``token_hash`` becomes
                 ``revoked:<random>``, which no token hashes to.
``tasks``        the imported tasks; ``seq`` is the import order and the hand-out order.
``assignments``  one row per (task, annotator) that was ever handed out: ``status`` is
                 ``leased`` (handed out, ``expires_at`` bounds the lease), ``submitted``
                 (a label: ``ranking``/``flags`` in ORIGINAL response indices) or
                 ``skipped``. The primary key makes "one label per annotator and task"
                 a database invariant.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .tasks import is_safe_task_id

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

SQLITE_MAGIC = b"SQLite format 3\x00"
DEFAULT_BUSY_TIMEOUT = 5.0
"""Seconds a request waits for a database another process holds locked before it answers 503."""


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


class DatabaseProblem(RuntimeError):
    """The database file cannot be used (corrupted, read-only, locked, not a labelling database).

    ``str()`` is one line naming the file and what is wrong, for the command line.
    """

    def __init__(self, path: str | Path, error: BaseException | str):
        self.path = Path(path)
        self.reason = describe_sqlite_error(error) if isinstance(error, BaseException) else error
        super().__init__(f"{self.path}: {self.reason}")


def describe_sqlite_error(e: BaseException) -> str:
    """A short, plain reason for an SQLite error (the API and the CLI both show it)."""
    text = str(e)
    low = text.lower()
    if "locked" in low or "busy" in low:
        return "the database is locked by another process (still locked after the busy timeout)"
    if "readonly" in low or "read-only" in low:
        return "the database is read-only (check the permissions of the file, its -wal/-shm and its folder)"
    if "not a database" in low or "malformed" in low or "corrupt" in low:
        return f"the database is corrupted or not an SQLite file ({text})"
    if "unable to open" in low:
        return "cannot open the database file (missing folder or no permission)"
    if "disk" in low and ("full" in low or "i/o" in low):
        return f"the disk failed ({text})"
    return text


def is_sqlite_file(path: str | Path) -> bool:
    """True if ``path`` is a file starting with SQLite's header."""
    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


def companion_files(db_path: str | Path) -> list[Path]:
    """The database and the files SQLite keeps beside it."""
    p = Path(db_path)
    return [p, p.with_name(p.name + "-wal"), p.with_name(p.name + "-shm"), p.with_name(p.name + "-journal")]


def admin_token_path(db_path: str | Path) -> Path:
    p = Path(db_path)
    return p.with_name(p.name + ".admin-token")


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600), replacing it atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)  # O_CREAT's mode does not apply to a leftover tmp file
    tmp.replace(path)


def make_private(path: Path) -> None:
    """Drop group/other permissions of an existing file (a database made by an older rlhfkit was 0644)."""
    try:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            os.chmod(path, mode & 0o700)
    except OSError:
        pass  # not ours to change: SQLite reports what matters when it opens the file


class Store:
    """Connections (one per thread), transactions and the schema; :class:`~.db.LabelDB` adds the queries.

    ``create=False`` refuses to create a missing file (for ``export``/``stats``/``backup``).
    ``busy_timeout``: seconds to wait for a lock another process holds, then fail with
    ``sqlite3.OperationalError`` ("database is locked"; the API answers 503).
    ``clock`` returns the time in seconds (tests pass a fake one).
    Raises :class:`DatabaseProblem` when the file cannot be opened as a labelling database.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        create: bool = True,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no labelling database here")
        self.busy_timeout = busy_timeout
        self.clock = clock
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        try:
            if create and not self.path.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # created empty and 0600 before SQLite sees it; SQLite gives -wal/-shm the same mode
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            for f in companion_files(self.path):
                make_private(f)
            self.new_admin_token = self._init()
        except DatabaseProblem:
            self.close()
            raise
        except sqlite3.Error as e:
            self.close()
            raise DatabaseProblem(self.path, e) from None
        except OSError as e:
            self.close()
            raise DatabaseProblem(self.path, e.strerror or str(e)) from None

    # -- connections and transactions ---------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
            with self._lock:
                self._all.append(conn)
            self._local.conn = conn
            conn.row_factory = sqlite3.Row
            conn.create_function("safe_task_id", 1, is_safe_task_id, deterministic=True)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
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

    def checkpoint(self) -> None:
        """Copy the WAL into the main file and empty it: then a plain copy of the file holds every label."""
        self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self, *, checkpoint: bool = False) -> None:
        """Close every connection; with ``checkpoint=True`` (the server's shutdown) checkpoint the WAL first.

        Only the server checkpoints: a TRUNCATE checkpoint from a CLI command would stall a running
        server's writes. Without a server, SQLite checkpoints anyway when the last connection closes.
        """
        if checkpoint and self._all:
            try:
                self.checkpoint()
            except sqlite3.Error:
                pass  # a reader still open elsewhere; the WAL stays valid and SQLite replays it
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
                raise DatabaseProblem(self.path, f"schema version {row['value']}, this rlhfkit reads {SCHEMA_VERSION}")
            if c.execute("SELECT 1 FROM annotators WHERE is_admin = 1").fetchone():
                return None
            name = "admin"
            n = 1
            while c.execute("SELECT 1 FROM annotators WHERE name = ?", (name,)).fetchone():
                n += 1
                name = f"admin-{n}"
            token = self._insert_annotator(c, name, admin=True)
            # written before the commit: a token that was never kept would lock the admin out
            write_private(admin_token_path(self.path), token + "\n")
            return token

    def _insert_annotator(self, c: sqlite3.Connection, name: str, admin: bool) -> str:
        raise NotImplementedError  # LabelDB

    # -- meta -----------------------------------------------------------------------------
    def set_meta(self, key: str, value: str) -> None:
        with self._write() as c:
            c.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self._conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else default
