"""``rlhfkit label ...``: serve the labelling page, manage annotators, export labels, show stats."""

from __future__ import annotations

import ipaddress
import json
import sys
from pathlib import Path

import typer

from .db import LabelDB, LabellingError

label_app = typer.Typer(
    name="label",
    help="Collect human rankings of model responses: a small web app for annotators (FastAPI + SQLite).",
    no_args_is_help=True,
    add_completion=False,
)

DB_HELP = "SQLite file holding tasks, annotators and labels (created if missing)."


def _login_link(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}/#token={token}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@label_app.command()
def serve(
    tasks: Path = typer.Option(None, "--tasks", help="Task JSONL (from `rlhfkit candidates`), imported idempotently by task id."),
    db: Path = typer.Option(Path("labels.db"), "--db", help=DB_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Stay on loopback unless behind a TLS proxy."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    annotations_per_task: int = typer.Option(1, "--annotations-per-task", min=1, help="How many different annotators label each task."),
    lease_seconds: float = typer.Option(600, "--lease-seconds", min=1, help="A task handed out and not submitted returns to the pool after this long."),
) -> None:
    """Import the tasks and serve the labelling page until interrupted."""
    import uvicorn

    from .app import create_app

    try:
        app = create_app(db, tasks, annotations_per_task=annotations_per_task, lease_seconds=lease_seconds)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
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
    typer.echo(f"{database.count_tasks()} tasks, {annotations_per_task} annotation(s) per task, lease {lease_seconds:g} s")
    if app.state.admin_token:
        typer.echo(f"admin token (shown once, keep it): {app.state.admin_token}")
        typer.echo(f"admin login link: {_login_link(base, app.state.admin_token)}")
    else:
        typer.echo("admin token: printed when the database was created; `add-annotator NAME --admin` makes another")
    typer.echo(f"add annotators with: rlhfkit label add-annotator NAME --db {db} --url {base}")
    if not _is_loopback(host):
        typer.echo("warning: listening beyond loopback over plain HTTP: tokens and labels travel unencrypted", err=True)
    typer.echo(f"serving on {base}/", err=False)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


@label_app.command("add-annotator")
def add_annotator(
    name: str = typer.Argument(..., help="The annotator's name (unique; appears in the export)."),
    db: Path = typer.Option(Path("labels.db"), "--db", help=DB_HELP),
    admin: bool = typer.Option(False, "--admin", help="Give this account admin rights (export, stats)."),
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help="Base URL of the server, for the login link."),
) -> None:
    """Create an account and print its token and login link (the token is shown only now)."""
    database = LabelDB(db)
    if database.new_admin_token:
        typer.echo(f"new database {db}; admin token (shown once): {database.new_admin_token}")
    try:
        token = database.add_annotator(name, admin=admin)
    except LabellingError as e:
        typer.echo(f"error: {e.message}", err=True)
        raise typer.Exit(1) from None
    finally:
        database.close()
    typer.echo(f"token: {token}")
    typer.echo(f"login link: {_login_link(url, token)}")


@label_app.command()
def export(
    db: Path = typer.Option(..., "--db", help="The labelling database."),
    out: Path = typer.Option(..., "--out", help="Output JSONL of K-wise rankings (for the reward-model step); '-' for stdout."),
) -> None:
    """Write every submitted label as a K-wise ranking (original response indices; skips left out)."""
    try:
        database = LabelDB(db, create=False)
    except FileNotFoundError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    try:
        if str(out) == "-":
            records = database.export_records()
            for rec in records:
                sys.stdout.write(json.dumps(rec, ensure_ascii=False) + "\n")
            count = len(records)
        else:
            count = database.write_export(out)
    finally:
        database.close()
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
    db: Path = typer.Option(..., "--db", help="The labelling database."),
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON."),
) -> None:
    """Labels per annotator, seconds per task (lease to submit), and inter-annotator agreement."""
    try:
        database = LabelDB(db, create=False)
    except FileNotFoundError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    try:
        s = database.stats()
    finally:
        database.close()
    typer.echo(json.dumps(s, indent=2) if as_json else format_stats(s))
