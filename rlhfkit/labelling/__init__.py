"""The annotators' labelling server: rank K responses per prompt (FastAPI + SQLite).

- ``tasks.py``    reads and validates the candidates JSONL task file;
- ``rankings.py`` ranking validation, display-order mapping, pairwise agreement (pure functions);
- ``db.py``       the SQLite store (WAL, ``synchronous=FULL``): schema, leases, labels, export, stats;
- ``app.py``      the FastAPI app (``create_app``) serving the JSON API and the static page;
- ``cli.py``      ``label_app`` (typer): ``serve``, ``add-annotator``, ``export``, ``stats``.

Nothing here imports torch: the server starts fast and runs on a laptop.
"""
