"""``rlhfkit label ...``: serve the labelling page, manage annotators and tokens, export, back up, show stats.

Every failure is one line on stderr naming the file and what is wrong, and a non-zero exit.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from .db import LabelDB, LabellingError
from .reports import UnsafeOutput
from .store import DEFAULT_BUSY_TIMEOUT, DatabaseProblem, admin_token_path, describe_sqlite_error

label_app = typer.Typer(
    name="label",
    help="Collect human rankings of model responses: a small web app for annotators (FastAPI + SQLite).",
    no_args_is_help=True,
    add_completion=False,
)

DB_HELP = "SQLite file holding tasks, annotators and labels (created if missing)."
DB_EXISTING_HELP = "The labelling database."
URL_HELP = "Base URL of the server, for the login link."


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextmanager
def _database(db: Path, *, create: bool = False) -> Iterator[LabelDB]:
    """Open the database for one command; any trouble ends the command with one line naming the file."""
    try:
        database = LabelDB(db, create=create)
    except (FileNotFoundError, DatabaseProblem) as e:
        raise _fail(str(e)) from None
    try:
        yield database
    except LabellingError as e:
        raise _fail(e.message) from None
    except UnsafeOutput as e:
        raise _fail(str(e)) from None
    except sqlite3.Error as e:
        raise _fail(f"{db}: {describe_sqlite_error(e)}") from None
    finally:
        database.close()


def _login_link(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}/#token={token}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listen(host: str, port: int) -> socket.socket:
    """Bind the port before anything else, so a busy port changes nothing (no import, no setting)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


def _admin_token_note(database: LabelDB, db: Path) -> str:
    try:
        _, name = database.admin_token()
    except LabellingError as e:
        return f"warning: {e.message}"
    path = admin_token_path(db)
    return f"admin token ({name}): in {path} (readable by you only); `rlhfkit label admin-token --db {db}` shows it"


@label_app.command()
def serve(
    tasks: Path = typer.Option(None, "--tasks", help="Task JSONL (from `rlhfkit candidates`), imported idempotently by task id."),
    db: Path = typer.Option(Path("labels.db"), "--db", help=DB_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Stay on loopback unless behind a TLS proxy."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    annotations_per_task: int = typer.Option(1, "--annotations-per-task", min=1, help="How many different annotators label each task."),
    lease_seconds: float = typer.Option(600, "--lease-seconds", min=1, help="A task handed out and not submitted returns to the pool after this long."),
    busy_timeout: float = typer.Option(DEFAULT_BUSY_TIMEOUT, "--busy-timeout", min=0, help="Seconds a request waits for a database another process holds locked, then answers 503."),
    max_body_kb: int = typer.Option(256, "--max-body-kb", min=1, help="Request bodies larger than this many KiB get 413 before they are read."),
) -> None:
    """Import the tasks and serve the labelling page until interrupted (Ctrl-C or SIGTERM checkpoint the database)."""
    import uvicorn

    from .app import create_app
    from .tasks import load_tasks

    try:
        task_list = load_tasks(tasks) if tasks is not None else None  # a bad file changes nothing
    except ValueError as e:
        raise _fail(str(e), 2) from None
    try:
        sock = _listen(host, port)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise _fail(f"cannot listen on {host}:{port}: {reason}; nothing was changed in {db}") from None
    try:
        app = create_app(
            db, tasks=task_list, annotations_per_task=annotations_per_task, lease_seconds=lease_seconds,
            busy_timeout=busy_timeout, max_body_bytes=max_body_kb * 1024,
        )
    except ValueError as e:
        sock.close()
        raise _fail(str(e), 2) from None
    except DatabaseProblem as e:
        sock.close()
        raise _fail(str(e)) from None
    database: LabelDB = app.state.db
    shown_host = f"[{host}]" if ":" in host else host
    base = f"http://{shown_host}:{port}"
    if app.state.imported is not None:
        imp = app.state.imported
        typer.echo(f"tasks: {imp['added']} added, {imp['unchanged']} already in {db}")
        if imp["changed"]:
            typer.echo(
                f"warning: {len(imp['changed'])} task id(s) already in the database with different content kept as stored: "
                + ", ".join(imp["changed"][:10]),
                err=True,
            )
    unservable = database.unservable_task_ids()
    if unservable:
        typer.echo(f"warning: {len(unservable)} task id(s) a URL cannot carry are never handed out: {', '.join(unservable[:10])}", err=True)
    typer.echo(f"{database.count_tasks()} tasks, {annotations_per_task} annotation(s) per task, lease {lease_seconds:g} s")
    typer.echo(_admin_token_note(database, db))
    typer.echo(f"add annotators with: rlhfkit label add-annotator NAME --db {db} --url {base}")
    if not _is_loopback(host):
        typer.echo("warning: listening beyond loopback over plain HTTP: tokens and labels travel unencrypted", err=True)
    typer.echo(f"serving on {base}/")
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])  # the app's shutdown checkpoints the WAL


@label_app.command("add-annotator")
def add_annotator(
    name: str = typer.Argument(..., help="The annotator's name (unique; appears in the export)."),
    db: Path = typer.Option(Path("labels.db"), "--db", help=DB_HELP),
    admin: bool = typer.Option(False, "--admin", help="Give this account admin rights (export, stats)."),
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help=URL_HELP),
) -> None:
    """Create an account and print its token and login link (the token is shown only now)."""
    with _database(db, create=True) as database:
        if database.new_admin_token:
            typer.echo(f"new database {db}; admin token in {admin_token_path(db)} (`rlhfkit label admin-token` shows it)")
        token = database.add_annotator(name, admin=admin)
    typer.echo(f"token: {token}")
    typer.echo(f"login link: {_login_link(url, token)}")


@label_app.command()
def revoke(
    name: str = typer.Argument(..., help="The annotator whose token stops working now (their labels stay)."),
    db: Path = typer.Option(..., "--db", help=DB_EXISTING_HELP),
) -> None:
    """Revoke an annotator's token at once (every request with it gets 401); tasks they held go back to the pool."""
    with _database(db) as database:
        released = database.revoke(name)
    typer.echo(f"revoked {name}'s token; {released} leased task(s) returned to the pool; `rlhfkit label rotate {name}` gives a new one")


@label_app.command()
def rotate(
    name: str = typer.Argument(..., help="The annotator who gets a new token (the old one stops working now)."),
    db: Path = typer.Option(..., "--db", help=DB_EXISTING_HELP),
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help=URL_HELP),
) -> None:
    """Replace an annotator's token (also brings back a revoked account) and print the new login link."""
    with _database(db) as database:
        token = database.rotate(name)
    typer.echo(f"token: {token}")
    typer.echo(f"login link: {_login_link(url, token)}")


@label_app.command("admin-token")
def admin_token(
    db: Path = typer.Option(..., "--db", help=DB_EXISTING_HELP),
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help=URL_HELP),
) -> None:
    """Show the admin token kept in <db>.admin-token (0600) and the admin login link."""
    with _database(db) as database:
        token, name = database.admin_token()
    typer.echo(f"admin token ({name}): {token}")
    typer.echo(f"admin login link: {_login_link(url, token)}")


@label_app.command()
def backup(
    db: Path = typer.Option(..., "--db", help=DB_EXISTING_HELP),
    out: Path = typer.Option(..., "--out", help="New file for the copy (an existing file is never overwritten)."),
) -> None:
    """Copy the database with SQLite's online backup API: safe while the server runs; holds every label committed before it."""
    with _database(db) as database:
        labels = database.backup(out)
    typer.echo(f"backed up {db} to {out} ({labels} label(s))", err=True)


@label_app.command()
def export(
    db: Path = typer.Option(..., "--db", help=DB_EXISTING_HELP),
    out: Path = typer.Option(..., "--out", help="Output JSONL of K-wise rankings (for the reward-model step); '-' for stdout. Never the database."),
) -> None:
    """Write every submitted label as a K-wise ranking (original response indices; skips left out)."""
    with _database(db) as database:
        if str(out) == "-":
            records = database.export_records()
            for rec in records:
                sys.stdout.write(json.dumps(rec, ensure_ascii=False) + "\n")
            count = len(records)
        else:
            count = database.write_export(out)
    typer.echo(f"exported {count} label(s)" + ("" if str(out) == "-" else f" to {out}"), err=True)


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def format_stats(s: dict) -> str:
    """The human-readable ``stats`` report."""
    lines = []
    t = s["tasks"]
    lines.append(
        f"tasks: {t['total']} ({t['complete']} complete, {t['with_labels']} with at least one label); "
        f"labels: {t['labels']} of {t['wanted']} wanted ({t['annotations_per_task']} per task)"
    )
    rows = [("annotator", "labelled", "skipped", "leased", "median s", "mean s")]
    for a in s["annotators"]:
        rows.append(
            (a["annotator"], str(a["labelled"]), str(a["skipped"]), str(a["leased"]), _fmt(a["median_seconds"]), _fmt(a["mean_seconds"]))
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines.append("")
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    ag = s["agreement"]
    lines.append("")
    lines.append("agreement (fraction of response pairs two annotators ordered the same way; a tie counts as one way):")
    if not ag["pairs"]:
        lines.append("  no task labelled by two annotators yet")
    for p in ag["pairs"]:
        lines.append(f"  {p['a']} ~ {p['b']}: {_fmt(p['agreement'], '.3f')} over {p['pairs']} pairs in {p['tasks']} shared task(s)")
    if ag["pairs"]:
        lines.append(f"  overall: {_fmt(ag['overall'], '.3f')}")
    return "\n".join(lines)


@label_app.command()
def stats(
    db: Path = typer.Option(..., "--db", help=DB_EXISTING_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON."),
) -> None:
    """Labels per annotator, seconds per task (lease to submit), and inter-annotator agreement."""
    with _database(db) as database:
        s = database.stats()
    typer.echo(json.dumps(s, indent=2) if as_json else format_stats(s))
