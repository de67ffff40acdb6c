"""Where records come from: a file, a `datasets` folder or a hub dataset in the local cache.

A source is named by a string:
    data.jsonl, data.json, data.jsonl.gz   JSON Lines, read line by line (errors name the line, 1-based)
    data.json starting with "["           a JSON array, through `datasets` (errors name the row, 0-based)
    data.parquet, data.arrow, data.csv    through `datasets`, streamed (errors name the row index)
    folder[@split]                        a `Dataset.save_to_disk` / `DatasetDict` folder (memory-mapped),
                                          or a folder of data files as `datasets.load_dataset` reads it
    owner/name[@split]                    a hub dataset in the local Hugging Face cache (never downloaded)
A `DatasetDict` without `@split` gives its only split, else its "train" split.

Rows of a dataset are plain dicts; a null cell counts as a missing field (a table has every column in
every row). JSON Lines stay with our own reader: its lines may hold different shapes (pairs and K-wise
rankings in one file, bare strings in a prompts file), which `datasets`' JSON builder, with one schema
per file, refuses, and it names the line of a malformed one.
"""

import gzip
import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Iterator

from .records import DataError, ReadStats, _json_type

log = logging.getLogger("rlhfkit.data")

_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json"}  # `datasets`' packaged readers
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _open(path, mode: str):
    path = Path(path)
    return gzip.open(path, mode) if path.suffix == ".gz" else open(path, mode)


def _jsonl_rows(path) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) for every non-blank line."""
    with _open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, line_no, "<line>", f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not text.strip():
                continue
            try:
                yield line_no, json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(path, line_no, "<line>", f"malformed JSON: {e.msg} (column {e.colno})") from None


def _is_json_array(path: Path) -> bool:
    with _open(path, "rb") as f:
        return f.read(64).decode("utf-8-sig", errors="replace").lstrip().startswith("[")


def _pick_split(splits, source: str, split: str | None):
    """One split of a DatasetDict (or IterableDatasetDict)."""
    names = list(splits)
    if split is None:
        split = names[0] if len(names) == 1 else "train" if "train" in names else None
        if split is None:
            raise FileNotFoundError(f"{source}: several splits ({', '.join(names)}); name one as {source}@SPLIT")
    if split not in names:
        raise FileNotFoundError(f"{source}: no split {split!r} (it has {', '.join(names)})")
    return splits[split]


def _hub_snapshot(repo_id: str) -> Path:
    """The folder of a hub dataset in the local cache; nothing is downloaded."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{repo_id}: no such file or folder, and no hub dataset of that name in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}). Nothing is downloaded at run time: fetch it once where there is internet, "
            f"with `hf download {repo_id} --repo-type dataset` (or `datasets.load_dataset('{repo_id}')`), "
            "and copy the cache here, or save it as a file or folder and name that."
        ) from None


def _dataset(source: str):
    """A `datasets` Dataset / IterableDataset for a source that is not JSON Lines, or None if it is."""
    path_text, split = source, None
    if "@" in Path(source).name and not Path(source).exists():
        path_text, _, split = source.rpartition("@")
    path = Path(path_text)
    if path.is_file():
        suffix = path.suffix if path.suffix != ".gz" else Path(path.stem).suffix
        builder = _BUILDERS.get(suffix)
        if builder is None or (builder == "json" and not _is_json_array(path)):
            return None
    elif not path.is_dir() and not (_HUB_ID.fullmatch(path_text) and not path.suffix):
        raise FileNotFoundError(
            f"{source}: no such file or folder (relative paths start at {Path.cwd()}). rlhfkit's example data is bundled "
            "in the project's examples/data/ (its README says where each file comes from): run from the project root, "
            "or point the config field at your copy (e.g. `--data PATH`, `--prompts PATH`)."
        )

    import datasets  # imported only here: it takes a second or two

    if path.is_file():
        return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():  # save_to_disk: memory-mapped
        ds = datasets.load_from_disk(str(path))
        return ds if isinstance(ds, datasets.Dataset) else _pick_split(ds, source, split)
    folder = path if path.is_dir() else _hub_snapshot(path_text)
    return _pick_split(datasets.load_dataset(str(folder), streaming=True), source, split)


def rows(source) -> Iterator[tuple[int, object]]:
    """(line or row number, record) of every record of a source (see the module docstring). Rows of a
    dataset are read one at a time (streamed or memory-mapped), never all at once."""
    dataset = _dataset(str(source))
    if dataset is None:
        yield from _jsonl_rows(source)
        return
    index = 0
    for table in dataset.with_format("arrow").iter(batch_size=1000):  # by arrow batches: several times faster than by rows
        for row in table.to_pylist():
            yield index, {key: value for key, value in row.items() if value is not None}
            index += 1


def objects(source) -> Iterator[tuple[int, dict]]:
    for line_no, obj in rows(source):
        if not isinstance(obj, dict):
            raise DataError(source, line_no, "<line>", f"expected a JSON object, got {_json_type(obj)}")
        yield line_no, obj


def finish(path, kind: str, records: list, skipped: Counter, stats: ReadStats | None, last_line: int = 1):
    """Refuse a source that gave nothing, count, and report what was skipped."""
    report(path, kind, len(records), skipped, stats, last_line)
    return records


def report(path, kind: str, count: int, skipped: Counter, stats: ReadStats | None, last_line: int = 1) -> None:
    """`finish` for a reader that streams its records: called once the last one is out."""
    skipped = +skipped  # drop zero counts
    why = ", ".join(f"{reason}={n}" for reason, n in sorted(skipped.items()))
    if not count:
        raise DataError(path, last_line, "<file>", f"no {kind} in file" + (f" (skipped: {why})" if why else ""))
    if stats is not None:
        stats.records += count
        stats.skipped.update(skipped)
    if skipped:
        log.warning("%s: read %d %s, skipped %d (%s)", path, count, kind, sum(skipped.values()), why)
    else:
        log.info("%s: read %d %s", path, count, kind)
