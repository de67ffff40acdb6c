"""The annotators' labelling server: rank K responses per prompt (FastAPI + SQLite).

- ``tasks.py``    reads and validates the candidates JSONL task file (URL-safe ids, lines named);
- ``rankings.py`` ranking validation, display-order mapping, pairwise agreement (pure functions);
- ``store.py``    the SQLite file: schema, connections (WAL, ``synchronous=FULL``), errors, 0600 files;
- ``db.py``       ``LabelDB``: annotators and tokens (add, revoke, rotate), import, leases, labels;
- ``reports.py``  what leaves the database: export JSONL, stats, online backup (never onto a database);
- ``app.py``      the FastAPI app (``create_app``) serving the JSON API and the static page;
- ``cli.py``      ``label_app`` (typer): ``serve``, ``add-annotator``, ``revoke``, ``rotate``,
                  ``admin-token``, ``export``, ``backup``, ``stats``.

Nothing here imports torch: the server starts fast and runs on a laptop.
"""
